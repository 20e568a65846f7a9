"""Time the MixQuant search (error table + bit plan) on 10^8 synthetic weights.

    python tools/bench_search.py                 # 10^8 weights, 3 repeats, updates BENCHMARKS.md
    python tools/bench_search.py --params 1e7 --repeats 5 --out /tmp/b.md

The weights are 100 tensors (shapes like Conv and Linear layers, normal and heavy-tailed), the
quantizer is the default one (asymmetric, per-channel, min-max), the widths 2..8, the rule the
budget rule at 4 average bits. Only the search is timed: making the weights is not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_data as bd  # noqa: E402

from onnx_mixquant.config import DEFAULT_BITS, QuantizerConfig, SearchConfig  # noqa: E402
from onnx_mixquant.search.budget import build_error_table, search_bitwidths  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_weights(total: int, count: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``count`` float32 tensors summing to about ``total`` values, alternately Conv- and Linear-shaped."""
    rng = np.random.default_rng(seed)
    per = total // count
    weights: dict[str, np.ndarray] = {}
    for i in range(count):
        if i % 2 == 0:  # Conv (C_out, C_in, 3, 3)
            c_out = 256
            shape: tuple[int, ...] = (c_out, max(1, per // (c_out * 9)), 3, 3)
        else:  # Linear (out, in)
            shape = (1024, max(1, per // 1024))
        w = rng.standard_normal(shape, dtype=np.float32)
        if i % 3 == 0:
            w *= rng.standard_gamma(0.5, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
        weights[f"w{i}"] = w
    return weights, dict.fromkeys(weights, 0)


def time_search(weights: dict[str, np.ndarray], axes: dict[str, int], repeats: int) -> list[float]:
    """Wall seconds of error table + budget search, ``repeats`` times."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        table = build_error_table(weights, axes, QuantizerConfig(), DEFAULT_BITS)
        search_bitwidths(table, SearchConfig(target_bits=4.0))
        out.append(time.perf_counter() - t0)
        bd.log(f"search: {out[-1]:.2f} s")
    return out


def render(args: argparse.Namespace, n: int, times: list[float]) -> str:
    med = statistics.median(times)
    lines = [
        bd.mark("search-speed", "start"),
        "## MixQuant search speed",
        "",
        f"Produced by `python {' '.join(['tools/bench_search.py', *sys.argv[1:]])}` on "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}.",
        "",
        "Error table at widths 2..8 (asymmetric, per-channel, min-max) plus the budget rule at 4 "
        f"average bits, on {n:,} float32 weights in {args.count} tensors.",
        "",
        "| weights | tensors | repeats | median s | min s | max s | weights/s (median) |",
        "|---|---|---|---|---|---|---|",
        f"| {n:,} | {args.count} | {len(times)} | {med:.2f} | {min(times):.2f} | {max(times):.2f} "
        f"| {n / med:.3g} |",
        bd.mark("search-speed", "end"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=1e8, help="total weights (default 1e8)")
    parser.add_argument("--count", type=int, default=100, help="number of tensors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    bd.log(f"making {args.params:.3g} weights")
    weights, axes = make_weights(int(args.params), args.count, args.seed)
    n = sum(w.size for w in weights.values())
    times = time_search(weights, axes, args.repeats)
    old = args.out.read_text() if args.out.exists() else None
    bd.write_atomic(args.out, bd.merge_section(old, render(args, n, times), "search-speed").encode())
    print(f"{n:,} weights: median {statistics.median(times):.2f} s over {len(times)} runs")


if __name__ == "__main__":
    main()
