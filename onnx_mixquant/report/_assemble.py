"""Report pieces the pipeline assembles after its stages: per-weight rows, the quality gate, the
warnings about known onnxruntime traps (DESIGN.md) and the resolved settings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from enum import Enum
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from onnx_mixquant import export, rounding, search, validate
from onnx_mixquant.config import QuantConfig, SearchRule
from onnx_mixquant.data import describe
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import roundoff_error
from onnx_mixquant.read import ReadModel
from onnx_mixquant.report.document import ActivationReport, WeightReport

__all__ = ["check_gate_inputs", "gate_failures", "settings_dict", "warnings_for", "weight_reports"]

#: Storage types onnxruntime never fuses into integer kernels (bit-packed widths unpack to 8 bits).
_SUB_BYTE_TYPES = ("INT4", "UINT4", "INT2", "UINT2")
#: Slack on the top-1 drop in points: accuracies are k/n, and their difference x 100 rounds.
_POINTS_TOLERANCE = 1e-9


def check_gate_inputs(samples: validate.Samples | None, cfg: QuantConfig) -> None:
    """Refuse, before any work, a top-1 gate that the validation samples cannot evaluate.

    Raises:
        ConfigError: ``--max-top1-drop`` without labels, or either top-1 gate on random inputs.
    """
    v = cfg.validate
    gates = [
        f
        for f, g in (("--max-top1-drop", v.max_top1_drop), ("--min-agreement", v.min_agreement))
        if g is not None
    ]
    if not gates:
        return
    if samples is None or samples.synthetic:
        raise ConfigError(
            f"{' and '.join(gates)} {'need' if len(gates) > 1 else 'needs'} real validation samples "
            "(--samples, or --calib to hold some out); random inputs give no top-1 figure"
        )
    if v.max_top1_drop is not None and samples.labels is None:
        raise ConfigError(
            f"--max-top1-drop needs labelled validation samples; these ({samples.source}) have none: "
            "give a 'labels' array in a .npz, class sub-folders of images, or --labels FILE.csv"
        )


def gate_failures(result: validate.ValidationResult | None, cfg: QuantConfig) -> list[str]:
    """Messages for every quality threshold the quantized model misses, on any run.

    Raises:
        ConfigError: a gate that cannot be evaluated (no validation, no top-1 figure, no
            classifier-like output).
    """
    v = cfg.validate
    given = [
        flag
        for flag, limit in (
            ("--min-sqnr", v.min_sqnr_db),
            ("--max-top1-drop", v.max_top1_drop),
            ("--min-agreement", v.min_agreement),
        )
        if limit is not None
    ]
    if not given:
        return []
    if result is None:
        raise ConfigError(f"{given[0]} needs validation; do not combine it with --no-validate")
    failures = []
    for run in result.runs:
        where = f"({run.provider}, {run.optimization})"
        if v.min_sqnr_db is not None:
            failures += [
                f"output {o.name!r} SQNR {o.sqnr_db:.2f} dB < --min-sqnr {v.min_sqnr_db:g} dB {where}"
                for o in run.outputs
                if o.sqnr_db < v.min_sqnr_db
            ]
        if v.max_top1_drop is not None:
            failures += _top1_drop(run, v.max_top1_drop, where)
        if v.min_agreement is not None:
            failures += _agreement(run, v.min_agreement, where, result.indicative)
    return failures


def _top1_drop(run: validate.RunMetrics, limit: float, where: str) -> list[str]:
    if run.top1_fp is None or run.top1_quant is None:
        raise ConfigError(
            "--max-top1-drop needs a top-1 accuracy: labelled samples and a classifier-like output "
            "(rank 2, [batch, classes]); this model and these samples give none"
        )
    drop = 100 * (run.top1_fp - run.top1_quant)
    if drop <= limit + _POINTS_TOLERANCE:
        return []
    return [
        f"top-1 {run.top1_fp:.2%} -> {run.top1_quant:.2%}: drop {drop:.2f} points > "
        f"--max-top1-drop {limit:g} {where}"
    ]


def _agreement(run: validate.RunMetrics, limit: float, where: str, indicative: bool) -> list[str]:
    rated = [o for o in run.outputs if o.top1_agreement is not None]
    if not rated:
        why = (
            "random inputs give none"
            if indicative
            else "no output is classifier-like (rank 2, [batch, classes])"
        )
        raise ConfigError(f"--min-agreement needs a top-1 agreement figure: {why}")
    return [
        f"output {o.name!r} top-1 agreement {o.top1_agreement:.2%} < --min-agreement {limit:g} {where}"
        for o in rated
        if o.top1_agreement is not None and o.top1_agreement < limit
    ]


def weight_reports(
    read: ReadModel,
    weights: Mapping[str, np.ndarray],
    quantized: Mapping[str, rounding.QuantizedWeight],
    plan: search.BitPlan,
    exported: export.ExportResult,
) -> tuple[WeightReport, ...]:
    """One row per weight site: width, storage, axis, roundoff error and SQNR, and why."""
    out = []
    for s in read.sites:
        qw = quantized.get(s.name)
        mse = sqnr = None
        if qw is not None:
            mse = roundoff_error(weights[s.name], qw.qparams)
            energy = float(np.mean(np.square(weights[s.name], dtype=np.float64)))
            sqnr = math.inf if mse == 0 else 10 * math.log10(energy / mse) if energy > 0 else -math.inf
        out.append(
            WeightReport(
                name=s.name,
                shape=s.shape,
                op_types=s.op_types,
                consumers=s.consumers,
                bits=plan.bits[s.name],
                storage=exported.storage.get(s.name),
                axis=qw.qparams.axis if qw is not None else None,
                roundoff_mse=mse,
                sqnr_db=sqnr,
                reason=plan.reasons[s.name],
            )
        )
    return tuple(out)


def warnings_for(
    read: ReadModel,
    plan: search.BitPlan,
    exported: export.ExportResult,
    acts: ActivationReport | None,
) -> tuple[str, ...]:
    """The known onnxruntime traps (DESIGN.md) that apply to this model, and other notes."""
    out = []
    if exported.opset_after != exported.opset_before:
        out.append(
            f"opset converted from {exported.opset_before} to {exported.opset_after} "
            f"for the integer types used"
        )
    if any(s.axis is None for s in read.sites):
        out.append("weights shared by consumers with different channel axes are quantized per tensor")
    bits = {s.name: plan.bits[s.name] for s in read.sites}
    convs = [s for s in read.sites if bits[s.name] is not None and any("Conv" in o for o in s.op_types)]
    if acts is None and convs:
        out.append(
            "weight-only QDQ: onnxruntime runs quantized Convs as DequantizeLinear + float Conv "
            "(the file shrinks; inference is not faster)"
        )
    narrow = [s for s in convs if exported.storage.get(s.name) in _SUB_BYTE_TYPES]
    if acts is not None and narrow:
        out.append(
            f"{len(narrow)} Conv weights are stored as INT4/INT2: onnxruntime does not fuse them "
            f"into QLinearConv (they run as DequantizeLinear + float Conv, slower than 8-bit)"
        )
    if acts is not None and acts.fusion is not None and acts.fusion.unfused:
        shown = ", ".join(list(acts.fusion.unfused)[:5])
        out.append(
            f"{len(acts.fusion.unfused)} quantized nodes run in float in onnxruntime: {shown}"
            + (" ..." if len(acts.fusion.unfused) > 5 else "")
        )
    if (
        acts is not None
        and exported.storage
        and any(exported.storage.get(s.name) in ("INT2", "UINT2") for s in convs)
    ):
        out.append(
            "2-bit Conv weights stored as INT2 with 8-bit activation Q/DQ fail to load in "
            "onnxruntime at ORT_ENABLE_EXTENDED/ALL; store them as INT4 (drop --int2)"
        )
    if any(op == "MatMul" for s in read.sites if (bits[s.name] or 9) <= 4 for op in s.op_types):
        out.append(
            "at ORT_ENABLE_ALL onnxruntime may rewrite DequantizeLinear + MatMul to MatMulNBits, "
            "whose outputs differ slightly (compare the two validation rows)"
        )
    wider = sorted(
        {b for n, b in bits.items() if b in (3, 5, 6, 7) and "packed" not in (exported.storage.get(n) or "")}
    )
    if wider:
        out.append(
            f"width{'s' if len(wider) > 1 else ''} {', '.join(map(str, wider))} "
            "stored in the next wider ONNX type (INT4/INT8) because bit-packing is off (--no-pack)"
        )
    return tuple(out)


def settings_dict(
    cfg: QuantConfig, samples_path: Any, labels_path: str | Path | None = None
) -> dict[str, Any]:
    """The resolved config as plain JSON values (enums by value), plus the samples (a path, a list
    of paths, or a description of a Python object) and the labels file."""

    def plain(x: Any) -> Any:
        if isinstance(x, Enum):
            return x.value
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    d = plain(asdict(cfg))
    d["samples"] = _describe_samples(samples_path)
    d["labels"] = str(labels_path) if labels_path is not None else None
    if cfg.search.rule is not SearchRule.BUDGET:
        d["search"].pop("target_bits")
        d["search"].pop("target_bytes")
    return d


def _describe_samples(samples: Any) -> str | list[str] | None:
    if samples is None or isinstance(samples, (str, PathLike)):
        return None if samples is None else str(samples)
    if isinstance(samples, (list, tuple)) and all(isinstance(p, (str, PathLike)) for p in samples):
        return [str(p) for p in samples]
    return describe(samples)
