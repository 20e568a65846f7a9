"""Read the model: load with onnx_ir, check it, infer shapes once, list the weight sites.

A *weight site* is a float tensor stored in the model (an initializer or a ``Constant`` node's
value, in the main graph or in an ``If``/``Loop``/``Scan`` subgraph) that feeds the weight operand
of a Conv, ConvTranspose, Gemm (B) or MatMul (the constant operand). Every other tensor stored in
the model is listed as skipped, with the reason. The walk that finds them, names the nodes and
decides what each read of a stored tensor is lives in :mod:`onnx_mixquant.read._scan`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnx_mixquant.errors import ModelLoadError, UnsupportedModelError
from onnx_mixquant.read._scan import Candidate, Scan, constant_tensor, read_reason, scan_model, weight_uses
from onnx_mixquant.toolkit import default_opset

__all__ = [
    "MIN_OPSET",
    "ModelInput",
    "ReadModel",
    "SkippedWeight",
    "WeightSite",
    "find_weight_sites",
    "first_reader",
    "load_model",
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


_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


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


def _classify(c: Candidate, scan: Scan) -> tuple[WeightSite | SkippedWeight, int]:
    """The site or skip record of one candidate, and the walk position of its first weight use."""
    uses = sorted(((u.node, u.idx) for u in c.value.uses()), key=lambda u: (scan.order[u[0]], u[1]))
    weights: list[tuple[ir.Node, int]] = []
    reason = read_reason(c, uses)
    if not reason:
        weights, reason = weight_uses(c, uses, scan)
    if reason:
        return SkippedWeight(c.value.name or "", c.shape, c.dtype.name, reason), -1
    return _site(c, weights, [node for node, _ in uses], scan), scan.order[weights[0][0]]


def _site(c: Candidate, weights: list[tuple[ir.Node, int]], readers: list[ir.Node], scan: Scan) -> WeightSite:
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
    scan = scan_model(model)
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
        tensor = constant_tensor(producer)
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
