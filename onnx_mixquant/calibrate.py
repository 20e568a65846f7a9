"""Calibrate: run a copy of the model in onnxruntime and collect activation ranges.

The model is cloned (``ir.Model.clone``: graphs and values are new objects, tensor data are
shared and never written), every requested tensor becomes a graph output of the clone, and ONE
onnxruntime session runs it batch by batch. Statistics are folded as each batch arrives: running
min / max per tensor and, for PERCENTILE and MSE, a fixed-size histogram that grows by merging
bins (see ``_histogram.py``); memory does not grow with the number of batches.

Optimisation level: ORT_ENABLE_ALL. onnxruntime keeps every graph output: a fusion never removes
a node whose output is a graph output, so each requested tensor is still computed (at most with
float rounding differences from fused kernels). Checked on efficientnet_lite0 (inputs and outputs
of every Conv / Gemm): the same tensors as ORT_DISABLE_ALL, ranges within float32 rounding.

Models whose tensors exceed the 2 GB protobuf limit are saved with external data to a temporary
folder, opened from there and deleted after calibration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir  # noqa: TID251
import onnxruntime as ort  # noqa: TID251

from onnx_mixquant._histogram import StreamingHistogram, mse_range
from onnx_mixquant._ortsession import compute_providers, with_cuda_options
from onnx_mixquant.config import ActivationConfig, CalibMethod
from onnx_mixquant.errors import CalibrationError, UnsupportedModelError

__all__ = ["CalibrationResult", "TensorRange", "batch_samples", "collect_ranges", "probe_session"]

logger = logging.getLogger(__name__)

OPTIMIZATION = "ORT_ENABLE_ALL"
_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: Above this many bytes of tensor data the probe model is saved with external data (protobuf's
#: limit is 2 GiB for the whole message; the margin leaves room for the graph itself).
_EXTERNAL_THRESHOLD = 1_800_000_000
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range of one activation tensor.

    ``rmin`` / ``rmax`` is the range chosen by the calibration method (not widened to hold 0);
    ``observed_min`` / ``observed_max`` the exact extremes of the finite values seen.
    """

    name: str
    rmin: float
    rmax: float
    observed_min: float
    observed_max: float


@dataclass(frozen=True)
class CalibrationResult:
    """Ranges by tensor name, plus how they were obtained.

    ``num_samples`` counts samples (axis 0 of the first input of each batch, 1 for a scalar);
    ``provider`` is the onnxruntime provider that actually ran; ``seconds`` the wall time.
    """

    ranges: Mapping[str, TensorRange]
    num_samples: int
    method: str
    provider: str
    seconds: float


class _TensorStats:
    """Running statistics of one tensor: finite min / max, value counts, optional histogram."""

    def __init__(self, name: str, num_bins: int | None) -> None:
        self.name = name
        self.vmin = math.inf
        self.vmax = -math.inf
        self.finite = 0
        self.nonfinite = 0
        self.hist = StreamingHistogram(num_bins) if num_bins else None

    def add(self, x: np.ndarray) -> None:
        """Fold one batch's values (any shape); NaN / Inf are counted and left out."""
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"tensor {self.name!r}: dtype {x.dtype} is not floating point")
        flat = x.reshape(-1)
        if flat.dtype == np.float16:
            flat = flat.astype(np.float32)
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            keep = np.isfinite(flat)
            self.nonfinite += int(flat.size - np.count_nonzero(keep))
            flat = flat[keep]
            if flat.size == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        self.finite += flat.size
        self.vmin, self.vmax = min(self.vmin, lo), max(self.vmax, hi)
        if self.hist is not None:
            self.hist.add(flat, lo, hi)

    def choose(self, cfg: ActivationConfig) -> TensorRange:
        """The range by ``cfg.method`` (see :func:`collect_ranges`)."""
        rmin, rmax = self.vmin, self.vmax
        if cfg.method is CalibMethod.PERCENTILE:
            assert self.hist is not None
            share = cfg.percentile / 100.0
            if self.vmin < 0:
                rmin = self.hist.quantile(1.0 - share)
            if self.vmax > 0:
                rmax = self.hist.quantile(share)
        elif cfg.method is CalibMethod.MSE:
            assert self.hist is not None
            rmin, rmax = mse_range(self.hist, cfg.mse_p, cfg.symmetric)
        return TensorRange(self.name, rmin, rmax, self.vmin, self.vmax)


def _main_graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for v in [*graph.inputs, *graph.initializers.values()]:
        if v.name:
            values[v.name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def _probe_model(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` with every tensor in ``names`` among the main graph's outputs.

    Raises:
        ValueError: a name is not a value of the main graph, or its type is not floating point.
    """
    probe = model.clone()
    values = _main_graph_values(probe.graph)
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"tensors not found in the main graph: {', '.join(map(repr, missing))}")
    not_float = [f"{n!r} ({values[n].dtype})" for n in names if values[n].dtype not in (None, *_FLOAT_TYPES)]
    if not_float:
        raise ValueError(f"tensors are not floating point: {', '.join(not_float)}")
    present = {v.name for v in probe.graph.outputs}
    for n in names:
        if n not in present:
            probe.graph.outputs.append(values[n])
    return probe


def _tensor_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _new_session(source: bytes | str, early_free: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVEL
    if early_free:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 3  # errors only: CUDA's "nodes placed on CPU" warnings are expected
    try:
        providers = with_cuda_options(compute_providers(), so)
        return ort.InferenceSession(source, sess_options=so, providers=providers)
    except Exception as e:
        raise UnsupportedModelError(
            f"onnxruntime cannot open the model for calibration: {_first_line(e)}"
        ) from e


@contextlib.contextmanager
def probe_session(probe: ir.Model, *, early_free: bool = False) -> Iterator[ort.InferenceSession]:
    """One session on ``probe``: from bytes, or from a temporary folder with external data when
    the tensors are too large for one protobuf message (the folder is deleted on exit).

    ``early_free``: onnxruntime's priority-based node order, for probes whose extra outputs are
    small reductions of big tensors; its default order ran those reductions last and kept every
    big tensor alive until then (EfficientNet-Lite0 with a mean per Conv, batch 16: 1.1 GB peak
    against 0.59 GB; the plain model 0.38 GB)."""
    if _tensor_bytes(probe) <= _EXTERNAL_THRESHOLD:
        yield _new_session(ir.to_proto(probe).SerializeToString(), early_free)
        return
    tmpdir = Path(tempfile.mkdtemp(prefix="onnx_mixquant_calib."))
    try:
        path = tmpdir / "probe.onnx"
        ir.save(probe, path, external_data="probe.onnx.data", size_threshold_bytes=1024)
        logger.debug("calibration model saved with external data to %s", tmpdir)
        yield _new_session(str(path), early_free)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def batch_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Axis 0 of the first input (1 for a scalar or an input-less model)."""
    shape: tuple[int, ...] = np.shape(next(iter(feed.values()))) if feed else ()
    return int(shape[0]) if shape else 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run(
    sess: ort.InferenceSession,
    stats: Sequence[_TensorStats],
    batches: Iterable[dict[str, np.ndarray]],
    progress: Callable[[int, int], None] | None,
    total: int,
) -> int:
    """Run every batch and fold its outputs into ``stats``; returns the number of samples."""
    names = [s.name for s in stats]
    samples = 0
    for i, feed in enumerate(batches):
        try:
            outs = sess.run(names, feed)
        except Exception as e:
            raise CalibrationError(f"onnxruntime cannot run calibration batch {i}: {_first_line(e)}") from e
        for s, out in zip(stats, outs, strict=True):
            s.add(np.asarray(out))
        del outs
        samples += batch_samples(feed)
        logger.debug("calibration batch %d done", i + 1)
        if progress is not None:
            progress(i + 1, total)
    return samples


def _check_finite(stats: Sequence[_TensorStats]) -> None:
    for s in stats:
        if s.nonfinite:
            logger.warning("tensor %r: %d NaN/Inf values left out of its range", s.name, s.nonfinite)
    bad = [s for s in stats if s.finite == 0]
    if bad:
        what = ", ".join(f"{s.name!r} ({s.nonfinite} NaN/Inf values)" for s in bad)
        raise CalibrationError(f"no finite calibration values for tensors: {what}")


def collect_ranges(
    model: ir.Model,
    tensors: Sequence[str],
    batches: Iterable[dict[str, np.ndarray]],
    cfg: ActivationConfig,
    progress: Callable[[int, int], None] | None = None,
    total_batches: int | None = None,
) -> CalibrationResult:
    """Run ``model`` on ``batches`` and choose a range for each tensor in ``tensors``.

    ``model`` is not modified. Ranges per ``cfg.method``: MINMAX, the observed extremes;
    PERCENTILE, ``rmax`` = the value below which ``cfg.percentile`` % of the values lie and
    ``rmin`` = the value above which ``cfg.percentile`` % lie (the observed extreme on a side with
    no values beyond 0, e.g. ``rmin`` of a ReLU output); MSE, the shrunk range minimising
    ``sum |x - fq(x)|^cfg.mse_p`` for 8-bit fake quantization (uint8 asymmetric, or int8
    symmetric when ``cfg.symmetric``), see ``_histogram.mse_range``. NaN / Inf values are left out
    (with a warning).

    Args:
        model: the FP model; tensors are looked up by name in its main graph.
        tensors: names of float tensors (graph inputs, node outputs or graph outputs).
        batches: feeds (input name -> array), consumed once, one batch at a time.
        cfg: the activation options (method, percentile, num_bins, mse_p, symmetric).
        progress: called with (batches done, ``total_batches`` or 0) after each batch.
        total_batches: the number of batches, when known (for ``progress`` only).

    Returns:
        The ranges by tensor name (every requested name, duplicates once).

    Raises:
        CalibrationError: no batch, a batch onnxruntime cannot run, or a tensor with no finite value.
        UnsupportedModelError: onnxruntime cannot open the model.
        ValueError: a name not in the main graph, or a tensor that is not floating point (bugs).
    """
    start = time.perf_counter()
    names = list(dict.fromkeys(tensors))
    probe = _probe_model(model, names)
    use_hist = cfg.method is not CalibMethod.MINMAX
    stats = [_TensorStats(n, cfg.num_bins if use_hist else None) for n in names]
    with probe_session(probe) as sess:
        provider = sess.get_providers()[0]
        samples = _run(sess, stats, batches, progress, total_batches or 0)
    if samples == 0:
        raise CalibrationError("no calibration samples")
    _check_finite(stats)
    ranges = {s.name: s.choose(cfg) for s in stats}
    seconds = time.perf_counter() - start
    logger.info(
        "calibrated %d tensors on %d samples (%s, %s, %s) in %.2fs",
        len(names),
        samples,
        cfg.method.value,
        provider,
        OPTIMIZATION,
        seconds,
    )
    return CalibrationResult(ranges, samples, cfg.method.value, provider, seconds)
