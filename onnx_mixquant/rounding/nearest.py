"""Nearest rounding with the base quantizer's scales (the "vanilla asymmetric" method), the grid
every rounding method starts from, and the integer-weight type all of them produce.

NumPy only: this module imports no onnx, onnx_ir or onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from onnx_mixquant.config import Granularity, QuantizerConfig
from onnx_mixquant.numerics import QParams, choose_qparams, quantize

if TYPE_CHECKING:
    from onnx_mixquant.read import WeightSite

__all__ = ["QuantizedWeight", "block_axes", "grid_of", "round_nearest"]

#: Op types whose 2-D weights may be quantized block-wise (along their reduction axis).
BLOCK_OPS = frozenset({"MatMul", "Gemm"})


def block_axes(sites: Iterable[WeightSite]) -> dict[str, int]:
    """Weight name -> reduction axis K for every weight that may be block-wise: 2-D, read only as
    the weight of MatMul / Gemm nodes that agree on its channel axis. K is the axis other than the
    per-channel one (MatMul B ``[K, N]``: 0; Gemm B with transB=1, ``[N, K]``: 1)."""
    return {
        s.name: 1 - s.axis
        for s in sites
        if len(s.shape) == 2 and s.axis in (0, 1) and s.op_types and set(s.op_types) <= BLOCK_OPS
    }


def grid_of(
    name: str,
    bits: int,
    axes: Mapping[str, int | None],
    blocks: Mapping[str, int] | None,
    quantizer: QuantizerConfig,
) -> tuple[int | None, int | None]:
    """(axis, block_size) weight ``name`` is quantized with at width ``bits``: block-wise along its
    reduction axis when it is in ``blocks`` and ``quantizer.block_at(bits)`` says so, else its
    per-channel axis (None per-tensor) and no block. The error table and the rounding stage
    both use this, so the plan and the file agree."""
    bs = quantizer.block_at(bits) if blocks is not None and name in blocks else None
    if bs is not None:
        assert blocks is not None
        return blocks[name], bs
    return (axes.get(name) if quantizer.granularity is Granularity.PER_CHANNEL else None), None


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer values of one weight and how to dequantize them.

    Attributes:
        name: weight-site name.
        q: int8 (signed) or uint8 (unsigned) array, same shape as the float weight, inside
            ``qparams``' integer range (at most 8 bits, so one byte per value in memory).
        qparams: scale / zero-point / axis / bits / signedness.
    """

    name: str
    q: np.ndarray
    qparams: QParams


def round_nearest(
    weights: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
    bits: Mapping[str, int | None],
    quantizer: QuantizerConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    blocks: Mapping[str, int] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every weight whose width is not None by round-to-nearest-even.

    Args:
        weights: name -> float32 array.
        axes: name -> per-channel axis (None: per tensor).
        bits: name -> width, or None to keep the weight in float (it is left out of the result).
        quantizer: symmetry, granularity and scale rule (the same the error table used).
        progress: called as progress(done, total).
        blocks: name -> reduction axis of the weights that may be block-wise (``block_axes``);
            None: none is.
    """
    out: dict[str, QuantizedWeight] = {}
    todo = [n for n in weights if bits.get(n) is not None]
    for i, name in enumerate(todo):
        b = bits[name]
        assert b is not None
        axis, bs = grid_of(name, b, axes, blocks, quantizer)
        qp = choose_qparams(
            weights[name],
            b,
            symmetric=quantizer.symmetric_at(b),
            axis=axis,
            method=quantizer.scale_method,
            p=quantizer.mse_p,
            steps=quantizer.mse_steps,
            block_size=bs,
        )
        q = quantize(weights[name], qp).astype(np.int8 if qp.signed else np.uint8)
        out[name] = QuantizedWeight(name=name, q=q, qparams=qp)
        if progress is not None:
            progress(i + 1, len(todo))
    return out
