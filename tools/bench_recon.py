"""Regenerate the BRECQ section of BENCHMARKS.md: nearest vs learned rounding, uniform vs MixQuant widths.

Dev-only script (needs Pillow; the ``onnx_mixquant`` package never imports it). It reads the real
models and labelled images of the benchmark folder (``../shared/bench``, see its README.md), which is
never copied into the repository. From the repository root::

    python tools/bench_recon.py                     # resnet20, W4/W3 x weight-only/A8, 16 quantizations
    python tools/bench_recon.py --models resnet56_cifar10 --bits 4 --acts a8
    python tools/bench_recon.py --quick             # resnet20 W4A8, 2000 eval images, 200 iterations
    python tools/bench_recon.py --bits 4 --acts a8 --preset cpu     # the cpu preset (2000 iterations)
    python tools/bench_recon.py --bits 4 --methods uniform+brecq,mixquant+brecq --seed 1
    python tools/bench_recon.py --bits 4 --bias-correction all    # with empirical bias correction
    python tools/bench_recon.py --bits 4 --acts a8 --act-iters 125  # A8 BRECQ learning activation steps
    python tools/bench_recon.py --bits 3 --acts w --scale-method mse  # MSE-searched weight scales
    python tools/bench_recon.py --preset paper --device cuda     # on a GPU (rows say "device cuda")

For each model, target width B (``--bits``) and activation mode (``--acts``: ``w`` weight-only,
``a8`` 8-bit activations calibrated with the percentile method), four methods at the same average
weight bits:

==================  ========================================================================
method              configuration
==================  ========================================================================
uniform+nearest     every weight at B bits, nearest rounding (the plain baseline)
mixquant+nearest    MixQuant budget rule at B average bits (parameter-weighted), nearest rounding
uniform+brecq       every weight at B bits, BRECQ block reconstruction (learned rounding)
mixquant+brecq      MixQuant budget rule at B average bits, then BRECQ
==================  ========================================================================

Weight grid: ``QuantizerConfig.symmetry`` is left at None, which the library resolves to asymmetric
(uint, zero-point) weights when weight-only and, with A8, symmetric int8 for 5-8 bits and asymmetric for
2-4 bits; the grid each row used is read back from the report's settings. Besides top-1, each row
records its agreement with the FP32 model's predictions and the mean KL divergence from FP32, and which
eval images it gets right, so that every comparison is paired (McNemar SD) over the same images. Every
quantization runs in a fresh subprocess (``--_one``) that reports its own peak RSS (``VmHWM``); the
parent evaluates top-1 with onnxruntime CPU (ORT_ENABLE_ALL). Results are MERGED into
``benchmarks/recon.json`` by (model, bits, acts, method, BRECQ setting: preset and calibration seed),
each row keeping the command that produced it, and the BENCHMARKS.md section between the ``bench:recon``
markers is rendered from every stored row, so separate invocations accumulate.
"""

from __future__ import annotations

import argparse
import json
import logging
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

from onnx_mixquant import (
    ActivationConfig,
    CalibMethod,
    QuantConfig,
    Report,
    SearchConfig,
    SearchRule,
    ValidateConfig,
    quantize,
)
from onnx_mixquant.config import (
    RECON_PRESETS,
    BiasConfig,
    BiasCorrection,
    Device,
    IterSplit,
    QuantizerConfig,
    ReconConfig,
    RoundingMethod,
    ScaleMethod,
)

SECTION = "recon"
JSON_NAME = "recon.json"
SCHEMA = 1
PRESET = "cpu-fast"
#: Order of the BRECQ settings in the tables (other settings follow).
SETTING_ORDER: tuple[str, ...] = ("cpu-fast", "cpu", "paper")
METHODS: tuple[str, ...] = ("uniform+nearest", "mixquant+nearest", "uniform+brecq", "mixquant+brecq")
#: Also selectable with --methods: BRECQ with the Fisher-weighted error (--fisher).
ALL_METHODS: tuple[str, ...] = (*METHODS, "uniform+brecq-fisher", "mixquant+brecq-fisher")
ACTS: tuple[str, ...] = ("w", "a8")
#: The accuracy goal of the summary: W4A8 MixQuant+BRECQ on this model within GOAL_PTS of FP32.
GOAL_MODEL, GOAL_BITS, GOAL_ACTS, GOAL_PTS = "resnet20_cifar10", 4, "a8", 1.0
QUICK_MODEL, QUICK_BITS, QUICK_ACTS, QUICK_LIMIT, QUICK_ITERS = "resnet20_cifar10", "4", "a8", 2000, 200
#: Progress lines of a reconstruction unit: every this share of its iterations.
PROGRESS_STEP = 0.25


MODELS = bd.MODELS


@dataclass
class Row:
    """One quantized model; ``error`` is set (and top1 None) when quantization or evaluation failed."""

    model: str
    bits: int
    acts: str
    method: str
    run: str = ""
    weight_grid: str | None = None
    top1: float | None = None
    fp32_top1: float | None = None
    drop_pts: float | None = None
    eval_images: int | None = None
    #: Top-1 agreement with the FP32 model and mean KL(FP32 || quantized) over the eval images.
    agree_fp32: float | None = None
    kl_fp32: float | None = None
    #: Which eval images it classifies correctly (``bd.pack_hits``), for paired comparisons.
    hits: str | None = None
    average_bits: float | None = None
    storage_bits: float | None = None
    output_bytes: int | None = None
    quantize_s: float | None = None
    recon_s: float | None = None
    peak_rss_mb: float | None = None
    iters_per_s: float | None = None
    units_learned: int | None = None
    units_total: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> tuple[str, int, str, str, str]:
        """The merge key of the JSON: (model, bits, acts, method, BRECQ setting)."""
        return row_key(asdict(self))


def preset_label(settings: dict[str, Any]) -> str:
    """The BRECQ setting of a row: a preset name, or 'N it, S samples, batch B' when none matches."""
    found = (settings.get("iters"), settings.get("samples"), settings.get("batch"))
    for name, preset in RECON_PRESETS.items():
        if found == preset:
            return name
    return f"{found[0]} it, {found[1]} samples, batch {found[2]}"


def seed_of(settings: dict[str, Any]) -> int:
    """The calibration seed of a row (0 for rows stored before seeds were recorded)."""
    return int(settings.get("seed") or 0)


def seed_suffix(settings: dict[str, Any]) -> str:
    """', calibration seed N' when the seed is not 0, else ''."""
    seed = seed_of(settings)
    return f", calibration seed {seed}" if seed else ""


def bias_suffix(settings: dict[str, Any]) -> str:
    """', bias correction MODE' when the row used one, else '' (rows stored before it: off)."""
    mode = settings.get("bias_correction") or BiasCorrection.OFF.value
    return "" if mode == BiasCorrection.OFF.value else f", bias correction {mode}"


def defaults_suffix(settings: dict[str, Any]) -> str:
    """', LSQ N it' when activation steps were learned; ', earlier defaults' for rows stored before
    ``act_iters`` was recorded: their A8 BRECQ rows learned the steps for a quarter of the iterations,
    and their bias correction 'all' ran only after BRECQ, not inside it unit by unit."""
    if "act_iters" not in settings:
        return ", earlier defaults"
    n = int(settings["act_iters"] or 0)
    return f", LSQ {n} it" if n else ""


def scale_suffix(settings: dict[str, Any]) -> str:
    """', MSE weight scales' for rows quantized with ``--scale-method mse``, else '' (min-max)."""
    method = settings.get("scale_method") or ScaleMethod.MINMAX.value
    return "" if method == ScaleMethod.MINMAX.value else f", {method.upper()} weight scales"


def split_suffix(settings: dict[str, Any]) -> str:
    """', iterations split by error' for rows run with ``--recon-split error``, else '' (even: rows
    stored before the option existed split evenly)."""
    split = settings.get("recon_split") or IterSplit.EVEN.value
    return "" if split == IterSplit.EVEN.value else f", iterations split by {split}"


def device_suffix(settings: dict[str, Any]) -> str:
    """', device cuda' for rows quantized with ``--device cuda|auto``, else '' (cpu: rows stored
    before the option existed ran on the CPU here)."""
    device = settings.get("device") or Device.CPU.value
    return "" if device == Device.CPU.value else f", device {device}"


def variant_suffix(settings: dict[str, Any], *, bias: bool = True, seed: bool = True) -> str:
    """What a row's setting adds to its preset: the bias correction when used (``bias``), the
    activation-step iterations when not 0 (:func:`defaults_suffix`), the weight scale method when not
    min-max, BRECQ's iteration split when not even, the device when not the CPU and the calibration
    seed when not 0 (``seed``)."""
    return (
        (bias_suffix(settings) if bias else "")
        + defaults_suffix(settings)
        + scale_suffix(settings)
        + split_suffix(settings)
        + device_suffix(settings)
        + (seed_suffix(settings) if seed else "")
    )


def setting_label(settings: dict[str, Any]) -> str:
    """:func:`preset_label` and :func:`variant_suffix`: the row's whole setting."""
    return preset_label(settings) + variant_suffix(settings)


def group_label(bits: int, acts: str) -> str:
    """'W4A8' or 'W4 weight-only'."""
    return f"W{bits}{'A8' if acts == 'a8' else ' weight-only'}"


def row_key(r: dict[str, Any]) -> tuple[str, int, str, str, str]:
    """(model, bits, acts, method, BRECQ setting) of a stored row."""
    return (r["model"], r["bits"], r["acts"], r["method"], setting_label(r.get("settings", {})))


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line and fill in the --quick and preset defaults."""
    p = bd.new_parser(__doc__)
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default {QUICK_MODEL})")
    p.add_argument("--bits", help="comma list of average weight widths (default 4,3)")
    p.add_argument("--acts", help="comma list of activation modes: w (weight-only), a8 (default w,a8)")
    p.add_argument("--methods", help=f"comma list of {', '.join(ALL_METHODS)} (default the first four)")
    p.add_argument(
        "--preset",
        default=PRESET,
        choices=list(RECON_PRESETS),
        help=f"BRECQ preset giving the iterations, samples and batch (default {PRESET})",
    )
    p.add_argument("--iters", type=int, help="BRECQ iterations per unit (default: the preset's)")
    p.add_argument("--samples", type=int, help="BRECQ samples (default: the preset's)")
    p.add_argument("--batch", type=int, help="BRECQ batch (default: the preset's)")
    p.add_argument("--calib-size", type=int, default=256, help="activation calibration images (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument(
        "--act-iters", type=int, default=0, help="A8 BRECQ: iterations per unit learning the activation steps"
    )
    p.add_argument(
        "--bias-correction",
        default=BiasCorrection.OFF.value,
        choices=[m.value for m in BiasCorrection],
        help="empirical bias correction of every row (default off)",
    )
    p.add_argument(
        "--scale-method",
        default=ScaleMethod.MINMAX.value,
        choices=[m.value for m in ScaleMethod],
        help="weight scale rule of every row (default minmax)",
    )
    p.add_argument(
        "--recon-split",
        default=IterSplit.EVEN.value,
        choices=[m.value for m in IterSplit],
        help="BRECQ's split of the iterations between units (default even)",
    )
    p.add_argument("--limit", type=int, help="evaluate on N images, evenly spaced over the set")
    bd.add_io_args(p, quick_help="resnet20 W4A8, 2000 eval images, 200 iterations", json_name=JSON_NAME)
    p.add_argument("--eval-batch", type=int, default=100, help="eval batch size")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (evaluation)")
    p.add_argument(
        "--device",
        choices=[d.value for d in Device],
        default=Device.CPU.value,
        help="where quantization runs (the CLI's --device; default cpu); evaluation stays on the CPU",
    )
    p.add_argument("--child-timeout", type=int, default=7200, help="seconds per quantization subprocess")
    p.add_argument("--_one", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is None:
        _fill_defaults(p, args)
    return args


def _fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve --quick, validate the lists, and default the output paths."""
    q = args.quick
    args.models = bd.split_list(args.models or QUICK_MODEL)
    args.bits = [int(b) for b in bd.split_list(args.bits or (QUICK_BITS if q else "4,3"))]
    args.acts = bd.split_list(args.acts or (QUICK_ACTS if q else "w,a8"))
    args.methods = bd.split_list(args.methods or ",".join(METHODS))
    iters, samples, batch = RECON_PRESETS[args.preset]
    args.iters = args.iters or (QUICK_ITERS if q else iters)
    args.samples = args.samples or samples
    args.batch = args.batch or batch
    if q and args.limit is None:
        args.limit = QUICK_LIMIT
    bd.check_choices(p, args.models, MODELS, "model")
    bd.check_choices(p, args.methods, ALL_METHODS, "method")
    bd.check_choices(p, args.acts, ACTS, "activation mode")
    for bad in [b for b in args.bits if not 2 <= b <= 8]:
        p.error(f"--bits: {bad} is not in 2..8")
    bd.default_outputs(args, JSON_NAME)


# ---------------------------------------------------------------------------------------------
# quantization subprocess


def tool_config(spec: dict[str, Any]) -> QuantConfig:
    """The onnx_mixquant config of one (bits, acts, method) job."""
    bits, (search_kind, rounding) = spec["bits"], spec["method"].split("+")
    if search_kind == "uniform":
        search = SearchConfig(rule=SearchRule.UNIFORM, uniform_bits=bits, target_bits=None)
    else:
        search = SearchConfig(target_bits=float(bits))
    brecq = rounding.startswith("brecq")
    recon = ReconConfig(
        method=RoundingMethod.BRECQ if brecq else RoundingMethod.NEAREST,
        iters=spec["iters"],
        samples=spec["samples"],
        batch=spec["batch"],
        fisher=rounding == "brecq-fisher",
        act_iters=int(spec.get("act_iters", 0)),
        split=IterSplit(spec.get("recon_split", IterSplit.EVEN.value)),
    )
    acts = ActivationConfig(
        enabled=spec["acts"] == "a8",
        method=CalibMethod.PERCENTILE,
        calib_size=spec["calib_size"],
    )
    return QuantConfig(
        search=search,
        activations=acts,
        recon=recon,
        bias=BiasConfig(mode=BiasCorrection(spec.get("bias_correction", "off"))),
        quantizer=QuantizerConfig(scale_method=ScaleMethod(spec.get("scale_method", "minmax"))),
        validate=ValidateConfig(enabled=False),
        device=Device(spec.get("device", Device.CPU.value)),
    )


class UnitProgress:
    """Progress callback of quantize(): a stderr line per finished stage, a few per BRECQ unit."""

    def __init__(self, label: str) -> None:
        """Prefix every line with ``label``."""
        self.label = label

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        """Log ``stage`` at its end, and every PROGRESS_STEP of a unit's iterations."""
        step = max(1, int(total * PROGRESS_STEP))
        if done == total or (info and done % step == 0 and done > 0):
            bd.log(f"  [{self.label}] {stage}: {done}/{total} {info}".rstrip())


def report_details(report: Report) -> dict[str, Any]:
    """What the JSON keeps of an onnx_mixquant report: bits, grid, timings, BRECQ units."""
    widths = Counter("float" if w.bits is None else f"{w.bits}b" for w in report.weights)
    quantizer = report.settings.get("quantizer", {}) if report.settings else {}
    out: dict[str, Any] = {
        "average_bits": report.average_bits,
        "storage_bits": report.storage_bits,
        "output_bytes": report.output_bytes,
        "weight_grid": quantizer.get("symmetry"),
        "widths": dict(sorted(widths.items())),
        "timings_s": dict(report.timings_s),
        "warnings": list(report.warnings),
        "recon": None,
    }
    rec = report.reconstruction
    if rec is not None:
        out["recon"] = {
            "provider": rec.provider,
            "seconds": rec.seconds,
            "iters": rec.iters,
            "samples": rec.samples,
            "batch": rec.batch,
            "granularity": rec.granularity,
            "units": [asdict(u) for u in rec.units],
        }
    return out


def _child_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """quantize() of one job on the list of chosen calibration images."""
    files = [Path(f) for f in Path(spec["calib"]).read_text().splitlines()]
    cfg = tool_config(spec)
    needs_calib = (
        cfg.activations.enabled
        or cfg.recon.method is RoundingMethod.BRECQ
        or cfg.bias.mode is not BiasCorrection.OFF
    )
    label = f"{spec['name']} W{spec['bits']} {spec['acts']} {spec['method']}"
    t0 = time.perf_counter()
    report = quantize(
        spec["model"],
        spec["out"],
        cfg,
        calib=files if needs_calib else None,
        image_spec=MODELS[spec["name"]].image_spec,
        progress=UnitProgress(label),
    )
    return {"quantize_s": time.perf_counter() - t0, "details": report_details(report)}


def child_main(spec_path: Path) -> int:
    """Entry of a ``--_one`` subprocess: log to stderr, run one quantization, write its result JSON."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  %(name)s: %(message)s")
    return bd.child_main(spec_path, _child_quantize)


# ---------------------------------------------------------------------------------------------
# one model


def _recon_stats(row: Row, recon: dict[str, Any] | None) -> None:
    """Median iterations/s over the trained units and the learned / total unit counts."""
    if recon is None:
        return
    units = recon["units"]
    rates = [u["iters_per_second"] for u in units if u["iters"] > 0 and u["iters_per_second"] > 0]
    row.iters_per_s = statistics.median(rates) if rates else None
    row.units_learned = sum(u["rounding"] == "learned" for u in units)
    row.units_total = len(units)
    row.recon_s = recon["seconds"]


def fill_from_result(row: Row, result: dict[str, Any]) -> None:
    """Copy a child's result into ``row``; raises when the child failed."""
    row.peak_rss_mb = result.get("vm_hwm_mb")
    if result.get("error"):
        raise RuntimeError(f"quantization failed in the subprocess:\n{result['error']}")
    d = result["details"]
    row.details = d
    row.quantize_s = result["quantize_s"]
    row.average_bits, row.storage_bits = d["average_bits"], d["storage_bits"]
    row.output_bytes, row.weight_grid = d["output_bytes"], d["weight_grid"]
    _recon_stats(row, d["recon"])


def run_job(
    row: Row,
    job: dict[str, Any],
    data: bd.EvalSet,
    fp_logits: np.ndarray,
    tmp: Path,
    args: argparse.Namespace,
) -> None:
    """Quantize (subprocess) and evaluate one row against the FP32 logits; failures go into ``row.error``."""
    label = f"{row.model} W{row.bits} {row.acts} {row.method}"
    out = tmp / f"{row.model}.w{row.bits}.{row.acts}.{row.method.replace('+', '-')}.onnx"
    bd.log(f"[{label}] quantizing (subprocess)")
    try:
        fill_from_result(row, bd.run_child(__file__, {**job, "out": str(out)}, tmp, args.child_timeout))
        bd.log(f"[{label}] quantized in {row.quantize_s:.1f} s, peak RSS {bd.fmt(row.peak_rss_mb, '.0f')} MB")
        logits = bd.predict(bd.make_session(out, "all", args.threads), data, args.eval_batch, label)
        hits = logits.argmax(axis=1) == data.y
        row.top1, row.hits = float(hits.mean()), bd.pack_hits(hits)
        row.agree_fp32, row.kl_fp32 = bd.fidelity(logits, fp_logits)
        row.drop_pts = None if row.fp32_top1 is None else 100.0 * (row.top1 - row.fp32_top1)
    except Exception as e:  # the bench records library failures and goes on with the next job
        row.error = "".join(traceback.format_exception(e))
        bd.log(f"[{label}] FAILED:\n{row.error}")
    finally:
        out.unlink(missing_ok=True)


def job_settings(args: argparse.Namespace, acts: str, calib_count: int) -> dict[str, Any]:
    """The settings a row records (what its numbers depend on besides bits and method)."""
    return {
        "iters": args.iters,
        "samples": args.samples,
        "batch": args.batch,
        "calib_images": calib_count,
        "act_calib_method": CalibMethod.PERCENTILE.value if acts == "a8" else None,
        "seed": args.seed,
        "eval_limit": args.limit,
        "bias_correction": args.bias_correction,
        "act_iters": args.act_iters,
        "scale_method": args.scale_method,
        "recon_split": args.recon_split,
        "device": args.device,
    }


def run_model(name: str, tmp: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> list[Row]:
    """FP32 and every (bits, acts, method) job of one model; rows are merged and saved per group."""
    spec = MODELS[name]
    data = bd.subset(bd.load_eval_set(args.bench_dir, spec.dataset, args.cache_dir), args.limit)
    model_path = args.bench_dir / "models" / f"{name}.onnx"
    bd.log(f"[{name} fp32] evaluating on {len(data.y)} images")
    fp_logits = bd.predict(
        bd.make_session(model_path, "all", args.threads), data, args.eval_batch, f"{name} fp32"
    )
    fp_hits = fp_logits.argmax(axis=1) == data.y
    fp32 = float(fp_hits.mean())
    ctx["fp32"][name] = {
        "top1": fp32,
        "eval_images": int(len(data.y)),
        "run": ctx["run_id"],
        "hits": bd.pack_hits(fp_hits),
    }
    folder = args.bench_dir / "data" / spec.dataset / "calib"
    files = bd.choose_calib(folder, max(args.calib_size, args.samples), args.seed)
    calib_list = tmp / f"{name}.calib.txt"
    calib_list.write_text("\n".join(str(f) for f in files))
    rows: list[Row] = []
    for bits in args.bits:
        for acts in args.acts:
            group = [Row(name, bits, acts, m, ctx["run_id"], fp32_top1=fp32) for m in args.methods]
            for row in group:
                row.eval_images, row.settings = int(len(data.y)), job_settings(args, acts, len(files))
                job = {"name": name, "model": str(model_path), "calib": str(calib_list)}
                job.update(bits=bits, acts=acts, method=row.method, calib_size=len(files))
                job.update(iters=args.iters, samples=args.samples, batch=args.batch)
                job.update(bias_correction=args.bias_correction, act_iters=args.act_iters)
                job.update(scale_method=args.scale_method, recon_split=args.recon_split, device=args.device)
                run_job(row, job, data, fp_logits, tmp, args)
            rows += group
            ctx["save"](group)
    return rows


# ---------------------------------------------------------------------------------------------
# merged results


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    return {
        **{k: v for k, v in bd.machine_facts().items() if k != "ort_provider"},
        "eval_ort": f"CPUExecutionProvider, ORT_ENABLE_ALL, {args.threads} intra-op threads",
    }


def load_doc(path: Path | None) -> dict[str, Any]:
    """The stored results (an empty document when the file is absent)."""
    if path is not None and path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") == SCHEMA:
            return doc
        bd.log(f"{path}: schema {doc.get('schema')!r} is not {SCHEMA}; starting a new document")
    return {"schema": SCHEMA, "section": SECTION, "runs": {}, "fp32": {}, "rows": []}


def merge_rows(doc: dict[str, Any], rows: list[Row], run: dict[str, Any], fp32: dict[str, Any]) -> None:
    """Replace the stored rows of the same key (:func:`row_key`), then drop unreferenced runs."""
    fresh = {r.key: asdict(r) for r in rows}
    kept = [r for r in doc["rows"] if row_key(r) not in fresh]
    doc["rows"] = sorted([*kept, *fresh.values()], key=_row_order)
    doc["runs"][run["id"]] = run
    doc["fp32"].update(fp32)
    used = {r["run"] for r in doc["rows"]} | {v["run"] for v in doc["fp32"].values()}
    doc["runs"] = {k: v for k, v in doc["runs"].items() if k in used}


def _row_order(r: dict[str, Any]) -> tuple[Any, ...]:
    model = list(MODELS).index(r["model"]) if r["model"] in MODELS else len(MODELS)
    acts = ACTS.index(r["acts"]) if r["acts"] in ACTS else len(ACTS)
    method = ALL_METHODS.index(r["method"]) if r["method"] in ALL_METHODS else len(ALL_METHODS)
    label = preset_label(r["settings"])
    setting = SETTING_ORDER.index(label) if label in SETTING_ORDER else len(SETTING_ORDER)
    variant = variant_suffix(r["settings"], seed=False)
    return (model, r["model"], setting, label, variant, seed_of(r["settings"]), -r["bits"], acts, method)


def write_outputs(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """Raw JSON and the BENCHMARKS.md section, both written atomically."""
    bd.write_atomic(args.json, (json.dumps(doc, indent=2, default=str) + "\n").encode())
    bd.write_section(args.out, render_section(doc, bd.relative_path(args.json, args.out.parent)), SECTION)
    bd.log(f"wrote {args.out} and {args.json}")


# ---------------------------------------------------------------------------------------------
# rendering


def _grid(r: dict[str, Any]) -> str:
    g = r.get("weight_grid")
    short = {"asymmetric": "asym", "symmetric": "sym", "symmetric-int8": "sym 5-8b, asym 2-4b"}
    return short.get(g, g or "-")


TABLE_HEAD = [
    "W bits",
    "acts",
    "method",
    "weight grid",
    "top-1",
    "vs FP32 (pts)",
    "agree / KL vs FP32",
    "avg / stored bits",
    "quantize s",
    "peak RSS MB",
    "BRECQ it/s (median unit)",
    "units learned",
    "run",
]


def row_cells(r: dict[str, Any], run_no: dict[str, int]) -> list[str]:
    """Markdown cells of one stored row."""
    head = [f"W{r['bits']}", "A8" if r["acts"] == "a8" else "W-only", r["method"]]
    run = f"[{run_no.get(r['run'], '?')}]"
    if r.get("error"):
        last = r["error"].strip().splitlines()[-1].replace("|", "\\|")
        return [*head, "-", f"error: {last}", *["-"] * (len(TABLE_HEAD) - 6), run]
    fid = "-" if r.get("agree_fp32") is None else f"{100 * r['agree_fp32']:.2f} % / {r['kl_fp32']:.4f}"
    units = "-" if r.get("units_total") is None else f"{r['units_learned']}/{r['units_total']}"
    return [
        *head,
        _grid(r),
        bd.fmt(r.get("top1"), ".4f"),
        bd.fmt(r.get("drop_pts"), "+.2f"),
        fid,
        f"{bd.fmt(r.get('average_bits'), '.2f')} / {bd.fmt(r.get('storage_bits'), '.2f')}",
        bd.fmt(r.get("quantize_s"), ".1f"),
        bd.fmt(r.get("peak_rss_mb"), ".0f"),
        bd.fmt(r.get("iters_per_s"), ".1f"),
        units,
        run,
    ]


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and not r.get("error") and r.get("top1") is not None


def _vs(a: dict[str, Any] | None, b: dict[str, Any] | None, what: str) -> str:
    """'what: +x.xx pts (yes/no)' for top-1 of a minus b, with the paired SD and fidelity when stored."""
    if a is None or b is None or not _ok(a) or not _ok(b):
        return f"{what}: not measured"
    d = 100.0 * (a["top1"] - b["top1"])
    verdict = "yes" if d > 0 else "no"
    n = a.get("eval_images")
    if a.get("hits") and b.get("hits") and n and n == b.get("eval_images"):
        d, sd = bd.paired_difference(bd.unpack_hits(b["hits"], n), bd.unpack_hits(a["hits"], n))
        noise = ", within 2 SD" if abs(d) < 2 * sd else ""
        text = f"{what}: {d:+.2f} ± {sd:.2f} pts ({verdict}{noise}"
        if a.get("kl_fp32") is not None and b.get("kl_fp32") is not None and b["kl_fp32"] > 0:
            text += f"; KL to FP32 {100 * (a['kl_fp32'] / b['kl_fp32'] - 1):+.0f} %"
        return text + ")"
    return f"{what}: {d:+.2f} pts ({verdict})"


def group_summary(model: str, bits: int, acts: str, rows: dict[str, dict[str, Any]]) -> str:
    """One summary line of a (model, bits, acts) group."""
    parts = [_vs(rows.get(a), rows.get(b), what.replace(" minus ", " beats ")) for a, b, what in COMPARISONS]
    return f"- **{model} {group_label(bits, acts)}**: " + "; ".join(parts) + "."


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The W4A8 MixQuant+BRECQ goal on resnet20, per BRECQ setting: within 1.0 point of FP32, and how fast."""
    key = (GOAL_MODEL, GOAL_BITS, GOAL_ACTS, "mixquant+brecq")
    out = []
    for r in rows:
        if (r["model"], r["bits"], r["acts"], r["method"]) != key:
            continue
        head = (
            f"**Goal ({GOAL_MODEL} W4A8 MixQuant+BRECQ within {GOAL_PTS:.1f} pt of FP32), "
            f"{setting_label(r['settings'])}**"
        )
        if r.get("error") or r.get("drop_pts") is None:
            out.append(f"{head}: failed.")
            continue
        ok = r["drop_pts"] >= -GOAL_PTS
        out.append(
            f"{head}: {'met' if ok else 'NOT met'}: top-1 {r['top1']:.4f} vs FP32 {r['fp32_top1']:.4f} "
            f"({r['drop_pts']:+.2f} pts) in {r['quantize_s'] / 60.0:.1f} min of quantization "
            f"({r['settings'].get('iters')} iterations per unit; peer reference: AIMET-ONNX AdaRound W4A8 "
            f"0.8059 in 535 s = 8.9 min, shared/bench/README.md)."
        )
    return out


def model_block(
    model: str, rows: list[dict[str, Any]], doc: dict[str, Any], run_no: dict[str, int]
) -> list[str]:
    """One model's heading, table and summaries."""
    fp = doc["fp32"].get(model, {})
    fp_txt = f"FP32 top-1 {bd.fmt(fp.get('top1'), '.4f')} on {fp.get('eval_images', '?')} eval images"
    lines = [f"### {model}", "", f"{fp_txt} (run [{run_no.get(fp.get('run'), '?')}]).", ""]
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault(setting_label(r["settings"]), []).append(r)
    for group in by_setting.values():
        s = group[0]["settings"]
        what = f"{s.get('iters')} iterations per unit, {s.get('samples')} samples, batch {s.get('batch')}"
        name = preset_label(s) if preset_label(s) in RECON_PRESETS else "custom"
        lines += [f"#### BRECQ setting: {name} ({what}){variant_suffix(s)}", ""]
        lines += ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
        lines += ["| " + " | ".join(row_cells(r, run_no)) + " |" for r in group]
        lines += ["", "Summary:", ""]
        groups: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
        for r in group:
            groups.setdefault((r["bits"], r["acts"]), {})[r["method"]] = r
        lines += [group_summary(model, b, a, g) for (b, a), g in groups.items()]
        lines += [""]
    across = seed_summaries(model, rows)
    lines = [*lines, "Across calibration seeds:", "", *across, ""] if across else lines
    bias = bias_summaries(model, rows)
    return (
        [*lines, "Bias correction (same method, setting and seed, with minus without):", "", *bias, ""]
        if bias
        else lines
    )


#: The comparisons of a group: (better, baseline, what).
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("mixquant+brecq", "uniform+brecq", "MixQuant+BRECQ minus BRECQ alone"),
    ("uniform+brecq", "uniform+nearest", "BRECQ minus nearest, uniform"),
    ("mixquant+brecq", "mixquant+nearest", "BRECQ minus nearest, MixQuant"),
)


def seed_summaries(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """Each comparison per seed and its mean, per (preset, bits, acts) measured with several seeds."""
    by_seed: dict[tuple[str, int, str], dict[int, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        s = r["settings"]
        key = (preset_label(s) + variant_suffix(s, seed=False), r["bits"], r["acts"])
        by_seed.setdefault(key, {}).setdefault(seed_of(r["settings"]), {})[r["method"]] = r
    lines = []
    for (preset, bits, acts), seeds in by_seed.items():
        parts = []
        for better, base, what in COMPARISONS:
            diffs = {
                seed: 100.0 * (g[better]["top1"] - g[base]["top1"])
                for seed, g in sorted(seeds.items())
                if _ok(g.get(better)) and _ok(g.get(base))
            }
            if len(diffs) >= 2:
                each = ", ".join(f"{d:+.2f}" for d in diffs.values())
                mean = statistics.mean(diffs.values())
                parts.append(f"{what}: mean {mean:+.2f} pts over seeds {', '.join(map(str, diffs))} ({each})")
        if parts:
            parts.append(_seed_spread(seeds))
            lines.append(f"- **{model} {group_label(bits, acts)}, {preset}**: " + "; ".join(parts) + ".")
    return lines


def _seed_spread(seeds: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Each method's top-1 range and SD over the seeds: how far the calibration sample alone moves
    a result, beside the eval-set SD that a single row's comparison carries."""
    by_method: dict[str, list[float]] = {}
    for g in seeds.values():
        for method, r in g.items():
            if _ok(r):
                by_method.setdefault(method, []).append(r["top1"])
    spans = [
        f"{m} {min(v):.4f}-{max(v):.4f} (SD {100.0 * statistics.stdev(v):.2f} pts)"
        for m, v in sorted(by_method.items())
        if len(v) >= 2
    ]
    return "top-1 over seeds: " + ", ".join(spans)


def bias_summaries(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """Per (preset, seed, bits, acts): each method's rows with a bias correction against the row without."""
    by_key: dict[tuple[str, int, int, str], dict[str, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        s = r["settings"]
        key = (preset_label(s) + variant_suffix(s, bias=False, seed=False), seed_of(s), r["bits"], r["acts"])
        mode = s.get("bias_correction") or "off"
        by_key.setdefault(key, {}).setdefault(r["method"], {})[mode] = r
    lines = []
    for (preset, seed, bits, acts), methods in by_key.items():
        parts = [
            _vs(modes[mode], modes["off"], f"{method}, {mode}")
            for method, modes in methods.items()
            if "off" in modes
            for mode in modes
            if mode != "off"
        ]
        if parts:
            head = f"{model} {group_label(bits, acts)}, {preset}{seed_suffix({'seed': seed})}"
            lines.append(f"- **{head}**: " + "; ".join(parts) + ".")
    return lines


NOTES = (
    "Methods, all at the same average weight bits B: *uniform* = every weight at B bits; *mixquant* = "
    "MixQuant budget rule at B parameter-weighted average bits (widths 2..8, each priced at its "
    "container for *stored bits*); *nearest* = round to nearest; *brecq* = BRECQ block reconstruction "
    "(AdaRound-style learned rounding per residual block, units whose learned rounding does not lower "
    "the held-out reconstruction error keep nearest rounding; with A8 the activation steps are the "
    "calibrated ones, except in settings labelled 'LSQ N it', which learned them per unit for N iterations, "
    "and 'earlier defaults', which learned them for a quarter of the iterations); *brecq-fisher*: the "
    "same with the Fisher-weighted error (`--fisher`). *weight grid*: per-channel min-max (settings "
    "labelled 'MSE weight scales': BRECQ's MSE range search, `--scale-method mse`); settings labelled "
    "'iterations split by error' gave BRECQ the same total iterations split between units by their "
    "nearest-rounding error (`--recon-split error`), the others the same count to every unit; "
    "`QuantizerConfig.symmetry` left at None resolves to asymmetric (uint, zero-point) weights when "
    "weight-only and, with A8, to symmetric int8 for widths 5-8 and asymmetric for 2-4 bits "
    "(`symmetric-int8`; rows of earlier runs marked *sym* used symmetric grids at every width); the "
    "column is read back from each report's resolved settings. *A8*: 8-bit uint activations, per "
    "tensor, percentile calibration "
    "(99.999 %) on the calibration images; *W-only*: float activations. Calibration: a seeded sample of "
    "the model's calibration folder (max(--calib-size, --samples) images); BRECQ uses the first "
    "--samples of them. *top-1*: onnxruntime CPU, ORT_ENABLE_ALL. *quantize s*: wall time of "
    "`onnx_mixquant.quantize` in a fresh subprocess (imports excluded); *peak RSS*: that subprocess's "
    "VmHWM, imports included. *BRECQ it/s*: median over the trained units of iterations per second; "
    "*units learned*: units that kept learned rounding / all units. *agree / KL vs FP32*: share of the eval "
    "images on which the quantized and the FP32 model predict the same class, and the mean KL divergence "
    "(nats) from the FP32 model's softmax to the quantized one's (fidelity: lower KL = closer to FP32). "
    "Summary differences are paired over the same eval images: *± SD* is the standard deviation of a "
    "top-1 difference from the images exactly one of the two models gets right (McNemar); a difference "
    "within 2 SD is not significant. *bias correction*: settings labelled 'bias correction all' (or "
    "'output') ran the empirical bias correction (`--bias-correction`, on the first 64 calibration "
    "images) after the rounding and the activation calibration, and with 'all' inside BRECQ too, each "
    "unit's layers as soon as its rounding is learned (except in settings labelled 'earlier defaults'); "
    "settings without the label ran none (`--bias-correction off`; rows stored before it existed)."
)


def run_lines(doc: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """The numbered list of runs that produced the stored rows, and run id -> number."""
    run_no, lines = {}, []
    for i, (rid, run) in enumerate(sorted(doc["runs"].items(), key=lambda kv: kv[1]["date"]), start=1):
        run_no[rid] = i
        m, s = run["machine"], run["settings"]
        total = "unfinished" if run.get("total_s") is None else f"total {run['total_s'] / 60.0:.1f} min"
        lines.append(
            f"{i}. `{run['command']}` on {run['date']} ({total}; BRECQ {s['iters']} iterations per unit, "
            f"{s['samples']} samples, batch {s['batch']}; eval images {s['eval_limit'] or 'all'}). "
            f"Machine: {m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, onnxruntime "
            f"{m['onnxruntime']} ({m['eval_ort']}), onnx {m['onnx']}, numpy {m['numpy']}, "
            f"{bd.code_version(m)}."
        )
    return lines, run_no


def render_section(doc: dict[str, Any], json_rel: str) -> str:
    """The whole BENCHMARKS.md section (markers included), from every stored row."""
    runs, run_no = run_lines(doc)
    lines = [
        bd.mark(SECTION, "start"),
        "## BRECQ block reconstruction vs nearest rounding, uniform vs MixQuant widths",
        "",
        "Produced by these runs of `tools/bench_recon.py` (each row names its run; later runs replace "
        f"rows of the same model, bits, activations, method and BRECQ setting). Raw results: `{json_rel}`.",
        "",
        *runs,
        "",
        NOTES,
        "",
    ]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        lines += model_block(model, rows, doc, run_no)
    for goal in goal_lines(doc["rows"]):
        lines += [goal, ""]
    return "\n".join([*lines, bd.mark(SECTION, "end")]) + "\n"


#: (name, format spec) of the stdout table's columns.
STDOUT_COLUMNS = (
    ("model", "<17"),
    ("W", ">2"),
    ("acts", "<4"),
    ("method", "<17"),
    ("grid", "<5"),
    ("top-1", ">7"),
    ("dpts", ">6"),
    ("bits", ">11"),
    ("q s", ">7"),
    ("RSS MB", ">7"),
    ("it/s", ">6"),
    ("learned", ">7"),
)


def stdout_table(rows: list[Row]) -> str:
    """A compact fixed-width table of this invocation's rows."""
    lines = bd.table_head(STDOUT_COLUMNS)
    for r in rows:
        cells = [
            r.model,
            r.bits,
            r.acts,
            r.method,
            _grid(asdict(r)),
            "ERROR" if r.error else bd.fmt(r.top1, ".4f"),
            bd.fmt(r.drop_pts, "+.2f"),
            bd.fmt(r.average_bits, ".2f") + "/" + bd.fmt(r.storage_bits, ".2f"),
            bd.fmt(r.quantize_s, ".1f"),
            bd.fmt(r.peak_rss_mb, ".0f"),
            bd.fmt(r.iters_per_s, ".1f"),
            "-" if r.units_total is None else f"{r.units_learned}/{r.units_total}",
        ]
        lines.append(bd.table_row(STDOUT_COLUMNS, cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def make_context(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The run record, the FP32 results, and the per-group save callback (merge + write)."""
    started = bd.now_iso()
    run = {
        "id": started,
        "command": bd.command_line(__file__, argv),
        "date": started,
        "total_s": None,
        "machine": machine_info(args),
        "settings": {k: getattr(args, k) for k in ("iters", "samples", "batch", "calib_size", "seed")}
        | {"eval_limit": args.limit, "preset": setting_label(vars(args))},
    }
    ctx: dict[str, Any] = {"run_id": started, "run": run, "fp32": {}, "rows": []}

    def save(group: list[Row]) -> None:
        ctx["rows"] += group
        if args.out is not None:
            doc = load_doc(args.json)
            merge_rows(doc, group, run, ctx["fp32"])
            write_outputs(doc, args)

    ctx["save"] = save
    return ctx


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any quantization or evaluation failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._one is not None:
        return child_main(args._one)
    t0 = time.perf_counter()
    ctx = make_context(argv, args)
    with tempfile.TemporaryDirectory(prefix="mixquant-bench-recon-") as tmp:
        rows = [r for name in args.models for r in run_model(name, Path(tmp), args, ctx)]
    ctx["run"]["total_s"] = time.perf_counter() - t0
    ctx["save"]([])  # records the total time of the run
    print(stdout_table(rows))
    doc: dict[str, Any] = {"rows": [asdict(r) for r in rows], "fp32": ctx["fp32"]}
    for line in summaries(doc):
        print(line)
    print(f"total {ctx['run']['total_s']:.1f} s")
    return bd.exit_status([f"{r.model} W{r.bits} {r.acts} {r.method}" for r in rows if r.error])


def summaries(doc: dict[str, Any]) -> list[str]:
    """The group summary lines (and the goal line) of ``doc['rows']``."""
    groups: dict[tuple[str, str, int, str], dict[str, dict[str, Any]]] = {}
    for r in doc["rows"]:
        key = (r["model"], setting_label(r["settings"]), r["bits"], r["acts"])
        groups.setdefault(key, {})[r["method"]] = r
    lines = [group_summary(f"{m} ({s})", b, a, g) for (m, s, b, a), g in groups.items()]
    return [*lines, *goal_lines(doc["rows"])]


if __name__ == "__main__":
    sys.exit(main())
