"""GPTQ as a rounding method: on correlated inputs it lowers a layer's output error below nearest
rounding's, on the same grid; in the pipeline it rounds MatMul/Gemm weights and leaves the rest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant import QuantConfig, ValidateConfig, quantize
from onnx_mixquant.config import (
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    QuantizerConfig,
    RoundingMethod,
    SearchConfig,
    SearchRule,
)
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import choose_qparams, dequantize
from onnx_mixquant.numerics import quantize as q_nearest
from onnx_mixquant.rounding.gptq import gptq_round

MODELS = Path(__file__).resolve().parent.parent / "models"


def _correlated(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    return (rng.normal(size=(rows, k)) @ mix + 0.3 * rng.normal(size=(rows, 1))).astype(np.float32)


@pytest.mark.parametrize(("bits", "block"), [(3, None), (4, 16)])
def test_gptq_lowers_the_output_error_on_the_same_grid(bits: int, block: int | None) -> None:
    rng = np.random.default_rng(0)
    k, n = 64, 24
    x = _correlated(rng, 2000, k)
    w = rng.normal(size=(k, n)).astype(np.float32)
    qp = choose_qparams(w, bits, symmetric=False, axis=0 if block else 1, block_size=block)
    near = q_nearest(w, qp)
    q = gptq_round(w, x.astype(np.float64).T @ x, qp)
    assert q.shape == w.shape and q.min() >= qp.qmin and q.max() <= qp.qmax
    err_near = np.linalg.norm(x @ (w - dequantize(near, qp)))
    err_gptq = np.linalg.norm(x @ (w - dequantize(q, qp)))
    assert err_gptq < 0.8 * err_near, (err_gptq, err_near)


def test_gptq_with_a_diagonal_hessian_is_nearest_rounding() -> None:
    """Uncorrelated inputs: no row can compensate another, GPTQ keeps the nearest integers."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 8)).astype(np.float32)
    qp = choose_qparams(w, 4, symmetric=False, axis=1)
    h = np.diag(rng.uniform(0.5, 2.0, size=32))
    assert np.array_equal(gptq_round(w, h, qp), q_nearest(w, qp))


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(10, 32)).astype(np.float32) / 4, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[w1, w2],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _cfg(method: RoundingMethod) -> QuantConfig:
    cfg = QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=3, target_bits=None),
        quantizer=QuantizerConfig(block_size=None),
        activations=ActivationConfig(enabled=False),
        validate=ValidateConfig(enabled=False),
    )
    cfg = replace(cfg, bias=BiasConfig(mode=BiasCorrection.OFF))
    return replace(cfg, recon=replace(cfg.recon, method=method))


def test_pipeline_gptq_beats_nearest_on_held_out_inputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    src = _mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(2)
    calib = [{"x": _correlated(rng, 64, 16)} for _ in range(8)]
    test = _correlated(np.random.default_rng(3), 512, 16)
    errs = {}
    for method in (RoundingMethod.NEAREST, RoundingMethod.GPTQ):
        out = tmp_path / f"{method.value}.onnx"
        report = quantize(src, out, _cfg(method), calib=calib)
        assert report.output_written
        if method is RoundingMethod.GPTQ:
            assert (
                report.rounding_summary[0].startswith("GPTQ")
                and "2 MatMul/Gemm weights" in report.rounding_summary[0]
            )
        ref = ort.InferenceSession(str(src)).run(None, {"x": test})[0]
        got = ort.InferenceSession(str(out)).run(None, {"x": test})[0]
        errs[method] = float(np.mean((ref - got) ** 2))
    assert errs[RoundingMethod.GPTQ] < 0.8 * errs[RoundingMethod.NEAREST], errs


def test_gptq_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(_mlp(tmp_path / "m.onnx"), tmp_path / "q.onnx", _cfg(RoundingMethod.GPTQ))
