"""Image preprocessing as an ONNX graph run by onnxruntime (custom ops from onnxruntime-extensions).

decode (jpg/png/...) -> RGB or BGR -> resize short side -> centre crop -> x * scale -> (x - mean) / std
-> NCHW or NHWC float32. The same graph can be saved for deployment (``save_preprocess_model``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_mixquant.config import ImageSpec

__all__ = ["IMAGE_SUFFIXES", "ImagePreprocessor", "build_preprocess_model", "save_preprocess_model"]

#: File suffixes (lower case) treated as images in a calibration folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")


def build_preprocess_model(spec: ImageSpec) -> ir.Model:
    """The preprocessing graph: input ``image`` (uint8[num_bytes], an encoded file), output
    ``pixels`` float32 of shape (1, C, H, W) for NCHW or (1, H, W, C) for NHWC."""
    raise NotImplementedError


def save_preprocess_model(spec: ImageSpec, path: str | Path) -> None:
    """Write the preprocessing graph to ``path`` (atomically)."""
    raise NotImplementedError


class ImagePreprocessor:
    """Runs the preprocessing graph in onnxruntime, one image file at a time."""

    def __init__(self, spec: ImageSpec) -> None:
        raise NotImplementedError

    def __call__(self, path: Path) -> np.ndarray:
        """One image file -> float32 array (C, H, W) or (H, W, C), no batch axis.

        Raises:
            CalibrationError: the file cannot be read or decoded (the message names it).
        """
        raise NotImplementedError
