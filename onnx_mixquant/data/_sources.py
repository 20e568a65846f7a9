"""Calibration sources behind :func:`onnx_mixquant.data.sources.open_calibration`.

A :class:`Source` is an ordered list of :class:`Unit` s: one array file (.npy/.npz), one ONNX test
data set (``test_data_set_*/input_*.pb``), one image, or one item (input dict) of a Python
iterable or CalibrationDataReader. Each unit holds ``count`` samples and is loaded only when read,
so a pass holds one unit's arrays at a time. Array files and test data sets are checked when the
source is opened (.npy/.npz from their headers alone); images are checked as they are loaded.
One-shot iterators and readers without ``rewind()`` are spooled to a temporary folder of .npy files.
The checks against the model inputs (:class:`Checker`) are in :mod:`onnx_mixquant.data._checks`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnx_mixquant.config import ImageSpec
from onnx_mixquant.data import preprocess
from onnx_mixquant.data._checks import LABELS_KEY as LABELS_KEY  # re-exported: sources.py reads it here
from onnx_mixquant.data._checks import Checker, Meta, _as_mapping, _npz_meta, npy_key
from onnx_mixquant.data._checks import check_keys as check_keys  # re-exported: sources.py calls it here
from onnx_mixquant.errors import CalibrationError

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_INPUT_PB = re.compile(r"input_(\d+)\.pb")
_TEST_SET = re.compile(r"test_data_set_(\d+)")


@dataclass(frozen=True)
class Unit:
    """One file or item: ``where`` names it in messages, ``load`` reads its arrays as stored."""

    where: str
    count: int
    load: Callable[[], Mapping[str, Any]] | None = None  # None: the source reads it (readers)
    label: int | None = None  # class id of its one sample (an image in a class sub-folder)


class Source:
    """An ordered list of units, read one at a time.

    Attributes:
        description: human description (a path, "CalibrationDataReader <class>", ...).
        units: the units, in reading order.
        classes: class sub-folder names in sorted order (the label of an image is its folder's
            index here) when the source is a folder of images in two or more class sub-folders.
    """

    def __init__(self, description: str, units: Sequence[Unit], classes: Sequence[str] = ()) -> None:
        self.description = description
        self.units = tuple(units)
        self.classes = tuple(classes)

    def read(self, wanted: np.ndarray) -> Iterator[tuple[int, Mapping[str, Any]]]:
        """(unit index, its arrays as stored) for each unit where ``wanted`` (bool per unit) is set."""
        for i in np.flatnonzero(wanted):
            load = self.units[i].load
            assert load is not None
            yield int(i), load()

    def close(self) -> None:
        """Release what the source holds (temporary files). Plain sources hold nothing."""


class _RewindReader(Source):
    """A CalibrationDataReader with ``rewind()``: each pass rewinds it and calls get_next()."""

    def __init__(self, description: str, units: Sequence[Unit], reader: Any) -> None:
        super().__init__(description, units)
        self._reader = reader

    def read(self, wanted: np.ndarray) -> Iterator[tuple[int, Mapping[str, Any]]]:
        indices = np.flatnonzero(wanted)
        if not len(indices):
            return
        self._reader.rewind()
        n = 0
        for n, item in enumerate(_reader_items(self._reader), 1):
            if wanted[n - 1]:
                yield n - 1, _as_mapping(self.units[n - 1].where, item)
            if n - 1 == indices[-1]:
                return
        raise CalibrationError(
            f"{self.description}: get_next() gave {n} items after rewind(), {len(self.units)} on the "
            "first pass; the reader must give the same data on every pass"
        )


class _Spooled(Source):
    """Items of a one-shot iterable saved as .npy files in a temporary folder (deleted on close)."""

    def __init__(self, description: str, units: Sequence[Unit], folder: Path) -> None:
        super().__init__(description, units)
        self.folder = folder
        self._finalizer = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def close(self) -> None:
        self._finalizer()


def describe(source: object) -> str:
    """A short human description of a calibration source, used in messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    if isinstance(source, Mapping):
        return "dict of arrays"
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, os.PathLike)) for s in source):
            return f"{len(source)} files ({Path(source[0])}, ...)"
        return f"{type(source).__name__} of {len(source)} input dicts"
    if callable(getattr(source, "get_next", None)):
        return f"CalibrationDataReader {type(source).__name__}"
    return f"iterable {type(source).__name__}"


def open_source(
    source: object, checker: Checker, *, image_spec: ImageSpec | None, limit: int | None
) -> Source:
    """Open any supported calibration source (see ``data.open_calibration``); ``limit`` caps
    what is spooled from one-shot iterables (their first ``limit`` samples)."""
    description = describe(source)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), checker, image_spec)
    if isinstance(source, Mapping):
        return _open_items([source], description, checker)
    if isinstance(source, (list, tuple)):
        if not source:
            raise CalibrationError("calibration data: empty list")
        if all(isinstance(s, (str, os.PathLike)) for s in source):
            paths = [Path(s) for s in source]
            for p in paths:
                if not p.is_file():
                    raise CalibrationError(f"calibration file {str(p)!r} not found (or not a file)")
            return _open_files(description, paths, checker, image_spec, listed=True)
        return _open_items(source, description, checker)
    if callable(getattr(source, "get_next", None)):
        if _rewound(source):
            return _open_rewind(source, description, checker)
        return _spool(_reader_items(source), description, checker, limit)
    if isinstance(source, (bytes, str)) or not hasattr(source, "__iter__"):
        raise CalibrationError(
            f"unsupported calibration source of type {type(source).__name__}: give a path, a list of "
            "paths, a CalibrationDataReader or an iterable of input dicts"
        )
    return _spool(iter(source), description, checker, limit)  # type: ignore[call-overload]


def _open_path(path: Path, checker: Checker, image_spec: ImageSpec | None) -> Source:
    if not path.exists():
        raise CalibrationError(f"calibration data {str(path)!r} not found")
    if not path.is_dir():
        return _open_files(str(path), [path], checker, image_spec, listed=True)
    sets = _test_data_sets(path)
    if sets:
        return Source(str(path), [_test_set_unit(s, checker) for s in sets])
    files = sorted(p for p in path.iterdir() if p.is_file())
    known = (*ARRAY_SUFFIXES, *preprocess.IMAGE_SUFFIXES)
    if not any(f.suffix.lower() in known for f in files):  # e.g. one sub-folder of images per class
        nested = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in preprocess.IMAGE_SUFFIXES
        )
        if nested:
            return _class_folders(path, nested, checker, image_spec)
    return _open_files(str(path), files, checker, image_spec, listed=False)


def _class_folders(path: Path, images: list[Path], checker: Checker, spec: ImageSpec | None) -> Source:
    """Images in sub-folders of ``path``; with two or more sub-folders each image is labelled with
    the index of its top sub-folder in sorted order (torchvision's ImageFolder convention)."""
    source = _open_files(str(path), images, checker, spec, listed=False)
    tops = [f.relative_to(path).parts[0] for f in images]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return source
    index = {c: i for i, c in enumerate(classes)}
    units = [replace(u, label=index[t]) for u, t in zip(source.units, tops, strict=True)]
    logger.debug("%s: %d images in %d class sub-folders", path, len(units), len(classes))
    return Source(source.description, units, classes)


def _open_files(
    description: str, files: list[Path], checker: Checker, image_spec: ImageSpec | None, *, listed: bool
) -> Source:
    """Array files or images (not both); ``listed``: named one by one, so others are errors."""
    arrays = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES]
    images = [f for f in files if f.suffix.lower() in preprocess.IMAGE_SUFFIXES]
    other = [f for f in files if f.suffix.lower() not in (*ARRAY_SUFFIXES, *preprocess.IMAGE_SUFFIXES)]
    supported = f"{', '.join(ARRAY_SUFFIXES)} or images ({', '.join(preprocess.IMAGE_SUFFIXES)})"
    if arrays and images:
        raise CalibrationError(
            f"calibration data {description!r} mixes images ({images[0].name}, ...) and arrays "
            f"({arrays[0].name}, ...); use one kind"
        )
    if listed and other:
        raise CalibrationError(f"calibration file {str(other[0])!r}: unsupported type; expected {supported}")
    if other:
        logger.info("%s: ignoring %d files of other types (e.g. %s)", description, len(other), other[0].name)
    if images:
        return _open_images(description, images, checker, image_spec)
    if arrays:
        return Source(description, [_array_unit(f, checker) for f in arrays])
    if not files:
        raise CalibrationError(f"calibration folder {description!r} is empty")
    raise CalibrationError(
        f"calibration folder {description!r} has no supported files ({supported}, or test_data_set_*)"
    )


def _array_unit(path: Path, checker: Checker) -> Unit:
    """A .npy/.npz file, checked from its headers; the format is read from the content."""
    try:
        if zipfile.is_zipfile(path):
            key, meta = None, _npz_meta(path)
        else:
            key = npy_key(path, checker.inputs)
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            meta = {key: (a.dtype, a.shape)}
            del a
    except _READ_ERRORS as e:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {e}") from e
    count = checker.check(str(path), meta)
    return Unit(str(path), count, functools.partial(_load_arrays, path, key))


def _load_arrays(path: Path, key: str | None) -> Mapping[str, Any]:
    """A .npz's arrays (read whole), or a .npy's one array (memory-mapped) under ``key``."""
    try:
        if key is not None:
            return {key: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except _READ_ERRORS as e:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {e}") from e


def _test_data_sets(path: Path) -> list[Path]:
    """``path`` itself if it holds input_*.pb, else its test_data_set_* folders (numeric order)."""
    if any(_INPUT_PB.fullmatch(p.name) for p in path.glob("input_*.pb")):
        return [path]
    sets = [p for p in path.iterdir() if p.is_dir() and _TEST_SET.fullmatch(p.name)]
    return sorted(sets, key=lambda p: int(p.name.rsplit("_", 1)[1]))


def _test_set_unit(folder: Path, checker: Checker) -> Unit:
    """One test data set: input_<k>.pb files mapped to inputs by tensor name, else by k."""
    names = [inp.name for inp in checker.inputs]
    files: dict[str, Path] = {}
    meta: Meta = {}
    pbs = sorted((p for p in folder.glob("input_*.pb") if _INPUT_PB.fullmatch(p.name)), key=_pb_index)
    if not pbs:
        raise CalibrationError(f"ONNX test data set {str(folder)!r} has no input_<k>.pb files")
    for pb in pbs:
        tensor = _read_pb(pb)
        name = tensor.name or (names[_pb_index(pb)] if _pb_index(pb) < len(names) else "")
        if name not in names:
            raise CalibrationError(
                f"{pb}: tensor {name or '(unnamed)'!r} is not a model input; inputs: "
                f"{', '.join(map(repr, names))}"
            )
        if name in files:
            raise CalibrationError(f"{pb}: input {name!r} is also given by {files[name].name}")
        files[name] = pb
        try:
            meta[name] = (tensor.dtype.numpy(), tuple(tensor.shape.numpy()))
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"cannot read ONNX tensor file {str(pb)!r}: {e}") from e
    count = checker.check(str(folder), meta)
    return Unit(str(folder), count, functools.partial(_load_test_set, files))


def _pb_index(path: Path) -> int:
    return int(path.name[len("input_") : -len(".pb")])


def _read_pb(path: Path) -> ir.TensorProtocol:
    try:
        proto = onnx.TensorProto()
        proto.ParseFromString(path.read_bytes())
        return ir.serde.deserialize_tensor(proto)
    except (OSError, ValueError, TypeError, DecodeError) as e:
        raise CalibrationError(f"cannot read ONNX tensor file {str(path)!r}: {e}") from e


def _load_test_set(files: Mapping[str, Path]) -> Mapping[str, Any]:
    arrays = {}
    for name, pb in files.items():
        try:
            arrays[name] = _read_pb(pb).numpy()
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"cannot read ONNX tensor file {str(pb)!r}: {e}") from e
    return arrays


class _LazyPreprocessor:
    """preprocess.ImagePreprocessor(spec), built on the first image (and only once)."""

    def __init__(self, spec: ImageSpec) -> None:
        self._spec = spec
        self._run: Callable[[Path], np.ndarray] | None = None

    def __call__(self, path: Path) -> np.ndarray:
        if self._run is None:
            self._run = preprocess.ImagePreprocessor(self._spec)
        return self._run(path)


def _open_images(description: str, files: list[Path], checker: Checker, spec: ImageSpec | None) -> Source:
    if spec is None:
        raise CalibrationError(
            f"calibration data {description!r} is a folder of images: give the preprocessing "
            "(--image-size/--mean/... or a config file)"
        )
    if len(checker.inputs) != 1:
        names = ", ".join(repr(inp.name) for inp in checker.inputs)
        raise CalibrationError(
            f"calibration data {description!r} holds images, which feed single-input models only; "
            f"this model has {len(checker.inputs)} inputs ({names})"
        )
    run = _LazyPreprocessor(spec)
    name = checker.inputs[0].name
    return Source(description, [Unit(str(f), 1, functools.partial(_load_image, run, name, f)) for f in files])


def _load_image(run: _LazyPreprocessor, name: str, path: Path) -> Mapping[str, Any]:
    return {name: np.asarray(run(path))[np.newaxis]}  # one sample: axis 0 of size 1


def _reader_items(reader: Any) -> Iterator[Any]:
    while (item := reader.get_next()) is not None:
        yield item


def _rewound(reader: Any) -> bool:
    """Rewind ``reader`` if it can be; False when it has no (working) ``rewind()``."""
    if not callable(getattr(reader, "rewind", None)):
        return False
    try:
        reader.rewind()
    except NotImplementedError:
        return False
    return True


def _open_items(items: Sequence[Any], description: str, checker: Checker) -> Source:
    """Input dicts already in memory (a list or tuple): checked now, read again directly."""
    units = []
    for i, item in enumerate(items):
        where = f"item {i} of {description}"
        mapping = _as_mapping(where, item)
        _, count = checker.conform(where, mapping)
        units.append(Unit(where, count, functools.partial(dict, mapping)))
    return Source(description, units)


def _open_rewind(reader: Any, description: str, checker: Checker) -> Source:
    """A rewound reader: one pass now to check every item and count its samples."""
    units = []
    for i, item in enumerate(_reader_items(reader)):
        where = f"item {i} of {description}"
        _, count = checker.conform(where, _as_mapping(where, item))
        units.append(Unit(where, count))
    return _RewindReader(description, units, reader)


def _spool(items: Iterator[Any], description: str, checker: Checker, limit: int | None) -> Source:
    """Check and save the items of a one-shot iterable (its first ``limit`` samples) to disk."""
    folder = Path(tempfile.mkdtemp(prefix="onnx_mixquant_calib_"))
    try:
        units = _spool_into(folder, items, description, checker, limit)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.debug("%s: spooled %d items to %s", description, len(units), folder)
    return _Spooled(description, units, folder)


def _spool_into(
    folder: Path, items: Iterator[Any], description: str, checker: Checker, limit: int | None
) -> list[Unit]:
    units: list[Unit] = []
    total = 0
    for i, item in enumerate(items):
        where = f"item {i} of {description}"
        arrays, count = checker.conform(where, _as_mapping(where, item))
        if limit is not None and total + count > limit:
            count = limit - total
            arrays = {k: a[:count] for k, a in arrays.items()}
        files = {name: folder / f"{i:06d}_{j}.npy" for j, name in enumerate(arrays)}
        try:
            for name, a in arrays.items():
                np.save(files[name], a, allow_pickle=False)
        except OSError as e:
            raise CalibrationError(f"cannot spool {where} to {folder}: {e}") from e
        units.append(Unit(where, count, functools.partial(_load_spooled, files)))
        total += count
        if limit is not None and total >= limit:
            break
    return units


def _load_spooled(files: Mapping[str, Path]) -> Mapping[str, Any]:
    return {name: np.load(f, mmap_mode="r", allow_pickle=False) for name, f in files.items()}
