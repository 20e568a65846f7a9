"""The graph under construction of a unit program, the copier of a unit's nodes into it, and the
activation fake-quant they insert (the straight-through estimator of :mod:`.adaround`'s docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnx.reference import ReferenceEvaluator

from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.numerics import QParams
from onnx_mixquant.rounding.reconstruct.blocks import Unit
from onnx_mixquant.toolkit import default_opset, node_names

__all__ = ["Copier", "Graph"]

_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)

#: stop(c) = Round(c * 2^k) * 2^-k is exactly c: float32 via float64 (k = 149), float64 (k = 960).
_STOP_EXPONENT = {np.dtype(np.float32): 149, np.dtype(np.float64): 960}


class Graph:
    """Inputs, nodes and initializers of one ONNX graph under construction, uniquely named."""

    def __init__(self, model: ir.Model, dtype: np.dtype) -> None:
        self.model, self.dtype, self.opset = model, dtype, default_opset(model)
        self.inputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._taken = {v.name for n in model.graph.all_nodes() for v in (*n.inputs, *n.outputs) if v}
        self._taken |= {v.name for v in model.graph.inputs} | set(model.graph.initializers)

    def name(self, stem: str) -> str:
        name, i = stem, 0
        while name in self._taken:
            i += 1
            name = f"{stem}_{i}"
        self._taken.add(name)
        return name

    def input(self, stem: str, shape: Sequence[int], exact: bool = False) -> ir.Value:
        value = ir.val(stem if exact else self.name(stem), ir.DataType.from_numpy(self.dtype), list(shape))
        self.inputs.append(value)
        return value

    def const(self, array: np.ndarray | float, stem: str = "c", dtype: type | None = None) -> ir.Value:
        """An initializer; a Python float gets the graph's float type unless ``dtype`` says otherwise."""
        array = np.asarray(array, dtype=dtype or (self.dtype if isinstance(array, float) else None))
        name = self.name(stem)
        value = ir.val(name, ir.DataType.from_numpy(array.dtype), array.shape, const_value=ir.tensor(array))
        self.initializers.append(value)
        return value

    def op(self, op_type: str, *inputs: ir.Value, stem: str = "", **attrs: int | list[int]) -> ir.Value:
        node = ir.node(op_type, list(inputs), attrs or None)
        node.outputs[0].name = self.name(stem or f"mq_{op_type.lower()}")
        self.nodes.append(node)
        return node.outputs[0]

    def reduce(self, op_type: str, x: ir.Value, axes: list[int] | None, stem: str = "") -> ir.Value:
        """ReduceSum / ReduceMean to a lower rank (all axes when None), in the model's opset spelling."""
        if axes is None:
            return self.op(op_type, x, keepdims=0, stem=stem)
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, x, self.const(np.asarray(axes, np.int64), "axes"), keepdims=0, stem=stem)
        return self.op(op_type, x, axes=axes, keepdims=0, stem=stem)

    def build(self, outputs: Sequence[ir.Value]) -> ir.Model:
        """The model, shape-inferred (strictly: reverse mode needs every shape)."""
        opsets = dict(self.model.opset_imports)
        graph = ir.Graph(
            self.inputs, outputs, nodes=self.nodes, initializers=self.initializers, opset_imports=opsets
        )
        model = ir.Model(graph, ir_version=self.model.ir_version)
        onnx_ir.passes.common.ShapeInferencePass(strict_mode=True, data_prop=True)(model)
        return model


class Copier:
    """Copies a unit's nodes into a :class:`Graph`. The constant expressions they read (Constant
    nodes, padding and shape chains, Shape of tensors outside the unit, e.g. ``Unit.shape_inputs``)
    are folded to initializers (onnx.reference), so shape inference and onnx-ad see static shapes."""

    def __init__(self, g: Graph, unit: Unit, weights: Mapping[str, ir.Value], batch: int) -> None:
        self.g, self.unit, self.batch = g, unit, batch
        self.values: dict[str, ir.Value] = dict(weights)
        self.folded: dict[str, np.ndarray] = {}
        by_name = {name: node for node, name in node_names(g.model).items()}
        if missing := [name for name in unit.nodes if name not in by_name]:
            raise UnsupportedModelError(f"unit {unit.name!r}: no node named {missing[0]!r} in the model")
        self.nodes = [by_name[name] for name in unit.nodes]

    def run(self, x: ir.Value, act: Mapping[str, tuple[ir.Value, QParams]], ste: bool) -> ir.Value:
        """Emit the unit on ``x``; tensors named in ``act`` are fake-quantized; returns its output."""
        self.values[self.unit.input] = x
        made: list[str] = []
        for node in [None, *self.nodes]:  # constant nodes are folded where they are read
            names = [self.unit.input] if node is None else [] if self._constant(node) else self._copy(node)
            made += names
            for name in set(names) & set(act):
                self.values[name] = _fake_quant(self.g, self.values[name], *act[name], ste)
        if missing := [name for name in act if name not in made]:
            raise ConfigError(f"act_quant: {missing[0]!r} is neither the input of unit {self.unit.name!r}"
                              " nor made in it")  # fmt: skip
        if self.unit.output not in self.values:
            raise UnsupportedModelError(f"unit {self.unit.name!r}: output {self.unit.output!r} not computed")
        return self.values[self.unit.output]

    def _copy(self, node: ir.Node) -> list[str]:
        where = f"unit {self.unit.name!r}: node {node.name!r}"
        attrs = [a for a in node.attributes.values() if isinstance(a, ir.Attr) and a.type not in _GRAPH_ATTRS]
        if node.graph is not self.g.model.graph or len(attrs) < len(node.attributes):
            raise UnsupportedModelError(f"{where} is in or holds a subgraph")
        inputs = [None if v is None else self._value(v, where) for v in node.inputs]
        outputs = [ir.Value(name=v.name) for v in node.outputs]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in attrs]
        self.g.nodes.append(
            ir.Node(node.domain, node.op_type, inputs, attrs, outputs=outputs, name=node.name)
        )
        self.values.update((v.name, v) for v in outputs if v.name)
        return [v.name or "" for v in outputs]

    def _value(self, v: ir.Value, where: str) -> ir.Value:
        """The copy of a value a node reads: computed in the unit, or a folded constant expression."""
        name = v.name or ""
        if name in self.values:
            return self.values[name]
        producer = v.producer()
        if not _stored(v) and (producer is None or not self._constant(producer)):
            raise UnsupportedModelError(f"{where} reads {name!r}: not the unit input, nor computed before it"
                                        " in the unit, nor a weight or constant expression")  # fmt: skip
        array = self._fold(v)
        array = array.astype(self.g.dtype) if array.dtype == np.float32 else array
        self.values[name] = value = self.g.const(array, name)
        return value

    def _constant(self, node: ir.Node) -> bool:
        """Whether ``node`` computes from stored tensors only, or is Shape/Size of a tensor not
        computed in the unit (a static shape for the fixed batch)."""
        if node.op_type in ("Shape", "Size") and node.inputs[0] is not None:
            return node.inputs[0].name not in self.values
        for v in node.inputs:
            if v is not None and not _stored(v):
                producer = v.producer()
                if v.name in self.values or producer is None or not self._constant(producer):
                    return False
        return True

    def _fold(self, v: ir.Value) -> np.ndarray:
        """The value of a constant expression, evaluated node by node."""
        node, name = v.producer(), v.name or ""
        if name not in self.folded:
            if node is None or _stored(v):
                assert v.const_value is not None
                return v.const_value.numpy()
            if node.op_type in ("Shape", "Size"):
                self.folded[name] = self._shape(node)
                return self.folded[name]
            args = {i.name or "": self._fold(i) for i in node.inputs if i is not None}
            evaluator = ReferenceEvaluator(ir.serde.serialize_node(node), opsets={"": self.g.opset})
            results = list(evaluator.run(None, args))
            self.folded.update(zip([o.name or "" for o in node.outputs], results, strict=True))
        return self.folded[name]

    def _shape(self, node: ir.Node) -> np.ndarray:
        """Shape / Size of a tensor outside the unit: its declared shape, a symbolic leading
        (batch) dimension set to the unit's batch size."""
        v = node.inputs[0]
        dims = [d if isinstance(d, int) else None for d in (v.shape if v and v.shape is not None else [None])]
        dims[0] = self.batch if dims and dims[0] is None else dims[0]
        static = [d for d in dims if d is not None]
        if len(static) < len(dims):
            raise UnsupportedModelError(f"unit {self.unit.name!r}: {node.name!r} reads a non-static shape")
        if node.op_type == "Size":
            return np.asarray(np.prod(static), dtype=np.int64)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(static))
        return np.asarray(static[start:end], dtype=np.int64)


def _stored(v: ir.Value) -> bool:
    """An initializer that is not an overridable graph input."""
    return v.const_value is not None and not v.is_graph_input()


def _fake_quant(g: Graph, t: ir.Value, s: ir.Value, qp: QParams, ste: bool) -> ir.Value:
    """t' = s round(clip(t / s, qmin - z, qmax - z)); with ``ste``, round's gradient is 1 (module doc)."""
    z = float(np.asarray(qp.zero_point))
    c = g.op("Clip", g.op("Div", t, s), g.const(qp.qmin - z), g.const(qp.qmax - z))
    rounded = g.op("Round", c)
    if ste:
        k, narrow = _STOP_EXPONENT[g.dtype], g.dtype == np.float32
        wide = g.op("Cast", c, to=ir.DataType.DOUBLE.value) if narrow else c
        exact = g.op("Round", g.op("Mul", wide, g.const(2.0**k, dtype=np.float64)))
        stop = g.op("Mul", exact, g.const(2.0**-k, dtype=np.float64))
        stop = g.op("Cast", stop, to=ir.DataType.FLOAT.value) if narrow else stop
        rounded = g.op("Add", c, g.op("Sub", rounded, stop))
    return g.op("Mul", rounded, s, stem=f"{t.name}_fq")
