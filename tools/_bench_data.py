"""Evaluation data, top-1 measurement and shared scaffolding of the benchmark scripts under ``tools/``.

Dev-only (needs Pillow). ``bench.py``, ``bench_static.py`` and ``bench_recon.py`` share the command
line pieces, the ``--_one`` quantization subprocess and the output writers below; ``bench_search.py``
uses the markdown helpers.

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

import argparse
import base64
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

#: The checkout the tools belong to. Its package is imported ahead of any installed copy: an
#: editable install points at one checkout, so a benchmark run from another worktree (and its
#: ``--_one`` subprocesses) would otherwise measure the code of the first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import onnx_mixquant  # noqa: E402
from onnx_mixquant import ImageSpec  # noqa: E402
from onnx_mixquant.data.preprocess import IMAGE_SUFFIXES  # noqa: E402

if Path(onnx_mixquant.__file__).resolve().parent.parent != REPO_ROOT:
    raise SystemExit(f"benchmark tools: onnx_mixquant came from {onnx_mixquant.__file__}, not {REPO_ROOT}")

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
class ModelSpec:
    """Which image set a model reads and the onnx_mixquant preprocessing that matches the README."""

    dataset: str
    image_spec: ImageSpec


CIFAR_SPEC = ImageSpec(scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
IMAGENET_SPEC = ImageSpec(crop=(224, 224), scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
#: The benchmark models (``<bench>/models/<name>.onnx``) by name.
MODELS: dict[str, ModelSpec] = {
    "resnet20_cifar10": ModelSpec("cifar10", CIFAR_SPEC),
    "resnet56_cifar10": ModelSpec("cifar10", CIFAR_SPEC),
    "efficientnet_lite0": ModelSpec("imagenet", IMAGENET_SPEC),
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


def predict(sess: ort.InferenceSession, data: EvalSet, batch: int, label: str) -> np.ndarray:
    """The session's first output (float32 logits, one row per image) on ``data``; progress every ~20 %."""
    name = sess.get_inputs()[0].name
    n, correct, step = len(data.y), 0, max(1, len(data.y) // 5)
    next_report, parts = step, []
    for i in range(0, n, batch):
        logits = np.asarray(sess.run(None, {name: data.x[i : i + batch]})[0], dtype=np.float32)
        parts.append(logits.reshape(len(logits), -1))
        correct += int((parts[-1].argmax(axis=1) == data.y[i : i + batch]).sum())
        done = min(i + batch, n)
        if done >= next_report or done == n:
            log(f"  [{label}] eval {done}/{n} images, running top-1 {correct / done:.4f}")
            next_report = done + step
    return np.concatenate(parts)


def top1(sess: ort.InferenceSession, data: EvalSet, batch: int, label: str) -> float:
    """Top-1 accuracy of the session's first output on ``data``; progress every ~20 %."""
    return float(np.mean(predict(sess, data, batch, label).argmax(axis=1) == data.y))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fidelity(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || model) in nats) of a model's logits against the FP32 model's."""
    agree = float(np.mean(logits.argmax(axis=1) == reference.argmax(axis=1)))
    p_ref, p = _log_softmax(reference), _log_softmax(logits)
    kl = float(np.mean(np.sum(np.exp(p_ref) * (p_ref - p), axis=1)))
    return agree, kl


def pack_hits(hits: np.ndarray) -> str:
    """Per-image correctness (bool array) as base64 of its packed bits (stored with a row)."""
    return base64.b64encode(np.packbits(hits.astype(bool)).tobytes()).decode("ascii")


def unpack_hits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_hits` for ``n`` images."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n).astype(bool)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Top-1 of b minus top-1 of a, and its standard deviation from the discordant images (McNemar).

    Both in points; the images each model gets right and the other wrong are what the difference
    rests on, so two models that disagree on few images differ significantly by little.
    """
    n = len(a)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 100.0 * (only_b - only_a) / n, 100.0 * float(np.sqrt(only_a + only_b)) / n


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
        "commit": code_commit(),
        "ort_provider": "CPUExecutionProvider",
        "gpu": gpu_name(),
    }


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi``; None where there is none (or no driver tools)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def code_commit() -> str | None:
    """The commit of :data:`REPO_ROOT` the package code comes from, ``+changes`` when
    ``onnx_mixquant/`` differs from it; None outside a git checkout. The environment's
    ``BENCH_COMMIT`` wins: a copy of the tree on a lent GPU machine can carry a stale ``.git``."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "onnx_mixquant"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def code_version(machine: dict[str, Any]) -> str:
    """``onnx_mixquant VERSION``, with the commit where the run recorded one."""
    commit = machine.get("commit")
    return f"onnx_mixquant {machine['onnx_mixquant']}" + (f" (commit {commit})" if commit else "")


# ---------------------------------------------------------------------------------------------
# command line


def new_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: the first paragraph of its docstring ``doc`` as description."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_io_args(
    p: argparse.ArgumentParser,
    quick_help: str,
    json_name: str,
    out_help: str = "markdown file (default BENCHMARKS.md; --quick: none)",
    json_help: str | None = None,
) -> None:
    """Add ``--quick``, ``--bench-dir``, ``--cache-dir``, ``--out`` and ``--json``, in that order.

    The default help texts describe :func:`default_outputs` with ``json_name``.
    """
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--bench-dir", type=Path, default=REPO_ROOT.parent / "shared" / "bench")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "onnx-mixquant-bench")
    p.add_argument("--out", type=Path, help=out_help)
    p.add_argument(
        "--json", type=Path, help=json_help or f"raw results (default benchmarks/{json_name} beside --out)"
    )


def split_list(text: str) -> list[str]:
    """The items of a comma list, stripped, empty ones dropped: ``"a, b,"`` -> ``["a", "b"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_choices(p: argparse.ArgumentParser, values: list[str], allowed: Collection[str], what: str) -> None:
    """Exit through ``p.error`` ("unknown <what> ...; choose from ...") at the first value not allowed."""
    for bad in [v for v in values if v not in allowed]:
        p.error(f"unknown {what} {bad!r}; choose from {', '.join(allowed)}")


def default_outputs(args: argparse.Namespace, json_name: str) -> None:
    """Default ``args.out`` to BENCHMARKS.md (none with --quick) and ``args.json`` to
    ``benchmarks/<json_name>`` beside it (none when there is no --out)."""
    if args.out is None and not args.quick:
        args.out = REPO_ROOT / "BENCHMARKS.md"
    if args.json is None and args.out is not None:
        args.json = args.out.parent / "benchmarks" / json_name


def command_line(script: str, argv: list[str]) -> str:
    """The command as it would be typed from the repository root: ``python tools/<script> <argv>``."""
    return shlex.join(["python", f"tools/{Path(script).name}", *argv])


# ---------------------------------------------------------------------------------------------
# quantization subprocess (``--_one SPEC.json``)


def vm_hwm_mb() -> float | None:
    """This process's peak resident set size (VmHWM of /proc/self/status) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def child_main(spec_path: Path, work: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Body of a ``--_one`` subprocess: run ``work`` on the spec, write the result JSON it names.

    The result is ``work(spec)`` plus ``error`` (None, or the traceback when ``work`` raised) and
    ``vm_hwm_mb`` (:func:`vm_hwm_mb`). Returns the exit status: 1 when ``work`` raised, else 0.
    """
    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {"error": None}
    code = 0
    try:
        result.update(work(spec))
    except Exception as e:  # recorded by the parent, which goes on with the next job
        result["error"] = "".join(traceback.format_exception(e))
        code = 1
    result["vm_hwm_mb"] = vm_hwm_mb()
    write_atomic(Path(spec["result"]), json.dumps(result, default=str).encode())
    return code


def run_child(script: str, spec: dict[str, Any], tmp: Path, timeout: int) -> dict[str, Any]:
    """Run ``python <script> --_one SPEC.json`` (cwd the repository root) and return its result JSON.

    ``spec`` is written to ``tmp`` with ``spec["result"]`` set (in the caller's dict too) to the path
    the child writes its result to. A child that dies or runs past ``timeout`` seconds gives
    ``{"error": ...}`` alone. ``result["vm_hwm_mb"]`` is the child's own peak RSS: ``ru_maxrss`` from
    ``wait4`` is no use here, because a child started with vfork + exec inherits the parent's
    high-water mark (measured: a child peaking at 11 MB reports 826 MB under a parent holding 800 MB).
    """
    spec_path = tmp / f"spec_{time.monotonic_ns()}.json"
    spec["result"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(script).resolve()), "--_one", str(spec_path)]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, cwd=REPO_ROOT)
    try:
        why = f"exit status {proc.wait(timeout=timeout)}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        why = f"killed after the {timeout} s timeout"
    result_path = Path(spec["result"])
    if not result_path.is_file():
        return {"error": f"quantization subprocess died ({why}; out of memory?)"}
    return json.loads(result_path.read_text())


def choose_calib(folder: Path, size: int, seed: int) -> list[Path]:
    """A seeded sample of ``size`` images of ``folder`` (read recursively), in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    if size >= len(files):
        return files
    rng = np.random.default_rng(seed)
    return [files[i] for i in np.sort(rng.choice(len(files), size=size, replace=False))]


# ---------------------------------------------------------------------------------------------
# runs and outputs


@dataclass
class ModelRun:
    """Everything measured on one model (scripts subclass it with their own rows)."""

    name: str
    fp32_path: Path
    data: EvalSet
    reference_top1: float | None


RunT = TypeVar("RunT", bound=ModelRun)


def load_references(bench_dir: Path) -> dict[str, Any]:
    """The README's FP32 results by model (``<bench>/reference_fp32.json``); empty when absent."""
    path = bench_dir / "reference_fp32.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def now_iso() -> str:
    """The local time to the second, with its UTC offset: when a run started."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def exit_status(failed: list[str]) -> int:
    """1 after logging the ``failed`` rows, or 0 when there are none."""
    if failed:
        log(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def table_head(columns: Sequence[tuple[str, str]]) -> list[str]:
    """The first two lines of a fixed-width stdout table: the column names and a rule of dashes.

    ``columns`` are (name, format spec) pairs, e.g. ``("top-1", ">7")``; :func:`table_row` formats
    the cells with the same specs, so that they line up under the names.
    """
    head = " ".join(format(name, spec) for name, spec in columns)
    return [head, "-" * len(head)]


def table_row(columns: Sequence[tuple[str, str]], cells: Sequence[object]) -> str:
    """One line of a fixed-width table: each cell formatted with its column's spec, one space apart."""
    return " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, columns, strict=True))


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with the format ``spec``, or "-" for None."""
    return "-" if x is None else format(x, spec)


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies below it, else ``path`` as given."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def write_section(path: Path, text: str, section: str) -> None:
    """Put ``text`` in place of the marked ``section`` of the markdown file ``path``, atomically."""
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    write_atomic(path, merge_section(old, text, section).encode())


def results_doc(
    meta: dict[str, Any], runs: Sequence[RunT], body: Callable[[RunT], dict[str, Any]]
) -> dict[str, Any]:
    """The raw-results document: schema 1, ``meta`` (less ``json_rel``), then per model its eval
    size, README FP32 top-1 and ``body(run)``."""
    return {
        "schema": 1,
        **{k: v for k, v in meta.items() if k != "json_rel"},
        "models": {
            run.name: {
                "eval_images": int(len(run.data.y)),
                "reference_fp32_top1": run.reference_top1,
                **body(run),
            }
            for run in runs
        },
    }
