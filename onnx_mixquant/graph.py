"""Read the model: load with onnx_ir, check it, infer shapes once, list the weight sites.

A *weight site* is a float tensor stored in the model (an initializer or a ``Constant`` node's
value, in the main graph or in an ``If``/``Loop``/``Scan`` subgraph) that feeds the weight operand
of a Conv, ConvTranspose, Gemm (B) or MatMul (the constant operand). Every other tensor stored in
the model is listed as skipped, with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnx_mixquant.errors import ModelLoadError, UnsupportedModelError

__all__ = [
    "MIN_OPSET",
    "ModelInput",
    "ReadModel",
    "SkippedWeight",
    "WeightSite",
    "default_opset",
    "find_weight_sites",
    "first_reader",
    "load_model",
    "node_names",
    "read_model",
    "weight_array",
    "weight_values",
]

#: Oldest default-domain opset the tool accepts.
MIN_OPSET = 10

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight tensor.

    Attributes:
        name: the tensor (value) name, unique in the model.
        shape: its shape.
        axis: per-channel axis for its consumers (Conv: 0; ConvTranspose group=1: 1; Gemm B: 0 if
            transB else 1; MatMul constant B: rank-1, constant A: rank-2), non-negative; None when
            consumers disagree (then it is quantized per tensor).
        consumers: names of the quantizable nodes that read it as their weight.
        op_types: their op types, same order.
        other_consumers: names of other nodes that also read it (they will read the dequantized
            value).
        graph: "" for the main graph, else the path of the subgraph, e.g. "loop_node/body".
        source: "initializer" or "constant" (a Constant node's output).
    """

    name: str
    shape: tuple[int, ...]
    axis: int | None
    consumers: tuple[str, ...]
    op_types: tuple[str, ...]
    other_consumers: tuple[str, ...]
    graph: str
    source: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class SkippedWeight:
    """A tensor stored in the model that is not quantized, and why."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, element type (NumPy dtype name) and dims (int, or str when symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass
class ReadModel:
    """What the read stage hands on: the IR model plus facts about it."""

    model: ir.Model
    path: Path
    file_bytes: int
    opset: int
    inputs: tuple[ModelInput, ...]
    output_names: tuple[str, ...]
    sites: tuple[WeightSite, ...]
    skipped: tuple[SkippedWeight, ...]


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
_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
#: A read of a value: (node, input index).
_Use = tuple[ir.Node, int]


@dataclass
class _Candidate:
    """A tensor stored in the model: an initializer or the output of a Constant node."""

    value: ir.Value
    graph: str
    source: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    #: Why it is skipped whatever reads it ("" when it may be a site).
    reason: str = ""


@dataclass
class _Scan:
    """One depth-first walk of the model: node order, display names, stored tensors."""

    order: dict[ir.Node, int] = field(default_factory=dict)
    names: dict[ir.Node, str] = field(default_factory=dict)
    candidates: list[_Candidate] = field(default_factory=list)
    defined: dict[str, tuple[ir.Value, str]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)


def load_model(path: str | Path) -> ir.Model:
    """Load ``path`` (external data included); ModelLoadError / UnsupportedModelError on bad input.

    External data stay on disk and are read lazily (memory-mapped), so models over 2 GB load.

    Raises:
        ModelLoadError: missing file, a directory, not a (valid) ONNX model, missing external data.
        UnsupportedModelError: the default-domain opset is below ``MIN_OPSET`` or newer than the
            installed ``onnx`` knows.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, not an ONNX model file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: not a valid ONNX model: empty file")
    try:
        model = ir.load(p)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read: {e}") from e
    except Exception as e:  # protobuf DecodeError, or whatever deserializing garbage raises
        raise ModelLoadError(f"{p}: not a valid ONNX model: {e}") from e
    if not model.opset_imports or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(
            f"{p}: not an ONNX model (no graph or no opset_import; a TensorProto or GraphProto?)"
        )
    _check_opset(model, p)
    _check_external_data(model, p)
    logger.debug("loaded %s: opset %d, %d nodes", p, default_opset(model), len(model.graph))
    return model


def default_opset(model: ir.Model) -> int:
    """The model's opset version for the default ONNX domain, or -1 when it imports none."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    return -1 if version is None else int(version)


def _check_opset(model: ir.Model, path: Path) -> None:
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < 0:
        raise UnsupportedModelError(f"{path}: imports no opset of the default ONNX domain")
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest supported;"
            " convert the model to a newer opset first (onnx.version_converter)"
        )
    if opset > newest:
        raise UnsupportedModelError(
            f"{path}: opset {opset} is newer than {newest}, the newest the installed"
            f" onnx {onnx.__version__} knows; upgrade onnx"
        )


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    for graph in model.graphs():
        for name, tensor in graph.initializers.tensor_items():
            if isinstance(tensor, ir.ExternalTensor):
                yield name, tensor


def _check_external_data(model: ir.Model, path: Path) -> None:
    for name, tensor in _external_tensors(model):
        data = Path(tensor.path)
        where = f"external data file {os.fspath(tensor.location)!r} of tensor {name!r}"
        if not data.is_file():
            raise ModelLoadError(f"{path}: {where} not found")
        end, size = (tensor.offset or 0) + (tensor.length or 0), data.stat().st_size
        if end > size:
            raise ModelLoadError(f"{path}: {where} is too short ({size} < {end} bytes)")


def node_names(model: ir.Model) -> dict[ir.Node, str]:
    """Display name of every node, subgraphs included; unique and stable; the model is unchanged.

    A node's own name when it has one, else ``f"{op_type}_{i}"``, ``i`` its position in a
    depth-first walk of the model (subgraph nodes right after their owner). Weight sites and
    reports name nodes this way.
    """
    return _scan(model).names


def _scan(model: ir.Model) -> _Scan:
    scan = _Scan(taken={n.name for n in model.graph.all_nodes() if n.name})
    _scan_graph(scan, model.graph, "")
    return scan


def _scan_graph(scan: _Scan, graph: ir.Graph, path: str) -> None:
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


def _display_name(scan: _Scan, node: ir.Node) -> str:
    if node.name:
        return node.name
    name = f"{node.op_type}_{len(scan.order) - 1}"
    while name in scan.taken:
        name += "_"
    scan.taken.add(name)
    return name


def _define(scan: _Scan, value: ir.Value, path: str) -> None:
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


def _initializer_candidate(value: ir.Value, path: str) -> _Candidate:
    tensor = value.const_value
    assert tensor is not None, f"initializer {value.name!r} has no tensor"
    reason = "overridable graph input" if value.is_graph_input() else ""
    return _Candidate(value, path, "initializer", tensor.dtype, tuple(tensor.shape.numpy()), reason)


def _constant_candidate(node: ir.Node, path: str) -> _Candidate:
    value = node.outputs[0]
    tensor = _constant_tensor(node)
    if tensor is not None:
        return _Candidate(value, path, "constant", tensor.dtype, tuple(tensor.shape.numpy()))
    attr_name = next(iter(node.attributes), "")
    dtype, reason = _CONSTANT_ATTRS.get(
        attr_name.removesuffix("s"), (ir.DataType.UNDEFINED, f"Constant with {attr_name!r}")
    )
    attr_value = node.attributes[attr_name].value if attr_name else None
    shape = (len(attr_value),) if isinstance(attr_value, (list, tuple)) else ()
    return _Candidate(value, path, "constant", dtype, shape, reason)


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
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


def _role(use: _Use, rank: int) -> int | str | None:
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


def _read_reason(c: _Candidate, uses: list[_Use]) -> str:
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


def _classify(c: _Candidate, scan: _Scan) -> tuple[WeightSite | SkippedWeight, int]:
    """The site or skip record of one candidate, and the walk position of its first weight use."""
    uses = sorted(((u.node, u.idx) for u in c.value.uses()), key=lambda u: (scan.order[u[0]], u[1]))
    weights: list[tuple[ir.Node, int]] = []
    reason = _read_reason(c, uses)
    if not reason:
        weights, reason = _weight_uses(c, uses, scan)
    if reason:
        return SkippedWeight(c.value.name or "", c.shape, c.dtype.name, reason), -1
    return _site(c, weights, [node for node, _ in uses], scan), scan.order[weights[0][0]]


def _weight_uses(c: _Candidate, uses: list[_Use], scan: _Scan) -> tuple[list[tuple[ir.Node, int]], str]:
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


def _site(
    c: _Candidate, weights: list[tuple[ir.Node, int]], readers: list[ir.Node], scan: _Scan
) -> WeightSite:
    consumers = list(dict.fromkeys(node for node, _ in weights))
    others = [node for node in dict.fromkeys(readers) if node not in consumers]
    axes = {axis for _, axis in weights}
    return WeightSite(
        name=c.value.name or "",
        shape=c.shape,
        axis=axes.pop() if len(axes) == 1 else None,
        consumers=tuple(scan.names[n] for n in consumers),
        op_types=tuple(n.op_type for n in consumers),
        other_consumers=tuple(scan.names[n] for n in others),
        graph=c.graph,
        source=c.source,
    )


def _find(model: ir.Model) -> tuple[list[tuple[WeightSite, ir.Value]], list[SkippedWeight]]:
    scan = _scan(model)
    found: list[tuple[int, int, WeightSite, ir.Value]] = []
    skipped: list[SkippedWeight] = []
    for i, c in enumerate(scan.candidates):
        record, first = _classify(c, scan)
        if isinstance(record, WeightSite):
            found.append((first, i, record, c.value))
        else:
            skipped.append(record)
    found.sort(key=lambda f: f[:2])
    return [(site, value) for _, _, site, value in found], skipped


def find_weight_sites(model: ir.Model) -> tuple[tuple[WeightSite, ...], tuple[SkippedWeight, ...]]:
    """Every weight site, in topological order of first consumer, and every skipped float tensor.

    Walks the main graph and every subgraph. A subgraph's sites come right after the sites read
    before its owner node. Skipped tensors (integer ones included) come in walk order: each
    graph's initializers, then its Constant nodes, subgraphs at their owner. The model is not
    modified.

    Raises:
        UnsupportedModelError: two values of the model (subgraphs included) share a name.
    """
    found, skipped = _find(model)
    return tuple(site for site, _ in found), tuple(skipped)


def weight_values(model: ir.Model) -> dict[str, ir.Value]:
    """Map of weight-site name -> the ir.Value holding it (initializer or Constant output).

    In the order of :func:`find_weight_sites`. For an initializer ``value.graph`` is the graph
    that owns it; for a Constant output ``value.producer()`` is the Constant node.
    """
    found, _ = _find(model)
    return {site.name: value for site, value in found}


def weight_array(value: ir.Value) -> np.ndarray:
    """The float32 array held by an initializer or a Constant node's output value.

    External data are memory-mapped: the array may be read-only; copy it before writing to it.

    Raises:
        UnsupportedModelError: the value holds no stored tensor, or not a float32 one.
        ModelLoadError: its external data cannot be read.
    """
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        tensor = _constant_tensor(producer)
    if tensor is None:
        raise UnsupportedModelError(f"value {value.name!r} holds no stored tensor")
    if tensor.dtype != ir.DataType.FLOAT:
        raise UnsupportedModelError(f"weight {value.name!r}: dtype {tensor.dtype.name}, not FLOAT")
    try:
        return tensor.numpy()
    except OSError as e:
        raise ModelLoadError(f"weight {value.name!r}: cannot read its external data: {e}") from e


def first_reader(value: ir.Value) -> ir.Node | None:
    """The first node of ``value.graph`` that reads ``value``, itself or inside its subgraphs.

    The place to insert one DequantizeLinear for a weight that every reader can see: a
    weight read inside an ``If`` branch is read, for its own graph, by the ``If`` node.
    None when nothing reads it.
    """
    readers = {use.node for use in value.uses()}
    for node in value.graph or ():
        if node in readers:
            return node
        for attr in node.attributes.values():
            if isinstance(attr, ir.Attr) and attr.type in _GRAPH_ATTRS:
                subgraphs = [attr.as_graph()] if attr.type == _GRAPH_ATTRS[0] else attr.as_graphs()
                if any(n in readers for g in subgraphs for n in g.all_nodes()):
                    return node
    return None


def read_model(path: str | Path) -> ReadModel:
    """load_model + shape inference (once) + opset check + find_weight_sites.

    Shape inference (onnx, non-strict, main-graph tensors over 1 KB left out so big models and
    external data work) annotates value types and shapes in place; when it fails the model is
    kept as loaded and a warning is logged. ``file_bytes`` counts the model file plus its
    external data files. Returns empty ``sites`` when nothing is quantizable.

    Raises:
        ModelLoadError: see :func:`load_model`.
        UnsupportedModelError: see :func:`load_model` and :func:`find_weight_sites`.
    """
    p = Path(path)
    model = load_model(p)
    _infer_shapes(model)
    try:
        sites, skipped = find_weight_sites(model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{p}: {e}") from e
    logger.info("%s: %d weight sites, %d tensors skipped", p, len(sites), len(skipped))
    return ReadModel(
        model=model,
        path=p,
        file_bytes=_file_bytes(model, p),
        opset=default_opset(model),
        inputs=tuple(_model_input(v) for v in model.graph.inputs if not v.is_initializer()),
        output_names=tuple(v.name or "" for v in model.graph.outputs),
        sites=sites,
        skipped=skipped,
    )


def _infer_shapes(model: ir.Model) -> None:
    """Run onnx shape inference once, in place, keeping the initializer order."""
    order = list(model.graph.initializers)
    inference = onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False)
    inference(model)  # logs a warning and leaves the model as it was when inference fails
    # The pass re-registers the tensors it leaves out last: restore the file's order.
    for name in order:
        model.graph.initializers.add(model.graph.initializers.pop(name))


def _file_bytes(model: ir.Model, path: Path) -> int:
    files = {path.resolve()} | {Path(t.path).resolve() for _, t in _external_tensors(model)}
    return sum(f.stat().st_size for f in files)


def _model_input(value: ir.Value) -> ModelInput:
    dtype = "?" if value.dtype is None else value.dtype.numpy().name
    if value.shape is None:
        logger.warning("input %r has no known rank", value.name)
        return ModelInput(value.name or "", dtype, ())
    dims = tuple(d if isinstance(d, int) else (d.value or "?") for d in value.shape)
    return ModelInput(value.name or "", dtype, dims)
