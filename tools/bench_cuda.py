"""Record a lent GPU machine's run of tools/cuda_check.sh: BRECQ on CUDA against CPU, evaluated here.

Dev-only. ``tools/cuda_check.sh`` (on the GPU machine) times the BRECQ units' training steps on both
providers (``tools/bench_unit.py --section unit-cuda``) and runs the CLI on ResNet-20 (MixQuant +
BRECQ, ``cpu-fast`` preset, 4 average weight bits, 8-bit activations) once on CUDA and once with
CUDA hidden, writing ``r20_cuda.*`` / ``r20_cpu.*`` (model and ``--report``) and ``log.txt``. This
script evaluates the two quantized models on the whole CIFAR-10 test split here (CPU) against the
FP32 model, and writes two BENCHMARKS.md sections: ``bench:unit-cuda``, re-rendered from the run's
``benchmarks/unit-cuda.json``, and ``bench:cuda-e2e`` (raw: ``benchmarks/unit-cuda.json``,
``benchmarks/cuda_e2e.json``)::

    python tools/bench_cuda.py --runs /work/.device/4 --commit bc4ba9f [--runs DIR --commit C ...]

Each ``--commit`` names the commit its ``--runs`` ran: the copy of the tree on the GPU machine can
carry a stale ``.git`` (the device tool sends the session's starting ``.git`` with the current
files). Runs with another ``E2E_PRESET`` add rows (``r20_<provider>_<preset>.*``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import _bench_data as bd
import bench_unit
import numpy as np

SECTION = "cuda-e2e"
MODEL = "resnet20_cifar10"
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
DEFAULT_PRESET = "cpu-fast"
#: bench_unit's raw file in a --runs folder.
UNIT_JSON = Path("benchmarks") / "unit-cuda.json"
#: The CLI's arguments in tools/cuda_check.sh, as a user would type them (paths shortened).
CLI = (
    "onnx-mixquant resnet20_cifar10.onnx out.onnx --calib cifar10/calib --mean 0.485,0.456,0.406 "
    "--std 0.229,0.224,0.225 --target-bits 4 --method brecq"
)


def parse_args() -> argparse.Namespace:
    p = bd.new_parser(__doc__ or "")
    p.add_argument("--runs", type=Path, action="append", required=True,
                   help="a folder cuda_check.sh's $OUT came back to (repeatable)")  # fmt: skip
    p.add_argument("--commit", action="append", default=[],
                   help="the commit the GPU machine ran, one per --runs, in order")  # fmt: skip
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (evaluation)")
    bd.add_io_args(p, "no effect (kept for the common options)", "cuda_e2e.json")
    args = p.parse_args()
    if args.commit and len(args.commit) != len(args.runs):
        p.error("give one --commit per --runs, or none")
    bd.default_outputs(args, "cuda_e2e.json")
    return args


def walls(log: str) -> dict[tuple[str, str], float]:
    """The CLI's wall seconds per (provider key, preset), from cuda_check.sh's
    ``E2E <key> rc=0 wall S s [preset P]`` lines (no preset: cpu-fast)."""
    pattern = r"^E2E (\w+) rc=0 wall ([\d.]+) s(?: preset ([\w-]+))?$"
    return {(m[1], m[3] or DEFAULT_PRESET): float(m[2]) for m in re.finditer(pattern, log, re.MULTILINE)}


def find_rows(runs: Path, commit: str | None) -> list[dict[str, Any]]:
    """The CLI runs in ``runs`` (``r20_<key>[_<preset>].json`` with its model beside it)."""
    wall = walls((runs / "log.txt").read_text())
    rows = []
    for report_path in sorted(runs.glob("r20_*.json")):
        m = re.fullmatch(r"r20_(cuda|cpu)(?:_([\w-]+))?\.json", report_path.name)
        if m is None:
            continue
        key, preset = m[1], m[2] or DEFAULT_PRESET
        row = provider_row(report_path, PROVIDERS[key], wall.get((key, preset)))
        rows.append({"key": key, "preset": preset, "model_path": str(report_path.with_suffix(".onnx")),
                     "commit": commit, **row})  # fmt: skip
    return rows


def provider_row(report_path: Path, provider: str, wall: float | None) -> dict[str, Any]:
    """One CLI run: its report's timings and BRECQ rates (evaluation is added later)."""
    report = json.loads(report_path.read_text())
    recon = report["reconstruction"]
    if recon["provider"] != provider:
        raise SystemExit(f"{report_path}: BRECQ ran on {recon['provider']}, expected {provider}")
    rates = [u["iters_per_second"] for u in recon["units"] if u["rounding"] == "learned"]
    return {
        "provider": recon["provider"],
        "wall_s": wall,
        "stages_s": sum(report["timings_s"].values()),
        "reconstruct_s": report["timings_s"]["reconstruct"],
        "median_iters_per_s": statistics.median(rates),
        "units_learned": len(rates),
        "units": len(recon["units"]),
        "iters": recon["iters"],
        "average_bits": report["average_bits"],
    }


def evaluate(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Top-1, agreement and KL with the FP32 model for each row; the FP32 top-1; per preset run on both
    providers, the paired CUDA - CPU top-1 difference."""
    data = bd.load_eval_set(args.bench_dir, "cifar10", args.cache_dir)
    fp32 = bd.predict(bd.make_session(args.bench_dir / "models" / f"{MODEL}.onnx", "all", args.threads),
                      data, args.eval_batch, "fp32")  # fmt: skip
    hits = {}
    for row in rows:
        label = f"{row['key']} {row['preset']}"
        logits = bd.predict(bd.make_session(Path(row["model_path"]), "all", args.threads), data,
                            args.eval_batch, label)  # fmt: skip
        hits[row["key"], row["preset"]] = logits.argmax(axis=1) == data.y
        row["top1"] = float(hits[row["key"], row["preset"]].mean())
        row["agree_fp32"], row["kl_fp32"] = bd.fidelity(logits, fp32)
    paired = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        if ("cuda", preset) in hits and ("cpu", preset) in hits:
            diff, sd = bd.paired_difference(hits["cpu", preset], hits["cuda", preset])
            paired[preset] = {"cuda_minus_cpu_pts": diff, "sd_pts": sd}
    fp32_top1 = float(np.mean(fp32.argmax(axis=1) == data.y))
    return {"images": len(data.y), "fp32_top1": fp32_top1, "paired": paired}


def render(doc: dict[str, Any]) -> str:
    """The ``bench:cuda-e2e`` section."""
    rows, ev, m = doc["rows"], doc["evaluation"], doc["machine"]
    lines = [
        bd.mark(SECTION, "start"),
        "## BRECQ end to end: CUDA against CPU provider (one CLI command each)",
        "",
        f"Quantized by `tools/cuda_check.sh` on {m['date']} on {m['machine']} (*commit*: the code each run "
        f"ran); evaluated by `{doc['command']}` here (onnxruntime CPU, the {ev['images']} CIFAR-10 test "
        f"images). The command, once per provider and preset: `{CLI} --recon-preset PRESET`, MixQuant + "
        "BRECQ, W4A8; the CUDA run with `--device cuda --cuda` (runs made before `--device` existed took "
        "CUDA by default), the CPU run with the GPU hidden (`CUDA_VISIBLE_DEVICES=`). "
        "*CLI wall*: the whole command, Python start included; "
        "*stages*: the report's stage timings summed; *BRECQ*: its reconstruction stage; *it/s*: "
        "median over the units with learned rounding; *agreement*, *KL*: with the FP32 model's top-1 "
        "and logits.",
        "",
        "| provider | preset | commit | CLI wall s | stages s | BRECQ s | it/s | top-1 | vs FP32 (pts) "
        "| agreement | KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['preset']} ({r['iters']} it) | {r['commit'] or '-'} "
            f"| {bd.fmt(r['wall_s'], '.1f')} | {r['stages_s']:.1f} | {r['reconstruct_s']:.1f} "
            f"| {r['median_iters_per_s']:.0f} | {r['top1']:.4f} | {100 * (r['top1'] - ev['fp32_top1']):+.2f} "
            f"| {r['agree_fp32']:.4f} | {r['kl_fp32']:.4f} |"
        )
    lines += ["", f"FP32 top-1 {ev['fp32_top1']:.4f}."]
    by = {(r["key"], r["preset"]): r for r in rows}
    for preset, pair in ev["paired"].items():
        cuda, cpu = by["cuda", preset], by["cpu", preset]
        whole = f"{cpu['wall_s'] / cuda['wall_s']:.2f}x" if cuda["wall_s"] and cpu["wall_s"] else "-"
        lines.append(
            f"- `{preset}`: CUDA over CPU ({m['nproc']} cores): BRECQ stage "
            f"**{cpu['reconstruct_s'] / cuda['reconstruct_s']:.2f}x**, median it/s "
            f"{cuda['median_iters_per_s'] / cpu['median_iters_per_s']:.2f}x, whole command {whole}. Top-1 "
            f"CUDA minus CPU {pair['cuda_minus_cpu_pts']:+.2f} ± {pair['sd_pts']:.2f} points (paired over "
            "the same images): the providers' float sums differ, so the learned roundings differ a little."
        )
    if doc["determinism"]:
        lines += ["", "Run to run on CUDA (`cuda_check.sh` DETERMINISM stage: the `cpu-fast` command twice "
                  "per setting, `--no-validate`; *CUDA options*: `session.USE_CUDA_OPTIONS`, "
                  "deterministic compute and heuristic cuDNN algorithm choice):", ""]  # fmt: skip
        for mode, runs in doc["determinism"].items():
            shas = ", ".join(r["sha256"] for r in runs)
            same = "identical" if len({r["sha256"] for r in runs}) == 1 else "**differ**"
            secs = " / ".join(f"{r['brecq_s']:.1f}" for r in runs)
            label = "CUDA options" if mode == "True" else "onnxruntime's CUDA defaults"
            lines.append(f"- {label}: output sha256 {shas} ({same}); BRECQ {secs} s.")
    return "\n".join([*lines, "", bd.mark(SECTION, "end"), ""])


def determinism(logs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """cuda_check.sh's ``DET USE_CUDA_OPTIONS=<mode> run <i> rc=0 sha256 <hex> BRECQ <s> <provider>``
    lines, by mode."""
    flag = "(?:USE_CUDA_OPTIONS|REPRODUCIBLE_CUDA)"  # the flag's name when the first runs were made
    pattern = rf"^DET {flag}=(\w+) run (\d+) rc=0 sha256 (\w+) BRECQ ([\d.]+) (\w+)$"
    out: dict[str, list[dict[str, Any]]] = {}
    for log in logs:
        for m in re.finditer(pattern, log, re.MULTILINE):
            out.setdefault(m[1], []).append({"run": int(m[2]), "sha256": m[3], "brecq_s": float(m[4]),
                                             "provider": m[5]})  # fmt: skip
    return out


def main() -> None:
    args = parse_args()
    commits = args.commit or [None] * len(args.runs)
    found = [(r, c) for r, c in zip(args.runs, commits, strict=True) if (r / UNIT_JSON).is_file()]
    if not found:
        raise SystemExit(f"no --runs folder holds {UNIT_JSON} (cuda_check.sh with UNIT=0 only?)")
    unit_runs, unit_commit = found[0]
    unit = json.loads((unit_runs / UNIT_JSON).read_text())
    machine = unit["machine"]
    if unit_commit:
        machine["commit"] = unit_commit
    machine["machine"] = bench_unit.machine_line(machine)
    if not unit["command"].startswith("bash tools/cuda_check.sh"):
        unit["command"] = "bash tools/cuda_check.sh, which runs " + unit["command"]
    rows = [row for runs, commit in zip(args.runs, commits, strict=True) for row in find_rows(runs, commit)]
    if not rows:
        raise SystemExit("no r20_<provider>.json report in the --runs folders")
    doc = {
        "command": bd.command_line(__file__, sys.argv[1:]),
        "machine": machine,
        "cli": CLI,
        "rows": rows,
        "evaluation": evaluate(rows, args),
        "determinism": determinism([(r / "log.txt").read_text() for r in args.runs]),
    }
    unit_text = bench_unit.render(unit["rows"], unit["command"], machine, "unit-cuda")
    text = render(doc)
    if args.out is not None:
        old = args.out.read_text() if args.out.is_file() else None
        merged = bd.merge_section(bd.merge_section(old, unit_text, "unit-cuda"), text, SECTION)
        bd.write_atomic(args.out, merged.encode())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        bd.write_atomic(args.json, (json.dumps(doc, indent=1) + "\n").encode())
        bd.write_atomic(args.json.with_name("unit-cuda.json"), (json.dumps(unit, indent=1) + "\n").encode())
    print(unit_text)
    print(text)


if __name__ == "__main__":
    main()
