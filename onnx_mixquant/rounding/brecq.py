"""BRECQ as a rounding method: nearest rounding first, then every unit's rounding learned on the
calibration data (:mod:`onnx_mixquant.reconstruct`), with the per-unit extras the data carry: the
biases corrected as soon as a unit's rounding is fixed, and the activation steps learned after."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx_mixquant.config import QuantConfig
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.reconstruct.train import reconstruct
from onnx_mixquant.report import ReconReport
from onnx_mixquant.rounding.stage import Progress, RoundingData, RoundingPlan, RoundingResult, nearest

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["brecq"]


def brecq(
    model: ir.Model,
    plan: RoundingPlan,
    data: RoundingData | None,
    cfg: QuantConfig,
    progress: Progress | None,
) -> RoundingResult:
    """Learn the rounding of every weight of ``plan``, unit by unit, on ``data``'s batches.

    Raises:
        ConfigError: no calibration data.
    """
    if data is None:
        raise ConfigError("--method brecq needs calibration data (--calib PATH)")
    start = nearest(model, plan, data, cfg, progress).weights
    result = reconstruct(
        model,
        plan.sites,
        start,
        plan.weights,
        iter(data.batches()),
        cfg.recon,
        seed=cfg.seed,
        progress=progress,
        activations=data.activations,
        bias_targets=data.bias_targets,
        bias_samples=data.bias_samples,
        bias_strict=data.bias_strict,
    )
    notes: tuple[str, ...] = ()
    if result.bias_error is not None and not data.bias_strict:
        notes = (
            f"bias correction inside BRECQ (default with calibration data) stopped: {result.bias_error}",
        )
    report = ReconReport(
        act_units=result.act_units,
        fisher=cfg.recon.fisher,
        provider=result.provider,
        seconds=result.seconds,
        iters=cfg.recon.iters,
        samples=cfg.recon.samples,
        batch=cfg.recon.batch,
        granularity=cfg.recon.granularity.value,
        units=result.units,
        split=cfg.recon.split.value,
        bias=result.bias,
    )
    return RoundingResult(
        weights=dict(result.weights),
        biases=result.biases,
        act_params=result.act_params,
        report=report,
        notes=notes,
    )
