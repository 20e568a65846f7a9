"""onnx-mixquant: mixed-precision post-training quantization of ONNX models.

The public API: :func:`quantize` runs the whole pipeline on a model file; the config dataclasses
set every option; errors derive from :class:`MixQuantError`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnx_mixquant._runtime import MISSING_ONNXRUNTIME, onnxruntime_missing

if onnxruntime_missing():
    raise ImportError(MISSING_ONNXRUNTIME)

from onnx_mixquant.config import (
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    CalibMethod,
    Device,
    ExportConfig,
    Granularity,
    ImageLayout,
    ImageSpec,
    IterSplit,
    Objective,
    QemReference,
    QuantConfig,
    QuantizerConfig,
    ReconConfig,
    ReconGranularity,
    RoundingMethod,
    ScaleMethod,
    SearchConfig,
    SearchRule,
    Symmetry,
    ValidateConfig,
    WeightOverride,
)
from onnx_mixquant.data import save_preprocess_model
from onnx_mixquant.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    MixQuantError,
    ModelLoadError,
    UnsupportedModelError,
)
from onnx_mixquant.pipeline import quantize
from onnx_mixquant.report import ActivationReport, Report, WeightReport

__all__ = [
    "ActivationConfig",
    "BiasConfig",
    "BiasCorrection",
    "CalibMethod",
    "CalibrationError",
    "ConfigError",
    "Device",
    "ExportConfig",
    "ExportError",
    "Granularity",
    "Objective",
    "ImageLayout",
    "ImageSpec",
    "IterSplit",
    "MixQuantError",
    "ModelLoadError",
    "QemReference",
    "QuantConfig",
    "QuantizerConfig",
    "ReconConfig",
    "ReconGranularity",
    "Report",
    "RoundingMethod",
    "ActivationReport",
    "ScaleMethod",
    "SearchConfig",
    "SearchRule",
    "Symmetry",
    "UnsupportedModelError",
    "ValidateConfig",
    "WeightOverride",
    "WeightReport",
    "__version__",
    "quantize",
    "save_preprocess_model",
]
