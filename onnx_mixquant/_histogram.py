"""Streaming fixed-size histogram and the activation-range kernels of calibrate.py (NumPy only).

The histogram keeps ``n`` bins of width ``w`` on a grid anchored at 0: bin ``i`` covers
``[(lo + i) w, (lo + i + 1) w)``, so ``n w`` spans about ``[min, max]`` of everything seen. When a
batch falls outside the window, ``w`` doubles until ``[min, max]`` fits (a power-of-two multiple of
the first batch's width) and each old bin is merged into the wider bin that contains it -- exact,
because the grid of width ``2^k w`` is a coarsening of the grid of width ``w``. No sample is kept.

Worked example (n = 4): after a batch in [0, 4) the bins are [0,1) [1,2) [2,3) [3,4) with counts
(1, 2, 3, 4), w = 1, lo = 0. A batch reaching 7.5 needs span 8 > 4 w, so w becomes 2 and the
counts become (1+2, 3+4, 0, 0) over [0,2) [2,4) [4,6) [6,8) before the new batch is added.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["StreamingHistogram", "fake_quant_scores", "mse_range"]

#: Absolute bin indices stay below this, so that index arithmetic in float64 is exact.
_MAX_INDEX = 2.0**50
#: Smallest bin width (keeps 1 / w finite in float32).
_MIN_WIDTH = 1e-30
#: Candidate count x nonzero bins scored at once by the MSE search (bounds its temporary memory).
_CHUNK = 1 << 20
#: Shrink factors of the MSE search: 1.00, 0.99, ..., 0.01 (BRECQ's 1% steps, extended).
_SHRINK = 1.0 - np.arange(100) / 100.0


def _fits(vmin: float, vmax: float, width: float, n: int) -> bool:
    i0, i1 = math.floor(vmin / width), math.floor(vmax / width)
    return i1 - i0 <= n - 1 and max(abs(i0), abs(i1)) < _MAX_INDEX


def _initial_width(vmin: float, vmax: float, n: int) -> float:
    """(max - min) / (n - 2) guarantees ``floor(max/w) - floor(min/w) <= n - 1``; a constant
    batch starts narrow (grown by doubling later)."""
    span = vmax - vmin
    width = span / (n - 2) if span > 0 else max(abs(vmin), abs(vmax)) * 2.0**-20
    return max(width, _MIN_WIDTH)


class StreamingHistogram:
    """Histogram of a stream of finite values in ``num_bins`` bins, built in one pass.

    Attributes:
        counts: int64 ``(n,)`` counts of bin ``i`` = ``[(lo + i) w, (lo + i + 1) w)``.
        width: bin width ``w`` (0.0 while empty).
        lo: absolute index of the first bin.
        vmin, vmax: exact min and max of every value added.
    """

    def __init__(self, num_bins: int) -> None:
        assert num_bins >= 4, num_bins
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.width = 0.0
        self.lo = 0
        self.vmin = math.inf
        self.vmax = -math.inf

    @property
    def centres(self) -> np.ndarray:
        """float64 ``(n,)`` bin centres ``(lo + i + 1/2) w``."""
        return (self.lo + np.arange(self.counts.size) + 0.5) * self.width

    def add(self, x: np.ndarray, xmin: float, xmax: float) -> None:
        """Add the finite 1-D array ``x`` whose min and max are ``xmin`` and ``xmax``.

        Index of a value: ``clip(floor((x - lo w) / w), 0, n - 1)`` (computed in ``x``'s dtype; the
        clip only absorbs rounding at the window's edges).
        """
        if x.size == 0:
            return
        self._fit(min(self.vmin, xmin), max(self.vmax, xmax))
        n = self.counts.size
        dtype = x.dtype.type
        t = (x - dtype(self.lo * self.width)) * dtype(1.0 / self.width)
        np.clip(t, 0, n - 1, out=t)
        self.counts += np.bincount(t.astype(np.intp), minlength=n)

    def _fit(self, vmin: float, vmax: float) -> None:
        """Grow (double ``w`` k times) and shift the window so that ``[vmin, vmax]`` fits."""
        n = self.counts.size
        if self.width == 0.0:
            self.width = _initial_width(vmin, vmax, n)
        width = self.width
        while not _fits(vmin, vmax, width, n):
            width *= 2.0
        lo = math.floor(vmin / width)
        if width == self.width and self.lo <= lo and math.floor(vmax / width) <= self.lo + n - 1:
            self.vmin, self.vmax = vmin, vmax
            return
        k = round(math.log2(width / self.width))
        # Old bin a lies inside new bin floor((a + 1/2) / 2^k): exact in float64 (|a| < 2^50).
        new_index = np.floor((self.lo + np.arange(n) + 0.5) / 2.0**k).astype(np.int64) - lo
        inside = (new_index >= 0) & (new_index < n)
        assert not self.counts[~inside].any(), "occupied bins fall outside the new window"
        counts = np.zeros(n, dtype=np.int64)
        np.add.at(counts, new_index[inside], self.counts[inside])
        self.counts, self.width, self.lo = counts, width, lo
        self.vmin, self.vmax = vmin, vmax

    def quantile(self, q: float) -> float:
        """Value below which a share ``q`` in [0, 1] of the counts lies, linear within a bin,
        clipped to ``[vmin, vmax]``; exact to within one bin width."""
        cdf = np.cumsum(self.counts)
        target = q * float(cdf[-1])
        i = min(int(np.searchsorted(cdf, target, side="left")), self.counts.size - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - before) / float(self.counts[i]) if self.counts[i] > 0 else 0.0
        value = (self.lo + i + frac) * self.width
        return min(max(value, self.vmin), self.vmax)


def fake_quant_scores(
    centres: np.ndarray,
    counts: np.ndarray,
    rmin: np.ndarray,
    rmax: np.ndarray,
    p: float,
    symmetric: bool,
) -> np.ndarray:
    """Histogram estimate of ``sum |x - x'|^p`` for each candidate range (8-bit fake quantization).

    ``score[c] = sum_b counts[b] * |centres[b] - fq_c(centres[b])|^p``, clipping error included
    (values outside the range saturate). Asymmetric (uint8): the range is widened to hold 0,
    ``s = (hi - lo) / 255``, ``z = clip(rint(-lo / s), 0, 255)``,
    ``fq(x) = (clip(rint(x / s) + z, 0, 255) - z) s``. Symmetric (int8):
    ``s = max(|rmin|, |rmax|) / 127``, ``fq(x) = clip(rint(x / s), -127, 127) s``.
    E.g. range [-1, 3] asymmetric: s = 4/255, z = 64, fq(3.1) = (255 - 64) s = 2.996.

    Args:
        centres: float64 ``(B,)`` bin centres.
        counts: ``(B,)`` bin counts.
        rmin, rmax: float64 ``(C,)`` candidate ranges.
        p: the norm's exponent.
        symmetric: int8 symmetric instead of uint8 asymmetric.

    Returns:
        float64 ``(C,)`` scores.
    """
    x = centres[None, :]
    w = counts.astype(np.float64)
    if symmetric:
        scale = np.maximum(np.abs(rmin), np.abs(rmax)) / 127.0
        qmin, qmax, zero = -127.0, 127.0, np.zeros_like(scale)
    else:
        lo, hi = np.minimum(rmin, 0.0), np.maximum(rmax, 0.0)
        scale = (hi - lo) / 255.0
        qmin, qmax = 0.0, 255.0
        zero = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1.0)), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)[:, None]
    zero = zero[:, None]
    q = np.clip(np.rint(x / scale) + zero, qmin, qmax)
    err = np.abs(x - (q - zero) * scale) ** p
    return err @ w


def _scores(
    centres: np.ndarray, counts: np.ndarray, rmin: np.ndarray, rmax: np.ndarray, p: float, symmetric: bool
) -> np.ndarray:
    """fake_quant_scores over candidates in chunks of at most _CHUNK (candidate, bin) pairs."""
    step = max(1, _CHUNK // max(1, centres.size))
    parts = [
        fake_quant_scores(centres, counts, rmin[i : i + step], rmax[i : i + step], p, symmetric)
        for i in range(0, rmin.size, step)
    ]
    return np.concatenate(parts)


def mse_range(hist: StreamingHistogram, p: float, symmetric: bool) -> tuple[float, float]:
    """Range minimising the histogram's ``sum |x - x'|^p`` over ranges shrunk from ``[vmin, vmax]``.

    Symmetric: ``t = f max(|vmin|, |vmax|)`` for f in 1.00, 0.99, ..., 0.01, reported as
    ``[max(vmin, -t), min(vmax, t)]``. Asymmetric: coordinate search on the same grid -- both ends
    shrunk together (``[f vmin, f vmax]``), then ``rmax = g vmax`` with rmin fixed, then
    ``rmin = g vmin`` with rmax fixed. Every stage contains the previous best, so the score never
    exceeds the min/max range's (f = 1). Ties keep the widest range.
    """
    nz = hist.counts > 0
    centres, counts = hist.centres[nz], hist.counts[nz]
    vmin, vmax = hist.vmin, hist.vmax

    def best(rmin: np.ndarray, rmax: np.ndarray) -> int:
        return int(np.argmin(_scores(centres, counts, rmin, rmax, p, symmetric)))

    if symmetric:
        t = _SHRINK * max(abs(vmin), abs(vmax))
        i = best(-t, t)
        return max(vmin, -float(t[i])), min(vmax, float(t[i]))
    lows, highs = _SHRINK * vmin, _SHRINK * vmax
    i = best(lows, highs)
    j = best(np.full_like(highs, lows[i]), highs)
    k = best(lows, np.full_like(lows, highs[j]))
    return float(lows[k]), float(highs[j])
