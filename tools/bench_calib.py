"""The real-models issue's checks on the bench CNNs: the CLI's variants with and without --calib.

For each bench model, runs ``python -m onnx_mixquant IN OUT [options]`` from a checkout (``--repo``,
default this one) for the variants plain (no flag), u4 (``--uniform-bits 4``), t8 / t4 / t3
(``--calib CALIB --target-bits B``) and u4c (``--uniform-bits 4 --calib CALIB``), where CALIB is a
folder of 256 preprocessed calibration images (one ``.npz`` each, drawn with seed 0 from the bench's
calib split, cached in ``~/.cache/onnx-mixquant-benchcalib``), and scores top-1 on the whole eval
split with onnxruntime CPU. Writes the JSON (``--out``) after every run and prints a markdown table.

    python tools/bench_calib.py [--models resnet20_cifar10,...] [--variants t8,t4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_data as bd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "onnx-mixquant-benchcalib"
CALIB_IMAGES = 256
VARIANTS = ("t8", "t4", "t3", "u4c", "plain", "u4")


def calib_folder(bench: Path, dataset: str) -> Path:
    """CALIB_IMAGES preprocessed calibration images of ``dataset`` as .npz files (built once)."""
    folder = CACHE / f"{dataset}_{CALIB_IMAGES}"
    if folder.is_dir():
        return folder
    rows = bd.read_csv(bench / "data" / dataset / "calib.csv")
    pick = sorted(np.random.default_rng(0).choice(len(rows), CALIB_IMAGES, replace=False))
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, j in enumerate(pick):
        with Image.open(bench / "data" / dataset / rows[j][0]) as img:
            np.savez(tmp / f"{i:03d}.npz", input=bd.PREPROCESS[dataset](img)[None])
    tmp.rename(folder)
    return folder


def options(variant: str, calib: Path) -> list[str]:
    """The CLI options of ``variant``."""
    data = ["--calib", str(calib)]
    return {
        "plain": [],
        "u4": ["--uniform-bits", "4"],
        "t8": [*data, "--target-bits", "8"],
        "t4": [*data, "--target-bits", "4"],
        "t3": [*data, "--target-bits", "3"],
        "u4c": ["--uniform-bits", "4", *data],
    }[variant]


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, object]]]:
    """Every model x variant; results by model and variant (also saved to ``args.out``)."""
    res: dict[str, dict[str, dict[str, object]]] = (
        json.loads(args.out.read_text()) if args.out.exists() else {}
    )
    for model in args.models:
        dataset = bd.MODELS[model].dataset
        calib = calib_folder(args.bench_dir, dataset)
        data = bd.load_eval_set(args.bench_dir, dataset, CACHE)
        src = args.bench_dir / "models" / f"{model}.onnx"
        rows = res.setdefault(model, {})
        rows["fp32"] = {"top1": bd.top1(bd.make_session(src, "all", 2), data, 64, model), "size": 1.0}
        for variant in args.variants:
            out = CACHE / "out" / f"{model}_{variant}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "onnx_mixquant", str(src), str(out), *options(variant, calib)]
            t0 = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": str(args.repo)}
            p = subprocess.run(cmd, cwd=args.repo, env=env, capture_output=True, text=True, check=False)
            row: dict[str, object] = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0}
            if p.returncode != 0:
                row["error"] = f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}"
            else:
                row["top1"] = bd.top1(bd.make_session(out, "all", 2), data, 64, f"{model}/{variant}")
                row["size"] = out.stat().st_size / src.stat().st_size
            rows[variant] = row
            bd.log(f"{model} {variant}: {row.get('top1', row.get('error'))}")
            args.out.write_text(json.dumps(res, indent=1))
    return res


def table(res: dict[str, dict[str, dict[str, object]]]) -> str:
    """Markdown: top-1 (file / FP32) per model and variant."""
    cols = ["fp32", *VARIANTS]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, rows in res.items():
        cells = []
        for c in cols:
            r = rows.get(c)
            if r is None:
                cells.append("-")
            elif "top1" in r:
                cells.append(f"{r['top1']:.4f} ({r['size']:.3f})")
            else:
                cells.append(str(r.get("error")))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-dir", type=Path, default=Path("/work/shared/bench"))
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose package runs (default: this one)")
    p.add_argument("--models", default=",".join(bd.MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bench_calib.json")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    args = p.parse_args()
    args.models, args.variants = bd.split_list(args.models), bd.split_list(args.variants)
    res = json.loads(args.out.read_text()) if args.table else run(args)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
