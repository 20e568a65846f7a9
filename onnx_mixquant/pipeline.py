"""The pipeline: the only module that knows the order of the stages.

read graph -> roundoff-error table -> bit plan (MixQuant) -> rounding (nearest)
    -> rewrite with Q/DQ -> save (staged) -> validate in onnxruntime -> report
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from onnx_mixquant import data, export, graph, rounding, search, validate
from onnx_mixquant.config import QuantConfig, SearchRule
from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.numerics import roundoff_error
from onnx_mixquant.report import Report, WeightReport

__all__ = ["Progress", "quantize"]

logger = logging.getLogger(__name__)

#: progress(stage, done, total): called by long stages; the CLI draws it on stderr.
Progress = Callable[[str, int, int], None]
#: ask_dim(input_name, dim_name) -> value, for symbolic input dims not given in the config.
AskDim = Callable[[str, str], int]


def _stage_progress(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 4)


def quantize(
    input_path: str | Path,
    output_path: str | Path,
    config: QuantConfig | None = None,
    *,
    samples_path: str | Path | None = None,
    progress: Progress | None = None,
    ask_dim: AskDim | None = None,
) -> Report:
    """Quantize the weights of ``input_path`` and write the QDQ model to ``output_path``.

    Args:
        input_path: FP32 ONNX model (external data next to it is read too).
        output_path: where to write; never the input. Written only when every quality gate passes.
        config: all options; defaults when None.
        samples_path: .npz/.npy inputs (and optional labels) to validate on; random inputs if None.
        progress: progress(stage, done, total) for long stages.
        ask_dim: asked for symbolic input dims the config does not set (random inputs only).

    Returns:
        The report. ``report.output_written`` is False when a quality gate failed.

    Raises:
        MixQuantError: bad model, data or options (the message names the file/tensor/option).
    """
    cfg = config or QuantConfig()
    timings: dict[str, float] = {}
    src = Path(input_path)
    export.check_destination(Path(output_path), src)
    with _timed(timings, "read"):
        read = graph.read_model(src)
    if not read.sites:
        reasons = sorted({s.reason.split(" (")[0] for s in read.skipped})
        raise UnsupportedModelError(
            f"{src}: no quantizable weights found (no float32 weight of Conv, ConvTranspose, Gemm or "
            f"MatMul); {len(read.skipped)} stored tensors left alone: {'; '.join(reasons) or 'none'}"
        )
    samples = _samples(read, cfg, samples_path, ask_dim) if cfg.validate.enabled else None
    values = graph.weight_values(read.model)
    weights = {s.name: graph.weight_array(values[s.name]) for s in read.sites}
    axes = {s.name: s.axis for s in read.sites}
    with _timed(timings, "error_table"):
        table = search.build_error_table(
            weights,
            axes,
            cfg.quantizer,
            cfg.search.candidate_bits,
            _stage_progress(progress, "error table"),
        )
    with _timed(timings, "search"):
        aliases = {s.name: s.consumers for s in read.sites}
        plan = search.search_bitwidths(
            table, cfg.search, aliases=aliases, use_int2=cfg.export.use_int2
        )
    with _timed(timings, "rounding"):
        quantized = rounding.round_nearest(
            weights, axes, plan.bits, cfg.quantizer, _stage_progress(progress, "rounding")
        )
    with _timed(timings, "export"):
        model, exported = export.insert_qdq(read.model, quantized, cfg.export)
        staged = export.stage_model(model, Path(output_path), src, cfg.export)
    try:
        result = None
        if samples is not None:
            with _timed(timings, "validate"):
                result = validate.validate(
                    src, staged.path, samples, cfg.validate, _stage_progress(progress, "validate")
                )
        failures = _gate(result, cfg)
        if not failures:
            staged.commit()
    finally:
        staged.discard()
    return Report(
        input_path=str(src),
        output_path=str(staged.destination),
        input_bytes=read.file_bytes,
        output_bytes=staged.file_bytes,
        opset_before=exported.opset_before,
        opset_after=exported.opset_after,
        rule=plan.rule.value,
        average_bits=plan.average_bits,
        storage_bits=plan.storage_bits,
        weights=_weight_reports(read, weights, quantized, plan, exported),
        skipped=read.skipped,
        validation=result,
        gate_failures=tuple(failures),
        output_written=not failures,
        settings=_settings(cfg, samples_path),
        timings_s=timings,
        warnings=_warnings(read, plan, exported),
    )


def _samples(
    read: graph.ReadModel, cfg: QuantConfig, samples_path: str | Path | None, ask_dim: AskDim | None
) -> validate.Samples:
    """Sample inputs for validation: from the file, else random of resolved shapes."""
    if samples_path is not None:
        return data.load_samples(samples_path, read.inputs)
    dims = dict(cfg.validate.dims)
    if ask_dim is not None:
        for inp in read.inputs:
            for d in inp.dims:
                if isinstance(d, str) and d not in dims:
                    dims[d] = ask_dim(inp.name, d)
    shapes = validate.resolve_dims(read.inputs, dims)
    return validate.random_samples(read.inputs, shapes, cfg.validate.num_samples, cfg.seed)


def _gate(result: validate.ValidationResult | None, cfg: QuantConfig) -> list[str]:
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


def _weight_reports(
    read: graph.ReadModel,
    weights: Mapping[str, np.ndarray],
    quantized: Mapping[str, rounding.QuantizedWeight],
    plan: search.BitPlan,
    exported: export.ExportResult,
) -> tuple[WeightReport, ...]:
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


def _warnings(
    read: graph.ReadModel, plan: search.BitPlan, exported: export.ExportResult
) -> tuple[str, ...]:
    out = []
    if exported.opset_after != exported.opset_before:
        out.append(
            f"opset converted from {exported.opset_before} to {exported.opset_after} "
            f"for the integer types used"
        )
    if any(s.axis is None for s in read.sites):
        out.append(
            "weights shared by consumers with different channel axes are quantized per tensor"
        )
    used = {b for b in plan.bits.values() if b is not None}
    if any("Conv" in op for s in read.sites if plan.bits[s.name] is not None for op in s.op_types):
        out.append(
            "weight-only QDQ: onnxruntime runs quantized Convs as DequantizeLinear + float Conv "
            "(the file shrinks; inference is not faster)"
        )
    if any(
        op == "MatMul" for s in read.sites if (plan.bits[s.name] or 9) <= 4 for op in s.op_types
    ):
        out.append(
            "at ORT_ENABLE_ALL onnxruntime may rewrite DequantizeLinear + MatMul to MatMulNBits, "
            "whose outputs differ slightly (compare the two validation rows)"
        )
    if used & {3, 5, 6, 7}:
        out.append("widths 3, 5, 6 and 7 are stored in the next wider ONNX type (INT4/INT8)")
    return tuple(out)


def _settings(cfg: QuantConfig, samples_path: str | Path | None) -> dict[str, Any]:
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
