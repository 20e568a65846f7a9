"""How BRECQ splits its iterations between units (``reconstruct._budget``)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_mixquant.config import IterSplit, QuantizerConfig
from onnx_mixquant.numerics import QParams
from onnx_mixquant.rounding import QuantizedWeight, round_nearest
from onnx_mixquant.rounding.reconstruct._budget import MAX_SHARE, MIN_SHARE, relative_error, split_iterations


def test_even_split_gives_every_unit_the_same() -> None:
    assert split_iterations([0.1, 0.001, 0.5], 500, IterSplit.EVEN) == [500, 500, 500]


def test_error_split_keeps_the_total_and_follows_the_square_root_of_the_error() -> None:
    got = split_iterations([0.01, 0.04, 0.09], 600, IterSplit.ERROR)
    assert sum(got) == 1800
    assert got == [300, 600, 900]  # sqrt: 0.1 : 0.2 : 0.3


def test_equal_errors_split_evenly() -> None:
    assert split_iterations([0.02] * 5, 333, IterSplit.ERROR) == [333] * 5


def test_error_split_is_bounded_and_redistributes_what_the_bounds_take() -> None:
    errors = [1e-8, 1e-6, 0.01, 0.01, 4.0]  # tiny ones hit the floor, the large one the cap
    got = split_iterations(errors, 400, IterSplit.ERROR)
    assert sum(got) == 2000
    assert got[0] == got[1] == MIN_SHARE * 400
    assert got[4] == MAX_SHARE * 400
    assert got[2] == got[3] == (2000 - 100 - 100 - 1600) // 2


@pytest.mark.parametrize("seed", range(5))
def test_error_split_rounds_to_integers_that_sum_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    errors = list(rng.lognormal(size=int(rng.integers(1, 30))) * 1e-3)
    for iters in (1, 7, 500):
        got = split_iterations(errors, iters, IterSplit.ERROR)
        assert sum(got) == iters * len(errors) and min(got) >= 1
        assert got == split_iterations(errors, iters, IterSplit.ERROR)  # deterministic
        if iters == 500:
            assert all(MIN_SHARE * iters - 1 <= k <= MAX_SHARE * iters + 1 for k in got)
            order = np.argsort(errors, kind="stable")
            assert all(got[a] <= got[b] for a, b in zip(order, order[1:], strict=False))


def test_all_zero_errors_split_evenly() -> None:
    assert split_iterations([0.0, 0.0], 50, IterSplit.ERROR) == [50, 50]
    assert split_iterations([], 50, IterSplit.ERROR) == []


def test_relative_error_is_the_units_rounding_error_over_its_energy() -> None:
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=(2, 8)).astype(np.float32)}
    q = round_nearest(w, {"a": 0, "b": 0}, {"a": 2, "b": 6}, QuantizerConfig())
    r_a, r_b = relative_error(["a"], q, w), relative_error(["b"], q, w)
    assert 10 * r_b < r_a < 0.2  # 2 bits far coarser than 6
    both = relative_error(["a", "b"], q, w)
    ea, eb = float(np.sum(w["a"].astype(np.float64) ** 2)), float(np.sum(w["b"].astype(np.float64) ** 2))
    assert both == pytest.approx((r_a * ea + r_b * eb) / (ea + eb))
    zero = {"z": np.zeros((2, 3), np.float32)}
    qp = QParams(2, False, np.ones(2, np.float32), np.zeros(2, np.int32), 0)
    assert relative_error(["z"], {"z": QuantizedWeight("z", np.zeros((2, 3), np.uint8), qp)}, zero) == 0.0
