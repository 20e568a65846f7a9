"""Bit-packed storage of widths 2, 3, 5, 6 and 7: the kernels, the unpack ops in onnxruntime
(folded at load, and the same integers without folding), the export and the command line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import DEMO_MODEL, DEMO_SAMPLES, dq_integers, make_mixed_model

from onnx_mixquant.cli import main
from onnx_mixquant.config import ExportConfig, Granularity, QuantizerConfig, Symmetry
from onnx_mixquant.export._packing import pack_bits, packed_bytes, unpack_bits, unpack_subgraph
from onnx_mixquant.export.qdq import insert_qdq, pack_weights
from onnx_mixquant.numerics import dequantize
from onnx_mixquant.read.model import read_model, weight_array, weight_values
from onnx_mixquant.rounding import round_nearest
from onnx_mixquant.search.budget import container_bits, stored_bytes

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _ints(rng: np.random.Generator, bits: int, signed: bool, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = _grid(bits, signed)
    q = rng.integers(lo, hi + 1, size=shape)
    q.reshape(-1)[:2] = [lo, hi][: q.size]  # both ends of the grid
    return q.astype(np.int8 if signed else np.uint8)


def _session(
    model: onnx.ModelProto | Path, level: str, optimized: Path | None = None
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def test_worked_example_of_the_docstring() -> None:
    packed = pack_bits(np.array([5, 0, 7, 2, 1, 6, 3, 4]), 3, signed=False)
    np.testing.assert_array_equal(packed, [[197, 21, 143]])
    np.testing.assert_array_equal(unpack_bits(packed, 3, False, 8), [5, 0, 7, 2, 1, 6, 3, 4])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (4, 3, 3, 3)])
def test_pack_round_trip(bits: int, signed: bool, shape: tuple[int, ...]) -> None:
    q = _ints(np.random.default_rng(bits), bits, signed, shape)
    packed = pack_bits(q, bits, signed)
    assert packed.dtype == np.uint8 and packed.shape == (-(-q.size // 8), bits)
    assert packed.nbytes == packed_bytes(q.size, bits)
    if bits not in (4, 8):  # the search prices what the export writes
        assert stored_bytes(q.size, bits, pack_widths=True) == packed.nbytes
    np.testing.assert_array_equal(unpack_bits(packed, bits, signed, q.size).reshape(shape), q)


def test_pack_refuses_values_off_the_grid() -> None:
    with pytest.raises(ValueError, match="3-bit grid"):
        pack_bits(np.array([0, 8]), 3, signed=False)
    with pytest.raises(ValueError, match="signed 5-bit grid"):
        pack_bits(np.array([-17]), 5, signed=True)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("opset", [12, 17])  # axes / split sizes as attributes, then as inputs
def test_unpack_ops_give_the_integers_in_onnxruntime(bits: int, signed: bool, opset: int) -> None:
    rng = np.random.default_rng(bits + 10 * signed)
    pieces = [_ints(rng, bits, signed, (n,)) for n in (1, 13, 8, 30)]  # 52 values: 4 of padding
    packed = pack_bits(np.concatenate(pieces), bits, signed)
    sub = unpack_subgraph(packed, bits, signed, [p.size for p in pieces], "u", opset)
    for out, piece in zip(sub.outputs, pieces, strict=True):  # graph outputs need a type and shape
        out.type = ir.TensorType(ir.DataType.INT8 if signed else ir.DataType.UINT8)
        out.shape = ir.Shape([piece.size])
    graph = ir.Graph(
        [],
        sub.outputs,
        nodes=sub.nodes,
        initializers=sub.initializers,
        opset_imports={"": opset},
        name="unpack",
    )
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    onnx.checker.check_model(proto, full_check=True)
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        got = _session(proto, level).run(None, {})
        for g, want in zip(got, pieces, strict=True):
            assert g.dtype == want.dtype
            np.testing.assert_array_equal(g, want)


def _export(
    src: Path, bits: dict[str, int], cfg: ExportConfig, quantizer: QuantizerConfig, pack: bool = True
) -> tuple[onnx.ModelProto, dict, dict[str, str], int]:
    read = read_model(src)
    values = weight_values(read.model)
    weights = {s.name: weight_array(values[s.name]) for s in read.sites}
    qw = round_nearest(weights, {s.name: s.axis for s in read.sites}, bits, quantizer)
    model, result = insert_qdq(read.model, qw, cfg)
    if pack:
        result = pack_weights(model, qw, result, cfg)
    return ir.to_proto(model), qw, dict(result.storage), result.opset_after


def _optimized_ops(proto: onnx.ModelProto, level: str, tmp_path: Path) -> Counter[str]:
    path = tmp_path / f"opt_{level}.onnx"
    _session(proto, level, path)
    return Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("symmetry", [Symmetry.ASYMMETRIC, Symmetry.SYMMETRIC])
def test_export_packs_and_onnxruntime_folds(tmp_path: Path, symmetry: Symmetry) -> None:
    """W1 (initializer) and W2 (Constant node) share a 3-bit group; W3 7 bits, W4 5 bits per column."""
    src = tmp_path / "mixed.onnx"
    onnx.save(make_mixed_model(), src)
    bits, quantizer, cfg = (
        {"W1": 3, "W2": 3, "W3": 7, "W4": 5},
        QuantizerConfig(symmetry=symmetry),
        ExportConfig(),
    )
    packed, qw, storage, opset = _export(src, bits, cfg, quantizer)
    plain, _, _, _ = _export(src, bits, cfg, quantizer, pack=False)  # the same with 8-bit integers
    container, _, _, _ = _export(src, bits, ExportConfig(pack_widths=False), quantizer)  # INT4/INT8
    onnx.checker.check_model(packed, full_check=True)
    signed = symmetry is Symmetry.SYMMETRIC
    assert storage == {n: f"{'INT' if signed else 'UINT'}{b} packed" for n, b in bits.items()}
    assert opset == 17  # 8-bit integers before the DQ: no opset 21 for the 3-bit weights
    ints = dq_integers(packed)
    for name, w in qw.items():
        got = ints[f"{name}_quantized"]
        assert got.dtype == (np.int8 if signed else np.uint8)
        np.testing.assert_array_equal(got, w.q)
    inits = {i.name: i for i in packed.graph.initializer}
    assert not any(n.endswith("_quantized") for n in inits)  # every integer tensor is packed
    zp_type = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    assert inits["W1_zero_point"].data_type == zp_type
    x = {"x": np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    for level in LEVELS:  # identical to the unpacked form at every level
        want = _session(plain, level).run(None, x)[0]
        np.testing.assert_array_equal(_session(packed, level).run(None, x)[0], want)
    want = _session(container, "ORT_DISABLE_ALL").run(None, x)[0]
    np.testing.assert_array_equal(_session(packed, "ORT_DISABLE_ALL").run(None, x)[0], want)
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):  # folded: the graph onnxruntime runs is the same
        assert _optimized_ops(packed, level, tmp_path) == _optimized_ops(plain, level, tmp_path)
    assert _optimized_ops(packed, "ORT_DISABLE_ALL", tmp_path)["Mod"] == 3  # one chain per group


def test_per_tensor_at_opset_12_keeps_the_opset(tmp_path: Path) -> None:
    src = tmp_path / "m12.onnx"
    onnx.save(make_mixed_model(opset=12), src)
    quantizer = QuantizerConfig(granularity=Granularity.PER_TENSOR)
    bits = {"W1": 3, "W2": 6, "W3": 2, "W4": 7}
    packed, qw, storage, opset = _export(src, bits, ExportConfig(), quantizer)
    assert opset == 12 and all(s.endswith("packed") for s in storage.values())
    onnx.checker.check_model(packed, full_check=True)
    ints = dq_integers(packed)
    for name, w in qw.items():
        np.testing.assert_array_equal(ints[f"{name}_quantized"], w.q)
    x = {"x": np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    outs = [_session(packed, level).run(None, x)[0] for level in LEVELS]
    plain, _, _, _ = _export(src, bits, ExportConfig(), quantizer, pack=False)
    np.testing.assert_array_equal(outs[0], _session(plain, "ORT_DISABLE_ALL").run(None, x)[0])
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-5)


def test_int2_storage_is_not_packed(tmp_path: Path) -> None:
    src = tmp_path / "mixed.onnx"
    onnx.save(make_mixed_model(), src)
    _, _, storage, opset = _export(
        src, {"W1": 2, "W2": 2, "W3": 3, "W4": 4}, ExportConfig(use_int2=True), QuantizerConfig()
    )
    assert storage == {"W1": "UINT2", "W2": "UINT2", "W3": "UINT3 packed", "W4": "UINT4"} and opset == 25


def test_if_subgraph_weights_are_packed(if_model_path: Path, tmp_path: Path) -> None:
    proto, qw, storage, _ = _export(if_model_path, {"Wt": 3, "We": 6}, ExportConfig(), QuantizerConfig())
    assert storage == {"Wt": "UINT3 packed", "We": "UINT6 packed"}
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    for cond in (True, False):
        w = qw["Wt" if cond else "We"]
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC"):  # ALL: DQ + MatMul -> MatMulNBits
            got = _session(proto, level).run(None, {"x": x, "cond": np.array(cond)})[0]
            np.testing.assert_allclose(got, x @ dequantize(w.q, w.qparams), rtol=1e-5, atol=1e-6)


def test_search_prices_packed_widths_at_their_own_width() -> None:
    assert [container_bits(b, pack_widths=True) for b in range(2, 9)] == list(range(2, 9))
    assert container_bits(2, use_int2=True, pack_widths=True) == 2
    assert [container_bits(b) for b in (2, 3, 5)] == [4, 4, 8]
    assert stored_bytes(13, 3, pack_widths=True) == 6 and stored_bytes(13, 4, pack_widths=True) == 7


def _cli(out: Path, *flags: str) -> dict:
    args = [str(DEMO_MODEL), str(out), "--uniform-bits", "3", "--samples", str(DEMO_SAMPLES), "--json", "-q"]
    args += ["--block-size", "0"]  # per-channel: storage_bits are the packed widths alone
    res = CliRunner().invoke(main, [*args, *flags])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_demo_3bit_file_shrinks_same_outputs_same_bytes(tmp_path: Path) -> None:
    a, _, off = (
        _cli(tmp_path / "a.onnx"),
        _cli(tmp_path / "b.onnx", "--pack"),
        _cli(tmp_path / "c.onnx", "--no-pack"),
    )
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert {w["storage"] for w in a["weights"]} == {"UINT3 packed"} and a["storage_bits"] == 3.0
    assert {w["storage"] for w in off["weights"]} == {"UINT4"} and off["storage_bits"] == 4.0
    assert not any("next wider" in w for w in a["warnings"])
    assert any("next wider" in w for w in off["warnings"])
    packed = [i for i in onnx.load(tmp_path / "a.onnx").graph.initializer if i.name.endswith("_data")]
    int4 = [i for i in onnx.load(tmp_path / "c.onnx").graph.initializer if i.name.endswith("_quantized")]
    n = sum(int(np.prod(i.dims)) for i in int4)
    assert sum(len(i.raw_data) for i in packed) == packed_bytes(n, 3)  # one group of 3-bit values
    assert 0.74 < packed_bytes(n, 3) / sum(len(i.raw_data) for i in int4) <= 0.751
    assert a["output_bytes"] < off["output_bytes"] - 0.6 * (n / 8)  # most of the n/8 bytes saved
    feeds = {"input": np.load(DEMO_SAMPLES)["input"][:64]}
    got = _session(tmp_path / "a.onnx", "ORT_DISABLE_ALL").run(None, feeds)[0]
    np.testing.assert_array_equal(got, _session(tmp_path / "c.onnx", "ORT_DISABLE_ALL").run(None, feeds)[0])

    def exact(report: dict) -> dict:  # the ORT_DISABLE_ALL row (INT4 + MatMul becomes MatMulNBits at ALL)
        (run,) = [r for r in report["validation"]["runs"] if r["optimization"] == "ORT_DISABLE_ALL"]
        return run

    assert exact(a)["top1_quant"] == exact(off)["top1_quant"]
    assert exact(a)["outputs"] == exact(off)["outputs"]
