"""How BRECQ splits its iterations between the units.

``even``: every unit trains ``iters`` iterations. ``error``: the same total (``iters`` times the
number of trained units) is split in proportion to the square root of each unit's relative rounding
error with nearest rounding, ``sum ||W_q - W||^2 / sum ||W||^2`` over the unit's quantized weights,
and each unit gets between a quarter and four times ``iters``. A uniform-width plan has nearly equal
errors everywhere, so its split stays close to even; a MixQuant plan moves iterations from units
kept at 5-8 bits, where there is little rounding to learn, to the units it narrowed (2-3 bits),
whose AdaRound needs more of them to converge.

Measured with ``cpu-fast`` (500 iterations per unit on average, BENCHMARKS.md, 'iterations split
by error'): the same total lowered MixQuant + BRECQ's KL to FP32 by 0-9 % on resnet20 W4 (three
seeds) and 6 % on resnet56 W3, where its top-1 rose by 0.13 points; uniform BRECQ's KL moved by
1-5 %. Top-1 differences stayed within noise, so ``even`` remains the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from onnx_mixquant.config import IterSplit
from onnx_mixquant.numerics import dequantize
from onnx_mixquant.rounding import QuantizedWeight

__all__ = ["MAX_SHARE", "MIN_SHARE", "relative_error", "split_iterations"]

#: Bounds of a unit's iterations, as multiples of the mean per unit.
MIN_SHARE = 0.25
MAX_SHARE = 4.0


def relative_error(
    names: Sequence[str], nearest: Mapping[str, QuantizedWeight], weights: Mapping[str, np.ndarray]
) -> float:
    """``sum ||W_q - W||^2 / sum ||W||^2`` over weights ``names`` (0 when they are all zero)."""
    err = energy = 0.0
    for n in names:
        w = weights[n].astype(np.float64)
        err += float(np.sum((dequantize(nearest[n].q, nearest[n].qparams) - w) ** 2))
        energy += float(np.sum(w * w))
    return err / energy if energy > 0 else 0.0


def split_iterations(errors: Sequence[float], iters: int, split: IterSplit) -> list[int]:
    """Iterations per unit for units with relative rounding errors ``errors``; they sum to
    ``iters * len(errors)``, each is at least 1."""
    n = len(errors)
    if n == 0:
        return []
    if split is IterSplit.EVEN:
        return [iters] * n
    shares = _bounded_shares(np.sqrt(np.maximum(np.asarray(errors, np.float64), 0.0)))
    return _integers(shares * iters, iters * n)


def _bounded_shares(weight: np.ndarray) -> np.ndarray:
    """Multiples of the mean (they average 1) proportional to ``weight``, each clamped to
    [MIN_SHARE, MAX_SHARE]; what a clamp frees or takes is spread over the unclamped units."""
    n = len(weight)
    if not np.any(weight > 0):
        return np.ones(n)
    shares = np.empty(n)
    free = np.ones(n, dtype=bool)
    for _ in range(n):
        budget = n - shares[~free].sum()
        total = weight[free].sum()
        shares[free] = weight[free] * budget / total if total > 0 else budget / free.sum()
        low, high = free & (shares < MIN_SHARE), free & (shares > MAX_SHARE)
        if not (low.any() or high.any()):
            break
        shares[low], shares[high] = MIN_SHARE, MAX_SHARE
        free &= ~(low | high)
        if not free.any():
            break
    return shares


def _integers(values: np.ndarray, total: int) -> list[int]:
    """``values`` rounded to integers >= 1 that sum to ``total`` (largest remainders first; ties by
    position, so the split is deterministic)."""
    floors = np.maximum(np.floor(values).astype(np.int64), 1)
    left = total - int(floors.sum())
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - math.floor(values[i])), i))
    while left != 0:  # one pass adds what rounding down lost; a few remove what the floor of 1 added
        for i in order:
            if left > 0:
                floors[i] += 1
                left -= 1
            elif left < 0 and floors[i] > 1:
                floors[i] -= 1
                left += 1
    return [int(x) for x in floors]
