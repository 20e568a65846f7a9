"""Validate: run the FP32 and the quantized model side by side in onnxruntime and compare outputs.

Each session sets its graph optimisation level explicitly; the quantized model is checked at
ORT_ENABLE_ALL (what users deploy) and with optimisations off (the plain QDQ semantics), on the CPU
provider and on CUDA when onnxruntime can really use it (the probe and the session options live in
:mod:`onnx_mixquant._ortsession`).

Memory: the FP reference outputs are computed once and kept per batch (every run reuses them); a
run of the quantized model only accumulates sums and counts batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_mixquant._ortsession import CPU, first_line, open_session
from onnx_mixquant._ortsession import _cuda_works as _cuda_works
from onnx_mixquant._ortsession import available_providers as available_providers
from onnx_mixquant.config import ValidateConfig
from onnx_mixquant.errors import CalibrationError, ConfigError, ExportError, ModelLoadError
from onnx_mixquant.graph import ModelInput

__all__ = [
    "OutputMetrics",
    "RunMetrics",
    "Samples",
    "ValidationResult",
    "available_providers",
    "random_samples",
    "resolve_dims",
    "validate",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: Quantized-model configurations, in run order: (name recorded in RunMetrics, level).
_LEVELS: tuple[tuple[str, ort.GraphOptimizationLevel], ...] = (
    ("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ("ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
)
#: Random integer inputs are drawn from [0, _INT_HIGH): small and non-negative, so that they are
#: valid indices / token ids for most models.
_INT_HIGH = 10
#: Dim values that mean "unknown, unnamed" in ModelInput.dims.
_UNNAMED = ("", "?")


@dataclass(frozen=True)
class Samples:
    """Inputs to run both models on.

    Attributes:
        feeds: batches, each a dict input name -> array (batch on axis 0).
        labels: int64 class labels for all samples concatenated (for top-1 accuracy), or None.
        source: where they came from, e.g. "random (seed 0)" or a file path.
    """

    feeds: tuple[Feed, ...]
    labels: np.ndarray | None
    source: str


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


def _is_unnamed(dim: object) -> bool:
    """True for a dim that is neither a size nor a name (None, "", "?", a negative int)."""
    return dim is None or dim in _UNNAMED or (isinstance(dim, int) and dim < 0)


def resolve_dims(inputs: Sequence[ModelInput], dims: Mapping[str, int] | None) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input; symbolic dims from ``dims`` by dim name. Raises ConfigError listing
    every unresolved symbolic dim (input name, position, dim name) when one is missing."""
    dims = dict(dims or {})
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    used: set[str] = set()
    for inp in inputs:
        shape: list[int] = []
        for pos, d in enumerate(inp.dims):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif not _is_unnamed(d) and str(d) in dims:
                used.add(str(d))
                shape.append(dims[str(d)])
            else:
                label = "unnamed, unknown" if _is_unnamed(d) else repr(d)
                missing.append(f"input {inp.name!r} dim {pos} ({label})")
        shapes[inp.name] = tuple(shape)
    if missing:
        raise ConfigError(
            "cannot make sample inputs: unresolved symbolic dimensions: "
            + "; ".join(missing)
            + ". Give a value per dim name (--dim NAME=1 on the command line, ValidateConfig.dims in "
            + "Python), or give sample data (--samples)"
        )
    unused = sorted(set(dims) - used)
    if unused:
        logger.warning("dimension values not used by any model input: %s", ", ".join(unused))
    return shapes


def _np_dtype(inp: ModelInput) -> np.dtype:
    """The input's NumPy dtype, when random samples can be drawn for it (float, int, bool)."""
    dtype = None
    if inp.dtype not in _UNNAMED:  # np.dtype("?") would be bool
        try:
            dtype = np.dtype(inp.dtype)
        except TypeError:
            pass
    if dtype is None or dtype.kind not in "fiub":
        what = "unknown element type" if inp.dtype in _UNNAMED else f"element type {inp.dtype!r}"
        raise ConfigError(f"input {inp.name!r}: cannot make random samples of {what}; give data")
    return dtype


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, _INT_HIGH, size=shape), dtype=dtype)
    return np.asarray(rng.random(shape) < 0.5)  # rank-0 inputs need arrays, not NumPy scalars


def random_samples(
    inputs: Sequence[ModelInput], shapes: dict[str, tuple[int, ...]], num: int, seed: int
) -> Samples:
    """``num`` random feeds of the resolved shapes (standard normal for float inputs, small
    non-negative ints for integer inputs, random bools), from np.random.default_rng(seed)."""
    if num < 1:
        raise ConfigError(f"number of random samples must be >= 1, got {num!r}")
    dtypes = {inp.name: _np_dtype(inp) for inp in inputs}
    for name in dtypes:
        if name not in shapes:
            raise ConfigError(f"input {name!r}: no resolved shape")
    rng = np.random.default_rng(seed)
    feeds = tuple({n: _random_array(rng, dt, shapes[n]) for n, dt in dtypes.items()} for _ in range(num))
    return Samples(feeds=feeds, labels=None, source=f"random (seed {seed})")


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


def _metrics(ref: _Reference, accs: Sequence[_Acc]) -> tuple[OutputMetrics, ...]:
    return tuple(
        OutputMetrics(
            name=name,
            sqnr_db=_sqnr_db(energy, acc.sq_err),
            max_abs_error=acc.max_abs,
            top1_agreement=acc.agree / acc.rows if acc.rows else None,
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
            run = RunMetrics(provider, level[0], _metrics(ref, accs), top1_fp, top1_quant)
            worst = min((o.sqnr_db for o in run.outputs), default=float("inf"))
            logger.info("validate %s %s: lowest output SQNR %.2f dB", provider, level[0], worst)
            runs.append(run)
    num = sum(_feed_rows(f) for f in samples.feeds)
    return ValidationResult(tuple(runs), num, samples.source, providers)


def _feed_rows(feed: Feed) -> int:
    """Samples in one batch: axis 0 of its first input (1 for scalar inputs or no inputs)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) >= 1 else 1
