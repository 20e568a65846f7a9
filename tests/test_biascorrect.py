"""Empirical bias correction: which biases are found, and the corrected model's output means
measured independently in onnxruntime."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import DEMO_CALIB, DEMO_MODEL
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant import (
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    CalibrationError,
    ConfigError,
    QuantConfig,
    QuantizerConfig,
    SearchConfig,
    SearchRule,
    ValidateConfig,
    quantize,
)
from onnx_mixquant.cli import main
from onnx_mixquant.read.model import find_weight_sites
from onnx_mixquant.rounding import _segments
from onnx_mixquant.rounding.biascorrect import plan_correction

LAYERS = ("c1", "c2", "y")


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def make_cnn(opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(W1, B1) -> Relu -> Conv(W2, no bias) -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm(W3, C3, transB=1, beta=0.5) -> y[N,6]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "C3"], ["y"], name="fc", transB=1, beta=0.5),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        initializer=[
            _init("W1", rng.normal(size=(16, 3, 3, 3)) * 0.3),
            _init("B1", rng.normal(size=16) * 0.1),
            _init("W2", rng.standard_t(3, size=(12, 16, 3, 3)) * 0.1),
            _init("W3", rng.normal(size=(6, 12)) * 0.5),
            _init("C3", rng.normal(size=6)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_mlp() -> onnx.ModelProto:
    """x[N,T,8] -> MatMul(W1) -> Add(B1) -> Relu -> MatMul(W2) -> Add(B2, also read by Mul) -> y."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "B1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "B2"], ["a2"], name="add2"),
        helper.make_node("Mul", ["a2", "B2"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])],
        initializer=[
            _init("W1", rng.normal(size=(8, 16)) * 0.4),
            _init("B1", rng.normal(size=16) * 0.1),
            _init("W2", rng.normal(size=(16, 4)) * 0.4),
            _init("B2", rng.normal(size=4)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calib(n: int = 64, seed: int = 5) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).normal(0.3, 1.0, size=(n, 3, 8, 8)).astype(np.float32)
    return [{"x": x[i : i + 16]} for i in range(0, n, 16)]


def _cnn_file(folder: Path, opset: int = 13) -> Path:
    path = folder / "cnn.onnx"
    onnx.save(make_cnn(opset=opset), str(path))
    return path


def _inits(path: Path) -> dict[str, np.ndarray]:
    """The initializers of a saved model, by name."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _channel_means(path: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel means of LAYERS over ``calib`` of the model saved at ``path``."""
    return channel_means(onnx.load(str(path)), calib)


def channel_means(model: onnx.ModelProto, calib: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel means of LAYERS over ``calib``, from ``model`` (modified: LAYERS become outputs)
    run by onnxruntime without graph optimisation."""
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in LAYERS if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(list(LAYERS), feed) for feed in calib]
    return {
        name: np.mean([o[i].mean(axis=(0, 2, 3) if o[i].ndim == 4 else 0) for o in outs], axis=0)
        for i, name in enumerate(LAYERS)
    }


def _cfg(mode: BiasCorrection, acts: bool = False) -> QuantConfig:
    return QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=3, target_bits=None),
        activations=ActivationConfig(enabled=acts, keep_outputs_float=False),  # the head fuses too
        bias=BiasConfig(mode=mode),
        validate=ValidateConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The CNN quantized at 3 bits with each bias-correction mode, and every output's means."""
    tmp = tmp_path_factory.mktemp("bias")
    src = _cnn_file(tmp)
    calib = _calib()
    out: dict[str, object] = {"fp": _channel_means(src, calib), "dir": tmp}
    for mode in BiasCorrection:
        path = tmp / f"{mode.value}.onnx"
        out[f"report_{mode.value}"] = quantize(src, path, _cfg(mode), calib=calib)
        out[mode.value] = _channel_means(path, calib)
    return out


def _err(means: dict[str, np.ndarray], fp: dict[str, np.ndarray], name: str) -> float:
    return float(np.abs(means[name] - fp[name]).mean())


def test_all_gives_every_layer_its_fp_output_mean(cnn_runs: dict) -> None:
    fp, off, corrected = cnn_runs["fp"], cnn_runs["off"], cnn_runs["all"]
    for name in LAYERS:
        scale = float(np.abs(fp[name]).mean())
        assert _err(off, fp, name) > 1e-3 * scale  # 3-bit weights really shift the means
        assert _err(corrected, fp, name) < 1e-5 * max(scale, 1.0)
        assert _err(corrected, fp, name) < _err(off, fp, name) / 100
    report = cnn_runs["report_all"].bias_correction
    assert report.mode == "all" and report.method == "segments" and report.num_samples == 64
    assert [(x.node, x.created) for x in report.layers] == [("conv1", False), ("conv2", True), ("fc", False)]
    for layer in report.layers:  # the report's own numbers agree with the independent check
        assert layer.error_after < layer.error_before / 100


def test_output_mode_corrects_the_last_layer_only(cnn_runs: dict) -> None:
    fp, off, out = cnn_runs["fp"], cnn_runs["off"], cnn_runs["output"]
    np.testing.assert_array_equal(out["c1"], off["c1"])
    np.testing.assert_array_equal(out["c2"], off["c2"])
    assert _err(out, fp, "y") < _err(off, fp, "y") / 100
    report = cnn_runs["report_output"].bias_correction
    assert [x.node for x in report.layers] == ["fc"] and report.method == "output layers"


def test_only_biases_change(cnn_runs: dict) -> None:
    """Same integer weights and scales; conv2 gained a bias input; Gemm's beta = 0.5 is honoured."""
    inits_off, inits_all = _inits(cnn_runs["dir"] / "off.onnx"), _inits(cnn_runs["dir"] / "all.onnx")
    corrected = onnx.load(str(cnn_runs["dir"] / "all.onnx"))
    changed = {n for n in inits_off if not np.array_equal(inits_off[n], inits_all[n])}
    assert changed == {"B1", "C3"}
    assert set(inits_all) - set(inits_off) == {"W2_bias"}
    conv2 = next(n for n in corrected.graph.node if n.name == "conv2")
    assert list(conv2.input)[2] == "W2_bias"
    assert cnn_runs["report_off"].bias_correction is None


def test_plan_finds_biases_and_keeps_the_function() -> None:
    model = ir.from_proto(make_cnn())
    sites, _ = find_weight_sites(model)
    x = _calib(16)[0]
    before = _run(model, x)
    plan = plan_correction(model, sites)
    assert [(t.node, t.bias, t.channels, t.gain, t.output_layer) for t in plan.targets] == [
        ("conv1", "B1", 16, 1.0, False),
        ("conv2", "W2_bias", 12, 1.0, False),
        ("fc", "C3", 6, 2.0, True),
    ]
    np.testing.assert_array_equal(_run(model, x), before)  # the zero bias changes nothing


def test_plan_matmul_add_and_shared_bias() -> None:
    model = ir.from_proto(make_mlp())
    assert plan_correction(model, find_weight_sites(model)[0]).skipped[0] == (
        "mm1",
        "output rank unknown (shape inference found none)",
    )
    model = ir.from_proto(onnx.shape_inference.infer_shapes(make_mlp()))
    plan = plan_correction(model, find_weight_sites(model)[0])
    assert [(t.node, t.bias, t.channel_axis, t.rank) for t in plan.targets] == [("mm1", "B1", 2, 3)]
    assert plan.skipped == (
        ("mm2", "its Add's other input is not a float32 initializer of shape (columns,) read by it only"),
    )


def test_plan_skips_gemm_with_zero_beta() -> None:
    proto = make_cnn()
    fc = next(n for n in proto.graph.node if n.name == "fc")
    next(a for a in fc.attribute if a.name == "beta").f = 0.0
    model = ir.from_proto(proto)
    plan = plan_correction(model, find_weight_sites(model)[0])
    assert ("fc", "Gemm with beta = 0 ignores its bias") in plan.skipped
    assert [t.output_layer for t in plan.targets] == [False, True]  # conv2 now ends the chain


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0])


def test_with_8bit_activations_the_gemm_bias_is_still_int32(tmp_path: Path) -> None:
    src = _cnn_file(tmp_path, opset=17)
    calib = _calib()
    fp = _channel_means(src, calib)
    errs = {}
    for mode in (BiasCorrection.OFF, BiasCorrection.ALL):
        path = tmp_path / f"{mode.value}.onnx"
        # per-channel weights (block-wise ones have no per-column scale, so their bias stays float)
        cfg = replace(_cfg(mode, acts=True), quantizer=QuantizerConfig(block_size=None))
        quantize(src, path, cfg, calib=calib)
        errs[mode] = _err(_channel_means(path, calib), fp, "y")
        model = onnx.load(str(path))
        fc = next(n for n in model.graph.node if n.name == "fc")
        producer = next(n for n in model.graph.node if fc.input[2] in n.output)
        assert producer.op_type == "DequantizeLinear"
        assert (
            next(t for t in model.graph.initializer if t.name == producer.input[0]).data_type
            == TensorProto.INT32
        )
    assert errs[BiasCorrection.ALL] < errs[BiasCorrection.OFF] / 10


def test_needs_calibration_data(tmp_path: Path) -> None:
    src = _cnn_file(tmp_path)
    with pytest.raises(ConfigError, match="--bias-correction needs calibration data"):
        quantize(src, tmp_path / "q.onnx", _cfg(BiasCorrection.ALL))
    assert not (tmp_path / "q.onnx").exists()


def test_cli_reports_the_correction_and_is_deterministic(tmp_path: Path) -> None:
    runner = CliRunner()
    outs = []
    for i in range(2):
        out, rep = tmp_path / f"q{i}.onnx", tmp_path / f"r{i}.json"
        args = [str(DEMO_MODEL), str(out), "--weight-only", "--calib", str(DEMO_CALIB), "--target-bits", "3"]
        res = runner.invoke(main, [*args, "--bias-correction", "all", "--report", str(rep), "-q"])
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert "bias correction (all, " in res.output
    data = json.loads(rep.read_text())["bias_correction"]
    assert data["mode"] == "all" and len(data["layers"]) >= 4
    assert all(x["error_after"] < x["error_before"] for x in data["layers"])
    res = runner.invoke(main, [*args[:1], str(tmp_path / "s.onnx"), *args[2:], "--bias-samples", "16", "-q"])
    assert res.exit_code == 0, res.output
    assert "bias correction (all, by segments, 16 samples" in res.output
    res = runner.invoke(main, [str(DEMO_MODEL), str(tmp_path / "z.onnx"), "--bias-correction", "all"])
    assert res.exit_code == 2 and "--bias-correction needs calibration data" in res.output


def test_prefix_passes_give_the_same_biases_as_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs the segments cannot cut (subgraphs) take one prefix pass per layer: same result."""
    src = _cnn_file(tmp_path)
    calib = _calib()
    quantize(src, tmp_path / "seg.onnx", _cfg(BiasCorrection.ALL), calib=calib)
    monkeypatch.setattr(_segments, "plan_segments", lambda graph, cuts: "forced for the test")
    report = quantize(src, tmp_path / "pre.onnx", _cfg(BiasCorrection.ALL), calib=calib)
    assert report.bias_correction is not None and report.bias_correction.method == "prefixes"
    seg, pre = _inits(tmp_path / "seg.onnx"), _inits(tmp_path / "pre.onnx")
    for name in ("B1", "W2_bias", "C3"):
        np.testing.assert_allclose(pre[name], seg[name], rtol=1e-4, atol=1e-6)


def _skip_model(shift: float | None = None) -> ir.Model:
    """x -> Conv -> (+ shift) -> Relu = r -> Conv = c2 -> Add(r, c2) -> Conv -> y."""
    rng = np.random.default_rng(0)
    shapes = {"W1": (4, 4, 3, 3), "W2": (4, 4, 3, 3), "W3": (4, 4, 1, 1)}
    inits = [_init(k, rng.normal(size=v)) for k, v in shapes.items()]
    relu_in = "c1"
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1])]
    if shift is not None:
        inits.append(_init("shift", np.array(shift)))
        nodes.append(helper.make_node("Add", ["c1", "shift"], ["c1s"]))
        relu_in = "c1s"
    nodes += [
        helper.make_node("Relu", [relu_in], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r", "c2"], ["s"]),
        helper.make_node("Conv", ["s", "W3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.from_proto(model)


def test_segments_keep_skip_connections_alive() -> None:
    model = _skip_model()
    nodes = list(model.graph)
    segments = _segments.plan_segments(model.graph, [nodes[0], nodes[2], nodes[4]])
    assert isinstance(segments, list)
    assert [(s.inputs, s.outputs) for s in segments] == [
        (("x",), ("c1",)),
        (("c1",), ("r", "c2")),
        (("r", "c2"), ("y",)),
    ]
    assert [s.dead for s in segments] == [("x",), ("c1",), ("c2", "r", "y")]
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    seen: list[np.ndarray] = []

    def on_cut(k: int, outs: list[np.ndarray]) -> list[np.ndarray]:
        seen.append(np.concatenate(outs))
        return [o + 1.0 for o in outs] if k == 0 else outs

    _segments.run_segments(model, segments, [{"x": x[:1]}, {"x": x[1:]}], on_cut, lambda: None)
    # later segments read the changed first output: the same as a model that adds 1 to c1
    c2, y = _run_all(_skip_model(shift=1.0), {"x": x}, ["c2", "y"])
    np.testing.assert_allclose(seen[1], c2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen[2], y, rtol=1e-5, atol=1e-5)


def _run_all(model: ir.Model, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name in names:
        if values[name] not in model.graph.outputs:
            model.graph.outputs.append(values[name])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(a) for a in sess.run(names, feed)]


def test_default_is_all_with_calibration_data_else_off(tmp_path: Path) -> None:
    src = _cnn_file(tmp_path)
    auto = QuantConfig(validate=ValidateConfig(enabled=False))
    with_calib = quantize(src, tmp_path / "a.onnx", auto, calib=_calib())
    assert with_calib.settings["bias"]["mode"] == "all"
    assert with_calib.bias_correction is not None and len(with_calib.bias_correction.layers) == 3
    without = quantize(src, tmp_path / "b.onnx", auto)
    assert without.settings["bias"]["mode"] == "off" and without.bias_correction is None


def test_samples_are_whole_batches(tmp_path: Path) -> None:
    """--bias-samples 20 with batches of 16: the first two batches (a model may fix its batch)."""
    src = _cnn_file(tmp_path)
    cfg = _cfg(BiasCorrection.ALL)
    cfg = QuantConfig(
        search=cfg.search, bias=BiasConfig(mode=BiasCorrection.ALL, samples=20), validate=cfg.validate
    )
    report = quantize(src, tmp_path / "q.onnx", cfg, calib=_calib())
    assert report.bias_correction is not None and report.bias_correction.num_samples == 32
    with pytest.raises(ConfigError, match="bias correction samples"):
        BiasConfig(samples=0)


def test_a_failing_default_correction_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _cnn_file(tmp_path)
    calib = _calib()
    quantize(src, tmp_path / "off.onnx", _cfg(BiasCorrection.OFF), calib=calib)

    def broken(*args: object, **kwargs: object) -> None:
        raise CalibrationError("segment 1 cannot run")

    monkeypatch.setattr(_segments, "run_segments", broken)
    auto = replace(_cfg(BiasCorrection.OFF), bias=BiasConfig())
    report = quantize(src, tmp_path / "auto.onnx", auto, calib=calib)
    assert report.output_written and report.bias_correction is None
    assert any(
        "bias correction (default with calibration data) skipped: segment 1" in w for w in report.warnings
    )
    # the model is the uncorrected one, not a half-corrected one (conv2 keeps the zero bias it got)
    off, auto_inits = _inits(tmp_path / "off.onnx"), _inits(tmp_path / "auto.onnx")
    assert set(auto_inits) == {*off, "W2_bias"} and not auto_inits["W2_bias"].any()
    assert all(np.array_equal(off[n], auto_inits[n]) for n in off)
    with pytest.raises(CalibrationError, match="segment 1 cannot run"):
        quantize(src, tmp_path / "all.onnx", _cfg(BiasCorrection.ALL), calib=calib)
    assert not (tmp_path / "all.onnx").exists()
