"""Sample and calibration inputs: files -> batches of feeds checked against the model's inputs.

A ``.npz`` holds one array per model input (key = input name, samples on axis 0) and optionally
``labels`` (integer class ids, one per sample); a ``.npy`` holds the one input of a single-input
model. Arrays are never cast: a float64 file for a float32 input is an error, not a conversion.

When the model fixes its batch dimension (axis 0 is a number B, as in most exported CNNs with
B = 1), the samples used must be a multiple of B and the feeds are batches of exactly B.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.graph import ModelInput
from onnx_mixquant.validate import Samples

__all__ = ["load_samples"]

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
#: Dim values that mean "unknown, unnamed" in ModelInput.dims: they match anything.
_UNNAMED = ("", "?")


def load_samples(
    path: str | Path,
    inputs: Sequence[ModelInput],
    *,
    batch_size: int = 32,
    limit: int | None = None,
) -> Samples:
    """Read ``path``: a .npz with one array per model input name (batch on axis 0) and an optional
    ``labels`` array, or a .npy for a single-input model. Every array is checked against the model
    input (name, dtype, rank, static dims) and a mismatch raises CalibrationError naming the file,
    the input and the mismatch. ``limit`` caps the number of samples; feeds are split in batches.

    Args:
        path: the .npz or .npy file (the format is read from the file's content).
        inputs: the model's graph inputs.
        batch_size: samples per feed; ignored when the model fixes axis 0 (then that size is used).
        limit: keep only the first ``limit`` samples.

    Returns:
        Samples whose ``source`` is ``str(path)``; labels as int64, or None.

    Raises:
        ConfigError: ``batch_size`` or ``limit`` below 1.
        CalibrationError: unreadable file, unexpected or missing key, wrong dtype / rank / dim,
            inconsistent sample counts or label count.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"sample limit must be >= 1, got {limit!r}")
    path = Path(path)
    arrays, labels = _read(path, inputs)
    count = _check_arrays(path, inputs, arrays)
    labels = _check_labels(path, labels, count)
    keep = count if limit is None else min(count, limit)
    fixed = _fixed_batch(path, inputs, keep)
    if fixed is not None:
        batch_size = fixed
    feeds = tuple(
        {name: a[start : min(start + batch_size, keep)] for name, a in arrays.items()}
        for start in range(0, keep, batch_size)
    )
    logger.debug("%s: %d of %d samples in %d batches", path, keep, count, len(feeds))
    return Samples(feeds=feeds, labels=None if labels is None else labels[:keep], source=str(path))


def _read(
    path: Path, inputs: Sequence[ModelInput]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays by input name and the labels (or None); checks the keys, nothing else."""
    if not path.exists():
        raise CalibrationError(f"sample file {str(path)!r} not found")
    if path.is_dir():
        raise CalibrationError(
            f"sample file {str(path)!r} is a directory; expected a .npz or .npy file"
        )
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
    expected = [inp.name for inp in inputs]
    listing = ", ".join(repr(n) for n in expected)
    for key in data.files:
        if key not in expected and key != LABELS_KEY:
            raise CalibrationError(
                f"{path}: unexpected key {key!r}; expected the model input names ({listing}) "
                f"and optionally {LABELS_KEY!r}"
            )
    missing = [n for n in expected if n not in data.files]
    if missing:
        raise CalibrationError(
            f"{path}: no array for model input(s) {', '.join(map(repr, missing))}; has {data.files}"
        )
    arrays = {name: data[name] for name in expected}
    has_labels = LABELS_KEY in data.files and LABELS_KEY not in expected  # an input may be "labels"
    labels = data[LABELS_KEY] if has_labels else None
    return arrays, labels


def _single_input(
    path: Path, inputs: Sequence[ModelInput], array: np.ndarray
) -> dict[str, np.ndarray]:
    """A .npy file's one array, for a single-input model."""
    if len(inputs) != 1:
        names = ", ".join(repr(inp.name) for inp in inputs)
        raise CalibrationError(
            f"{path}: a .npy file holds one array, but the model has {len(inputs)} inputs "
            f"({names}); use a .npz with one array per input name"
        )
    return {inputs[0].name: array}


def _is_unnamed(dim: object) -> bool:
    return (
        dim is None
        or (isinstance(dim, str) and dim in _UNNAMED)
        or (isinstance(dim, int) and dim < 0)
    )


def _check_one(
    path: Path, inp: ModelInput, a: np.ndarray, named: dict[str, tuple[str, int]]
) -> None:
    """Check dtype, rank and dims of one array; note symbolic dims in ``named`` (name -> who, n)."""
    where = f"{path}: input {inp.name!r}"
    if inp.dtype in _UNNAMED:
        logger.debug(
            "%s: model gives no element type; taking %s from the file", where, a.dtype.name
        )
    elif a.dtype.name != inp.dtype:
        raise CalibrationError(
            f"{where}: expected dtype {inp.dtype}, got {a.dtype.name} (arrays are not cast)"
        )
    if not inp.dims:
        raise CalibrationError(
            f"{where}: scalar model inputs cannot be split into samples along axis 0"
        )
    if a.ndim != len(inp.dims):
        raise CalibrationError(
            f"{where}: expected rank {len(inp.dims)} (dims {list(inp.dims)}), got shape {a.shape}"
        )
    for pos, (d, n) in enumerate(zip(inp.dims, a.shape, strict=True)):
        if pos == 0 or _is_unnamed(d):
            continue  # axis 0 holds the samples: checked across inputs and by _fixed_batch
        if isinstance(d, int):
            if d != n:
                raise CalibrationError(f"{where}: dim {pos} must be {d}, got {n} (shape {a.shape})")
            continue
        seen = named.setdefault(str(d), (f"input {inp.name!r} dim {pos}", n))
        if seen[1] != n:
            raise CalibrationError(
                f"{where}: dim {pos} ({d!r}) is {n}, but {seen[0]} ({d!r}) is {seen[1]}; "
                "inputs sharing a dim name must agree"
            )


def _check_arrays(path: Path, inputs: Sequence[ModelInput], arrays: dict[str, np.ndarray]) -> int:
    """Check every array against its input; returns the common sample count (axis 0)."""
    named: dict[str, tuple[str, int]] = {}
    for inp in inputs:
        _check_one(path, inp, arrays[inp.name], named)
    counts = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            f"{path}: inputs hold different numbers of samples (axis 0): {counts}"
        )
    # Axis 0 of inputs sharing a dim name: equal counts already imply agreement.
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise CalibrationError(f"{path}: no samples (axis 0 is empty)")
    return count


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


def _fixed_batch(path: Path, inputs: Sequence[ModelInput], count: int) -> int | None:
    """The batch size the model fixes on axis 0, or None; ``count`` must be a multiple of it."""
    fixed = {
        inp.name: inp.dims[0] for inp in inputs if isinstance(inp.dims[0], int) and inp.dims[0] >= 0
    }
    if not fixed:
        return None
    sizes = set(fixed.values())
    if len(sizes) > 1:
        raise CalibrationError(f"{path}: model inputs fix different batch sizes on axis 0: {fixed}")
    size = sizes.pop()
    if size == 0 or count % size:
        raise CalibrationError(
            f"{path}: the model fixes axis 0 to {size} (inputs {', '.join(map(repr, fixed))}), "
            f"but {count} samples (after any limit) are not a multiple of it"
        )
    return size
