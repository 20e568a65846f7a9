"""One .npz/.npy file of validation samples read whole (:func:`onnx_mixquant.data.sources.load_samples`),
and the rule for models that fix their batch dimension, shared with ``sources.py``.

A ``.npz`` holds one array per model input (key = input name, samples on axis 0) and optionally
``labels`` (integer class ids, one per sample); a ``.npy`` holds the one input of a single-input
model. Arrays are never cast: a float64 file for a float32 input is an error, not a conversion.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnx_mixquant.data import _sources
from onnx_mixquant.errors import CalibrationError
from onnx_mixquant.read import ModelInput
from onnx_mixquant.validate import Samples

__all__ = ["fixed_batch", "fixed_size", "load_file"]

logger = logging.getLogger(__name__)

LABELS_KEY = _sources.LABELS_KEY


def load_file(path: Path, inputs: Sequence[ModelInput], batch_size: int, limit: int | None) -> Samples:
    """One .npz/.npy file read whole: every array checked against its input, labels as int64."""
    arrays, labels = _read(path, inputs)
    count = _check_arrays(path, inputs, arrays)
    labels = _check_labels(path, labels, count)
    keep = count if limit is None else min(count, limit)
    fixed = fixed_batch(path, inputs, keep)
    if fixed is not None:
        batch_size = fixed
    feeds = tuple(
        {name: a[start : min(start + batch_size, keep)] for name, a in arrays.items()}
        for start in range(0, keep, batch_size)
    )
    logger.debug("%s: %d of %d samples in %d batches", path, keep, count, len(feeds))
    return Samples(feeds=feeds, labels=None if labels is None else labels[:keep], source=str(path))


def _read(path: Path, inputs: Sequence[ModelInput]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays by input name and the labels (or None); checks the keys, nothing else."""
    if not path.exists():
        raise CalibrationError(f"sample file {str(path)!r} not found")
    if path.is_dir():
        raise CalibrationError(f"sample file {str(path)!r} is a directory; expected a .npz or .npy file")
    try:
        # Open the file here: np.load(path) leaks its handle when a truncated zip fails to open.
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                return _single_input(path, inputs, loaded), None
            with loaded:
                return _from_npz(path, inputs, loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CalibrationError(f"cannot read sample file {str(path)!r}: {e}") from e


def _from_npz(
    path: Path, inputs: Sequence[ModelInput], data: np.lib.npyio.NpzFile
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    _sources.check_keys(str(path), inputs, data.files)
    expected = [inp.name for inp in inputs]
    arrays = {name: data[name] for name in expected}
    has_labels = LABELS_KEY in data.files and LABELS_KEY not in expected  # an input may be "labels"
    labels = data[LABELS_KEY] if has_labels else None
    return arrays, labels


def _single_input(path: Path, inputs: Sequence[ModelInput], array: np.ndarray) -> dict[str, np.ndarray]:
    """A .npy file's one array, for a single-input model."""
    return {_sources.npy_key(path, inputs): array}


def _check_arrays(path: Path, inputs: Sequence[ModelInput], arrays: dict[str, np.ndarray]) -> int:
    """Check every array against its input; returns the common sample count (axis 0)."""
    checker = _sources.Checker(inputs, allow_single=False)
    return checker.check(str(path), {name: (a.dtype, a.shape) for name, a in arrays.items()})


def _check_labels(path: Path, labels: np.ndarray | None, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    if labels.dtype.kind not in "iu":
        raise CalibrationError(
            f"{path}: {LABELS_KEY!r} must hold integer class ids, got dtype {labels.dtype.name}"
        )
    if labels.ndim != 1:
        raise CalibrationError(
            f"{path}: {LABELS_KEY!r} must be 1-D, one class id per sample; got {labels.shape}"
        )
    if labels.shape[0] != count:
        raise CalibrationError(f"{path}: {labels.shape[0]} labels for {count} samples")
    return labels.astype(np.int64)


def fixed_size(where: str, inputs: Sequence[ModelInput]) -> int | None:
    """The batch size the model fixes on axis 0 (None: not fixed); every input must agree."""
    fixed = {inp.name: inp.dims[0] for inp in inputs if isinstance(inp.dims[0], int) and inp.dims[0] >= 0}
    if not fixed:
        return None
    sizes = set(fixed.values())
    if len(sizes) > 1:
        raise CalibrationError(f"{where}: model inputs fix different batch sizes on axis 0: {fixed}")
    return sizes.pop()


def fixed_batch(where: str | Path, inputs: Sequence[ModelInput], count: int) -> int | None:
    """The batch size the model fixes on axis 0, or None; ``count`` must be a multiple of it."""
    size = fixed_size(str(where), inputs)
    if size is None:
        return None
    if size == 0 or count % size:
        names = [inp.name for inp in inputs if inp.dims[0] == size]
        raise CalibrationError(
            f"{where}: the model fixes axis 0 to {size} (inputs {', '.join(map(repr, names))}), "
            f"but {count} samples (after any limit) are not a multiple of it"
        )
    return size
