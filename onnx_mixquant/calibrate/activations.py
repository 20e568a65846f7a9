"""Static activation quantization: which activation tensors get Q/DQ, and inserting them.

Placement follows onnxruntime's QDQ convention so that, at ORT_ENABLE_ALL, DQ -> Conv/MatMul/Gemm
-> Q groups fuse into QLinearConv / QLinearMatMul / QGemm:

* *compute* ops (Conv, ConvTranspose, Gemm, MatMul, Add, Mul, Concat, pools): their float
  activation inputs and their outputs are quantized;
* *activation* ops (Relu, Clip): only their outputs. A compute output read only by Relu/Clip is
  left float, so the pattern is DQ -> Conv -> Relu -> Q, which onnxruntime's Relu/Clip-Q fusion
  turns into DQ -> Conv -> Q (one requantization instead of two);
* *pass-through* ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Pad, MaxPool, ...):
  their output reuses the input's scale and zero point, so onnxruntime can drop the Q/DQ around them.

Graph outputs stay float by default; excluded nodes (by name or op type) keep reading the float
tensor. Only the main graph is handled (tensors inside If/Loop/Scan bodies stay float).

*Attention graphs* (a MatMul / Einsum of two computed operands, i.e. attention scores) are
placed differently: static 8-bit ranges on the additive attention mask (which holds -inf or
-1e4), on Softmax inputs and outputs, on normalisation internals and on residual sums destroy such
models (MiniLM-L6 lost 9.7 Spearman points with every activation quantized, DESIGN.md). There only
the activation input of each MatMul / Gemm / Conv whose weight is 8-bit (a DequantizeLinear of an
INT8/UINT8 tensor without blocks, which onnxruntime fuses into an integer kernel) is quantized;
weights of 4 bits or less keep float inputs (they never fuse); everything else stays float
(``ActivationPlan.mode`` is "attention" and every other tensor is listed as kept float with that
reason).

``insert_activation_qdq`` mutates the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_mixquant.config import ActivationConfig, WeightOverride
from onnx_mixquant.numerics import QParams, choose_qparams
from onnx_mixquant.toolkit import node_names

__all__ = [
    "ActivationPlan",
    "ActivationSite",
    "activation_qparams",
    "insert_activation_qdq",
    "plan_activations",
]

logger = logging.getLogger(__name__)

#: Ops whose float activation inputs and outputs are quantized, with the input indices that carry
#: activations (None: every input).
COMPUTE_OPS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,),
    "ConvTranspose": (0,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Add": None,
    "Mul": None,
    "Concat": None,
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "Sigmoid": (0,),
}
#: Ops whose outputs are quantized (their inputs are the outputs of compute ops).
ACTIVATION_OPS = frozenset({"Relu", "Clip"})
#: Ops whose output reuses the quantization parameters of their first input.
PASS_OPS = frozenset(
    {
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Pad",
        "MaxPool",
        "Identity",
        "GlobalMaxPool",
        "DepthToSpace",
        "SpaceToDepth",
        "Resize",
    }
)


@dataclass(frozen=True)
class ActivationSite:
    """One activation tensor that gets QuantizeLinear -> DequantizeLinear.

    Attributes:
        name: the tensor name.
        shared_with: the tensor whose scale / zero point it reuses (outputs of pass-through ops),
            or None when it is calibrated itself.
        readers: names of the nodes that will read the dequantized tensor.
    """

    name: str
    shared_with: str | None
    readers: tuple[str, ...]


@dataclass(frozen=True)
class ActivationPlan:
    """The activation tensors to quantize (topological order) and the ones left float, with why."""

    sites: tuple[ActivationSite, ...]
    skipped: tuple[tuple[str, str], ...]
    #: "default" (the QDQ convention above) or "attention" (weight-op inputs only, see above).
    mode: str = "default"

    def calibrated(self) -> tuple[str, ...]:
        """Names whose ranges calibration must measure."""
        return tuple(s.name for s in self.sites if s.shared_with is None)


def _excluded(node: ir.Node, name: str, cfg: ActivationConfig) -> bool:
    if node.op_type in cfg.exclude_op_types:
        return True
    return any(WeightOverride(p, None).matches((name,)) for p in cfg.exclude_nodes)


def _constant_values(graph: ir.Graph) -> set[int]:
    """ids of values computable from initializers and Constant nodes alone."""
    const = {id(v) for v in graph.initializers.values()}
    for node in graph:
        ins = [v for v in node.inputs if v is not None]
        if node.op_type in ("Constant", "ConstantOfShape") or (ins and all(id(v) in const for v in ins)):
            const.update(id(v) for v in node.outputs)
    return const


def _is_float(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT


def _candidates(
    graph: ir.Graph, const: set[int], cfg: ActivationConfig, names: Mapping[ir.Node, str]
) -> dict[int, ir.Value]:
    """Inputs and outputs of compute ops and outputs of activation ops, by value id."""
    wanted: dict[int, ir.Value] = {}
    for node in graph:
        if _excluded(node, names[node], cfg) or _float_weight_op(node, const, cfg.keep_outputs_float):
            continue
        op = node.op_type
        if op in COMPUTE_OPS:
            idx = COMPUTE_OPS[op]
            for i, v in enumerate(node.inputs):
                if v is not None and (idx is None or i in idx) and id(v) not in const and _is_float(v):
                    wanted[id(v)] = v
        if op in COMPUTE_OPS or op in ACTIVATION_OPS:
            for v in node.outputs:
                if _is_float(v) and not _only_read_by_activation(v):
                    wanted[id(v)] = v
    return wanted


def _only_read_by_activation(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all(u[0].op_type in ACTIVATION_OPS for u in uses) and not value.is_graph_output()


#: Ops whose activation input is quantized in attention graphs (when their weight is constant).
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
#: The reason recorded for tensors an attention graph keeps float.
ATTENTION_REASON = "attention graph: only inputs of weight MatMul/Gemm/Conv are quantized"


def has_attention(graph: ir.Graph, const: set[int] | None = None) -> bool:
    """True when a MatMul / Einsum multiplies two computed (non-constant) tensors."""
    const = _constant_values(graph) if const is None else const
    for node in graph:
        if node.op_type in ("MatMul", "Einsum"):
            ins = [v for v in node.inputs if v is not None]
            if len(ins) >= 2 and all(id(v) not in const for v in ins):
                return True
    return False


_EIGHT_BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def _fusable(node: ir.Node, const: set[int]) -> bool:
    """True when the node's constant weight comes from a DequantizeLinear of an 8-bit integer
    tensor without blocks: the form onnxruntime fuses with activation Q/DQ into an integer kernel
    (QLinearMatMul / QLinearConv). A 4-bit or block-wise weight never fuses: activation Q/DQ in
    front of it only adds rounding noise (MiniLM-L6 W4A8: cosine 0.85 against 0.97 weight-only)."""
    weight = next((v for v in node.inputs[:2] if v is not None and id(v) in const), None)
    producer = weight.producer() if weight is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or not producer.inputs:
        return False
    q = producer.inputs[0]
    return q is not None and _stored_dtype(q) in _EIGHT_BIT and "block_size" not in producer.attributes


def _stored_dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of a stored tensor: the value's own, else the tensor of the Constant node
    that makes it (weights of models that store them as Constant nodes, such as the DBNet text
    detector, carry no type on the node's output)."""
    if value.dtype is not None:
        return value.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    producer = value.producer()
    attr = (
        producer.attributes.get("value") if producer is not None and producer.op_type == "Constant" else None
    )
    return attr.as_tensor().dtype if attr is not None else None


def _feeds_output(value: ir.Value) -> bool:
    """True when ``value`` is a graph output or reaches one through pass-through ops only."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_output():
            return True
        stack.extend(o for node, _ in v.uses() if node.op_type in PASS_OPS for o in node.outputs[:1])
    return False


def _float_weight_op(node: ir.Node, const: set[int], outputs_float: bool = True) -> bool:
    """True for a weight op that runs in float whatever its activations are, so that Q/DQ on its
    input or output only adds rounding noise: its weight does not fuse (4 bits or less, or
    block-wise, see _fusable), or it is the model's head (its output is a graph output, directly or
    through pass-through ops, and graph outputs stay float). Measured on the ddddocr captcha model (CNN +
    LSTM + Gemm head, exact match, FP32 0.420): 8-bit weights 0.413 with the head's input quantized,
    0.420 without; 4-bit weights 0.370 with Q/DQ in front of 4-bit Convs, weight-only 0.433."""
    if node.op_type not in WEIGHT_OPS:
        return False
    ins = [v for v in node.inputs[:2] if v is not None]
    if len(ins) < 2 or not any(id(v) in const for v in ins):
        return False
    if not _fusable(node, const):
        return True
    return outputs_float and any(_feeds_output(v) for v in node.outputs)


def _weight_op_inputs(
    graph: ir.Graph, const: set[int], cfg: ActivationConfig, names: Mapping[ir.Node, str]
) -> dict[int, ir.Value]:
    """Float activation inputs of MatMul/Gemm/Conv nodes whose weight is 8-bit (see _fusable)."""
    wanted: dict[int, ir.Value] = {}
    for node in graph:
        if node.op_type not in WEIGHT_OPS or _excluded(node, names[node], cfg) or not _fusable(node, const):
            continue
        ins = list(node.inputs[:2])
        if len(ins) < 2 or ins[0] is None or ins[1] is None:
            continue
        if node.op_type in ("MatMul", "Gemm"):
            computed = [v for v in ins if id(v) not in const]
            v = computed[0] if len(computed) == 1 else None
        else:  # Conv / ConvTranspose: X computed, W constant
            v = ins[0] if id(ins[1]) in const and id(ins[0]) not in const else None
        if v is not None and _is_float(v):
            wanted[id(v)] = v
    return wanted


def plan_activations(model: ir.Model, cfg: ActivationConfig) -> ActivationPlan:
    """Choose the activation tensors of the main graph to quantize (see the module docstring)."""
    graph = model.graph
    names = node_names(model)
    const = _constant_values(graph)
    if has_attention(graph, const):
        return _attention_plan(graph, const, cfg, names)
    wanted = _candidates(graph, const, cfg, names)
    shared: dict[int, str] = {}
    for node in graph:  # propagate parameters through pass-through ops, in topological order
        if node.op_type in PASS_OPS and node.inputs and node.inputs[0] is not None:
            src = node.inputs[0]
            if (id(src) in wanted or id(src) in shared) and not _excluded(node, names[node], cfg):
                root = shared.get(id(src), src.name)
                for v in node.outputs[:1]:
                    if _is_float(v):
                        shared[id(v)] = root or ""
                        wanted.setdefault(id(v), v)
    sites, skipped = [], []
    order = [v for v in graph.inputs] + [v for n in graph for v in n.outputs]
    for v in order:
        if id(v) not in wanted:
            continue
        if v.is_graph_output() and cfg.keep_outputs_float:
            skipped.append((v.name or "", "graph output kept float"))
            continue
        readers = tuple(
            names[u[0]]
            for u in v.uses()
            if u[0].graph is graph
            and not _excluded(u[0], names[u[0]], cfg)
            and not _float_weight_op(u[0], const, cfg.keep_outputs_float)
        )
        if not readers and not v.is_graph_output():
            skipped.append((v.name or "", "read only by excluded nodes or float weight ops"))
            continue
        sites.append(ActivationSite(name=v.name or "", shared_with=shared.get(id(v)), readers=readers))
    logger.info(
        "activation plan: %d tensors quantized (%d share parameters), %d left float",
        len(sites),
        sum(s.shared_with is not None for s in sites),
        len(skipped),
    )
    return ActivationPlan(sites=tuple(sites), skipped=tuple(skipped))


def _attention_plan(
    graph: ir.Graph, const: set[int], cfg: ActivationConfig, names: Mapping[ir.Node, str]
) -> ActivationPlan:
    wanted = _weight_op_inputs(graph, const, cfg, names)
    others = _candidates(graph, const, cfg, names)
    sites = []
    for v in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
        if id(v) not in wanted:
            continue
        readers = tuple(
            names[node]
            for node, _ in v.uses()
            if node.graph is graph
            and node.op_type in WEIGHT_OPS
            and not _excluded(node, names[node], cfg)
            and _fusable(node, const)
        )
        sites.append(ActivationSite(name=v.name or "", shared_with=None, readers=readers))
    skipped = tuple((v.name or "", ATTENTION_REASON) for k, v in others.items() if k not in wanted)
    logger.info("activation plan (attention graph): %d weight-op inputs quantized", len(sites))
    return ActivationPlan(sites=tuple(sites), skipped=skipped, mode="attention")


def activation_qparams(rmin: float, rmax: float, symmetric: bool) -> QParams:
    """8-bit per-tensor parameters for the range [rmin, rmax] (zero always representable)."""
    return choose_qparams(np.array([rmin, rmax], dtype=np.float32), 8, symmetric=symmetric, axis=None)


def insert_activation_qdq(model: ir.Model, plan: ActivationPlan, params: Mapping[str, QParams]) -> int:
    """Insert Q -> DQ after every planned tensor; returns the number of pairs inserted.

    Args:
        model: the model (mutated).
        plan: from :func:`plan_activations` on this model.
        params: tensor name -> 8-bit parameters for every ``plan.calibrated()`` tensor.
    """
    graph = model.graph
    names = node_names(model)
    values = {v.name: v for v in [*graph.inputs, *(o for n in graph for o in n.outputs)]}
    consts: dict[str, tuple[ir.Value, ir.Value]] = {}
    for site in plan.sites:
        root = site.shared_with or site.name
        if root not in consts:
            consts[root] = _register_params(graph, root, params[root])
        _insert_pair(graph, values[site.name], consts[root], set(site.readers), names)
    return len(plan.sites)


def _register_params(graph: ir.Graph, name: str, qp: QParams) -> tuple[ir.Value, ir.Value]:
    dtype = ir.DataType.INT8 if qp.signed else ir.DataType.UINT8
    np_dtype = np.int8 if qp.signed else np.uint8
    scale = ir.Value(
        name=f"{name}_act_scale",
        const_value=ir.tensor(np.asarray(qp.scale, dtype=np.float32), name=f"{name}_act_scale"),
    )
    zp = ir.Value(
        name=f"{name}_act_zero_point",
        const_value=ir.tensor(
            np.asarray(qp.zero_point).astype(np_dtype), dtype=dtype, name=f"{name}_act_zero_point"
        ),
    )
    for v in (scale, zp):
        assert v.const_value is not None
        v.type = ir.TensorType(v.const_value.dtype)
        v.shape = ir.Shape([])
        graph.register_initializer(v)
    return scale, zp


def _insert_pair(
    graph: ir.Graph,
    value: ir.Value,
    qparams: tuple[ir.Value, ir.Value],
    readers: set[str],
    names: Mapping[ir.Node, str],
) -> None:
    """value -> Q -> DQ; the planned readers (not the others) switch to the DQ output."""
    scale, zp = qparams
    name = value.name
    q = ir.node("QuantizeLinear", [value, scale, zp], name=f"{name}_QuantizeLinear")
    q.outputs[0].name = f"{name}_quantized"
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{name}_DequantizeLinear")
    out = dq.outputs[0]
    out.name = f"{name}_dequantized"
    out.type = value.type
    out.shape = value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    elif len(graph) > 0:
        graph.insert_before(next(iter(graph)), [q, dq])
    else:
        graph.extend([q, dq])
    for node, index in list(value.uses()):
        if node is not q and names.get(node) in readers:
            node.replace_input_with(index, out)
    if value.is_graph_output():  # only planned when outputs are quantized too: keep the name
        graph.outputs[graph.outputs.index(value)] = out
        value.name, out.name = f"{name}_float", name


def quantize_gemm_biases(model: ir.Model) -> int:
    """Give each Gemm with quantized A and B an int32 bias (scale = scale_A x scale_B, zero point 0).

    onnxruntime fuses DQ -> Gemm into QGemm only when a bias, if any, comes from an int32
    DequantizeLinear (as its own quantizer writes it). The rounding error of a 32-bit bias is far
    below that of the 8-bit activations. Returns the number of biases quantized.
    """
    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        a, b, c = node.inputs[0], node.inputs[1], node.inputs[2]
        scales = _gemm_scales(a, b, node)
        if scales is None or c is None or not c.is_initializer() or c.const_value is None:
            continue
        bias = c.const_value.numpy()
        if bias.ndim != 1 or len(c.uses()) != 1 or bias.dtype != np.float32:
            continue
        scale = (scales[0] * scales[1]).astype(np.float32) * np.ones(bias.shape, np.float32)
        if not np.all(scale > 0):
            continue
        q = np.clip(np.rint(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        inputs = []
        for suffix, arr in (("quantized", q), ("scale", scale), ("zero_point", np.zeros_like(q))):
            t = ir.tensor(arr, name=f"{c.name}_{suffix}")
            v = ir.Value(
                name=t.name, const_value=t, type=ir.TensorType(t.dtype), shape=ir.Shape(list(arr.shape))
            )
            graph.register_initializer(v)
            inputs.append(v)
        dq = ir.node("DequantizeLinear", inputs, {"axis": 0}, name=f"{c.name}_DequantizeLinear")
        dq.outputs[0].name = f"{c.name}_dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = c.type, c.shape
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        graph.initializers.pop(c.name or "")
        done += 1
    return done


def _gemm_scales(
    a: ir.Value | None, b: ir.Value | None, node: ir.Node
) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale of A, per-output-column scale of B) when both come from DequantizeLinear, else None."""
    if a is None or b is None:
        return None
    pa, pb = a.producer(), b.producer()
    if pa is None or pb is None or pa.op_type != "DequantizeLinear" or pb.op_type != "DequantizeLinear":
        return None
    sa, sb = pa.inputs[1], pb.inputs[1]
    if sa is None or sb is None or sa.const_value is None or sb.const_value is None:
        return None
    a_scale, b_scale = sa.const_value.numpy(), sb.const_value.numpy()
    if a_scale.size != 1 or (node.attributes.get_int("transA") or 0):
        return None
    if b_scale.size > 1:  # per-channel weights: the axis must be Gemm's output axis
        axis = pb.attributes.get_int("axis", 1)
        if axis != (0 if node.attributes.get_int("transB", 0) else 1):
            return None
    return a_scale.reshape(()), b_scale.reshape(-1)
