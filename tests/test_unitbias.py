"""Bias correction inside BRECQ: each unit's biases are corrected as soon as its rounding is fixed,
before the next unit is trained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_biascorrect import LAYERS, _calib, _cnn_file, channel_means, make_cnn

from onnx_mixquant import (
    BiasConfig,
    BiasCorrection,
    CalibrationError,
    QuantConfig,
    SearchConfig,
    SearchRule,
    ValidateConfig,
    quantize,
)
from onnx_mixquant.config import (
    ActivationConfig,
    QuantizerConfig,
    ReconConfig,
    ReconGranularity,
    RoundingMethod,
    Symmetry,
)
from onnx_mixquant.numerics import dequantize
from onnx_mixquant.read.model import find_weight_sites, weight_array, weight_values
from onnx_mixquant.report.document import format_text
from onnx_mixquant.rounding import round_nearest
from onnx_mixquant.rounding.biascorrect import plan_correction

train = pytest.importorskip("onnx_mixquant.rounding.reconstruct.train")
_unitbias = pytest.importorskip("onnx_mixquant.rounding.reconstruct._unitbias")

RECON = ReconConfig(method=RoundingMethod.BRECQ, iters=20, samples=64, batch=16)


def _setup() -> tuple[ir.Model, tuple, dict, dict, object]:
    """The CNN with its bias plan (a zero bias added to conv2), float and 3-bit nearest weights."""
    model = ir.from_proto(make_cnn())
    sites, _ = find_weight_sites(model)
    plan = plan_correction(model, sites)
    values = weight_values(model)
    weights = {s.name: weight_array(values[s.name]) for s in sites}
    nearest = round_nearest(
        weights,
        {s.name: s.axis for s in sites},
        dict.fromkeys(weights, 3),
        QuantizerConfig(symmetry=Symmetry.ASYMMETRIC),
    )
    return model, sites, weights, nearest, plan


def _means(model: ir.Model, calib: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return channel_means(ir.to_proto(model), calib)


def _with(model: ir.Model, arrays: dict[str, np.ndarray]) -> ir.Model:
    copy = model.clone()
    for name, a in arrays.items():
        copy.graph.initializers[name].const_value = ir.tensor(np.asarray(a, np.float32), name=name)
    return copy


def test_every_unit_leaves_brecq_with_its_fp_output_means() -> None:
    """The learned integer weights with the returned biases reproduce every layer's FP mean on the
    bias samples; with the original biases they do not (3-bit weights shift the means)."""
    model, sites, weights, nearest, plan = _setup()
    calib = _calib()
    result = train.reconstruct(
        model, sites, nearest, weights, iter(calib), RECON, bias_targets=plan.targets, bias_samples=64
    )
    assert set(result.biases) == {"B1", "W2_bias", "C3"} and result.bias_error is None
    quant = {n: dequantize(q.q, q.qparams) for n, q in result.weights.items()}
    fp, before = _means(model, calib), _means(_with(model, quant), calib)
    after = _means(_with(model, {**quant, **result.biases}), calib)
    for name in LAYERS:
        scale = max(float(np.abs(fp[name]).mean()), 1.0)
        assert np.abs(before[name] - fp[name]).mean() > 1e-3 * scale
        np.testing.assert_allclose(after[name], fp[name], atol=1e-5 * scale)
    report = result.bias
    assert report is not None and report.method == "units" and report.num_samples == 64
    assert report.provider in ort.get_available_providers()  # where the corrections ran, not "-"
    assert [x.node for x in report.layers] == ["conv1", "conv2", "fc"]
    assert all(x.error_after < x.error_before / 100 for x in report.layers)
    assert report.layers[2].max_change > 0  # Gemm beta = 0.5: the bias moved twice the mean error


def test_later_units_are_trained_on_corrected_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a unit starts training, every bias of the units before it is already corrected."""
    model, sites, weights, nearest, plan = _setup()
    seen: list[tuple[str, bool]] = []
    original = train._reconstruct_unit
    fp_b1 = model.graph.initializers["B1"].const_value.numpy().copy()

    def spy(unit, run, *args, **kwargs):  # type: ignore[no-untyped-def]
        b1 = run.work.graph.initializers["B1"].const_value.numpy()
        seen.append((unit.nodes[0], not np.array_equal(b1, fp_b1)))
        return original(unit, run, *args, **kwargs)

    monkeypatch.setattr(train, "_reconstruct_unit", spy)
    cfg = replace(RECON, granularity=ReconGranularity.LAYER)  # the CNN is one block
    train.reconstruct(
        model, sites, nearest, weights, iter(_calib()), cfg, bias_targets=plan.targets, bias_samples=64
    )
    assert seen == [("conv1", False), ("conv2", True), ("fc", True)]


def test_a_failed_measurement_stops_the_correction_or_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model, sites, weights, nearest, plan = _setup()

    def boom(*args: object, **kwargs: object) -> None:
        raise CalibrationError("bias correction: the output of 'conv1' has NaN/Inf values")

    monkeypatch.setattr(_unitbias, "correct_biases", boom)
    run = dict(bias_targets=plan.targets, bias_samples=64)
    calib = _calib()
    result = train.reconstruct(model, sites, nearest, weights, iter(calib), RECON, bias_strict=False, **run)
    assert "NaN/Inf" in (result.bias_error or "")
    assert result.bias is not None and result.bias.provider == "-" and not result.bias.layers
    assert set(result.weights) == set(nearest)  # the reconstruction itself went on
    np.testing.assert_array_equal(result.biases["B1"], model.graph.initializers["B1"].const_value.numpy())
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        train.reconstruct(model, sites, nearest, weights, iter(_calib()), RECON, **run)


def _cfg(mode: BiasCorrection | None) -> QuantConfig:
    return QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=3, target_bits=None),
        recon=RECON,
        bias=BiasConfig(mode=mode),
        activations=ActivationConfig(enabled=False),  # weight-only
        validate=ValidateConfig(enabled=False),
    )


def test_pipeline_corrects_inside_brecq_with_all_only(tmp_path: Path) -> None:
    src = _cnn_file(tmp_path)
    calib = _calib()
    default = quantize(src, tmp_path / "all.onnx", _cfg(None), calib=calib)
    rec = default.reconstruction
    assert rec is not None and rec.bias is not None
    assert [x.node for x in rec.bias.layers] == ["conv1", "conv2", "fc"]
    assert "bias correction inside BRECQ (64 samples" in format_text(default)
    # the stage after export still runs and finds (almost) nothing left to correct, weight-only
    final = default.bias_correction
    assert final is not None and all(x.error_before < 1e-4 for x in final.layers)
    output = quantize(src, tmp_path / "out.onnx", _cfg(BiasCorrection.OUTPUT), calib=calib)
    assert output.reconstruction is not None and output.reconstruction.bias is None


def test_pipeline_default_correction_failure_is_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise CalibrationError("bias correction: onnxruntime cannot run segment 0 on batch 0")

    monkeypatch.setattr(_unitbias, "correct_biases", boom)
    report = quantize(_cnn_file(tmp_path), tmp_path / "q.onnx", _cfg(None), calib=_calib())
    assert report.output_written
    assert any(w.startswith("bias correction inside BRECQ (default with calibration data) stopped")
               for w in report.warnings)  # fmt: skip
    with pytest.raises(CalibrationError, match="segment 0"):
        quantize(_cnn_file(tmp_path), tmp_path / "q2.onnx", _cfg(BiasCorrection.ALL), calib=_calib())
