"""BRECQ on a tiny pre-LN transformer encoder: attention and MLP sublayers as units.

The model (seeded, float32, every node named after its output)::

    x [N, T, D] -> LayerNormalization -> Q, K, V = MatMul W + b -> 2 heads (Reshape, Transpose)
      -> Softmax(Q K^T / sqrt(D / H)) V -> merge heads -> MatMul Wo + bo -> Add x          = res1
    res1 -> LayerNormalization -> MatMul W1 + b1 -> GELU -> MatMul W2 + b2 -> Add res1       = res2
    res2 -> ReduceMean over tokens -> MatMul Wc + bc                                          = logits [N, 3]

At opset 17 GELU is spelled as torch.onnx exports it below opset 20, ``x * (1 + Erf(x / sqrt(2)))
* 0.5``; the ``Gelu`` op (opset 20) is the other variant. onnx-ad has a rule for every op here.

onnx.reference evaluates ``Erf`` in float32 (``np.vectorize(erf, otypes=["f"])``), and ``Gelu``
through its function body's Erf: a central difference with eps = 1e-6 through them is off by ~1 %,
so the finite-difference evaluators get float64 versions of both (:class:`Erf`, :class:`Gelu`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops._op import OpRunUnaryNum

from onnx_mixquant import QuantConfig, SearchConfig, ValidateConfig, quantize
from onnx_mixquant.config import ReconConfig, RoundingMethod
from onnx_mixquant.numerics import choose_qparams
from onnx_mixquant.read.model import find_weight_sites
from onnx_mixquant.rounding.reconstruct import adaround
from onnx_mixquant.rounding.reconstruct.adaround import UnitWeight, differentiable
from onnx_mixquant.rounding.reconstruct.blocks import Unit, partition

T, D, H, F, C = 6, 8, 2, 16, 3  # tokens, width, heads, MLP width, classes
N = 2  # batch of the finite-difference tests
CPU = "CPUExecutionProvider"

ATTENTION = (
    "ln1",
    *(f"{k}_{step}" for k in "qkv" for step in ("mm", "bias", "heads", "t")),
    *("scores", "scaled", "probs", "ctx", "ctx_t", "ctx_merged", "o_mm", "o_bias", "res1"),
)
GELU = {"erf": ("gelu_div", "gelu_erf", "gelu_add", "gelu_mul", "gelu"), "op": ("gelu",)}


def _mlp(gelu: str) -> tuple[str, ...]:
    return ("ln2", "h_mm", "h_bias", *GELU[gelu], "m_mm", "m_bias", "res2")


CLASSIFIER = ("pooled", "logits_mm", "logits")


class _Encoder:
    """The model under construction: nodes named after their outputs, seeded random weights."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def op(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, value: np.ndarray | float) -> str:
        array = np.asarray(value)
        array = array.astype(np.float32) if array.dtype.kind == "f" else array
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def noise(self, name: str, *shape: int, scale: float = 0.1, mean: float = 0.0) -> str:
        return self.const(name, mean + scale * self.rng.normal(size=shape))

    def linear(self, x: str, w: str, cin: int, cout: int, stem: str, out: str = "") -> str:
        """x @ w + b (nodes stem_mm, out or stem_bias), w ~ N(0, 1 / cin)."""
        self.noise(w, cin, cout, scale=cin**-0.5)
        mm = self.op("MatMul", [x, w], f"{stem}_mm")
        return self.op("Add", [mm, self.noise(f"b_{stem}", cout)], out or f"{stem}_bias")

    def layer_norm(self, x: str, out: str) -> str:
        gamma, beta = self.noise(f"{out}_g", D, mean=1.0), self.noise(f"{out}_b", D)
        return self.op("LayerNormalization", [x, gamma, beta], out, axis=-1, epsilon=1e-5)


def _attention(net: _Encoder, x: str) -> str:
    ln = net.layer_norm(x, "ln1")
    heads = net.const("heads_shape", np.array([0, T, H, D // H], np.int64))
    qkv = {}
    for k in "qkv":
        split = net.op("Reshape", [net.linear(ln, f"W{k}", D, D, k), heads], f"{k}_heads")
        qkv[k] = net.op("Transpose", [split], f"{k}_t", perm=[0, 2, 3, 1] if k == "k" else [0, 2, 1, 3])
    scores = net.op("MatMul", [qkv["q"], qkv["k"]], "scores")  # [N, H, T, T]
    scaled = net.op("Div", [scores, net.const("sqrt_dh", math.sqrt(D // H))], "scaled")
    ctx = net.op("MatMul", [net.op("Softmax", [scaled], "probs", axis=-1), qkv["v"]], "ctx")
    merged = net.op("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3])
    merged = net.op(
        "Reshape", [merged, net.const("width_shape", np.array([0, T, D], np.int64))], "ctx_merged"
    )
    return net.op("Add", [net.linear(merged, "Wo", D, D, "o"), x], "res1")


def _feed_forward(net: _Encoder, x: str, gelu: str) -> str:
    h = net.linear(net.layer_norm(x, "ln2"), "W1", D, F, "h")
    if gelu == "op":
        act = net.op("Gelu", [h], "gelu")
    else:
        erf = net.op("Erf", [net.op("Div", [h, net.const("sqrt2", math.sqrt(2.0))], "gelu_div")], "gelu_erf")
        one_plus = net.op("Add", [erf, net.const("one", 1.0)], "gelu_add")
        act = net.op("Mul", [net.op("Mul", [h, one_plus], "gelu_mul"), net.const("half", 0.5)], "gelu")
    return net.op("Add", [net.linear(act, "W2", F, D, "m"), x], "res2")


def _transformer(seed: int = 0, gelu: str = "erf") -> onnx.ModelProto:
    """The encoder classifier x [N, T, D] -> logits [N, C]; opset 17 ("erf") or 20 ("op": Gelu)."""
    opset = 20 if gelu == "op" else 17
    net = _Encoder(seed)
    res2 = _feed_forward(net, _attention(net, "x"), gelu)
    if opset >= 18:  # axes became an input
        pooled = net.op(
            "ReduceMean", [res2, net.const("tokens", np.array([1], np.int64))], "pooled", keepdims=0
        )
    else:
        pooled = net.op("ReduceMean", [res2], "pooled", axes=[1], keepdims=0)
    net.linear(pooled, "Wc", D, C, "logits", "logits")
    graph = helper.make_graph(
        net.nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        initializer=net.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9 if gelu == "op" else 8
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _units(proto: onnx.ModelProto) -> tuple[ir.Model, tuple[Unit, ...], dict[str, int | None]]:
    """The model, its partition with onnx-ad's rule table, and each weight's quantization axis."""
    model = ir.from_proto(proto)
    sites, _ = find_weight_sites(model)
    return model, partition(model, sites, differentiable=differentiable), {s.name: s.axis for s in sites}


@pytest.mark.parametrize("gelu", ["erf", "op"])
def test_partition_gives_attention_mlp_and_classifier(gelu: str) -> None:
    """One block per sublayer (the residual input stays live until the Add, so no cut inside),
    then the classifier: a one-layer block with the token pooling before it (a weight-less segment
    that is not element-wise joins the next unit, as ResNet's Pool + Flatten + Gemm)."""
    _, units, axes = _units(_transformer(gelu=gelu))
    assert [(u.kind, u.reason, u.differentiable) for u in units] == [("block", "", True)] * 3
    assert [u.weights for u in units] == [("Wq", "Wk", "Wv", "Wo"), ("W1", "W2"), ("Wc",)]
    assert [(u.input, u.output) for u in units] == [("x", "res1"), ("res1", "res2"), ("res2", "logits")]
    assert [u.nodes for u in units] == [ATTENTION, _mlp(gelu), CLASSIFIER]
    assert [u.name for u in units] == [
        "block 0: ln1 .. res1",
        "block 1: ln2 .. res2",
        "block 2: pooled .. logits",
    ]
    for u in units:  # shapes come from initializers, the batch from Reshape's 0: nothing static to extract
        assert (u.const_nodes, u.extra_inputs, u.shape_inputs) == ((), (), ())
    # Q K^T and P V read two activations: no weight site, no unit of their own
    assert set(axes) == {"Wq", "Wk", "Wv", "Wo", "W1", "W2", "Wc"} and set(axes.values()) == {1}


@pytest.mark.parametrize("gelu", ["erf", "op"])
def test_every_op_has_a_gradient_rule(gelu: str) -> None:
    """LayerNormalization, Softmax, Transpose, Reshape, Div, Erf, Gelu, ReduceMean: none falls back."""
    proto = _transformer(gelu=gelu)
    ops = {n.op_type for n in proto.graph.node}
    assert {"LayerNormalization", "Softmax", "Transpose", "Div", "ReduceMean"} <= ops
    assert [op for op in sorted(ops) if not differentiable(op)] == []


class Erf(OpRunUnaryNum):  # onnx.reference looks up new ops by class name
    """onnx.reference's Erf, in the input's precision (it rounds to float32)."""

    def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRunUnaryNum):
    """Gelu(approximate="none") = x Phi(x), in the input's precision (onnx.reference expands the
    function body, whose Erf rounds to float32)."""

    def _run(self, x: np.ndarray, approximate: str = "none") -> tuple[np.ndarray]:
        assert approximate == "none"
        return (x * 0.5 * (1.0 + np.vectorize(math.erf, otypes=[x.dtype])(x / math.sqrt(2.0))),)


def _evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[Erf, Gelu])


def _unit_weights(proto: onnx.ModelProto, unit: Unit, axes: dict[str, int | None]) -> list[UnitWeight]:
    """4-bit asymmetric per-channel weights of ``unit``, as in tests/test_adaround.py."""
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [
        UnitWeight(n, arrays[n], choose_qparams(arrays[n], 4, symmetric=False, axis=axes[n]))
        for n in unit.weights
    ]


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 normal values for every input; beta = 2.5, lam = 0.3, a positive Fisher weight."""
    feeds = {}
    for value in model.graph.input:
        feeds[value.name] = rng.normal(size=[d.dim_value for d in value.type.tensor_type.shape.dim])
    feeds["beta"], feeds["lam"] = np.array(2.5), np.array(0.3)
    if "f" in feeds:
        feeds["f"] = np.abs(feeds["f"])
    return feeds


@pytest.mark.parametrize(
    ("index", "gelu"),
    [(0, "erf"), (1, "erf"), (1, "op"), (2, "erf")],
    ids=["attention", "mlp", "mlp_gelu", "head"],
)
def test_unit_gradient_matches_finite_differences(index: int, gelu: str) -> None:
    """dloss/dV of each unit (onnx-ad through LayerNormalization, Softmax, the head split, GELU,
    the pooling) against central differences of the float64 training graph, as in
    tests/test_adaround.py: along a random direction and for 3 single entries per weight."""
    rng = np.random.default_rng(1)
    proto = _transformer(gelu=gelu)
    model, units, axes = _units(proto)
    unit = units[index]
    weights = _unit_weights(proto, unit, axes)
    models = adaround._build(
        model, unit, weights, (N, T, D), fisher=True, act_quant={}, dtype=np.dtype(np.float64)
    )
    assert models.output_shape == ((N, C) if index == 2 else (N, T, D))
    feeds = _feeds(models.training, rng)
    grads = list(_evaluator(models.gradient).run(None, {**feeds, "adj_loss": np.ones(1)}))[3:]
    training = _evaluator(models.training)

    def loss(name: str, shift: np.ndarray) -> float:
        return float(list(training.run(["loss"], {**feeds, name: feeds[name] + shift}))[0])

    eps = 1e-6
    for w, grad in zip(weights, grads, strict=True):
        name = f"V:{w.name}"
        assert grad.shape == (*w.w.shape, 1)
        direction = rng.normal(size=w.w.shape)
        fd = (loss(name, eps * direction) - loss(name, -eps * direction)) / (2 * eps)
        assert np.dot(grad[..., 0].ravel(), direction.ravel()) == pytest.approx(fd, rel=1e-6, abs=1e-9)
        for flat in rng.choice(w.w.size, 3, replace=False):
            basis = np.zeros(w.w.shape)
            basis[np.unravel_index(flat, w.w.shape)] = eps
            fd = (loss(name, basis) - loss(name, -basis)) / (2 * eps)
            assert grad[np.unravel_index(flat, w.w.shape)][0] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_input_step_gradient_of_the_attention_unit_is_lsq() -> None:
    """act_quant on the attention unit's input x: x' = s round(clip(x / s, qmin - z, qmax - z)).
    dloss/ds is LSQ's sum of dloss/dx' (round(c) - x / s) inside the range and c outside, where
    dloss/dx' is the gradient of the plain unit at x', here a central difference along that
    direction through the whole sublayer; dloss/dV equals the plain unit's at x'."""
    rng = np.random.default_rng(2)
    proto = _transformer()
    model, units, axes = _units(proto)
    weights = _unit_weights(proto, units[0], axes)
    x = rng.normal(size=(N, T, D))
    qx = choose_qparams((0.6 * x).astype(np.float32), 4, symmetric=False, axis=None)  # some of x clips
    f64 = np.dtype(np.float64)
    plain = adaround._build(model, units[0], weights, (N, T, D), fisher=False, act_quant={}, dtype=f64)
    fq = adaround._build(model, units[0], weights, (N, T, D), fisher=False, act_quant={"x": qx}, dtype=f64)
    feeds = {**_feeds(plain.training, rng), "x": x}
    s, z = float(qx.scale), float(qx.zero_point)
    c = np.clip(x / s, qx.qmin - z, qx.qmax - z)
    inside = (x / s > qx.qmin - z) & (x / s < qx.qmax - z)
    assert 0 < inside.sum() < x.size
    x_q, d_xq_ds = s * np.round(c), np.where(inside, np.round(c) - x / s, c)
    (step,) = [i.name for i in fq.gradient.graph.input if i.name.startswith("s:")]
    seed = {"adj_loss": np.ones(1)}
    got = list(_evaluator(fq.gradient).run(None, {**feeds, step: np.array(s), **seed}))[3:]
    at_xq = list(_evaluator(plain.gradient).run(None, {**feeds, "x": x_q, **seed}))[3:]
    for g_fq, g_plain in zip(got[:-1], at_xq, strict=True):
        np.testing.assert_allclose(g_fq, g_plain, rtol=1e-12, atol=1e-14)
    training, eps = _evaluator(plain.training), 1e-6

    def loss(at: np.ndarray) -> float:
        return float(list(training.run(["loss"], {**feeds, "x": at}))[0])

    lsq = (loss(x_q + eps * d_xq_ds) - loss(x_q - eps * d_xq_ds)) / (2 * eps)
    assert got[-1].shape == (1,)
    assert float(got[-1][0]) == pytest.approx(lsq, rel=1e-6, abs=1e-9)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return np.asarray(ort.InferenceSession(str(path), so, providers=[CPU]).run(None, {"x": x})[0])


@pytest.mark.parametrize("fisher", [False, True], ids=["plain", "fisher"])
def test_brecq_end_to_end(tmp_path: Path, fisher: bool) -> None:
    """quantize() with BRECQ: the report's units are the partition's, each trained and evaluated on
    held-out samples, and the QDQ model stays close to the FP one.

    Bounds: 4 bits on average (3 to 6 per matrix, per-channel) put several % of relative noise on
    each of the 7 products. The logits' relative L2 error measures 0.128 here (nearest rounding:
    0.132; model seeds 1-3: 0.056 to 0.084), so 0.25 leaves about twice that; 40 iterations at
    lr 1e-3 barely move V, so the Fisher run measures the same. Top-1 agreement measures 0.95
    (0.95 to 1.0 over seeds 0-3); 0.75 is the bound."""
    proto = _transformer(seed=0)
    onnx.save(proto, tmp_path / "fp.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, T, D)).astype(np.float32))
    recon = ReconConfig(method=RoundingMethod.BRECQ, iters=40, samples=64, batch=16, fisher=fisher)
    cfg = QuantConfig(
        search=SearchConfig(target_bits=4.0), recon=recon, validate=ValidateConfig(enabled=False)
    )
    report = quantize(tmp_path / "fp.onnx", tmp_path / "q.onnx", cfg, calib=tmp_path / "calib.npz")
    rec = report.reconstruction
    assert rec is not None and report.output_written
    _, units, _ = _units(proto)
    assert [(r.name, r.kind, r.weights) for r in rec.units] == [(u.name, u.kind, u.weights) for u in units]
    for r in rec.units:
        assert r.iters == 40 and r.loss_nearest is not None and r.loss_learned is not None
        assert (r.rounding == "learned") == (r.loss_learned <= r.loss_nearest)
        assert r.fisher == ("used" if fisher else "")
    assert any(r.rounding == "learned" for r in rec.units)
    x = np.random.default_rng(2).normal(size=(64, T, D)).astype(np.float32)
    fp, q = _run(tmp_path / "fp.onnx", x), _run(tmp_path / "q.onnx", x)
    assert q.shape == (64, C)
    rel = float(np.linalg.norm(q - fp) / np.linalg.norm(fp))
    assert 1e-3 < rel < 0.25, rel
    assert np.mean(q.argmax(1) == fp.argmax(1)) >= 0.75
