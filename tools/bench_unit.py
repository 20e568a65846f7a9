"""Time one BRECQ unit's training step on each onnxruntime provider (CPU, and CUDA where usable).

Dev-only script. For each model it builds the AdaRound training step (ONNX forward + onnx-ad
gradient graph, as ``--method brecq`` does) of one reconstruction unit with 4-bit nearest-rounded
weights, feeds it the unit's real input for a batch of random model inputs, and times ``--steps``
steps after ``--warmup`` on every usable provider; the BENCHMARKS.md section between the
``bench:unit`` markers is rewritten from the rows of this run (raw: ``benchmarks/unit.json``)::

    python tools/bench_unit.py                                  # resnet20 unit 1, efficientnet unit 1
    python tools/bench_unit.py --models efficientnet_lite0 --unit 3 --batch 8

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

from onnx_mixquant.graph import read_model, weight_array, weight_values
from onnx_mixquant.numerics import choose_qparams
from onnx_mixquant.reconstruct._common import Cache, run_tensor
from onnx_mixquant.reconstruct.adaround import UnitProgram, UnitWeight, differentiable, init_v
from onnx_mixquant.reconstruct.blocks import partition
from onnx_mixquant.reconstruct.train import _without_zero_pads
from onnx_mixquant.validate import available_providers

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION = "unit"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20_cifar10,efficientnet_lite0", help="comma list")
    p.add_argument("--unit", type=int, default=1, help="index of the unit to time (default 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32, the reference)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--bench-dir", type=Path, default=REPO_ROOT.parent / "shared" / "bench")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    return p.parse_args()


def time_unit(path: Path, index: int, batch: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    """Median step time of unit ``index`` of the model at ``path`` on every usable provider."""
    read = read_model(path)
    model = _without_zero_pads(read.model)  # as reconstruct() trains
    units = partition(model, read.sites, blocks=True, differentiable=differentiable)
    unit = units[index]
    values, axes = weight_values(model), {s.name: s.axis for s in read.sites}
    weights = []
    for name in unit.weights:
        w = weight_array(values[name])
        weights.append(UnitWeight(name, w, choose_qparams(w, 4, symmetric=False, axis=axes[name])))
    rng = np.random.default_rng(0)
    feeds = {}
    for v in read.model.graph.inputs:
        dims = [batch if i == 0 else int(d) for i, d in enumerate(v.shape or [])]
        feeds[v.name or ""] = rng.random(dims, dtype=np.float32)
    cache = Cache()
    try:
        x = np.asarray(run_tensor(model, unit.input, feeds, cache, PROVIDERS[0]))
        y = np.asarray(run_tensor(model, unit.output, feeds, cache, PROVIDERS[0]))
    finally:
        cache.close()
    v = {w.name: init_v(w.w, w.qparams) for w in weights}
    rows = []
    for provider in [PROVIDERS[0], *([PROVIDERS[1]] if PROVIDERS[1] in available_providers(True) else [])]:
        program = UnitProgram(model, unit, weights, x.shape, provider=provider)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            program.step(x, y, v, 20.0, 0.01)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times)
        bd.log(f"  [{path.stem} {unit.name[:40]}] {program.provider}: {ms:.1f} ms/step")
        rows.append({"model": path.stem, "unit": unit.name, "input": list(x.shape), "weights": len(weights),
                     "provider": program.provider, "ms_per_step": ms, "steps": steps})  # fmt: skip
    return rows


def render(rows: list[dict[str, Any]], command: str, facts: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    cpu = {r["model"]: r["ms_per_step"] for r in rows if r["provider"] == PROVIDERS[0]}
    lines = [
        bd.mark(SECTION, "start"),
        "## One BRECQ unit's training step per onnxruntime provider",
        "",
        f"Produced by `{command}` on {facts['date']}. Machine: {facts['machine']}. Median of the timed "
        "steps (forward + onnx-ad gradient of the AdaRound loss, 4-bit weights, onnxruntime's default "
        "threads).",
        "",
        "| model | unit | unit input | weights | provider | ms / step | it/s | vs CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = cpu[r["model"]] / r["ms_per_step"]
        lines.append(
            f"| {r['model']} | {r['unit']} | {'x'.join(map(str, r['input']))} | {r['weights']} "
            f"| {r['provider']} | {r['ms_per_step']:.1f} | {1000 / r['ms_per_step']:.1f} | {ratio:.2f}x |"
        )
    if not any(r["provider"] == PROVIDERS[1] for r in rows):
        lines += ["", "No CUDA row: onnxruntime could not open a CUDA session on this machine."]
    return "\n".join([*lines, "", bd.mark(SECTION, "end"), ""])


def main() -> None:
    args = parse_args()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += time_unit(
            args.bench_dir / "models" / f"{name}.onnx", args.unit, args.batch, args.steps, args.warmup
        )
    facts = bd.machine_facts()
    facts["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cores, versions = f"{facts['nproc']} CPU cores ({facts['cpu']})", f"Python {facts['python']}"
    facts["machine"] = f"{cores}, {versions}, onnxruntime {facts['onnxruntime']}"
    command = " ".join(["python", "tools/bench_unit.py", *sys.argv[1:]])
    text = render(rows, command, facts)
    old = args.out.read_text() if args.out.is_file() else None
    bd.write_atomic(args.out, bd.merge_section(old, text, SECTION).encode())
    raw = args.out.parent / "benchmarks" / "unit.json"
    raw.parent.mkdir(exist_ok=True)
    bd.write_atomic(
        raw, (json.dumps({"command": command, "machine": facts, "rows": rows}, indent=1) + "\n").encode()
    )
    print(text)


if __name__ == "__main__":
    main()
