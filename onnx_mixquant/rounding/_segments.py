"""Run a model in segments, pausing after chosen nodes to read and change their output.

The main graph's nodes (ONNX keeps them topologically sorted) are cut after each chosen node;
segment k is extracted (``ir.convenience.extract``: a copy, the model is unchanged) with the
tensors it reads from earlier segments or the graph inputs as its inputs, and as its outputs the
tensors later segments read plus the chosen node's output. Every tensor alive at a cut is kept in
memory for all samples, so one pass over the data costs about one forward pass however many cuts
there are; the tail after the last cut is never run.

Used by the bias correction, which must measure each layer with every earlier layer already
corrected: measuring with a prefix of the model per layer costs half a forward pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir  # noqa: TID251

from onnx_mixquant.calibrate import probe_session
from onnx_mixquant.errors import CalibrationError

__all__ = ["Segment", "plan_segments", "run_segments"]

Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Segment:
    """Nodes up to and including the cut node: what they read from before, what they hand on."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cut_output: str
    #: Tensors no segment from here on reads (dropped from memory after this one).
    dead: tuple[str, ...]


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def plan_segments(graph: ir.Graph, cuts: Sequence[ir.Node]) -> list[Segment] | str:
    """One segment per node of ``cuts`` (in graph order), or why the graph cannot be cut.

    Nodes with subgraphs are refused: a subgraph may read tensors of the outer graph that its node
    does not list as inputs, so the tensors alive at a cut are not known.
    """
    nodes = list(graph)
    if any(_has_subgraph(n) for n in nodes):
        return "the graph has nodes with subgraphs (If/Loop/Scan)"
    position = {id(n): i for i, n in enumerate(nodes)}
    ends = [position[id(c)] for c in cuts]
    if ends != sorted(set(ends)):
        raise ValueError("cut nodes must be distinct and in graph order")
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v is not None and v.name:
                last_use[v.name] = i
    available = {v.name for v in graph.inputs if v.name and not v.is_initializer()}
    segments, start = [], 0
    for cut, end in zip(cuts, ends, strict=True):
        reads: dict[str, None] = {}
        made: dict[str, None] = {}
        for n in nodes[start : end + 1]:
            reads.update((v.name, None) for v in n.inputs if v is not None and v.name in available)
            made.update((v.name, None) for v in n.outputs if v.name)
        cut_output = cut.outputs[0].name or ""
        handed = tuple(m for m in made if last_use.get(m, -1) > end or m == cut_output)
        available |= set(handed)
        dead = tuple(sorted(v for v in available if last_use.get(v, -1) <= end))
        available -= set(dead)
        segments.append(Segment(tuple(reads), handed, cut_output, dead))
        start = end + 1
    return segments


def run_segments(
    model: ir.Model,
    segments: Sequence[Segment],
    feeds: Feeds,
    on_cut: Callable[[int, list[np.ndarray]], list[np.ndarray]],
    tick: Callable[[], None],
) -> None:
    """Run ``segments`` over ``feeds`` (all batches, kept in memory); after segment k,
    ``on_cut(k, cut output per batch)`` returns the arrays later segments read instead."""
    store: dict[str, list[np.ndarray]] = {name: [f[name] for f in feeds] for name in feeds[0]}
    for k, seg in enumerate(segments):
        graph = ir.convenience.extract(model.graph, list(seg.inputs), list(seg.outputs))
        for v in graph.inputs:  # onnxruntime needs input types; a value may lack one (no inference)
            if v.type is None and v.name:
                v.type = ir.TensorType(ir.DataType.from_numpy(store[v.name][0].dtype))
        sub = ir.Model(graph, ir_version=model.ir_version)
        outs: list[list[np.ndarray]] = [[] for _ in seg.outputs]
        with probe_session(sub) as sess:
            for b in range(len(feeds)):
                try:
                    got = sess.run(list(seg.outputs), {name: store[name][b] for name in seg.inputs})
                except Exception as e:
                    raise CalibrationError(
                        f"bias correction: onnxruntime cannot run segment {k} on batch {b}: {e}"
                    ) from e
                for o, g in zip(outs, got, strict=True):
                    o.append(np.asarray(g))
        store.update(zip(seg.outputs, outs, strict=True))
        store[seg.cut_output] = on_cut(k, store[seg.cut_output])
        for name in seg.dead:
            store.pop(name, None)
        tick()
