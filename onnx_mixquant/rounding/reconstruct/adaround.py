"""AdaRound on one reconstruction unit: its training graph (ONNX), the gradient graph (onnx-ad), ORT.

The training graph of a unit (BRECQ, Li et al. 2021, with AdaRound's rounding, Nagel et al. 2020)::

    inputs  x [batch_shape], y [output_shape], V_w (one per weight w, w's shape), beta, lam (scalars),
            f [output_shape] (fisher=True), s_t (one per quantized activation t, a scalar)
    h(V)  = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)
    W~    = (clip(floor(w / s) + h(V) + z, qmin, qmax) - z) s     floor(w / s), s, z: constants
    out   = the unit's own nodes on x, each weight w read as W~
    rec   = mean over every axis but 1 of the sum over axis 1 of (out - y)^2   [f (out - y)^2]
    reg   = sum over w of sum(1 - |2 h(V) - 1|^beta)
    loss  = rec + lam reg                                          outputs: loss, rec_loss, reg

``rec`` is BRECQ's ``lp_loss(p=2, reduction="none")``, ``(pred - tgt).abs().pow(2).sum(1).mean()``,
and ``fisher_diag``, ``(... * grad.pow(2)).sum(1).mean()``: a sum over channels, a mean over the
batch *and* the spatial positions (an ``(N, F)`` output: the batch mean of per-sample sums).

The gradient graph is ``onnx_ad.reverse(training, inputs=[V..., s_t...], outputs=["loss"])``, seeded
with ``adj_loss = 1``, under the Conv rules of :mod:`._dwconv` (depthwise weights get gradients).

Activations (``act_quant``) are fake-quantized with a learnable step ``s`` (LSQ, Esser et al. 2020)
and the straight-through estimator: ``c = clip(t / s, qmin - z, qmax - z)``,
``t' = s (c + stop(round(c) - c))``, which is ``s round(c)``, the QDQ value, bit for bit. onnx-ad
0.3.0 has no stop-gradient op, but ``Round`` has a zero derivative in its rule table, so
``stop(c) = Round(c 2^k) 2^-k``: with ``k = 149`` in float64 every float32 ``c 2^k`` is an integer
(2^-149 is float32's smallest subnormal), so the value is exactly ``c`` and carries no gradient
(float64 graphs, for tests: ``k = 960``, exact for ``|c| >= 2^-908``). Then ``dt'/dt`` is 1 inside
the range and 0 outside, ``dt'/ds`` is ``round(c) - t / s`` inside and ``c`` outside (LSQ).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ad
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort

from onnx_mixquant.errors import ConfigError, UnsupportedModelError
from onnx_mixquant.numerics import QParams, dequantize
from onnx_mixquant.rounding.reconstruct._dwconv import differentiable, reverse
from onnx_mixquant.rounding.reconstruct._unitgraph import Copier, Graph
from onnx_mixquant.rounding.reconstruct.blocks import Unit
from onnx_mixquant.session import compute_providers, with_cuda_options
from onnx_mixquant.toolkit import default_opset

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
#: Level of both sessions: matched ORT_DISABLE_ALL to 1e-6 (relative) on the test units and on
#: ResNet-20 / EfficientNet-Lite0 blocks, and ran up to 10% faster.
_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: Oldest opset of a training graph: Round (the STE) and Clip with tensor bounds need 11.
_MIN_OPSET = 11


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
    """h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1), float32 (sigmoid via tanh: no overflow)."""
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(v, dtype=np.float64)))
    return np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0.0, 1.0).astype(np.float32)


def init_v(w: np.ndarray, qp: QParams) -> np.ndarray:
    """V with h(V) = frac(w / s) (AdaRound's start: W~ = w up to clipping), float32, w's shape.

    ``V = -log((ZETA - GAMMA) / (frac - GAMMA) - 1)``, the rectified sigmoid's inverse on [0, 1).
    Worked example, ``w = 0.37``, ``s = 0.1``, ``z = 0``::

        w / s = 3.7   floor 3   frac 0.7   V = -log(1.2 / 0.8 - 1) = 0.693   h(V) = 0.7
        W~ = (3 + 0.7) 0.1 = 0.37          hard: V >= 0, so q = 3 + 1 = 4
    """
    scaled = _scaled(w, qp)
    frac = (scaled - np.floor(scaled)).astype(np.float64)
    return (-np.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)).astype(np.float32)


def hard_quantize(w: np.ndarray, qp: QParams, v: np.ndarray) -> np.ndarray:
    """q = clip(floor(w / s) + [V >= 0] + z, qmin, qmax) as int32; ``w / s`` and floor in float32.

    With ``v = init_v(w, qp)`` this is round-half-up of ``w / s`` (``V >= 0`` iff frac >= 0.5).
    """
    _, z = _params(qp, np.ndim(w))
    return np.clip(np.floor(_scaled(w, qp)) + (np.asarray(v) >= 0) + z, qp.qmin, qp.qmax).astype(np.int32)


def _soft_weight(w: np.ndarray, qp: QParams, v: np.ndarray) -> np.ndarray:
    """W~ = (clip(floor(w / s) + h(V) + z, qmin, qmax) - z) s in float32 (the graph's formula)."""
    s, z = _params(qp, np.ndim(w))
    q = np.clip(np.floor(_scaled(w, qp)) + rectified_sigmoid(v) + z, qp.qmin, qp.qmax)
    return ((q - z) * s).astype(np.float32)


def _params(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as float32 arrays broadcasting along ``qp.axis`` of a rank-``ndim`` array."""
    dims = [-1 if axis == qp.axis else 1 for axis in range(ndim)] if qp.axis is not None else []
    s = np.asarray(qp.scale, dtype=np.float32).reshape(dims)
    return s, np.asarray(qp.zero_point, dtype=np.float32).reshape(s.shape)


def _scaled(w: np.ndarray, qp: QParams) -> np.ndarray:
    """w / s in float32, as numerics.quantize computes it."""
    return np.asarray(np.asarray(w, dtype=np.float32) / _params(qp, np.ndim(w))[0], dtype=np.float32)


def _soft_weight_nodes(g: Graph, w: UnitWeight, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """h(V) and W~ = (clip(floor(w/s) + h(V) + z, qmin, qmax) - z) s; the constants are per weight."""
    s, z = (
        g.const(a.astype(g.dtype), stem) for a, stem in zip(_params(w.qparams, w.w.ndim), "sz", strict=True)
    )
    floor = g.const(np.floor(_scaled(w.w, w.qparams)).astype(g.dtype), "floor")
    h = g.op("Add", g.op("Mul", g.op("Sigmoid", v), g.const(ZETA - GAMMA)), g.const(GAMMA))
    h = g.op("Clip", h, g.const(0.0), g.const(1.0), stem=f"h:{w.name}")
    q = g.op("Clip", g.op("Add", g.op("Add", floor, h), z), g.const(float(w.qparams.qmin)),
             g.const(float(w.qparams.qmax)))  # fmt: skip
    return h, g.op("Mul", g.op("Sub", q, z), s, stem=f"soft:{w.name}")


def _losses(
    g: Graph, out: ir.Value, y: ir.Value, f: ir.Value | None, hs: Sequence[ir.Value], beta: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """rec = BRECQ's lp_loss(p=2) (mean over every axis but 1 of the sum over axis 1 of [f] (out -
    y)^2) and reg = sum over weights of sum(1 - |2 h(V) - 1|^beta), as BRECQ's (|h - .5| 2)^beta."""
    diff = g.op("Sub", out, y)
    square = g.op("Mul", diff, diff) if f is None else g.op("Mul", f, g.op("Mul", diff, diff))
    rank = len(y.shape or ())  # y is declared; out is not shape-inferred yet
    rec = g.reduce(
        "ReduceMean", g.reduce("ReduceSum", square, [1]) if rank >= 2 else square, None, "rec_loss"
    )
    terms = []
    for h in hs:
        base = g.op("Mul", g.op("Abs", g.op("Sub", h, g.const(0.5))), g.const(2.0))
        terms.append(g.reduce("ReduceSum", g.op("Sub", g.const(1.0), g.op("Pow", base, beta)), None))
    return rec, g.op("Sum", *terms, stem="reg") if terms else g.op("Identity", g.const(0.0), stem="reg")


class _Models(NamedTuple):
    """``training``: (x, y, V..., beta, lam, [f], s...) -> (loss, rec_loss, reg); ``gradient``: the
    same plus the seed ``adj_loss`` -> the same plus dloss/dV..., dloss/ds...; ``forward``: (x,
    W..., s...) -> out."""

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
    """The forward, training and gradient models of ``unit`` (float32, or float64 for tests)."""
    opset = default_opset(fp_model)
    if opset < _MIN_OPSET or unit.extra_inputs:
        raise UnsupportedModelError(
            f"unit {unit.name!r}: needs opset >= {_MIN_OPSET} (has {opset}) and no extra inputs"
            f" ({unit.extra_inputs})"
        )
    if bad := [name for name, qp in act_quant.items() if qp.axis is not None]:
        raise ConfigError(f"act_quant: tensor {bad[0]!r}: activations are quantized per tensor only")
    g = Graph(fp_model, dtype)
    x = g.input(unit.input, batch_shape, exact=True)
    ws = {w.name: g.input(f"W:{w.name}", w.w.shape) for w in weights}
    steps = {t: (g.input(f"s:{t}", np.shape(qp.scale)), qp) for t, qp in act_quant.items()}
    out = Copier(g, unit, ws, batch_shape[0]).run(x, steps, ste=False)
    if unread := [name for name, value in ws.items() if not value.uses()]:
        raise ValueError(f"unit {unit.name!r}: no node of the unit reads weight {unread[0]!r}")
    forward = ir.to_proto(g.build([out]))
    if out.shape is None or not out.shape.is_static():
        raise UnsupportedModelError(f"unit {unit.name!r}: output shape not inferred ({out.shape})")
    shape = tuple(d if isinstance(d, int) else -1 for d in out.shape)
    training, wrt = _training(fp_model, unit, weights, batch_shape, shape, fisher, act_quant, dtype)
    try:
        gradient = reverse(training, wrt, training.graph.output[0].name, seeds=1)
    except onnx_ad.UnsupportedOperator as e:
        raise UnsupportedModelError(f"unit {unit.name!r}: onnx-ad cannot differentiate it: {e}") from e
    return _Models(training, gradient, forward, shape)


def _training(
    fp_model: ir.Model,
    unit: Unit,
    weights: Sequence[UnitWeight],
    batch_shape: tuple[int, ...],
    shape: tuple[int, ...],
    fisher: bool,
    act_quant: Mapping[str, QParams],
    dtype: np.dtype,
) -> tuple[onnx.ModelProto, list[str]]:
    """The training model (module docstring) and the names of the inputs to differentiate."""
    g = Graph(fp_model, dtype)
    x, y = g.input(unit.input, batch_shape, exact=True), g.input("y", shape)
    vs = [g.input(f"V:{w.name}", w.w.shape) for w in weights]
    beta, lam = g.input("beta", ()), g.input("lam", ())
    f = g.input("f", shape) if fisher else None
    steps = {t: (g.input(f"s:{t}", np.shape(qp.scale)), qp) for t, qp in act_quant.items()}
    soft = [_soft_weight_nodes(g, w, v) for w, v in zip(weights, vs, strict=True)]
    soft_values = {w.name: s for w, (_, s) in zip(weights, soft, strict=True)}
    out = Copier(g, unit, soft_values, batch_shape[0]).run(x, steps, ste=True)
    rec, reg = _losses(g, out, y, f, [h for h, _ in soft], beta)
    loss = g.op("Add", rec, g.op("Mul", lam, reg), stem="loss")
    wrt = [v.name or "" for v in vs] + [s.name or "" for s, _ in steps.values()]
    return ir.to_proto(g.build([loss, rec, reg])), wrt


class UnitProgram:
    """Forward+backward of one unit for a fixed batch shape, executed by onnxruntime.

    Attributes:
        input_name: the unit's input tensor (the name of ``x`` in every model).
        output_shape: the unit's output shape for ``batch_shape`` (that of ``y`` and ``f``).
        provider: the execution provider the gradient session runs on.
        optimization: the ORT graph optimisation level of both sessions ("ORT_ENABLE_ALL").
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
            weights: the quantized weights its nodes read (other weights stay float).
            batch_shape: static shape of the unit input.
            fisher: weight the squared error by ``f`` (``fisher_w`` of :meth:`step`).
            act_quant: per-tensor QParams of activations to fake-quantize (the unit input or tensors
                its nodes make); their steps are learned (LSQ), zero points stay fixed.
            provider: an onnxruntime provider; default: ``session.compute_providers()``.
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
        self.training_model, self.gradient_model, self.forward_model, self.output_shape = models
        cpu = "CPUExecutionProvider"
        providers = list(compute_providers() if provider is None else dict.fromkeys([provider, cpu]))
        self._grad = _session(models.gradient, providers, threads)
        self._fwd = _session(models.forward, providers, threads)
        self.provider, self.optimization = self._grad.get_providers()[0], _LEVEL.name
        self._grad_inputs = [v.name for v in models.gradient.graph.input]
        self._fetch = [v.name for v in models.gradient.graph.output][1:]  # all but loss
        logger.debug("unit %r: output %s on %s", unit.name, self.output_shape, self.provider)

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
            fisher_w: ``f`` (``output_shape``), required iff built with ``fisher=True``.
            act_steps: step per quantized activation (default: the ``act_quant`` scales).

        Returns:
            (rec_loss, reg, grads): grads maps each weight name to dloss/dV and each quantized
            activation's name to dloss/ds, for ``loss = rec_loss + lam * reg``.
        """
        if (fisher_w is None) == self.fisher:
            raise ValueError(
                f"fisher_w must be given iff the program was built with fisher=True ({self.fisher})"
            )
        feeds = [_array(x, self.batch_shape, "x"), _array(y, self.output_shape, "y")]
        feeds += [_array(v, w.w.shape, "V", w.name) for w in self.weights]
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
                feeds.append(
                    dequantize(hard_quantize(w.w, w.qparams, _array(v, w.w.shape, "V", w.name)), w.qparams)
                )
            else:
                feeds.append(_soft_weight(w.w, w.qparams, _array(v, w.w.shape, "V", w.name)))
        names = [i.name for i in self._fwd.get_inputs()]
        feeds += self._steps(act_steps)
        return np.asarray(self._fwd.run(None, dict(zip(names, feeds, strict=True)))[0])

    def _steps(self, act_steps: Mapping[str, np.ndarray] | None) -> list[np.ndarray]:
        steps = act_steps if act_steps is not None else {t: qp.scale for t, qp in self.act_quant.items()}
        return [_array(steps, np.shape(qp.scale), "step", t) for t, qp in self.act_quant.items()]


def _array(a: object, shape: Sequence[int], what: str, key: str | None = None) -> np.ndarray:
    """``a`` (or ``a[key]``) as a C-contiguous float32 array of ``shape``; ValueError otherwise."""
    if key is not None:
        if not isinstance(a, Mapping) or key not in a:
            raise ValueError(f"no {what} given for {key!r}")
        a, what = a[key], f"{what} of {key!r}"
    array = np.asarray(a, dtype=np.float32, order="C")
    if array.shape != tuple(shape):
        raise ValueError(f"{what}: shape {array.shape}, expected {tuple(shape)}")
    return array


def _session(model: onnx.ModelProto, providers: list[str], threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVEL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only: CUDA's "nodes placed on CPU" warnings are expected
    chain = with_cuda_options(providers, so)
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=chain)
