"""Calibrate: run copies of the model in onnxruntime and collect activation ranges.

Memory is bounded by design (``memory_budget``, default :data:`MEMORY_BUDGET`): a session
returns every requested output of a run at once (and onnxruntime holds every graph output until
the run ends, fetched or not), so the requested tensors are split into groups, in graph order,
whose outputs for one sample fit the budget, and each group gets its own session on a clone of
the model (``ir.Model.clone``: graphs and values are new objects, tensor data are shared and
never written) whose outputs are that group's tensors, pruned to the nodes they need. Each feed
is split into runs of as many samples as the budget allows (one at least). Tensor sizes come
from onnx shape inference, with the inputs fixed to the first feed's shapes where dims are
symbolic, else from a run of one sample: see ``_calibplan.py``. With several groups the data is
read once per group, so ``batches`` should be re-iterable (a callable such as
``CalibrationData.batches``, or a list); a one-shot iterator is read once and each group's
session is then opened again for every batch. Requested graph inputs are read from the feeds.
RapidOCR's DBNet detector (16 samples of 3x736x992, 288 tensors): 3 groups, runs of 3 samples,
1.1 GB peak RSS, against 1.1 GB more per sample of the batch with one session.

Statistics are folded as each run's outputs arrive: running min / max per tensor and, for
PERCENTILE and MSE, a fixed-size histogram on a power-of-two grid (see ``_histogram.py``);
memory does not grow with the number of batches. Both depend only on the multiset of values
seen, so the ranges are the same, bit for bit, whatever the batch size or the budget:
onnxruntime's CPU kernels compute each sample alike at any batch size (checked on
EfficientNet-Lite0 and DBNet, batch 4 against 4 runs of 1), and each requested tensor that a
group's session computes without returning it gets a scalar ReduceSum consumer, so that no
fusion crosses it that one session returning every tensor would not make (DBNet: the same 288
ranges with 3 groups and with 13).

Optimisation level: ORT_ENABLE_ALL. onnxruntime keeps every graph output: a fusion never removes
a node whose output is a graph output, so each requested tensor is still computed (at most with
float rounding differences from fused kernels). Checked on efficientnet_lite0 (inputs and outputs
of every Conv / Gemm): the same tensors as ORT_DISABLE_ALL, ranges within float32 rounding.

Models whose tensors exceed the 2 GB protobuf limit are saved with external data to a temporary
folder, opened from there and deleted after calibration.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir  # noqa: TID251
import onnx_ir.passes.common  # noqa: TID251
import onnxruntime as ort  # noqa: TID251

from onnx_mixquant.calibrate._calibplan import Group, Runs, batch_samples, graph_values, plan_runs
from onnx_mixquant.calibrate._histogram import StreamingHistogram, mse_range
from onnx_mixquant.config import ActivationConfig, CalibMethod
from onnx_mixquant.errors import CalibrationError, UnsupportedModelError
from onnx_mixquant.session import compute_providers, with_cuda_options

__all__ = [
    "MEMORY_BUDGET",
    "CalibrationResult",
    "TensorRange",
    "activation_stream",
    "batch_samples",
    "collect_ranges",
    "probe_session",
]

logger = logging.getLogger(__name__)

OPTIMIZATION = "ORT_ENABLE_ALL"
_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: Above this many bytes of tensor data the probe model is saved with external data (protobuf's
#: limit is 2 GiB for the whole message; the margin leaves room for the graph itself).
_EXTERNAL_THRESHOLD = 1_800_000_000
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
#: Default ``memory_budget`` of :func:`collect_ranges`: bytes of requested outputs plus the model's
#: working memory that one onnxruntime run may hold. A constant, not the machine's free memory, so
#: that the grouping -- and with it the output -- is the same on every machine.
MEMORY_BUDGET = 512 * 2**20

Feed = dict[str, np.ndarray]
#: Calibration feeds: a callable returning a fresh iterable (one pass per group), or an iterable.
Batches = Callable[[], Iterable[Feed]] | Iterable[Feed]


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
    ``provider`` is the onnxruntime provider that actually ran; ``seconds`` the wall time;
    ``groups`` the sessions (one pass over the data each); ``run_samples`` the most samples one
    session.run got (below the batch size when the budget split batches); ``memory_budget`` the
    budget in bytes.
    """

    ranges: Mapping[str, TensorRange]
    num_samples: int
    method: str
    provider: str
    seconds: float
    groups: int = 1
    run_samples: int = 0
    memory_budget: int = MEMORY_BUDGET


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


def _check_names(model: ir.Model, names: Sequence[str]) -> None:
    """Raises ValueError: a name is not a value of the main graph, or its type is not floating point."""
    values = graph_values(model.graph)
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"tensors not found in the main graph: {', '.join(map(repr, missing))}")
    not_float = [f"{n!r} ({values[n].dtype})" for n in names if values[n].dtype not in (None, *_FLOAT_TYPES)]
    if not_float:
        raise ValueError(f"tensors are not floating point: {', '.join(not_float)}")


def _probe_model(model: ir.Model, names: Sequence[str], taps: Iterable[str] = ()) -> ir.Model:
    """A clone of ``model`` whose outputs are the tensors ``names`` (checked), pruned to the nodes
    and initializers they need (graph inputs stay). Each tensor of ``taps`` still computed gets a
    scalar ReduceSum output: a second consumer, so that onnxruntime fuses across it no more than
    in one session with every requested tensor an output (same values whatever the grouping)."""
    probe = model.clone()
    values = graph_values(probe.graph)
    probe.graph.outputs.clear()
    probe.graph.outputs.extend(values[n] for n in names)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(probe)
    kept = {v.name for node in probe.graph for v in node.outputs}
    for i, n in enumerate(t for t in dict.fromkeys(taps) if t in kept and t not in names):
        node = ir.node("ReduceSum", [values[n]], {"keepdims": 0}, name=f"_calib_tap_{i}")
        out = node.outputs[0]
        out.name = f"_calib_tap_{i}:{n}"
        dtype = values[n].dtype
        if dtype is not None:
            out.dtype, out.shape = dtype, ir.Shape([])
        producer = values[n].producer()
        assert producer is not None
        probe.graph.insert_after(producer, node)  # runs (and frees the tensor) right after it
        probe.graph.outputs.append(out)
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


def activation_stream(
    batches: Callable[[], Iterable[Feed]],
) -> Callable[[ir.Model, Sequence[str]], Iterator[dict[str, np.ndarray]]]:
    """A per-layer stream of activations over the calibration ``batches`` (the rounding stage's
    ``ActivationStream``): ``stream(model, names)`` yields, per batch, the values of the tensors
    ``names`` of ``model``, running only the nodes they need; one batch's values are held at a
    time."""

    def stream(model: ir.Model, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        _check_names(model, names)
        with probe_session(_probe_model(model, names)) as sess:
            wanted = {i.name for i in sess.get_inputs()}
            for feed in batches():
                outs = sess.run(list(names), {k: v for k, v in feed.items() if k in wanted})
                yield {n: np.asarray(o) for n, o in zip(names, outs, strict=True)}

    return stream


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _measure(model: ir.Model, names: Sequence[str], feed: Feed) -> dict[str, int]:
    """Bytes of each named output of one run on ``feed`` (tensors whose shapes depend on data)."""
    with probe_session(_probe_model(model, names)) as sess:
        try:
            outs = sess.run(list(names), feed)
        except Exception as e:
            raise CalibrationError(f"onnxruntime cannot run calibration batch 0: {_first_line(e)}") from e
    return {n: int(np.asarray(o).nbytes) for n, o in zip(names, outs, strict=True)}


def _check_finite(stats: Iterable[_TensorStats]) -> None:
    for s in stats:
        if s.nonfinite:
            logger.warning("tensor %r: %d NaN/Inf values left out of its range", s.name, s.nonfinite)
    bad = [s for s in stats if s.finite == 0]
    if bad:
        what = ", ".join(f"{s.name!r} ({s.nonfinite} NaN/Inf values)" for s in bad)
        raise CalibrationError(f"no finite calibration values for tensors: {what}")


def _reiterable(batches: Batches) -> Callable[[], Iterable[Feed]] | None:
    if callable(batches):
        return batches
    if isinstance(batches, Iterator):
        return None
    return lambda: batches


def collect_ranges(
    model: ir.Model,
    tensors: Sequence[str],
    batches: Batches,
    cfg: ActivationConfig,
    progress: Callable[[int, int], None] | None = None,
    total_batches: int | None = None,
    *,
    memory_budget: int | None = None,
) -> CalibrationResult:
    """Run ``model`` on ``batches`` and choose a range for each tensor in ``tensors``.

    ``model`` is not modified. Ranges per ``cfg.method``: MINMAX, the observed extremes;
    PERCENTILE, ``rmax`` = the value below which ``cfg.percentile`` % of the values lie and
    ``rmin`` = the value above which ``cfg.percentile`` % lie (the observed extreme on a side with
    no values beyond 0, e.g. ``rmin`` of a ReLU output); MSE, the shrunk range minimising
    ``sum |x - fq(x)|^cfg.mse_p`` for 8-bit fake quantization (uint8 asymmetric, or int8
    symmetric when ``cfg.symmetric``), see ``_histogram.mse_range``. NaN / Inf values are left out
    (with a warning). The ranges do not depend on how the samples are batched.

    Args:
        model: the FP model; tensors are looked up by name in its main graph.
        tensors: names of float tensors (graph inputs, node outputs or graph outputs).
        batches: feeds (input name -> array, samples on axis 0): a callable returning a fresh
            iterable of the same feeds on each call (e.g. ``CalibrationData.batches``), or an
            iterable; read once per group of tensors (see the module docstring).
        cfg: the activation options (method, percentile, num_bins, mse_p, symmetric).
        progress: called with (steps done, ``total_batches`` x passes, or 0) after each batch
            of each pass.
        total_batches: the number of batches, when known (for ``progress`` only).
        memory_budget: bytes of requested outputs plus working memory one run may hold
            (default :data:`MEMORY_BUDGET`).

    Returns:
        The ranges by tensor name (every requested name, duplicates once).

    Raises:
        CalibrationError: no batch, a batch onnxruntime cannot run, a tensor with no finite value,
            or a re-read of the data with a different number of samples.
        UnsupportedModelError: onnxruntime cannot open the model.
        ValueError: a name not in the main graph, a tensor that is not floating point, or a
            budget below 1 (bugs).
    """
    start = time.perf_counter()
    method = cfg.method_for(attention=False)  # callers resolve it per graph (method_for)
    cfg = replace(cfg, method=method)
    names = list(dict.fromkeys(tensors))
    _check_names(model, names)
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    if budget < 1:
        raise ValueError(f"memory_budget must be at least 1 byte, got {budget}")
    fresh = _reiterable(batches)
    stream = iter(fresh() if fresh is not None else batches)  # type: ignore[arg-type]
    first = next(stream, None)
    if first is None:
        raise CalibrationError("no calibration samples")
    plan = plan_runs(model, names, first, budget, lambda ns, feed: _measure(model, ns, feed))
    use_hist = cfg.method is not CalibMethod.MINMAX
    stats = {n: _TensorStats(n, cfg.num_bins if use_hist else None) for n in names}
    feeds = itertools.chain([first], stream)
    passes = max(1, len(plan.groups)) if fresh is not None else 1
    runs = Runs(plan, stats, progress, (total_batches or 0) * passes)
    taps = [n for g in plan.groups for n in g.names] if len(plan.groups) > 1 else []

    def open_group(group: Group) -> contextlib.AbstractContextManager[ort.InferenceSession]:
        return probe_session(_probe_model(model, group.names, taps), early_free=True)

    if fresh is not None or len(plan.groups) <= 1:
        provider = runs.by_group(open_group, feeds, fresh)
    else:
        provider = runs.by_batch(open_group, feeds)
    _check_finite(stats.values())
    ranges = {n: s.choose(cfg) for n, s in stats.items()}
    seconds = time.perf_counter() - start
    logger.info(
        "calibrated %d tensors on %d samples (%s, %s, %s) in %.2fs: %d group(s), runs of up to %d "
        "sample(s), budget %.0f MiB",
        len(names),
        runs.samples,
        method.value,
        provider,
        OPTIMIZATION,
        seconds,
        len(plan.groups),
        runs.run_samples,
        budget / 2**20,
    )
    return CalibrationResult(
        ranges, runs.samples, method.value, provider, seconds, len(plan.groups), runs.run_samples, budget
    )
