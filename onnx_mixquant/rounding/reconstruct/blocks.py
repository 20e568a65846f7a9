"""Partition a model into reconstruction units (BRECQ blocks, or single layers).

A *block* is a single-entry single-exit piece of the main graph holding quantized layers. Blocks
are built from the cut points of :mod:`onnx_mixquant.rounding.reconstruct._cuts` in three steps:

1. **Segments.** Every cut point ends a segment. A segment holding a quantized layer (a Conv,
   ConvTranspose, Gemm or MatMul reading a weight site) starts a unit: a residual block (its
   input stays live until the Add, so it has no inner cut), or a lone layer on the main path.
2. **Weight-less segments** are not units of their own. One made only of element-wise ops
   (Relu, Clip, BatchNormalization, Swish's Sigmoid * x, ...) joins the unit before it, so a unit's
   output is post-activation; any other (Pad, pooling, Flatten, Reshape) joins the unit after it.
   Those after the last unit belong to none (they are only run forward).
3. **Linear bottlenecks.** A lone layer with no activation after it (MBConv's projection, a
   classifier; a bias Add or BatchNormalization after it keeps it linear) is reconstructed
   together with the lone layers with an activation right before it (MBConv's expansion and
   depthwise convs), when they number at most ``max_weights`` in all.

Every other lone layer with an activation is its own unit: conv-relu-conv-relu gives 2 units,
conv-relu-conv gives 1. On the bench models this gives::

    ResNet-20:  stem Conv+Relu | 9 x (Conv Relu Conv [Slice/Pad shortcut] Add Relu) | Pool Flatten Gemm
    EfficientNet-Lite0: MBConv after MBConv (with its skip Add); the stem joins the first MBConv
        (it has no expansion conv), the head conv joins the classifier.

Fallbacks (layer units; the reason goes to the report): a block of more than ``max_weights``
layers or without a single entry and a single exit (several graph inputs read throughout, several
outputs); a block with an op ``differentiable`` rejects. A layer unit is the layer plus the
Relu/Clip right after it when that is the only reader of its output.

A unit lists its activation-path nodes (``nodes``) and, separately, the static nodes they need
(``const_nodes``: Constant nodes and the shape/padding chains); the two together, in model order,
are the unit's standalone graph. A weight read only inside a subgraph (If/Loop/Scan body), or by
a node computing from stored tensors only, gets no unit: the caller keeps nearest rounding. A
weight shared by several units belongs to the first; a unit left with no weight is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.read import WeightSite
from onnx_mixquant.rounding.reconstruct._cuts import Flow, Segment, analyse, const_closure, segments
from onnx_mixquant.toolkit import node_names

__all__ = ["Unit", "partition"]

logger = logging.getLogger(__name__)

#: Activations folded into a layer unit when they are the only reader of the layer's output.
_FUSED_ACTIVATIONS = ("Relu", "Clip")
#: Element-wise ops: a weight-less segment of these joins the unit before it.
_POINTWISE = frozenset(
    {
        "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "BatchNormalization",
        "Add", "Sub", "Mul", "Div", "Identity", "Dropout",
    }
)  # fmt: skip
#: Element-wise ops that keep a layer linear (a bias Add, a folded-out BatchNormalization).
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization", "Identity", "Dropout"})


@dataclass(frozen=True)
class Unit:
    """A single-entry single-exit piece of the main graph holding quantized weights.

    Attributes:
        name: display name (e.g. "block 3: /layer1/layer1.0/conv1/Conv .. /layer1/layer1.0/Relu_1");
            the number is the unit's index in the tuple :func:`partition` returns.
        nodes: display names (toolkit.node_names) of its nodes, in topological order.
        input: the activation tensor entering the unit (a graph input or an inner tensor).
        output: the tensor leaving it.
        weights: weight-site names read by its nodes.
        kind: "block" or "layer".
        reason: why a layer unit is not part of a block ("" for blocks).
        const_nodes: display names of the static nodes its nodes need (Constant nodes, shape and
            padding chains), in topological order; merge with ``nodes`` in model order to extract
            the unit as a graph.
        extra_inputs: other activation tensors a layer reads (e.g. Gemm's C); () for blocks.
        shape_inputs: tensors outside the unit whose shape (never their values) ``const_nodes``
            read through Shape/Size (e.g. the model input whose batch size sets a Reshape);
            an extracted unit must be fed them, or tensors of the same shape.
        differentiable: False when one of its own nodes has no gradient rule (the trainer keeps
            nearest rounding); a layer split from a block for that reason stays True.
    """

    name: str
    nodes: tuple[str, ...]
    input: str
    output: str
    weights: tuple[str, ...]
    kind: str
    reason: str
    const_nodes: tuple[str, ...] = ()
    extra_inputs: tuple[str, ...] = ()
    shape_inputs: tuple[str, ...] = ()
    differentiable: bool = True


@dataclass
class _Group:
    """Consecutive segments forming one candidate block."""

    segments: list[Segment]
    weight_nodes: list[ir.Node]
    lone: bool  # one quantized layer, alone in its segment
    linear: bool  # lone, and no activation after it (only affine element-wise ops, e.g. a bias Add)

    @property
    def nodes(self) -> list[ir.Node]:
        return [node for seg in self.segments for node in seg.nodes]


@dataclass(frozen=True)
class _Draft:
    """A unit before its weights are assigned."""

    kind: str
    nodes: tuple[ir.Node, ...]
    inputs: tuple[ir.Value, ...]
    output: ir.Value
    reason: str
    differentiable: bool = True


def partition(
    model: ir.Model,
    sites: Sequence[WeightSite],
    *,
    blocks: bool = True,
    differentiable: Callable[[str], bool] | None = None,
    max_weights: int = 8,
) -> tuple[Unit, ...]:
    """Units in topological order; every site consumed by a main-graph node is in exactly one.

    Args:
        model: the model (not modified); its main graph is partitioned.
        sites: the weight sites to reconstruct (graph.find_weight_sites); others are ignored.
        blocks: build blocks (True) or one unit per quantized layer (False: "layer" units, reason
            "layer granularity requested").
        differentiable: whether an op type has a gradient rule; None: every op has one. Asked of
            activation-path nodes only (``const_nodes`` need no gradient).
        max_weights: most quantized layers in one block; larger blocks fall back to layers.

    Returns:
        The units, in topological order (the order to reconstruct them in).

    Raises:
        ConfigError: max_weights < 1.
    """
    if max_weights < 1:
        raise ConfigError(f"max_weights={max_weights}: must be at least 1")
    graph = model.graph
    flow = analyse(graph)
    names = node_names(model)
    weight_nodes = _weight_nodes(names, sites, flow)
    grad = differentiable or (lambda op: True)
    drafts: list[_Draft] = []
    if blocks:
        groups = _merge_bottlenecks(_group(segments(flow, graph), weight_nodes), max_weights)
        for group in groups:
            drafts.extend(_block_or_layers(group, flow, grad, max_weights))
    else:
        for node in flow.active:
            if node in weight_nodes:
                drafts.append(_layer(node, flow, grad, "layer granularity requested"))
    units = _finish(names, drafts, weight_nodes, flow)
    n_blocks = sum(u.kind == "block" for u in units)
    logger.info("%d reconstruction units: %d blocks, %d layers", len(units), n_blocks, len(units) - n_blocks)
    return units


def _weight_nodes(
    names: dict[ir.Node, str], sites: Sequence[WeightSite], flow: Flow
) -> dict[ir.Node, list[str]]:
    """Activation nodes of the main graph reading a site as their weight -> those sites' names."""
    by_name = {name: node for node, name in names.items()}
    result: dict[ir.Node, list[str]] = {}
    for site in sites:
        nodes = [by_name[c] for c in site.consumers if c in by_name]
        nodes = [n for n in nodes if n in flow.act_reads]
        if not nodes:
            logger.debug("weight %r: read only in subgraphs or from constants: no unit", site.name)
        for node in nodes:
            result.setdefault(node, []).append(site.name)
    return result


def _group(segs: list[Segment], weight_nodes: dict[ir.Node, list[str]]) -> list[_Group]:
    """One group per segment holding a quantized layer, with the weight-less segments around it."""
    groups: list[_Group] = []
    pending: list[Segment] = []
    for seg in segs:
        layers = [n for n in seg.nodes if n in weight_nodes]
        if layers:
            lone = len(seg.nodes) == 1
            groups.append(_Group([*pending, seg], layers, lone, lone))
            pending = []
        elif groups and not pending and all(n.op_type in _POINTWISE for n in seg.nodes):
            groups[-1].segments.append(seg)
            groups[-1].linear &= all(n.op_type in _AFFINE for n in seg.nodes)
        else:
            pending.append(seg)
    return groups


def _merge_bottlenecks(groups: list[_Group], max_weights: int) -> list[_Group]:
    """Merge each lone linear layer with the lone non-linear layers right before it."""
    merged: list[_Group] = []
    run: list[_Group] = []
    for group in groups:
        if group.lone and not group.linear:
            run.append(group)
            continue
        if group.lone and run and len(run) + 1 <= max_weights:
            segs = [seg for g in (*run, group) for seg in g.segments]
            layers = [n for g in (*run, group) for n in g.weight_nodes]
            merged.append(_Group(segs, layers, lone=False, linear=True))
        else:
            merged.extend([*run, group])
        run = []
    return merged + run


def _block_or_layers(
    group: _Group, flow: Flow, grad: Callable[[str], bool], max_weights: int
) -> list[_Draft]:
    """The group as one block, or its layers with the reason it cannot be one."""
    first, last = group.segments[0], group.segments[-1]
    nodes = group.nodes
    if len(first.entries) != 1 or last.exit is None or len(group.weight_nodes) > max_weights:
        reason = f"no single-entry single-exit block of at most {max_weights} layers"
    else:
        bad = next((n.op_type for n in nodes if not grad(n.op_type)), None)
        if bad is None:
            return [_Draft("block", tuple(nodes), first.entries, last.exit, "")]
        reason = f"op {bad} has no gradient rule"
    return [_layer(node, flow, grad, reason) for node in group.weight_nodes]


def _layer(node: ir.Node, flow: Flow, grad: Callable[[str], bool], reason: str) -> _Draft:
    """A layer unit: ``node``, plus the Relu/Clip reading its output when it is the only reader."""
    nodes = [node]
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) == 1 and not output.is_graph_output():
        act = uses[0].node
        fused = act.op_type in _FUSED_ACTIVATIONS and act.domain in ("", "ai.onnx")
        if fused and uses[0].idx == 0 and flow.act_reads.get(act) == [output]:
            nodes.append(act)
            output = act.outputs[0]
    bad = next((n.op_type for n in nodes if not grad(n.op_type)), None)
    if bad is not None:
        reason = f"op {bad} in this layer has no gradient rule"
    return _Draft("layer", tuple(nodes), tuple(flow.act_reads[node]), output, reason, bad is None)


def _finish(
    names: dict[ir.Node, str], drafts: list[_Draft], weight_nodes: dict[ir.Node, list[str]], flow: Flow
) -> tuple[Unit, ...]:
    """Assign each site to the first draft reading it; name the drafts left with weights."""
    taken: set[str] = set()
    units: list[Unit] = []
    for draft in drafts:
        weights = [w for node in draft.nodes for w in weight_nodes.get(node, ()) if w not in taken]
        weights = list(dict.fromkeys(weights))
        if not weights:
            continue
        taken.update(weights)
        const, outside = const_closure(flow, draft.nodes, draft.inputs)
        shown = names[draft.nodes[0]] + (f" .. {names[draft.nodes[-1]]}" if len(draft.nodes) > 1 else "")
        units.append(
            Unit(
                name=f"{draft.kind} {len(units)}: {shown}",
                nodes=tuple(names[n] for n in draft.nodes),
                input=draft.inputs[0].name or "",
                output=draft.output.name or "",
                weights=tuple(weights),
                kind=draft.kind,
                reason=draft.reason,
                const_nodes=tuple(names[n] for n in const),
                extra_inputs=tuple(v.name or "" for v in draft.inputs[1:]),
                shape_inputs=tuple(v.name or "" for v in outside),
                differentiable=draft.differentiable,
            )
        )
    return tuple(units)
