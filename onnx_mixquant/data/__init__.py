"""Data stage: calibration and validation inputs -> batches of feeds checked against the model inputs.

Takes a source (folders of .npy/.npz files, one .npz, ONNX test data sets, image folders,
CalibrationDataReaders, iterables of input dicts) and the model's inputs from the read stage;
gives a :class:`CalibrationData` stream (with a seeded held-out subset) for calibration, bias
correction and BRECQ, and validation :class:`~onnx_mixquant.validate.Samples` with their labels
(:mod:`.sources`; readers in :mod:`._sources`, checks in :mod:`._checks`). Images go through the
ONNX preprocessing graph of :mod:`.preprocess`; without data, :mod:`.synthetic` draws inputs.
"""

from onnx_mixquant.data._sources import describe
from onnx_mixquant.data.preprocess import (
    IMAGE_SUFFIXES,
    ImagePreprocessor,
    build_preprocess_model,
    save_preprocess_model,
)
from onnx_mixquant.data.sources import CalibrationData, load_samples, open_calibration
from onnx_mixquant.data.synthetic import synthetic_samples

__all__ = [
    "IMAGE_SUFFIXES",
    "CalibrationData",
    "ImagePreprocessor",
    "build_preprocess_model",
    "describe",
    "load_samples",
    "open_calibration",
    "save_preprocess_model",
    "synthetic_samples",
]
