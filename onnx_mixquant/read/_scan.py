"""The one walk of a model behind :mod:`onnx_mixquant.read.model`: node names, stored tensors, read roles.

:func:`scan_model` walks the main graph and every ``If``/``Loop``/``Scan`` subgraph depth first
(subgraph nodes right after their owner) and records each node's walk position and display name,
where each value name is defined (a name defined twice is refused), and every tensor stored in the
model (initializers and Constant outputs) as a :class:`Candidate`. :func:`read_reason` and
:func:`weight_uses` then say whether a candidate is a weight site (the nodes reading it as a weight,
with their per-channel axes) or why it is skipped. The model is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnx_mixquant.errors import UnsupportedModelError

__all__ = ["Candidate", "Scan", "Use", "constant_tensor", "read_reason", "scan_model", "weight_uses"]

#: Ops whose weight operand is quantized (default domain only).
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Constant attributes other than ``value`` (plural forms drop the "s"): dtype, why skipped.
_CONSTANT_ATTRS = {
    "value_float": (ir.DataType.FLOAT, "scalar/1-D constant"),
    "value_int": (ir.DataType.INT64, "integer tensor"),
    "value_string": (ir.DataType.STRING, "string tensor"),
}
#: A read of a value: (node, input index).
Use = tuple[ir.Node, int]


@dataclass
class Candidate:
    """A tensor stored in the model: an initializer or the output of a Constant node."""

    value: ir.Value
    graph: str
    source: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    #: Why it is skipped whatever reads it ("" when it may be a site).
    reason: str = ""


@dataclass
class Scan:
    """One depth-first walk of the model: node order, display names, stored tensors."""

    order: dict[ir.Node, int] = field(default_factory=dict)
    names: dict[ir.Node, str] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    defined: dict[str, tuple[ir.Value, str]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)


def scan_model(model: ir.Model) -> Scan:
    """Walk ``model`` once (subgraphs included); UnsupportedModelError when a value name repeats."""
    scan = Scan(taken={n.name for n in model.graph.all_nodes() if n.name})
    _scan_graph(scan, model.graph, "")
    return scan


def _scan_graph(scan: Scan, graph: ir.Graph, path: str) -> None:
    for value in graph.inputs:
        _define(scan, value, path)
    for value in graph.initializers.values():
        _define(scan, value, path)
        scan.candidates.append(_initializer_candidate(value, path))
    for node in graph:
        scan.order[node] = len(scan.order)
        scan.names[node] = _display_name(scan, node)
        for value in node.outputs:
            _define(scan, value, path)
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.outputs:
            scan.candidates.append(_constant_candidate(node, path))
        prefix = f"{path}/{scan.names[node]}" if path else scan.names[node]
        for attr in node.attributes.values():
            if not isinstance(attr, ir.Attr):
                continue  # a RefAttr (inside functions) holds no graph
            if attr.type == ir.AttributeType.GRAPH:
                _scan_graph(scan, attr.as_graph(), f"{prefix}/{attr.name}")
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, sub in enumerate(attr.as_graphs()):
                    _scan_graph(scan, sub, f"{prefix}/{attr.name}[{i}]")


def _display_name(scan: Scan, node: ir.Node) -> str:
    if node.name:
        return node.name
    name = f"{node.op_type}_{len(scan.order) - 1}"
    while name in scan.taken:
        name += "_"
    scan.taken.add(name)
    return name


def _define(scan: Scan, value: ir.Value, path: str) -> None:
    """Record where ``value`` is defined; UnsupportedModelError when its name is taken."""
    if not value.name:
        return
    seen = scan.defined.setdefault(value.name, (value, path))
    if seen[0] is not value:
        where = [f"subgraph {g!r}" if g else "the main graph" for g in (seen[1], path)]
        raise UnsupportedModelError(
            f"value name {value.name!r} is defined twice ({where[0]} and {where[1]});"
            " names must be unique across the model and its subgraphs"
        )


def _initializer_candidate(value: ir.Value, path: str) -> Candidate:
    tensor = value.const_value
    assert tensor is not None, f"initializer {value.name!r} has no tensor"
    reason = "overridable graph input" if value.is_graph_input() else ""
    return Candidate(value, path, "initializer", tensor.dtype, tuple(tensor.shape.numpy()), reason)


def _constant_candidate(node: ir.Node, path: str) -> Candidate:
    value = node.outputs[0]
    tensor = constant_tensor(node)
    if tensor is not None:
        return Candidate(value, path, "constant", tensor.dtype, tuple(tensor.shape.numpy()))
    attr_name = next(iter(node.attributes), "")
    dtype, reason = _CONSTANT_ATTRS.get(
        attr_name.removesuffix("s"), (ir.DataType.UNDEFINED, f"Constant with {attr_name!r}")
    )
    attr_value = node.attributes[attr_name].value if attr_name else None
    shape = (len(attr_value),) if isinstance(attr_value, (list, tuple)) else ()
    return Candidate(value, path, "constant", dtype, shape, reason)


def constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor of a Constant node's ``value`` attribute, or None."""
    attr = node.attributes.get("value")
    if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSOR:
        return attr.as_tensor()
    return None


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.is_initializer():
        return not value.is_graph_input()
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _role(use: Use, rank: int) -> int | str | None:
    """What ``use`` reads: a weight (its per-channel axis), ``"bias"``, another reason to skip
    (with ``{}`` for the node name), or None for an ordinary read."""
    node, idx = use
    op = node.op_type
    if node.domain not in _DEFAULT_DOMAINS or op not in (*_WEIGHT_OPS, "Add"):
        return None
    if idx == 2 and op in ("Conv", "ConvTranspose", "Gemm"):
        return "bias"
    if op == "Conv" and idx == 1:
        return 0
    if op == "ConvTranspose" and idx == 1:
        return 1 if node.attributes.get_int("group", 1) == 1 else 0
    if op == "Gemm" and idx == 1:
        return 0 if node.attributes.get_int("transB", 0) else 1
    if op == "Gemm":
        return "input A of Gemm {} (only B is quantized)"
    if op == "MatMul":
        if _is_constant(node.inputs[1 - idx]):
            return "both inputs of MatMul {} are constant"
        return rank - 1 if idx == 1 else rank - 2
    other = node.inputs[1 - idx] if len(node.inputs) == 2 else None
    producer = other.producer() if other is not None else None
    if rank == 1 and producer is not None and producer.op_type == "MatMul":
        return "bias"
    return None


def read_reason(c: Candidate, uses: list[Use]) -> str:
    """Reason to skip from the candidate itself, its dtype and whether anything reads it."""
    if c.reason:
        return c.reason
    if not uses:
        return "graph output, read by no node" if c.value.is_graph_output() else "unused"
    if any(node.op_type in _QDQ_OPS for node, _ in uses):
        return "already quantized"
    if c.dtype == ir.DataType.FLOAT:
        return ""
    if c.dtype.is_integer():
        return "integer tensor"
    if c.dtype in (ir.DataType.BOOL, ir.DataType.STRING):
        return f"{c.dtype.name.lower()} tensor"
    return f"dtype {c.dtype.name} not supported"


def weight_uses(c: Candidate, uses: list[Use], scan: Scan) -> tuple[list[tuple[ir.Node, int]], str]:
    """The (node, axis) pairs reading ``c`` as a weight, and the reason to skip it ("" if none)."""
    weights: list[tuple[ir.Node, int]] = []
    notes: list[str] = []
    biases: list[str] = []
    for node, idx in uses:
        role, name = _role((node, idx), len(c.shape)), scan.names[node]
        if isinstance(role, int):
            weights.append((node, role))
        elif role == "bias":
            biases.append(name)
        elif role is not None:
            notes.append(role.format(name))
    if weights:
        rank = len(c.shape)
        bad = f"rank-{rank} weight of {scan.names[weights[0][0]]} (rank < 2)" if rank < 2 else ""
        return weights, bad
    if notes or biases:
        return [], notes[0] if notes else f"bias of {biases[0]} (biases stay float)"
    ops = ", ".join(sorted({node.op_type for node, _ in uses}))
    return [], f"not a weight of Conv/ConvTranspose/Gemm/MatMul (read by {ops})"
