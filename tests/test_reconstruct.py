"""BRECQ end to end on the demo model (few iterations): units, learned rounding, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_SAMPLES
from onnx import numpy_helper

from onnx_mixquant import ConfigError, QuantConfig, SearchConfig, ValidateConfig, quantize
from onnx_mixquant.config import ReconConfig, RoundingMethod

pytest.importorskip("onnx_ad")


def _cfg(method: RoundingMethod, iters: int = 80) -> QuantConfig:
    return QuantConfig(
        search=SearchConfig(target_bits=3.0),
        recon=ReconConfig(method=method, iters=iters, samples=128, batch=16),
        validate=ValidateConfig(enabled=True),
    )


def _ints(path: Path) -> dict[str, np.ndarray]:
    return {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(path).graph.initializer
        if i.name.endswith("_quantized")
    }


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
