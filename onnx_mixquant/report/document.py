"""Report: what a run did, as a dataclass, a JSON document and a short terminal table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnx_mixquant.read import SkippedWeight
from onnx_mixquant.validate import FusionResult, ValidationResult

if TYPE_CHECKING:  # the reconstruction stage (and onnx-ad) is imported only when BRECQ runs
    from onnx_mixquant.rounding import BiasReport
    from onnx_mixquant.rounding.reconstruct.actsteps import ActUnitReport
    from onnx_mixquant.rounding.reconstruct.train import UnitReport

__all__ = [
    "ActivationReport",
    "ActivationTensor",
    "ReconReport",
    "Report",
    "WeightReport",
    "format_text",
    "to_json",
    "write_json",
]


@dataclass(frozen=True)
class WeightReport:
    """One weight site: the width chosen, how it is stored, and its roundoff error.

    ``sqnr_db`` is 10 log10(mean(W^2) / mean((W - W')^2)) of the weight itself.
    """

    name: str
    shape: tuple[int, ...]
    op_types: tuple[str, ...]
    consumers: tuple[str, ...]
    bits: int | None
    storage: str | None
    axis: int | None
    roundoff_mse: float | None
    sqnr_db: float | None
    reason: str


@dataclass(frozen=True)
class ActivationTensor:
    """One quantized activation: its calibrated range and 8-bit parameters."""

    name: str
    shared_with: str | None
    rmin: float
    rmax: float
    scale: float
    zero_point: int


@dataclass(frozen=True)
class ActivationReport:
    """Static activation quantization: calibration, tensors, and what onnxruntime fused."""

    method: str
    dtype: str
    calib_source: str
    num_samples: int
    provider: str
    tensors: tuple[ActivationTensor, ...]
    skipped: tuple[tuple[str, str], ...]
    compute_nodes: tuple[str, ...]
    fusion: FusionResult | None
    #: Zero Pad nodes folded into the Conv reading them (exact; onnxruntime's quant_pre_process does it).
    folded_pads: tuple[str, ...] = ()
    #: "default" or "attention" (only the inputs of weight ops; see calibrate/activations.py).
    placement: str = "default"


@dataclass(frozen=True)
class ReconReport:
    """BRECQ reconstruction: settings, provider, and each unit's outcome."""

    provider: str
    seconds: float
    iters: int
    samples: int
    batch: int
    granularity: str
    units: tuple[UnitReport, ...]
    #: How the iterations were split between units ("even": ``iters`` each; "error": ``iters`` on
    #: average, by rounding error); ``UnitReport.iters`` has each unit's count.
    split: str = "even"
    #: Whether the squared errors were Fisher-weighted (``UnitReport.fisher`` says per unit).
    fisher: bool = False
    #: The activation-step stage per unit (empty without activation quantization).
    act_units: tuple[ActUnitReport, ...] = ()
    #: The bias correction done unit by unit, each unit's right after its rounding is fixed
    #: (``BiasCorrection.ALL``); None when it did not run.
    bias: BiasReport | None = None


@dataclass(frozen=True)
class Report:
    """Everything a run measured. ``output_written`` is False when a quality gate failed."""

    input_path: str
    output_path: str
    input_bytes: int
    output_bytes: int
    opset_before: int
    opset_after: int
    rule: str
    average_bits: float
    storage_bits: float
    weights: tuple[WeightReport, ...]
    skipped: tuple[SkippedWeight, ...]
    validation: ValidationResult | None
    gate_failures: tuple[str, ...]
    output_written: bool
    settings: Mapping[str, Any] = field(default_factory=dict)
    timings_s: Mapping[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    activations: ActivationReport | None = None
    reconstruction: ReconReport | None = None
    bias_correction: BiasReport | None = None
    #: What the rounding method did, as text lines (GPTQ: its layers and their error).
    rounding_summary: tuple[str, ...] = ()
    #: What the budget rule minimised: "roundoff", or the output error and how it was measured.
    objective: str = "roundoff"


def _clean(x: Any) -> Any:
    """JSON-safe copy: inf/nan floats become strings, tuples lists, mappings dicts."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready dict (infinite SQNR written as the string "inf")."""
    d = asdict(report)
    d["settings"] = dict(report.settings)
    d["timings_s"] = dict(report.timings_s)
    d["size_ratio"] = report.output_bytes / report.input_bytes if report.input_bytes else None
    return _clean(d)


def write_json(report: Report, path: str | Path) -> None:
    """Write the JSON report atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(to_json(report), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _db(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1f}")


def format_text(report: Report, *, max_weights: int = 12) -> str:
    """A short human-readable summary: sizes, widths histogram, worst weights, validation."""
    lines = [
        f"{report.input_path} -> {report.output_path}"
        + ("" if report.output_written else "  (NOT written: quality gate failed)"),
        f"size {_mb(report.input_bytes)} -> {_mb(report.output_bytes)}"
        f" ({report.output_bytes / max(report.input_bytes, 1):.1%}),"
        f" opset {report.opset_before} -> {report.opset_after}",
        f"bit plan: {report.rule}, average {report.average_bits:.2f} bits"
        f" ({report.storage_bits:.2f} stored) over {sum(w.bits is not None for w in report.weights)}"
        f" weights; {sum(w.bits is None for w in report.weights)} kept float,"
        f" {len(report.skipped)} other tensors left alone",
    ]
    if report.rule == "budget":
        lines.append(f"objective: {report.objective}")
    hist: dict[str, int] = {}
    for w in report.weights:
        key = "float" if w.bits is None else f"{w.bits}b"
        hist[key] = hist.get(key, 0) + 1
    lines.append("widths: " + ", ".join(f"{k} x{v}" for k, v in sorted(hist.items())))
    quant = sorted((w for w in report.weights if w.sqnr_db is not None), key=lambda w: w.sqnr_db or 0.0)
    if quant:
        lines.append(f"{'weight':<40} {'shape':<18} {'bits':>4} {'storage':<7} {'SQNR dB':>8}")
        for w in quant[:max_weights]:
            lines.append(
                f"{w.name[-40:]:<40} {'x'.join(map(str, w.shape)):<18} {w.bits:>4} "
                f"{w.storage or '-':<7} {_db(w.sqnr_db):>8}"
            )
        if len(quant) > max_weights:
            lines.append(f"... {len(quant) - max_weights} more (lowest SQNR shown; see --report)")
    lines.extend(report.rounding_summary)
    lines.extend(_recon_lines(report.reconstruction))
    lines.extend(_bias_lines(report.bias_correction))
    lines.extend(_activation_lines(report.activations))
    lines.extend(_validation_lines(report.validation))
    lines.extend(f"warning: {w}" for w in report.warnings)
    lines.extend(f"FAILED: {g}" for g in report.gate_failures)
    return "\n".join(lines)


def _validation_lines(v: ValidationResult | None) -> list[str]:
    if v is None:
        return ["validation: skipped"]
    head = f"validation on {v.num_samples} samples ({v.sample_source}):"
    if v.indicative:
        head = (
            f"validation on {v.num_samples} RANDOM samples (indicative only: says whether the quantized "
            "model computes the same function on some inputs, not how accurate it is on real data; give "
            "--samples or --calib for a real check):"
        )
    out = [head]
    for run in v.runs:
        for o in run.outputs:
            agree = "" if o.top1_agreement is None else f" top-1 agreement {o.top1_agreement:.2%}"
            out.append(
                f"  {run.provider:<24} {run.optimization:<15} {o.name}: SQNR {_db(o.sqnr_db)} dB,"
                f" max |err| {o.max_abs_error:.3g}{agree}"
            )
        if run.top1_fp is not None and run.top1_quant is not None:
            out.append(f"  {'':<24} {'':<15} top-1 accuracy {run.top1_fp:.2%} -> {run.top1_quant:.2%}")
    return out


def _activation_lines(a: ActivationReport | None) -> list[str]:
    if a is None:
        return ["activations: float (weight-only)"]
    out = [
        f"activations: {a.dtype} {a.method} ranges from {a.num_samples} samples ({a.calib_source}); "
        f"{len(a.tensors)} tensors quantized, {len(a.skipped)} kept float"
    ]
    if a.placement == "attention":
        out.append(
            "attention graph: only the inputs of weight MatMul/Gemm/Conv are quantized; attention "
            "scores, masks, Softmax, normalisation and residual sums stay float"
        )
    if a.folded_pads:
        out.append(f"{len(a.folded_pads)} zero Pad nodes folded into the Conv reading them (exact)")
    if a.fusion is not None:
        kinds: dict[str, int] = {}
        for k in a.fusion.fused.values():
            kinds[k] = kinds.get(k, 0) + 1
        fused = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"
        out.append(
            f"onnxruntime ({a.fusion.provider}, ORT_ENABLE_ALL): {len(a.fusion.fused)} of "
            f"{len(a.compute_nodes)} quantized Conv/Gemm/MatMul fused ({fused}); "
            f"{len(a.fusion.unfused)} run in float"
        )
    return out


def _recon_lines(r: ReconReport | None) -> list[str]:
    if r is None:
        return []
    learned = [u for u in r.units if u.rounding == "learned"]
    iters = f"{r.iters} iterations"
    trained = [u.iters for u in r.units if u.iters > 0]
    if r.split == "error" and trained:
        iters += f" per unit on average, split by rounding error ({min(trained)}-{max(trained)})"
    out = [
        f"BRECQ ({r.granularity}s, {iters} x batch {r.batch}, {r.samples} samples, "
        f"{r.provider}): {len(learned)} of {len(r.units)} units use learned rounding, {r.seconds:.0f} s"
    ]
    for u in r.units:
        if u.loss_nearest is not None and u.loss_learned is not None:
            out.append(
                f"  {u.name[:60]:<60} error {u.loss_nearest:.4g} -> {u.loss_learned:.4g} "
                f"({u.rounding}, {u.iters} it, {u.iters_per_second:.1f} it/s)"
            )
        else:
            out.append(f"  {u.name[:60]:<60} nearest rounding: {u.reason}")
        if r.fisher and u.fisher not in ("", "used"):
            out.append(f"    no Fisher weighting: {u.fisher}")
    if r.bias is not None and r.bias.layers:
        b = r.bias
        before, after = _mean_errors(b)
        out.append(
            f"bias correction inside BRECQ ({b.num_samples} samples, {b.seconds:.1f} s):"
            f" {len(b.layers)} layers, each unit's right after its rounding was fixed; mean"
            f" |FP - quantized output mean| per channel {before:.3g} -> {after:.3g}"
        )
    if r.fisher:
        used = sum(u.fisher == "used" for u in r.units)
        out.append(f"Fisher-weighted errors in {used} of {len(r.units)} units")
    if r.act_units:
        learned_steps = [a for a in r.act_units if a.steps == "learned"]
        n = sum(len(a.tensors) for a in learned_steps)
        units = f"{len(learned_steps)} of {len(r.act_units)} units"
        out.append(f"Activation steps (LSQ): learned for {n} tensors in {units}")
        for a in r.act_units:
            if a.loss_calibrated is not None and a.loss_learned is not None:
                out.append(
                    f"  {a.name[:60]:<60} error {a.loss_calibrated:.4g} -> {a.loss_learned:.4g} ({a.steps})"
                )
            else:
                out.append(f"  {a.name[:60]:<60} calibrated steps: {a.reason}")
    return out


def _mean_errors(b: BiasReport) -> tuple[float, float]:
    """Mean over ``b``'s layers (at least one) of the per-channel mean error before and after."""
    n = len(b.layers)
    return sum(x.error_before for x in b.layers) / n, sum(x.error_after for x in b.layers) / n


def _bias_lines(b: BiasReport | None) -> list[str]:
    if b is None:
        return []
    if not b.layers:
        out = [f"bias correction ({b.mode}): no layer to correct"]
    else:
        before, after = _mean_errors(b)
        created = sum(x.created for x in b.layers)
        out = [
            f"bias correction ({b.mode}, by {b.method}, {b.num_samples} "
            f"samples, {b.provider}, {b.seconds:.1f} s): {len(b.layers)} layers"
            + (f" ({created} had no bias: a zero one was added)" if created else "")
            + f"; mean |FP - quantized output mean| per channel {before:.3g} -> {after:.3g}"
        ]
    if b.held_out_db is not None:
        with_db, without_db = b.held_out_db
        verdict = "kept" if b.kept else "NOT written: the model is closer to FP32 without it"
        out.append(
            f"  held-out check: lowest output SQNR {with_db:.2f} dB with it, {without_db:.2f} dB "
            f"without: {verdict}"
        )
    out.extend(f"  not corrected: {node}: {why}" for node, why in b.skipped[:8])
    if len(b.skipped) > 8:
        out.append(f"  ... {len(b.skipped) - 8} more not corrected (see --report)")
    return out
