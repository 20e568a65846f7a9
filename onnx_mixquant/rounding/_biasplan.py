"""Which biases the bias correction changes: each quantized Conv/ConvTranspose/Gemm's own (a zero one
added where it has none), or the constant of the Add after a MatMul; and which of those layers end
the model (``BiasCorrection.OUTPUT``). See ``biascorrect.py`` for the correction itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir  # noqa: TID251

from onnx_mixquant.config import BiasCorrection
from onnx_mixquant.read import WeightSite
from onnx_mixquant.toolkit import node_names

__all__ = ["BiasPlan", "BiasTarget", "plan_correction", "reader", "reader_output"]

_WITH_BIAS_INPUT = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class BiasTarget:
    """One bias to correct: ``bias`` (an initializer) is read by ``reader`` (the layer itself, or
    the Add after a MatMul), whose output's ``channel_axis`` has ``channels`` entries; a correction
    ``d`` of the output mean changes the bias by ``d * gain`` (``1 / beta`` for Gemm)."""

    node: str
    bias: str
    channels: int
    channel_axis: int
    rank: int
    gain: float
    created: bool
    output_layer: bool

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The output axes a per-channel mean averages over (all but the channel axis)."""
        return tuple(a for a in range(self.rank) if a != self.channel_axis)


@dataclass(frozen=True)
class BiasPlan:
    """The biases to correct, and the layers left alone with the reason."""

    targets: tuple[BiasTarget, ...]
    skipped: tuple[tuple[str, str], ...]

    def active(self, mode: BiasCorrection) -> tuple[BiasTarget, ...]:
        """The targets ``mode`` corrects."""
        if mode is BiasCorrection.OUTPUT:
            return tuple(t for t in self.targets if t.output_layer)
        return self.targets if mode is BiasCorrection.ALL else ()


def _float32_constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of a float32 initializer read by one node only (not a graph input), else None."""
    if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    if len(value.uses()) != 1 or value.dtype != ir.DataType.FLOAT:
        return None
    return value.const_value.numpy()


def _zero_bias(graph: ir.Graph, node: ir.Node, name: str, channels: int) -> ir.Value:
    """Register a zero float32 bias ``name`` and make it input 2 of ``node``."""
    t = ir.tensor(np.zeros(channels, np.float32), name=name)
    v = ir.Value(name=name, const_value=t, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([channels]))
    graph.register_initializer(v)
    node.resize_inputs(3)
    node.replace_input_with(2, v)
    return v


def _unique(graph: ir.Graph, base: str) -> str:
    names = (
        set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    )
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def _target(graph: ir.Graph, node: ir.Node, name: str, weight: ir.Value) -> BiasTarget | str:
    """The bias target of layer ``node`` (weight ``weight``), or why it has none."""
    if len(node.inputs) < 2 or node.inputs[1] is not weight:
        return "the quantized weight is not its second input"
    w_shape = tuple(weight.shape.numpy()) if weight.shape is not None else ()
    if node.op_type == "MatMul":
        return _matmul_target(node, name, w_shape)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0) or len(w_shape) != 2:
            return "Gemm with transA or a weight that is not 2-D"
        beta = node.attributes.get_float("beta", 1.0)
        if beta == 0:
            return "Gemm with beta = 0 ignores its bias"
        channels = int(w_shape[0] if node.attributes.get_int("transB", 0) else w_shape[1])
        rank, gain = 2, 1.0 / beta
    else:
        channels = int(
            w_shape[0] if node.op_type == "Conv" else w_shape[1] * node.attributes.get_int("group", 1)
        )
        rank, gain = len(w_shape), 1.0
    created = len(node.inputs) < 3 or node.inputs[2] is None
    bias = (
        _zero_bias(graph, node, _unique(graph, f"{weight.name}_bias"), channels)
        if created
        else node.inputs[2]
    )
    arr = _float32_constant(bias)
    if arr is None or arr.shape != (channels,):
        return "its bias is not a float32 initializer of shape (channels,) read by this node only"
    assert bias is not None and bias.name is not None
    return BiasTarget(name, bias.name, channels, 1, rank, gain, created, output_layer=False)


def _matmul_target(node: ir.Node, name: str, w_shape: tuple[int, ...]) -> BiasTarget | str:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or len(w_shape) < 1:
        return "MatMul not followed by a bias Add"
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    arr = _float32_constant(bias)
    channels = int(w_shape[-1])
    if arr is None or arr.shape != (channels,) or bias is None or bias.name is None:
        return "its Add's other input is not a float32 initializer of shape (columns,) read by it only"
    shape = add.outputs[0].shape
    if shape is None:
        return "output rank unknown (shape inference found none)"
    rank = len(shape)
    return BiasTarget(name, bias.name, channels, rank - 1, rank, 1.0, False, output_layer=False)


def plan_correction(model: ir.Model, sites: Sequence[WeightSite]) -> BiasPlan:
    """Find the bias of every quantized Conv/ConvTranspose/Gemm (and MatMul + Add) of the main
    graph. Mutates ``model``: a Conv/ConvTranspose/Gemm without a bias gets a zero one (exact)."""
    graph = model.graph
    by_name = {name: node for node, name in node_names(model).items()}
    values = {v.name: v for n in graph for v in n.inputs if v is not None}
    targets: list[BiasTarget] = []
    skipped: list[tuple[str, str]] = []
    for site in sites:
        for name, op in zip(site.consumers, site.op_types, strict=True):
            node = by_name.get(name)
            if op not in (*_WITH_BIAS_INPUT, "MatMul") or node is None:
                continue
            if site.graph or node.graph is not graph:
                skipped.append((name, "in a subgraph"))
                continue
            got = _target(graph, node, name, values[site.name])
            if isinstance(got, str):
                skipped.append((name, got))
            else:
                targets.append(got)
    return BiasPlan(_mark_output_layers(graph, targets), tuple(skipped))


def reader(graph: ir.Graph, bias: str) -> ir.Node:
    """The node reading initializer ``bias`` (its only reader, checked by the plan)."""
    return next(iter(graph.initializers[bias].uses())).node


def reader_output(graph: ir.Graph, bias: str) -> ir.Value:
    """The output whose mean a bias sets: that of the node reading the bias."""
    return reader(graph, bias).outputs[0]


def _mark_output_layers(graph: ir.Graph, targets: list[BiasTarget]) -> tuple[BiasTarget, ...]:
    """Set ``output_layer`` on targets from whose output no other target's layer is reachable."""
    readers = {id(reader(graph, t.bias)): t.bias for t in targets}
    out = []
    for t in targets:
        seen: set[int] = set()
        stack = [reader_output(graph, t.bias)]
        downstream = False
        while stack and not downstream:
            for use in stack.pop().uses():
                if id(use.node) in seen:
                    continue
                seen.add(id(use.node))
                downstream = readers.get(id(use.node), t.bias) != t.bias
                if downstream:
                    break
                stack.extend(use.node.outputs)
        out.append(BiasTarget(**{**t.__dict__, "output_layer": not downstream}))
    return tuple(out)
