"""Time BRECQ units' training steps: per onnxruntime provider (CPU, and CUDA where usable), and with
the package's gradient-graph rewrites against the graph without some of them.

Dev-only script. For each model it builds the AdaRound training step (ONNX forward + onnx-ad
gradient graph, as ``--method brecq`` does) of reconstruction units with 4-bit nearest-rounded
weights, feeds each the unit's real input for a batch of random model inputs, and times ``--steps``
steps after ``--warmup``. The variants of a unit (providers; with each ``--without`` also the CPU
step built without the named rewrites of ``rounding/reconstruct/_dwconv.py``, see :data:`REWRITES`) take
turns step by step, so a load change on the machine hits them alike. Speed-ups are against the
first ``--without`` variant.
The BENCHMARKS.md section between the ``bench:unit`` markers is rewritten from the rows of this
run (raw: ``benchmarks/unit.json``)::

    python tools/bench_unit.py                                  # resnet20 unit 1, efficientnet unit 1
    python tools/bench_unit.py --models efficientnet_lite0 --units 3 --batch 8
    python tools/bench_unit.py --models resnet20_cifar10 --units all --without im2col,rank-align
    python tools/bench_unit.py --units all --without im2col,rank-align,clip-mask,dw-direct,seed-reshape \
        --without clip-mask,dw-direct,seed-reshape                # all rewrites, and the newer three
    python tools/bench_unit.py --units all --section unit-cuda     # on a GPU machine: CUDA vs CPU

The CPU provider runs with onnxruntime's default threads (all cores); CUDA rows appear only where
``onnx_mixquant.validate.available_providers(True)`` opened a CUDA session (onnxruntime-gpu and a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _bench_data as bd
import numpy as np

from onnx_mixquant.numerics import choose_qparams
from onnx_mixquant.read.model import read_model, weight_array, weight_values
from onnx_mixquant.rounding.reconstruct import _dwconv
from onnx_mixquant.rounding.reconstruct._common import Cache, run_tensor
from onnx_mixquant.rounding.reconstruct.adaround import UnitProgram, UnitWeight, differentiable, init_v
from onnx_mixquant.rounding.reconstruct.blocks import partition
from onnx_mixquant.rounding.reconstruct.train import _without_zero_pads
from onnx_mixquant.validate.compare import available_providers

REPO_ROOT = bd.REPO_ROOT
SECTION = "unit"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
#: Gradient-graph rewrites of rounding/reconstruct/_dwconv.py that --without can leave out, and what each
#: does (the table's legend).
REWRITES = {
    "im2col": "the weight adjoint of a group-1 Conv other than 1x1 as im2col + matrix products; "
    "without it, onnx-ad 0.3.0's own rule, a convolution with an image-sized kernel",
    "rank-align": "lower-rank operands of broadcasting ops given full rank, "
    "`rounding/reconstruct/_rankalign.py`",
    "clip-mask": "Clip's (ReLU6's) input adjoint as `g * Cast(x == Clip(x))`; without it, onnx-ad's "
    "two comparisons, two Nots, an And and a Where",
    "dw-direct": "a depthwise Conv's weight adjoint as one Conv with a group per (sample, channel); "
    "without it, a group per channel after transposing the input and the output adjoint",
    "seed-reshape": "the seed count pinned to 1, so Transposes that only move axes of size 1 become Reshapes",
}
DEFAULT = "default"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20_cifar10,efficientnet_lite0", help="comma list")
    p.add_argument("--units", default="1", help="comma list of unit indices, or 'all' (default 1)")
    p.add_argument(
        "--without",
        action="append",
        default=[],
        help="also time each unit on CPU without these rewrites: comma list of " + ", ".join(REWRITES)
        + "; repeat for more variants",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32, the reference)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--bench-dir", type=Path, default=REPO_ROOT.parent / "shared" / "bench")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    p.add_argument(
        "--section",
        default=SECTION,
        help=f"BENCHMARKS.md section bench:NAME and raw file benchmarks/NAME.json (default {SECTION})",
    )
    return p.parse_args()


def time_units(
    path: Path, units_arg: str, batch: int, steps: int, warmup: int, without: list[str]
) -> list[dict[str, Any]]:
    """Median step time of the chosen units of the model at ``path``, per variant (module docstring)."""
    read = read_model(path)
    model = _without_zero_pads(read.model)  # as reconstruct() trains
    units = partition(model, read.sites, blocks=True, differentiable=differentiable)
    chosen = range(len(units)) if units_arg == "all" else [int(i) for i in units_arg.split(",")]
    values, axes = weight_values(model), {s.name: s.axis for s in read.sites}
    rng = np.random.default_rng(0)
    feeds = {}
    for v in read.model.graph.inputs:
        dims = [batch if i == 0 else int(d) for i, d in enumerate(v.shape or [])]
        feeds[v.name or ""] = rng.random(dims, dtype=np.float32)
    rows = []
    for index in chosen:
        unit = units[index]
        weights = []
        for name in unit.weights:
            w = weight_array(values[name])
            weights.append(UnitWeight(name, w, choose_qparams(w, 4, symmetric=False, axis=axes[name])))
        cache = Cache()
        try:
            x = np.asarray(run_tensor(model, unit.input, feeds, cache, PROVIDERS[0]))
            y = np.asarray(run_tensor(model, unit.output, feeds, cache, PROVIDERS[0]))
        finally:
            cache.close()
        v = {w.name: init_v(w.w, w.qparams) for w in weights}
        variants = [(PROVIDERS[0], DEFAULT)]
        if PROVIDERS[1] in available_providers(True):
            variants.append((PROVIDERS[1], DEFAULT))
        variants += [(PROVIDERS[0], off) for off in without]
        programs = [_program(model, unit, weights, x.shape, provider, rule) for provider, rule in variants]
        times: list[list[float]] = [[] for _ in programs]
        for i in range(warmup + steps):
            for program, record in zip(programs, times, strict=True):
                t0 = time.perf_counter()
                program.step(x, y, v, 20.0, 0.01)
                if i >= warmup:
                    record.append(time.perf_counter() - t0)
        for program, (_, rule), record in zip(programs, variants, times, strict=True):
            ms = 1000 * statistics.median(record)
            label = f"{path.stem} unit {index} {unit.name[:40]}"
            bd.log(f"  [{label}] {program.provider} {rule}: {ms:.1f} ms/step")
            rows.append({"model": path.stem, "index": index, "unit": unit.name, "input": list(x.shape),
                         "weights": len(weights), "provider": program.provider, "graph": rule,
                         "ms_per_step": ms, "steps": steps})  # fmt: skip
    return rows


def _program(model: Any, unit: Any, weights: list[UnitWeight], shape: tuple[int, ...], provider: str,
             variant: str) -> UnitProgram:  # fmt: skip
    """The unit's step on ``provider``: the default graph, or without the rewrites ``variant`` lists."""
    off = set() if variant == DEFAULT else set(variant.split(","))
    flags = {"rank-align": "ALIGN_RANKS", "clip-mask": "CLIP_MASK", "dw-direct": "DEPTHWISE_DIRECT",
             "seed-reshape": "SEED_RESHAPES"}  # fmt: skip
    saved = {name: getattr(_dwconv, name) for name in ("IM2COL_BYTES", *flags.values())}
    _dwconv.IM2COL_BYTES = 0 if "im2col" in off else saved["IM2COL_BYTES"]
    for rewrite, name in flags.items():
        setattr(_dwconv, name, rewrite not in off)
    try:
        return UnitProgram(model, unit, weights, shape, provider=provider)
    finally:
        for name, value in saved.items():
            setattr(_dwconv, name, value)


def _label(graph: str) -> str:
    """A row's gradient graph for the table: "default" or "without im2col, rank-align"."""
    return graph if graph == DEFAULT else "without " + ", ".join(graph.split(","))


def render(rows: list[dict[str, Any]], command: str, facts: dict[str, Any], section: str = SECTION) -> str:
    """The BENCHMARKS.md section."""
    cpu = [r for r in rows if r["provider"] == PROVIDERS[0]]
    graphs = list(dict.fromkeys(r["graph"] for r in cpu if r["graph"] != DEFAULT))  # --without order
    times = {g: {(r["model"], r["index"]): r["ms_per_step"] for r in cpu if r["graph"] == g}
             for g in [*graphs, DEFAULT]}  # fmt: skip
    default = times[DEFAULT]
    base = times[graphs[0]] if graphs else {}
    reference = base or default
    against = f"the time of the CPU row {_label(graphs[0])}" if graphs else "the time of the CPU row"
    cuda = {(r["model"], r["index"]): r["ms_per_step"] for r in rows if r["provider"] == PROVIDERS[1]}
    title = "CUDA against CPU" if cuda and not base else "gradient-graph rewrites and onnxruntime provider"
    lines = [
        bd.mark(section, "start"),
        f"## BRECQ units' training step: {title}",
        "",
        f"Produced by `{command}` on {facts['date']}. Machine: {facts['machine']}. Median of the timed "
        "steps (forward + onnx-ad gradient of the AdaRound loss, 4-bit weights, onnxruntime's default "
        "threads); the variants of a unit took turns step by step. *gradient graph*: `default`, as "
        "`--method brecq` builds it, or without the named rewrites of `rounding/reconstruct/_dwconv.py`: "
        + ", ".join(f"`{name}` ({what})" for name, what in REWRITES.items())
        + f". *speed-up*: {against} over this row's.",
        "",
        "| model | unit | unit input | weights | provider | gradient graph | ms / step | it/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = reference[(r["model"], r["index"])] / r["ms_per_step"]
        ms = r["ms_per_step"]
        lines.append(
            f"| {r['model']} | {r['index']}: {r['unit']} | {'x'.join(map(str, r['input']))} | {r['weights']} "
            f"| {r['provider']} | {_label(r['graph'])} | {ms:.1f} | {1000 / ms:.1f} | {ratio:.2f}x |"
        )
    models = list(dict.fromkeys(r["model"] for r in rows))
    if base:
        lines += ["", "Sum of the units' median steps on CPU (a BRECQ run's training time is about the "
                  "iterations per unit times this sum):", ""]  # fmt: skip
        columns = [(_label(g), times[g]) for g in graphs] + [("default", default)]
        lines += _sums(models, columns, "speed-up")
    if cuda:
        lines += ["", f"Sum of the units' median steps, CPU against CUDA ({facts.get('gpu') or 'GPU'}):", ""]
        lines += _sums(models, [("CPU", default), ("CUDA", cuda)], "CUDA speed-up")
    else:
        lines += ["", "No CUDA row: onnxruntime could not open a CUDA session on this machine."]
    return "\n".join([*lines, "", bd.mark(section, "end"), ""])


def _sums(models: list[str], columns: list[tuple[str, dict[tuple[str, int], float]]], gain: str) -> list[str]:
    """One line per model: each variant's summed median steps (by (model, unit)), and the first's
    ratio to each of the others."""
    lines = []
    for model in models:
        sums = [(label, sum(ms for (m, _), ms in times.items() if m == model)) for label, times in columns]
        count = sum(1 for m, _ in columns[-1][1] if m == model)
        listed = ", ".join(f"{label} {total:.0f} ms" for label, total in sums)
        first = sums[0][1]
        if len(sums) == 2:
            ratios = f"**{first / sums[1][1]:.2f}x**"
        else:
            ratios = ", ".join(f"**{first / total:.2f}x** ({label})" for label, total in sums[1:])
        lines.append(f"- **{model}** ({count} units): {listed}: {gain} {ratios}.")
    return lines


def machine_line(facts: dict[str, Any]) -> str:
    """The section's machine: cores, GPU where there is one, versions and the code's commit."""
    cores, versions = f"{facts['nproc']} CPU cores ({facts['cpu']})", f"Python {facts['python']}"
    gpu = f", GPU {facts['gpu']}" if facts.get("gpu") else ""
    return f"{cores}{gpu}, {versions}, onnxruntime {facts['onnxruntime']}, {bd.code_version(facts)}"


def main() -> None:
    args = parse_args()
    variants = []
    for text in args.without:
        off = [name for name in text.split(",") if name]
        if bad := set(off) - set(REWRITES):
            known = ", ".join(REWRITES)
            raise SystemExit(f"--without: unknown rewrite(s) {sorted(bad)}; choose from {known}")
        variants.append(",".join(off))  # "im2col," -> "im2col": the variant's label and key
    args.without = variants
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += time_units(
            args.bench_dir / "models" / f"{name}.onnx", args.units, args.batch, args.steps, args.warmup,
            args.without,
        )  # fmt: skip
    facts = bd.machine_facts()
    facts["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    facts["machine"] = machine_line(facts)
    command = " ".join(["python", "tools/bench_unit.py", *sys.argv[1:]])
    text = render(rows, command, facts, args.section)
    old = args.out.read_text() if args.out.is_file() else None
    bd.write_atomic(args.out, bd.merge_section(old, text, args.section).encode())
    raw = args.out.parent / "benchmarks" / f"{args.section}.json"
    raw.parent.mkdir(exist_ok=True)
    bd.write_atomic(
        raw, (json.dumps({"command": command, "machine": facts, "rows": rows}, indent=1) + "\n").encode()
    )
    print(text)


if __name__ == "__main__":
    main()
