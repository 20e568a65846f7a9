"""Class labels of validation samples, behind :mod:`onnx_mixquant.data.sources`.

Labels come from one of three places, per unit (file or item) of a source:

- a ``labels`` array in a .npz (integer class ids, one per sample; not when an input is named so);
- the class sub-folder of an image: its index among the folder's sub-folders in sorted order
  (torchvision's ImageFolder convention; see ``_sources._class_folders``);
- a CSV file of ``path,label`` rows (an optional ``path,label`` header first), ``path`` relative
  to a base folder (the samples folder, or the CSV's own folder when the samples are a list of
  files) or absolute: one label per file, so each labelled file must hold one sample.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_mixquant.data._checks import LABELS_KEY
from onnx_mixquant.data._sources import Unit
from onnx_mixquant.errors import CalibrationError

__all__ = ["array_labels", "csv_unit_labels", "folder_note", "read_labels_csv"]

logger = logging.getLogger(__name__)

#: Class names shown in a report's label note before "...".
_SHOWN = 3


def array_labels(where: str, raw: Mapping[str, Any], inputs: Sequence[str], count: int) -> np.ndarray | None:
    """The ``labels`` array of one loaded unit as int64 (None when it has none).

    Raises:
        CalibrationError: labels that are not integers, not 1-D, or not one per sample.
    """
    if LABELS_KEY not in raw or LABELS_KEY in inputs:
        return None
    labels = np.asarray(raw[LABELS_KEY])
    if labels.dtype.kind not in "iu":
        raise CalibrationError(
            f"{where}: {LABELS_KEY!r} must hold integer class ids, got dtype {labels.dtype.name}"
        )
    if labels.ndim != 1 or labels.shape[0] != count:
        raise CalibrationError(f"{where}: {LABELS_KEY!r} has shape {labels.shape}; expected ({count},)")
    return labels.astype(np.int64)


def read_labels_csv(path: Path, base: Path) -> dict[Path, int]:
    """``path,label`` rows -> {resolved file path: class id}; relative paths are under ``base``.

    Raises:
        CalibrationError: unreadable file, a row without two fields, a label that is not a
            non-negative integer, a path given twice, or no rows.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CalibrationError(f"cannot read labels file {str(path)!r}: {e}") from e
    out: dict[Path, int] = {}
    for line, row in enumerate(rows, 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise CalibrationError(f"{path}:{line}: expected 'path,label', got {len(row)} fields")
        name, label = row[0].strip(), row[1].strip()
        if line == 1 and (name, label) == ("path", "label"):
            continue  # the header
        if not label.isdigit():
            raise CalibrationError(f"{path}:{line}: label {label!r} is not a non-negative integer class id")
        file = (base / name).resolve()
        if file in out:
            raise CalibrationError(f"{path}:{line}: {name!r} is labelled twice")
        out[file] = int(label)
    if not out:
        raise CalibrationError(f"labels file {str(path)!r} has no 'path,label' rows")
    return out


def csv_unit_labels(path: Path, labels: Mapping[Path, int], units: Sequence[Unit]) -> list[int]:
    """The label of every unit (a file holding one sample) from :func:`read_labels_csv`'s map.

    Raises:
        CalibrationError: a unit that is not a file, holds more than one sample, or has no row.
    """
    out = []
    for u in units:
        file = Path(u.where)
        if u.load is None or not file.exists():
            raise CalibrationError(f"labels file {str(path)!r} labels files; {u.where!r} is not one")
        if u.count != 1:
            raise CalibrationError(
                f"{u.where}: holds {u.count} samples, but labels file {str(path)!r} gives one label per "
                f"file; put a {LABELS_KEY!r} array in the .npz instead"
            )
        label = labels.get(file.resolve())
        if label is None:
            raise CalibrationError(f"labels file {str(path)!r} has no row for {u.where!r}")
        out.append(label)
    unused = len(labels) - len(units)
    if unused > 0:
        logger.info("%s: %d rows name files that are not among the samples", path, unused)
    return out


def folder_note(classes: Sequence[str]) -> str:
    """How labels were read from class sub-folders, for the report."""
    shown = ", ".join(f"{i}={c!r}" for i, c in enumerate(classes[:_SHOWN]))
    more = f", ..., {len(classes) - 1}={classes[-1]!r}" if len(classes) > _SHOWN else ""
    return f"labels: index of the class sub-folder in sorted order, {shown}{more}"
