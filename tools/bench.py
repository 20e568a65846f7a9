"""Regenerate the weight-only benchmark tables of BENCHMARKS.md, and their raw JSON, in one command.

Dev-only script (needs Pillow; the ``onnx_mixquant`` package never imports it). It reads the real
models and labelled images of the benchmark folder (``../shared/bench``, see its README.md), which
is never copied into the repository. From the repository root::

    python tools/bench.py            # all models and methods, full eval sets (several minutes)
    python tools/bench.py --quick    # resnet20, 1000 images, fp32 / uniform-w4 / mixquant-w4

For each (model, method) it quantizes the FP32 model with :func:`onnx_mixquant.quantize` into a
temporary folder (deleted at the end), measures top-1 with onnxruntime on the CPU, and records
accuracy, average and stored bits, file size and quantization wall time. BENCHMARKS.md keeps
other sections: only the one between the ``bench:weight-only`` markers is replaced.

==================  ===========================================================================
method              search configuration (asymmetric per-channel min-max, nearest rounding)
==================  ===========================================================================
fp32                the unquantized model (always evaluated: it is the reference of the drop)
uniform-w8/w4/w3    every weight at 8 / 4 / 3 bits
mixquant-w4/w3      budget rule at 4.0 / 3.0 parameter-weighted average bits
mixquant-out-w4/w3  the same, minimising the measured output error (Objective.OUTPUT) on synthetic
                    inputs (no data: what the plain command can do)
mixquant-grd-w4/w3  the same with Objective.GUARDED (roundoff error, probe outliers weighted up)
mixquant-size-w4    budget rule at the bytes uniform W4 weights take (sum of ceil(params / 2))
qem-layer           MixQuant paper rule, QEM 300, each layer's own smallest error as reference
qem-model           paper rule with the model-wide smallest error as reference, one row per --qem
==================  ===========================================================================
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _bench_data as bd

from onnx_mixquant import (
    Objective,
    QemReference,
    QuantConfig,
    QuantizerConfig,
    Report,
    SearchConfig,
    SearchRule,
    ValidateConfig,
    quantize,
)

#: model name -> dataset folder under bench/data.
MODELS: dict[str, str] = {name: spec.dataset for name, spec in bd.MODELS.items()}
METHODS: tuple[str, ...] = (
    "fp32",
    "uniform-w8",
    "uniform-w4",
    "uniform-w3",
    "mixquant-w4",
    "mixquant-w3",
    "mixquant-out-w4",
    "mixquant-out-w3",
    "mixquant-grd-w4",
    "mixquant-grd-w3",
    "mixquant-size-w4",
    "qem-layer",
    "qem-model",
)
QUICK_MODELS, QUICK_METHODS, QUICK_LIMIT = ("resnet20_cifar10",), ("fp32", "uniform-w4", "mixquant-w4"), 1000


@dataclass(frozen=True)
class Job:
    """One row of a model's table: a method and, for qem-model, its QEM value."""

    method: str
    qem: float | None = None

    @property
    def label(self) -> str:
        """Row name: the method, with ``@qem`` for the qem-model rows."""
        return self.method if self.qem is None else f"{self.method}@{self.qem:g}"


@dataclass
class Result:
    """What one (model, method) run measured; ``error`` is set (and top1 None) when it failed."""

    model: str
    method: str
    top1: float | None = None
    drop_pts: float | None = None
    average_bits: float | None = None
    storage_bits: float | None = None
    output_bytes: int | None = None
    size_ratio: float | None = None
    quantize_s: float | None = None
    eval_s: float | None = None
    widths: dict[str, int] = field(default_factory=dict)
    bits: dict[str, int | None] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line and fill in the --quick defaults."""
    p = bd.new_parser(__doc__)
    p.add_argument("--models", help=f"comma list (default: {','.join(MODELS)})")
    p.add_argument("--methods", help=f"comma list (default: all of {','.join(METHODS)})")
    p.add_argument("--qem", default="300", help="comma list of QEM values for qem-model (default 300)")
    p.add_argument("--limit", type=int, help="evaluate on N images, evenly spaced over the set")
    bd.add_io_args(
        p,
        quick_help=f"{QUICK_MODELS[0]}, {QUICK_LIMIT} images, methods {','.join(QUICK_METHODS)}; "
        "writes files only when --out/--json are given",
        json_name="results.json",
        out_help="markdown file (default: BENCHMARKS.md at the repo root)",
        json_help="raw results (default: benchmarks/results.json beside --out)",
    )
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument(
        "--ort-level",
        choices=sorted(bd.ORT_LEVELS),
        default="all",
        help="onnxruntime graph optimisation level of the eval sessions (default all)",
    )
    args = p.parse_args(argv)
    _fill_defaults(p, args)
    return args


def _fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve --quick, validate the lists, and default the output paths."""
    args.models = bd.split_list(args.models) if args.models else list(QUICK_MODELS if args.quick else MODELS)
    args.methods = (
        bd.split_list(args.methods) if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    )
    if args.quick and args.limit is None:
        args.limit = QUICK_LIMIT
    bd.check_choices(p, args.models, MODELS, "model")
    bd.check_choices(p, args.methods, METHODS, "method")
    try:
        args.qem = [float(q) for q in bd.split_list(args.qem)]
    except ValueError:
        p.error(f"--qem: expected a comma list of numbers, got {args.qem!r}")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be positive")
    write = not args.quick or args.out is not None or args.json is not None
    args.out = (args.out or bd.REPO_ROOT / "BENCHMARKS.md") if write else None
    args.json = (args.json or args.out.parent / "benchmarks" / "results.json") if write else None
    _check_bench_dir(p, args)


def _check_bench_dir(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail with a clear message when the benchmark folder or a needed file is missing."""
    bench: Path = args.bench_dir
    if not bench.is_dir():
        p.error(
            f"benchmark folder {bench} not found: it holds the models and images "
            "(see shared/bench/README.md); pass its location with --bench-dir"
        )
    needed = [bench / "models" / f"{m}.onnx" for m in args.models]
    needed += [bench / "data" / MODELS[m] / "eval.csv" for m in args.models]
    missing = [str(f) for f in needed if not f.is_file()]
    if missing:
        p.error(f"benchmark folder {bench} is incomplete; missing: {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# quantization


def make_jobs(methods: list[str], qems: list[float]) -> list[Job]:
    """Jobs in the canonical method order; qem-model becomes one job per QEM value."""
    jobs: list[Job] = []
    for m in METHODS:
        if m == "fp32" or m not in methods:
            continue
        jobs.extend([Job(m, q) for q in qems] if m == "qem-model" else [Job(m)])
    return jobs


def build_config(job: Job, w4_bytes: int | None) -> QuantConfig:
    """The QuantConfig of one job (validation off: the bench measures accuracy itself)."""
    m = job.method
    if m.startswith("uniform-w"):
        search = SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=int(m[-1]), target_bits=None)
    elif m in ("mixquant-w4", "mixquant-w3"):
        search = SearchConfig(rule=SearchRule.BUDGET, target_bits=float(m[-1]))
    elif m in ("mixquant-out-w4", "mixquant-out-w3"):
        search = SearchConfig(rule=SearchRule.BUDGET, target_bits=float(m[-1]), objective=Objective.OUTPUT)
    elif m in ("mixquant-grd-w4", "mixquant-grd-w3"):
        search = SearchConfig(rule=SearchRule.BUDGET, target_bits=float(m[-1]), objective=Objective.GUARDED)
    elif m == "mixquant-size-w4":
        assert w4_bytes is not None
        search = SearchConfig(rule=SearchRule.BUDGET, target_bits=None, target_bytes=w4_bytes)
    elif m == "qem-layer":
        search = SearchConfig(
            rule=SearchRule.QEM, qem=300.0, target_bits=None, qem_reference=QemReference.LAYER
        )
    elif m == "qem-model":
        assert job.qem is not None
        search = SearchConfig(
            rule=SearchRule.QEM, qem=job.qem, target_bits=None, qem_reference=QemReference.MODEL
        )
    else:
        raise ValueError(f"no quantization config for method {m!r}")
    return QuantConfig(quantizer=QuantizerConfig(), search=search, validate=ValidateConfig(enabled=False))


def w4_bytes_of(report: Report) -> int:
    """Bytes the quantized weights of ``report`` take when all stored as packed 4-bit."""
    return sum(math.ceil(math.prod(w.shape) / 2) for w in report.weights if w.bits is not None)


def widths_of(report: Report) -> dict[str, int]:
    """Histogram of chosen widths, e.g. {"2b": 3, "4b": 40, "float": 1}, sorted by width."""
    counts = collections.Counter(w.bits for w in report.weights)
    order = sorted(counts, key=lambda b: (b is None, b or 0))
    return {("float" if b is None else f"{b}b"): counts[b] for b in order}


def fill_from_report(res: Result, report: Report, seconds: float) -> None:
    """Copy the report's bits, sizes and timings into ``res``."""
    res.average_bits, res.storage_bits = report.average_bits, report.storage_bits
    res.output_bytes = report.output_bytes
    res.size_ratio = report.output_bytes / report.input_bytes if report.input_bytes else None
    res.quantize_s = seconds
    res.widths = widths_of(report)
    res.bits = {w.name: w.bits for w in report.weights}
    res.timings_s = dict(report.timings_s)
    res.settings = json.loads(json.dumps(dict(report.settings), default=str))


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class ModelRun(bd.ModelRun):
    """Everything measured on one model: its result rows and weight counts."""

    results: list[Result] = field(default_factory=list)
    w4_bytes: int | None = None
    quantized_params: int | None = None


def evaluate(path: Path, run: ModelRun, label: str, args: argparse.Namespace) -> tuple[float, float]:
    """(top-1, seconds) of the model at ``path`` on the run's eval set."""
    t0 = time.perf_counter()
    sess = bd.make_session(path, args.ort_level, args.threads)
    acc = bd.top1(sess, run.data, args.batch, label)
    return acc, time.perf_counter() - t0


def run_fp32(run: ModelRun, args: argparse.Namespace) -> Result:
    """The reference row: the unquantized model."""
    bd.log(f"[{run.name} fp32] evaluating")
    acc, secs = evaluate(run.fp32_path, run, f"{run.name} fp32", args)
    size = run.fp32_path.stat().st_size
    return Result(
        run.name,
        "fp32",
        top1=acc,
        drop_pts=0.0,
        average_bits=32.0,
        storage_bits=32.0,
        output_bytes=size,
        size_ratio=1.0,
        eval_s=secs,
    )


def ensure_w4_bytes(run: ModelRun, tmp: Path) -> int:
    """The packed-W4 byte count, from an earlier report or a probe uniform-w4 run."""
    if run.w4_bytes is None:
        bd.log(f"[{run.name}] probing weight sizes (uniform W4, not evaluated)")
        rep = quantize(run.fp32_path, tmp / f"{run.name}.probe.onnx", build_config(Job("uniform-w4"), None))
        note_report(run, rep)
    assert run.w4_bytes is not None
    return run.w4_bytes


def note_report(run: ModelRun, report: Report) -> None:
    """Remember the model's weight count (the first report is as good as any)."""
    if run.w4_bytes is None:
        run.w4_bytes = w4_bytes_of(report)
        run.quantized_params = sum(math.prod(w.shape) for w in report.weights if w.bits is not None)


def run_job(run: ModelRun, job: Job, tmp: Path, args: argparse.Namespace) -> Result:
    """Quantize, evaluate, and record one job; a failure is logged and recorded, not raised."""
    res = Result(run.name, job.label)
    tag = f"{run.name} {job.label}"
    try:
        w4 = ensure_w4_bytes(run, tmp) if job.method == "mixquant-size-w4" else None
        out = tmp / f"{run.name}.{job.label}.onnx"
        bd.log(f"[{tag}] quantizing")
        t0 = time.perf_counter()
        report = quantize(run.fp32_path, out, build_config(job, w4))
        secs = time.perf_counter() - t0
        note_report(run, report)
        fill_from_report(res, report, secs)
        bd.log(
            f"[{tag}] quantized in {secs:.2f} s: average {report.average_bits:.3f} bits, {_hist(res.widths)}"
        )
        res.top1, res.eval_s = evaluate(out, run, tag, args)
    except Exception as e:  # the bench records library failures and goes on with the next job
        res.error = "".join(traceback.format_exception(e))
        bd.log(f"[{tag}] FAILED:\n{res.error}")
    return res


def run_model(name: str, tmp: Path, args: argparse.Namespace, refs: dict[str, Any]) -> ModelRun:
    """All jobs of one model, FP32 first."""
    data = bd.subset(bd.load_eval_set(args.bench_dir, MODELS[name], args.cache_dir), args.limit)
    ref = refs.get(name, {}).get("top1_eval")
    run = ModelRun(name, args.bench_dir / "models" / f"{name}.onnx", data, ref)
    fp32 = run_fp32(run, args)
    run.results.append(fp32)
    _check_reference(run, fp32, args.limit)
    for job in make_jobs(args.methods, args.qem):
        res = run_job(run, job, tmp, args)
        if res.top1 is not None and fp32.top1 is not None:
            res.drop_pts = 100.0 * (res.top1 - fp32.top1)
        run.results.append(res)
    return run


def _check_reference(run: ModelRun, fp32: Result, limit: int | None) -> None:
    """Warn when the FP32 top-1 on the full set is off the README's reference (preprocessing bug)."""
    if limit is None and run.reference_top1 is not None and fp32.top1 is not None:
        if abs(fp32.top1 - run.reference_top1) > 1e-3:
            bd.log(
                f"WARNING [{run.name}] FP32 top-1 {fp32.top1:.4f} differs from the reference "
                f"{run.reference_top1:.4f}: check the preprocessing"
            )


# ---------------------------------------------------------------------------------------------
# output


def _hist(widths: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in widths.items())


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    return {
        **bd.machine_facts(),
        "ort_graph_optimization_level": str(bd.ORT_LEVELS[args.ort_level]).split(".")[-1],
        "ort_intra_op_num_threads": args.threads,
        "batch": args.batch,
    }


def row_cells(r: Result) -> list[str]:
    """Markdown cells of one result row."""
    if r.error is not None:
        last = r.error.strip().splitlines()[-1]
        return [r.method, f"error: {last}"] + ["-"] * 8
    mb = None if r.output_bytes is None else r.output_bytes / 1e6
    return [
        r.method,
        bd.fmt(r.top1, ".4f"),
        bd.fmt(r.drop_pts, "+.2f"),
        bd.fmt(r.average_bits, ".3f"),
        bd.fmt(r.storage_bits, ".3f"),
        f"{r.output_bytes:,}" if r.output_bytes else "-",
        bd.fmt(mb, ".3f"),
        bd.fmt(r.size_ratio, ".3f"),
        bd.fmt(r.quantize_s, ".2f"),
        _hist(r.widths) or "-",
    ]


TABLE_HEAD = [
    "method",
    "top-1",
    "vs FP32 (pts)",
    "avg bits",
    "stored bits",
    "file bytes",
    "MB",
    "x FP32 file",
    "quantize s",
    "widths chosen",
]


def model_table(run: ModelRun) -> list[str]:
    """One model's markdown heading, table and summary line."""
    params = f"{run.quantized_params:,} quantized weight parameters, " if run.quantized_params else ""
    ref = f"; README FP32 reference {run.reference_top1:.4f}" if run.reference_top1 is not None else ""
    lines = [
        f"### {run.name}",
        "",
        f"{params}{len(run.data.y):,} eval images{ref}.",
        "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "---|" * len(TABLE_HEAD),
    ]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in run.results]
    return [*lines, "", summary_line(run), ""]


def _compare(by: dict[str, Result], mine: str, theirs: str, what: str) -> str | None:
    """'W4: mixquant-w4 0.80 vs uniform-w4 0.79 (+1.00 pts): MixQuant better' or None."""
    a, b = by.get(mine), by.get(theirs)
    if a is None or b is None or a.top1 is None or b.top1 is None:
        return None
    d = 100.0 * (a.top1 - b.top1)
    verdict = "MixQuant better" if d > 0 else "tie" if d == 0 else "uniform better"
    return (
        f"{what}: {mine} {a.top1:.4f} ({bd.fmt(a.average_bits, '.2f')} avg bits) vs {theirs} "
        f"{b.top1:.4f} ({d:+.2f} pts): **{verdict}**"
    )


def summary_line(run: ModelRun) -> str:
    """Whether MixQuant beat uniform at equal average bits (W4, W3) and at equal W4 storage."""
    by = {r.method: r for r in run.results}
    parts = [
        _compare(by, "mixquant-w4", "uniform-w4", "W4"),
        _compare(by, "mixquant-w3", "uniform-w3", "W3"),
        _compare(by, "mixquant-size-w4", "uniform-w4", "equal W4 bytes"),
    ]
    found = [p for p in parts if p]
    return "Summary: " + ("; ".join(found) if found else "no MixQuant/uniform pair was run") + "."


def render_section(runs: list[ModelRun], meta: dict[str, Any]) -> str:
    """The whole BENCHMARKS.md section, markers included."""
    m = meta["machine"]
    lines = [
        bd.mark("weight-only", "start"),
        "## Weight-only quantization: accuracy, size and time",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (total {meta['total_s']:.0f} s).",
        "",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']} ({m['ort_provider']}, {m['ort_graph_optimization_level']}, "
        f"{m['ort_intra_op_num_threads']} intra-op threads, batch {m['batch']}), onnx {m['onnx']}, "
        f"{bd.code_version(m)}.",
        "",
        "All methods quantize weights only (asymmetric, per output channel, min-max, nearest "
        "rounding), activations stay float. *avg bits* is the parameter-weighted mean width; "
        "*stored bits* prices each width at its ONNX container (INT4 up to 4 bits, INT8 above). "
        "*quantize s* is the wall time of `quantize()` (validation off). mixquant-w4/w3: budget "
        "rule at 4.0/3.0 average bits; mixquant-size-w4: byte budget equal to the packed uniform "
        "W4 weights; qem-layer / qem-model@Q: the paper's QEM rule with a per-layer / model-wide "
        "reference error. Raw results, with every weight's width: "
        f"`{meta['json_rel']}`.",
        "",
    ]
    for run in runs:
        lines += model_table(run)
    return "\n".join([*lines, bd.mark("weight-only", "end")]) + "\n"


def results_json(runs: list[ModelRun], meta: dict[str, Any]) -> str:
    """The raw results as JSON text."""
    doc = bd.results_doc(
        meta,
        runs,
        lambda run: {
            "quantized_params": run.quantized_params,
            "w4_bytes": run.w4_bytes,
            "results": [asdict(r) for r in run.results],
        },
    )
    return json.dumps(doc, indent=2) + "\n"


#: (name, format spec) of the stdout table's columns.
STDOUT_COLUMNS = (
    ("model", "<20"),
    ("method", "<18"),
    ("top-1", ">7"),
    ("dpts", ">7"),
    ("avg", ">6"),
    ("stor", ">6"),
    ("MB", ">7"),
    ("xFP32", ">6"),
    ("q s", ">7"),
)


def stdout_table(runs: list[ModelRun]) -> str:
    """A compact fixed-width table of every row."""
    lines = bd.table_head(STDOUT_COLUMNS)
    for run in runs:
        for r in run.results:
            mb = None if r.output_bytes is None else r.output_bytes / 1e6
            cells = [
                run.name,
                r.method,
                "ERROR" if r.error else bd.fmt(r.top1, ".4f"),
                bd.fmt(r.drop_pts, "+.2f"),
                bd.fmt(r.average_bits, ".2f"),
                bd.fmt(r.storage_bits, ".2f"),
                bd.fmt(mb, ".3f"),
                bd.fmt(r.size_ratio, ".3f"),
                bd.fmt(r.quantize_s, ".2f"),
            ]
            lines.append(bd.table_row(STDOUT_COLUMNS, cells))
    return "\n".join(lines)


def write_outputs(runs: list[ModelRun], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """BENCHMARKS.md section and raw JSON, both written atomically."""
    bd.write_section(args.out, render_section(runs, meta), "weight-only")
    bd.write_atomic(args.json, results_json(runs, meta).encode())
    bd.log(f"wrote {args.out} and {args.json}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any quantization or evaluation failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    refs = bd.load_references(args.bench_dir)
    t0 = time.perf_counter()
    started = bd.now_iso()
    with tempfile.TemporaryDirectory(prefix="mixquant-bench-") as tmp:
        runs = [run_model(name, Path(tmp), args, refs) for name in args.models]
    meta = {
        "command": bd.command_line(__file__, argv),
        "date": started,
        "total_s": time.perf_counter() - t0,
        "machine": machine_info(args),
        "limit": args.limit,
        "qem": args.qem,
        "json_rel": bd.relative_path(args.json, args.out.parent) if args.json else None,
    }
    if args.out is not None:
        write_outputs(runs, meta, args)
    print(stdout_table(runs))
    print(f"total {meta['total_s']:.1f} s")
    return bd.exit_status([f"{r.model} {r.method}" for run in runs for r in run.results if r.error])


if __name__ == "__main__":
    sys.exit(main())
