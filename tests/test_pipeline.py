"""The whole pipeline through the Python API, on the demo model and on inline models."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BENCH, DEMO_CALIB, DEMO_MODEL, DEMO_SAMPLES, needs_bench

from onnx_mixquant import (
    ActivationConfig,
    ConfigError,
    QuantConfig,
    SearchConfig,
    SearchRule,
    ValidateConfig,
    WeightOverride,
    quantize,
)
from onnx_mixquant.report.document import Report


def _cfg(**search: object) -> QuantConfig:
    return QuantConfig(search=SearchConfig(**search))  # type: ignore[arg-type]


def _sqnr(report: Report) -> float:
    assert report.validation is not None
    return report.validation.runs[0].outputs[0].sqnr_db


def test_mixquant_beats_uniform_at_equal_average_bits(tmp_path: Path) -> None:
    uniform = quantize(
        DEMO_MODEL,
        tmp_path / "u3.onnx",
        _cfg(rule=SearchRule.UNIFORM, uniform_bits=3, target_bits=None),
        samples_path=DEMO_SAMPLES,
    )
    mixed = quantize(DEMO_MODEL, tmp_path / "m3.onnx", _cfg(target_bits=3.0), samples_path=DEMO_SAMPLES)
    assert mixed.average_bits <= 3.0 + 1e-9
    assert len({w.bits for w in mixed.weights}) > 1
    assert _sqnr(mixed) > _sqnr(uniform) + 1.0, (_sqnr(mixed), _sqnr(uniform))


def test_byte_budget_bounds_the_stored_weights(tmp_path: Path) -> None:
    budget = 30_000
    report = quantize(
        DEMO_MODEL,
        tmp_path / "b.onnx",
        _cfg(target_bits=None, target_bytes=budget),
        samples_path=DEMO_SAMPLES,
    )
    model = onnx.load(tmp_path / "b.onnx")
    stored = sum(  # integer initializers, and the bit-packed groups of widths 2, 3, 5, 6, 7
        len(i.raw_data)
        for i in model.graph.initializer
        if i.name.endswith("_quantized") or re.fullmatch(r"packed_u?int\d\w*_data", i.name)
    )
    assert stored <= budget
    assert stored >= 0.9 * budget  # the budget is spent, not wasted
    assert report.storage_bits == pytest.approx(report.average_bits)  # no 3/5/6/7-bit waste


def test_keep_float_and_pins_reach_the_file(tmp_path: Path) -> None:
    cfg = _cfg(
        target_bits=4.0, overrides=(WeightOverride("re:^fc1", None), WeightOverride("conv1.weight", 8))
    )
    report = quantize(DEMO_MODEL, tmp_path / "k.onnx", cfg, samples_path=DEMO_SAMPLES)
    by_name = {w.name: w for w in report.weights}
    assert by_name["fc1.weight"].bits is None and "kept float" in by_name["fc1.weight"].reason
    assert by_name["conv1.weight"].bits == 8 and by_name["conv1.weight"].storage == "UINT8"
    inits = {i.name: i for i in onnx.load(tmp_path / "k.onnx").graph.initializer}
    assert inits["fc1.weight"].data_type == onnx.TensorProto.FLOAT
    assert "fc1.weight_quantized" not in inits
    assert inits["conv1.weight_quantized"].data_type == onnx.TensorProto.UINT8


def test_report_per_weight_errors_are_consistent(tmp_path: Path) -> None:
    report = quantize(DEMO_MODEL, tmp_path / "r.onnx", _cfg(target_bits=4.0), samples_path=DEMO_SAMPLES)
    assert report.output_written and report.input_bytes > 3 * report.output_bytes
    for w in report.weights:
        assert w.bits is not None and w.roundoff_mse is not None and w.sqnr_db is not None
        assert w.roundoff_mse > 0 and math.isfinite(w.sqnr_db)
    worst = min(report.weights, key=lambda w: w.sqnr_db or 0.0)
    assert worst.bits == min(w.bits or 9 for w in report.weights)
    assert {s.name for s in report.skipped} >= {"conv1.bias", "head_b", "fc1.bias"}
    assert report.validation is not None
    levels = {(r.provider, r.optimization) for r in report.validation.runs}
    assert ("CPUExecutionProvider", "ORT_ENABLE_ALL") in levels
    assert ("CPUExecutionProvider", "ORT_DISABLE_ALL") in levels


def test_constant_and_subgraph_weights_end_to_end(
    mixed_model_path: Path, if_model_path: Path, tmp_path: Path
) -> None:
    cfg = QuantConfig(search=SearchConfig(target_bits=4.0), validate=ValidateConfig(dims={"N": 3}))
    report = quantize(mixed_model_path, tmp_path / "mq.onnx", cfg)
    assert {w.name for w in report.weights} == {"W1", "W2", "W3", "W4"}
    assert _sqnr(report) > 10.0
    report = quantize(if_model_path, tmp_path / "iq.onnx", cfg)
    assert {w.name for w in report.weights} == {"Wt", "We"}
    onnx.checker.check_model(onnx.load(tmp_path / "iq.onnx"), full_check=True)


def test_paper_rule_gives_one_width_per_layer_on_min_max_grids(tmp_path: Path) -> None:
    """DESIGN: e_b / e_min is nearly the same for every layer, so QEM picks one width."""
    report = quantize(
        DEMO_MODEL,
        tmp_path / "q.onnx",
        _cfg(rule=SearchRule.QEM, qem=300.0, target_bits=None),
        samples_path=DEMO_SAMPLES,
    )
    assert {w.bits for w in report.weights} == {4}


@needs_bench
def test_efficientnet_weight_only_is_mixed_and_small(tmp_path: Path) -> None:
    model = BENCH / "models" / "efficientnet_lite0.onnx"
    cfg = QuantConfig(
        search=SearchConfig(target_bits=4.0), validate=ValidateConfig(dims={"N": 1}, num_samples=2)
    )
    report = quantize(model, tmp_path / "e.onnx", cfg)
    assert len(report.weights) == 50
    assert len({w.bits for w in report.weights}) >= 3
    assert report.output_bytes < 0.3 * report.input_bytes


class _Reader:
    """An onnxruntime CalibrationDataReader look-alike (get_next only, no rewind)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 8
        return {"input": self.x[self.i - 8 : self.i]}


def test_calibration_data_reader_and_iterables(tmp_path: Path) -> None:
    x = np.load(DEMO_CALIB)["input"]
    cfg = QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=8, target_bits=None),
        activations=ActivationConfig(enabled=True),
    )
    from_reader = quantize(DEMO_MODEL, tmp_path / "r.onnx", cfg, calib=_Reader(x), samples_path=DEMO_SAMPLES)
    from_list = quantize(
        DEMO_MODEL,
        tmp_path / "l.onnx",
        cfg,
        calib=[{"input": x[i : i + 8]} for i in range(0, len(x), 8)],
        samples_path=DEMO_SAMPLES,
    )
    from_file = quantize(DEMO_MODEL, tmp_path / "f.onnx", cfg, calib=DEMO_CALIB, samples_path=DEMO_SAMPLES)
    for report in (from_reader, from_list, from_file):
        assert report.activations is not None and report.activations.num_samples == len(x)
    # the same samples give the same ranges, whatever the container
    assert from_reader.activations.tensors == from_file.activations.tensors  # type: ignore[union-attr]
    assert (
        (tmp_path / "r.onnx").read_bytes()
        == (tmp_path / "l.onnx").read_bytes()
        == (tmp_path / "f.onnx").read_bytes()
    )
    assert _sqnr(from_file) > 30


def test_activations_need_calibration_data(tmp_path: Path) -> None:
    cfg = QuantConfig(activations=ActivationConfig(enabled=True))
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(DEMO_MODEL, tmp_path / "x.onnx", cfg)
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_runs_where_the_device_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize() runs its output-affecting sessions under QuantConfig.device: with the default
    (CPU) calibration asks for the CPU alone even where CUDA works; with AUTO it asks for CUDA first."""
    from onnx_mixquant import Device
    from onnx_mixquant import session as _ortsession
    from onnx_mixquant.calibrate import ranges as calibrate

    monkeypatch.setattr(_ortsession, "_cuda_works", lambda: True)  # as on a GPU machine
    asked: list[tuple[str, ...]] = []
    real = calibrate.compute_providers

    def recording() -> tuple[str, ...]:
        asked.append(real())
        return ("CPUExecutionProvider",)  # this machine may have no GPU: run on the CPU regardless

    monkeypatch.setattr(calibrate, "compute_providers", recording)
    base = QuantConfig(
        search=SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=8, target_bits=None),
        activations=ActivationConfig(enabled=True),
        validate=ValidateConfig(enabled=False),
    )
    for device, first in ((Device.CPU, "CPUExecutionProvider"), (Device.AUTO, "CUDAExecutionProvider")):
        asked.clear()
        quantize(
            DEMO_MODEL, tmp_path / f"{device.value}.onnx", replace(base, device=device), calib=DEMO_CALIB
        )
        assert asked and {a[0] for a in asked} == {first}
    assert _ortsession.compute_providers() == ("CPUExecutionProvider",)  # outside a run: the CPU


def test_bias_runs_cut_large_batches_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bias correction cuts batches whose inputs exceed BIAS_INPUT_BYTES into runs of the same
    samples in the same order; small batches pass through as they are."""
    from onnx_mixquant.data import sources as data
    from onnx_mixquant.read import model as graph
    from onnx_mixquant.rounding import biasruns

    read = graph.read_model(DEMO_MODEL)
    calib = data.open_calibration(DEMO_CALIB, read.inputs, batch_size=16)
    assert biasruns.bias_run_rows(calib, read) is None  # 16 digits: far below the limit
    per_sample = sum(a[:1].nbytes for a in next(iter(calib.batches())).values())
    monkeypatch.setattr(biasruns, "BIAS_INPUT_BYTES", 5 * per_sample)
    rows = biasruns.bias_run_rows(calib, read)
    assert rows == 5
    runs = list(biasruns.bias_feeds(calib, rows)())
    whole = list(calib.batches())
    assert max(len(r["input"]) for r in runs) == 5
    np.testing.assert_array_equal(
        np.concatenate([r["input"] for r in runs]), np.concatenate([b["input"] for b in whole])
    )
    assert biasruns.bias_batches(calib, QuantConfig(), rows) == 4 * 4  # 4 batches of 16 -> 4 runs each
    report = quantize(
        DEMO_MODEL,
        tmp_path / "cut.onnx",
        QuantConfig(),
        calib=DEMO_CALIB,
    )
    assert report.bias_correction is not None and report.bias_correction.layers
