"""Sample and calibration inputs: files -> batches of feeds checked against the model's inputs.

:func:`load_samples` reads one file into memory (validation samples). :func:`open_calibration`
opens any calibration source (folders of .npy/.npz files, one .npz, ONNX test data sets, image
folders, CalibrationDataReaders, iterables of input dicts; readers in ``_sources.py``) as a
:class:`CalibrationData`: a re-iterable stream that loads one file at a time.

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from onnx_mixquant import _sources
from onnx_mixquant.config import ImageSpec
from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.graph import ModelInput
from onnx_mixquant.validate import Samples

__all__ = ["CalibrationData", "load_samples", "open_calibration"]

logger = logging.getLogger(__name__)

LABELS_KEY = _sources.LABELS_KEY
Feed = dict[str, np.ndarray]


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


def _fixed_size(where: str, inputs: Sequence[ModelInput]) -> int | None:
    """The batch size the model fixes on axis 0 (None: not fixed); every input must agree."""
    fixed = {inp.name: inp.dims[0] for inp in inputs if isinstance(inp.dims[0], int) and inp.dims[0] >= 0}
    if not fixed:
        return None
    sizes = set(fixed.values())
    if len(sizes) > 1:
        raise CalibrationError(f"{where}: model inputs fix different batch sizes on axis 0: {fixed}")
    return sizes.pop()


def _fixed_batch(where: str | Path, inputs: Sequence[ModelInput], count: int) -> int | None:
    """The batch size the model fixes on axis 0, or None; ``count`` must be a multiple of it."""
    size = _fixed_size(str(where), inputs)
    if size is None:
        return None
    if size == 0 or count % size:
        names = [inp.name for inp in inputs if inp.dims[0] == size]
        raise CalibrationError(
            f"{where}: the model fixes axis 0 to {size} (inputs {', '.join(map(repr, names))}), "
            f"but {count} samples (after any limit) are not a multiple of it"
        )
    return size


def open_calibration(
    source: Any,
    inputs: Sequence[ModelInput],
    *,
    calib_size: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    image_spec: ImageSpec | None = None,
) -> CalibrationData:
    """Open calibration data as a re-iterable stream of checked batches.

    ``source`` is one of: a folder of .npy/.npz files or a list of such paths (one sample or one
    batch per file: an array of the input's rank is a batch, one rank less is one sample; a .npz
    is keyed by input name, a .npy feeds a single-input model); one .npz or .npy holding all
    samples; an ONNX test data folder (``test_data_set_*/input_<k>.pb``, or one such set; a
    tensor maps to the input of its name, else to input ``k``); a folder of images (needs
    ``image_spec``; single-input models); a CalibrationDataReader (anything with ``get_next()``;
    rewound before each pass if it has ``rewind()``, else spooled to a temporary folder on
    disk); a list/tuple of input dicts; or any other iterable of input dicts (spooled).

    Args:
        source: see above.
        inputs: the model's graph inputs.
        calib_size: use at most this many samples: a random subset (sorted, seeded) when the
            source has more; the first ``calib_size`` for spooled one-shot iterables.
        seed: seed of that subset.
        batch_size: samples per batch; the model's fixed batch dim wins when it has one.
        image_spec: preprocessing of a folder of images.

    Returns:
        The stream; call ``close()`` (or use ``with``) to delete spooled files early.

    Raises:
        ConfigError: ``batch_size`` or ``calib_size`` below 1.
        CalibrationError: missing/unreadable/unsupported data, or samples that do not match the
            inputs (the message names the file or item and the mismatch).
    """
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size!r}")
    if calib_size is not None and calib_size < 1:
        raise ConfigError(f"calib_size must be >= 1, got {calib_size!r}")
    size = _fixed_size(_sources.describe(source), inputs) or batch_size
    checker = _sources.Checker(inputs, uniform=size > 1)
    src = _sources.open_source(source, checker, image_spec=image_spec, limit=calib_size)
    try:
        return CalibrationData(src, checker, batch_size=batch_size, calib_size=calib_size, seed=seed)
    except BaseException:
        src.close()
        raise


class CalibrationData:
    """A re-iterable, lazily loaded, validated stream of calibration batches (dict input name ->
    array, batch on axis 0). Made by :func:`open_calibration`.

    Attributes:
        source: human description (a path, "CalibrationDataReader <class>", ...).
        num_samples: samples that :meth:`batches` yields in total.
        batch_size: samples per batch (the last one may be smaller unless the model fixes it).
        num_batches: batches that :meth:`batches` yields.
    """

    def __init__(
        self,
        source: _sources.Source,
        checker: _sources.Checker,
        *,
        batch_size: int,
        calib_size: int | None,
        seed: int,
    ) -> None:
        self._source = source
        self._checker = checker
        self.source = source.description
        counts = np.array([u.count for u in source.units], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self._offsets[-1])
        if total == 0:
            raise CalibrationError(f"calibration data {self.source!r}: no samples")
        self._chosen: np.ndarray | None = None
        if calib_size is not None and total > calib_size:
            rng = np.random.default_rng(seed)
            self._chosen = np.sort(rng.choice(total, size=calib_size, replace=False))
        self.num_samples = total if self._chosen is None else len(self._chosen)
        fixed = _fixed_batch(self.source, checker.inputs, self.num_samples)
        self.batch_size = fixed or batch_size
        self.num_batches = -(-self.num_samples // self.batch_size)
        logger.info(
            "%s: %d samples in %d units, using %d in %d batches of %d",
            self.source,
            total,
            len(counts),
            self.num_samples,
            self.num_batches,
            self.batch_size,
        )

    def batches(self) -> Iterator[Feed]:
        """All batches, loading one file (or item) at a time; the same data in the same order
        on every call (run one pass at a time when the source is a rewinding reader).

        Raises:
            CalibrationError: an image or reader item does not match the inputs, or a file
                changed since it was opened.
        """
        return _regroup(self._parts(self.num_samples), self.batch_size)

    def as_samples(self, limit: int | None = None) -> Samples:
        """The first ``limit`` samples (all when None) in memory, batched, for validation.

        Raises:
            ConfigError: ``limit`` below 1.
            CalibrationError: as :meth:`batches`, or ``limit`` is not a multiple of the model's
                fixed batch dim.
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"sample limit must be >= 1, got {limit!r}")
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        _fixed_batch(self.source, self._checker.inputs, n)
        feeds = tuple(_regroup(self._parts(n), self.batch_size))
        return Samples(feeds=feeds, labels=None, source=self.source)

    def close(self) -> None:
        """Delete spooled files (if any); the stream cannot be read afterwards."""
        self._source.close()

    def __enter__(self) -> CalibrationData:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _parts(self, stop: int) -> Iterator[tuple[Feed, np.ndarray]]:
        """(arrays of a unit, its rows to use) for each unit holding one of the first ``stop``
        samples used, checked again as loaded."""
        chosen = np.arange(stop) if self._chosen is None else self._chosen[:stop]
        bounds = np.searchsorted(chosen, self._offsets)
        wanted = bounds[1:] > bounds[:-1]
        for i, raw in self._source.read(wanted):
            unit = self._source.units[i]
            arrays, count = self._checker.conform(unit.where, raw)
            del raw
            if count != unit.count:
                raise CalibrationError(
                    f"{unit.where}: {count} samples now, {unit.count} when opened; the data must "
                    "not change between passes (a reader must repeat its items after rewind())"
                )
            yield arrays, chosen[bounds[i] : bounds[i + 1]] - self._offsets[i]
            del arrays  # before the next unit is loaded


def _regroup(parts: Iterable[tuple[Feed, np.ndarray]], size: int) -> Iterator[Feed]:
    """Batches of ``size`` samples (the last may be smaller) from the given rows of each unit.

    Holds at most one unit's arrays and one batch of pieces copied out of them.
    """
    pending: list[Feed] = []
    have = 0
    for arrays, rows in parts:
        start = 0
        while start < len(rows):
            take = rows[start : start + size - have]
            pending.append({name: _take(a, take) for name, a in arrays.items()})
            have += len(take)
            start += len(take)
            if have == size:
                yield _join(pending)
                pending, have = [], 0
        del arrays
    if pending:
        yield _join(pending)


def _take(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of ``a`` as an in-memory array that keeps no larger array or file alive."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo != len(rows):
        return np.asarray(a[rows])  # fancy indexing copies
    if lo == 0 and hi == len(a) and type(a) is np.ndarray and a.base is None and a.flags.c_contiguous:
        return a
    return np.array(a[lo:hi], order="C")


def _join(pieces: list[Feed]) -> Feed:
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
