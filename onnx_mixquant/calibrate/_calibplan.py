"""Plan and drive ranges.py's onnxruntime runs under a memory budget: sizes, groups, runs.

A session returns every requested output of a run at once, so a run holds ``samples x bytes``
of them. Sizes are counted per *unit*: one sample, or the model's fixed batch B (axis 0 of its
inputs is a number), or a whole feed that cannot be split on axis 0. A tensor's bytes per unit
come from its shape: the shapes onnx inference gave the model; else onnx inference again on a
copy whose inputs are fixed to one unit of the first feed (symbolic dims resolved); else a run
of that unit (shapes that depend on the data), measured group by group. The model's own working
memory per unit is estimated as twice its largest tensor.

The tensors, in graph order, are packed into groups whose bytes per unit fit ``budget - work``
(a tensor larger than that alone); ranges.py gives each group its own session, pruned to
the nodes it needs, and splits each feed into runs of ``floor(budget / (group + work))`` units
(at least one). A feed whose inputs have more elements per sample than the first feed's
(longer sequences, larger images) scales the bytes by the square of the ratio (attention
scores grow quadratically). E.g. budget 512 MiB, tensors of 300, 200, 100 and 50 MiB per
sample, work 40 MiB: groups (300) (200 100 50) within 472 MiB, 1 sample per run each.

:class:`Runs` drives the sessions: one pass over the data per group when the data can be read
again, else every group's session opened in turn for each batch; the first pass also counts the
samples and folds the requested graph inputs, read from the feeds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir  # noqa: TID251
import onnx_ir.passes.common  # noqa: TID251

from onnx_mixquant.errors import CalibrationError
from onnx_mixquant.session import first_line

__all__ = ["Group", "RunPlan", "Runs", "batch_samples", "graph_values", "plan_runs", "split_feed"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: Measures the bytes of the named outputs of one run on a feed (ranges.py opens the session).
Measure = Callable[[Sequence[str], Feed], Mapping[str, int]]


class Session(Protocol):
    """What Runs uses of an onnxruntime InferenceSession."""

    def run(self, output_names: list[str], input_feed: Feed) -> list[Any]: ...

    def get_providers(self) -> list[str]: ...


class Stats(Protocol):
    """Running statistics of one tensor (ranges.py's _TensorStats)."""

    def add(self, x: np.ndarray) -> None: ...


#: Opens the session of a group (ranges.py: a pruned probe model).
Opener = Callable[["Group"], contextlib.AbstractContextManager[Session]]


@dataclass(frozen=True)
class Group:
    """Tensors computed by one session; ``unit_bytes``: their outputs for one unit."""

    names: tuple[str, ...]
    unit_bytes: int


@dataclass(frozen=True)
class RunPlan:
    """How ranges.py runs: ``fed`` tensors (graph inputs) are read from the feeds, each group
    of ``groups`` gets a session, each feed is split into runs sized by :meth:`run_samples`."""

    fed: tuple[str, ...]
    groups: tuple[Group, ...]
    unit: int
    work: int
    budget: int
    ref_elems: float

    def run_samples(self, group: Group, feed: Feed) -> int:
        """Samples per session.run of ``group`` on ``feed`` (all of them when it cannot be split)."""
        n = batch_samples(feed)
        if n <= self.unit or not _splittable(feed, n):
            return n
        ratio = _sample_elems(feed) / self.ref_elems
        scale = ratio * ratio if ratio > 1 else ratio
        units = int(self.budget // max(1.0, (group.unit_bytes + self.work) * scale))
        return min(n, max(1, units) * self.unit)


def batch_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Axis 0 of the first input (1 for a scalar or an input-less model)."""
    shape: tuple[int, ...] = np.shape(next(iter(feed.values()))) if feed else ()
    return int(shape[0]) if shape else 1


def split_feed(feed: Feed, size: int) -> Iterator[Feed]:
    """``feed`` in runs of ``size`` samples along axis 0 (views), or whole when that is all."""
    n = batch_samples(feed)
    if size >= n:
        yield feed
        return
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in feed.items()}


def _splittable(feed: Feed, n: int) -> bool:
    return all(np.ndim(v) >= 1 and np.shape(v)[0] == n for v in feed.values())


def _sample_elems(feed: Feed) -> float:
    return max(1.0, sum(float(np.size(v)) for v in feed.values()) / batch_samples(feed))


def graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Named values of ``graph``: inputs, initializers, node outputs (in graph order)."""
    values: dict[str, ir.Value] = {}
    for v in [*graph.inputs, *graph.initializers.values()]:
        if v.name:
            values[v.name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def _static_bytes(value: ir.Value) -> int | None:
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None:
        return None
    dims = [d for d in shape.dims if isinstance(d, int)]
    if len(dims) != shape.rank():
        return None
    return math.ceil(math.prod(dims) * dtype.itemsize)


def _unit(model: ir.Model, feed: Feed) -> int:
    n = batch_samples(feed)
    if not _splittable(feed, n):
        return n
    for v in model.graph.inputs:
        if v.name in feed and v.shape is not None and v.shape.rank() > 0:
            d = v.shape[0]
            if isinstance(d, int) and d > 0:
                return min(d, n)
    return 1


def _reinfer(model: ir.Model, one: Feed) -> dict[str, int | None]:
    """Bytes of every named value once onnx inference ran on a copy with inputs shaped as ``one``."""
    copy = model.clone()
    for v in copy.graph.inputs:
        if v.name in one:
            v.shape = ir.Shape(np.shape(one[v.name]))
    for node in copy.graph:
        for v in node.outputs:
            v.shape = None
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False)(copy)
    return {n: _static_bytes(v) for n, v in graph_values(copy.graph).items()}


def _measure_unknown(
    names: list[str], guess: int, capacity: int, one: Feed, measure: Measure
) -> dict[str, int]:
    """Run ``one`` with the ``names`` as outputs, ``capacity // guess`` at a time."""
    step = max(1, capacity // max(1, guess))
    sizes: dict[str, int] = {}
    for i in range(0, len(names), step):
        sizes.update(measure(names[i : i + step], one))
    logger.debug("measured %d tensor sizes on one unit in %d runs", len(names), -(-len(names) // step))
    return sizes


def _sizes(
    model: ir.Model, names: list[str], one: Feed, budget: int, measure: Measure
) -> tuple[dict[str, int], int]:
    """Bytes per unit of each name, and the working-memory estimate (twice the largest tensor)."""
    values = graph_values(model.graph)
    known = {n: _static_bytes(v) for n, v in values.items()}
    if any(known[n] is None for n in names):
        known = _reinfer(model, one)
    sizes = {n: b for n, b in known.items() if b is not None}
    unknown = [n for n in names if n not in sizes]
    if unknown:
        guess = max([sizes.get(n, 0) for n in names] + [int(np.asarray(a).nbytes) for a in one.values()])
        sizes.update(_measure_unknown(unknown, guess, budget, one, measure))
    work = 2 * max([b for n, b in sizes.items() if values[n].producer() is not None], default=0)
    return {n: sizes[n] for n in names}, work


def _pack(names: Sequence[str], sizes: Mapping[str, int], capacity: int) -> tuple[Group, ...]:
    groups: list[Group] = []
    cur: list[str] = []
    total = 0
    for n in names:
        if cur and total + sizes[n] > capacity:
            groups.append(Group(tuple(cur), total))
            cur, total = [], 0
        cur.append(n)
        total += sizes[n]
    if cur:
        groups.append(Group(tuple(cur), total))
    return tuple(groups)


def plan_runs(model: ir.Model, names: Sequence[str], first: Feed, budget: int, measure: Measure) -> RunPlan:
    """Plan the runs of ``names`` (checked: float values of the main graph) under ``budget`` bytes.

    Args:
        model: the FP model (not modified).
        names: the requested tensors, distinct.
        first: the first feed (sizes are estimated on one unit of it).
        budget: bytes of requested outputs plus working memory that one run may hold.
        measure: runs one feed with the given outputs and returns their bytes (shapes that
            depend on the data).
    """
    inputs = {v.name for v in model.graph.inputs if not v.is_initializer()}
    fed = tuple(n for n in names if n in inputs and n in first)
    position = {v.name: i for i, node in enumerate(model.graph) for v in node.outputs}
    rest = sorted((n for n in names if n not in fed), key=lambda n: position.get(n, -1))
    unit = _unit(model, first)
    one = {k: v[:unit] for k, v in first.items()} if unit < batch_samples(first) else first
    sizes, work = _sizes(model, rest, one, budget, measure) if rest else ({}, 0)
    groups = _pack(rest, sizes, max(1, budget - work))
    for g in groups:
        if g.unit_bytes + work > budget:
            logger.warning(
                "tensors %s need %.0f MiB per run of %d sample(s) with the model's working memory, "
                "above the calibration memory budget of %.0f MiB: running them %d sample(s) at a time",
                ", ".join(map(repr, g.names)),
                (g.unit_bytes + work) / 2**20,
                unit,
                budget / 2**20,
                unit,
            )
    return RunPlan(fed, groups, unit, work, budget, _sample_elems(first))


class Runs:
    """Runs the groups of a plan on the feeds and folds feeds and outputs into the statistics;
    counts samples, the largest run and progress steps."""

    def __init__(
        self,
        plan: RunPlan,
        stats: Mapping[str, Stats],
        progress: Callable[[int, int], None] | None,
        total: int,
    ) -> None:
        self.plan, self.stats, self.progress, self.total = plan, stats, progress, total
        self.samples = self.run_samples = self.done = 0

    def feed(self, feed: Feed) -> None:
        """First pass over the data: count the samples, fold the requested graph inputs."""
        self.samples += batch_samples(feed)
        for n in self.plan.fed:
            self.stats[n].add(np.asarray(feed[n]))

    def group(self, sess: Session, group: Group, feed: Feed, index: int) -> None:
        """Run ``group`` on ``feed`` in runs of ``plan.run_samples`` samples; fold the outputs."""
        size = self.plan.run_samples(group, feed)
        self.run_samples = max(self.run_samples, size)
        for part in split_feed(feed, size):
            try:
                outs = sess.run(list(group.names), part)
            except Exception as e:
                raise CalibrationError(
                    f"onnxruntime cannot run calibration batch {index}: {first_line(e)}"
                ) from e
            for n, out in zip(group.names, outs, strict=True):
                self.stats[n].add(np.asarray(out))
            del outs

    def tick(self) -> None:
        self.done += 1
        logger.debug("calibration step %d done", self.done)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def by_group(
        self, open_group: Opener, stream: Iterable[Feed], fresh: Callable[[], Iterable[Feed]] | None
    ) -> str:
        """One session per group, one pass over the data each (``fresh`` gives passes 2, 3, ...)."""
        provider = "none (graph inputs only)"
        groups: Sequence[Group | None] = self.plan.groups or (None,)
        for k, group in enumerate(groups):
            feeds = stream if k == 0 or fresh is None else fresh()
            seen = 0
            with contextlib.ExitStack() as stack:
                sess = None
                if group is not None:
                    sess = stack.enter_context(open_group(group))
                    provider = sess.get_providers()[0]
                for i, feed in enumerate(feeds):
                    if k == 0:
                        self.feed(feed)
                    if sess is not None and group is not None:
                        self.group(sess, group, feed, i)
                    seen += batch_samples(feed)
                    self.tick()
            if seen != self.samples:
                raise CalibrationError(
                    f"calibration data changed between passes: {self.samples} samples, then {seen}"
                )
        return provider

    def by_batch(self, open_group: Opener, stream: Iterable[Feed]) -> str:
        """A one-shot stream and several groups: every group's session is opened for each batch."""
        logger.info(
            "calibration data is a one-shot iterator: %d sessions opened per batch (pass a callable "
            "returning fresh batches for one session per group)",
            len(self.plan.groups),
        )
        provider = ""
        for i, feed in enumerate(stream):
            self.feed(feed)
            for group in self.plan.groups:
                with open_group(group) as sess:
                    provider = sess.get_providers()[0]
                    self.group(sess, group, feed, i)
            self.tick()
        return provider
