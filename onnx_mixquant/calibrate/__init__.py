"""Calibrate stage: activation ranges from calibration data, and the activation Q/DQ they set.

Takes a model and batches of feeds from the data stage; gives per-tensor ranges from onnxruntime
runs under a memory budget (:mod:`.ranges`, planned by :mod:`._calibplan`, histograms in
:mod:`._histogram`) and a per-layer activation stream for the rounding methods (GPTQ).
:mod:`.activations` places the activation Q/DQ (which tensors, onnxruntime's fusion rules) and
inserts it with those ranges.
"""

from onnx_mixquant.calibrate.activations import (
    ActivationPlan,
    ActivationSite,
    activation_qparams,
    has_attention,
    insert_activation_qdq,
    plan_activations,
    quantize_gemm_biases,
)
from onnx_mixquant.calibrate.ranges import (
    MEMORY_BUDGET,
    CalibrationResult,
    TensorRange,
    activation_stream,
    batch_samples,
    collect_ranges,
    probe_session,
)

__all__ = [
    "MEMORY_BUDGET",
    "ActivationPlan",
    "ActivationSite",
    "CalibrationResult",
    "TensorRange",
    "activation_qparams",
    "activation_stream",
    "batch_samples",
    "collect_ranges",
    "has_attention",
    "insert_activation_qdq",
    "plan_activations",
    "probe_session",
    "quantize_gemm_biases",
]
