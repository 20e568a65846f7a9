"""Rounding stage: integer weights for a bit plan (see :mod:`.stage` for the contract and the
method registry; :mod:`.nearest` for the grid every method starts from)."""

from onnx_mixquant.rounding.nearest import BLOCK_OPS, QuantizedWeight, block_axes, grid_of, round_nearest
from onnx_mixquant.rounding.stage import (
    METHODS,
    ActivationHook,
    ActivationStream,
    RoundingData,
    RoundingFn,
    RoundingJob,
    RoundingPlan,
    RoundingResult,
    round_weights,
)

__all__ = [
    "BLOCK_OPS",
    "METHODS",
    "ActivationHook",
    "ActivationStream",
    "QuantizedWeight",
    "RoundingData",
    "RoundingFn",
    "RoundingJob",
    "RoundingPlan",
    "RoundingResult",
    "block_axes",
    "grid_of",
    "round_nearest",
    "round_weights",
]
