"""Rounding stage: integer weights for a bit plan (see :mod:`.stage` for the contract and the
method registry; :mod:`.nearest` for the grid every method starts from).

Takes the weights, the search stage's bit plan and, with calibration data, the data stage's
batches; gives a :class:`QuantizedWeight` per weight site for the export stage. BRECQ
(:mod:`.brecq`) learns the rounding unit by unit (:mod:`.reconstruct`); the bias correction
(:mod:`.biascorrect`, planned by :mod:`._biasplan`, measured segment by segment by
:mod:`._segments`) gives each quantized layer's output back its FP mean.
"""

from onnx_mixquant.rounding.biascorrect import (
    BiasPlan,
    BiasReport,
    BiasTarget,
    correct_biases,
    first_samples,
    plan_correction,
    reference_means,
)
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
    "BiasPlan",
    "BiasReport",
    "BiasTarget",
    "QuantizedWeight",
    "RoundingData",
    "RoundingFn",
    "RoundingJob",
    "RoundingPlan",
    "RoundingResult",
    "block_axes",
    "correct_biases",
    "first_samples",
    "grid_of",
    "plan_correction",
    "reference_means",
    "round_nearest",
    "round_weights",
]
