"""Streaming fixed-size histogram and the activation-range kernels of ranges.py (NumPy only).

The histogram keeps ``n`` bins of width ``w = 2^e`` on a grid anchored at 0: bin ``i`` covers
``[(lo + i) w, (lo + i + 1) w)``, where ``e`` is the smallest exponent (at least ``-126``) for
which ``[min, max]`` of everything seen fits ``n`` bins, and ``lo = floor(min / w)``. A value's
bin is ``floor(x 2^-e) - lo``: a power-of-two scaling, exact in floating point, so the bin of a
value does not depend on what came before it. When a batch widens ``[min, max]``, ``e`` grows by
``k`` and old bin ``a`` merges into ``floor(a / 2^k)`` -- the bin the value would have had, since
``floor(floor(x / w) / 2^k) = floor(x / (2^k w))``. The final histogram (counts, ``e``, ``lo``) is
therefore a function of the multiset of values alone: the same however the values are split into
batches or ordered, which ranges.py relies on to give byte-identical ranges whatever batch
size the memory budget allows. No sample is kept; the chosen width is within a factor two of
``(max - min) / (n - 2)``.

Worked example (n = 4): a batch in [0, 3.5] needs ``floor(3.5 / w) <= 3``: w = 1 (e = 0), bins
[0,1) [1,2) [2,3) [3,4), counts (1, 2, 3, 4). A batch reaching 7.5 needs w = 2 (k = 1): old bins
0..3 merge into 0, 0, 1, 1, giving (1+2, 3+4, 0, 0) over [0,2) [2,4) [4,6) [6,8), then the new
batch is added -- the counts a single batch of all the values gives.

The range kernels divide the counts by their greatest common divisor first, so a tensor that
does not depend on the batch (seen once per run, and the number of runs follows the batch size)
gets the same range however often it was seen.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["StreamingHistogram", "fake_quant_scores", "grid_exponent", "mse_range"]

#: Absolute bin indices stay below this, so that index arithmetic in int64 / float64 is exact.
_MAX_INDEX = 2**50
#: Smallest bin width exponent (2^-126: float32's smallest normal number).
_MIN_EXP = -126
#: Values binned at once (bounds the temporaries of add: 4 + 8 bytes per value).
_SLICE = 1 << 22
#: Candidate count x nonzero bins scored at once by the MSE search (bounds its temporary memory).
_CHUNK = 1 << 20
#: Shrink factors of the MSE search: 1.00, 0.99, ..., 0.01 (BRECQ's 1% steps, extended).
_SHRINK = 1.0 - np.arange(100) / 100.0


def _fits(vmin: float, vmax: float, exp: int, n: int) -> bool:
    i0, i1 = math.floor(math.ldexp(vmin, -exp)), math.floor(math.ldexp(vmax, -exp))
    return i1 - i0 <= n - 1 and max(abs(i0), abs(i1)) < _MAX_INDEX


def grid_exponent(vmin: float, vmax: float, n: int) -> int:
    """Smallest ``e >= -126`` for which ``[vmin, vmax]`` fits ``n`` bins of width ``2^e`` with
    bin indices below 2^50 in magnitude (fitting is monotone in ``e``: a coarser grid spans fewer
    bins). E.g. ``grid_exponent(-1.0, 1.0, 16) == -2``: indices -4..4 at w = 0.25; at w = 0.125,
    -8..8 is 17 bins."""
    exp = _MIN_EXP
    span, big = vmax - vmin, max(abs(vmin), abs(vmax))
    if span > 0:  # below log2(span / n) the span alone needs more than n bins
        exp = max(exp, math.floor(math.log2(span / n)) - 1)
    if big > 0:
        exp = max(exp, math.frexp(big)[1] - 52)
    while not _fits(vmin, vmax, exp, n):
        exp += 1
    return exp


def _bin_counts(x: np.ndarray, exp: int, lo: int, n: int) -> np.ndarray:
    """int64 ``(n,)`` counts of ``floor(x 2^-exp) - lo`` for a finite 1-D float ``x`` inside the
    window (one slice of at most _SLICE values)."""
    t = x * x.dtype.type(2.0**-exp)  # exact: a power of two, |t| < 2^50 (no overflow)
    np.floor(t, out=t)
    if exp > 0:  # a negative value can underflow to -0.0, whose floor is 0 instead of -1
        t[(t == 0) & (x < 0)] = -1
    idx = t.astype(np.int64)
    idx -= lo
    return np.bincount(idx, minlength=n)


def _reduced(counts: np.ndarray) -> np.ndarray:
    """``counts`` divided by their greatest common divisor (unchanged when all are 0)."""
    g = int(np.gcd.reduce(counts))
    return counts // g if g > 1 else counts


class StreamingHistogram:
    """Histogram of a stream of finite values in ``num_bins`` bins, built in one pass; the result
    depends only on the multiset of values added (see the module docstring).

    Attributes:
        counts: int64 ``(n,)`` counts of bin ``i`` = ``[(lo + i) w, (lo + i + 1) w)``.
        width: bin width ``w = 2^exp`` (0.0 while empty).
        exp: the width's exponent.
        lo: absolute index of the first bin.
        vmin, vmax: exact min and max of every value added.
    """

    def __init__(self, num_bins: int) -> None:
        assert num_bins >= 4, num_bins
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.width = 0.0
        self.exp = _MIN_EXP
        self.lo = 0
        self.vmin = math.inf
        self.vmax = -math.inf

    @property
    def centres(self) -> np.ndarray:
        """float64 ``(n,)`` bin centres ``(lo + i + 1/2) w``."""
        return (self.lo + np.arange(self.counts.size) + 0.5) * self.width

    def add(self, x: np.ndarray, xmin: float, xmax: float) -> None:
        """Add the finite 1-D float32 / float64 array ``x`` whose min and max are ``xmin`` and
        ``xmax``: bin ``floor(x 2^-e) - lo``, in slices of at most 4 M values."""
        if x.size == 0:
            return
        self._fit(min(self.vmin, xmin), max(self.vmax, xmax))
        n = self.counts.size
        for i in range(0, x.size, _SLICE):
            self.counts += _bin_counts(x[i : i + _SLICE], self.exp, self.lo, n)

    def _fit(self, vmin: float, vmax: float) -> None:
        """Grow ``e`` by ``k`` and shift the window so that ``[vmin, vmax]`` fits, merging bins."""
        n = self.counts.size
        exp = grid_exponent(vmin, vmax, n)
        lo = math.floor(math.ldexp(vmin, -exp))
        if self.width == 0.0:
            self.exp, self.width, self.lo = exp, 2.0**exp, lo
        elif (exp, lo) != (self.exp, self.lo):
            k = exp - self.exp
            assert k >= 0, (exp, self.exp)
            # Old bin a lies inside new bin floor(a / 2^k); |a| < 2^50, so k > 62 acts as k = 62.
            new_index = (self.lo + np.arange(n, dtype=np.int64)) // (2 ** min(k, 62)) - lo
            inside = (new_index >= 0) & (new_index < n)
            assert not self.counts[~inside].any(), "occupied bins fall outside the new window"
            counts = np.zeros(n, dtype=np.int64)
            np.add.at(counts, new_index[inside], self.counts[inside])
            self.counts, self.exp, self.width, self.lo = counts, exp, 2.0**exp, lo
        self.vmin, self.vmax = vmin, vmax

    def quantile(self, q: float) -> float:
        """Value below which a share ``q`` in [0, 1] of the counts lies, linear within a bin,
        clipped to ``[vmin, vmax]``; exact to within one bin width."""
        counts = _reduced(self.counts)
        cdf = np.cumsum(counts)
        target = q * float(cdf[-1])
        i = min(int(np.searchsorted(cdf, target, side="left")), counts.size - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - before) / float(counts[i]) if counts[i] > 0 else 0.0
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
    centres, counts = hist.centres[nz], _reduced(hist.counts[nz])
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
