"""Bit-width search: error table, QEM rule, budget rule, overrides."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from onnx_mixquant.config import (
    QemReference,
    QuantizerConfig,
    SearchConfig,
    SearchRule,
    WeightOverride,
)
from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.numerics import choose_qparams, roundoff_error
from onnx_mixquant.search.budget import (
    ErrorTable,
    _allocate,
    build_error_table,
    container_bits,
    search_bitwidths,
)

BITS = (2, 3, 4, 5, 6, 7, 8)


def _table(mse: np.ndarray, sizes: list[int], energy: list[float] | None = None) -> ErrorTable:
    n = mse.shape[0]
    return ErrorTable(
        names=tuple(f"w{i}" for i in range(n)),
        sizes=np.array(sizes, dtype=np.int64),
        bits=BITS[: mse.shape[1]],
        mse=mse,
        energy=np.array(energy if energy is not None else [1.0] * n),
    )


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "heavy": rng.standard_t(2, size=(16, 32)).astype(np.float32),
        "small": (rng.normal(size=(10, 16)) * 1e-3).astype(np.float32),
    }


def test_error_table_matches_numerics() -> None:
    weights = _weights()
    axes = {"conv": 0, "heavy": 1, "small": 1}
    table = build_error_table(weights, axes, QuantizerConfig(), BITS)
    assert table.names == ("conv", "heavy", "small")
    assert table.sizes.tolist() == [288, 512, 160]
    for i, name in enumerate(table.names):
        for j, b in enumerate(BITS):
            qp = choose_qparams(weights[name], b, symmetric=False, axis=axes[name])
            assert table.mse[i, j] == pytest.approx(roundoff_error(weights[name], qp), rel=1e-6)
        assert table.energy[i] == pytest.approx(float(np.mean(weights[name].astype(np.float64) ** 2)))


def test_error_table_rejects_nan_naming_the_weight() -> None:
    w = np.ones((4, 4), dtype=np.float32)
    w[1, 2] = np.nan
    with pytest.raises(UnsupportedModelError, match="bad_weight"):
        build_error_table({"bad_weight": w}, {"bad_weight": 0}, QuantizerConfig(), BITS)


def test_error_table_progress_and_speed() -> None:
    """10^7 weights at seven widths: well under the seconds the issue allows for 10^8."""
    rng = np.random.default_rng(1)
    weights = {f"w{i}": rng.normal(size=(500, 2000)).astype(np.float32) for i in range(10)}
    calls: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    build_error_table(
        weights,
        dict.fromkeys(weights, 0),
        QuantizerConfig(),
        BITS,
        progress=lambda d, t: calls.append((d, t)),
    )
    elapsed = time.perf_counter() - t0
    assert calls[-1] == (10, 10) and len(calls) == 10
    assert elapsed < 20.0, f"error table for 10^7 weights took {elapsed:.1f} s"


def test_qem_layer_rule_picks_smallest_width_within_multiplier() -> None:
    # errors by width 2..5; reference = row minimum
    mse = np.array([[100.0, 20.0, 4.0, 1.0], [50.0, 9.0, 1.0, 1.0]])
    table = _table(mse, [10, 10])
    plan = search_bitwidths(table, SearchConfig(rule=SearchRule.QEM, qem=5.0, target_bits=None))
    assert plan.bits == {"w0": 4, "w1": 4}
    plan = search_bitwidths(table, SearchConfig(rule=SearchRule.QEM, qem=10.0, target_bits=None))
    assert plan.bits == {"w0": 4, "w1": 3}
    plan = search_bitwidths(table, SearchConfig(rule=SearchRule.QEM, qem=1.0, target_bits=None))
    assert plan.bits == {"w0": 5, "w1": 4}  # first width that reaches the minimum


def test_qem_model_reference_uses_smallest_widest_error_in_model() -> None:
    mse = np.array([[100.0, 20.0, 4.0, 1.0], [0.5, 0.1, 0.05, 0.01]])
    table = _table(mse, [10, 10])
    cfg = SearchConfig(rule=SearchRule.QEM, qem=10.0, qem_reference=QemReference.MODEL, target_bits=None)
    plan = search_bitwidths(table, cfg)
    # reference = min 5-bit error = 0.01 -> threshold 0.1
    assert plan.bits == {"w0": 5, "w1": 3}


def _brute_force(err: np.ndarray, cost: np.ndarray, budget: float) -> float:
    best = np.inf
    for combo in itertools.product(range(err.shape[1]), repeat=err.shape[0]):
        c = sum(cost[i, j] for i, j in enumerate(combo))
        if c <= budget:
            best = min(best, sum(err[i, j] for i, j in enumerate(combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_feasible_and_near_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 5, 4
    sizes = rng.integers(10, 1000, size=n)
    bits = np.array([2, 3, 4, 8])
    cost = sizes[:, None] * bits[None, :].astype(np.float64)
    # errors roughly 4^-b per weight, with noise (not always monotone)
    err = rng.uniform(0.5, 2.0, size=(n, 1)) * 4.0 ** -bits[None, :] * rng.uniform(0.7, 1.3, size=(n, k))
    budget = float(sizes.sum() * rng.uniform(2.5, 6.0))
    choice = _allocate(err, cost, budget)
    assert choice is not None
    spent = cost[np.arange(n), choice].sum()
    assert spent <= budget
    got = err[np.arange(n), choice].sum()
    assert got <= _brute_force(err, cost, budget) * 1.35


def test_budget_rule_meets_target_average_bits() -> None:
    rng = np.random.default_rng(3)
    n = 30
    sizes = rng.integers(100, 10000, size=n)
    mse = rng.uniform(0.5, 2.0, size=(n, 1)) * 4.0 ** -np.array(BITS)[None, :]
    table = _table(mse, sizes.tolist())
    for target in (2.5, 3.0, 4.0, 5.5):
        plan = search_bitwidths(table, SearchConfig(target_bits=target))
        assert plan.average_bits <= target + 1e-9
        assert plan.average_bits >= target - 0.5  # the budget is used, not wasted
        assert len(set(plan.bits.values())) > 1


def test_budget_rule_gives_more_bits_to_harder_weights() -> None:
    # two equal-size weights; w1's error is 100x higher at every width
    mse = np.array([[4.0**-b for b in BITS], [100 * 4.0**-b for b in BITS]])
    plan = search_bitwidths(_table(mse, [100, 100]), SearchConfig(target_bits=4.0))
    assert plan.bits["w1"] > plan.bits["w0"]
    assert plan.average_bits == pytest.approx(4.0)


def test_byte_budget_prices_containers_and_skips_dominated_widths() -> None:
    mse = np.array([[4.0**-b for b in BITS]] * 3)
    table = _table(mse, [1000, 1000, 1000])
    # 2000 bytes for 3000 params: INT4 everywhere costs 1500, one INT8 upgrade costs +500
    plan = search_bitwidths(table, SearchConfig(target_bits=None, target_bytes=2000))
    assert sorted(plan.bits.values()) == [4, 4, 8]  # 3 costs the same as 4 (INT4): never chosen
    assert plan.storage_bits == pytest.approx((4 + 4 + 8) / 3)


def test_budget_infeasible_is_a_config_error() -> None:
    mse = np.array([[4.0**-b for b in BITS]] * 2)
    cfg = SearchConfig(target_bits=2.5, overrides=(WeightOverride("w0", 8),))
    with pytest.raises(ConfigError, match="cannot be met"):
        search_bitwidths(_table(mse, [100, 100]), cfg)


def test_overrides_pin_keep_float_and_alias_node_names() -> None:
    mse = np.array([[4.0**-b for b in BITS]] * 3)
    table = _table(mse, [100, 100, 100])
    cfg = SearchConfig(
        rule=SearchRule.UNIFORM,
        uniform_bits=4,
        target_bits=None,
        overrides=(
            WeightOverride("w0", 8),
            WeightOverride("re:^/layer2/", None),
            WeightOverride("re:w0", 6),
        ),
    )
    plan = search_bitwidths(table, cfg, aliases={"w2": ("/layer2/Conv",)})
    assert plan.bits == {"w0": 6, "w1": 4, "w2": None}  # the last matching override wins
    assert "re:w0" in plan.reasons["w0"] and "kept float" in plan.reasons["w2"]
    assert plan.average_bits == pytest.approx(5.0)


def test_override_matching_nothing_is_an_error() -> None:
    table = _table(np.ones((1, 7)), [10])
    cfg = SearchConfig(overrides=(WeightOverride("nope", 8),))
    with pytest.raises(ConfigError, match="nope"):
        search_bitwidths(table, cfg)


def test_first_last_8bit() -> None:
    mse = np.array([[4.0**-b for b in BITS]] * 4)
    cfg = SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=3, target_bits=None, first_last_8bit=True)
    plan = search_bitwidths(_table(mse, [10] * 4), cfg)
    assert [plan.bits[f"w{i}"] for i in range(4)] == [8, 3, 3, 8]


def test_container_bits() -> None:
    assert [container_bits(b) for b in BITS] == [4, 4, 4, 8, 8, 8, 8]
    assert container_bits(2, use_int2=True) == 2


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="bit-width"):
        SearchConfig(candidate_bits=(1, 4))
    with pytest.raises(ConfigError, match="target bits"):
        SearchConfig(target_bits=9.0)
    with pytest.raises(ConfigError, match="exactly one"):
        SearchConfig(target_bits=4.0, target_bytes=100)
    with pytest.raises(ConfigError, match="qem"):
        SearchConfig(rule=SearchRule.QEM, qem=0.5)
    with pytest.raises(ConfigError, match="regular expression"):
        WeightOverride("re:(", 4)


def test_symmetric_int8_grid_is_asymmetric_below_five_bits() -> None:
    """SYMMETRIC_INT8: widths in 8-bit containers symmetric, in 4/2-bit containers asymmetric; the
    error table and the rounding stage use the same grid per width."""
    from onnx_mixquant.config import Symmetry
    from onnx_mixquant.rounding import round_nearest

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 3, 3, 3)) + 0.7).astype(np.float32)  # skewed: the grids differ
    mixed = QuantizerConfig(symmetry=Symmetry.SYMMETRIC_INT8)
    assert [mixed.symmetric_at(b) for b in BITS] == [False, False, False, True, True, True, True]
    table = build_error_table({"w": w}, {"w": 0}, mixed, BITS)
    for j, b in enumerate(BITS):
        sym = b > 4
        want = roundoff_error(w, choose_qparams(w, b, symmetric=sym, axis=0))
        other = roundoff_error(w, choose_qparams(w, b, symmetric=not sym, axis=0))
        assert table.mse[0, j] == pytest.approx(want, rel=1e-9)
        assert table.mse[0, j] != pytest.approx(other, rel=1e-3)
    q = round_nearest({"a": w, "b": w}, {"a": 0, "b": 0}, {"a": 3, "b": 8}, mixed)
    assert (q["a"].qparams.signed, q["a"].q.dtype) == (False, np.uint8)
    assert (q["b"].qparams.signed, q["b"].q.dtype) == (True, np.int8)
    assert int(np.max(np.abs(q["b"].qparams.zero_point))) == 0


def test_auto_symmetry_resolves_by_activation_mode() -> None:
    from onnx_mixquant.config import ActivationConfig, QuantConfig, Symmetry
    from onnx_mixquant.pipeline import resolve_config

    a8 = resolve_config(QuantConfig(activations=ActivationConfig(enabled=True)))
    assert a8.quantizer.symmetry is Symmetry.SYMMETRIC_INT8
    assert resolve_config(QuantConfig()).quantizer.symmetry is Symmetry.ASYMMETRIC
    pinned = QuantConfig(quantizer=QuantizerConfig(symmetry=Symmetry.SYMMETRIC))
    assert resolve_config(pinned).quantizer.symmetry is Symmetry.SYMMETRIC
