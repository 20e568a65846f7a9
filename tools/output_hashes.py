"""Record the sha256 of the CLI's output files on real models, and compare two such records.

Dev-only. Before a refactor that must not change what the tool writes, record the outputs of the
checkout as it is, record them again after the refactor, and compare: every (model, variant) must
come out byte-identical. From the repository root::

    python tools/output_hashes.py record --repo /tmp/snap --commit abc1234 --out before.json
    python tools/output_hashes.py record --repo . --out after.json
    python tools/output_hashes.py compare before.json after.json     # exit 1 if any output differs

``record`` runs ``<this interpreter> -m onnx_mixquant IN OUT <options>`` once per (model, variant),
one at a time by default (``--jobs N`` runs N at once), with the working directory ``--repo`` and
``PYTHONPATH=--repo``, so the package imported is the one in ``--repo`` (checked once, before the
runs, by importing it in a subprocess with the same settings). Each output goes to its own folder
under a temporary directory that is deleted at the end; every file in that folder (the model, its
external data files if any, anything else the run left there) is hashed, the model first, then the
rest sorted by relative path. The record also keeps the command, its exit status, its wall time, on
a non-zero exit the last line of its stderr (progress lines left out; where that leaves none, the
last line of its stdout, where the CLI reports a failed ``--min-sqnr`` gate), and the sha256 of
each model's input files and calibration data, so that ``compare`` can tell a changed input from a
changed output. At the end it notes the variants of a model that wrote identical files: the
options telling them apart went untested there.

Models: the three benchmark CNNs of ``--bench-dir`` (``models/<name>.onnx``; see its README.md) and
the zoo models of ``--zoo-dir`` (``<name>/model.onnx`` and ``<name>/calib/``, built by
``tools/zoo.py``). The CNNs' calibration data are a seeded sample of ``--bench-calib-size`` images of
the benchmark's calibration folder, preprocessed as the benchmark prescribes
(``tools/_bench_data.py``: ``choose_calib`` and ``PREPROCESS``) and written once as a folder of
``.npz`` files (key ``input``, batch 1) under ``--cache-dir``, outside the repository. Models that
are not there are skipped with a note. ``mpnet_base`` and ``smollm2`` are left out unless named in
``--models`` (minutes each on a 2-core machine).

==============  ================================================================================
variant         options after ``IN OUT`` (CALIB: the model's calibration folder; seed: default)
==============  ================================================================================
plain           (none)
t4              ``--calib CALIB --target-bits 4``
u4c             ``--uniform-bits 4 --calib CALIB``
t8              ``--calib CALIB --target-bits 8``
ro              ``--objective roundoff --target-bits 3``
brecq           ``--calib CALIB --method brecq --iters 30 --recon-samples 16 --recon-batch 8
                --bias-samples 16`` (benchmark CNNs only)
brecq_fisher    the same plus ``--fisher`` (benchmark CNNs only)
wo              ``--calib CALIB --weight-only --target-bits 4`` (benchmark CNNs only)
==============  ================================================================================

Validation stays at the CLI's default (on): it does not change the output file, but a refactor
that breaks it shows up as a changed exit status.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
SCHEMA = 1
CALIB = "$CALIB"  # placeholder in Variant.options for the model's calibration folder
BENCH_MODELS: tuple[str, ...] = ("resnet20_cifar10", "resnet56_cifar10", "efficientnet_lite0")
ZOO_DEFAULT: tuple[str, ...] = (
    "minilm_l6",
    "minilm_l3",
    "ddddocr_lstm",
    "rapidocr_det",
    "rapidocr_cls",
    "oww_hey_jarvis",
)
ZOO_SLOW: tuple[str, ...] = ("mpnet_base", "smollm2")
ALL_MODELS: tuple[str, ...] = (*BENCH_MODELS, *ZOO_DEFAULT, *ZOO_SLOW)
DEFAULT_TIMEOUT_S = 1800.0
BUF = 1 << 20


@dataclass(frozen=True)
class Variant:
    """One quantization command: its name, its options, and whether only the bench CNNs get it."""

    name: str
    options: tuple[str, ...]
    bench_only: bool = False


#: BRECQ kept small enough for a 2-core machine, yet with iterations enough that ``--fisher`` changes
#: the output of every bench CNN (at 20 iterations it did not on resnet20 or efficientnet_lite0).
BRECQ = (
    *("--calib", CALIB, "--method", "brecq"),
    *("--iters", "30", "--recon-samples", "16", "--recon-batch", "8", "--bias-samples", "16"),
)
VARIANTS: tuple[Variant, ...] = (
    Variant("plain", ()),
    Variant("t4", ("--calib", CALIB, "--target-bits", "4")),
    Variant("u4c", ("--uniform-bits", "4", "--calib", CALIB)),
    Variant("t8", ("--calib", CALIB, "--target-bits", "8")),
    Variant("ro", ("--objective", "roundoff", "--target-bits", "3")),
    Variant("brecq", BRECQ, bench_only=True),
    Variant("brecq_fisher", (*BRECQ, "--fisher"), bench_only=True),
    Variant("wo", ("--calib", CALIB, "--weight-only", "--target-bits", "4"), bench_only=True),
)
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)


@dataclass(frozen=True)
class Model:
    """A model found on disk: its FP32 file, its calibration folder and where it came from."""

    name: str
    source: str  # "bench" or "zoo"
    path: Path
    calib: Path

    @property
    def is_bench(self) -> bool:
        """Whether it is one of the benchmark CNNs (which get the BRECQ and weight-only variants too)."""
        return self.source == "bench"


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def now_iso() -> str:
    """The local time to the second, with its UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(BUF):
            h.update(chunk)
    return h.hexdigest()


def hash_files(files: Sequence[tuple[str, Path]]) -> tuple[list[dict[str, Any]], str]:
    """Per file ``{"path", "sha256", "bytes"}`` in the given order, and one digest over them all."""
    rows = [{"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in files]
    total = hashlib.sha256("".join(f"{r['path']}\0{r['sha256']}\n" for r in rows).encode())
    return rows, total.hexdigest()


def folder_files(folder: Path, first: str | None = None) -> list[tuple[str, Path]]:
    """Every file below ``folder`` as (relative path, path): ``first`` (when present), then sorted."""
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    head = [f for f in files if f[0] == first]
    return head + [f for f in files if f[0] != first]


def model_input_files(model: Path) -> list[tuple[str, Path]]:
    """The model file, then any ``<name>.*`` siblings (external data such as ``model.onnx.data``)."""
    extra = sorted(p for p in model.parent.glob(model.name + ".*") if p.is_file())
    return [(model.name, model), *((p.name, p) for p in extra)]


# ---------------------------------------------------------------------------------------------
# calibration data of the benchmark CNNs


#: The benchmark's dataset of each bench CNN (``tools/_bench_data.MODELS``, not imported for it).
BENCH_DATASETS: dict[str, str] = {
    "resnet20_cifar10": "cifar10",
    "resnet56_cifar10": "cifar10",
    "efficientnet_lite0": "imagenet",
}


def bench_calib(bench_dir: Path, name: str, size: int, cache_dir: Path) -> Path:
    """The folder of ``.npz`` calibration samples of bench model ``name``, built on first use.

    A seeded sample (seed 0) of ``size`` images of the model's calibration folder, chosen and
    preprocessed by ``tools/_bench_data.py``, in ``<cache>/calib/<dataset>_n<size>_seed0_<key>``; the
    key covers the chosen files, their sizes and the preprocessing version. A folder already there
    is used as it is, without importing ``_bench_data`` (which imports the checkout's package, in
    whatever state a refactor left it): delete the cache to rebuild it after the images change.
    """
    found = sorted((cache_dir / "calib").glob(f"{BENCH_DATASETS[name]}_n{size}_seed0_*"))
    found = [p for p in found if p.is_dir() and not p.name.startswith(".")]
    if len(found) == 1:
        return found[0]
    sys.path.insert(0, str(TOOLS))
    import _bench_data as bd  # needs Pillow; imports the checkout's package

    spec = bd.MODELS[name]
    folder = bench_dir / "data" / spec.dataset / "calib"
    files = bd.choose_calib(folder, size, 0)
    key_text = "\n".join(f"{p.relative_to(folder).as_posix()} {p.stat().st_size}" for p in files)
    key = hashlib.sha1(f"prep{bd.PREP_VERSION}\n{key_text}".encode()).hexdigest()[:12]
    target = cache_dir / "calib" / f"{spec.dataset}_n{size}_seed0_{key}"
    if target.is_dir():
        return target
    import numpy as np
    from PIL import Image

    log(f"  [{name}] writing {len(files)} calibration samples to {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for i, path in enumerate(files):
            with Image.open(path) as img:
                x = bd.PREPROCESS[spec.dataset](img)[None].astype(np.float32)
            np.savez(tmp / f"{i:04d}.npz", input=x)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def find_models(args: argparse.Namespace) -> tuple[list[Model], dict[str, str]]:
    """The requested models found on disk, and a note for each one skipped."""
    found: list[Model] = []
    skipped: dict[str, str] = {}
    for name in args.models:
        if name in BENCH_MODELS:
            path = args.bench_dir / "models" / f"{name}.onnx"
            if not path.is_file():
                skipped[name] = f"not found: {path}"
                continue
            try:
                calib = bench_calib(args.bench_dir, name, args.bench_calib_size, args.cache_dir)
            except (OSError, ValueError) as e:
                skipped[name] = f"no calibration data: {e}"
                continue
            found.append(Model(name, "bench", path, calib))
        else:
            path, calib = args.zoo_dir / name / "model.onnx", args.zoo_dir / name / "calib"
            if not path.is_file() or not calib.is_dir():
                skipped[name] = f"not found: {path} and {calib}/ (build it with tools/zoo.py)"
                continue
            found.append(Model(name, "zoo", path, calib))
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    return found, skipped


def model_inputs(model: Model) -> dict[str, Any]:
    """What a model's runs read: the paths and the digests of the model and calibration files."""
    model_rows, model_digest = hash_files(model_input_files(model.path))
    calib_files = folder_files(model.calib)
    _, calib_digest = hash_files(calib_files)
    return {
        "source": model.source,
        "model": str(model.path),
        "model_files": model_rows,
        "model_sha256": model_digest,
        "calib": str(model.calib),
        "calib_files": len(calib_files),
        "calib_sha256": calib_digest,
    }


# ---------------------------------------------------------------------------------------------
# record


def child_env(repo: Path) -> dict[str, str]:
    """This process's environment with ``PYTHONPATH`` set to ``repo`` alone."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)
    return env


PROBE = (
    "import json, platform, numpy, onnx, onnxruntime, onnx_mixquant\n"
    "print(json.dumps({'package_file': onnx_mixquant.__file__, 'onnx_mixquant': onnx_mixquant.__version__,"
    " 'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__,"
    " 'python': platform.python_version()}))\n"
)


def probe_package(repo: Path) -> dict[str, str]:
    """Import the package the runs will import (same interpreter, cwd and env); exit if not ``repo``'s."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=repo, env=child_env(repo), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"cannot import onnx_mixquant from {repo}:\n{out.stderr}")
    facts: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"onnx_mixquant.__file__ = {facts['package_file']}")
    if not Path(facts["package_file"]).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"the runs would import onnx_mixquant from {facts['package_file']}, not from {repo}")
    return facts


def git_commit(repo: Path) -> str | None:
    """``repo``'s short HEAD commit, ``+changes`` when its package differs from it; None outside git."""
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        if Path(top).resolve() != repo.resolve():
            return None  # a folder inside some other checkout (e.g. a snapshot under a repository)
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "onnx_mixquant"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


#: The quantization subprocesses running now (each in its own process group), killed on an interrupt.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group of ``proc`` (the CLI and anything it started), if it is still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_live() -> None:
    """Kill every quantization subprocess still running."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        _kill(proc)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so the subprocesses are killed and the temp folder goes."""
    raise KeyboardInterrupt(f"signal {signum}")


#: A progress line of the CLI on a stderr that is not a terminal ("onnx-mixquant: validate 1/24").
PROGRESS = re.compile(r"onnx-mixquant: .* \d+/\d+")


def last_line(data: bytes, skip: re.Pattern[str] | None = None) -> str | None:
    """The last non-blank line of a child's output, leaving out lines that ``skip`` matches in full."""
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    kept = [ln for ln in lines if skip is None or not skip.fullmatch(ln)]
    return kept[-1] if kept else None


def run_one(model: Model, variant: Variant, repo: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    """Quantize ``model`` with ``variant`` into a fresh folder under ``work`` and hash what it wrote."""
    out_dir = work / model.name / variant.name
    out_dir.mkdir(parents=True)
    out = out_dir / "model.onnx"
    options = [str(model.calib) if opt == CALIB else opt for opt in variant.options]
    cmd = [sys.executable, "-m", "onnx_mixquant", str(model.path), str(out), *options]
    shown = shlex.join(["python", "-m", "onnx_mixquant", str(model.path), "$OUT/model.onnx", *options])
    log(f"[{model.name} / {variant.name}] {shown}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=child_env(repo),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        out_text, err = proc.communicate(timeout=timeout_s)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        out_text, err = proc.communicate()
        code = "timeout"
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    seconds = round(time.perf_counter() - t0, 2)
    rows, digest = hash_files(folder_files(out_dir, first="model.onnx"))
    record: dict[str, Any] = {
        "model": model.name,
        "variant": variant.name,
        "options": list(variant.options),
        "command": shown,
        "exit_code": code,
        "wall_s": seconds,
        "files": rows,
        "sha256": digest if rows else None,
        "error": None,
        "stdout_last": None,
    }
    if code != 0:
        record["stdout_last"] = last_line(out_text)
        record["error"] = (
            last_line(err, skip=PROGRESS) or record["stdout_last"] or last_line(err) or f"exit status {code}"
        )
    status = "ok" if code == 0 else f"FAILED ({code}): {record['error']}"
    log(f"[{model.name} / {variant.name}] {status}, {seconds:.1f} s, {digest[:16] if rows else 'no files'}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


def identical_variants(runs: Sequence[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Per model, the groups of successful variants that wrote byte-identical files.

    A group means the options that tell them apart did not change the output here (e.g. ``--fisher``
    with too few BRECQ iterations to flip a rounding), so the record does not cover that option.
    """
    by_model: dict[str, dict[str, list[str]]] = {}
    for r in runs:
        if r["exit_code"] == 0 and r["sha256"]:
            by_model.setdefault(r["model"], {}).setdefault(r["sha256"], []).append(r["variant"])
    found = {m: [g for g in groups.values() if len(g) > 1] for m, groups in by_model.items()}
    return {m: groups for m, groups in found.items() if groups}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` through a temporary file renamed over it (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def record_main(args: argparse.Namespace) -> int:
    """``record``: run every (model, variant), write the JSON; exit 1 if any run failed.

    The JSON is rewritten after every run with ``"complete": false``, so an interrupted record keeps
    the runs it finished (``compare`` warns about such a record); the last write sets it true.
    """
    signal.signal(signal.SIGTERM, _terminate)
    repo: Path = args.repo.resolve()
    t_start = time.perf_counter()
    facts = probe_package(repo)
    models, skipped = find_models(args)
    wanted = [v for v in VARIANTS if v.name in args.variants]
    jobs = [(m, v) for m in models for v in wanted if m.is_bench or not v.bench_only]
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "about": "sha256 of onnx_mixquant's output files per (model, variant); see tools/output_hashes.py",
        "invocation": shlex.join(["python", "tools/output_hashes.py", *sys.argv[1:]]),
        "repo": str(repo),
        "commit": git_commit(repo) or args.commit,
        "started": now_iso(),
        "complete": False,
        "wall_s": None,
        "jobs": args.jobs,
        "machine": {
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(),
            "executable": sys.executable,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "loadavg_end": None,
        },
        "versions": facts,
        "bench_calib_size": args.bench_calib_size,
        "models": {m.name: model_inputs(m) for m in models},
        "skipped": skipped,
        "identical_variants": {},
        "runs": runs,
    }

    def save(complete: bool) -> None:
        doc.update(complete=complete, wall_s=round(time.perf_counter() - t_start, 1))
        doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        doc["identical_variants"] = identical_variants(runs)
        write_json(args.out, doc)

    log(f"{len(jobs)} runs on {len(models)} models, {args.jobs} at a time")
    with tempfile.TemporaryDirectory(prefix="output_hashes.") as tmp:
        work = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, m, v, repo, work, args.timeout) for m, v in jobs]
            try:
                for f in futures:
                    runs.append(f.result())
                    save(complete=False)
            except BaseException:  # Ctrl-C or SIGTERM: stop, do not wait for the remaining runs
                for f in futures:
                    f.cancel()
                _kill_live()
                save(complete=False)
                log(f"kept the {len(runs)} finished runs of {len(jobs)} in {args.out}")
                raise
    save(complete=True)
    for name, groups in doc["identical_variants"].items():
        for group in groups:
            log(f"note: {name}: variants {', '.join(group)} wrote identical files")
    failed = [f"{r['model']}/{r['variant']}" for r in runs if r["exit_code"] != 0]
    log(f"wrote {args.out}: {len(runs)} runs in {doc['wall_s']:.0f} s")
    if failed:
        log(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# compare


def _cell(run: dict[str, Any] | None, key: str) -> str:
    """A run's ``key`` as text for the comparison table, "-" where the run is missing."""
    return "-" if run is None else str(run[key])


def compare_main(args: argparse.Namespace) -> int:
    """``compare``: one line per (model, variant) of either record; exit 1 on a difference."""
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    runs_a = {(r["model"], r["variant"]): r for r in a["runs"]}
    runs_b = {(r["model"], r["variant"]): r for r in b["runs"]}
    keys = list(runs_a) + [k for k in runs_b if k not in runs_a]
    print(f"A: {args.a} (commit {a.get('commit')}, {a.get('wall_s')} s)")
    print(f"B: {args.b} (commit {b.get('commit')}, {b.get('wall_s')} s)")
    for label, doc in (("A", a), ("B", b)):
        if not doc.get("complete", True):
            print(f"note: {label} is an interrupted record (its missing runs never ran)")
    for what in ("onnx", "onnxruntime", "numpy", "python"):
        va, vb = a.get("versions", {}).get(what), b.get("versions", {}).get(what)
        if va != vb:
            print(f"note: {what} {va} in A, {vb} in B")
    for name in sorted(set(a.get("models", {})) & set(b.get("models", {}))):
        ma, mb = a["models"][name], b["models"][name]
        for field in ("model_sha256", "calib_sha256"):
            if ma.get(field) != mb.get(field):
                print(f"note: {name}: the {field.removesuffix('_sha256')} input differs between A and B")
    head = f"{'model':<20} {'variant':<13} {'status':<9} {'exit A':>6} {'exit B':>6} {'s A':>7} {'s B':>7}"
    head += "  note"
    print()
    print(head)
    print("-" * len(head))
    n_diff = n_missing = 0
    for key in keys:
        ra, rb = runs_a.get(key), runs_b.get(key)
        note = ""
        if ra is None or rb is None:
            status, n_missing = "missing", n_missing + 1
            note = "not in " + ("A" if ra is None else "B")
        elif ra["exit_code"] != rb["exit_code"] or ra["sha256"] != rb["sha256"]:
            status, n_diff = "DIFFERENT", n_diff + 1
            names_a = {f["path"]: f["sha256"] for f in ra["files"]}
            names_b = {f["path"]: f["sha256"] for f in rb["files"]}
            changed = sorted(p for p in names_a.keys() | names_b.keys() if names_a.get(p) != names_b.get(p))
            note = "files: " + ", ".join(changed) if changed else "exit status"
        else:
            status = "same"
            if ra["exit_code"] != 0:
                note = "failed in both: " + str(rb["error"])
        if ra is not None and rb is not None and ra.get("options") != rb.get("options"):
            note = (note + "; " if note else "") + "options differ"

        print(
            f"{key[0]:<20} {key[1]:<13} {status:<9} {_cell(ra, 'exit_code'):>6} {_cell(rb, 'exit_code'):>6} "
            f"{_cell(ra, 'wall_s'):>7} {_cell(rb, 'wall_s'):>7}  {note}".rstrip()
        )
    print()
    print(f"{len(keys)} runs: {len(keys) - n_diff - n_missing} same, {n_diff} different, {n_missing} missing")
    return 1 if n_diff or (n_missing and not args.allow_missing) else 0


# ---------------------------------------------------------------------------------------------
# command line


def split_names(text: str, allowed: Sequence[str], what: str, p: argparse.ArgumentParser) -> list[str]:
    """The names of a comma list, in the order given; ``p.error`` at the first one not allowed."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for bad in [n for n in names if n not in allowed]:
        p.error(f"unknown {what} {bad!r}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The ``record`` / ``compare`` command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the quantization commands and write the hashes")
    r.add_argument("--repo", type=Path, required=True, help="checkout whose onnx_mixquant is run")
    r.add_argument("--out", type=Path, required=True, help="JSON file to write")
    r.add_argument("--commit", help="commit text to record when --repo is not a git checkout")
    r.add_argument("--models", help=f"comma list (default: all but {', '.join(ZOO_SLOW)})")
    r.add_argument("--variants", help=f"comma list (default: all: {', '.join(VARIANT_NAMES)})")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    r.add_argument("--bench-dir", type=Path, default=Path("/work/shared/bench"))
    r.add_argument(
        "--zoo-dir",
        type=Path,
        default=Path(os.environ.get("MIXQUANT_ZOO", Path.home() / ".cache" / "onnx-mixquant-zoo")),
        help="zoo cache (default $MIXQUANT_ZOO or ~/.cache/onnx-mixquant-zoo)",
    )
    r.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "onnx-mixquant-hashes",
        help="where the bench CNNs' calibration .npz folders are kept",
    )
    r.add_argument("--bench-calib-size", type=int, default=64, help="calibration images per bench CNN")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per run")
    c = sub.add_parser("compare", help="compare two records; exit 1 if any output differs")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--allow-missing", action="store_true", help="exit 0 when runs are only missing")
    args = p.parse_args(argv)
    if args.cmd == "record":
        default = ",".join((*BENCH_MODELS, *ZOO_DEFAULT))
        args.models = split_names(args.models or default, ALL_MODELS, "model", r)
        args.variants = split_names(args.variants or ",".join(VARIANT_NAMES), VARIANT_NAMES, "variant", r)
        if args.jobs < 1:
            r.error("--jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return record_main(args) if args.cmd == "record" else compare_main(args)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}): runs killed")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
