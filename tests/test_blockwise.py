"""Block-wise weight quantization: numerics vs onnx.reference, the error table, export, ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_export import _fake_quant_reference

from onnx_mixquant.config import (
    ExportConfig,
    QuantConfig,
    QuantizerConfig,
    ScaleMethod,
    SearchConfig,
    SearchRule,
    Symmetry,
    ValidateConfig,
)
from onnx_mixquant.export.qdq import insert_qdq, pack_weights, required_opset, stage_model
from onnx_mixquant.numerics import (
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    roundoff_error,
    roundoff_errors,
)
from onnx_mixquant.pipeline import quantize as quantize_model
from onnx_mixquant.read.model import read_model, weight_array, weight_values
from onnx_mixquant.rounding import block_axes, round_nearest
from onnx_mixquant.search.budget import build_error_table, search_bitwidths

#: (shape, blocked axis, block size): full blocks, a partial last block, K < block, Gemm [N, K].
LAYOUTS = [((64, 6), 0, 32), ((100, 8), 0, 32), ((7, 3), 0, 32), ((5, 70), 1, 32), ((9, 4), 0, 4)]


def _reference_dq(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, bs: int) -> np.ndarray:
    itype = TensorProto.INT8 if q.dtype == np.int8 else TensorProto.UINT8
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=axis, block_size=bs)
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info("x", itype, list(q.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": q})[0])


@pytest.mark.parametrize(("shape", "axis", "bs"), LAYOUTS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_block_dequantize_is_bit_exact_with_onnx_reference(
    shape: tuple[int, int], axis: int, bs: int, signed: bool, bits: int
) -> None:
    w = np.random.default_rng(bits).standard_t(4, size=shape).astype(np.float32)
    qp = choose_qparams(w, bits, symmetric=signed, axis=axis, block_size=bs)
    want = list(shape)
    want[axis] = -(-shape[axis] // bs)
    assert list(qp.scale.shape) == want and qp.zero_point.shape == qp.scale.shape
    assert qp.block_size == bs and qp.axis == axis
    dt = np.int8 if signed else np.uint8
    q = quantize(w, qp)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    ref = _reference_dq(q.astype(dt), qp.scale, qp.zero_point.astype(dt), axis, bs)
    got = dequantize(q, qp)
    assert np.array_equal(got, ref)
    # every block's own min-max range: its largest element is (nearly) on the grid
    err = roundoff_error(w, qp)
    assert err == roundoff_errors(w, [bits], symmetric=signed, axis=axis, block_size=bs)[0]
    np.testing.assert_allclose(err, np.mean((w - got).astype(np.float64) ** 2), rtol=1e-6)


def test_blocks_beat_per_channel_and_mse_search_works() -> None:
    w = np.random.default_rng(0).standard_t(3, size=(256, 16)).astype(np.float32)
    per_channel = roundoff_errors(w, [2, 3, 4], symmetric=False, axis=1)
    blocked = roundoff_errors(w, [2, 3, 4], symmetric=False, axis=0, block_size=32)
    assert np.all(blocked < per_channel)
    qp = choose_qparams(w, 3, symmetric=False, axis=0, block_size=32, method=ScaleMethod.MSE)
    mse = roundoff_errors(w, [3], symmetric=False, axis=0, block_size=32, method=ScaleMethod.MSE)[0]
    assert roundoff_error(w, qp) == mse <= blocked[1]
    assert np.array_equal(fake_quantize(w, qp), dequantize(quantize(w, qp), qp))


def test_bad_block_parameters_are_refused() -> None:
    w = np.ones((8, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="axis"):
        choose_qparams(w, 4, symmetric=False, axis=None, block_size=4)
    with pytest.raises(ValueError, match="positive"):
        choose_qparams(w, 4, symmetric=False, axis=0, block_size=0)
    qp = choose_qparams(w, 4, symmetric=False, axis=0, block_size=4)
    with pytest.raises(ValueError, match="do not fit"):
        quantize(np.ones((12, 4), dtype=np.float32), qp)


def _sites(path: Path):
    read = read_model(path)
    values = weight_values(read.model)
    weights = {s.name: weight_array(values[s.name]) for s in read.sites}
    return read, weights, {s.name: s.axis for s in read.sites}


def test_block_axes_and_error_table_granularity_by_width(mixed_model_path: Path) -> None:
    read, weights, axes = _sites(mixed_model_path)
    blocks = block_axes(read.sites)
    assert blocks == {"W3": 1, "W4": 0}  # Gemm transB=1 [N, K]: K is axis 1; MatMul [K, N]: 0; no Conv
    quantizer = QuantizerConfig()
    bits = (2, 3, 4, 5, 8)
    table = build_error_table(weights, axes, quantizer, bits, blocks=blocks)
    plain = build_error_table(weights, axes, QuantizerConfig(block_size=None), bits, blocks=blocks)
    assert plain.blocks is None
    for i, name in enumerate(table.names):
        for j, b in enumerate(bits):
            if name in blocks and b <= 4:
                want = roundoff_errors(weights[name], [b], symmetric=False, axis=blocks[name], block_size=32)
            else:
                want = roundoff_errors(weights[name], [b], symmetric=False, axis=axes[name])
            assert table.mse[i, j] == want[0], (name, b)
            if name != "W4":  # W4 has K = 16 < 32: one block per column is per-channel
                assert (table.mse[i, j] == plain.mse[i, j]) == (name not in blocks or b > 4)
    assert table.blocks is not None
    i3 = table.names.index("W3")  # [16, 256]: 8 blocks per row
    assert list(table.blocks[i3]) == [16 * 8, 16 * 8, 16 * 8, 0, 0]
    # storage accounting: 4-bit in blocks of 32 costs 4 + (32 + 4) / 32 = 5.125 bits per value
    assert table.scale_bits(i3, 4) == 16 * 8 * 36 and table.scale_bits(i3, 5) == 0
    plan = search_bitwidths(table, SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=4))
    sizes = dict(zip(table.names, table.sizes.tolist(), strict=True))
    blocked = 36 * (16 * 8 + 5)  # W3 and W4 (one partial block of K = 16 per column)
    assert plan.storage_bits == pytest.approx(4 + blocked / sum(sizes.values()))
    assert plan.average_bits == 4


def _export(path: Path, tmp_path: Path, bits: dict[str, int], quantizer: QuantizerConfig, pack: bool):
    read, weights, axes = _sites(path)
    qw = round_nearest(weights, axes, bits, quantizer, blocks=block_axes(read.sites))
    cfg = ExportConfig(pack_widths=pack)
    model, result = insert_qdq(read.model, qw, cfg)
    result = pack_weights(model, qw, result, cfg)
    staged = stage_model(model, tmp_path / "q.onnx", path, cfg)
    staged.commit()
    return qw, result, tmp_path / "q.onnx"


def _run(model: onnx.ModelProto | str, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_export_runs_in_onnxruntime_like_numpy_fake_quant(
    mixed_model_path: Path, tmp_path: Path, pack: bool, signed: bool
) -> None:
    quantizer = QuantizerConfig(symmetry=Symmetry.SYMMETRIC if signed else Symmetry.ASYMMETRIC)
    bits = {"W1": 4, "W2": 3, "W3": 4, "W4": 3}
    qw, result, out_path = _export(mixed_model_path, tmp_path, bits, quantizer, pack)
    assert qw["W3"].qparams.block_size == 32 and qw["W1"].qparams.block_size is None
    assert required_opset(qw, ExportConfig(pack_widths=pack)) == 21
    out = onnx.load(out_path)
    onnx.checker.check_model(out, full_check=True)
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    dq = {
        n.output[0]: {a.name: a.i for a in n.attribute}
        for n in out.graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert dq == {
        "W1": {"axis": 0},
        "W2": {"axis": 0},
        "W3": {"axis": 1, "block_size": 32},
        "W4": {"axis": 0, "block_size": 32},
    }
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits["W3_scale"].shape == (16, 8) and inits["W4_scale"].shape == (1, 5)
    zp_type = {i.name: i.data_type for i in out.graph.initializer}["W4_zero_point"]
    packed_type = TensorProto.INT8 if signed else TensorProto.UINT8
    assert zp_type == (packed_type if pack else (TensorProto.INT4 if signed else TensorProto.UINT4))
    assert result.storage["W4"] == ("INT" if signed else "UINT") + ("3 packed" if pack else "4") + " blk32"
    assert result.storage["W1"] == ("INT4" if signed else "UINT4")
    ref = _fake_quant_reference(onnx.load(mixed_model_path), qw)
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    want = _run(ref, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    got = _run(str(out_path), x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(got, want)
    fused = _run(str(out_path), x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # may use MatMulNBits
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_pipeline_default_is_blockwise_and_byte_identical(mixed_model_path: Path, tmp_path: Path) -> None:
    cfg = QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=4), validate=ValidateConfig(enabled=False)
    )
    quantize_model(mixed_model_path, tmp_path / "a.onnx", cfg)
    quantize_model(mixed_model_path, tmp_path / "b.onnx", cfg)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    out = onnx.load(tmp_path / "a.onnx")
    blocked = {
        n.output[0]
        for n in out.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
    }
    assert blocked == {"W3", "W4"}
    off = QuantConfig(search=cfg.search, validate=cfg.validate, quantizer=QuantizerConfig(block_size=None))
    quantize_model(mixed_model_path, tmp_path / "c.onnx", off)
    out = onnx.load(tmp_path / "c.onnx")
    assert not any(a.name == "block_size" for n in out.graph.node for a in n.attribute)
    # Conv weights are the same with and without blocks
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "a.onnx").graph.initializer}
    c = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    for name in ("W1_quantized", "W1_scale", "W1_zero_point"):
        assert np.array_equal(a[name], c[name])


def test_cli_block_size_option(mixed_model_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnx_mixquant.cli import main

    assert QuantizerConfig().block_at(4) == 32 and QuantizerConfig().block_at(5) is None
    assert QuantizerConfig(block_size=0).block_at(2) is None
    res = CliRunner().invoke(
        main, [str(mixed_model_path), str(tmp_path / "q.onnx"), "-q", "--no-validate", "--block-size", "0"]
    )
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "q.onnx")
    assert not any(a.name == "block_size" for n in out.graph.node for a in n.attribute)
