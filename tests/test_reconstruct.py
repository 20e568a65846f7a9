"""BRECQ end to end on the demo model (few iterations): units, learned rounding, determinism."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_SAMPLES, dq_integers
from onnx import numpy_helper

from onnx_mixquant import ActivationConfig, ConfigError, QuantConfig, SearchConfig, ValidateConfig, quantize
from onnx_mixquant.config import IterSplit, QuantizerConfig, ReconConfig, RoundingMethod
from onnx_mixquant.report.document import format_text, to_json

pytest.importorskip("onnx_ad")


def _cfg(method: RoundingMethod, iters: int = 80) -> QuantConfig:
    return QuantConfig(
        search=SearchConfig(target_bits=3.0),
        quantizer=QuantizerConfig(block_size=None),  # BRECQ is per-channel: compare like with like
        recon=ReconConfig(method=method, iters=iters, samples=128, batch=16),
        activations=ActivationConfig(enabled=False),  # weight-only: calibration data feed BRECQ alone
        validate=ValidateConfig(enabled=True),
    )


def _ints(path: Path) -> dict[str, np.ndarray]:
    """Integer tensors by name: weights (bit-packed ones unpacked) and int32 Gemm biases."""
    return {name: q for name, q in dq_integers(path).items() if name.endswith("_quantized")}


def test_brecq_learns_rounding_unit_by_unit(tmp_path: Path) -> None:
    near = quantize(
        DEMO_MODEL,
        tmp_path / "n.onnx",
        _cfg(RoundingMethod.NEAREST),
        calib=DEMO_CALIB,
        samples_path=DEMO_SAMPLES,
    )
    brecq = quantize(
        DEMO_MODEL,
        tmp_path / "b.onnx",
        _cfg(RoundingMethod.BRECQ),
        calib=DEMO_CALIB,
        samples_path=DEMO_SAMPLES,
    )
    rec = brecq.reconstruction
    assert near.reconstruction is None and rec is not None
    assert [u.kind for u in rec.units] == ["block"] * 4
    assert sorted(w for u in rec.units for w in u.weights) == sorted(w.name for w in brecq.weights)
    learned = [u for u in rec.units if u.rounding == "learned"]
    assert learned, [(u.loss_nearest, u.loss_learned) for u in rec.units]
    for u in learned:
        assert u.loss_learned is not None and u.loss_nearest is not None
        assert u.loss_learned <= u.loss_nearest and u.iters == 80 and u.iters_per_second > 0
    # same widths and scales, different integers where rounding was learned
    assert {w.name: w.bits for w in near.weights} == {w.name: w.bits for w in brecq.weights}
    qn, qb = _ints(tmp_path / "n.onnx"), _ints(tmp_path / "b.onnx")
    changed = {n for n in qn if not np.array_equal(qn[n], qb[n])}
    assert changed and changed <= {f"{w}_quantized" for u in learned for w in u.weights}
    # learned rounding moves each integer by at most one step from nearest
    for n in changed:
        assert np.abs(qn[n].astype(np.int32) - qb[n].astype(np.int32)).max() <= 1


def test_brecq_is_deterministic(tmp_path: Path) -> None:
    cfg = _cfg(RoundingMethod.BRECQ, iters=30)
    quantize(DEMO_MODEL, tmp_path / "a.onnx", cfg, calib=DEMO_CALIB)
    quantize(DEMO_MODEL, tmp_path / "b.onnx", cfg, calib=DEMO_CALIB)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_brecq_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="brecq"):
        quantize(DEMO_MODEL, tmp_path / "x.onnx", _cfg(RoundingMethod.BRECQ))


def _a8(iters: int, act_iters: int | None, fisher: bool = False) -> QuantConfig:
    return QuantConfig(
        search=SearchConfig(target_bits=4.0),
        activations=ActivationConfig(enabled=True),
        recon=ReconConfig(
            method=RoundingMethod.BRECQ,
            iters=iters,
            samples=128,
            batch=16,
            act_iters=act_iters,
            fisher=fisher,
        ),
        validate=ValidateConfig(enabled=False),
    )


def _act_scales(path: Path) -> dict[str, float]:
    return {
        i.name[: -len("_act_scale")]: float(numpy_helper.to_array(i))
        for i in onnx.load(path).graph.initializer
        if i.name.endswith("_act_scale")
    }


def test_brecq_learns_activation_steps(tmp_path: Path) -> None:
    """With 8-bit activations, the second stage learns steps unit by unit; the steps it keeps are
    the ones written to the model (others keep the calibrated value), and it can be switched off."""
    calibrated = quantize(DEMO_MODEL, tmp_path / "c.onnx", _a8(20, 0), calib=DEMO_CALIB)
    learned = quantize(DEMO_MODEL, tmp_path / "l.onnx", _a8(20, 60), calib=DEMO_CALIB)
    assert calibrated.reconstruction is not None and calibrated.reconstruction.act_units == ()
    rec = learned.reconstruction
    assert rec is not None and len(rec.act_units) == len(rec.units)
    kept = [a for a in rec.act_units if a.steps == "learned"]
    assert kept, [(a.loss_calibrated, a.loss_learned, a.reason) for a in rec.act_units]
    for a in kept:
        assert a.loss_learned is not None and a.loss_calibrated is not None
        assert a.loss_learned <= a.loss_calibrated and a.iters == 60 and a.tensors
    # same rounding (same seed, same stage 1), so the weights are identical (Gemm biases are not:
    # their int32 scale is the activation's times the weight's); the activation scales differ
    # exactly for the tensors whose learned steps were kept
    qc, ql = _ints(tmp_path / "c.onnx"), _ints(tmp_path / "l.onnx")
    for w in learned.weights:
        np.testing.assert_array_equal(qc[f"{w.name}_quantized"], ql[f"{w.name}_quantized"])
    sc, sl = _act_scales(tmp_path / "c.onnx"), _act_scales(tmp_path / "l.onnx")
    assert sc.keys() == sl.keys()
    changed = {t for t in sc if sc[t] != sl[t]}
    assert changed == {t for a in kept for t in a.tensors}
    report_scales = {t.name: t.scale for t in learned.activations.tensors} if learned.activations else {}
    for t in changed:
        assert report_scales[t] == pytest.approx(sl[t], rel=1e-7)


def test_brecq_fisher_weights_the_error(tmp_path: Path) -> None:
    """--fisher: every unit of the demo CNN gets (|g| + 1)^2 >= 1 weights, so the first unit (same
    input, same nearest rounding in both runs) reports a larger weighted held-out error."""
    plain = quantize(DEMO_MODEL, tmp_path / "p.onnx", _a8(20, 0), calib=DEMO_CALIB)
    fisher = quantize(DEMO_MODEL, tmp_path / "f.onnx", _a8(20, 0, fisher=True), calib=DEMO_CALIB)
    assert plain.reconstruction is not None and fisher.reconstruction is not None
    assert fisher.reconstruction.fisher and not plain.reconstruction.fisher
    assert [u.fisher for u in fisher.reconstruction.units] == ["used"] * len(fisher.reconstruction.units)
    assert {u.fisher for u in plain.reconstruction.units} == {""}
    first_p, first_f = plain.reconstruction.units[0], fisher.reconstruction.units[0]
    assert first_p.loss_nearest is not None and first_f.loss_nearest is not None
    assert first_f.loss_nearest > first_p.loss_nearest
    assert "Fisher-weighted errors in 4 of 4 units" in format_text(fisher)
    assert to_json(fisher)["reconstruction"]["units"][0]["fisher"] == "used"


def test_brecq_with_activation_stage_and_fisher_is_deterministic(tmp_path: Path) -> None:
    cfg = _a8(15, 15, fisher=True)
    quantize(DEMO_MODEL, tmp_path / "a.onnx", cfg, calib=DEMO_CALIB)
    quantize(DEMO_MODEL, tmp_path / "b.onnx", cfg, calib=DEMO_CALIB)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_brecq_progress_shows_loss_rate_and_time_left(tmp_path: Path) -> None:
    """Every unit reports its iterations; the lines carry the loss, the rate and, once a first
    estimate exists, the time the whole rounding stage has left (never after its last iteration)."""
    lines: list[tuple[str, int, int, str]] = []
    quantize(
        DEMO_MODEL,
        tmp_path / "b.onnx",
        _cfg(RoundingMethod.BRECQ, iters=60),
        calib=DEMO_CALIB,
        progress=lambda stage, done, total, info="": lines.append((stage, done, total, info)),
    )
    units = [x for x in lines if x[0].startswith("unit ")]
    assert {x[0] for x in units} == {f"unit {i}/4" for i in range(1, 5)}
    assert all(x[2] == 60 and re.search(r"loss \S+ reg \S+ [\d.]+ it/s", x[3]) for x in units)
    with_eta = [x for x in units if "left" in x[3]]
    assert with_eta and all(re.search(r", about \d+(\.\d)? (s|min|h) left$", x[3]) for x in with_eta)
    assert "left" not in units[-1][3] and units[-1][1] == 60  # the last tick of the last unit


def test_brecq_error_split_moves_iterations_to_the_coarser_units(tmp_path: Path) -> None:
    """``IterSplit.ERROR``: the same total as ``iters`` per unit, more for the units whose nearest
    rounding is worse (relative error), shown per unit in the report."""
    cfg = _cfg(RoundingMethod.BRECQ, iters=40)
    cfg = replace(cfg, recon=replace(cfg.recon, split=IterSplit.ERROR))
    rep = quantize(DEMO_MODEL, tmp_path / "e.onnx", cfg, calib=DEMO_CALIB)
    rec = rep.reconstruction
    assert rec is not None and rec.split == "error"
    iters = [u.iters for u in rec.units]
    assert sum(iters) == 40 * len(rec.units) and len(set(iters)) > 1
    assert all(10 <= k <= 160 for k in iters)
    bits = {w.name: w.bits for w in rep.weights}
    narrowest = [min(bits[w] for w in u.weights) for u in rec.units]
    assert iters[int(np.argmin(narrowest))] > 40 > iters[int(np.argmax(narrowest))]
    text = format_text(rep)
    assert re.search(r"40 iterations per unit on average, split by rounding error \(\d+-\d+\)", text)
    assert f"({rec.units[0].rounding}, {iters[0]} it, " in text
