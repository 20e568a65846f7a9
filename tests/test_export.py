"""QDQ export: op types, storage types, checker, outputs vs NumPy fake-quant, atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_if_model, make_mixed_model
from onnx import numpy_helper

from onnx_mixquant.config import ExportConfig, QuantizerConfig, Symmetry
from onnx_mixquant.errors import ExportError
from onnx_mixquant.export.qdq import insert_qdq, stage_model, storage_for
from onnx_mixquant.numerics import dequantize
from onnx_mixquant.read.model import read_model, weight_array, weight_values
from onnx_mixquant.rounding import round_nearest

#: These tests pin the unpacked storage (INT4 for widths 2-4, INT8 for 5-8); test_packing.py
#: covers the bit-packed storage of widths 2, 3, 5, 6 and 7 that is the tool's default.
DEFAULT_EXPORT = ExportConfig(pack_widths=False)
DEFAULT_QUANTIZER = QuantizerConfig()


def _quantize(
    path: Path,
    bits: dict[str, int],
    cfg: ExportConfig = DEFAULT_EXPORT,
    quantizer: QuantizerConfig = DEFAULT_QUANTIZER,
):
    read = read_model(path)
    values = weight_values(read.model)
    weights = {s.name: weight_array(values[s.name]) for s in read.sites}
    axes = {s.name: s.axis for s in read.sites}
    qw = round_nearest(weights, axes, bits, quantizer)
    model, result = insert_qdq(read.model, qw, cfg)
    return model, result, qw


def _fake_quant_reference(proto: onnx.ModelProto, qw) -> onnx.ModelProto:
    """The FP model with each quantized weight replaced by dequantize(q) computed in NumPy."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    for init in ref.graph.initializer:
        if init.name in qw:
            init.CopyFrom(
                numpy_helper.from_array(dequantize(qw[init.name].q, qw[init.name].qparams), init.name)
            )
    for node in ref.graph.node:
        if node.op_type == "Constant" and node.output[0] in qw:
            w = qw[node.output[0]]
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(dequantize(w.q, w.qparams)))
    return ref


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


BITS_MIX = {"W1": 3, "W2": 4, "W3": 8, "W4": 5}


@pytest.mark.parametrize("symmetry", [Symmetry.ASYMMETRIC, Symmetry.SYMMETRIC])
def test_export_structure_and_outputs_match_numpy_fake_quant(
    mixed_model_path: Path, tmp_path: Path, symmetry: Symmetry
) -> None:
    model, result, qw = _quantize(mixed_model_path, BITS_MIX, quantizer=QuantizerConfig(symmetry=symmetry))
    staged = stage_model(model, tmp_path / "q.onnx", mixed_model_path, ExportConfig())
    staged.commit()
    out = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert result.opset_before == 17 and result.opset_after == 21
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    signed = symmetry is Symmetry.SYMMETRIC
    expect = {
        "W1": "INT4" if signed else "UINT4",
        "W2": "INT4" if signed else "UINT4",
        "W3": "INT8" if signed else "UINT8",
        "W4": "INT8" if signed else "UINT8",
    }
    assert dict(result.storage) == expect
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.output[0] for n in dq) == ["W1", "W2", "W3", "W4"]
    axes = {n.output[0]: {a.name: a.i for a in n.attribute}.get("axis") for n in dq}
    assert axes == {"W1": 0, "W2": 0, "W3": 0, "W4": 1}
    inits = {i.name: i for i in out.graph.initializer}
    assert inits["W1_quantized"].data_type == (onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4)
    assert "B1" in inits and inits["B1"].data_type == onnx.TensorProto.FLOAT  # bias stays float
    assert not any(n.op_type == "Constant" and n.output[0] == "W2" for n in out.graph.node)
    # every quantized value is inside its b-bit range (3 and 5 bits live in wider containers)
    for name, b in BITS_MIX.items():
        q = numpy_helper.to_array(inits[f"{name}_quantized"]) if name != "W2" else None
        if q is not None:
            lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)
            assert q.min() >= lo and q.max() <= hi
    feeds = {"x": np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    got = _run(str(tmp_path / "q.onnx"), feeds)[0]
    want = _run(_fake_quant_reference(onnx.load(mixed_model_path), qw), feeds)[0]
    np.testing.assert_array_equal(got, want)


def test_sub_byte_weights_are_packed_so_the_file_shrinks(mixed_model_path: Path, tmp_path: Path) -> None:
    model, _, _ = _quantize(mixed_model_path, {"W1": 4, "W2": 4, "W3": 4, "W4": 4})
    staged = stage_model(model, tmp_path / "q4.onnx", mixed_model_path, ExportConfig())
    staged.commit()
    fp = mixed_model_path.stat().st_size
    q = (tmp_path / "q4.onnx").stat().st_size
    out = onnx.load(tmp_path / "q4.onnx")
    for init in out.graph.initializer:
        if init.name.endswith("_quantized"):  # two 4-bit values per byte, as raw bytes
            n = int(np.prod(init.dims))
            assert len(init.raw_data) == (n + 1) // 2, init.name
    # weights at 1/8 of their float bytes; scales, zero points, bias and graph text remain
    assert q < 0.25 * fp, (q, fp)


def test_int8_only_plan_keeps_opset(mixed_model_path: Path) -> None:
    _, result, _ = _quantize(mixed_model_path, dict.fromkeys(BITS_MIX, 8))
    assert result.opset_before == result.opset_after == 17


def test_opset_upgrade_refused_when_disabled(mixed_model_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 21"):
        _quantize(mixed_model_path, dict.fromkeys(BITS_MIX, 4), ExportConfig(allow_opset_upgrade=False))


def test_int2_storage_uses_opset_25(mixed_model_path: Path, tmp_path: Path) -> None:
    model, result, _ = _quantize(mixed_model_path, dict.fromkeys(BITS_MIX, 2), ExportConfig(use_int2=True))
    assert result.opset_after == 25 and set(result.storage.values()) == {"UINT2"}
    staged = stage_model(model, tmp_path / "q2.onnx", mixed_model_path, ExportConfig())
    staged.commit()
    onnx.checker.check_model(onnx.load(tmp_path / "q2.onnx"), full_check=True)


def test_if_subgraph_weights(if_model_path: Path, tmp_path: Path) -> None:
    model, result, qw = _quantize(if_model_path, {"Wt": 4, "We": 6})
    assert set(result.storage) == {"Wt", "We"}
    staged = stage_model(model, tmp_path / "qif.onnx", if_model_path, ExportConfig())
    staged.commit()
    onnx.checker.check_model(onnx.load(tmp_path / "qif.onnx"), full_check=True)
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        w = qw["Wt" if cond else "We"]
        want = x @ dequantize(w.q, w.qparams)
        got = _run(str(tmp_path / "qif.onnx"), feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_export_is_byte_identical(mixed_model_path: Path, tmp_path: Path) -> None:
    blobs = []
    for i in range(2):
        model, _, _ = _quantize(mixed_model_path, BITS_MIX)
        staged = stage_model(model, tmp_path / f"d{i}.onnx", mixed_model_path, ExportConfig())
        staged.commit()
        blobs.append((tmp_path / f"d{i}.onnx").read_bytes())
    assert blobs[0] == blobs[1]


def test_external_data_when_large(mixed_model_path: Path, tmp_path: Path) -> None:
    model, _, _ = _quantize(mixed_model_path, BITS_MIX)
    staged = stage_model(
        model, tmp_path / "ext.onnx", mixed_model_path, ExportConfig(external_data_threshold=100)
    )
    staged.commit()
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    feeds = {"x": np.zeros((1, 3, 8, 8), dtype=np.float32)}
    assert _run(str(tmp_path / "ext.onnx"), feeds)[0].shape == (1, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "mixed.onnx"]


def test_refuses_to_overwrite_input_and_bad_destinations(mixed_model_path: Path, tmp_path: Path) -> None:
    model, _, _ = _quantize(mixed_model_path, BITS_MIX)
    before = mixed_model_path.read_bytes()
    with pytest.raises(ExportError, match="input model"):
        stage_model(model, mixed_model_path, mixed_model_path, ExportConfig())
    link = tmp_path / "link.onnx"
    os.symlink(mixed_model_path, link)
    with pytest.raises(ExportError, match="input model"):
        stage_model(model, link, mixed_model_path, ExportConfig())
    with pytest.raises(ExportError, match="does not exist"):
        stage_model(model, tmp_path / "missing" / "q.onnx", mixed_model_path, ExportConfig())
    with pytest.raises(ExportError, match="directory"):
        stage_model(model, tmp_path, mixed_model_path, ExportConfig())
    assert mixed_model_path.read_bytes() == before


def test_discard_leaves_nothing(mixed_model_path: Path, tmp_path: Path) -> None:
    model, _, _ = _quantize(mixed_model_path, BITS_MIX)
    staged = stage_model(model, tmp_path / "gone.onnx", mixed_model_path, ExportConfig())
    assert staged.path.exists()
    staged.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.onnx"]


def test_storage_table() -> None:
    assert storage_for(3, True, use_int2=False, per_channel=True).dtype.name == "INT4"
    assert storage_for(2, False, use_int2=True, per_channel=True).min_opset == 25
    assert storage_for(7, False, use_int2=False, per_channel=False).min_opset == 10
    assert storage_for(8, True, use_int2=False, per_channel=True).min_opset == 13


def test_if_model_fixture_is_valid() -> None:
    onnx.checker.check_model(make_if_model(), full_check=True)
    onnx.checker.check_model(make_mixed_model(), full_check=True)
