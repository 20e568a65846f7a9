"""BRECQ training loop pieces: the beta/lambda schedule and Adam."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_mixquant.config import ReconConfig
from onnx_mixquant.errors import ConfigError

train = pytest.importorskip("onnx_mixquant.reconstruct.train")
_common = pytest.importorskip("onnx_mixquant.reconstruct._common")


def test_schedule_warmup_then_linear_beta() -> None:
    cfg = ReconConfig(iters=100, samples=64, batch=8)
    assert train._schedule(0, cfg) == (20.0, 0.0)
    assert train._schedule(19, cfg) == (20.0, 0.0)  # 20 % warm-up: no regulariser
    beta, lam = train._schedule(20, cfg)
    assert (beta, lam) == (20.0, 0.01)
    assert train._schedule(60, cfg)[0] == pytest.approx(11.0)  # halfway from 20 to 2
    assert train._schedule(100, cfg)[0] == pytest.approx(2.0)


def test_adam_minimises_a_quadratic() -> None:
    target = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    params = {"v": np.zeros(3, dtype=np.float32)}
    adam = _common.Adam(params, lr=0.05)
    for _ in range(500):
        adam.step(params, {"v": 2 * (params["v"] - target)})
    np.testing.assert_allclose(params["v"], target, atol=1e-2)


def test_recon_config_checks() -> None:
    with pytest.raises(ConfigError, match="batch"):
        ReconConfig(samples=16, batch=32)
    with pytest.raises(ConfigError, match="warmup"):
        ReconConfig(warmup=1.0)
