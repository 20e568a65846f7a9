"""The sensitivity probe as the pipeline runs it: which inputs it runs on (calibration samples,
else synthetic ones), whether the guard is needed, and the budget rule's objective from it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnx_mixquant import data, search
from onnx_mixquant._steps import Progress, free_batch, stage_progress
from onnx_mixquant.calibrate import batch_samples
from onnx_mixquant.config import Objective, QuantConfig
from onnx_mixquant.data import synthetic
from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.read import ReadModel
from onnx_mixquant.rounding.biascorrect import first_samples
from onnx_mixquant.search import sensitivity

__all__ = ["PROBE_LARGE_PARAMS", "PROBE_SEQUENCE", "has_decision_output", "objective", "probe_sensitivity"]


def has_decision_output(read: ReadModel) -> bool:
    """True when an output holds logits or probabilities: the guard protects such decisions (a
    classifier or LM head); on raw outputs it weighted up the last conv of the DBNet text
    detector and cost 6 F1 points against the roundoff objective (0.890 vs 0.950)."""
    return any(k != "raw" for k in sensitivity.output_kinds(read.model).values())


def objective(
    cfg: QuantConfig, table: search.ErrorTable, found: sensitivity.Sensitivity
) -> tuple[np.ndarray, str]:
    """The budget rule's objective from the probe, and its description for the report."""
    how = (
        f"{len(found.probed)} of {len(found.names)} weights probed at {'/'.join(map(str, found.run_bits))} "
        f"bits on {found.samples} samples of {found.source}, {found.seconds:.1f} s"
    )
    if cfg.search.objective is Objective.OUTPUT:
        return found.output_error, f"output error ({how})"
    objective, boosted = sensitivity.guarded_objective(table.normalised(), found, cfg.search.guard_ratio)
    top = sorted(boosted.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{n} x{f:.3g}" for n, f in top[:5]) + (
        f" and {len(top) - 5} more" if len(top) > 5 else ""
    )
    return objective, (
        f"roundoff error, guarded ({how}): " + (f"outliers weighted up: {listed}" if top else "no outlier")
    )


def probe_sensitivity(
    read: ReadModel,
    cfg: QuantConfig,
    calib: data.CalibrationData | None,
    weights: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
    blocks: Mapping[str, int] | None,
    table: search.ErrorTable,
    progress: Progress | None,
    notes: list[str],
) -> sensitivity.Sensitivity | None:
    """The probe's measurement; None (with a note) where GUARDED cannot probe the model."""
    auto = cfg.search.objective is Objective.GUARDED
    feeds, source, why = probe_feeds(read, cfg, calib, table)
    if feeds is None:
        if not auto:
            raise ConfigError(f"--objective output: cannot run the model on any input: {why}")
        notes.append(f"budget objective: roundoff error (the model could not be probed: {why})")
        return None
    try:
        return sensitivity.measure_sensitivity(
            read.model,
            weights,
            axes,
            table.normalised(),
            table.bits,
            cfg.quantizer,
            feeds,
            source,
            stage_progress(progress, "sensitivity"),
            probe_bits=guard_bits(table.bits) if auto else None,
            blocks=blocks,
        )
    except UnsupportedModelError as e:
        if not auto:
            raise
        notes.append(f"budget objective: roundoff error (the sensitivity probe failed: {e})")
        return None


#: Above this many weight parameters the probe runs on 2 samples instead of sensitivity_samples.
PROBE_LARGE_PARAMS = 30_000_000
#: Sequence-like dims of the probe's synthetic inputs (validation uses synthetic.DEFAULT_SEQUENCE):
#: each probe runs the model once per weight and width, and an LM's logits grow with it.
PROBE_SEQUENCE = 32


def guard_bits(bits: tuple[int, ...]) -> tuple[int, ...]:
    """Widths the GUARDED probe runs: 3 and 4 where they are candidates, else the two lowest."""
    return tuple(b for b in bits if b in (3, 4)) or bits[:2]


def probe_feeds(
    read: ReadModel, cfg: QuantConfig, calib: data.CalibrationData | None, table: search.ErrorTable
) -> tuple[list[dict[str, np.ndarray]] | None, str, str]:
    """A few input batches for the sensitivity probe: calibration samples when given, else
    synthetic inputs (joined into one batch where the batch dim is free); (None, "", why) when
    the model runs on neither. Models over PROBE_LARGE_PARAMS weight parameters get 2 samples."""
    want = cfg.search.sensitivity_samples
    if int(table.sizes.sum()) > PROBE_LARGE_PARAMS:
        want = min(want, 2)
    free = free_batch(read)
    if calib is not None:
        feeds, seen = [], 0
        for feed in first_samples(calib.batches(), want):
            rows = batch_samples(feed)
            if free and seen + rows > want:
                feed, rows = {k: v[: want - seen] for k, v in feed.items()}, want - seen
            feeds.append(feed)
            seen += rows
        return feeds, f"{calib.source}", ""
    found, _, why = synthetic.synthetic_samples(
        read.path, read.inputs, read.model, cfg.validate.dims, want, cfg.seed, PROBE_SEQUENCE
    )
    if found is None:
        return None, "", why or "no inputs"
    feeds = list(found.feeds)
    if free:
        feeds = [{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}]
    return feeds, "synthetic inputs", ""
