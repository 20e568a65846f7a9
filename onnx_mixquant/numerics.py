"""Uniform affine quantization in NumPy: choose scales, quantize, dequantize, roundoff error.

NumPy only: this module imports no onnx, onnx_ir or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_mixquant.config import ScaleMethod

__all__ = [
    "QParams",
    "check_finite",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "quant_range",
    "quantize",
    "roundoff_error",
]


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    Attributes:
        bits: width 2..8.
        signed: True for symmetric (signed range, zero_point 0), False for asymmetric (unsigned).
        scale: float32, shape ``(C,)`` per-channel (``C = w.shape[axis]``) or ``()`` per-tensor; > 0.
        zero_point: int32, same shape as ``scale``, inside ``quant_range(bits, signed)``.
        axis: channel axis (non-negative) or None for per-tensor.
    """

    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, self.signed)[1]


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    raise NotImplementedError


def check_finite(name: str, w: np.ndarray) -> None:
    """Raise UnsupportedModelError naming tensor ``name`` when ``w`` holds NaN or Inf."""
    raise NotImplementedError


def choose_qparams(
    w: np.ndarray,
    bits: int,
    *,
    symmetric: bool,
    axis: int | None,
    method: ScaleMethod = ScaleMethod.MINMAX,
    p: float = 2.4,
    steps: int = 80,
) -> QParams:
    """Scales and zero-points for ``w`` (float32) at ``bits``."""
    raise NotImplementedError


def quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    """q = clip(rint(w / s) + z, qmin, qmax) as int32; bit-exact with ONNX QuantizeLinear."""
    raise NotImplementedError


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """w' = (q - z) * s as float32; bit-exact with ONNX DequantizeLinear."""
    raise NotImplementedError


def fake_quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    """dequantize(quantize(w))."""
    raise NotImplementedError


def roundoff_error(w: np.ndarray, qp: QParams) -> float:
    """Mean squared roundoff error mean((w - fake_quantize(w))^2)."""
    raise NotImplementedError
