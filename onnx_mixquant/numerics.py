"""Uniform affine quantization in NumPy: choose scales, quantize, dequantize, roundoff error.

NumPy only: this module imports no onnx, onnx_ir or onnxruntime.

Every kernel sees a weight through a 3-D view ``(A, C, B)``: ``C`` channels on the quantization
axis, ``A`` and ``B`` the products of the dimensions before and after it (per-tensor: ``C = 1``).
A block-wise weight is seen as ``(1, R, block_size)``, one row per block (see :mod:`._blocks`).
The view never copies a contiguous weight, and the kernels walk it in chunks of about
``_CHUNK`` elements so that temporaries stay small and cache-resident.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_mixquant._blocks import (
    block_rows,
    broadcast_blocks,
    check_block_size,
    params_from_rows,
    params_to_rows,
)
from onnx_mixquant.config import ScaleMethod
from onnx_mixquant.errors import UnsupportedModelError

__all__ = [
    "QParams",
    "broadcast_params",
    "check_finite",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "quant_range",
    "quantize",
    "roundoff_error",
    "roundoff_errors",
]

#: Elements per kernel chunk (1 MiB of float32 per temporary).
_CHUNK = 1 << 18
#: Smallest scale: the smallest normal float32, so a scale is never 0, NaN or subnormal.
_MIN_SCALE = float(np.finfo(np.float32).tiny)
#: Largest |range end|: half the float32 maximum, so every grid point (q - z) * s stays finite
#: (the lowest symmetric 2-bit level is -2 max|w|).
_MAX_RANGE = float(np.finfo(np.float32).max) / 2


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    Attributes:
        bits: width 2..8.
        signed: True for symmetric (signed range, zero_point 0), False for asymmetric (unsigned).
        scale: float32, shape ``(C,)`` per-channel (``C = w.shape[axis]``), ``()`` per-tensor,
            or block-wise the weight's shape with ``ceil(K / block_size)`` on ``axis``; > 0.
        zero_point: int32, same shape as ``scale``, inside ``quant_range(bits, signed)``.
        axis: channel axis (non-negative), None for per-tensor; block-wise: the blocked axis
            (the reduction axis ``K``, as DequantizeLinear's ``axis`` attribute).
        block_size: None, or the elements per block along ``axis`` (the last block may be
            partial). Example: MatMul weight ``[K, N] = [100, 8]``, ``axis=0``, ``block_size=32``:
            scale shape ``[4, 8]``, ``scale[j, n]`` covers rows ``32j .. 32j+31`` of column ``n``.
    """

    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int | None = None

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, self.signed)[1]


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bit-width must be an integer in 2..8, got {bits!r}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_finite(name: str, w: np.ndarray) -> None:
    """Raise UnsupportedModelError naming tensor ``name`` when ``w`` holds NaN or Inf.

    Two allocation-free reductions (NaN propagates through min/max) decide the common case; the
    counts are computed only for the error message.
    """
    w = np.asarray(w)
    if w.size == 0 or not np.issubdtype(w.dtype, np.floating):
        return
    if np.isfinite(w.min()) and np.isfinite(w.max()):
        return
    n_nan = int(np.count_nonzero(np.isnan(w)))
    n_inf = int(np.count_nonzero(np.isinf(w)))
    raise UnsupportedModelError(
        f"weight {name!r}: contains NaN/Inf ({n_nan} NaN, {n_inf} Inf among {w.size} values, "
        f"shape {tuple(w.shape)}); cannot quantize it"
    )


def choose_qparams(
    w: np.ndarray,
    bits: int,
    *,
    symmetric: bool,
    axis: int | None,
    method: ScaleMethod = ScaleMethod.MINMAX,
    p: float = 2.4,
    steps: int = 80,
    block_size: int | None = None,
) -> QParams:
    """Scales and zero-points for ``w`` (float32) at ``bits``.

    Per channel (or over the whole tensor when ``axis`` is None), with ``[qmin, qmax]`` from
    :func:`quant_range`:

    - asymmetric: ``rmin = min(min w, 0)``, ``rmax = max(max w, 0)``,
      ``s = (rmax - rmin) / (qmax - qmin)``, ``z = clip(rint(qmin - rmin / s), qmin, qmax)``;
      zero is exactly representable (``q(0) = z``);
    - symmetric: ``s = max|w| / qmax``, ``z = 0`` (at 2 bits the grid is ``{-2s, -s, 0, s}``).

    ``ScaleMethod.MSE`` is BRECQ's search: candidate ``i`` in ``0..steps-1`` shrinks ``rmin`` and
    ``rmax`` by ``1 - 0.01 i`` and each channel keeps the first candidate minimising
    ``mean |w - w'|^p`` (candidate 0 is min-max). An all-zero channel gets ``s = 1``; scales are
    clamped to the smallest normal float32 (never 0, NaN or subnormal, ``w / s`` never overflows)
    and ranges to half the float32 maximum (every dequantized level is finite).

    Worked example, ``w = [-1, 0.5, 2]``, 2 bits, asymmetric (``qmin, qmax = 0, 3``)::

        rmin, rmax = -1, 2      s = 3 / 3 = 1      z = rint(0 - (-1) / 1) = 1
        w         -1     0.5     2
        w/s + z    0     1.5     3
        q          0     1       3      (rint(0.5) = 0: round half to even)
        w'        -1     0       2

    Args:
        w: weights, float32 (other float dtypes are cast), any rank, finite, not empty.
        bits: width 2..8.
        symmetric: signed range with ``z = 0`` instead of unsigned with a zero-point.
        axis: channel axis (negative counts from the end; stored normalised), None for per-tensor.
        method: min-max range or the MSE search.
        p: exponent of the MSE score.
        steps: number of MSE candidates, 1..100.
        block_size: None, or block-wise along ``axis`` (each block is a "channel" above; see
            :mod:`onnx_mixquant._blocks` for the layout).

    Returns:
        QParams with float32 ``scale`` and int32 ``zero_point`` of shape ``(w.shape[axis],)``,
        ``()`` per-tensor, or the block layout.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = _normalise_axis(axis, w.ndim)
    bs = check_block_size(block_size, axis)
    ((scale, zp),) = _choose_rows(_view3(w, axis, bs), [bits], symmetric, method, p, steps)
    if bs is not None:
        assert axis is not None
        scale, zp = (params_from_rows(a, w.shape, axis, bs) for a in (scale, zp))
    elif axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return QParams(bits=int(bits), signed=symmetric, scale=scale, zero_point=zp, axis=axis, block_size=bs)


def quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    """q = clip(rint(w / s) + z, qmin, qmax) as int32; bit-exact with ONNX QuantizeLinear.

    ``w / s`` is computed in float32 and rounded half to even (``np.rint``), as the ONNX reference
    does. Clipping happens on the float quotient (to ``[qmin - z, qmax - z]``), which gives the same
    integers but cannot overflow int32.

    Args:
        w: float32 array of any rank.
        qp: parameters; per-channel ``scale``/``zero_point`` broadcast along ``qp.axis``.

    Returns:
        int32 array of ``w``'s shape, inside ``[qp.qmin, qp.qmax]``.
    """
    w = np.asarray(w, dtype=np.float32)
    s, z = broadcast_params(qp, w.ndim, w.shape)
    y = np.clip(np.rint(w / s), (qp.qmin - z).astype(np.float32), (qp.qmax - z).astype(np.float32))
    return np.asarray(y.astype(np.int32) + z)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """w' = (q - z) * s as float32; bit-exact with ONNX DequantizeLinear.

    The reference computes ``float32(q) - z`` then multiplies by the float32 scale; ``q - z`` is a
    small integer, exact in both int32 and float32, so one float32 product rounds the same way.
    """
    q = np.asarray(q)
    s, z = broadcast_params(qp, q.ndim, q.shape)
    return np.asarray((q.astype(np.int32) - z).astype(np.float32) * s)


def fake_quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    """dequantize(quantize(w))."""
    return dequantize(quantize(w, qp), qp)


def roundoff_error(w: np.ndarray, qp: QParams) -> float:
    """Mean squared roundoff error mean((w - fake_quantize(w))^2).

    Differences are float32 (bit-exact fake quantization); squares are summed in float64.
    """
    w = np.asarray(w, dtype=np.float32)
    s, z = broadcast_params(qp, w.ndim, w.shape)
    x = _view3(w, qp.axis, qp.block_size)
    if qp.block_size is not None:
        assert qp.axis is not None
        s, z = (params_to_rows(np.asarray(a), qp.axis) for a in (qp.scale, qp.zero_point))
        s, z = s.astype(np.float32), z.astype(np.int32)
    grid = _grid(s.reshape(1, -1, 1), z.reshape(1, -1, 1), qp.bits, qp.signed)
    return float(_score_rows(x, [grid], 2.0)[0].sum() / w.size)


def roundoff_errors(
    w: np.ndarray,
    bits: Sequence[int],
    *,
    symmetric: bool,
    axis: int | None,
    method: ScaleMethod = ScaleMethod.MINMAX,
    p: float = 2.4,
    steps: int = 80,
    block_size: int | None = None,
) -> np.ndarray:
    """Roundoff error of ``w`` at several widths: the MixQuant error table row of one weight.

    Equals ``[roundoff_error(w, choose_qparams(w, b, ...)) for b in bits]`` but reads ``w`` once for
    the min/max of every width and once, chunk by chunk, for the errors of every width (plus one
    search pass per width with ``ScaleMethod.MSE``).

    Args:
        w: float32 weights, any rank.
        bits: widths 2..8.
        symmetric, axis, method, p, steps, block_size: as for :func:`choose_qparams`.

    Returns:
        float64 array of shape ``(len(bits),)``: ``mean((w - w'_b)^2)`` per width.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = _normalise_axis(axis, w.ndim)
    x = _view3(w, axis, check_block_size(block_size, axis))
    params = _choose_rows(x, list(bits), symmetric, method, p, steps)
    grids = [
        _grid(s.reshape(1, -1, 1), z.reshape(1, -1, 1), b, symmetric)
        for b, (s, z) in zip(bits, params, strict=True)
    ]
    return _score_rows(x, grids, 2.0).sum(axis=1) / w.size


# --- private helpers -------------------------------------------------------------------------

_Grid = tuple[np.ndarray, np.ndarray, np.ndarray]  # scale, lo = qmin - z, hi = qmax - z; float32


def _normalise_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} out of range for a tensor of rank {ndim}")
    return int(axis) % ndim


def _view3(w: np.ndarray, axis: int | None, block_size: int | None = None) -> np.ndarray:
    """``w`` as ``(A, C, B)``, ``C = w.shape[axis]`` (1 per-tensor), a view when contiguous; or
    block-wise as ``(1, R, block_size)`` (a zero-padded copy, see :func:`._blocks.block_rows`)."""
    if w.size == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {w.shape}")
    if block_size is not None:
        assert axis is not None
        return block_rows(w, axis, block_size)
    w = np.ascontiguousarray(w)
    if axis is None:
        return w.reshape(1, 1, -1)
    return w.reshape(int(np.prod(w.shape[:axis])), w.shape[axis], -1)


def broadcast_params(qp: QParams, ndim: int, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Scale (float32) and zero point (int32) shaped to broadcast against a rank-``ndim`` array."""
    s = np.asarray(qp.scale, dtype=np.float32)
    z = np.asarray(qp.zero_point, dtype=np.int32)
    if qp.axis is None:
        return s.reshape(()), z.reshape(())
    if qp.block_size is not None:
        return broadcast_blocks(s, z, shape, qp.axis, qp.block_size)
    if not 0 <= qp.axis < ndim or s.size != shape[qp.axis] or z.size != s.size:
        raise ValueError(
            f"per-channel parameters of size {s.size} on axis {qp.axis} do not fit shape {shape}"
        )
    dims = [1] * ndim
    dims[qp.axis] = s.size
    return s.reshape(dims), z.reshape(dims)


def _chunks(shape: tuple[int, int, int]) -> Iterator[tuple[slice, slice, slice]]:
    """Cover an ``(A, C, B)`` array with contiguous blocks of about ``_CHUNK`` elements."""
    n_a, n_c, n_b = shape
    if n_b >= _CHUNK:
        for a in range(n_a):
            for c in range(n_c):
                for b in range(0, n_b, _CHUNK):
                    yield slice(a, a + 1), slice(c, c + 1), slice(b, b + _CHUNK)
    elif n_c * n_b >= _CHUNK:
        rows = _CHUNK // n_b
        for a in range(n_a):
            for c in range(0, n_c, rows):
                yield slice(a, a + 1), slice(c, c + rows), slice(None)
    else:
        rows = max(1, _CHUNK // (n_c * n_b))
        for a in range(0, n_a, rows):
            yield slice(a, a + rows), slice(None), slice(None)


def _grid(s: np.ndarray, z: np.ndarray, bits: int, signed: bool) -> _Grid:
    qmin, qmax = quant_range(bits, signed)
    return s, (qmin - z).astype(np.float32), (qmax - z).astype(np.float32)


def _range_params(
    rmin: np.ndarray, rmax: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 scale and int32 zero point of ``[rmin, rmax]`` (float64, holding 0)."""
    qmin, qmax = quant_range(bits, symmetric)
    rmin, rmax = np.maximum(rmin, -_MAX_RANGE), np.minimum(rmax, _MAX_RANGE)
    if symmetric:
        scale = np.maximum(-rmin, rmax) / qmax
    else:
        scale = (rmax - rmin) / (qmax - qmin)
    scale = np.where(scale == 0.0, 1.0, np.maximum(scale, _MIN_SCALE)).astype(np.float32)
    if symmetric:
        return scale, np.zeros(scale.shape, dtype=np.int32)
    zp = np.clip(np.rint(qmin - rmin / scale.astype(np.float64)), qmin, qmax)
    return scale, zp.astype(np.int32)


def _choose_rows(
    x: np.ndarray,
    bits: list[int],
    symmetric: bool,
    method: ScaleMethod,
    p: float,
    steps: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point), each ``(C,)``, for each width in ``bits`` of the ``(A, C, B)`` view."""
    rmin = np.minimum(x.min(axis=(0, 2)).astype(np.float64), 0.0)
    rmax = np.maximum(x.max(axis=(0, 2)).astype(np.float64), 0.0)
    if method is ScaleMethod.MINMAX:
        return [_range_params(rmin, rmax, b, symmetric) for b in bits]
    if method is not ScaleMethod.MSE:
        raise ValueError(f"unknown scale method {method!r}")
    if not (np.isfinite(p) and p > 0) or not 1 <= steps <= 100:
        raise ValueError(f"MSE search needs p > 0 and steps in 1..100, got p={p!r}, steps={steps!r}")
    return [_search_mse(x, rmin, rmax, b, symmetric, p, steps) for b in bits]


def _search_mse(
    x: np.ndarray,
    rmin: np.ndarray,
    rmax: np.ndarray,
    bits: int,
    symmetric: bool,
    p: float,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """BRECQ's range search on the ``(A, C, B)`` view: per channel, the first best candidate.

    Candidate ``i`` shrinks ``[rmin, rmax]`` (each ``(C,)``) by ``1 - 0.01 i``; its score is
    ``sum |w - w'|^p`` over the channel (the mean up to a constant). All candidates are scored in
    one pass over ``w``; the parameters take ``O(steps * C)`` memory, never ``O(steps * w.size)``.
    """
    shrink = 1.0 - 0.01 * np.arange(steps, dtype=np.float64)[:, None]  # (steps, 1); row 0 is 1.0
    scale, zp = _range_params(rmin * shrink, rmax * shrink, bits, symmetric)  # (steps, C) each
    s, lo, hi = _grid(scale[:, None, :, None], zp[:, None, :, None], bits, symmetric)
    scores = _score_rows(x, list(zip(s, lo, hi, strict=True)), p)  # (steps, C)
    best = scores.argmin(axis=0)  # argmin keeps the first of equal scores, as BRECQ's strict "<"
    chans = np.arange(x.shape[1])
    return scale[best, chans], zp[best, chans]


def _score_rows(x: np.ndarray, grids: list[_Grid], p: float) -> np.ndarray:
    """Per-channel sums of ``|x - fake_quant(x)|^p`` for several grids: the one hot kernel.

    Args:
        x: ``(A, C, B)`` float32 weights.
        grids: ``G`` grids, each (scale, qmin - z, qmax - z) float32 of shape ``(1, C, 1)``.
        p: exponent (2 squares).

    Returns:
        ``(G, C)`` float64 sums over the ``A`` and ``B`` axes.

    Chunks are the outer loop so every grid reads a chunk while it is still in cache. Per chunk and
    grid, in one reused float32 buffer ``t``:

        t = clip(rint(x / s), qmin - z, qmax - z)   # = q - z exactly (small integers)
        t = x - t * s                               # w - w', bit-exact with dequantize(quantize)
        sum |t|^p over A and B, accumulated in float64
    """
    out = np.zeros((len(grids), x.shape[1]), dtype=np.float64)
    buf = np.empty(min(x.size, _CHUNK), dtype=np.float32)
    p32 = np.float32(p)
    for sa, sc, sb in _chunks(x.shape):
        xc = x[sa, sc, sb]
        t = buf[: xc.size].reshape(xc.shape)
        for g, (s, lo, hi) in enumerate(grids):
            s, lo, hi = s[:, sc], lo[:, sc], hi[:, sc]
            np.divide(xc, s, out=t)
            np.rint(t, out=t)
            np.maximum(t, lo, out=t)
            np.minimum(t, hi, out=t)
            np.multiply(t, s, out=t)
            np.subtract(xc, t, out=t)
            if p == 2.0:
                np.square(t, out=t)
            else:
                np.abs(t, out=t)
                np.power(t, p32, out=t)
            out[g, sc] += t.sum(axis=(0, 2), dtype=np.float64)
    return out
