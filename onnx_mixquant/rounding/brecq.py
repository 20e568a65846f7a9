"""BRECQ as a rounding method: nearest rounding first, then every unit's rounding learned on the
calibration data (:mod:`onnx_mixquant.rounding.reconstruct`), with the per-unit extras the data carry: the
biases corrected as soon as a unit's rounding is fixed, and the activation steps learned after."""

from __future__ import annotations

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.report import ReconReport
from onnx_mixquant.rounding.reconstruct.train import reconstruct
from onnx_mixquant.rounding.stage import RoundingJob, RoundingResult, nearest

__all__ = ["brecq"]


def brecq(job: RoundingJob) -> RoundingResult:
    """Learn the rounding of every weight of ``job.plan``, unit by unit, on ``job.data``'s batches.

    Raises:
        ConfigError: no calibration data.
    """
    data, plan, cfg = job.data, job.plan, job.cfg
    if data is None:
        raise ConfigError("--method brecq needs calibration data (--calib PATH)")
    start = nearest(job).weights
    result = reconstruct(
        job.model,
        plan.sites,
        start,
        plan.weights,
        iter(data.batches()),
        cfg.recon,
        seed=cfg.seed,
        progress=job.progress,
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
