"""Zoo benchmark: onnx-mixquant and onnxruntime's quantizers on the real models of shared/zoo/SOURCES.md.

Dev-only. Builds each requested model with the builders of ``tools/_zoo_text.py`` and
``tools/_zoo_vision.py`` (into the zoo cache, ``_zoo_common.cache_dir()``, outside the repository),
quantizes it once per variant in a subprocess, one at a time, scores the FP32 model and every output
with the model's own ``score``, and keeps one JSON record per model x variant in
``benchmarks/zoo.json`` (written after every step, so a crash loses nothing and a rerun of a subset
replaces only its own records). At the end, or alone with ``--render``, the section between
``<!-- zoo:begin -->`` and ``<!-- zoo:end -->`` of BENCHMARKS.md is rewritten from that file.

Usage::

    python tools/zoo.py [--models a,b] [--variants v1,v2] [--out benchmarks/zoo.json] [--render]

Each quantization runs as ``python -m onnx_mixquant IN OUT ...`` (the checkout's package: the child's
working directory is the repository root) or, for onnxruntime's quantizers, as this script's hidden
``--_peer`` mode, with the same interpreter. Outputs go to ``<cache>/out/<model>/<variant>.onnx``,
with the child's stdout and stderr beside them.

Peak RSS of a child: its kernel high-water mark (``VmHWM`` of ``/proc/PID/status``, which exec resets,
so it is the child's own), read every 0.1 s while it runs, plus the current RSS of any descendants
(psutil). Only a rise in the last 0.1 s before exit can be missed. ``wait4``'s ``ru_maxrss`` is no use:
a child started with vfork + exec inherits the parent's high-water mark (see ``_bench_data.run_child``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from _zoo_common import ZooModel, cache_dir  # noqa: E402

#: The builder modules and the models each one provides, in the order of SOURCES.md.
BUILDER_MODULES: dict[str, tuple[str, ...]] = {
    "_zoo_text": ("minilm_l6", "minilm_l3", "mpnet_base", "smollm2"),
    "_zoo_vision": ("ddddocr_lstm", "rapidocr_det", "rapidocr_cls", "oww_hey_jarvis"),
}
MODEL_ORDER: tuple[str, ...] = tuple(name for names in BUILDER_MODULES.values() for name in names)
#: Kinds onnxruntime's static QDQ quantizer is run on (the transformers get dynamic int8 only).
CNN_KINDS = frozenset({"cnn", "lstm", "wakeword"})
FP32 = "fp32"
CALIB = "{calib}"  # placeholder in Variant.options for the model's calibration folder
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "zoo.json"
DEFAULT_MARKDOWN = REPO_ROOT / "BENCHMARKS.md"
DEFAULT_TIMEOUT_MIN = 40.0
POLL_S = 0.1
SCHEMA = 1


@dataclass(frozen=True)
class Variant:
    """One column of the benchmark: a quantizer command.

    Attributes:
        name: the column name.
        summary: what it is, for the legend.
        options: onnx-mixquant options after ``IN OUT`` (``CALIB`` stands for the calibration folder).
        peer: "dynamic" or "static" for onnxruntime's quantizer (run by ``--_peer``); None for the CLI.
        kinds: the model kinds it applies to; None for all.
    """

    name: str
    summary: str
    options: tuple[str, ...] = ()
    peer: str | None = None
    kinds: frozenset[str] | None = None

    def applies_to(self, kind: str) -> bool:
        """Whether this variant is run on a model of ``kind``."""
        return self.kinds is None or kind in self.kinds

    @property
    def needs_calib(self) -> bool:
        """Whether the command reads the model's calibration folder."""
        return self.peer == "static" or CALIB in self.options


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain", "`onnx-mixquant IN OUT`, no flag (4-bit weight-only default)"),
        Variant("t8", "`--calib CALIB --target-bits 8`", ("--calib", CALIB, "--target-bits", "8")),
        Variant("t4", "`--calib CALIB --target-bits 4`", ("--calib", CALIB, "--target-bits", "4")),
        Variant("t3", "`--calib CALIB --target-bits 3`", ("--calib", CALIB, "--target-bits", "3")),
        Variant("u4c", "`--uniform-bits 4 --calib CALIB`", ("--uniform-bits", "4", "--calib", CALIB)),
        Variant("u4", "`--uniform-bits 4`, no data (the size reference of plain)", ("--uniform-bits", "4")),
        Variant("w8", "`--target-bits 8`, no data (the reference of t8)", ("--target-bits", "8")),
        Variant(
            "t8w",
            "`--calib CALIB --target-bits 8 --weight-only`",
            ("--calib", CALIB, "--target-bits", "8", "--weight-only"),
        ),
        Variant(
            "t4w",
            "`--calib CALIB --target-bits 4 --weight-only`",
            ("--calib", CALIB, "--target-bits", "4", "--weight-only"),
        ),
        Variant(
            "ort_dynamic",
            "onnxruntime `quantize_dynamic` (int8 weights, per_channel False, default options)",
            peer="dynamic",
        ),
        Variant(
            "ort_static",
            "onnxruntime `quantize_static`, QDQ W8A8 (int8, MinMax, per_channel False) over the "
            "calibration files; models below opset 13 are converted to 13 first; CNN kinds only",
            peer="static",
            kinds=CNN_KINDS,
        ),
    )
}


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def bench_data() -> ModuleType:
    """``tools/_bench_data.py``, imported on first use: it imports onnx_mixquant (and torch), which the
    ``--_peer`` child must not carry (it would inflate the peers' peak RSS by ~250 MB)."""
    return importlib.import_module("_bench_data")


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# models


def load_builders(wanted: Iterable[str]) -> tuple[dict[str, Callable[[Path], ZooModel]], dict[str, str]]:
    """The builders of the ``wanted`` models, and why the others cannot be built (by model name).

    A builder module is imported only when one of its models is wanted; one that is missing or fails
    to import disables its own models only.
    """
    wanted = set(wanted)
    builders: dict[str, Callable[[Path], ZooModel]] = {}
    disabled: dict[str, str] = {}
    for module_name, names in BUILDER_MODULES.items():
        if not wanted & set(names):
            continue
        try:
            module = importlib.import_module(module_name)
            models: dict[str, Callable[[Path], ZooModel]] = module.MODELS
        except Exception as e:  # a half-written or broken builder must not stop the other group
            why = f"tools/{module_name}.py unusable ({type(e).__name__}: {one_line(str(e), 200)})"
            disabled.update({name: why for name in names})
            continue
        builders.update(models)
        disabled.update({n: f"tools/{module_name}.py has no MODELS[{n!r}]" for n in names if n not in models})
    return builders, disabled


def model_files(path: Path) -> list[Path]:
    """``path`` and the external-data files its tensors point to (graphs and subgraphs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: list[Path] = [path]
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is not None and path.parent / location not in found:
                found.append(path.parent / location)
    return found


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an onnx ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def total_bytes(path: Path) -> int:
    """Bytes of an ONNX file and its external data."""
    return sum(p.stat().st_size for p in model_files(path))


def input_names(path: Path) -> list[str]:
    """The graph inputs of an ONNX file that are not initializers."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


# ---------------------------------------------------------------------------------------------
# subprocesses


@dataclass
class ChildResult:
    """How a quantizer subprocess ended."""

    exit_code: int | None  # None: killed at the timeout
    seconds: float
    peak_rss_mb: float
    last_stderr: str
    notes: list[str] = field(default_factory=list)


def _vm_hwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of process ``pid`` in MB; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _descendants_rss_mb(pid: int) -> float:
    """Current RSS of the descendants of ``pid`` in MB (0 without psutil)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
    except psutil.Error:
        return 0.0
    return total / 2**20


def run_child(cmd: Sequence[str], log_stem: Path, timeout_s: float) -> ChildResult:
    """Run ``cmd`` (cwd the repository root, its own process group), polling its peak RSS.

    stdout and stderr go to ``<log_stem>.stdout.log`` / ``.stderr.log``. Past ``timeout_s`` the whole
    group is killed and ``exit_code`` is None. Lines ``zoo-note: TEXT`` on stderr become ``notes``.
    """
    out_log, err_log = log_stem.with_suffix(".stdout.log"), log_stem.with_suffix(".stderr.log")
    peak = 0.0
    t0 = time.perf_counter()
    with out_log.open("wb") as out, err_log.open("wb") as err:
        proc = subprocess.Popen(
            list(cmd), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        code: int | None = None
        while code is None:
            peak = max(peak, _vm_hwm_mb(proc.pid) + _descendants_rss_mb(proc.pid))
            try:
                code = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 > timeout_s:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
    seconds = time.perf_counter() - t0
    lines = [ln.strip() for ln in err_log.read_text(errors="replace").splitlines() if ln.strip()]
    notes = [ln.removeprefix("zoo-note:").strip() for ln in lines if ln.startswith("zoo-note:")]
    return ChildResult(code, seconds, peak, lines[-1] if lines else "", notes)


def variant_command(variant: Variant, model: ZooModel, out: Path) -> list[str]:
    """The subprocess command of ``variant`` quantizing ``model`` into ``out``."""
    if variant.peer is not None:
        calib = ["--calib", str(model.calib)] if variant.needs_calib else []
        script = str(Path(__file__).resolve())
        return [sys.executable, script, "--_peer", variant.peer, str(model.model), str(out), *calib]
    options = [str(model.calib) if opt == CALIB else opt for opt in variant.options]
    return [sys.executable, "-m", "onnx_mixquant", str(model.model), str(out), *options]


def shown_command(cmd: Sequence[str], cache: Path) -> str:
    """``cmd`` as recorded: ``python`` for the interpreter, cache paths as ``$ZOO/...``."""
    return shlex.join(["python", *cmd[1:]]).replace(str(cache), "$ZOO").replace(str(REPO_ROOT) + "/", "")


def failure_message(result: ChildResult, timeout_s: float) -> str | None:
    """Why a quantizer child failed, or None when it exited 0."""
    if result.exit_code is None:
        return f"timed out after {timeout_s:.0f} s (killed)"
    if result.exit_code < 0:
        name = signal.Signals(-result.exit_code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    if result.exit_code != 0:
        return f"exit {result.exit_code}: {one_line(result.last_stderr) or '(no stderr)'}"
    return None


# ---------------------------------------------------------------------------------------------
# onnxruntime peers (the ``--_peer`` child)


def _npz_reader(folder: Path, names: list[str]) -> Any:
    """An onnxruntime CalibrationDataReader over the ``.npz`` files of ``folder`` (one sample each)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {folder}")

    class NpzReader(CalibrationDataReader):
        """Feeds one ``.npz`` file per call, arrays keyed by the model's input names."""

        def __init__(self) -> None:
            self._next = iter(files)

        def get_next(self) -> dict[str, Any] | None:
            path = next(self._next, None)
            if path is None:
                return None
            with np.load(path) as z:
                missing = [n for n in names if n not in z.files]
                if missing:
                    raise KeyError(f"{path.name} lacks model input(s) {missing} (has {z.files})")
                return {n: z[n] for n in names}

    return NpzReader()


def _opset13(model_path: Path, tmp: Path) -> Path:
    """``model_path`` converted to opset 13 when its default-domain opset is lower (QDQ needs 13 for
    per-axis scales and onnxruntime recommends it); the original when not needed or not convertible."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(model_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13:
        return model_path
    try:
        converted = version_converter.convert_version(model, 13)
    except Exception as e:  # recorded as a note; quantize the model as shipped
        print(
            f"zoo-note: opset {opset} kept: conversion to 13 failed ({one_line(str(e), 150)})",
            file=sys.stderr,
        )
        return model_path
    onnx.save(converted, str(tmp))
    print(f"zoo-note: converted opset {opset} -> 13 before quantize_static", file=sys.stderr)
    return tmp


def peer_main(argv: Sequence[str]) -> int:
    """``--_peer dynamic|static IN OUT [--calib DIR]``: run one onnxruntime quantizer.

    Exits 1 on any error, its one-line message the last line on stderr.
    """
    p = argparse.ArgumentParser(prog="zoo.py --_peer")
    p.add_argument("method", choices=("dynamic", "static"))
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calib", type=Path)
    args = p.parse_args(argv)
    try:
        from onnxruntime.quantization import quantize_dynamic, quantize_static

        if args.method == "dynamic":
            quantize_dynamic(args.model, args.out)
        else:
            if args.calib is None:
                raise ValueError("--_peer static needs --calib")
            source = _opset13(args.model, args.out.with_suffix(".opset13.onnx"))
            quantize_static(source, args.out, _npz_reader(args.calib, input_names(args.model)))
    except Exception as e:  # the parent records the message; the traceback stays in the log
        traceback.print_exc()
        print(f"{type(e).__name__}: {one_line(str(e))}", file=sys.stderr)
        return 1
    finally:
        args.out.with_suffix(".opset13.onnx").unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class RunContext:
    """What every record of one run shares."""

    invocation: str
    date: str
    commit: str | None
    machine: str
    cache: Path
    json_path: Path
    timeout_s: float


def base_record(model: ZooModel, variant: str, ctx: RunContext) -> dict[str, Any]:
    """A record's identity and provenance, with the measurements empty."""
    return {
        "model": model.name,
        "variant": variant,
        "kind": model.kind,
        "metric": model.metric,
        "higher_is_better": model.higher_is_better,
        "command": None,
        "exit_code": None,
        "seconds": None,
        "peak_rss_mb": None,
        "output_bytes": None,
        "size_ratio": None,
        "scores": None,
        "score_seconds": None,
        "error": None,
        "notes": [],
        "invocation": ctx.invocation,
        "commit": ctx.commit,
        "date": ctx.date,
        "machine": ctx.machine,
    }


def _sort_key(record: dict[str, Any]) -> tuple[int, str, int, str]:
    m, v = record["model"], record["variant"]
    variants = [FP32, *VARIANTS]
    return (
        MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER),
        m,
        variants.index(v) if v in variants else len(variants),
        v,
    )


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of the results file; empty when it does not exist yet."""
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: schema {doc.get('schema')!r}, this script writes {SCHEMA}")
    records: list[dict[str, Any]] = doc["records"]
    return records


def store(path: Path, record: dict[str, Any]) -> None:
    """Put ``record`` into the results file in place of the one of the same model and variant."""
    key = (record["model"], record["variant"])
    records = [r for r in load_records(path) if (r["model"], r["variant"]) != key] + [record]
    doc = {
        "schema": SCHEMA,
        "about": "tools/zoo.py: one record per model x variant; models and data: shared/zoo/SOURCES.md",
        "records": sorted(records, key=_sort_key),
    }
    bench_data().write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def score_into(record: dict[str, Any], model: ZooModel, path: Path, ctx: RunContext) -> None:
    """Score ``path`` with the model's metric into ``record`` and store it (errors recorded)."""
    record["error"] = "scoring did not finish (runner died?)"
    store(ctx.json_path, record)
    t0 = time.perf_counter()
    try:
        record["scores"] = {k: float(v) for k, v in model.score(path).items()}
        record["error"] = None
    except Exception as e:  # a variant the scorer cannot run is a result too
        log(traceback.format_exc())
        record["error"] = f"score failed: {type(e).__name__}: {one_line(str(e))}"
    record["score_seconds"] = round(time.perf_counter() - t0, 2)
    store(ctx.json_path, record)


def run_fp32(model: ZooModel, ctx: RunContext) -> dict[str, Any]:
    """The FP32 model's record: its score and size."""
    record = base_record(model, FP32, ctx)
    record["output_bytes"] = total_bytes(model.model)
    record["size_ratio"] = 1.0
    log(f"[{model.name}] scoring FP32 {model.model}")
    score_into(record, model, model.model, ctx)
    return record


def run_variant(model: ZooModel, variant: Variant, ctx: RunContext) -> dict[str, Any]:
    """Quantize ``model`` with ``variant`` in a subprocess, score the output, store the record."""
    out_dir = ctx.cache / "out" / model.name
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{variant.name}.onnx"
    for stale in out_dir.glob(f"{variant.name}.onnx*"):  # the model and its external data
        stale.unlink()
    cmd = variant_command(variant, model, out)
    record = base_record(model, variant.name, ctx)
    record["command"] = shown_command(cmd, ctx.cache)
    log(f"[{model.name}] {variant.name}: {record['command']}")
    result = run_child(cmd, out_dir / variant.name, ctx.timeout_s)
    record.update(
        exit_code=result.exit_code,
        seconds=round(result.seconds, 2),
        peak_rss_mb=round(result.peak_rss_mb, 1),
        notes=result.notes,
        error=failure_message(result, ctx.timeout_s),
    )
    if record["error"] is None and not out.is_file():
        record["error"] = f"exit 0 but no output file {out.name}"
    log(
        f"[{model.name}] {variant.name}: exit {result.exit_code}, {result.seconds:.1f} s, "
        f"peak RSS {result.peak_rss_mb:.0f} MB" + (f": {record['error']}" if record["error"] else "")
    )
    if record["error"] is not None:
        store(ctx.json_path, record)
        return record
    record["output_bytes"] = total_bytes(out)
    record["size_ratio"] = round(record["output_bytes"] / total_bytes(model.model), 4)
    score_into(record, model, out, ctx)
    log(f"[{model.name}] {variant.name}: {record['scores']} (size {record['size_ratio']:.3f})")
    return record


# ---------------------------------------------------------------------------------------------
# markdown


def fmt_value(x: float) -> str:
    """A metric value: thousands separators from 1000, two decimals from 1, else four."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4f}"


def cell(record: dict[str, Any] | None, variant: str, kind: str) -> str:
    """A table cell: ``metric[, cos C] (size ratio)``, the failure in brief, "n/a" for a variant that
    does not apply to a model of ``kind``, or "-" when not run."""
    if record is None:
        return "-" if variant == FP32 or VARIANTS[variant].applies_to(kind) else "n/a"
    scores = record.get("scores")
    if not scores:
        error = record.get("error") or "no score"
        if error.startswith("exit ") or error.startswith("killed"):
            return error.split(":")[0]
        return "timeout" if error.startswith("timed out") else "failed"
    text = fmt_value(scores[record["metric"]]) if record["metric"] in scores else "?"
    if "cosine" in scores and variant != FP32:
        text += f", cos {scores['cosine']:.3f}"
    if record.get("size_ratio") is not None and variant != FP32:
        text += f" ({record['size_ratio']:.2f})"
    return text


def cost_cell(record: dict[str, Any] | None) -> str:
    """Wall seconds and peak RSS of a quantizer run, or "-"."""
    if record is None or record.get("seconds") is None:
        return "-"
    rss = record.get("peak_rss_mb")
    mem = "-" if rss is None else (f"{rss / 1024:.1f} GB" if rss >= 1024 else f"{rss:.0f} MB")
    return f"{record['seconds']:.0f} s, {mem}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (tabulate)."""
    from tabulate import tabulate

    return str(tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True))


def _runs_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One legend line per run (invocation and date) that left records, with its commit and machine."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        runs.setdefault((r["invocation"], r["date"]), []).append(r)
    lines = []
    for (invocation, date), rs in sorted(runs.items(), key=lambda kv: kv[0][1]):
        models = ", ".join(dict.fromkeys(r["model"] for r in rs))
        lines.append(
            f"- `{invocation}` on {date} ({len(rs)} records: {models}). Machine: {rs[0]['machine']}."
        )
    return lines


def render_section(records: Sequence[dict[str, Any]], json_rel: str) -> str:
    """The zoo section of BENCHMARKS.md, markers included."""
    models = list(dict.fromkeys(r["model"] for r in records))
    by_key = {(r["model"], r["variant"]): r for r in records}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    meta = {r["model"]: r for r in records}
    legend = [f"- **{v}**: {VARIANTS[v].summary}" for v in variants]
    head = ["model (metric)", "FP32", *variants]
    rows = []
    for m in models:
        arrow = "" if meta[m]["higher_is_better"] else ", lower is better"
        cells = [cell(by_key.get((m, v)), v, meta[m]["kind"]) for v in (FP32, *variants)]
        rows.append([f"{m} ({meta[m]['metric']}{arrow})", *cells])
    costs = [[m] + [cost_cell(by_key.get((m, v))) for v in variants] for m in models]
    failures = [
        f"- {r['model']} / {r['variant']}: {r['error']}" + (f" (`{r['command']}`)" if r["command"] else "")
        for r in records
        if r.get("error")
    ]
    notes = [f"- {r['model']} / {r['variant']}: {n}" for r in records for n in r.get("notes") or []]
    parts = [
        BEGIN,
        "## Real models (zoo): onnx-mixquant against onnxruntime's quantizers",
        "",
        "Models, their data and metrics: `shared/zoo/SOURCES.md`. They are built from registry packages "
        "by `tools/_zoo_text.py` and `tools/_zoo_vision.py` into a cache outside the repository "
        "(`$MIXQUANT_ZOO`, default `~/.cache/onnx-mixquant-zoo`) and never committed. Raw results: "
        f"`{json_rel}`. Each quantizer ran alone in a subprocess of the same interpreter.",
        "",
        "Produced by (a rerun of a subset replaces only its own records):",
        "",
        *_runs_lines(records),
        "",
        "Variants (CALIB: the model's calibration folder of `.npz` files):",
        "",
        *legend,
        "",
        "Cells: the metric on the held-out data, then (output file / FP32 file, external data "
        "included); `cos`: mean cosine of the embeddings to FP32's. `exit N`, `timeout`, `failed`: "
        "see the list of failures; `-`: not run; `n/a`: not applicable (ort_static runs on CNN kinds only).",
        "",
        markdown_table(head, rows),
        "",
        "Quantizer wall time and peak RSS (VmHWM of the subprocess, polled every 0.1 s):",
        "",
        markdown_table(["model", *variants], costs),
        "",
        "Failures:" if failures else "Failures: none.",
        *([""] + failures if failures else []),
        *(["", "Notes:", "", *notes] if notes else []),
        END,
    ]
    return "\n".join(parts)


def _intro_end(lines: list[str]) -> int:
    """Index of the line after the first heading and the plain paragraph right below it, if any."""
    first = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), -1)
    at = first + 1
    k = at
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k < len(lines) and not lines[k].lstrip().startswith(("#", "<!--", "|", "```")):
        while k < len(lines) and lines[k].strip():
            k += 1
        at = k
    return at


def put_section(doc: str | None, section: str) -> str:
    """``doc`` with its zoo section replaced by ``section``, or inserted after its heading and intro."""
    if doc is None:
        return f"# Benchmarks\n\n{section}\n"
    begin, end = doc.find(BEGIN), doc.find(END)
    if 0 <= begin < end:
        return doc[:begin] + section + doc[end + len(END) :]
    lines = doc.splitlines(keepends=True)
    at = _intro_end(lines)
    head, tail = "".join(lines[:at]).rstrip("\n"), "".join(lines[at:]).lstrip("\n")
    return (head + "\n\n" if head else "") + section + ("\n\n" + tail if tail else "\n")


def render(json_path: Path, markdown: Path) -> None:
    """Rewrite the zoo section of ``markdown`` from the records of ``json_path``."""
    records = load_records(json_path)
    if not records:
        raise SystemExit(f"{json_path}: no records to render")
    bd = bench_data()
    section = render_section(records, bd.relative_path(json_path, REPO_ROOT))
    old = markdown.read_text(encoding="utf-8") if markdown.is_file() else None
    bd.write_atomic(markdown, put_section(old, section).encode())
    log(f"wrote the zoo section of {markdown} ({len(records)} records)")


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The runner's options (``--_peer`` is dispatched before this)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help=f"comma list (default: all of {', '.join(MODEL_ORDER)})")
    p.add_argument(
        "--variants",
        help=f"comma list of {FP32}, {', '.join(VARIANTS)} (default: all; FP32 is also scored when the "
        "results file has no FP32 record of a model)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_JSON, help="results JSON (default benchmarks/zoo.json)"
    )
    p.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="default BENCHMARKS.md")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown section from --out")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_MIN, help="minutes per variant (default 40)"
    )
    args = p.parse_args(argv)
    if args.render and (args.models or args.variants):
        p.error("--render rewrites the markdown from --out alone; it takes no --models or --variants")
    split = bench_data().split_list
    args.models = split(args.models) if args.models else list(MODEL_ORDER)
    args.variants = split(args.variants) if args.variants else [FP32, *VARIANTS]
    for bad in [m for m in args.models if m not in MODEL_ORDER]:
        p.error(f"unknown model {bad!r}; choose from {', '.join(MODEL_ORDER)}")
    for bad in [v for v in args.variants if v != FP32 and v not in VARIANTS]:
        p.error(f"unknown variant {bad!r}; choose from {FP32}, {', '.join(VARIANTS)}")
    if args.timeout <= 0:
        p.error("--timeout must be positive (minutes)")
    return args


def make_context(args: argparse.Namespace, argv: Sequence[str]) -> RunContext:
    """The provenance shared by this run's records."""
    bd = bench_data()
    from bench_unit import machine_line

    return RunContext(
        invocation=bd.command_line(__file__, list(argv)),
        date=bd.now_iso(),
        commit=bd.code_commit(),
        machine=machine_line(bd.machine_facts()),
        cache=cache_dir(),
        json_path=args.out.resolve(),
        timeout_s=args.timeout * 60.0,
    )


def run_model(
    name: str, build: Callable[[Path], ZooModel], args: argparse.Namespace, ctx: RunContext
) -> bool:
    """Build one model and run the requested variants on it; False when it could not be built.

    A variant that fails (or a score that fails) is a result: it is recorded and does not count here.
    """
    try:
        model = build(ctx.cache)
    except Exception as e:  # the other models still run
        log(traceback.format_exc())
        log(f"[{name}] build failed: {type(e).__name__}: {one_line(str(e))}")
        return False
    have_fp32 = any(r["model"] == name and r["variant"] == FP32 for r in load_records(ctx.json_path))
    if FP32 in args.variants or not have_fp32:
        run_fp32(model, ctx)
    for v in [VARIANTS[v] for v in args.variants if v != FP32]:
        if not v.applies_to(model.kind):
            log(f"[{name}] {v.name}: skipped (kind {model.kind}; runs on {', '.join(sorted(v.kinds or ()))})")
            continue
        run_variant(model, v, ctx)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or the ``--_peer`` child); 1 when a model could not be built (failed
    variants are recorded results, not errors of the run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_peer"]:
        return peer_main(argv[1:])
    args = parse_args(argv)
    if args.render:
        render(args.out.resolve(), args.markdown)
        return 0
    ctx = make_context(args, argv)
    builders, disabled = load_builders(args.models)
    failed: list[str] = []
    for name in args.models:
        if name not in builders:
            log(f"[{name}] skipped: {disabled.get(name, 'no builder')}")
            failed.append(name)
            continue
        if not run_model(name, builders[name], args, ctx):
            failed.append(name)
    if load_records(ctx.json_path):
        render(ctx.json_path, args.markdown)
    if failed:
        log(f"models not run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
