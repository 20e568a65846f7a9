"""Activation Q/DQ placement, insertion, and what onnxruntime fuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant.calibrate.activations import (
    activation_qparams,
    insert_activation_qdq,
    plan_activations,
    quantize_gemm_biases,
)
from onnx_mixquant.config import ActivationConfig, ExportConfig, QuantizerConfig
from onnx_mixquant.export.qdq import insert_qdq
from onnx_mixquant.read.model import read_model, weight_array, weight_values
from onnx_mixquant.rounding import round_nearest
from onnx_mixquant.validate._fusion import check_fusion


def _residual_model(path: Path, seed: int = 0) -> Path:
    """x -> Conv1 -> Relu1 -> Conv2 -> Add(+Relu1) -> Relu2 -> MaxPool -> Flatten -> Gemm -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(8, 8, 3, 3)) * 0.15).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array((rng.normal(size=(10, 8 * 4 * 4)) * 0.1).astype(np.float32), "wg"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg"], ["y"], name="gemm", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _weights_quantized(path: Path, bits: int) -> ir.Model:
    read = read_model(path)
    values = weight_values(read.model)
    weights = {s.name: weight_array(values[s.name]) for s in read.sites}
    qw = round_nearest(
        weights, {s.name: s.axis for s in read.sites}, dict.fromkeys(weights, bits), QuantizerConfig()
    )
    model, _ = insert_qdq(read.model, qw, ExportConfig())
    return model


def _ranges(path: Path, names: tuple[str, ...], x: np.ndarray) -> dict[str, tuple[float, float]]:
    m = onnx.load(path)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        list(names), {"x": x}
    )
    return {n: (float(o.min()), float(o.max())) for n, o in zip(names, outs, strict=True)}


def test_plan_follows_onnxruntime_qdq_convention(tmp_path: Path) -> None:
    model = _weights_quantized(_residual_model(tmp_path / "m.onnx"), 8)
    plan = plan_activations(model, ActivationConfig(enabled=True))
    by = {s.name: s for s in plan.sites}
    # c1 is read only by Relu: left float so that Relu -> Q fuses; s likewise; f feeds the head
    # (the Gemm writing the float graph output), which runs in float
    assert set(by) == {"x", "r1", "c2", "r2", "p"}
    assert by["p"].shared_with == "r2"
    assert by["r1"].shared_with is None and set(by["r1"].readers) == {"conv2", "add"}
    assert plan.calibrated() == ("x", "r1", "c2", "r2")
    assert "y" not in by
    assert ("f", "read only by excluded nodes or float weight ops") in plan.skipped
    plan = plan_activations(model, ActivationConfig(enabled=True, keep_outputs_float=False))
    assert {"f", "y"} <= {s.name for s in plan.sites}  # a quantized output: the head can fuse


def test_weight_ops_that_cannot_fuse_read_float(tmp_path: Path) -> None:
    """4-bit weights never fuse into an integer kernel: Q/DQ in front of them is only noise."""
    plan = plan_activations(
        _weights_quantized(_residual_model(tmp_path / "m.onnx"), 4), ActivationConfig(enabled=True)
    )
    by = {s.name: s for s in plan.sites}
    assert "x" not in by and "f" not in by
    assert set(by["r1"].readers) == {"add"}  # conv2 reads it float


def test_exclusions(tmp_path: Path) -> None:
    model = _weights_quantized(_residual_model(tmp_path / "m.onnx"), 8)
    plan = plan_activations(
        model, ActivationConfig(enabled=True, exclude_op_types=("Add",), exclude_nodes=("re:^gemm$",))
    )
    by = {s.name: s for s in plan.sites}
    assert "c2" not in by and ("c2", "read only by excluded nodes or float weight ops") in plan.skipped
    assert by["r1"].readers == ("conv2",)
    assert "f" not in by  # read only by the excluded Gemm
    plan = plan_activations(model, ActivationConfig(enabled=True, keep_outputs_float=False))
    assert "y" in {s.name for s in plan.sites}


@pytest.mark.parametrize(("bits", "fused"), [(8, True), (4, False)])
def test_insert_runs_close_to_float_and_fuses_8_bit(tmp_path: Path, bits: int, fused: bool) -> None:
    src = _residual_model(tmp_path / "m.onnx")
    model = _weights_quantized(src, bits)
    plan = plan_activations(model, ActivationConfig(enabled=True))
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    params = {
        n: activation_qparams(lo, hi, False) for n, (lo, hi) in _ranges(src, plan.calibrated(), x).items()
    }
    assert insert_activation_qdq(model, plan, params) == (5 if bits == 8 else 4)
    out = tmp_path / "q.onnx"
    ir.save(model, out)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so.graph_optimization_level = level
        got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
        assert sqnr > (25 if bits == 8 else 12), (level, sqnr)
    result = check_fusion(out, ["conv1", "conv2", "gemm"])
    assert result is not None
    if fused:
        assert result.fused == {"conv1": "QLinearConv", "conv2": "QLinearConv"}
        assert "gemm" in result.unfused  # the head reads float: it writes the float graph output
    else:  # 4-bit weights: onnxruntime keeps DequantizeLinear + float Conv
        assert result.unfused["conv1"].endswith("Conv (float)")  # FusedConv: Conv + Relu, in float
        assert result.unfused["conv2"] == "Conv (float)"


def test_shared_parameters_are_one_initializer(tmp_path: Path) -> None:
    src = _residual_model(tmp_path / "m.onnx")
    model = _weights_quantized(src, 8)
    plan = plan_activations(model, ActivationConfig(enabled=True))
    params = {n: activation_qparams(0.0 if n != "x" else -2.0, 3.0, False) for n in plan.calibrated()}
    insert_activation_qdq(model, plan, params)
    qnodes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(qnodes) == 5
    scales = {n.inputs[0].name: n.inputs[1].name for n in qnodes}
    assert scales["p"] == scales["r2"] == "r2_act_scale"
    zp = model.graph.initializers["x_act_zero_point"].const_value
    assert zp is not None and zp.dtype == ir.DataType.UINT8 and int(zp.numpy()) == 102  # round(2/(5/255))


def test_gemm_bias_becomes_int32_so_qgemm_fuses(tmp_path: Path) -> None:
    src = _residual_model(tmp_path / "m.onnx")
    m = onnx.load(src)
    m.graph.initializer.append(numpy_helper.from_array(np.linspace(-1, 1, 10).astype(np.float32), "bg"))
    m.graph.node[-1].input.append("bg")
    onnx.save(m, src)
    model = _weights_quantized(src, 8)
    # a quantized graph output: the head can fuse
    plan = plan_activations(model, ActivationConfig(enabled=True, keep_outputs_float=False))
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    params = {
        n: activation_qparams(lo, hi, False) for n, (lo, hi) in _ranges(src, plan.calibrated(), x).items()
    }
    insert_activation_qdq(model, plan, params)
    out = tmp_path / "q.onnx"
    ir.save(model, out)
    assert quantize_gemm_biases(model) == 1
    bias = model.graph.initializers["bg_quantized"].const_value
    assert bias is not None and bias.dtype == ir.DataType.INT32
    ir.save(model, out)
    after = check_fusion(out, ["gemm"])
    assert after is not None and after.fused == {"gemm": "QGemm"}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 25


def test_zero_pads_fold_into_the_conv(tmp_path: Path) -> None:
    from onnx_mixquant.read.prepare import fold_pads_into_convs

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], dtype=np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["x", "pads"], ["p2"], name="pad_reflect", mode="reflect"),
        helper.make_node("Conv", ["p2", "w"], ["y2"], name="conv2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
        ],
        initializer=[w, pads],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "pad.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(m), src)
    model = read_model(src).model
    assert fold_pads_into_convs(model) == ["pad"]  # the reflect Pad is not zero padding
    conv = next(n for n in model.graph if n.name == "conv")
    assert list(conv.attributes.get_ints("pads")) == [2, 1, 3, 2]
    out = tmp_path / "folded.onnx"
    ir.save(model, out)
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])


def _attention_model(path: Path) -> Path:
    """x -> Q, K projections -> Softmax(Q K^T + mask) V -> output projection (one head)."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), name)
        for name in ("wq", "wk", "wo")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Add", ["s", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 6, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_attention_graph_quantizes_weight_inputs_only(tmp_path: Path) -> None:
    from onnx_mixquant import QuantConfig, ValidateConfig, quantize

    src = _attention_model(tmp_path / "attn.onnx")
    plan = plan_activations(_weights_quantized(src, 8), ActivationConfig(enabled=True))
    assert plan.mode == "attention"
    assert sorted(s.name for s in plan.sites) == ["o", "x"]  # inputs of the 8-bit weight MatMuls only
    four = plan_activations(_weights_quantized(src, 4), ActivationConfig(enabled=True))
    assert four.mode == "attention" and not four.sites  # 4-bit weights never fuse: inputs stay float
    kept = {name for name, _ in plan.skipped}
    assert {"s", "sm", "p"} <= kept  # attention scores, masked scores and Softmax stay float
    rng = np.random.default_rng(0)
    calib = [
        {"x": rng.standard_normal((2, 6, 8)).astype(np.float32), "mask": np.zeros((2, 6, 6), np.float32)}
        for _ in range(4)
    ]
    report = quantize(
        src, tmp_path / "q.onnx", QuantConfig(validate=ValidateConfig(enabled=False)), calib=calib
    )
    assert report.activations is None  # by default an attention graph keeps float activations
    forced = QuantConfig(activations=ActivationConfig(enabled=True), validate=ValidateConfig(enabled=False))
    report = quantize(src, tmp_path / "q.onnx", forced, calib=calib)
    assert report.activations is not None and report.activations.placement == "attention"
    assert report.activations.method == "minmax"  # the default range method of attention graphs


def test_weights_stored_as_constant_nodes_fuse_too(tmp_path: Path) -> None:
    """Models that store weights as Constant nodes (the DBNet text detector) carry no type on the
    node's output: the 8-bit check reads the Constant's tensor."""
    src = _residual_model(tmp_path / "m.onnx")
    m = onnx.load(src)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = [*consts, *m.graph.node]
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, src)
    plan = plan_activations(_weights_quantized(src, 8), ActivationConfig(enabled=True))
    by = {s.name: s for s in plan.sites}
    assert "x" in by and by["x"].readers == ("conv1",)
    assert set(by["r1"].readers) == {"conv2", "add"}
