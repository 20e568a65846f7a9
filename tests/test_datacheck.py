"""The report says so when the calibration stages made the model worse than its weights alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_mixquant import QuantConfig, quantize
from onnx_mixquant.validate import _datacheck as D

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_note_when_the_data_stages_cost_output_sqnr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, calib = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"
    report = quantize(src, tmp_path / "a.onnx", QuantConfig(), calib=calib)
    assert report.validation is not None and "held out" in report.validation.sample_source
    assert not any("made this model worse" in w for w in report.warnings)  # W4A8 + correction help here
    assert "data_check" in report.timings_s
    monkeypatch.setattr(D, "MARGIN_DB", -1000.0)  # any result now counts as a loss
    worse = quantize(src, tmp_path / "b.onnx", QuantConfig(), calib=calib)
    note = next(w for w in worse.warnings if "made this model worse" in w)
    assert "held out" in note and "--weight-only" in note


def test_no_check_without_calibration_data(tmp_path: Path) -> None:
    report = quantize(MODELS / "digits_cnn.onnx", tmp_path / "c.onnx", QuantConfig())
    assert "data_check" not in report.timings_s


def test_an_automatic_bias_correction_is_kept_only_where_it_helps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from onnx_mixquant.config import BiasConfig, BiasCorrection

    src, calib = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"
    kept = quantize(src, tmp_path / "kept.onnx", QuantConfig(), calib=calib)
    b = kept.bias_correction
    assert b is not None and b.held_out_db is not None and "bias_check" in kept.timings_s
    assert b.kept == (b.held_out_db[0] >= b.held_out_db[1])
    forced = quantize(
        src,
        tmp_path / "forced.onnx",
        replace(QuantConfig(), bias=BiasConfig(BiasCorrection.ALL)),
        calib=calib,
    )
    assert (
        forced.bias_correction is not None and forced.bias_correction.held_out_db is None
    )  # asked: no check
    # the model without the correction measures better: that one is written, and the report says so
    calls = iter([10.0, 20.0])
    monkeypatch.setattr(D, "_worst_sqnr", lambda result: next(calls, 0.0))
    dropped = quantize(src, tmp_path / "dropped.onnx", QuantConfig(), calib=calib)
    assert dropped.bias_correction is not None and not dropped.bias_correction.kept
    assert dropped.bias_correction.held_out_db == (10.0, 20.0)
    assert any("bias correction not written" in w for w in dropped.warnings)
    monkeypatch.undo()
    off = quantize(
        src, tmp_path / "off.onnx", replace(QuantConfig(), bias=BiasConfig(BiasCorrection.OFF)), calib=calib
    )
    assert off.output_written and dropped.output_written
    assert (tmp_path / "dropped.onnx").read_bytes() == (tmp_path / "off.onnx").read_bytes()
    assert (tmp_path / "kept.onnx").read_bytes() != (tmp_path / "off.onnx").read_bytes() or not b.kept
