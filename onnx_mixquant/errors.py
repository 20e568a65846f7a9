"""Exceptions raised by onnx_mixquant.

Every error a user can cause is a :class:`MixQuantError`; the CLI turns it into a one-line message
and exit code 1. Bugs are left as ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConfigError",
    "ExportError",
    "MixQuantError",
    "ModelLoadError",
    "UnsupportedModelError",
]


class MixQuantError(Exception):
    """Base class of every error caused by the user's model, data or options."""


class ConfigError(MixQuantError):
    """An option value is invalid (bad bit-width, unknown pattern, conflicting options)."""


class ModelLoadError(MixQuantError):
    """The input model cannot be read: missing, a directory, not ONNX, truncated."""


class UnsupportedModelError(MixQuantError):
    """The model is valid ONNX but cannot be quantized (opset, NaN weights, nothing to quantize)."""


class CalibrationError(MixQuantError):
    """Sample or calibration data do not match the model or cannot be read."""


class ExportError(MixQuantError):
    """The quantized model cannot be written (opset conversion failed, unwritable folder)."""
