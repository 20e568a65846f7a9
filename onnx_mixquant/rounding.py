"""Rounding stage: the integer weights for a bit plan. Nearest rounding with the base quantizer's
scales (the "vanilla asymmetric" method); BRECQ's learned rounding will produce the same type.

NumPy only: this module imports no onnx, onnx_ir or onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnx_mixquant.config import Granularity, QuantizerConfig
from onnx_mixquant.numerics import QParams, choose_qparams, quantize

__all__ = ["QuantizedWeight", "round_nearest"]


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
) -> dict[str, QuantizedWeight]:
    """Quantize every weight whose width is not None by round-to-nearest-even.

    Args:
        weights: name -> float32 array.
        axes: name -> per-channel axis (None: per tensor).
        bits: name -> width, or None to keep the weight in float (it is left out of the result).
        quantizer: symmetry, granularity and scale rule (the same the error table used).
        progress: called as progress(done, total).
    """
    out: dict[str, QuantizedWeight] = {}
    todo = [n for n in weights if bits.get(n) is not None]
    for i, name in enumerate(todo):
        b = bits[name]
        assert b is not None
        axis = axes.get(name) if quantizer.granularity is Granularity.PER_CHANNEL else None
        qp = choose_qparams(
            weights[name],
            b,
            symmetric=quantizer.symmetric_at(b),
            axis=axis,
            method=quantizer.scale_method,
            p=quantizer.mse_p,
            steps=quantizer.mse_steps,
        )
        q = quantize(weights[name], qp).astype(np.int8 if qp.signed else np.uint8)
        out[name] = QuantizedWeight(name=name, q=q, qparams=qp)
        if progress is not None:
            progress(i + 1, len(todo))
    return out
