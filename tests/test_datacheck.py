"""The report says so when the calibration stages made the model worse than its weights alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_mixquant import QuantConfig, quantize
from onnx_mixquant import _datacheck as D

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
