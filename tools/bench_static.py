"""Regenerate the static (W8A8) quantization section of BENCHMARKS.md: onnxruntime vs onnx_mixquant.

Dev-only script (needs Pillow; the ``onnx_mixquant`` package never imports it). It reads the real
models and labelled images of the benchmark folder (``../shared/bench``, see its README.md), which is
never copied into the repository. From the repository root::

    python tools/bench_static.py            # all models, 256 calibration images, full eval sets
    python tools/bench_static.py --quick    # resnet20, 64 calibration images, 1000 eval images

Per model, measured in one run on the same calibration images (a seeded sample of the calibration
folder; onnx_mixquant gets the list of chosen files, onnxruntime a CalibrationDataReader over them):

====================  ========================================================================
variant               what
====================  ========================================================================
fp32                  the unquantized model
ort-<method>          onnxruntime ``quantize_static`` W8A8: QDQ, per-channel, activations QUInt8,
                      weights QInt8, calibrate_method MinMax / Percentile / Entropy / Distribution,
                      after ``quant_pre_process`` (as onnxruntime recommends)
mq-w8a8-<method>      onnx_mixquant uniform 8-bit weights (its default with A8: symmetric int8) + 8-bit
                      activations calibrated with minmax / percentile / mse on the tool's own
                      image preprocessing graph
mq-w4a8-<best>        onnx_mixquant MixQuant budget rule at 4.0 average weight bits + A8, with the
                      best onnx_mixquant activation method of the W8A8 rows
mq-w8a8-asym-<best>   as mq-w8a8-<best> with asymmetric (uint8 + zero point) weights
====================  ========================================================================

Every quantization runs in a fresh subprocess (``--_one``), which reports its own peak RSS
(``VmHWM``); the parent evaluates top-1 (onnxruntime CPU, ORT_ENABLE_ALL), probes which
Conv/Gemm/MatMul nodes onnxruntime fused into integer kernels, and times batch-1 latency with all
variants of a model interleaved. A last block quantizes one model at two calibration sizes to show
that the tool's peak memory does not grow with the number of calibration images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _bench_data as bd
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

from onnx_mixquant import (
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    CalibMethod,
    ImageSpec,
    QuantConfig,
    QuantizerConfig,
    Report,
    SearchConfig,
    SearchRule,
    Symmetry,
    ValidateConfig,
    quantize,
)
from onnx_mixquant.data.preprocess import ImagePreprocessor
from onnx_mixquant.toolkit import node_names
from onnx_mixquant.validate._fusion import check_fusion

#: Latency ratios this close (relative) are reported as "within" (run-to-run spread of the medians).
LATENCY_TOLERANCE = 0.03
SECTION = "static"
JSON_NAME = "static.json"
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


MODELS = bd.MODELS
#: onnxruntime CalibrationMethod member by our lower-case name.
ORT_METHODS: dict[str, str] = {
    "minmax": "MinMax",
    "percentile": "Percentile",
    "entropy": "Entropy",
    "distribution": "Distribution",
}
TOOL_METHODS: dict[str, CalibMethod] = {m.value: m for m in CalibMethod}
QUICK_MODEL, QUICK_CALIB, QUICK_LIMIT, QUICK_RUNS = "resnet20_cifar10", 64, 1000, 50


@dataclass
class Row:
    """One output model of one input model; ``error`` is set (and top1 None) when it failed."""

    model: str
    variant: str
    family: str  # fp32 | ort | tool
    calib_method: str | None = None
    top1: float | None = None
    drop_pts: float | None = None
    output_bytes: int | None = None
    size_ratio: float | None = None
    quantize_s: float | None = None
    peak_rss_mb: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    fused: int | None = None
    targets: int | None = None
    kernels: dict[str, int] = field(default_factory=dict)
    unfused: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ModelRun(bd.ModelRun):
    """Everything measured on one model: calibration, preprocessing checks and the rows."""

    calib: dict[str, Any] = field(default_factory=dict)
    prep_check: dict[str, Any] = field(default_factory=dict)
    ort_preprocess: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line and fill in the --quick defaults."""
    p = bd.new_parser(__doc__)
    p.add_argument("--models", help=f"comma list (default: {','.join(MODELS)})")
    p.add_argument("--ort-methods", default=",".join(ORT_METHODS), help="onnxruntime calibrate methods")
    p.add_argument("--tool-methods", default=",".join(TOOL_METHODS), help="onnx_mixquant calib methods")
    p.add_argument("--calib-size", type=int, help="calibration images (default 256; --quick 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--limit", type=int, help="evaluate on N images, evenly spaced over the set")
    p.add_argument("--prep-check", type=int, default=500, help="eval images of the preprocessing check")
    p.add_argument("--latency-runs", type=int, help="timed runs per model (default 200; --quick 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per session before timing")
    p.add_argument("--latency-rounds", type=int, default=5, help="rounds over the models (latency)")
    p.add_argument("--rss-model", help="model of the peak-memory check (default efficientnet_lite0)")
    p.add_argument("--rss-sizes", help="calibration sizes of that check (default 128,1024)")
    p.add_argument("--child-timeout", type=int, default=3600, help="seconds per quantization subprocess")
    bd.add_io_args(p, quick_help="resnet20, 64 calib, 1000 eval images", json_name=JSON_NAME)
    p.add_argument("--batch", type=int, default=100, help="eval batch size")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--_one", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is None:
        _fill_defaults(p, args)
    return args


def _fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve --quick, validate the lists, and default the output paths."""
    args.models = (
        bd.split_list(args.models) if args.models else ([QUICK_MODEL] if args.quick else list(MODELS))
    )
    args.ort_methods, args.tool_methods = bd.split_list(args.ort_methods), bd.split_list(args.tool_methods)
    bd.check_choices(p, args.models, MODELS, "model")
    bd.check_choices(p, args.ort_methods, ORT_METHODS, "onnxruntime method")
    bd.check_choices(p, args.tool_methods, TOOL_METHODS, "onnx_mixquant method")
    if not args.tool_methods:
        p.error("--tool-methods: give at least one method")
    args.calib_size = args.calib_size or (QUICK_CALIB if args.quick else 256)
    args.latency_runs = args.latency_runs or (QUICK_RUNS if args.quick else 200)
    for name in ("calib_size", "latency_runs", "latency_rounds", "prep_check", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.quick and args.limit is None:
        args.limit = QUICK_LIMIT
    args.rss_model = args.rss_model or (QUICK_MODEL if args.quick else "efficientnet_lite0")
    if args.rss_model not in MODELS:
        p.error(f"unknown --rss-model {args.rss_model!r}")
    args.rss_sizes = [
        int(s) for s in bd.split_list(args.rss_sizes or ("64,512" if args.quick else "128,1024"))
    ]
    bd.default_outputs(args, JSON_NAME)


# ---------------------------------------------------------------------------------------------
# calibration images and preprocessing


def calib_info(files: list[Path], root: Path) -> dict[str, Any]:
    """Count, digest and relative names of the chosen calibration files (for the JSON)."""
    rel = [str(f.relative_to(root)) for f in files]
    digest = hashlib.sha1("\n".join(rel).encode()).hexdigest()[:12]
    return {"count": len(rel), "sha1": digest, "folder": str(root), "files": rel}


def pil_prep(path: Path, dataset: str) -> np.ndarray:
    """The README's preprocessing (Pillow), as the eval arrays are made."""
    with Image.open(path) as img:
        return bd.PREPROCESS[dataset](img)


def compare_prep(paths: list[Path], dataset: str, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """(Pillow arrays, onnx_mixquant preprocessing-graph arrays) of ``paths``, stacked."""
    tool = ImagePreprocessor(spec)
    a = np.stack([pil_prep(p, dataset) for p in paths])
    b = np.stack([tool(p) for p in paths])
    return a, b


def diff_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max and mean absolute difference of two preprocessed stacks, per image worst case too."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    per_image = d.reshape(len(d), -1).max(axis=1)
    return {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "images_differing": int((per_image > 0).sum()),
    }


def _predict(sess: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    """Arg-max class of every sample of ``x``."""
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)]
    )


def check_preprocessing(run: ModelRun, spec: bd.ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """FP32 top-1 on eval images preprocessed by Pillow vs by onnx_mixquant's ImagePreprocessor."""
    root = args.bench_dir / "data" / spec.dataset
    rows = bd.read_csv(root / "eval.csv")
    idx = np.unique(
        np.linspace(0, len(rows) - 1, num=min(args.prep_check, len(rows))).round().astype(np.int64)
    )
    k = len(idx)
    paths, labels = [root / rows[i][0] for i in idx], np.array([rows[i][1] for i in idx])
    pil, tool = compare_prep(paths, spec.dataset, spec.image_spec)
    sess = bd.make_session(run.fp32_path, "all", args.threads)
    pred_pil, pred_tool = (_predict(sess, x, args.batch) for x in (pil, tool))
    out = {
        "images": k,
        "top1_pil": float((pred_pil == labels).mean()),
        "top1_tool": float((pred_tool == labels).mean()),
        "predictions_differing": int((pred_pil != pred_tool).sum()),
        **diff_stats(pil, tool),
    }
    bd.log(f"[{run.name}] preprocessing check: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# quantization subprocesses


class ImageReader(CalibrationDataReader):
    """onnxruntime calibration reader: the chosen image files, Pillow-preprocessed lazily, in batches."""

    def __init__(self, files: list[Path], dataset: str, input_name: str, batch: int = 16) -> None:
        """Read ``files`` in batches of ``batch`` as feeds of ``input_name``."""
        self.files, self.dataset, self.input_name, self.batch = files, dataset, input_name, batch
        self.pos = 0
        self.fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None at the end."""
        if self.pos >= len(self.files):
            return None
        chunk = self.files[self.pos : self.pos + self.batch]
        self.pos += len(chunk)
        self.fed += len(chunk)
        return {self.input_name: np.stack([pil_prep(f, self.dataset) for f in chunk])}

    def rewind(self) -> None:
        """Start again from the first file."""
        self.pos = 0


def _child_ort(spec: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime quantize_static W8A8 QDQ of spec["model"] (already pre-processed)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    files = [Path(f) for f in Path(spec["calib"]).read_text().splitlines()]
    input_name = onnx.load(spec["model"], load_external_data=False).graph.input[0].name
    reader = ImageReader(files, MODELS[spec["name"]].dataset, input_name)
    t0 = time.perf_counter()
    quantize_static(
        model_input=spec["model"],
        model_output=spec["out"],
        calibration_data_reader=reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[spec["method"]]),
        calibration_providers=["CPUExecutionProvider"],
    )
    return {"quantize_s": time.perf_counter() - t0, "details": {"images_fed": reader.fed}}


def tool_config(
    method: str, calib_size: int, symmetric: bool | None, target_bits: float | None
) -> QuantConfig:
    """The onnx_mixquant config of one W8A8 (target_bits None) or MixQuant W?A8 variant."""
    if target_bits is None:
        search = SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=8, target_bits=None)
    else:
        search = SearchConfig(target_bits=target_bits)
    return QuantConfig(
        quantizer=QuantizerConfig(
            symmetry=None if symmetric is None else Symmetry.SYMMETRIC if symmetric else Symmetry.ASYMMETRIC
        ),
        search=search,
        activations=ActivationConfig(enabled=True, method=TOOL_METHODS[method], calib_size=calib_size),
        # off: this section compares calibration with onnxruntime's quantize_static, which has no
        # bias correction; the recon section measures the correction (BiasConfig's default).
        bias=BiasConfig(mode=BiasCorrection.OFF),
        validate=ValidateConfig(enabled=False),
    )


def _child_tool(spec: dict[str, Any]) -> dict[str, Any]:
    """onnx_mixquant quantize() with activations, on the list of chosen calibration images."""
    files = [Path(f) for f in Path(spec["calib"]).read_text().splitlines()]
    cfg = tool_config(spec["method"], len(files), spec["symmetric"], spec["target_bits"])
    image_spec = MODELS[spec["name"]].image_spec
    t0 = time.perf_counter()
    report = quantize(spec["model"], spec["out"], cfg, calib=files, image_spec=image_spec)
    return {"quantize_s": time.perf_counter() - t0, "details": report_details(report)}


def report_details(report: Report) -> dict[str, Any]:
    """What the JSON keeps of an onnx_mixquant report: bits, timings, activations, fusion."""
    widths = Counter("float" if w.bits is None else f"{w.bits}b" for w in report.weights)
    out: dict[str, Any] = {
        "average_bits": report.average_bits,
        "storage_bits": report.storage_bits,
        "widths": dict(sorted(widths.items())),
        "timings_s": dict(report.timings_s),
        "warnings": list(report.warnings),
    }
    a = report.activations
    if a is not None:
        out["activations"] = {
            "method": a.method,
            "dtype": a.dtype,
            "num_samples": a.num_samples,
            "calib_source": a.calib_source,
            "provider": a.provider,
            "tensors": [[t.name, t.rmin, t.rmax, t.scale, t.zero_point] for t in a.tensors],
            "skipped": [list(s) for s in a.skipped],
            "compute_nodes": len(a.compute_nodes),
            "report_fused": None if a.fusion is None else len(a.fusion.fused),
            "report_unfused": None if a.fusion is None else dict(a.fusion.unfused),
        }
    return out


def _child_work(spec: dict[str, Any]) -> dict[str, Any]:
    """The work of a ``--_one`` subprocess by ``spec["kind"]``: ort, tool, or (noop) nothing."""
    if spec["kind"] == "ort":
        return _child_ort(spec)
    if spec["kind"] == "tool":
        return _child_tool(spec)
    return {}


# ---------------------------------------------------------------------------------------------
# one model


def ort_preprocess(src: Path, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """onnxruntime's quant_pre_process (shape inference + optimisation); the input model if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = tmp / f"{src.stem}.ort_pre.onnx"
    t0 = time.perf_counter()
    try:
        quant_pre_process(str(src), str(dst))
    except Exception as e:  # recorded; onnxruntime then quantizes the original model
        bd.log(f"[{src.stem}] quant_pre_process FAILED, using the original model:\n{traceback.format_exc()}")
        return src, {"done": False, "error": f"{type(e).__name__}: {e}"}
    info = {"done": True, "seconds": time.perf_counter() - t0, "nodes_before": _count_nodes(src)}
    info["nodes_after"] = _count_nodes(dst)
    bd.log(f"[{src.stem}] quant_pre_process done in {info['seconds']:.2f} s")
    return dst, info


def _count_nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def fusion_probe(path: Path) -> dict[str, Any]:
    """onnxruntime CPU at ORT_ENABLE_ALL: which Conv/Gemm/MatMul nodes became integer kernels."""
    model = ir.load(path)
    targets = [name for node, name in node_names(model).items() if node.op_type in COMPUTE_OPS]
    res = check_fusion(path, targets)
    if res is None:
        return {}
    return {
        "fused": len(res.fused),
        "targets": len(targets),
        "kernels": dict(sorted(Counter(res.fused.values()).items())),
        "unfused": dict(res.unfused),
    }


def evaluate_row(row: Row, path: Path, run: ModelRun, fp32: Row | None, args: argparse.Namespace) -> None:
    """Top-1, drop, size and fused kernels of the model at ``path``, into ``row``."""
    sess = bd.make_session(path, "all", args.threads)
    row.top1 = bd.top1(sess, run.data, args.batch, f"{run.name} {row.variant}")
    row.output_bytes = path.stat().st_size
    if fp32 is not None and fp32.top1 is not None and fp32.output_bytes:
        row.drop_pts = 100.0 * (row.top1 - fp32.top1)
        row.size_ratio = row.output_bytes / fp32.output_bytes
    if row.family != "fp32":
        probe = fusion_probe(path)
        row.fused, row.targets = probe.get("fused"), probe.get("targets")
        row.kernels, row.unfused = probe.get("kernels", {}), probe.get("unfused", {})


def quantize_variant(
    row: Row, spec: dict[str, Any], run: ModelRun, tmp: Path, args: argparse.Namespace
) -> Path:
    """Run the row's quantization subprocess and evaluate its output; failures go into ``row.error``."""
    out = tmp / f"{run.name}.{row.variant}.onnx"
    spec.update(name=run.name, out=str(out), method=row.calib_method)
    bd.log(f"[{run.name} {row.variant}] quantizing (subprocess)")
    try:
        result = bd.run_child(__file__, spec, tmp, args.child_timeout)
        row.peak_rss_mb = result.get("vm_hwm_mb")
        row.details.update(result.get("details", {}))
        if result.get("error"):
            raise RuntimeError(f"quantization failed in the subprocess:\n{result['error']}")
        row.quantize_s = result["quantize_s"]
        rss = bd.fmt(row.peak_rss_mb, ".0f")
        bd.log(f"[{run.name} {row.variant}] quantized in {row.quantize_s:.2f} s, peak RSS {rss} MB")
        evaluate_row(row, out, run, run.rows[0], args)
    except Exception as e:  # the bench records library failures and goes on with the next variant
        row.error = "".join(traceback.format_exception(e))
        bd.log(f"[{run.name} {row.variant}] FAILED:\n{row.error}")
    return out


def best_of(rows: list[Row], family: str, prefix: str = "") -> Row | None:
    """The row of ``family`` (variant starting with ``prefix``, symmetric-weight rows left out) with the
    highest top-1; the first such row on a tie."""
    ok = [
        r
        for r in rows
        if r.family == family
        and r.variant.startswith(prefix)
        and "-asym-" not in r.variant
        and r.top1 is not None
    ]
    return max(ok, key=lambda r: r.top1 or 0.0) if ok else None


def model_variants(
    run: ModelRun, calib_list: Path, pre: Path, tmp: Path, args: argparse.Namespace
) -> dict[str, Path]:
    """Quantize and evaluate every variant of one model; returns variant -> output path."""
    paths: dict[str, Path] = {}
    for m in args.ort_methods:
        row = Row(run.name, f"ort-{m}", "ort", m)
        run.rows.append(row)
        job: dict[str, Any] = {"kind": "ort", "model": str(pre), "calib": str(calib_list)}
        paths[row.variant] = quantize_variant(row, job, run, tmp, args)
    tool: dict[str, Any] = {"kind": "tool", "model": str(run.fp32_path), "calib": str(calib_list)}
    tool.update(symmetric=None, target_bits=None)  # None: the tool's default grid
    for m in args.tool_methods:
        row = Row(run.name, f"mq-w8a8-{m}", "tool", m)
        run.rows.append(row)
        paths[row.variant] = quantize_variant(row, dict(tool), run, tmp, args)
    best = best_of(run.rows, "tool", "mq-w8a8-")
    m = best.calib_method if best is not None and best.calib_method else args.tool_methods[0]
    for variant, extra in (
        (f"mq-w4a8-{m}", {"target_bits": 4.0}),
        (f"mq-w8a8-asym-{m}", {"symmetric": False}),
    ):
        row = Row(run.name, variant, "tool", m)
        run.rows.append(row)
        paths[variant] = quantize_variant(row, {**tool, **extra}, run, tmp, args)
    return {k: p for k, p in paths.items() if p.is_file()}


def measure_latency(paths: dict[str, Path], x: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Median batch-1 latency (ms) of each model, the models interleaved round by round.

    Each of ``args.latency_rounds`` rounds visits every model (in an order rotated each round):
    opens a session, runs ``args.warmup`` untimed and ``latency_runs / latency_rounds`` timed runs,
    and closes it, so that only one session (and thread pool) exists at a time. With every session
    open at once, the idle sessions' intra-op threads keep spinning and share the two cores with the
    timed one (measured on resnet56: FP32 read 1.4 to 2.7 ms depending on the interleave, 1.37 ms
    alone).
    """
    keys = list(paths)
    times: dict[str, list[float]] = {k: [] for k in paths}
    per_round = -(-args.latency_runs // args.latency_rounds)
    for i in range(args.latency_rounds):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            times[k] += _time_runs(paths[k], x, args.warmup, per_round, args.threads)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _time_runs(path: Path, x: np.ndarray, warmup: int, runs: int, threads: int) -> list[float]:
    """Seconds of each of ``runs`` timed runs of a fresh session, after ``warmup`` untimed ones."""
    sess = bd.make_session(path, "all", threads)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append(time.perf_counter() - t0)
    del sess
    return out


def add_latency(run: ModelRun, paths: dict[str, Path], args: argparse.Namespace) -> None:
    """Latency and its ratio to FP32 for every row that was evaluated."""
    ok = {r.variant: paths[r.variant] for r in run.rows if r.top1 is not None and r.variant in paths}
    bd.log(f"[{run.name}] latency: {len(ok)} models x {args.latency_runs} runs, interleaved in blocks")
    lat = measure_latency(ok, run.data.x[:1], args)
    fp32 = lat.get("fp32")
    for r in run.rows:
        r.latency_ms = lat.get(r.variant)
        if r.latency_ms is not None and fp32:
            r.latency_ratio = r.latency_ms / fp32


def run_model(name: str, tmp: Path, args: argparse.Namespace, refs: dict[str, Any]) -> ModelRun:
    """Preprocessing check, FP32, every quantized variant and the interleaved latency of one model."""
    spec = MODELS[name]
    data = bd.subset(bd.load_eval_set(args.bench_dir, spec.dataset, args.cache_dir), args.limit)
    ref = refs.get(name, {}).get("top1_eval")
    run = ModelRun(name, args.bench_dir / "models" / f"{name}.onnx", data, ref)
    folder = args.bench_dir / "data" / spec.dataset / "calib"
    files = bd.choose_calib(folder, args.calib_size, args.seed)
    calib_list = tmp / f"{name}.calib.txt"
    calib_list.write_text("\n".join(str(f) for f in files))
    run.calib = calib_info(files, folder)
    run.calib["prep_diff_pil_vs_tool"] = diff_stats(*compare_prep(files, spec.dataset, spec.image_spec))
    run.prep_check = check_preprocessing(run, spec, args)
    fp32 = Row(name, "fp32", "fp32")
    run.rows.append(fp32)
    bd.log(f"[{name} fp32] evaluating")
    evaluate_row(fp32, run.fp32_path, run, None, args)
    fp32.drop_pts, fp32.size_ratio = 0.0, 1.0
    pre, run.ort_preprocess = ort_preprocess(run.fp32_path, tmp)
    paths = {"fp32": run.fp32_path, **model_variants(run, calib_list, pre, tmp, args)}
    add_latency(run, paths, args)
    return run


def rss_flatness(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of onnx_mixquant W8A8 (minmax) on one model at several calibration sizes."""
    name, spec = args.rss_model, MODELS[args.rss_model]
    folder = args.bench_dir / "data" / spec.dataset / "calib"
    out: dict[str, Any] = {"model": name, "method": "minmax", "runs": []}
    for size in args.rss_sizes:
        files = bd.choose_calib(folder, size, args.seed)
        calib_list = tmp / f"rss.{size}.calib.txt"
        calib_list.write_text("\n".join(str(f) for f in files))
        job = {"kind": "tool", "name": name, "model": str(args.bench_dir / "models" / f"{name}.onnx")}
        job.update(calib=str(calib_list), out=str(tmp / f"rss.{size}.onnx"), method="minmax")
        job.update(symmetric=False, target_bits=None)
        bd.log(f"[rss {name}] W8A8 minmax with {len(files)} calibration images (subprocess)")
        result = bd.run_child(__file__, job, tmp, args.child_timeout)
        rss = result.get("vm_hwm_mb")
        acts = result.get("details", {}).get("activations", {})
        out["runs"].append(
            {
                "calib_size": len(files),
                "peak_rss_mb": rss,
                "quantize_s": result.get("quantize_s"),
                "num_samples": acts.get("num_samples"),
                "error": result.get("error"),
            }
        )
        bd.log(f"[rss {name}] {len(files)} images: peak RSS {rss:.0f} MB")
    base = bd.run_child(__file__, {"kind": "noop"}, tmp, args.child_timeout).get("vm_hwm_mb")
    out["baseline_imports_rss_mb"] = base
    return out


# ---------------------------------------------------------------------------------------------
# output


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    return {
        **bd.machine_facts(),
        "ort_intra_op_num_threads": args.threads,
    }


def _kernels(r: Row) -> str:
    if r.fused is None or r.targets is None:
        return "-"
    kinds = ", ".join(f"{k} {v}" for k, v in r.kernels.items())
    return f"{r.fused}/{r.targets}" + (f" ({kinds})" if kinds else "")


def row_note(r: Row, run: ModelRun) -> str:
    """'best ORT' / 'best onnx_mixquant W8A8' marks."""
    marks = []
    for fam, prefix, text in (("ort", "ort-", "best ORT W8A8"), ("tool", "mq-w8a8-", "best mixquant W8A8")):
        best = best_of(run.rows, fam, prefix)
        if best is r:
            marks.append(f"**{text}**")
    return ", ".join(marks)


def row_cells(r: Row, run: ModelRun) -> list[str]:
    """Markdown cells of one row."""
    if r.error is not None:
        last = r.error.strip().splitlines()[-1]
        return [r.variant, f"error: {last}"] + ["-"] * (len(TABLE_HEAD) - 2)
    return [
        r.variant,
        bd.fmt(r.top1, ".4f"),
        bd.fmt(r.drop_pts, "+.2f"),
        bd.fmt(None if r.output_bytes is None else r.output_bytes / 1e6, ".3f"),
        bd.fmt(r.size_ratio, ".3f"),
        bd.fmt(r.quantize_s, ".2f"),
        bd.fmt(r.peak_rss_mb, ".0f"),
        bd.fmt(r.latency_ms, ".3f"),
        bd.fmt(r.latency_ratio, ".2f"),
        _kernels(r),
        row_note(r, run),
    ]


TABLE_HEAD = [
    "variant",
    "top-1",
    "vs FP32 (pts)",
    "MB",
    "x FP32 file",
    "quantize s",
    "peak RSS MB",
    "latency ms",
    "x FP32 latency",
    "integer kernels (fused/Conv+Gemm+MatMul)",
    "note",
]


def _pair(ours: Row | None, theirs: Row | None) -> dict[str, Any]:
    """Accuracy (0.2-point margin) and latency of one onnx_mixquant row against one onnxruntime row."""
    if ours is None or theirs is None or ours.top1 is None or theirs.top1 is None:
        return {}
    d = 100.0 * (ours.top1 - theirs.top1)
    rel = None
    if ours.latency_ratio is not None and theirs.latency_ratio:
        rel = ours.latency_ratio / theirs.latency_ratio - 1.0
    return {
        "ours": ours.variant,
        "theirs": theirs.variant,
        "top1_diff_pts": d,
        "within_0_2_or_better": d >= -0.2,
        "latency_ratio_ours": ours.latency_ratio,
        "latency_ratio_theirs": theirs.latency_ratio,
        "latency_rel_diff": rel,
        "latency_no_worse": None if rel is None else rel <= 0.0,
        "latency_within_tolerance": None if rel is None else rel <= LATENCY_TOLERANCE,
    }


def verdict(run: ModelRun) -> dict[str, Any]:
    """Best onnx_mixquant W8A8 (and its asymmetric-weight twin) vs the best onnxruntime W8A8."""
    ours, theirs = best_of(run.rows, "tool", "mq-w8a8-"), best_of(run.rows, "ort")
    asym = next((r for r in run.rows if r.variant.startswith("mq-w8a8-asym-")), None)
    return {"best": _pair(ours, theirs), "asymmetric_weights": _pair(asym, theirs)}


def _sentence(v: dict[str, Any], what: str) -> str:
    acc = "within 0.2 pts or better" if v["within_0_2_or_better"] else "**more than 0.2 pts worse**"
    rel = v["latency_rel_diff"]
    if rel is None:
        lat = "not compared"
    elif rel <= 0.0:
        lat = f"{rel:+.1%}: no slower"
    elif rel <= LATENCY_TOLERANCE:
        lat = f"{rel:+.1%}: the same within {LATENCY_TOLERANCE:.0%}"
    else:
        lat = f"{rel:+.1%}: **slower**"
    return (
        f"{what} `{v['ours']}` vs best onnxruntime `{v['theirs']}`: {v['top1_diff_pts']:+.2f} pts top-1 "
        f"({acc}); latency {bd.fmt(v['latency_ratio_ours'], '.2f')}x vs "
        f"{bd.fmt(v['latency_ratio_theirs'], '.2f')}x FP32 ({lat})"
    )


def summary_line(run: ModelRun) -> str:
    """Sentences comparing the best W8A8 of each tool, and the symmetric-weight variant."""
    v = verdict(run)
    parts = []
    if v["best"]:
        parts.append(_sentence(v["best"], "best onnx_mixquant W8A8"))
    if v["asymmetric_weights"]:
        parts.append(_sentence(v["asymmetric_weights"], "with asymmetric uint8 weights"))
    return "Summary: " + ("; ".join(parts) if parts else "no complete onnx_mixquant / onnxruntime pair") + "."


def prep_line(run: ModelRun) -> str:
    """The preprocessing and calibration-input comparison of one model, as a sentence."""
    p, c = run.prep_check, run.calib.get("prep_diff_pil_vs_tool", {})
    pre = run.ort_preprocess
    pre_txt = "applied" if pre.get("done") else f"FAILED ({pre.get('error')}), original model used"
    return (
        f"Calibration: {run.calib.get('count')} images (seed sample, sha1 {run.calib.get('sha1')}); "
        f"Pillow vs onnx_mixquant preprocessing on them: max |diff| {bd.fmt(c.get('max_abs_diff'), '.3g')}, "
        f"{c.get('images_differing')} images differ. FP32 on {p.get('images')} eval images: top-1 "
        f"{bd.fmt(p.get('top1_pil'), '.4f')} (Pillow) vs {bd.fmt(p.get('top1_tool'), '.4f')} (onnx_mixquant "
        f"ImagePreprocessor), {p.get('predictions_differing')} predictions differ, max |diff| "
        f"{bd.fmt(p.get('max_abs_diff'), '.3g')}. onnxruntime `quant_pre_process`: {pre_txt}."
    )


def model_table(run: ModelRun) -> list[str]:
    """One model's markdown heading, notes, table and summary."""
    ref = f"; README FP32 reference {run.reference_top1:.4f}" if run.reference_top1 is not None else ""
    lines = [f"### {run.name}", "", f"{len(run.data.y):,} eval images{ref}. {prep_line(run)}", ""]
    lines += ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(row_cells(r, run)) + " |" for r in run.rows]
    return [*lines, "", summary_line(run), ""]


def rss_table(rss: dict[str, Any]) -> list[str]:
    """The peak-memory flatness table."""
    lines = [
        "### Peak memory vs calibration size",
        "",
        f"onnx_mixquant W8A8 ({rss['method']}) on {rss['model']}, each run in a fresh subprocess "
        f"(peak RSS = the subprocess's VmHWM; a subprocess that only imports the modules peaks at "
        f"{bd.fmt(rss.get('baseline_imports_rss_mb'), '.0f')} MB).",
        "",
        "| calibration images | peak RSS MB | quantize s |",
        "|---|---|---|",
    ]
    for r in rss["runs"]:
        err = f" error: {r['error'].strip().splitlines()[-1]}" if r.get("error") else ""
        rss_mb, secs = bd.fmt(r["peak_rss_mb"], ".0f"), bd.fmt(r["quantize_s"], ".1f")
        lines.append(f"| {r['calib_size']} | {rss_mb}{err} | {secs} |")
    return [*lines, ""]


NOTES = (
    "All quantized variants are 8-bit activations (uint8 asymmetric, per tensor) and per-channel weights. "
    "ort-*: `quantize_static(quant_format=QDQ, per_channel=True, activation_type=QUInt8, "
    "weight_type=QInt8, calibrate_method=...)` with onnxruntime's defaults otherwise (it also quantizes "
    "Add, Clip, pooling etc.), on the model `quant_pre_process` wrote, fed by a CalibrationDataReader "
    "over the chosen images with the README's (Pillow) preprocessing, batches of 16. mq-*: "
    "`onnx_mixquant.quantize(..., calib=[the same image files], image_spec=...)`: the tool decodes "
    "them with its own preprocessing graph; w8a8 = uniform 8-bit weights on the tool's default grid "
    "with A8 (symmetric int8), w4a8 = MixQuant "
    "budget rule at 4.0 average weight bits, asym = asymmetric uint8 weights with zero points; "
    "the suffix is the activation "
    "calibration method (w4a8 / asym use the best mq-w8a8 method, picked on eval top-1). *quantize s*: "
    "wall time of the quantize call in its subprocess (imports, and onnxruntime's pre-processing, "
    "excluded; onnx_mixquant's includes its fusion probe). *peak RSS*: VmHWM of the whole subprocess, "
    "imports included. *latency*: median of batch-1 runs, the variants of a model interleaved in "
    "{rounds} rounds, each opening one session per model in turn (order rotated every round; one "
    "session alive at a time), {warmup} warm-up then {per_round} timed runs; onnxruntime's default "
    "thread spinning. "
    "*integer kernels*: Conv/Gemm/MatMul nodes of the output model that onnxruntime CPU "
    "(ORT_ENABLE_ALL) turned into QLinearConv / QGemm / ... (onnx_mixquant.validate._fusion.check_fusion)."
)


def render_section(runs: list[ModelRun], rss: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    """The whole BENCHMARKS.md section, markers included."""
    m = meta["machine"]
    lines = [
        bd.mark(SECTION, "start"),
        "## Static W8A8 quantization: onnxruntime quantize_static vs onnx_mixquant",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (total {meta['total_s']:.0f} s).",
        "",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']} ({m['ort_provider']}, ORT_ENABLE_ALL, {m['ort_intra_op_num_threads']} "
        f"intra-op threads; eval batch {meta['batch']}; latency batch 1, {meta['latency_runs']} timed "
        f"runs per model), onnx {m['onnx']}, numpy {m['numpy']}, "
        f"{bd.code_version(m)}.",
        "",
        NOTES.format(
            rounds=meta["latency_rounds"],
            warmup=meta["warmup"],
            per_round=-(-meta["latency_runs"] // meta["latency_rounds"]),
        )
        + f" Raw results: `{meta['json_rel']}`.",
        "",
    ]
    for run in runs:
        lines += model_table(run)
    if rss is not None:
        lines += rss_table(rss)
    return "\n".join([*lines, bd.mark(SECTION, "end")]) + "\n"


def results_json(runs: list[ModelRun], rss: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    """The raw results as JSON text."""
    doc = bd.results_doc(
        meta,
        runs,
        lambda run: {
            "calibration": run.calib,
            "preprocessing_check": run.prep_check,
            "ort_quant_pre_process": run.ort_preprocess,
            "verdict": verdict(run),
            "rows": [asdict(r) for r in run.rows],
        },
    )
    doc["rss_flatness"] = rss
    return json.dumps(doc, indent=2, default=str) + "\n"


#: (name, format spec) of the stdout table's columns.
STDOUT_COLUMNS = (
    ("model", "<19"),
    ("variant", "<24"),
    ("top-1", ">7"),
    ("dpts", ">6"),
    ("MB", ">6"),
    ("q s", ">7"),
    ("RSS MB", ">7"),
    ("lat ms", ">7"),
    ("xFP32", ">6"),
    ("fused", ">6"),
)


def stdout_table(runs: list[ModelRun], rss: dict[str, Any] | None) -> str:
    """A compact fixed-width table of every row, then the verdicts and the RSS check."""
    lines = bd.table_head(STDOUT_COLUMNS)
    for run in runs:
        for r in run.rows:
            mb = None if r.output_bytes is None else r.output_bytes / 1e6
            cells = [
                run.name,
                r.variant,
                "ERROR" if r.error else bd.fmt(r.top1, ".4f"),
                bd.fmt(r.drop_pts, "+.2f"),
                bd.fmt(mb, ".3f"),
                bd.fmt(r.quantize_s, ".2f"),
                bd.fmt(r.peak_rss_mb, ".0f"),
                bd.fmt(r.latency_ms, ".3f"),
                bd.fmt(r.latency_ratio, ".2f"),
                "-" if r.fused is None else f"{r.fused}/{r.targets}",
            ]
            lines.append(bd.table_row(STDOUT_COLUMNS, cells))
        lines.append(f"  {summary_line(run)}")
    if rss is not None:
        sizes = ", ".join(
            f"{r['calib_size']} images {bd.fmt(r['peak_rss_mb'], '.0f')} MB" for r in rss["runs"]
        )
        base = bd.fmt(rss["baseline_imports_rss_mb"], ".0f")
        lines.append(f"peak RSS {rss['model']} W8A8 minmax: {sizes} (imports only {base} MB)")
    return "\n".join(lines)


def write_outputs(
    runs: list[ModelRun], rss: dict[str, Any] | None, meta: dict[str, Any], args: argparse.Namespace
) -> None:
    """BENCHMARKS.md section and raw JSON, both written atomically."""
    bd.write_section(args.out, render_section(runs, rss, meta), SECTION)
    bd.write_atomic(args.json, results_json(runs, rss, meta).encode())
    bd.log(f"wrote {args.out} and {args.json}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any quantization or evaluation failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._one is not None:
        return bd.child_main(args._one, _child_work)
    refs = bd.load_references(args.bench_dir)
    t0 = time.perf_counter()
    started = bd.now_iso()
    with tempfile.TemporaryDirectory(prefix="mixquant-bench-static-") as tmp:
        runs = [run_model(name, Path(tmp), args, refs) for name in args.models]
        rss = rss_flatness(Path(tmp), args) if args.rss_sizes else None
    meta = {
        "command": bd.command_line(__file__, argv),
        "date": started,
        "total_s": time.perf_counter() - t0,
        "machine": machine_info(args),
        "limit": args.limit,
        "calib_size": args.calib_size,
        "seed": args.seed,
        "batch": args.batch,
        "warmup": args.warmup,
        "latency_runs": args.latency_runs,
        "latency_rounds": args.latency_rounds,
        "json_rel": bd.relative_path(args.json, args.out.parent)
        if args.out is not None and args.json
        else None,
    }
    if args.out is not None:
        write_outputs(runs, rss, meta, args)
    print(stdout_table(runs, rss))
    print(f"total {meta['total_s']:.1f} s")
    return bd.exit_status([f"{r.model} {r.variant}" for run in runs for r in run.rows if r.error])


if __name__ == "__main__":
    sys.exit(main())
