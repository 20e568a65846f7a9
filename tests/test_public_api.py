"""The public API is exactly what __all__ says; changing it must be deliberate."""

from __future__ import annotations

import onnx_mixquant

EXPECTED = {
    "ActivationConfig",
    "ActivationReport",
    "BiasConfig",
    "BiasCorrection",
    "ReconConfig",
    "ReconGranularity",
    "RoundingMethod",
    "CalibMethod",
    "Device",
    "ImageLayout",
    "ImageSpec",
    "IterSplit",
    "save_preprocess_model",
    "CalibrationError",
    "ConfigError",
    "ExportConfig",
    "ExportError",
    "Granularity",
    "Objective",
    "MixQuantError",
    "ModelLoadError",
    "QemReference",
    "QuantConfig",
    "QuantizerConfig",
    "Report",
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
}


def test_all_is_pinned() -> None:
    assert set(onnx_mixquant.__all__) == EXPECTED
    for name in onnx_mixquant.__all__:
        assert hasattr(onnx_mixquant, name), name


def test_errors_share_a_base() -> None:
    for name in ("CalibrationError", "ConfigError", "ExportError", "ModelLoadError", "UnsupportedModelError"):
        assert issubclass(getattr(onnx_mixquant, name), onnx_mixquant.MixQuantError)
