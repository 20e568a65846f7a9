"""Layout of block-wise quantization parameters (ONNX DequantizeLinear with ``block_size``).

NumPy only. A weight quantized in blocks of ``bs`` consecutive elements along ``axis`` (the
reduction axis ``K``) has one scale and one zero point per block and per position on the other
axes: the parameter tensor has the weight's rank and shape, except ``ceil(K / bs)`` on ``axis``.
The last block may be partial (``K`` not a multiple of ``bs``), as ONNX allows.

Worked example, a MatMul weight ``B`` of shape ``[K, N] = [5, 2]``, ``axis = 0``, ``bs = 2``::

    B rows k = 0 1 | 2 3 | 4        three blocks along K (the last one partial)
    scale shape [ceil(5 / 2), 2] = [3, 2]; scale[j, n] covers B[2j : 2j + 2, n]

For a Gemm weight with ``transB = 1`` (shape ``[N, K]``) the blocks run along ``axis = 1`` and the
scale has shape ``[N, ceil(K / bs)]``.

The kernels of :mod:`onnx_mixquant.numerics` see a block-wise weight as the ``(1, R, bs)`` view of
:func:`block_rows`: one row per (block, other position), zero-padded to whole blocks. Padding zeros
change neither the min/max range (it always holds 0) nor any error sum (0 is on every grid).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "block_count",
    "block_rows",
    "broadcast_blocks",
    "check_block_size",
    "expand_params",
    "params_from_rows",
    "params_to_rows",
]


def block_count(k: int, block_size: int) -> int:
    """Blocks covering ``k`` elements: ``ceil(k / block_size)``."""
    return -(-int(k) // int(block_size))


def block_rows(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``w`` as a ``(1, R, block_size)`` float32 array, one row per block; zero-padded.

    Rows are ordered as the parameter tensor with ``axis`` moved last, flattened (C order): see
    :func:`params_from_rows`.
    """
    x = np.moveaxis(np.asarray(w, dtype=np.float32), axis, -1)
    k = x.shape[-1]
    pad = block_count(k, block_size) * block_size - k
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), dtype=np.float32)], axis=-1)
    return np.ascontiguousarray(x).reshape(1, -1, block_size)


def params_from_rows(p: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Per-row values ``(R,)`` -> the parameter tensor (``shape`` with ``ceil(K/bs)`` on ``axis``)."""
    lead = [d for i, d in enumerate(shape) if i != axis]
    blocks = p.reshape(*lead, block_count(shape[axis], block_size))
    return np.ascontiguousarray(np.moveaxis(blocks, -1, axis))


def params_to_rows(p: np.ndarray, axis: int) -> np.ndarray:
    """The parameter tensor -> per-row values ``(R,)``; inverse of :func:`params_from_rows`."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(p), axis, -1)).reshape(-1)


def expand_params(p: np.ndarray, axis: int, block_size: int, k: int) -> np.ndarray:
    """Repeat each block's value ``block_size`` times along ``axis`` and cut to length ``k``:
    the parameter broadcast to the weight's shape (as ONNX's reference DequantizeLinear does)."""
    return np.take(np.repeat(p, block_size, axis=axis), np.arange(k), axis=axis)


def check_block_size(block_size: int | None, axis: int | None) -> int | None:
    """``block_size`` as an int (None stays None); ValueError unless positive with an axis."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if axis is None:
        raise ValueError("block-wise quantization needs an axis (the blocked axis)")
    return int(block_size)


def broadcast_blocks(
    s: np.ndarray, z: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point in the block layout, checked against ``shape`` and expanded to it."""
    want = list(shape)
    if 0 <= axis < len(shape):
        want[axis] = block_count(shape[axis], block_size)
    if not 0 <= axis < len(shape) or list(s.shape) != want or z.shape != s.shape:
        raise ValueError(
            f"block parameters of shape {s.shape} (axis {axis}, block {block_size}) do not fit shape {shape}"
        )
    k = shape[axis]
    return expand_params(s, axis, block_size, k), expand_params(z, axis, block_size, k)
