"""Report pieces the pipeline assembles after its stages: per-weight rows, the quality gate, the
warnings about known onnxruntime traps (DESIGN.md) and the resolved settings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from onnx_mixquant import export, graph, rounding, search, validate
from onnx_mixquant.config import QuantConfig, SearchRule
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import roundoff_error
from onnx_mixquant.report import ActivationReport, WeightReport

__all__ = ["gate_failures", "settings_dict", "warnings_for", "weight_reports"]


def gate_failures(result: validate.ValidationResult | None, cfg: QuantConfig) -> list[str]:
    """Messages for every quality threshold the quantized model misses."""
    limit = cfg.validate.min_sqnr_db
    if limit is None:
        return []
    if result is None:
        raise ConfigError("--min-sqnr needs validation; do not combine it with --no-validate")
    failures = []
    for run in result.runs:
        for o in run.outputs:
            if o.sqnr_db < limit:
                failures.append(
                    f"output {o.name!r} SQNR {o.sqnr_db:.2f} dB < --min-sqnr {limit:g} dB "
                    f"({run.provider}, {run.optimization})"
                )
    return failures


def weight_reports(
    read: graph.ReadModel,
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
    read: graph.ReadModel,
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
    narrow = [s for s in convs if (bits[s.name] or 9) <= 4]
    if acts is not None and narrow:
        out.append(
            f"{len(narrow)} Conv weights have 4 bits or fewer: onnxruntime does not fuse them "
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
    if {b for b in bits.values() if b is not None} & {3, 5, 6, 7}:
        out.append("widths 3, 5, 6 and 7 are stored in the next wider ONNX type (INT4/INT8)")
    return tuple(out)


def settings_dict(cfg: QuantConfig, samples_path: str | Path | None) -> dict[str, Any]:
    """The resolved config as plain JSON values (enums by value), plus the samples path."""

    def plain(x: Any) -> Any:
        if isinstance(x, Enum):
            return x.value
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    d = plain(asdict(cfg))
    d["samples"] = str(samples_path) if samples_path is not None else None
    if cfg.search.rule is not SearchRule.BUDGET:
        d["search"].pop("target_bits")
        d["search"].pop("target_bytes")
    return d
