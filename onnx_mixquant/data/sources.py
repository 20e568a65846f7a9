"""Sample and calibration inputs: files -> batches of feeds checked against the model's inputs.

:func:`open_calibration` opens any calibration source (folders of .npy/.npz files, one .npz, ONNX
test data sets, image folders, CalibrationDataReaders, iterables of input dicts; readers in
``_sources.py``) as a :class:`CalibrationData`: a re-iterable stream that loads one file at a
time. It can hold out a seeded subset for validation that its :meth:`~CalibrationData.batches`
(everything calibration, bias correction and BRECQ read) never yields. :func:`load_samples` reads
validation samples from any such source into memory, with their labels (``_labels.py``).

A ``.npz`` holds one array per model input (key = input name, samples on axis 0) and optionally
``labels`` (integer class ids, one per sample); a ``.npy`` holds the one input of a single-input
model. Arrays are never cast: a float64 file for a float32 input is an error, not a conversion.

When the model fixes its batch dimension (axis 0 is a number B, as in most exported CNNs with
B = 1), the samples used must be a multiple of B and the feeds are batches of exactly B.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from onnx_mixquant.config import ImageSpec
from onnx_mixquant.data import _labels, _samplefile, _sources
from onnx_mixquant.data.preprocess import IMAGE_SUFFIXES
from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.read import ModelInput
from onnx_mixquant.validate import Samples

__all__ = ["CalibrationData", "load_samples", "open_calibration"]

logger = logging.getLogger(__name__)

LABELS_KEY = _sources.LABELS_KEY
Feed = dict[str, np.ndarray]


def load_samples(
    source: Any,
    inputs: Sequence[ModelInput],
    *,
    batch_size: int = 32,
    limit: int | None = None,
    image_spec: ImageSpec | None = None,
    labels: str | Path | None = None,
) -> Samples:
    """Read validation samples, with their class labels when there are any, into memory.

    ``source`` is anything :func:`open_calibration` accepts. One .npz or .npy file is read whole:
    a .npz with one array per model input name (batch on axis 0) and an optional ``labels`` array,
    or a .npy for a single-input model. Other sources are read with :func:`open_calibration`
    (every sample, in order); their labels come from the ``labels`` arrays of .npz files, from
    class sub-folders of an image folder (the index of the sub-folder in sorted order), or from
    the ``labels`` CSV file, which wins over both.

    Args:
        source: the samples (see above).
        inputs: the model's graph inputs.
        batch_size: samples per feed; ignored when the model fixes axis 0 (then that size is used).
        limit: keep only the first ``limit`` samples.
        image_spec: preprocessing of a folder of images.
        labels: CSV file of ``path,label`` rows (an optional ``path,label`` header first), one per
            file holding one sample; paths relative to ``source`` when it is a folder, else to the
            CSV file's folder.

    Returns:
        Samples whose ``source`` describes the data and where the labels came from; labels as
        int64, or None.

    Raises:
        ConfigError: ``batch_size`` or ``limit`` below 1.
        CalibrationError: unreadable file, unexpected or missing key, wrong dtype / rank / dim,
            inconsistent sample counts or label count, a bad labels file.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"sample limit must be >= 1, got {limit!r}")
    if labels is None and _one_array_file(source):
        return _samplefile.load_file(Path(source), inputs, batch_size, limit)
    try:
        with open_calibration(source, inputs, batch_size=batch_size, image_spec=image_spec) as opened:
            if labels is not None:
                csv_path = Path(labels)
                base = Path(source) if isinstance(source, (str, PathLike)) else csv_path.parent
                table = _labels.read_labels_csv(csv_path, base if base.is_dir() else csv_path.parent)
                units = opened._source.units
                opened._label_units(
                    _labels.csv_unit_labels(csv_path, table, units), f"labels from {csv_path}"
                )
            return opened.as_samples(limit)
    except CalibrationError as e:  # the readers say "calibration data"; these are validation samples
        raise CalibrationError(f"validation samples: {e}") from e


def _one_array_file(source: Any) -> bool:
    """One .npz/.npy path (or a path that is not there: its reader names it)."""
    if not isinstance(source, (str, PathLike)):
        return False
    path = Path(source)
    return not path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES


def open_calibration(
    source: Any,
    inputs: Sequence[ModelInput],
    *,
    calib_size: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    image_spec: ImageSpec | None = None,
    holdout: int = 0,
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

    Hold-out: with ``holdout`` > 0, ``min(holdout, N // 4)`` of the N samples (rounded down to a
    multiple of the model's fixed batch dim; none when N < 4) are drawn at random (seeded) for
    validation (:meth:`CalibrationData.held_out`) and never appear in
    :meth:`CalibrationData.batches`; ``calib_size`` then samples the others.

    Args:
        source: see above.
        inputs: the model's graph inputs.
        calib_size: use at most this many samples for calibration: a random subset (sorted,
            seeded) when the source has more; spooled one-shot iterables keep their first
            ``calib_size + holdout`` samples.
        seed: seed of the hold-out and of that subset (same seed, same split).
        batch_size: samples per batch; the model's fixed batch dim wins when it has one.
        image_spec: preprocessing of a folder of images.
        holdout: the most samples to hold out for validation (0: none).

    Returns:
        The stream; call ``close()`` (or use ``with``) to delete spooled files early.

    Raises:
        ConfigError: ``batch_size`` or ``calib_size`` below 1, ``holdout`` below 0.
        CalibrationError: missing/unreadable/unsupported data, or samples that do not match the
            inputs (the message names the file or item and the mismatch).
    """
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size!r}")
    if calib_size is not None and calib_size < 1:
        raise ConfigError(f"calib_size must be >= 1, got {calib_size!r}")
    if holdout < 0:
        raise ConfigError(f"holdout must be >= 0, got {holdout!r}")
    size = _samplefile.fixed_size(_sources.describe(source), inputs) or batch_size
    checker = _sources.Checker(inputs, uniform=size > 1)
    limit = None if calib_size is None else calib_size + holdout
    src = _sources.open_source(source, checker, image_spec=image_spec, limit=limit)
    try:
        return CalibrationData(
            src, checker, batch_size=batch_size, calib_size=calib_size, seed=seed, holdout=holdout
        )
    except BaseException:
        src.close()
        raise


def _split(
    total: int, holdout: int, calib_size: int | None, fixed: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(held-out sample indices, calibration sample indices or None for all), both sorted.

    Without a hold-out the draw is the one before hold-outs existed (same seed, same subset).
    """
    held = min(holdout, total // 4)
    if fixed:
        held -= held % fixed
    rng = np.random.default_rng(seed)
    out = np.sort(rng.choice(total, size=held, replace=False)) if held else np.zeros(0, dtype=np.int64)
    pool = np.setdiff1d(np.arange(total), out) if held else None
    count = total - held
    if calib_size is not None and count > calib_size:
        pick = rng.choice(count, size=calib_size, replace=False)
        return out, np.sort(pick if pool is None else pool[pick])
    return out, pool


class CalibrationData:
    """A re-iterable, lazily loaded, validated stream of calibration batches (dict input name ->
    array, batch on axis 0), and the samples held out of it for validation. Made by
    :func:`open_calibration`.

    Attributes:
        source: human description (a path, "CalibrationDataReader <class>", ...).
        num_samples: samples that :meth:`batches` yields in total.
        num_held_out: samples held out for validation (:meth:`held_out`); never in :meth:`batches`.
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
        holdout: int = 0,
    ) -> None:
        self._source = source
        self._checker = checker
        self.source = source.description
        counts = np.array([u.count for u in source.units], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self._offsets[-1])
        if total == 0:
            raise CalibrationError(f"calibration data {self.source!r}: no samples")
        fixed = _samplefile.fixed_size(self.source, checker.inputs)
        self._held, self._chosen = _split(total, holdout, calib_size, fixed, seed)
        self.num_held_out = len(self._held)
        self.num_samples = total - self.num_held_out if self._chosen is None else len(self._chosen)
        self.batch_size = _samplefile.fixed_batch(self.source, checker.inputs, self.num_samples) or batch_size
        self.num_batches = -(-self.num_samples // self.batch_size)
        self._unit_labels: list[int | None] = [u.label for u in source.units]
        self._labels_note = _labels.folder_note(source.classes) if source.classes else None
        logger.info(
            "%s: %d samples in %d units, %d held out, using %d in %d batches of %d",
            self.source,
            total,
            len(counts),
            self.num_held_out,
            self.num_samples,
            self.num_batches,
            self.batch_size,
        )

    def batches(self) -> Iterator[Feed]:
        """All calibration batches (never a held-out sample), loading one file (or item) at a
        time; the same data in the same order on every call (run one pass at a time when the
        source is a rewinding reader).

        Raises:
            CalibrationError: an image or reader item does not match the inputs, or a file
                changed since it was opened.
        """
        parts = ((arrays, rows) for arrays, rows, _ in self._parts(self._calib_indices()))
        return _regroup(parts, self.batch_size)

    def as_samples(self, limit: int | None = None) -> Samples:
        """The first ``limit`` calibration samples (all when None) in memory, batched, with
        their labels when every file has some (for validation).

        Raises:
            ConfigError: ``limit`` below 1.
            CalibrationError: as :meth:`batches`, or ``limit`` is not a multiple of the model's
                fixed batch dim.
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"sample limit must be >= 1, got {limit!r}")
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        _samplefile.fixed_batch(self.source, self._checker.inputs, n)
        return self._in_memory(self._calib_indices()[:n], self.source)

    def held_out(self) -> Samples | None:
        """The samples held out for validation, in memory, with their labels when every file has
        some; None when none were held out. Their ``source`` reads "held out from SOURCE: k
        samples".

        Raises:
            CalibrationError: as :meth:`batches`.
        """
        if not self.num_held_out:
            return None
        return self._in_memory(self._held, f"held out from {self.source}: {self.num_held_out} samples")

    def close(self) -> None:
        """Delete spooled files (if any); the stream cannot be read afterwards."""
        self._source.close()

    def __enter__(self) -> CalibrationData:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _label_units(self, labels: Sequence[int], note: str) -> None:
        """Give each unit (one sample each) a label, over any other (a CSV labels file)."""
        assert len(labels) == len(self._unit_labels)
        self._unit_labels = list(labels)
        self._labels_note = note

    def _calib_indices(self) -> np.ndarray:
        if self._chosen is not None:
            return self._chosen
        return np.arange(self.num_samples)

    def _in_memory(self, chosen: np.ndarray, source: str) -> Samples:
        """Batches of the ``chosen`` samples and their labels (None unless every unit has some)."""
        labels: list[np.ndarray | None] = []

        def parts() -> Iterator[tuple[Feed, np.ndarray]]:
            for arrays, rows, unit_labels in self._parts(chosen):
                labels.append(unit_labels)
                yield arrays, rows

        feeds = tuple(_regroup(parts(), self.batch_size))
        found = [a for a in labels if a is not None]
        if found and len(found) < len(labels):
            logger.warning("%s: labels for some files only; no accuracy figure", source)
        if not found or len(found) < len(labels):
            return Samples(feeds=feeds, labels=None, source=source)
        note = self._labels_note or f"labels: the files' {LABELS_KEY!r} arrays"
        return Samples(feeds=feeds, labels=np.concatenate(found), source=f"{source}; {note}")

    def _parts(self, chosen: np.ndarray) -> Iterator[tuple[Feed, np.ndarray, np.ndarray | None]]:
        """(arrays of a unit, its rows to use, their labels or None) for each unit holding one of
        the ``chosen`` samples (sorted), checked again as loaded."""
        bounds = np.searchsorted(chosen, self._offsets)
        wanted = bounds[1:] > bounds[:-1]
        names = [inp.name for inp in self._checker.inputs]
        for i, raw in self._source.read(wanted):
            unit = self._source.units[i]
            arrays, count = self._checker.conform(unit.where, raw)
            if count != unit.count:
                raise CalibrationError(
                    f"{unit.where}: {count} samples now, {unit.count} when opened; the data must "
                    "not change between passes (a reader must repeat its items after rewind())"
                )
            label = self._unit_labels[i]
            labels = (
                np.full(count, label, dtype=np.int64)
                if label is not None
                else _labels.array_labels(unit.where, raw, names, count)
            )
            del raw
            rows = chosen[bounds[i] : bounds[i + 1]] - self._offsets[i]
            yield arrays, rows, None if labels is None else labels[rows]
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
