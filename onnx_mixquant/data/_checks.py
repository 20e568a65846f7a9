"""Checks of calibration samples against the model inputs, behind :mod:`onnx_mixquant.data._sources`.

A :class:`Checker` compares what each unit holds (a :data:`Meta`: array name -> dtype and shape,
read from file headers or from arrays) with the model's graph inputs: keys, dtype (arrays are
never cast), rank, static dims and dims that share a name across inputs, and the common sample
count along axis 0. Each error is a :class:`~onnx_mixquant.errors.CalibrationError` naming the
file or item, the input and the mismatch. Also here: which input a .npy file feeds, the check
that a Python item is a dict, and the .npy/.npz header readers that give a file's Meta without
reading its data.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from onnx_mixquant.errors import CalibrationError
from onnx_mixquant.read import ModelInput

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
#: Dim values that mean "unknown, unnamed" in ModelInput.dims: they match anything.
_UNNAMED = ("", "?")
#: Array name -> (dtype, shape), read from a file header or from an array.
Meta = dict[str, tuple[np.dtype, tuple[int, ...]]]
Arrays = dict[str, np.ndarray]


def check_keys(where: str, inputs: Sequence[ModelInput], keys: Sequence[str]) -> None:
    """Every model input has an array; other keys are refused except ``labels``."""
    expected = [inp.name for inp in inputs]
    listing = ", ".join(repr(n) for n in expected)
    for key in keys:
        if key not in expected and key != LABELS_KEY:
            raise CalibrationError(
                f"{where}: unexpected key {key!r}; expected the model input names ({listing}) "
                f"and optionally {LABELS_KEY!r}"
            )
    missing = [n for n in expected if n not in keys]
    if missing:
        raise CalibrationError(
            f"{where}: no array for model input(s) {', '.join(map(repr, missing))}; has {list(keys)}"
        )


def _is_unnamed(dim: object) -> bool:
    return dim is None or (isinstance(dim, str) and dim in _UNNAMED) or (isinstance(dim, int) and dim < 0)


def check_array(
    where: str, inp: ModelInput, dtype: np.dtype, shape: tuple[int, ...], named: dict[str, tuple[str, int]]
) -> None:
    """Check dtype, rank and dims of one array; note symbolic dims in ``named`` (name -> who, n)."""
    where = f"{where}: input {inp.name!r}"
    if inp.dtype in _UNNAMED:
        logger.debug("%s: model gives no element type; taking %s from the file", where, dtype.name)
    elif dtype.name != inp.dtype:
        raise CalibrationError(f"{where}: expected dtype {inp.dtype}, got {dtype.name} (arrays are not cast)")
    if not inp.dims:
        raise CalibrationError(f"{where}: scalar model inputs cannot be split into samples along axis 0")
    if len(shape) != len(inp.dims):
        raise CalibrationError(
            f"{where}: expected rank {len(inp.dims)} (dims {list(inp.dims)}), got shape {shape}"
        )
    for pos, (d, n) in enumerate(zip(inp.dims, shape, strict=True)):
        if pos == 0 or _is_unnamed(d):
            continue  # axis 0 holds the samples: checked across inputs and by the fixed-batch rule
        if isinstance(d, int):
            if d != n:
                raise CalibrationError(f"{where}: dim {pos} must be {d}, got {n} (shape {shape})")
            continue
        seen = named.setdefault(str(d), (f"input {inp.name!r} dim {pos}", n))
        if seen[1] != n:
            raise CalibrationError(
                f"{where}: dim {pos} ({d!r}) is {n}, but {seen[0]} ({d!r}) is {seen[1]}; "
                "inputs sharing a dim name must agree"
            )


def sample_count(where: str, counts: Mapping[str, int]) -> int:
    """The common number of samples (axis 0) of a unit's arrays, which must be positive."""
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{where}: inputs hold different numbers of samples (axis 0): {dict(counts)}")
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise CalibrationError(f"{where}: no samples (axis 0 is empty)")
    return count


class Checker:
    """Checks units against the model inputs: keys, dtype (never cast), rank, static and named dims.

    Args:
        inputs: the model's graph inputs.
        allow_single: accept an array one rank short of its input as one sample (axis 0 is added).
        uniform: every sample of the source must have the same shape (they are batched together).
    """

    def __init__(
        self, inputs: Sequence[ModelInput], *, allow_single: bool = True, uniform: bool = False
    ) -> None:
        self.inputs = tuple(inputs)
        self.allow_single = allow_single
        self.uniform = uniform
        self._first: dict[str, tuple[str, tuple[int, ...]]] = {}

    def check(self, where: str, meta: Meta) -> int:
        """Check one unit's arrays as stored (dtype and shape); returns its sample count."""
        check_keys(where, self.inputs, list(meta))
        named: dict[str, tuple[str, int]] = {}
        counts: dict[str, int] = {}
        for inp in self.inputs:
            dtype, shape = meta[inp.name]
            shape = self._batched(where, inp, tuple(shape))
            check_array(where, inp, dtype, shape, named)
            if self.uniform:
                self._same_shape(where, inp.name, shape)
            counts[inp.name] = shape[0]
        return sample_count(where, counts)

    def conform(self, where: str, arrays: Mapping[str, Any]) -> tuple[Arrays, int]:
        """Check a loaded unit; returns its arrays by input name, each with axis 0, and the count."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        count = self.check(where, {k: (a.dtype, a.shape) for k, a in arrays.items()})
        out = {}
        for inp in self.inputs:
            a = arrays[inp.name]
            out[inp.name] = a[np.newaxis] if a.ndim == len(inp.dims) - 1 else a
        return out, count

    def _batched(self, where: str, inp: ModelInput, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with axis 0: one sample when one rank short (if allowed), else as it is."""
        rank = len(inp.dims)
        if not self.allow_single or not inp.dims or len(shape) == rank:
            return shape
        if len(shape) == rank - 1:
            return (1, *shape)
        raise CalibrationError(
            f"{where}: input {inp.name!r}: expected rank {rank} (a batch; dims {list(inp.dims)}) "
            f"or {rank - 1} (one sample), got shape {shape}"
        )

    def _same_shape(self, where: str, name: str, shape: tuple[int, ...]) -> None:
        first, first_shape = self._first.setdefault(name, (where, shape[1:]))
        if first_shape != shape[1:]:
            raise CalibrationError(
                f"{where}: input {name!r}: sample shape {shape[1:]} differs from {first_shape} in "
                f"{first}; samples of different shapes cannot be batched together (use batch size 1)"
            )


def npy_key(path: Path, inputs: Sequence[ModelInput]) -> str:
    """The input a .npy file feeds: the model's only one."""
    if len(inputs) != 1:
        names = ", ".join(repr(inp.name) for inp in inputs)
        raise CalibrationError(
            f"{path}: a .npy file holds one array, but the model has {len(inputs)} inputs "
            f"({names}); use a .npz with one array per input name"
        )
    return inputs[0].name


def _npz_meta(path: Path) -> Meta:
    """Dtype and shape of every array in a .npz, from the .npy headers (no data is read)."""
    meta: Meta = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            with zf.open(info) as f:
                meta[key] = _npy_header(f)
    return meta


def _npy_header(f: IO[bytes]) -> tuple[np.dtype, tuple[int, ...]]:
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return dtype, tuple(shape)


def _as_mapping(where: str, item: object) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise CalibrationError(f"{where}: expected a dict of input name -> array, got {type(item).__name__}")
    return item
