"""Bit packing for the widths ONNX has no integer type for, and the ONNX ops that unpack them.

ONNX stores 2 (opset 25), 4 and 8-bit integers only. A weight of width 2, 3, 5, 6 or 7 is stored
at its own width instead: :func:`pack_bits` writes its integers into a uint8 tensor, and
:func:`unpack_subgraph` builds standard ONNX ops (Cast, MatMul, Div, Mod, Reshape, Sub, Cast,
Split) that turn it back into the 8-bit integer tensor the weight's DequantizeLinear reads. Every
input of those ops is a constant, so onnxruntime folds them into one initializer at session
creation (ORT_ENABLE_BASIC and above); at ORT_DISABLE_ALL they run on every call and give the same
integers.

Several weights of one width, signedness and graph share one packed tensor and one unpack chain
(their integers are concatenated in a fixed order, then split): a chain is about ten nodes, which
would cost more bytes than the narrower width saves on small layers if every weight had its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_mixquant.config import ExportConfig
from onnx_mixquant.rounding import QuantizedWeight
from onnx_mixquant.search import PACKED_WIDTHS

__all__ = [
    "PACKED_WIDTHS",
    "UnpackGraph",
    "pack_bits",
    "pack_model",
    "packed_bytes",
    "packs",
    "unpack_bits",
    "unpack_subgraph",
]

logger = logging.getLogger(__name__)

#: Values per packing group: 8 values of b bits fill exactly b bytes.
GROUP = 8


def packs(bits: int, cfg: ExportConfig) -> bool:
    """Whether the export stores width ``bits`` bit-packed at its own width."""
    return cfg.pack_widths and bits in PACKED_WIDTHS and not (bits == 2 and cfg.use_int2)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes :func:`pack_bits` writes for ``count`` values of width ``bits``: ceil(count/8) * bits."""
    return -(-count // GROUP) * bits


def _offset(bits: int, signed: bool) -> int:
    return 1 << (bits - 1) if signed else 0


def pack_bits(q: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Pack integers of width ``bits`` into bytes, 8 values in ``bits`` bytes, little-endian.

    The values are flattened (C order) and offset to be non-negative (``u = q + 2^(bits-1)`` for a
    signed grid, ``u = q`` for an unsigned one), padded with zeros to a multiple of 8, and each
    group of 8 becomes the ``8 * bits``-bit word ``sum_j u_j << (bits * j)``, written as ``bits``
    bytes, least significant first. Shapes: ``q`` any (N values) -> uint8 ``(ceil(N / 8), bits)``.

    Worked example, ``bits=3`` unsigned, ``q = [5, 0, 7, 2, 1, 6, 3, 4]``::

        word  = 5 | 0<<3 | 7<<6 | 2<<9 | 1<<12 | 6<<15 | 3<<18 | 4<<21 = 0x8F15C5
        bytes = [0xC5, 0x15, 0x8F] = [197, 21, 143]              (one row of the output)
        back  = (197 + 21*2^8 + 143*2^16) // [1, 2^3, 2^6, ..., 2^21] % 2^3 = q

    Args:
        q: integers inside the ``bits``-wide grid ([0, 2^b - 1], or [-2^(b-1), 2^(b-1) - 1]).
        bits: width, 1..8.
        signed: whether ``q`` is on the signed grid.

    Raises:
        ValueError: a value is outside the grid, or ``bits`` outside 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    u = np.asarray(q).reshape(-1).astype(np.int64) + _offset(bits, signed)
    if u.size and (u.min() < 0 or u.max() >= 1 << bits):
        raise ValueError(f"values outside the {'signed' if signed else 'unsigned'} {bits}-bit grid")
    groups = -(-u.size // GROUP)
    grouped = np.pad(u, (0, groups * GROUP - u.size)).reshape(groups, GROUP).astype(np.uint64)
    shifts = (bits * np.arange(GROUP)).astype(np.uint64)
    word = np.bitwise_or.reduce(grouped << shifts, axis=1)  # (groups,), at most 56 bits
    out = (word[:, None] >> (8 * np.arange(bits)).astype(np.uint64)) & np.uint64(0xFF)
    return out.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, signed: bool, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, flat int64 (NumPy reference).

    Computes exactly what :func:`unpack_subgraph` does in ONNX: ``word = sum_k byte_k * 2^(8k)``,
    ``u_j = word // 2^(bits*j) % 2^bits``, ``q = u - offset``.
    """
    p = np.asarray(packed, dtype=np.uint8).reshape(-1, bits).astype(np.int64)
    word = p @ _places(bits)
    u = (word // _divisors(bits)) % (1 << bits)
    return u.reshape(-1)[:count] - _offset(bits, signed)


def _places(bits: int) -> np.ndarray:
    """(bits, 1) int64: the place value 2^(8k) of byte k."""
    return np.array([[1 << (8 * k)] for k in range(bits)], dtype=np.int64)


def _divisors(bits: int) -> np.ndarray:
    return np.array([1 << (bits * j) for j in range(GROUP)], dtype=np.int64)


@dataclass(frozen=True)
class UnpackGraph:
    """What :func:`unpack_subgraph` built: constants to register, nodes in order, one output per
    member (the 8-bit integers, flat, in the order of ``sizes``)."""

    initializers: tuple[ir.Value, ...]
    nodes: tuple[ir.Node, ...]
    outputs: tuple[ir.Value, ...]


class _Builder:
    """Collects initializers and values named ``{prefix}_{stem}``, and nodes. The nodes get no
    name: they are folded at load, and a name would cost each node about 30 bytes of file."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.inits: list[ir.Value] = []
        self.nodes: list[ir.Node] = []

    def const(self, stem: str, array: np.ndarray) -> ir.Value:
        name = f"{self.prefix}_{stem}"
        t = ir.tensor(array, name=name)
        v = ir.Value(name=name, const_value=t)  # untyped: no value_info entry in the file
        self.inits.append(v)
        return v

    def op(
        self, op_type: str, inputs: Sequence[ir.Value], stem: str, attrs: dict | None = None, outputs: int = 1
    ) -> Sequence[ir.Value]:
        name = f"{self.prefix}_{stem}"
        node = ir.node(op_type, inputs, attrs or {}, num_outputs=outputs, name="")
        for i, out in enumerate(node.outputs):
            out.name = name if outputs == 1 else f"{name}_{i}"
        self.nodes.append(node)
        return node.outputs


def unpack_subgraph(
    packed: np.ndarray, bits: int, signed: bool, sizes: Sequence[int], prefix: str, opset: int
) -> UnpackGraph:
    """ONNX ops turning ``packed`` (from :func:`pack_bits` of ``sum(sizes)`` values) back into the
    integers, cast to int8 (signed) or uint8 and split into pieces of ``sizes`` values.

    Chain (G = ``packed.shape[0]``; every name starts with ``prefix``)::

        packed uint8 (G, b) -Cast int64-> -MatMul [[1], [2^8], .., [2^(8(b-1))]]-> words (G, 1)
        -Div [1, 2^b, .., 2^(7b)]-> (G, 8) -Mod 2^b-> -Reshape [-1]-> (8G,) [-Sub 2^(b-1)]
        -Cast int8/uint8-> -Split sizes (+ padding)-> one flat tensor per size

    The words come from an int64 MatMul, not Mul + ReduceSum: onnxruntime's int64 ReduceSum is
    inexact above 2^53 (measured on 1.31: 7-bit words, up to 2^56, came out off by 4).

    Args:
        packed: uint8 ``(G, bits)``.
        bits: width, 1..8.
        signed: whether to subtract ``2^(bits-1)`` and cast to int8.
        sizes: values per output; their sum is at most ``8 * G``.
        prefix: name prefix for every initializer, node and value made (unique in the model).
        opset: the model's default-domain opset (Split takes its sizes as an input from opset
            13, as an attribute before).
    """
    total = int(sum(sizes))
    assert packed.shape == (-(-total // GROUP), bits), (packed.shape, total, bits)
    b = _Builder(prefix)
    data = b.const("data", packed.astype(np.uint8))
    x = b.op("Cast", [data], "int64", {"to": ir.DataType.INT64})[0]
    x = b.op("MatMul", [x, b.const("places", _places(bits))], "words")[0]
    x = b.op("Div", [x, b.const("divisors", _divisors(bits))], "shifted")[0]
    x = b.op("Mod", [x, b.const("modulus", np.array(1 << bits, dtype=np.int64))], "digits")[0]
    x = b.op("Reshape", [x, b.const("flat", np.array([-1], dtype=np.int64))], "values")[0]
    if signed:
        x = b.op("Sub", [x, b.const("offset", np.array(_offset(bits, True), dtype=np.int64))], "centred")[0]
    x = b.op("Cast", [x], "int8", {"to": ir.DataType.INT8 if signed else ir.DataType.UINT8})[0]
    pieces = [int(s) for s in sizes]
    if packed.shape[0] * GROUP > total:
        pieces.append(packed.shape[0] * GROUP - total)  # the zero padding: an unused output
    if len(pieces) == 1:
        outs: Sequence[ir.Value] = [x]
    elif opset >= 13:
        split = b.const("split", np.array(pieces, dtype=np.int64))
        outs = b.op("Split", [x, split], "split", {"axis": 0}, outputs=len(pieces))
    else:
        outs = b.op("Split", [x], "split", {"axis": 0, "split": pieces}, outputs=len(pieces))
    return UnpackGraph(tuple(b.inits), tuple(b.nodes), tuple(outs[: len(sizes)]))


#: One packing group: (graph index in ``model.graphs()``, width, signed).
_GroupKey = tuple[int, int, bool]


def pack_model(
    model: ir.Model, weights: Mapping[str, QuantizedWeight], cfg: ExportConfig, opset: int
) -> dict[str, str]:
    """Replace the 8-bit integer input ``{name}_quantized`` of each packed-width weight's
    DequantizeLinear by a packed group and its unpack ops (in place).

    Returns:
        weight name -> storage text (e.g. "UINT3 packed") for every weight packed.
    """
    graphs = list(model.graphs())
    groups = _groups(graphs, weights, cfg)
    taken = {v.name or "" for g in graphs for n in g for v in n.outputs} | {
        n for g in graphs for n in g.initializers
    }
    storage: dict[str, str] = {}
    for (gi, bits, signed), dqs in groups.items():
        base = f"packed_{'int' if signed else 'uint'}{bits}" + (f"_g{gi}" if gi else "")
        prefix, k = base, 0
        while any(n.startswith(prefix) for n in taken):  # never reuse a name the model has
            k += 1
            prefix = f"{base}{k}"
        _pack_group(graphs[gi], dqs, bits, signed, prefix, opset)
        for dq in dqs:
            storage[dq.outputs[0].name or ""] = f"{'INT' if signed else 'UINT'}{bits} packed"
    logger.info("bit-packed %d weights in %d groups", len(storage), len(groups))
    return storage


def _groups(
    graphs: Sequence[ir.Graph], weights: Mapping[str, QuantizedWeight], cfg: ExportConfig
) -> dict[_GroupKey, list[ir.Node]]:
    """The DequantizeLinear node of every weight to pack, grouped, in graph order."""
    groups: dict[_GroupKey, list[ir.Node]] = {}
    for gi, graph in enumerate(graphs):
        for node in graph:
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            w = weights.get(node.outputs[0].name or "")
            q = node.inputs[0]
            if w is None or q is None or q.name != f"{w.name}_quantized" or not packs(w.qparams.bits, cfg):
                continue
            groups.setdefault((gi, w.qparams.bits, w.qparams.signed), []).append(node)
    return groups


def _pack_group(
    graph: ir.Graph, dqs: Sequence[ir.Node], bits: int, signed: bool, prefix: str, opset: int
) -> None:
    """Pack the integers feeding ``dqs`` into one initializer and rewire each DQ to its unpacked,
    reshaped piece (named like the integer tensor it replaces)."""
    olds = [dq.inputs[0] for dq in dqs]
    ints = [_integers(v) for v in olds if v is not None]
    packed = pack_bits(np.concatenate([q.reshape(-1) for q in ints]), bits, signed)
    sub = unpack_subgraph(packed, bits, signed, [q.size for q in ints], prefix, opset)
    b = _Builder(prefix)
    shapes: dict[tuple[int, ...], ir.Value] = {}  # one shape tensor per distinct weight shape
    for i, (dq, old, q, flat) in enumerate(zip(dqs, olds, ints, sub.outputs, strict=True)):
        assert old is not None and old.name is not None
        if q.shape not in shapes:
            dims = "x".join(map(str, q.shape)) or "scalar"
            shapes[q.shape] = b.const(f"shape_{dims}", np.array(q.shape, dtype=np.int64))
        new = b.op("Reshape", [flat, shapes[q.shape]], f"reshaped_{i}")[0]
        dq.replace_input_with(0, new)
        producer = old.producer()
        if producer is not None:  # a Constant node
            graph.remove(producer, safe=True)
        else:
            graph.initializers.pop(old.name)
        new.name = old.name  # no shape or type: a value_info entry would cost bytes; ORT infers it
    graph.insert_before(graph.node(0), [*sub.nodes, *b.nodes])
    for v in (*sub.initializers, *b.inits):
        graph.register_initializer(v)


def _integers(value: ir.Value) -> np.ndarray:
    """The integers an initializer or a Constant node's output holds."""
    producer = value.producer()
    tensor = value.const_value if producer is None else producer.attributes["value"].as_tensor()
    assert tensor is not None, value.name
    return tensor.numpy()
