"""Did the calibration data make the model worse? Compare with the same weights without them.

With ``--calib`` the tool adds what data make possible: 8-bit activation Q/DQ and bias
correction. Both usually help or cost little, but not always (measured on all-mpnet-base-v2 at
4 bits: bias correction lowered the embeddings' cosine to FP32's from 0.980 to 0.950). The
weight-quantized model before those stages is what the same command without data would write
(up to the bit plan, which the data may also steer), so validating it on the same held-out
samples says whether the data paid off, and the report says so when they did not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from onnx_mixquant import export
from onnx_mixquant.config import QuantConfig
from onnx_mixquant.validate import compare as validate

__all__ = ["MARGIN_DB", "BiasCheck", "check_bias", "data_cost_note"]

logger = logging.getLogger(__name__)

#: A loss of more than this many dB of the lowest output SQNR is reported.
MARGIN_DB = 3.0


def _worst_sqnr(result: validate.ValidationResult) -> float:
    """Lowest output SQNR of the CPU run at ORT_ENABLE_ALL (what users deploy)."""
    runs = [r for r in result.runs if r.optimization == "ORT_ENABLE_ALL"] or list(result.runs)
    return min((o.sqnr_db for r in runs[:1] for o in r.outputs), default=float("inf"))


def data_cost_note(
    weight_only: ir.Model,
    src: Path,
    output_path: Path,
    samples: validate.Samples,
    final: validate.ValidationResult,
    cfg: QuantConfig,
) -> str | None:
    """A note when the final model's lowest output SQNR on ``samples`` is more than
    :data:`MARGIN_DB` below that of ``weight_only`` (the model before activation quantization and
    bias correction); None otherwise, or when the samples are synthetic."""
    if samples.synthetic:
        return None
    staged = export.stage_model(weight_only, output_path, src, cfg.export)
    try:
        plain = validate.validate(src, staged.path, samples, replace(cfg.validate, try_cuda=False))
    finally:
        staged.discard()
    with_data, without = _worst_sqnr(final), _worst_sqnr(plain)
    logger.info(
        "lowest output SQNR: %.2f dB with the calibration stages, %.2f dB without", with_data, without
    )
    if not with_data < without - MARGIN_DB:
        return None
    return (
        f"the calibration data made this model worse on {samples.source}: lowest output SQNR "
        f"{with_data:.1f} dB against {without:.1f} dB for the same weights without 8-bit activations "
        "and bias correction; --weight-only or --bias-correction off may do better"
    )


@dataclass
class BiasCheck:
    """The held-out comparison of the model with and without the bias correction.

    Attributes:
        with_db: lowest output SQNR (dB) with the correction.
        without_db: the same without it.
        staged: the model without the correction, staged for writing, when it is the better one
            (the caller commits or discards it); else None.
        result: its validation result when ``staged`` is set.
    """

    with_db: float
    without_db: float
    staged: export.StagedModel | None = None
    result: validate.ValidationResult | None = None

    @property
    def kept(self) -> bool:
        """Whether the correction stays (it is dropped only when the model is better without)."""
        return self.staged is None


def check_bias(
    before: ir.Model,
    src: Path,
    output_path: Path,
    samples: validate.Samples,
    final: validate.ValidationResult,
    cfg: QuantConfig,
) -> BiasCheck:
    """Validate ``before`` (the final model but for the bias correction) on ``samples``, which
    ``final`` was validated on; it is staged for writing when its lowest output SQNR is higher."""
    staged = export.stage_model(before, output_path, src, cfg.export)
    try:
        result = validate.validate(src, staged.path, samples, cfg.validate)
    except BaseException:
        staged.discard()
        raise
    with_db, without_db = _worst_sqnr(final), _worst_sqnr(result)
    logger.info(
        "bias correction, lowest held-out output SQNR: %.2f dB with, %.2f dB without", with_db, without_db
    )
    if without_db > with_db:
        return BiasCheck(with_db, without_db, staged, result)
    staged.discard()
    return BiasCheck(with_db, without_db)
