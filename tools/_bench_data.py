"""Evaluation data and top-1 measurement for ``tools/bench.py`` (dev-only: needs Pillow).

The images and their ``path,label`` csv files live in the read-only benchmark folder
(``shared/bench/data/<dataset>/eval.csv``, paths relative to ``<dataset>/``). Each image set is
preprocessed once as ``shared/bench/README.md`` prescribes and cached as two ``.npy`` files
(``x``: float32 NCHW, ``y``: int64) under the cache folder, keyed by a hash of the csv and the
preprocessing version, so a rerun loads arrays instead of decoding JPEGs.

==============  ==========================================================================
dataset         preprocessing (``prep`` name in the cache key)
==============  ==========================================================================
cifar10         RGB, x / 255, (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], 32x32
imagenet        RGB, centre crop 224x224 (offset floored), (x - 127) / 128
==============  ==========================================================================
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

import onnx_mixquant

#: Bump when a preprocessing function changes, so stale caches are not reused.
PREP_VERSION = 2
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
CIFAR_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP = 224

#: onnxruntime graph optimisation levels by the names the command line accepts.
ORT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


@dataclass(frozen=True)
class EvalSet:
    """Preprocessed images ``x`` (n, 3, H, W) float32 and labels ``y`` (n,) int64."""

    dataset: str
    x: np.ndarray
    y: np.ndarray


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries only the final table)."""
    print(msg, file=sys.stderr, flush=True)


def _prep_cifar(img: Image.Image) -> np.ndarray:
    """32x32 RGB image -> (3, 32, 32) float32, /255 then mean/std normalised."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    if x.shape != (32, 32, 3):
        raise ValueError(f"expected a 32x32 RGB image, got shape {x.shape}")
    return ((x - CIFAR_MEAN) / CIFAR_STD).transpose(2, 0, 1)


def _prep_imagenet(img: Image.Image) -> np.ndarray:
    """256-px RGB image -> (3, 224, 224) float32: centre crop, then (x - 127) / 128.

    The crop offset is floored, ``(size - 224) // 2``; torchvision's rounded offset moves the crop
    by one pixel on odd sizes (558 of the 1,000 images) and gives 0.865 instead of the reference 0.864.
    """
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < CROP:
        raise ValueError(f"image {w}x{h} is smaller than the {CROP}x{CROP} crop")
    top, left = (h - CROP) // 2, (w - CROP) // 2
    x = np.asarray(img.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)


PREPROCESS: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "cifar10": _prep_cifar,
    "imagenet": _prep_imagenet,
}


def read_csv(path: Path) -> list[tuple[str, int]]:
    """Rows of a ``path,label`` csv with a header line."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header 'path,label', got {reader.fieldnames}")
        return [(row["path"], int(row["label"])) for row in reader]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` via a temporary file in the same folder (mode 0644), then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    write_atomic(path, buf.getvalue())


def _decode_all(root: Path, rows: list[tuple[str, int]], dataset: str) -> EvalSet:
    """Decode and preprocess every image of ``rows`` (paths relative to ``root``)."""
    prep = PREPROCESS[dataset]
    first = prep(Image.open(root / rows[0][0]))
    x = np.empty((len(rows), *first.shape), dtype=np.float32)
    x[0] = first
    t0 = time.perf_counter()
    for i, (rel, _) in enumerate(rows[1:], start=1):
        with Image.open(root / rel) as img:
            x[i] = prep(img)
        if (i + 1) % 2000 == 0:
            log(f"  [{dataset}] preprocessed {i + 1}/{len(rows)} images")
    log(f"  [{dataset}] preprocessed {len(rows)} images in {time.perf_counter() - t0:.1f} s")
    return EvalSet(dataset, x, np.array([lab for _, lab in rows], dtype=np.int64))


def load_eval_set(bench_dir: Path, dataset: str, cache_dir: Path) -> EvalSet:
    """The whole eval split of ``dataset``, from the cache when present, else decoded and cached."""
    root = bench_dir / "data" / dataset
    csv_path = root / "eval.csv"
    key = hashlib.sha1(csv_path.read_bytes()).hexdigest()[:12]
    stem = cache_dir / f"{dataset}_eval_prep{PREP_VERSION}_{key}"
    x_path, y_path = stem.with_name(stem.name + "_x.npy"), stem.with_name(stem.name + "_y.npy")
    if x_path.is_file() and y_path.is_file():
        log(f"  [{dataset}] cached arrays {x_path}")
        return EvalSet(dataset, np.load(x_path), np.load(y_path))
    data = _decode_all(root, read_csv(csv_path), dataset)
    _save_npy(x_path, data.x)
    _save_npy(y_path, data.y)
    return data


def subset(data: EvalSet, limit: int | None) -> EvalSet:
    """At most ``limit`` images, evenly spaced over the set (the csv files are sorted by class)."""
    if limit is None or limit >= len(data.y):
        return data
    idx = np.unique(np.linspace(0, len(data.y) - 1, num=limit).round().astype(np.int64))
    return EvalSet(data.dataset, data.x[idx], data.y[idx])


def make_session(model: Path, level: str, threads: int) -> ort.InferenceSession:
    """onnxruntime CPU session with the optimisation level set explicitly."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ORT_LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def top1(sess: ort.InferenceSession, data: EvalSet, batch: int, label: str) -> float:
    """Top-1 accuracy of the session's first output on ``data``; progress every ~20 %."""
    name = sess.get_inputs()[0].name
    n, correct, step = len(data.y), 0, max(1, len(data.y) // 5)
    next_report = step
    for i in range(0, n, batch):
        logits = sess.run(None, {name: data.x[i : i + batch]})[0]
        correct += int((logits.argmax(axis=1) == data.y[i : i + batch]).sum())
        done = min(i + batch, n)
        if done >= next_report or done == n:
            log(f"  [{label}] eval {done}/{n} images, running top-1 {correct / done:.4f}")
            next_report = done + step
    return correct / n


def mark(section: str, edge: str) -> str:
    """The HTML comment that opens (edge="start") or closes (edge="end") a BENCHMARKS.md section."""
    return f"<!-- bench:{section}:{edge} -->"


def merge_section(old: str | None, text: str, section: str) -> str:
    """Replace the marked ``section`` of ``old`` (or append it; or start a new file), keep the rest."""
    if old is None:
        return "# Benchmarks\n\n" + text
    start, end = old.find(mark(section, "start")), old.find(mark(section, "end"))
    if start < 0 or end < start:
        return old.rstrip("\n") + "\n\n" + text
    return old[:start] + text.rstrip("\n") + old[end + len(mark(section, "end")) :]


def machine_facts() -> dict[str, Any]:
    """Where and with what the numbers were measured (the part every benchmark records)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "onnx_mixquant": onnx_mixquant.__version__,
        "ort_provider": "CPUExecutionProvider",
    }
