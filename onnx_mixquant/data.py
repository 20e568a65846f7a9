"""Sample and calibration inputs: files -> batches of feeds checked against the model's inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onnx_mixquant.graph import ModelInput
from onnx_mixquant.validate import Samples

__all__ = ["load_samples"]


def load_samples(path: str | Path, inputs: Sequence[ModelInput], *, batch_size: int = 32, limit: int | None = None) -> Samples:
    """Read ``path``: a .npz with one array per model input name (batch on axis 0) and an optional
    ``labels`` array, or a .npy for a single-input model. Every array is checked against the model
    input (name, dtype, rank, static dims) and a mismatch raises CalibrationError naming the file,
    the input and the mismatch. ``limit`` caps the number of samples; feeds are split in batches."""
    raise NotImplementedError
