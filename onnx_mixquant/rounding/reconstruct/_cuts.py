"""Cut points of a model's main graph: the activation tensors every path passes through.

The main graph is read as a data flow of *activations*. A node is *static* when it computes from
stored tensors and shapes only: Constant nodes, the Constant -> ConstantOfShape -> Concat ->
Reshape -> Slice -> Cast chains exporters emit for Pad amounts, and every ``Shape``/``Size`` node
with what is computed from it (it reads a tensor's shape, never its values, so it opens no path
for activations). Every other node is an *activation node*.

A *cut point* is an activation tensor ``T`` such that, in topological order, nothing computed up
to ``T``'s producer other than ``T`` itself is read after it (graph outputs count as read at the
end). Every path from the inputs to the outputs then passes through ``T``. The test is exact in
any topological order: a live node that is neither an ancestor nor a descendant of ``T`` would be
on a path that bypasses ``T``. Cuts split the activation nodes into :class:`Segment` s::

    x -> Conv -> Relu -> Conv -> Add(., x) -> Relu -> ...
    cuts:    c0      r0                 a1      r1
    segments: [Conv] [Relu] [Conv Relu Conv Add] [Relu] ...

(inside the residual block ``x`` stays live until the Add, so there is no cut there).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["Flow", "Segment", "analyse", "const_closure", "segments"]

#: Ops that read only the shape of their input.
_SHAPE_OPS = ("Shape", "Size")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


@dataclass
class Flow:
    """The main graph as a data flow of activations.

    Attributes:
        order: main-graph nodes in topological order (the stored order when it is one).
        static: the static nodes (see the module docstring).
        reads: every value each node reads: its inputs, then the outer values its subgraphs read.
        active: the activation nodes, in topological order.
        act_reads: for each activation node, the activation values it reads, same order as reads.
    """

    order: list[ir.Node]
    static: set[ir.Node]
    reads: dict[ir.Node, list[ir.Value]]
    active: list[ir.Node]
    act_reads: dict[ir.Node, list[ir.Value]]


@dataclass(frozen=True)
class Segment:
    """Activation nodes between two consecutive cut points.

    Attributes:
        nodes: its activation nodes, in topological order.
        entries: activation values it reads that it does not compute (one: the previous cut; the
            first segment reads the graph inputs).
        exit: the cut point ending it; None for a tail after the last cut (several exits).
    """

    nodes: tuple[ir.Node, ...]
    entries: tuple[ir.Value, ...]
    exit: ir.Value | None


def analyse(graph: ir.Graph) -> Flow:
    """Order ``graph``'s nodes topologically and split them into static and activation nodes.

    The graph is not modified. Initializers (overridable ones too) count as stored tensors.
    """
    reads = _all_reads(graph)
    order = _topological(list(graph), reads)
    static_values: set[ir.Value] = set(graph.initializers.values())
    static: set[ir.Node] = set()
    for node in order:
        shape_only = node.op_type in _SHAPE_OPS and node.domain in _DEFAULT_DOMAINS
        if shape_only or all(v in static_values for v in reads[node]):
            static.add(node)
            static_values.update(node.outputs)
    active = [n for n in order if n not in static]
    act_reads = {n: [v for v in reads[n] if v not in static_values] for n in active}
    return Flow(order, static, reads, active, act_reads)


def _all_reads(graph: ir.Graph) -> dict[ir.Node, list[ir.Value]]:
    """Values each main-graph node reads, outer-scope values read inside its subgraphs included."""
    main: set[ir.Value] = {*graph.inputs, *graph.initializers.values()}
    main.update(v for node in graph for v in node.outputs)
    reads: dict[ir.Node, list[ir.Value]] = {}
    for node in graph:
        values = [v for v in node.inputs if v is not None]
        for sub in _subgraphs(node):
            values.extend(v for inner in sub.all_nodes() for v in inner.inputs if v in main)
        reads[node] = list(dict.fromkeys(values))
    return reads


def _subgraphs(node: ir.Node) -> Iterable[ir.Graph]:
    for attr in node.attributes.values():
        if isinstance(attr, ir.Attr) and attr.type in _GRAPH_ATTRS:
            yield from ([attr.as_graph()] if attr.type == _GRAPH_ATTRS[0] else attr.as_graphs())


def _topological(nodes: list[ir.Node], reads: dict[ir.Node, list[ir.Value]]) -> list[ir.Node]:
    """Kahn's algorithm, taking the earliest stored node first: the stored order when valid."""
    index = {node: i for i, node in enumerate(nodes)}
    waiting = {node: 0 for node in nodes}
    readers: dict[ir.Node, list[ir.Node]] = {node: [] for node in nodes}
    for node in nodes:
        producers = {v.producer() for v in reads[node]}
        for producer in producers:
            if producer in index and producer is not node:
                waiting[node] += 1
                readers[producer].append(node)
    ready = [index[node] for node in nodes if waiting[node] == 0]
    heapq.heapify(ready)
    order: list[ir.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for reader in readers[node]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, index[reader])
    assert len(order) == len(nodes), "the main graph has a cycle"
    return order


def _last_reads(flow: Flow, graph: ir.Graph) -> dict[ir.Value, int]:
    """Position (in flow.active) of the last activation node reading each value; outputs: len."""
    last: dict[ir.Value, int] = {}
    for position, node in enumerate(flow.active):
        for value in flow.act_reads[node]:
            last[value] = position
    for value in graph.outputs:
        last[value] = len(flow.active)
    return last


def _cut_positions(flow: Flow, graph: ir.Graph) -> list[tuple[int, ir.Value]]:
    """(position of the producer, tensor) of every cut point, in topological order."""
    last = _last_reads(flow, graph)
    ends: dict[int, list[ir.Value]] = {}
    live: set[ir.Value] = set()
    for value in graph.inputs:
        if value in last and value.producer() is None and not value.is_initializer():
            live.add(value)
            ends.setdefault(last[value], []).append(value)
    cuts: list[tuple[int, ir.Value]] = []
    for position, node in enumerate(flow.active):
        live.difference_update(ends.pop(position, ()))
        for value in node.outputs:
            if last.get(value, -1) > position:
                live.add(value)
                ends.setdefault(last[value], []).append(value)
        if len(live) == 1 and next(iter(live)).producer() is node:
            cuts.append((position, next(iter(live))))
    return cuts


def segments(flow: Flow, graph: ir.Graph) -> list[Segment]:
    """The activation nodes of ``graph`` split at every cut point, in topological order."""
    result: list[Segment] = []
    start = 0
    bounds: list[tuple[int, ir.Value | None]] = list(_cut_positions(flow, graph))
    if not bounds or bounds[-1][0] < len(flow.active) - 1:
        bounds.append((len(flow.active) - 1, None))
    for end, exit_value in bounds:
        nodes = tuple(flow.active[start : end + 1])
        start = end + 1
        if not nodes:
            continue
        produced = {v for node in nodes for v in node.outputs}
        entries = [v for node in nodes for v in flow.act_reads[node] if v not in produced]
        result.append(Segment(nodes, tuple(dict.fromkeys(entries)), exit_value))
    return result


def const_closure(
    flow: Flow, nodes: Iterable[ir.Node], inputs: Iterable[ir.Value]
) -> tuple[list[ir.Node], list[ir.Value]]:
    """Static nodes feeding ``nodes`` (topological order), and what their Shape/Size nodes read.

    Args:
        flow: the analysed graph.
        nodes: the activation nodes of a unit.
        inputs: the activation values the unit is given (its input and extra inputs).

    Returns:
        The static nodes ``nodes`` need, directly or through other static nodes, and the
        activation values outside the unit (neither computed by ``nodes`` nor in ``inputs``) that
        those static nodes read; only their shapes matter.
    """
    members = set(nodes)
    available = {v for node in members for v in node.outputs} | set(inputs)
    needed: set[ir.Node] = set()
    outside: list[ir.Value] = []
    stack = [v for node in members for v in flow.reads[node]]
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer in flow.static and producer not in needed:
            needed.add(producer)
            for read in flow.reads[producer]:
                if read.producer() in flow.static:
                    stack.append(read)
                elif read not in available and not read.is_initializer():
                    outside.append(read)
    order = {node: i for i, node in enumerate(flow.order)}

    def place(value: ir.Value) -> tuple[int, str]:
        producer = value.producer()
        return (-1 if producer is None else order[producer], value.name or "")

    return sorted(needed, key=order.__getitem__), sorted(set(outside), key=place)
