"""Validate: run the FP32 and the quantized model side by side in onnxruntime and compare outputs.

Each session sets its graph optimisation level explicitly; the quantized model is checked at
ORT_ENABLE_ALL (what users deploy) and with optimisations off (the plain QDQ semantics), on the CPU
provider and on CUDA when onnxruntime can really use it (the probe and the session options live in
:mod:`onnx_mixquant.session`).

Memory: the FP reference outputs are computed once and kept per batch (every run reuses them); a
run of the quantized model only accumulates sums and counts batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_mixquant.config import ValidateConfig
from onnx_mixquant.errors import CalibrationError, ExportError, ModelLoadError
from onnx_mixquant.session import CPU, first_line, open_session
from onnx_mixquant.session import _cuda_works as _cuda_works
from onnx_mixquant.session import available_providers as available_providers

__all__ = [
    "OutputMetrics",
    "RunMetrics",
    "Samples",
    "ValidationResult",
    "available_providers",
    "validate",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: Quantized-model configurations, in run order: (name recorded in RunMetrics, level).
_LEVELS: tuple[tuple[str, ort.GraphOptimizationLevel], ...] = (
    ("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ("ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
)


@dataclass(frozen=True)
class Samples:
    """Inputs to run both models on.

    Attributes:
        feeds: batches, each a dict input name -> array (batch on axis 0).
        labels: int64 class labels for all samples concatenated (for top-1 accuracy), or None.
        source: where they came from, e.g. "random (seed 0)" or a file path.
        synthetic: drawn at random (:mod:`onnx_mixquant.data.synthetic`), not data the model will see:
            results are indicative only and no top-1 figure is given.
    """

    feeds: tuple[Feed, ...]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False


@dataclass(frozen=True)
class OutputMetrics:
    """FP vs quantized on one model output.

    sqnr_db = 10 log10(sum(fp^2) / sum((fp - q)^2)) over all samples (inf when equal);
    top1_agreement: fraction of samples whose argmax over the last axis agrees (only for
    classifier-like outputs: rank 2, last dim > 1), else None.
    """

    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class RunMetrics:
    """One onnxruntime configuration of the quantized model (provider x optimisation level)."""

    provider: str
    optimization: str  # "ORT_ENABLE_ALL" | "ORT_DISABLE_ALL"
    outputs: tuple[OutputMetrics, ...]
    top1_fp: float | None  # accuracy against labels, when labels are given
    top1_quant: float | None


@dataclass(frozen=True)
class ValidationResult:
    """All runs, plus what was available."""

    runs: tuple[RunMetrics, ...]
    num_samples: int
    sample_source: str
    providers: tuple[str, ...]  # providers that actually ran
    #: True for synthetic (random) inputs: a check that the model computes the same function on
    #: some inputs, not a measure of its accuracy; top-1 agreement is not computed then.
    indicative: bool = False


def _tensor_output_names(sess: ort.InferenceSession, path: Path) -> tuple[str, ...]:
    """Numeric tensor outputs; sequences, maps and strings are not compared."""
    names = []
    for out in sess.get_outputs():
        if out.type.startswith("tensor(") and out.type != "tensor(string)":
            names.append(out.name)
        else:
            logger.warning("%s: output %r of type %s is not compared", path, out.name, out.type)
    return tuple(names)


@dataclass
class _Reference:
    """FP outputs per batch (tensor outputs only, in ``names`` order) and what every run reuses."""

    names: tuple[str, ...]
    batches: list[list[np.ndarray]] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)  # sum(fp^2) per output, float64
    classifier: int | None = None  # index of the first classifier-like output


def _is_classifier(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[-1] > 1


def _reference(fp_path: Path, samples: Samples, tick: Callable[[], None]) -> _Reference:
    try:
        sess = open_session(fp_path, CPU, "ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as e:
        raise ModelLoadError(f"onnxruntime cannot open the FP model {fp_path}: {first_line(e)}") from e
    ref = _Reference(names=_tensor_output_names(sess, fp_path))
    ref.energy = [0.0] * len(ref.names)
    for i, feed in enumerate(samples.feeds):
        try:
            outs = [np.asarray(o) for o in sess.run(list(ref.names), feed)]
        except Exception as e:
            raise CalibrationError(
                f"{fp_path}: onnxruntime cannot run the FP model on batch {i} of "
                f"{samples.source}: {first_line(e)}"
            ) from e
        if i == 0:
            ref.classifier = next((k for k, o in enumerate(outs) if _is_classifier(o)), None)
        for k, o in enumerate(outs):
            ref.energy[k] += float(np.sum(np.square(o, dtype=np.float64)))
        ref.batches.append(outs)
        tick()
    return ref


def _check_labels(labels: np.ndarray | None, ref: _Reference) -> np.ndarray | None:
    if labels is None:
        return None
    if ref.classifier is None:
        logger.warning("labels given, but no output is classifier-like (rank 2); no accuracy")
        return None
    labels = np.asarray(labels).reshape(-1)
    rows = sum(b[ref.classifier].shape[0] for b in ref.batches)
    if labels.shape[0] != rows:
        raise CalibrationError(
            f"{labels.shape[0]} labels for {rows} samples (rows of output {ref.names[ref.classifier]!r})"
        )
    return labels


def _accuracy(predictions: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Fraction of samples whose predicted class (argmax, per batch) equals the label."""
    return float(np.mean(np.concatenate(predictions) == labels))


@dataclass
class _Acc:
    """Running FP-vs-quantized sums for one output."""

    sq_err: float = 0.0
    max_abs: float = 0.0
    agree: int = 0
    rows: int = 0

    def add(self, fp: np.ndarray, q: np.ndarray) -> None:
        d = fp.astype(np.float64) - q.astype(np.float64)
        self.sq_err += float(np.sum(np.square(d)))
        if d.size:
            self.max_abs = float(np.max([self.max_abs, float(np.max(np.abs(d)))]))  # NaN propagates
        if _is_classifier(fp):
            self.agree += int(np.sum(np.argmax(fp, axis=-1) == np.argmax(q, axis=-1)))
            self.rows += fp.shape[0]


def _sqnr_db(energy: float, sq_err: float) -> float:
    if sq_err == 0.0:
        return float("inf")
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(energy / sq_err))


def _run_quant(
    quant_path: Path,
    provider: str,
    level: tuple[str, ort.GraphOptimizationLevel],
    samples: Samples,
    ref: _Reference,
    tick: Callable[[], None],
) -> tuple[list[_Acc], list[np.ndarray]]:
    """Run every batch on one configuration; returns the accumulators and the predicted classes."""
    where = f"{quant_path} on {provider} at {level[0]}"
    try:
        sess = open_session(quant_path, provider, *level)
    except Exception as e:
        raise ExportError(f"onnxruntime cannot open {where}: {first_line(e)}") from e
    accs = [_Acc() for _ in ref.names]
    predictions: list[np.ndarray] = []
    for i, (feed, fp_outs) in enumerate(zip(samples.feeds, ref.batches, strict=True)):
        try:
            outs = [np.asarray(o) for o in sess.run(list(ref.names), feed)]
        except Exception as e:
            raise ExportError(f"onnxruntime failed on batch {i} of {where}: {first_line(e)}") from e
        for name, acc, fp, q in zip(ref.names, accs, fp_outs, outs, strict=True):
            if fp.shape != q.shape:
                raise ExportError(f"{where}: output {name!r} has shape {q.shape}, FP model gives {fp.shape}")
            acc.add(fp, q)
        if ref.classifier is not None:
            predictions.append(np.argmax(outs[ref.classifier], axis=-1))
        tick()
    return accs, predictions


def _metrics(ref: _Reference, accs: Sequence[_Acc], agreement: bool) -> tuple[OutputMetrics, ...]:
    return tuple(
        OutputMetrics(
            name=name,
            sqnr_db=_sqnr_db(energy, acc.sq_err),
            max_abs_error=acc.max_abs,
            top1_agreement=acc.agree / acc.rows if acc.rows and agreement else None,
        )
        for name, energy, acc in zip(ref.names, ref.energy, accs, strict=True)
    )


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick


def validate(
    fp_path: Path,
    quant_path: Path,
    samples: Samples,
    cfg: ValidateConfig,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationResult:
    """Run FP (CPU, ORT_DISABLE_ALL: the reference) and quantized models on ``samples``.

    The FP model runs once, on CPU with optimisations off. The quantized model runs for every
    provider of :func:`available_providers` at ORT_ENABLE_ALL and at ORT_DISABLE_ALL.

    Raises:
        CalibrationError: no sample batches, feeds the FP model rejects, or a label count that does
            not match the samples.
        ModelLoadError: onnxruntime cannot open the FP model.
        ExportError: onnxruntime cannot open or run the quantized model in some configuration.
    """
    if not samples.feeds:
        raise CalibrationError(f"no sample batches in {samples.source}")
    providers = available_providers(cfg.try_cuda)
    tick = _ticker(progress, len(samples.feeds) * (1 + len(providers) * len(_LEVELS)))
    ref = _reference(Path(fp_path), samples, tick)
    labels = _check_labels(samples.labels, ref)
    top1_fp = None
    if labels is not None and ref.classifier is not None:
        top1_fp = _accuracy([np.argmax(b[ref.classifier], axis=-1) for b in ref.batches], labels)
    runs = []
    for provider in providers:
        for level in _LEVELS:
            accs, predictions = _run_quant(Path(quant_path), provider, level, samples, ref, tick)
            top1_quant = _accuracy(predictions, labels) if labels is not None else None
            metrics = _metrics(ref, accs, agreement=not samples.synthetic)
            run = RunMetrics(provider, level[0], metrics, top1_fp, top1_quant)
            worst = min((o.sqnr_db for o in run.outputs), default=float("inf"))
            logger.info("validate %s %s: lowest output SQNR %.2f dB", provider, level[0], worst)
            runs.append(run)
    num = sum(_feed_rows(f) for f in samples.feeds)
    return ValidationResult(tuple(runs), num, samples.source, providers, indicative=samples.synthetic)


def _feed_rows(feed: Feed) -> int:
    """Samples in one batch: axis 0 of its first input (1 for scalar inputs or no inputs)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) >= 1 else 1


def check_loads(quant_path: Path) -> None:
    """Open the quantized model in onnxruntime (CPU, ORT_ENABLE_ALL: the level that fuses, and
    the one that refuses some forms) when there are no inputs to validate on.

    Raises:
        ExportError: onnxruntime cannot open it.
    """
    try:
        open_session(Path(quant_path), CPU, *_LEVELS[0])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot open {quant_path} at {_LEVELS[0][0]}: {first_line(e)}") from e
