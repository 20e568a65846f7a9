"""The rounding stage's contract: methods are registered, not wired into the pipeline, and a
data-aware method can stream any layer's activations over the calibration data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_mixquant import QuantConfig, ValidateConfig, quantize
from onnx_mixquant import rounding as R
from onnx_mixquant.calibrate.ranges import activation_stream
from onnx_mixquant.config import ActivationConfig, RoundingMethod
from onnx_mixquant.read.model import read_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def _calib(n: int = 12) -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "digits_calib.npz")
    name = next(iter(x.files))
    arr = x[name][:n].astype(np.float32)
    return [{"input": arr[i : i + 4]} for i in range(0, n, 4)]


def _input_name() -> str:
    return onnx.load(MODELS / "digits_cnn.onnx").graph.input[0].name


def test_activation_stream_yields_each_batch_of_the_named_tensors() -> None:
    src = MODELS / "digits_cnn.onnx"
    read = read_model(src)
    inp = _input_name()
    x = np.load(MODELS / "digits_calib.npz")
    arr = x[x.files[0]][:8].astype(np.float32)
    batches = [{inp: arr[:5]}, {inp: arr[5:]}]
    conv = next(n for n in read.model.graph if n.op_type == "Conv")
    name = conv.outputs[0].name
    assert name is not None
    got = list(activation_stream(lambda: iter(batches))(read.model, [name]))
    assert [g[name].shape[0] for g in got] == [5, 3]  # one batch at a time, in order
    m = onnx.load(src)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run([name], {inp: arr})[0]
    np.testing.assert_allclose(np.concatenate([g[name] for g in got]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        next(activation_stream(lambda: iter(batches))(read.model, ["no_such_tensor"]))


def test_a_registered_method_is_used_without_touching_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method sees the plan, the calibration data and the layer stream; its integers are written."""
    seen: dict[str, object] = {}

    def truncating(job: R.RoundingJob) -> R.RoundingResult:
        model, plan, data = job.model, job.plan, job.data
        assert data is not None and data.stream is not None
        first = next(iter(plan.sites))
        reader = next(n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
        stream = data.stream(model, [reader.inputs[0].name])
        seen["rows"] = sum(next(iter(b.values())).shape[0] for b in stream)
        seen["source"] = data.source
        out = R.stage.nearest(job).weights
        w = out[first.name]
        zero = w.qparams.zero_point if w.qparams.zero_point is not None else 0
        flat = np.broadcast_to(
            np.asarray(zero, dtype=w.q.dtype).reshape(-1, *[1] * (w.q.ndim - 1)), w.q.shape
        )
        out[first.name] = replace(w, q=flat.astype(w.q.dtype))  # every value at the zero point
        seen["zeroed"] = first.name
        return R.RoundingResult(out)

    monkeypatch.setitem(R.METHODS, RoundingMethod.NEAREST, truncating)
    cfg = QuantConfig(activations=ActivationConfig(enabled=False), validate=ValidateConfig(enabled=False))
    inp = _input_name()
    calib = [{inp: b["input"]} for b in _calib()]
    quantize(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", cfg, calib=calib)
    assert seen["rows"] == 12 and "list" in str(seen["source"])
    model = onnx.load(tmp_path / "q.onnx")
    name = f"{seen['zeroed']}_quantized"
    q = next(t for t in model.graph.initializer if t.name == name)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
    zp = next(t for t in model.graph.initializer if t.name == dq.input[2])
    values = onnx.numpy_helper.to_array(q).astype(np.int32)
    zps = onnx.numpy_helper.to_array(zp).astype(np.int32)
    assert np.array_equal(values, np.broadcast_to(zps.reshape(-1, *[1] * (values.ndim - 1)), values.shape))


def test_brecq_needs_calibration_data() -> None:
    from onnx_mixquant.errors import ConfigError

    read = read_model(MODELS / "digits_cnn.onnx")
    plan = R.RoundingPlan(read.sites, {}, {}, {})
    cfg = QuantConfig()
    cfg = replace(cfg, recon=replace(cfg.recon, method=RoundingMethod.BRECQ))
    with pytest.raises(ConfigError, match="needs calibration data"):
        R.round_weights(read.model, plan, None, cfg)
