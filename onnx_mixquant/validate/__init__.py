"""Validate stage: the FP32 and the quantized model side by side in onnxruntime.

Takes both model files and :class:`Samples` (from the data stage); gives per-output metrics per
run (:mod:`.compare`), which quantized nodes onnxruntime fused into integer kernels
(:mod:`._fusion`), and whether the calibration data made the model worse (:mod:`._datacheck`).
"""

from onnx_mixquant.validate._datacheck import check_bias, data_cost_note
from onnx_mixquant.validate._fusion import FusionResult, check_fusion
from onnx_mixquant.validate.compare import (
    OutputMetrics,
    RunMetrics,
    Samples,
    ValidationResult,
    available_providers,
    check_loads,
    validate,
)

__all__ = [
    "FusionResult",
    "OutputMetrics",
    "RunMetrics",
    "Samples",
    "ValidationResult",
    "available_providers",
    "check_bias",
    "check_fusion",
    "check_loads",
    "data_cost_note",
    "validate",
]
