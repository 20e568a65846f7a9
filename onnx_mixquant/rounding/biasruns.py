"""How the pipeline runs the bias correction: the FP reference means, runs of a bounded number of
samples, and turning a failure of the default correction into a note."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from onnx_mixquant import data
from onnx_mixquant._steps import Progress, free_batch, stage_progress, timed
from onnx_mixquant.calibrate import batch_samples
from onnx_mixquant.config import BiasCorrection, QuantConfig
from onnx_mixquant.errors import MixQuantError
from onnx_mixquant.read import ReadModel
from onnx_mixquant.rounding import biascorrect

__all__ = [
    "BIAS_INPUT_BYTES",
    "bias_batches",
    "bias_failures",
    "bias_feeds",
    "bias_reference",
    "bias_run_rows",
]

logger = logging.getLogger(__name__)


@contextmanager
def bias_failures(notes: list[str] | None) -> Iterator[None]:
    """Turn a failure of the bias correction into a note (``notes`` given: the correction is the
    default, not asked for) instead of an error."""
    try:
        yield
    except (MixQuantError, ValueError) as e:
        if notes is None:
            raise
        logger.warning("bias correction skipped: %s", e)
        notes.append(f"bias correction (default with calibration data) skipped: {e}")


def bias_reference(
    read: ReadModel,
    cfg: QuantConfig,
    calib: data.CalibrationData | None,
    rows: int | None,
    timings: dict[str, float],
    progress: Progress | None,
    notes: list[str] | None,
) -> tuple[biascorrect.BiasPlan, list[np.ndarray]] | None:
    """The biases to correct and the FP model's output means (before export rewrites the model),
    on runs of ``rows`` samples (see _bias_run_rows); None when there is nothing to do or
    (``notes`` given) when it failed."""
    if cfg.bias.mode is BiasCorrection.OFF or calib is None:
        return None
    with timed(timings, "bias_reference"), bias_failures(notes):
        plan = biascorrect.plan_correction(read.model, read.sites)
        means = biascorrect.reference_means(
            read.model,
            plan.targets,
            biascorrect.first_samples(bias_feeds(calib, rows)(), cfg.bias.samples),
            stage_progress(progress, "bias reference"),
            bias_batches(calib, cfg, rows),
        )
        return plan, means
    return None


#: The bias correction runs the model in segments and holds a segment's outputs for a whole batch:
#: batches whose inputs take more than this many bytes are cut into runs of fewer samples (the
#: DBNet text detector, 3x736x992 inputs, peaked at 2.6 GB RSS with batches of 16). The means are
#: sums over samples, so only the float summation order changes, and only for such inputs.
BIAS_INPUT_BYTES = 16 * 2**20


def bias_run_rows(calib: data.CalibrationData, read: ReadModel) -> int | None:
    """Samples per bias-correction run: None (whole batches) unless one batch's inputs take more
    than BIAS_INPUT_BYTES and the model leaves the batch free. Reads the first batch once."""
    if not free_batch(read):
        return None
    first = next(iter(calib.batches()), None)
    if first is None:
        return None
    rows = batch_samples(first)
    per_sample = sum(np.asarray(a).nbytes for a in first.values()) / max(rows, 1)
    run = max(1, int(BIAS_INPUT_BYTES // max(per_sample, 1.0)))
    return run if run < rows else None


def bias_feeds(
    calib: data.CalibrationData, rows: int | None
) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    """The calibration batches, cut into runs of ``rows`` samples (None: as they are)."""
    if rows is None:
        return calib.batches

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for feed in calib.batches():
            for start in range(0, batch_samples(feed), rows):
                yield {n: a[start : start + rows] for n, a in feed.items()}

    return feeds


def bias_batches(calib: data.CalibrationData, cfg: QuantConfig, rows: int | None) -> int:
    """Runs the bias correction makes per pass (for its progress)."""
    batches = min(calib.num_batches, -(-cfg.bias.samples // calib.batch_size))
    return batches if rows is None else batches * -(-calib.batch_size // rows)
