"""The pipeline: the only module that knows the order of the stages.

read graph -> roundoff-error table -> bit plan (MixQuant) -> [bias correction: FP output means]
    -> rounding (nearest, or BRECQ [correcting each unit's biases]) -> rewrite with Q/DQ -> [activation Q/DQ]
    -> [bias correction] -> [int32 Gemm biases] -> save (staged) -> validate in onnxruntime -> report
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_mixquant import calibrate, data, export, rounding, search, validate
from onnx_mixquant._steps import Progress, stage_progress, timed
from onnx_mixquant.calibrate import activations
from onnx_mixquant.config import (
    ActivationConfig,
    BiasCorrection,
    ImageSpec,
    Objective,
    QuantConfig,
    RoundingMethod,
    SearchRule,
    Symmetry,
)
from onnx_mixquant.data import synthetic
from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.numerics import QParams
from onnx_mixquant.read import ReadModel, fold_pads_into_convs, read_model, weight_array, weight_values
from onnx_mixquant.report import (
    ActivationReport,
    ActivationTensor,
    Report,
    check_gate_inputs,
    gate_failures,
    settings_dict,
    warnings_for,
    weight_reports,
)
from onnx_mixquant.rounding import biascorrect, biasruns
from onnx_mixquant.search import probe as probing
from onnx_mixquant.session import compute_on
from onnx_mixquant.toolkit import node_names
from onnx_mixquant.validate import check_bias, check_fusion, data_cost_note

__all__ = ["Progress", "quantize", "resolve_config"]

#: The most calibration samples held out for validation when no --samples are given (at most a
#: quarter of them; none below 4, when the calibration samples themselves are validated on).
VALIDATION_FROM_CALIB = 64

logger = logging.getLogger(__name__)


def quantize(
    input_path: str | Path,
    output_path: str | Path,
    config: QuantConfig | None = None,
    *,
    samples_path: Any = None,
    labels_path: str | Path | None = None,
    calib: Any = None,
    image_spec: ImageSpec | None = None,
    progress: Progress | None = None,
) -> Report:
    """Quantize the weights of ``input_path`` and write the QDQ model to ``output_path``.

    Args:
        input_path: FP32 ONNX model (external data next to it is read too).
        output_path: where to write; never the input. Written only when every quality gate passes.
        config: all options; defaults when None.
        samples_path: inputs (and optional labels) to validate on, anything ``calib`` accepts
            (see :func:`onnx_mixquant.data.sources.load_samples`); else samples held out of the
            calibration data when given (:data:`VALIDATION_FROM_CALIB`, which calibration, bias
            correction and BRECQ then never see), else synthetic inputs
            (:mod:`onnx_mixquant.data.synthetic`; indicative only, and validation is skipped with a
            warning when the FP model rejects them).
        labels_path: CSV of ``path,label`` rows labelling the files of ``samples_path``.
        calib: calibration data for activation quantization (``config.activations.enabled``): a
            path (folder of .npy/.npz, one .npz, ONNX test_data_set folders, a folder of images),
            a list of paths, an onnxruntime ``CalibrationDataReader`` or an iterable of input dicts.
        image_spec: preprocessing when ``calib`` is a folder of images.
        progress: progress(stage, done, total) for long stages.

    Returns:
        The report. ``report.output_written`` is False when a quality gate failed.

    Raises:
        MixQuantError: bad model, data or options (the message names the file/tensor/option).
    """
    asked = config or QuantConfig()
    # a bias correction the user did not ask for must not fail the run: it is skipped, with a warning
    bias_auto = asked.bias.mode is None
    with compute_on(asked.device):  # calibration, bias correction and BRECQ run there
        notes: list[str] = []
        timings: dict[str, float] = {}
        src = Path(input_path)
        export.check_destination(Path(output_path), src)
        with timed(timings, "read"):
            read = read_model(src)
        attention = activations.has_attention(read.model.graph)
        cfg = resolve_config(asked, has_calib=calib is not None, attention=attention)
        if not read.sites:
            reasons = sorted({s.reason.split(" (")[0] for s in read.skipped})
            raise UnsupportedModelError(
                f"{src}: no quantizable weights found (no float32 weight of Conv, ConvTranspose, Gemm or "
                f"MatMul); {len(read.skipped)} stored tensors left alone: {'; '.join(reasons) or 'none'}"
            )
        holdout = VALIDATION_FROM_CALIB if cfg.validate.enabled and samples_path is None else 0
        calib_data = _open_calibration(read, cfg, calib, image_spec, holdout)
        samples = (
            _samples(read, cfg, (samples_path, labels_path, image_spec), calib_data, notes)
            if cfg.validate.enabled
            else None
        )
        weights, plan, to_round, objective = _plan_weights(read, cfg, calib_data, timings, progress, notes)
        bias_notes = notes if bias_auto else None
        bias_rows = None
        if calib_data is not None and cfg.bias.mode is not BiasCorrection.OFF:
            bias_rows = biasruns.bias_run_rows(calib_data, read)
        bias_ref = biasruns.bias_reference(read, cfg, calib_data, bias_rows, timings, progress, bias_notes)
        with timed(timings, "rounding"):
            rounded = rounding.round_weights(
                read.model, to_round, _rounding_data(cfg, calib_data, bias_ref, bias_notes), cfg, progress
            )
        quantized, recon, learned = rounded.weights, rounded.report, rounded.act_params
        notes.extend(rounded.notes)
        with timed(timings, "export"):
            model, exported = export.insert_qdq(read.model, quantized, cfg.export)
        for name, value in rounded.biases.items():  # corrected by the rounding method (BRECQ's units)
            model.graph.initializers[name].const_value = ir.tensor(value, name=name)
        acts = bias = None
        data_stages = calib_data is not None and (cfg.activations.enabled or bias_ref is not None)
        # an automatic bias correction is kept only where held-out samples show it helps
        checkable = bias_auto and samples is not None and not samples.synthetic
        # without activation Q/DQ that check already compares the model with the one the data check
        # would (before the correction) and writes the better one: no second validation of it
        bias_checked = checkable and bias_ref is not None and not cfg.activations.enabled
        weight_only = model.clone() if data_stages and samples is not None and not bias_checked else None
        before_bias = None
        try:
            if calib_data is not None and cfg.activations.enabled:
                acts = _quantize_activations(model, calib_data, cfg, timings, progress, learned)
            if bias_ref is not None and calib_data is not None:
                before_bias = model.clone() if checkable else None
                with timed(timings, "bias_correction"), biasruns.bias_failures(bias_notes):
                    bias = biascorrect.correct_biases(
                        model,
                        *bias_ref,
                        biasruns.bias_feeds(calib_data, bias_rows),
                        cfg.bias,
                        stage_progress(progress, "bias correction"),
                        biasruns.bias_batches(calib_data, cfg, bias_rows),
                    )
            if acts is not None:  # after the bias correction: int32 from here
                for m in (model, before_bias) if before_bias is not None else (model,):
                    activations.quantize_gemm_biases(m)
        finally:
            if calib_data is not None:
                calib_data.close()  # removes what a one-shot reader spooled to disk
        with timed(timings, "save"):
            if before_bias is not None:
                export.pack_weights(before_bias, quantized, exported, cfg.export)
            exported = export.pack_weights(model, quantized, exported, cfg.export)  # last: bit-packing
            staged = export.stage_model(model, Path(output_path), src, cfg.export)
        try:
            result = None
            if samples is not None:
                with timed(timings, "validate"):
                    result = validate.validate(
                        src, staged.path, samples, cfg.validate, stage_progress(progress, "validate")
                    )
                if before_bias is not None and bias is not None:
                    with timed(timings, "bias_check"):
                        check = check_bias(before_bias, src, Path(output_path), samples, result, cfg)
                    bias = replace(bias, held_out_db=(check.with_db, check.without_db), kept=check.kept)
                    if check.staged is not None and check.result is not None:
                        staged.discard()
                        staged, result = check.staged, check.result
                        notes.append(
                            f"bias correction not written: on {samples.source} the model without it is "
                            f"closer to FP32 (lowest output SQNR {check.without_db:.1f} dB against "
                            f"{check.with_db:.1f} dB); --bias-correction all forces it"
                        )
                if weight_only is not None:
                    with timed(timings, "data_check"):
                        note = data_cost_note(weight_only, src, Path(output_path), samples, result, cfg)
                    notes.extend([note] if note else [])
            elif cfg.validate.enabled:  # no inputs to compare on: at least onnxruntime must load it
                with timed(timings, "load_check"):
                    validate.check_loads(staged.path)
            if acts is not None:
                with timed(timings, "fusion_check"):
                    acts = replace(acts, fusion=check_fusion(staged.path, acts.compute_nodes))
            failures = gate_failures(result, cfg)
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
            objective=objective,
            average_bits=plan.average_bits,
            storage_bits=plan.storage_bits,
            weights=weight_reports(read, weights, quantized, plan, exported),
            skipped=read.skipped,
            validation=result,
            gate_failures=tuple(failures),
            output_written=not failures,
            settings=settings_dict(cfg, samples_path, labels_path),
            timings_s=timings,
            warnings=(*warnings_for(read, plan, exported, acts), *notes),
            activations=acts,
            reconstruction=recon,
            rounding_summary=rounded.summary,
            bias_correction=bias,
        )


def resolve_config(cfg: QuantConfig, *, has_calib: bool = False, attention: bool = False) -> QuantConfig:
    """Fill in the settings whose default depends on others, in one place for the CLI and the
    Python API: activation quantization (on when there are calibration data, except in attention
    graphs, see ActivationConfig), the weight symmetry (see QuantizerConfig) and the bias
    correction (on when there are calibration data, see BiasConfig)."""
    if cfg.activations.enabled is None:
        if has_calib and attention:
            logger.info(
                "attention graph: activations stay float (--static-activations quantizes the "
                "inputs of 8-bit weight MatMuls)"
            )
        enabled = has_calib and not attention
        cfg = replace(cfg, activations=replace(cfg.activations, enabled=enabled))
    if cfg.quantizer.symmetry is None:
        sym = Symmetry.SYMMETRIC_INT8 if cfg.activations.enabled else Symmetry.ASYMMETRIC
        cfg = replace(cfg, quantizer=replace(cfg.quantizer, symmetry=sym))
    if cfg.bias.mode is None:
        mode = BiasCorrection.ALL if has_calib else BiasCorrection.OFF
        cfg = replace(cfg, bias=replace(cfg.bias, mode=mode))
    return cfg


def _plan_weights(
    read: ReadModel,
    cfg: QuantConfig,
    calib: data.CalibrationData | None,
    timings: dict[str, float],
    progress: Progress | None,
    notes: list[str],
) -> tuple[dict[str, np.ndarray], search.BitPlan, rounding.RoundingPlan, str]:
    """Error table -> [output sensitivity] -> bit plan, for every weight site: the float weights,
    the plan, what the rounding stage rounds, and how the budget objective was obtained (for the
    report)."""
    values = weight_values(read.model)
    weights = {s.name: weight_array(values[s.name]) for s in read.sites}
    axes = {s.name: s.axis for s in read.sites}
    blocks: dict[str, int] | None = rounding.block_axes(read.sites)
    if blocks and cfg.quantizer.block_size and cfg.recon.method is RoundingMethod.BRECQ:
        # BRECQ learns per-channel rounding only. (Activation Q/DQ never meets a block-wise weight:
        # it does not fuse, so its op reads float activations, see activations._float_weight_op.)
        blocks = None
        logger.info("block-wise weight scales are off with --method brecq: per-channel scales used")
    with timed(timings, "error_table"):
        table = search.build_error_table(
            weights,
            axes,
            cfg.quantizer,
            cfg.search.candidate_bits,
            stage_progress(progress, "error table"),
            blocks=blocks,
        )
    objective, described = None, "roundoff"
    probe = cfg.search.rule is SearchRule.BUDGET and cfg.search.objective is not Objective.ROUNDOFF
    if probe and cfg.search.objective is Objective.GUARDED and not probing.has_decision_output(read):
        probe, described = False, "roundoff (guard not needed: no logits or probability output)"
    if probe:
        with timed(timings, "sensitivity"):
            found = probing.probe_sensitivity(read, cfg, calib, weights, axes, blocks, table, progress, notes)
        if found is not None:
            objective, described = probing.objective(cfg, table, found)
    with timed(timings, "search"):
        aliases = {s.name: s.consumers for s in read.sites}
        plan = search.search_bitwidths(
            table,
            cfg.search,
            aliases=aliases,
            use_int2=cfg.export.use_int2,
            pack_widths=cfg.export.pack_widths,
            objective=objective,
        )
    return weights, plan, rounding.RoundingPlan(read.sites, weights, axes, plan.bits, blocks), described


@dataclass(frozen=True)
class _ActivationStage:
    """The activation stage as the rounding stage's hook (BRECQ learns the steps it calibrates)."""

    act: ActivationConfig
    calib: data.CalibrationData

    def calibrate(self, model: ir.Model) -> tuple[activations.ActivationPlan, dict[str, QParams]]:
        """Plan and calibrate the activations of the weight-quantized ``model``."""
        aplan = activations.plan_activations(model, self.act)
        how = replace(self.act, method=self.act.method_for(aplan.mode == "attention"))
        ranges = calibrate.collect_ranges(
            model, aplan.calibrated(), self.calib.batches, how, None, self.calib.num_batches
        ).ranges
        return aplan, {
            n: activations.activation_qparams(r.rmin, r.rmax, self.act.symmetric) for n, r in ranges.items()
        }

    def insert(
        self, model: ir.Model, plan: activations.ActivationPlan, params: Mapping[str, QParams]
    ) -> None:
        """Insert the Q/DQ of ``plan`` into ``model``."""
        activations.insert_activation_qdq(model, plan, params)


def _rounding_data(
    cfg: QuantConfig,
    calib: data.CalibrationData | None,
    bias_ref: tuple[biascorrect.BiasPlan, list[np.ndarray]] | None,
    notes: list[str] | None,
) -> rounding.RoundingData | None:
    """What a data-aware rounding method reads: the calibration batches, a per-layer activation
    stream, the activation stage (when activations are quantized) and, with
    ``BiasCorrection.ALL`` (``bias_ref`` planned), the biases to correct unit by unit. ``notes``
    given: that correction is the default, and its failure stops it with a note instead of
    failing the run."""
    if calib is None:
        return None
    per_unit = bias_ref[0].targets if bias_ref is not None and cfg.bias.mode is BiasCorrection.ALL else ()
    return rounding.RoundingData(
        batches=calib.batches,
        num_batches=calib.num_batches,
        source=calib.source,
        stream=calibrate.activation_stream(calib.batches),
        activations=_ActivationStage(cfg.activations, calib) if cfg.activations.enabled else None,
        bias_targets=per_unit,
        bias_samples=cfg.bias.samples,
        bias_strict=notes is None,
    )


def _open_calibration(
    read: ReadModel, cfg: QuantConfig, calib: Any, image_spec: ImageSpec | None, holdout: int = 0
) -> data.CalibrationData | None:
    act = cfg.activations
    if calib is None:
        if act.enabled or cfg.recon.method is RoundingMethod.BRECQ or cfg.bias.mode is not BiasCorrection.OFF:
            what = (
                "activation quantization"
                if act.enabled
                else "--method brecq"
                if cfg.recon.method is RoundingMethod.BRECQ
                else "--bias-correction"
            )
            raise ConfigError(f"{what} needs calibration data (--calib PATH)")
        return None
    return data.open_calibration(
        calib,
        read.inputs,
        calib_size=act.calib_size,
        seed=cfg.seed,
        batch_size=act.batch_size,
        image_spec=image_spec,
        holdout=holdout,
    )


def _quantize_activations(
    model: Any,
    calib: data.CalibrationData,
    cfg: QuantConfig,
    timings: dict[str, float],
    progress: Progress | None,
    learned: Mapping[str, QParams] | None = None,
) -> ActivationReport:
    """Plan activation tensors, calibrate their ranges on ``calib``, insert their Q/DQ (in place);
    ``learned``: parameters with steps learned by BRECQ, which replace the calibrated ones by name."""
    act = cfg.activations
    folded = fold_pads_into_convs(model)
    aplan = activations.plan_activations(model, act)
    act = replace(act, method=act.method_for(aplan.mode == "attention"))
    with timed(timings, "calibrate"):
        result = calibrate.collect_ranges(
            model,
            aplan.calibrated(),
            calib.batches,
            act,
            stage_progress(progress, "calibrate"),
            calib.num_batches,
        )
    params = {
        n: activations.activation_qparams(r.rmin, r.rmax, act.symmetric) for n, r in result.ranges.items()
    }
    if learned is not None:
        params.update((n, learned[n]) for n in params if n in learned)
    activations.insert_activation_qdq(model, aplan, params)
    compute = _compute_readers(model, aplan)
    return ActivationReport(
        method=act.method_for(aplan.mode == "attention").value,
        dtype="INT8" if act.symmetric else "UINT8",
        calib_source=calib.source,
        num_samples=result.num_samples,
        provider=result.provider,
        tensors=tuple(
            ActivationTensor(
                name=s.name,
                shared_with=s.shared_with,
                rmin=float(result.ranges[s.shared_with or s.name].rmin),
                rmax=float(result.ranges[s.shared_with or s.name].rmax),
                scale=float(params[s.shared_with or s.name].scale),
                zero_point=int(params[s.shared_with or s.name].zero_point),
            )
            for s in aplan.sites
        ),
        skipped=aplan.skipped,
        compute_nodes=compute,
        fusion=None,
        folded_pads=tuple(folded),
        placement=aplan.mode,
    )


def _compute_readers(model: Any, aplan: activations.ActivationPlan) -> tuple[str, ...]:
    """Conv/ConvTranspose/Gemm/MatMul nodes that read a quantized activation (fusion targets)."""
    ops = {name: node.op_type for node, name in node_names(model).items()}
    found = {
        r for s in aplan.sites for r in s.readers if ops.get(r) in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    }
    return tuple(n for n in ops if n in found)


def _samples(
    read: ReadModel,
    cfg: QuantConfig,
    given: tuple[Any, str | Path | None, ImageSpec | None],
    calib: data.CalibrationData | None,
    notes: list[str],
) -> validate.Samples | None:
    """Validation inputs: ``given`` (samples, labels CSV, image preprocessing), else the samples
    held out of the calibration data (the calibration samples themselves, labelled so, when too
    few to hold any out), else synthetic inputs (None, with a note, when the FP model runs on none).

    Raises:
        ConfigError: labels without samples, or a top-1 gate these samples cannot evaluate.
    """
    source, labels, image_spec = given
    if labels is not None and source is None:
        raise ConfigError("--labels labels the files of --samples; give --samples too")
    found: validate.Samples | None
    if source is not None:
        found = data.load_samples(source, read.inputs, image_spec=image_spec, labels=labels)
    elif calib is not None:
        found = calib.held_out()
        if found is None:
            every = calib.as_samples(limit=VALIDATION_FROM_CALIB)
            found = replace(every, source=f"calibration data (not held out): {every.source}")
            notes.append(
                f"validation on the calibration samples ({calib.num_samples}: too few to hold out "
                "a quarter): not an independent check"
            )
    else:
        check_gate_inputs(None, cfg)
        return _synthetic(read, cfg, notes)
    check_gate_inputs(found, cfg)
    return found


def _synthetic(read: ReadModel, cfg: QuantConfig, notes: list[str]) -> validate.Samples | None:
    """Random validation inputs (None, with a note, when the FP model runs on none)."""
    found, plan, why = synthetic.synthetic_samples(
        read.path, read.inputs, read.model, cfg.validate.dims, cfg.validate.num_samples, cfg.seed
    )
    if plan.guessed:
        notes.append("random validation inputs use default dims: " + "; ".join(plan.guessed))
    if found is None:
        logger.warning("validation skipped: %s", why)
        notes.append(f"validation skipped (give --samples or --dim): {why}")
    return found
