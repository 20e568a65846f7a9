"""AdaRound on one reconstruction unit: its training graph (ONNX), the gradient graph (onnx-ad), ORT.

The training graph of a unit (BRECQ, Li et al. 2021, with AdaRound's rounding, Nagel et al. 2020)::

    inputs  x [batch_shape], y [output_shape], V_w (one per weight w, w's shape), beta, lam (scalars),
            f [output_shape] (fisher=True), s_t (one per quantized activation t, its scale's shape)
    h(V)  = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)
    W~    = (clip(floor(w / s) + h(V) + z, qmin, qmax) - z) s     floor(w / s), s, z: constants
    out   = the unit's own nodes on x, each weight w read as W~
    rec   = mean over every axis but 1 of the sum over axis 1 of (out - y)^2   [f (out - y)^2]
    reg   = sum over w of sum(1 - |2 h(V) - 1|^beta)
    loss  = rec + lam reg                                          outputs: loss, rec_loss, reg

``rec`` is BRECQ's ``lp_loss(p=2, reduction="none")``, ``(pred - tgt).abs().pow(2).sum(1).mean()``
(and ``fisher_diag``, ``(... * grad.pow(2)).sum(1).mean()``): a sum over channels and a mean over
the batch *and* the spatial positions; for an ``(N, F)`` output, the batch mean of per-sample sums.

The gradient graph is ``onnx_ad.reverse(training, inputs=[V..., s_t...], outputs=["loss"])`` (seed
``adj_loss = 1``), built with :func:`._dwconv.grouped_conv_rule` so depthwise weights get gradients.

Activations (``act_quant``) are fake-quantized with a learnable step ``s`` (LSQ, Esser et al. 2020)
and the straight-through estimator, ``c = clip(t / s, qmin - z, qmax - z)``,
``t' = s (c + stop(round(c) - c))``, which equals ``s round(c)``, the QDQ value, bit for bit. onnx-ad
0.3.0 has no stop-gradient op, but ``Round`` has a zero derivative in its rule table, so
``stop(c) = Round(c 2^k) 2^-k``: for ``k = 149`` in float64, every float32 ``c`` times ``2^k`` is an
integer (2^-149 is float32's smallest subnormal), so the value is exactly ``c`` and carries no
gradient (float64 graphs, for tests: ``k = 960``, exact for ``|c| >= 2^-908``). Then
``dt'/dt = 1`` inside the range, 0 outside, and ``dt'/ds = round(c) - t/s`` inside, ``c`` outside.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ad
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
from onnx_ad import lower, rules

from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.graph import default_opset, node_names
from onnx_mixquant.numerics import QParams, dequantize
from onnx_mixquant.reconstruct._dwconv import grouped_conv_rule
from onnx_mixquant.reconstruct.blocks import Unit
from onnx_mixquant.validate import available_providers

__all__ = [
    "GAMMA",
    "ZETA",
    "UnitProgram",
    "UnitWeight",
    "differentiable",
    "hard_quantize",
    "init_v",
    "rectified_sigmoid",
]

logger = logging.getLogger(__name__)

#: AdaRound's stretch of the sigmoid: h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1).
ZETA, GAMMA = 1.1, -0.1
#: ORT level for both sessions: ENABLE_ALL matched DISABLE_ALL to 1e-5 on every test unit.
_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: Oldest opset of a training graph: Round (the STE) and Clip with tensor bounds need 11.
_MIN_OPSET = 11
#: stop(c) = Round(c * 2^k) * 2^-k is exactly c: float32 via float64 (k = 149), float64 (k = 960).
_STOP_EXPONENT = {np.dtype(np.float32): 149, np.dtype(np.float64): 960}


@dataclass(frozen=True)
class UnitWeight:
    """One quantized weight inside a unit.

    Attributes:
        name: weight-site (initializer or Constant output) name in the FP model.
        w: float32 weights.
        qparams: fixed scale, zero point, axis, bits and signedness from the base quantizer.
    """

    name: str
    w: np.ndarray
    qparams: QParams


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    """h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1) as float32 (sigmoid via tanh: no overflow)."""
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(v, dtype=np.float64)))
    return np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0.0, 1.0).astype(np.float32)


def init_v(w: np.ndarray, qp: QParams) -> np.ndarray:
    """V with h(V) = frac(w / s) (AdaRound's start: W~ = w up to clipping), float32, w's shape.

    ``V = -log((ZETA - GAMMA) / (frac - GAMMA) - 1)``, the rectified sigmoid's inverse on [0, 1).
    """
    scaled = _scaled(np.asarray(w, dtype=np.float32), qp)
    frac = (scaled - np.floor(scaled)).astype(np.float64)
    return (-np.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)).astype(np.float32)


def hard_quantize(w: np.ndarray, qp: QParams, v: np.ndarray) -> np.ndarray:
    """q = clip(floor(w / s) + [V >= 0] + z, qmin, qmax) as int32; ``w / s`` and floor in float32.

    With ``v = init_v(w, qp)`` this is round-half-up of ``w / s`` (``V >= 0`` iff frac >= 0.5).
    """
    w = np.asarray(w, dtype=np.float32)
    floor = np.floor(_scaled(w, qp))
    _, z = _params(qp, w.ndim)
    q = np.clip(floor + (np.asarray(v) >= 0) + z, qp.qmin, qp.qmax)
    return q.astype(np.int32)


def _soft_weight(w: np.ndarray, qp: QParams, v: np.ndarray) -> np.ndarray:
    """W~ = (clip(floor(w / s) + h(V) + z, qmin, qmax) - z) s in float32 (the graph's formula)."""
    w = np.asarray(w, dtype=np.float32)
    s, z = _params(qp, w.ndim)
    q = np.clip(np.floor(_scaled(w, qp)) + rectified_sigmoid(v) + z, qp.qmin, qp.qmax)
    return ((q - z) * s).astype(np.float32)


def _params(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as float32 arrays broadcasting along ``qp.axis`` of a rank-``ndim`` array."""
    dims = [1] * ndim
    if qp.axis is not None:
        dims[qp.axis] = -1
    s = np.asarray(qp.scale, dtype=np.float32).reshape(dims if qp.axis is not None else ())
    return s, np.asarray(qp.zero_point, dtype=np.float32).reshape(s.shape)


def _scaled(w: np.ndarray, qp: QParams) -> np.ndarray:
    return np.asarray(w / _params(qp, w.ndim)[0], dtype=np.float32)


@functools.cache
def differentiable(op_type: str) -> bool:
    """Whether onnx-ad 0.3.0 carries a gradient through a default-domain ``op_type``.

    True for ops with a reverse rule (a grouped Conv included: :mod:`._dwconv` adds the weight
    gradient), ops onnx-ad lowers (LRN, ...), ``Constant``, and ops whose ONNX function body uses
    only such ops (onnx-ad expands those). False for anything else, e.g. ``NonMaxSuppression``'s
    neighbours with no rule, or an unknown op.
    """
    if op_type == "Constant" or op_type in rules.REVERSE or op_type in lower.LOWERINGS:
        return True
    try:
        schema = onnx.defs.get_schema(op_type)
    except onnx.defs.SchemaError:
        return False
    if not schema.has_function:
        return False
    return all(differentiable(node.op_type) for node in schema.function_body.node)


class _Graph:
    """Inputs, nodes and initializers of one ONNX graph under construction, uniquely named."""

    def __init__(self, model: ir.Model, dtype: np.dtype) -> None:
        self.model, self.dtype = model, dtype
        self.opset = default_opset(model)
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
        """An initializer; a Python scalar gets the graph's float type unless ``dtype`` says otherwise."""
        array = np.asarray(array, dtype=dtype or (self.dtype if isinstance(array, float) else None))
        name = self.name(stem)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.type, value.shape = ir.TensorType(value.const_value.dtype), ir.Shape(array.shape)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, *inputs: ir.Value, stem: str = "", **attrs: object) -> ir.Value:
        node = ir.node(op_type, list(inputs), attrs or None)  # type: ignore[arg-type]
        node.outputs[0].name = self.name(stem or f"mq_{op_type.lower()}")
        self.nodes.append(node)
        return node.outputs[0]

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int] | None, stem: str = "") -> ir.Value:
        """ReduceSum / ReduceMean to a lower rank (all axes when None), in the model's opset spelling."""
        if axes is None:
            return self.op(op_type, x, keepdims=0, stem=stem)
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            axes_value = self.const(np.asarray(axes, dtype=np.int64), "axes")
            return self.op(op_type, x, axes_value, keepdims=0, stem=stem)
        return self.op(op_type, x, axes=list(axes), keepdims=0, stem=stem)

    def build(self, outputs: Sequence[ir.Value]) -> ir.Model:
        """The model, shape-inferred (strict; onnx-ad's reverse mode needs every shape)."""
        graph = ir.Graph(
            self.inputs, outputs, nodes=self.nodes, initializers=self.initializers,
            opset_imports=dict(self.model.opset_imports), name="adaround",
        )  # fmt: skip
        model = ir.Model(graph, ir_version=self.model.ir_version)
        onnx_ir.passes.common.ShapeInferencePass(strict_mode=True, data_prop=True)(model)
        return model


class _Copier:
    """Copies a unit's nodes (and the constant expressions they read) into a :class:`_Graph`."""

    def __init__(self, g: _Graph, unit: Unit, weights: Mapping[str, ir.Value]) -> None:
        self.g, self.unit = g, unit
        self.values: dict[str, ir.Value] = dict(weights)
        by_name = {name: node for node, name in node_names(g.model).items()}
        missing = [name for name in unit.nodes if name not in by_name]
        if missing:
            raise UnsupportedModelError(f"unit {unit.name!r}: no node named {missing[0]!r} in the model")
        self.nodes = [by_name[name] for name in unit.nodes]
        self._unit = set(self.nodes)

    def run(self, x: ir.Value, act: Mapping[str, tuple[ir.Value, QParams]], ste: bool) -> ir.Value:
        """Emit the unit on ``x``; tensors named in ``act`` are fake-quantized; returns its output."""
        self.values[self.unit.input] = x
        for node in [None, *self.nodes]:
            for name in [self.unit.input] if node is None else [v.name for v in self._copy(node)]:
                if name in act:
                    self.values[name] = _fake_quant(self.g, self.values[name], *act[name], ste)
        if self.unit.output not in self.values:
            raise UnsupportedModelError(f"unit {self.unit.name!r}: output {self.unit.output!r} not computed")
        return self.values[self.unit.output]

    def _copy(self, node: ir.Node) -> Sequence[ir.Value]:
        if node.graph is not self.g.model.graph:
            raise UnsupportedModelError(f"unit {self.unit.name!r}: node {node.name!r} is not in the main graph")
        attrs = []
        for attr in node.attributes.values():
            if not isinstance(attr, ir.Attr) or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise UnsupportedModelError(f"unit {self.unit.name!r}: node {node.name!r} holds a subgraph")
            attrs.append(self._attr(attr))
        inputs = [None if v is None else self._value(v, node) for v in node.inputs]
        outputs = [ir.Value(name=v.name) for v in node.outputs]
        self.g.nodes.append(
            ir.Node(node.domain, node.op_type, inputs, attrs, outputs=outputs, name=node.name, version=node.version)
        )
        self.values.update((v.name, v) for v in outputs if v.name)
        return outputs

    def _attr(self, attr: ir.Attr) -> ir.Attr:
        tensor = attr.value if attr.type == ir.AttributeType.TENSOR else None
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT and self.g.dtype != np.float32:
            return ir.Attr(attr.name, attr.type, ir.tensor(tensor.numpy().astype(self.g.dtype)))
        return ir.Attr(attr.name, attr.type, attr.value)

    def _value(self, v: ir.Value, reader: ir.Node) -> ir.Value:
        """The copy of a value a node reads: computed here, or a constant (expression) of the model."""
        if v.name in self.values:
            return self.values[v.name]
        if v.const_value is not None and not v.is_graph_input():
            array = v.const_value.numpy()
            if array.dtype == np.float32:
                array = array.astype(self.g.dtype)
            self.values[v.name] = copy = self.g.const(array, v.name or "c")
            return copy
        producer = v.producer()
        if producer is None or producer in self._unit or not _is_constant(producer):
            raise UnsupportedModelError(
                f"unit {self.unit.name!r}: node {reader.name!r} reads {v.name!r}, which is neither computed"
                " before it in the unit, its input, a weight nor a constant expression"
            )
        self._copy(producer)
        return self.values[v.name]


def _is_constant(node: ir.Node) -> bool:
    """Whether ``node`` depends on stored tensors only (a Constant, or ops over constants)."""
    for v in node.inputs:
        if v is None or (v.const_value is not None and not v.is_graph_input()):
            continue
        producer = v.producer()
        if producer is None or not _is_constant(producer):
            return False
    return True


def _soft_weight_nodes(g: _Graph, w: UnitWeight, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """h(V) and W~ = (clip(floor(w/s) + h(V) + z, qmin, qmax) - z) s; the constants are per weight."""
    s, z = _params(w.qparams, w.w.ndim)
    floor = np.floor(_scaled(np.asarray(w.w, dtype=np.float32), w.qparams))
    sig = g.op("Sigmoid", v)
    h = g.op("Add", g.op("Mul", sig, g.const(ZETA - GAMMA)), g.const(GAMMA))
    h = g.op("Clip", h, g.const(0.0), g.const(1.0), stem=f"h:{w.name}")
    z_value = g.const(z.astype(g.dtype), "z")
    q = g.op("Add", g.op("Add", g.const(floor.astype(g.dtype), "floor"), h), z_value)
    q = g.op("Clip", q, g.const(float(w.qparams.qmin)), g.const(float(w.qparams.qmax)))
    return h, g.op("Mul", g.op("Sub", q, z_value), g.const(s.astype(g.dtype), "s"), stem=f"soft:{w.name}")


def _fake_quant(g: _Graph, t: ir.Value, s: ir.Value, qp: QParams, ste: bool) -> ir.Value:
    """t' = s round(clip(t / s, qmin - z, qmax - z)); with ``ste``, round's gradient is 1 (module doc)."""
    z = float(np.asarray(qp.zero_point))
    c = g.op("Clip", g.op("Div", t, s), g.const(qp.qmin - z), g.const(qp.qmax - z))
    rounded = g.op("Round", c)
    if ste:
        k = _STOP_EXPONENT[g.dtype]
        wide = g.op("Cast", c, to=ir.DataType.DOUBLE.value) if g.dtype == np.float32 else c
        exact = g.op("Round", g.op("Mul", wide, g.const(2.0**k, dtype=np.float64)))
        stop = g.op("Mul", exact, g.const(2.0**-k, dtype=np.float64))
        stop = g.op("Cast", stop, to=ir.DataType.FLOAT.value) if g.dtype == np.float32 else stop
        rounded = g.op("Add", c, g.op("Sub", rounded, stop))
    return g.op("Mul", rounded, s, stem=f"{t.name}_fq")


def _rec_loss(g: _Graph, out: ir.Value, y: ir.Value, f: ir.Value | None) -> ir.Value:
    """BRECQ's lp_loss(p=2): mean over every axis but 1 of the sum over axis 1 of [f] (out - y)^2."""
    diff = g.op("Sub", out, y)
    square = g.op("Mul", diff, diff)
    if f is not None:
        square = g.op("Mul", f, square)
    rank = len(out.shape or ())
    per_position = g.reduce("ReduceSum", square, [1]) if rank >= 2 else square
    return g.reduce("ReduceMean", per_position, None, stem="rec_loss")


def _regulariser(g: _Graph, hs: Sequence[ir.Value], beta: ir.Value) -> ir.Value:
    """reg = sum over weights of sum(1 - |2 h(V) - 1|^beta), written as BRECQ's (|h - .5| 2)^beta."""
    terms = []
    for h in hs:
        base = g.op("Mul", g.op("Abs", g.op("Sub", h, g.const(0.5))), g.const(2.0))
        terms.append(g.reduce("ReduceSum", g.op("Sub", g.const(1.0), g.op("Pow", base, beta)), None))
    return g.op("Sum", *terms, stem="reg") if terms else g.op("Identity", g.const(0.0), stem="reg")


@dataclass(frozen=True)
class _Models:
    """The three models of a unit. Inputs of ``training``: x, y, V..., beta, lam, [f], s...;
    ``gradient`` adds the seed ``adj_loss`` and outputs loss, rec_loss, reg, then dV..., ds...;
    ``forward``: x, W..., s... -> out."""

    training: onnx.ModelProto
    gradient: onnx.ModelProto
    forward: onnx.ModelProto
    output_shape: tuple[int, ...]


def _build(
    fp_model: ir.Model,
    unit: Unit,
    weights: Sequence[UnitWeight],
    batch_shape: tuple[int, ...],
    *,
    fisher: bool,
    act_quant: Mapping[str, QParams],
    dtype: np.dtype,
) -> _Models:
    """Build the forward, training and gradient models of ``unit`` (float32, or float64 for tests)."""
    if default_opset(fp_model) < _MIN_OPSET:
        raise UnsupportedModelError(f"opset {default_opset(fp_model)} < {_MIN_OPSET}: convert the model first")
    _check_acts(fp_model, unit, act_quant)
    fwd = _Graph(fp_model, dtype)
    x = fwd.input(unit.input, batch_shape, exact=True)
    wv = {w.name: fwd.input(f"W:{w.name}", w.w.shape) for w in weights}
    steps = {t: (fwd.input(f"s:{t}", np.shape(qp.scale)), qp) for t, qp in act_quant.items()}
    out = _Copier(fwd, unit, wv).run(x, steps, ste=False)
    unread = [name for name, value in wv.items() if not value.uses()]
    if unread:
        raise ValueError(f"unit {unit.name!r}: no node of the unit reads weight {unread[0]!r}")
    forward = fwd.build([out])
    if out.shape is None or not out.shape.is_static():
        raise UnsupportedModelError(f"unit {unit.name!r}: output shape not inferred ({out.shape})")
    shape = tuple(int(d) for d in out.shape)

    g = _Graph(fp_model, dtype)
    x, y = g.input(unit.input, batch_shape, exact=True), g.input("y", shape)
    vs = [g.input(f"V:{w.name}", w.w.shape) for w in weights]
    beta, lam = g.input("beta", ()), g.input("lam", ())
    f = g.input("f", shape) if fisher else None
    steps = {t: (g.input(f"s:{t}", np.shape(qp.scale)), qp) for t, qp in act_quant.items()}
    soft = [_soft_weight_nodes(g, w, v) for w, v in zip(weights, vs, strict=True)]
    out = _Copier(g, unit, {w.name: s for w, (_, s) in zip(weights, soft, strict=True)}).run(x, steps, True)
    rec, reg = _rec_loss(g, out, y, f), _regulariser(g, [h for h, _ in soft], beta)
    loss = g.op("Add", rec, g.op("Mul", lam, reg), stem="loss")
    training = ir.to_proto(g.build([loss, rec, reg]))
    wrt = [v.name for v in vs] + [s.name for s, _ in steps.values()]
    try:
        with grouped_conv_rule():
            gradient = onnx_ad.reverse(training, inputs=wrt, outputs=[loss.name], layout="onnx")
    except onnx_ad.UnsupportedOperator as e:
        raise UnsupportedModelError(f"unit {unit.name!r}: onnx-ad cannot differentiate it: {e}") from e
    return _Models(training, gradient, ir.to_proto(forward), shape)


def _check_acts(fp_model: ir.Model, unit: Unit, act_quant: Mapping[str, QParams]) -> None:
    names = {name: node for node, name in node_names(fp_model).items()}
    inside = {unit.input} | {v.name for n in unit.nodes if n in names for v in names[n].outputs}
    for name, qp in act_quant.items():
        if name not in inside:
            raise ConfigError(f"act_quant: tensor {name!r} is neither the input of unit {unit.name!r} nor made in it")
        if qp.axis is not None:
            raise ConfigError(f"act_quant: tensor {name!r}: activations are quantized per tensor, got axis={qp.axis}")


class UnitProgram:
    """Forward+backward of one unit for a fixed batch shape, executed by onnxruntime.

    Attributes:
        input_name: the unit's input tensor (the name of ``x`` in every model).
        output_shape: the unit's output shape for ``batch_shape`` (``y`` and ``f``).
        provider: the execution provider the sessions run on.
        optimization: the ORT graph optimisation level of both sessions.
        training_model, gradient_model, forward_model: the ONNX models (``onnx.ModelProto``).
    """

    def __init__(
        self,
        fp_model: ir.Model,
        unit: Unit,
        weights: Sequence[UnitWeight],
        batch_shape: tuple[int, ...],
        *,
        fisher: bool = False,
        act_quant: Mapping[str, QParams] | None = None,
        provider: str | None = None,
        threads: int = 0,
    ) -> None:
        """Build the models and open their sessions.

        Args:
            fp_model: the FP model (not modified); ``unit`` names nodes of its main graph.
            unit: the unit; its nodes in topological order.
            weights: the quantized weights read by its nodes (others stay float).
            batch_shape: static shape of the unit input.
            fisher: weight the squared error by ``f`` (``fisher_w`` of :meth:`step`).
            act_quant: per-tensor QParams of activations to fake-quantize (the unit input or tensors
                its nodes make); their steps are learned (LSQ), zero points stay fixed.
            provider: an onnxruntime provider; default: ``validate.available_providers(True)``.
            threads: onnxruntime intra-op threads (0: its default).

        Raises:
            UnsupportedModelError: the unit cannot be built, shape-inferred or differentiated.
            ConfigError: a bad ``act_quant`` entry.
        """
        self.weights, self.act_quant = tuple(weights), dict(act_quant or {})
        self.input_name, self.batch_shape, self.fisher = unit.input, tuple(batch_shape), fisher
        models = _build(
            fp_model, unit, self.weights, self.batch_shape,
            fisher=fisher, act_quant=self.act_quant, dtype=np.dtype(np.float32),
        )  # fmt: skip
        self.output_shape = models.output_shape
        self.training_model, self.gradient_model = models.training, models.gradient
        self.forward_model = models.forward
        cpu = "CPUExecutionProvider"
        providers = list(available_providers(True)) if provider is None else list(dict.fromkeys([provider, cpu]))
        self._grad = _session(models.gradient, providers, threads)
        self._fwd = _session(models.forward, providers, threads)
        self.provider, self.optimization = self._grad.get_providers()[0], _LEVEL.name
        self._grad_inputs = [v.name for v in models.gradient.graph.input]
        self._fetch = [v.name for v in models.gradient.graph.output][1:]
        logger.debug("unit %r: %d weights, output %s, %s", unit.name, len(self.weights), self.output_shape, self.provider)

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        v: Mapping[str, np.ndarray],
        beta: float,
        lam: float,
        fisher_w: np.ndarray | None = None,
        act_steps: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[float, float, dict[str, np.ndarray]]:
        """One forward+backward pass.

        Args:
            x, y: unit input (``batch_shape``) and FP target (``output_shape``).
            v: V per weight name. beta, lam: regulariser exponent and weight.
            fisher_w: ``f``, of ``output_shape``, required iff built with ``fisher=True``.
            act_steps: step size per quantized activation (default: the act_quant scales).

        Returns:
            (rec_loss, reg, grads): grads maps each weight name to dloss/dV and each quantized
            activation name to dloss/ds, for ``loss = rec_loss + lam * reg``.
        """
        if (fisher_w is None) == self.fisher:
            raise ValueError(f"fisher_w must be given iff the program was built with fisher=True ({self.fisher})")
        feeds = [_array(x, self.batch_shape, "x"), _array(y, self.output_shape, "y")]
        feeds += [_array(_get(v, w.name, "V"), w.w.shape, f"V of {w.name!r}") for w in self.weights]
        feeds += [np.asarray(beta, np.float32), np.asarray(lam, np.float32)]
        feeds += [] if fisher_w is None else [_array(fisher_w, self.output_shape, "fisher_w")]
        feeds += [*self._steps(act_steps), np.ones(1, np.float32)]
        rec, reg, *grads = self._grad.run(self._fetch, dict(zip(self._grad_inputs, feeds, strict=True)))
        keys = [w.name for w in self.weights] + list(self.act_quant)
        return float(rec), float(reg), {k: g[..., 0] for k, g in zip(keys, grads, strict=True)}

    def forward(
        self,
        x: np.ndarray,
        v: Mapping[str, np.ndarray] | None,
        hard: bool = False,
        act_steps: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The unit output with soft weights W~, hard ones (``dequantize(hard_quantize)``), or FP
        weights when ``v`` is None; activations in ``act_quant`` are fake-quantized in every case."""
        feeds = [_array(x, self.batch_shape, "x")]
        for w in self.weights:
            if v is None:
                feeds.append(w.w)
            elif hard:
                feeds.append(dequantize(hard_quantize(w.w, w.qparams, _get(v, w.name, "V")), w.qparams))
            else:
                feeds.append(_soft_weight(w.w, w.qparams, _get(v, w.name, "V")))
        feeds += self._steps(act_steps)
        names = [i.name for i in self._fwd.get_inputs()]
        return np.asarray(self._fwd.run(None, dict(zip(names, feeds, strict=True)))[0])

    def _steps(self, act_steps: Mapping[str, np.ndarray] | None) -> list[np.ndarray]:
        steps = {t: qp.scale for t, qp in self.act_quant.items()} if act_steps is None else act_steps
        return [_array(_get(steps, t, "step"), np.shape(qp.scale), f"step of {t!r}") for t, qp in self.act_quant.items()]


def _get(mapping: Mapping[str, np.ndarray], name: str, what: str) -> np.ndarray:
    if name not in mapping:
        raise ValueError(f"no {what} given for {name!r}")
    return mapping[name]


def _array(a: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    array = np.ascontiguousarray(a, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"{what}: shape {array.shape}, expected {tuple(shape)}")
    return array


def _session(model: onnx.ModelProto, providers: list[str], threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVEL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)
