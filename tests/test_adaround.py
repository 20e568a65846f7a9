"""Tests of onnx_mixquant.rounding.reconstruct.adaround: the AdaRound training graph and its gradient.

Gradients are checked against central finite differences of the training graph built in float64
and run by onnx.reference (onnxruntime has no float64 Conv), then the float32 onnxruntime step
against that float64 gradient.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import QParams, choose_qparams, dequantize, quantize
from onnx_mixquant.rounding.reconstruct import adaround
from onnx_mixquant.rounding.reconstruct._dwconv import grouped_conv_rule
from onnx_mixquant.rounding.reconstruct._rankalign import BROADCASTING
from onnx_mixquant.rounding.reconstruct.adaround import (
    UnitProgram,
    UnitWeight,
    differentiable,
    hard_quantize,
    init_v,
    rectified_sigmoid,
)
from onnx_mixquant.rounding.reconstruct.blocks import Unit

CPU = "CPUExecutionProvider"
N = 2  # batch


def _node(op: str, ins: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=f"{op}_{out}", **attrs)


def _case(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    x_shape: list[int],
    out: str,
    axes: dict[str, int],
    inp: str = "x",
    outside: tuple[str, ...] = (),
) -> tuple[ir.Model, Unit, list[UnitWeight]]:
    """FP model inp -> nodes -> out (batch symbolic); the unit x -> out of its nodes but Constant
    ones and ``outside``; 4-bit asymmetric per-channel weights."""
    graph = helper.make_graph(
        nodes,
        "unit",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, k) for k, a in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    names = tuple(n.name for n in nodes if n.op_type != "Constant" and n.name not in outside)
    unit = Unit("u", names, "x", out, tuple(axes), "block", "")
    weights = [
        UnitWeight(k, inits[k], choose_qparams(inits[k], 4, symmetric=False, axis=axis))
        for k, axis in axes.items()
    ]
    return model, unit, weights


def _init(model: ir.Model, name: str) -> np.ndarray:
    tensor = model.graph.initializers[name].const_value
    assert tensor is not None
    return tensor.numpy()


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.normal(size=shape) * 0.4).astype(np.float32)


def _conv_relu(rng: np.random.Generator) -> tuple:
    nodes = [_node("Conv", ["x", "W", "B"], "c", pads=[1, 1, 1, 1]), _node("Relu", ["c"], "r")]
    return _case(nodes, {"W": _w(rng, 4, 3, 3, 3), "B": _w(rng, 4)}, [N, 3, 5, 5], "r", {"W": 0})


def _gemm(rng: np.random.Generator) -> tuple:
    nodes = [_node("Gemm", ["x", "W", "B"], "g", transB=1)]
    return _case(nodes, {"W": _w(rng, 4, 6), "B": _w(rng, 4)}, [3, 6], "g", {"W": 0})


def _matmul(rng: np.random.Generator) -> tuple:
    nodes = [_node("MatMul", ["x", "W"], "m"), _node("Add", ["m", "B"], "a")]
    return _case(nodes, {"W": _w(rng, 6, 4), "B": _w(rng, 4)}, [3, 6], "a", {"W": 1})


def _residual(rng: np.random.Generator) -> tuple:
    lo, hi = np.array(0.0, np.float32), np.array(0.6, np.float32)
    nodes = [
        _node("Conv", ["x", "W1", "B1"], "c1", pads=[1, 1, 1, 1]),
        _node("Clip", ["c1", "lo", "hi"], "k"),
        _node("Conv", ["k", "W2", "B2"], "c2", pads=[1, 1, 1, 1]),
        _node("Add", ["c2", "x"], "s"),
        _node("Relu", ["s"], "r"),
    ]
    inits = {"W1": _w(rng, 4, 4, 3, 3), "B1": _w(rng, 4), "W2": _w(rng, 4, 4, 3, 3), "B2": _w(rng, 4)}
    return _case(nodes, {**inits, "lo": lo, "hi": hi}, [N, 4, 5, 5], "r", {"W1": 0, "W2": 0})


def _squeeze_excite(rng: np.random.Generator) -> tuple:
    nodes = [
        _node("Conv", ["x", "W0"], "t", pads=[1, 1, 1, 1]),
        _node("GlobalAveragePool", ["t"], "p"),
        _node("Conv", ["p", "W1", "B1"], "e1"),
        _node("Relu", ["e1"], "e2"),
        _node("Conv", ["e2", "W2", "B2"], "e3"),
        _node("Sigmoid", ["e3"], "e4"),
        _node("Mul", ["t", "e4"], "o"),
    ]
    inits = {"W0": _w(rng, 4, 3, 3, 3), "W1": _w(rng, 2, 4, 1, 1), "B1": _w(rng, 2)}
    inits |= {"W2": _w(rng, 4, 2, 1, 1), "B2": _w(rng, 4)}
    return _case(nodes, inits, [N, 3, 5, 5], "o", {"W0": 0, "W1": 0, "W2": 0})


def _pools(rng: np.random.Generator) -> tuple:
    nodes = [
        _node("Conv", ["x", "W1"], "c1", pads=[1, 1, 1, 1]),
        _node("MaxPool", ["c1"], "m", kernel_shape=[2, 2], strides=[2, 2]),
        _node("Conv", ["m", "W2"], "c2", pads=[1, 1, 1, 1]),
        _node("AveragePool", ["c2"], "a", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        _node("Conv", ["a", "W3"], "c3"),
        _node("GlobalAveragePool", ["c3"], "g"),
    ]
    inits = {"W1": _w(rng, 4, 3, 3, 3), "W2": _w(rng, 4, 4, 3, 3), "W3": _w(rng, 3, 4, 1, 1)}
    return _case(nodes, inits, [N, 3, 8, 8], "g", {"W1": 0, "W2": 0, "W3": 0})


def _depthwise(rng: np.random.Generator, stride: int) -> tuple:
    """Pad (amounts from a Constant node outside the unit's nodes) -> depthwise Conv -> Clip -> 1x1 Conv."""
    pads = numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 0], np.int64), "pv")
    nodes = [
        helper.make_node("Constant", [], ["pads"], name="pads_const", value=pads),
        _node("Pad", ["x", "pads"], "p"),
        _node("Conv", ["p", "Wd", "Bd"], "d", group=4, strides=[stride, stride], pads=[1, 0, 1, 1]),
        _node("Clip", ["d", "lo", "hi"], "k"),
        _node("Conv", ["k", "Wp"], "o"),
    ]
    inits = {"Wd": _w(rng, 4, 1, 3, 3), "Bd": _w(rng, 4), "Wp": _w(rng, 3, 4, 1, 1)}
    inits |= {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    return _case(nodes, inits, [N, 4, 7, 7], "o", {"Wd": 0, "Wp": 0})


def _head(rng: np.random.Generator) -> tuple:
    """EfficientNet's head: 1x1 Conv, pool, Reshape to (batch, -1) with the batch read by a Shape of
    the model input, outside the unit (``Unit.shape_inputs``), Gemm."""
    outside = ("Relu_x", "Shape_sh", "Gather_n", "Unsqueeze_n1", "Concat_tgt")
    nodes = [
        _node("Relu", ["inp"], "x"),
        _node("Conv", ["x", "W1"], "c"),
        _node("GlobalAveragePool", ["c"], "p"),
        _node("Shape", ["inp"], "sh"),
        _node("Gather", ["sh", "first"], "n", axis=0),
        _node("Unsqueeze", ["n", "zero"], "n1"),
        _node("Concat", ["n1", "minus1"], "tgt", axis=0),
        _node("Reshape", ["p", "tgt"], "flat"),
        _node("Gemm", ["flat", "W2", "B2"], "o", transB=1),
    ]
    inits = {"W1": _w(rng, 6, 4, 1, 1), "W2": _w(rng, 5, 6), "B2": _w(rng, 5)}
    inits |= {
        "first": np.array(0, np.int64),
        "zero": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
    }
    return _case(nodes, inits, [N, 4, 3, 3], "o", {"W1": 0, "W2": 0}, inp="inp", outside=outside)


CASES = {
    "conv_relu": _conv_relu,
    "gemm": _gemm,
    "matmul": _matmul,
    "residual": _residual,
    "squeeze_excite": _squeeze_excite,
    "pools": _pools,
    "depthwise_s1": lambda rng: _depthwise(rng, 1),
    "depthwise_s2": lambda rng: _depthwise(rng, 2),
    "head": _head,
}


def _feeds(model: onnx.ModelProto, rng: np.random.Generator, dtype: type) -> dict[str, np.ndarray]:
    """Random values for every input of a training (or gradient) model; beta = 2.5, lam = 0.3."""
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.normal(size=shape).astype(dtype)
    feeds["beta"], feeds["lam"] = np.array(2.5, dtype), np.array(0.3, dtype)
    return feeds


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_finite_differences(case: str) -> None:
    rng = np.random.default_rng(1)
    model, unit, weights = CASES[case](rng)
    batch = tuple([3, 6] if case in ("gemm", "matmul") else [N, *model.graph.inputs[0].shape[1:]])
    models = adaround._build(
        model, unit, weights, batch, fisher=True, act_quant={}, dtype=np.dtype(np.float64)
    )
    feeds = _feeds(models.training, rng, np.float64)
    feeds["f"] = np.abs(feeds["f"])
    v_names = [f"V:{w.name}" for w in weights]
    # _rankalign: every input of a broadcasting op has the rank of its output
    inferred = onnx.shape_inference.infer_shapes(models.gradient)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    ranks |= {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.input}
    ranks |= {t.name: len(t.dims) for t in inferred.graph.initializer}
    broadcasting = [n for n in inferred.graph.node if n.op_type in BROADCASTING and n.output[0] in ranks]
    assert broadcasting
    for node in broadcasting:
        assert {ranks.get(i, ranks[node.output[0]]) for i in node.input if i} == {ranks[node.output[0]]}, node
    grads = list(ReferenceEvaluator(models.gradient).run(None, {**feeds, "adj_loss": np.ones(1)}))[3:]
    training = ReferenceEvaluator(models.training)

    def loss(shift: dict[str, np.ndarray]) -> float:
        shifted = {**feeds, **{k: feeds[k] + d for k, d in shift.items()}}
        return float(list(training.run(["loss"], shifted))[0])

    eps = 1e-6
    for name, grad in zip(v_names, grads, strict=True):
        direction = rng.normal(size=grad.shape[:-1])
        fd = (loss({name: eps * direction}) - loss({name: -eps * direction})) / (2 * eps)
        assert np.dot(grad[..., 0].ravel(), direction.ravel()) == pytest.approx(fd, rel=1e-6, abs=1e-9)
        for index in [np.unravel_index(i, direction.shape) for i in rng.choice(direction.size, 3)]:
            basis = np.zeros(direction.shape)
            basis[index] = 1.0
            fd = (loss({name: eps * basis}) - loss({name: -eps * basis})) / (2 * eps)
            assert grad[index][0] == pytest.approx(fd, rel=1e-5, abs=1e-8)

    # the float32 onnxruntime step agrees with the float64 gradient
    program = UnitProgram(model, unit, weights, batch, fisher=True, provider=CPU)
    f32 = {k: a.astype(np.float32) for k, a in feeds.items()}
    v = {w.name: f32[n] for w, n in zip(weights, v_names, strict=True)}
    rec, reg, got = program.step(f32["x"], f32["y"], v, 2.5, 0.3, fisher_w=f32["f"])
    rec64, reg64 = list(training.run(["rec_loss", "reg"], feeds))
    assert (rec, reg) == pytest.approx((float(rec64), float(reg64)), rel=1e-5)
    for w, grad in zip(weights, grads, strict=True):
        assert np.abs(got[w.name] - grad[..., 0]).max() <= 1e-4 * np.abs(grad).max()


def test_init_v_gives_the_fractional_part_and_the_fp_output() -> None:
    """h(init_v) = frac(w / s), so the soft weights are w clipped to the grid's range."""
    rng = np.random.default_rng(2)
    model, unit, weights = _residual(rng)
    clipped = []
    for w in weights:
        s, z = w.qparams.scale.reshape(-1, 1, 1, 1), w.qparams.zero_point.reshape(-1, 1, 1, 1)
        v = init_v(w.w, w.qparams)
        assert v.dtype == np.float32 and v.shape == w.w.shape
        np.testing.assert_allclose(rectified_sigmoid(v), w.w / s - np.floor(w.w / s), atol=1e-6)
        w_clip = ((np.clip(w.w / s + z, w.qparams.qmin, w.qparams.qmax) - z) * s).astype(np.float32)
        np.testing.assert_allclose(adaround._soft_weight(w.w, w.qparams, v), w_clip, atol=1e-6)
        clipped.append(UnitWeight(w.name, w_clip, w.qparams))
    program = UnitProgram(model, unit, weights, (N, 4, 5, 5), provider=CPU)
    x = rng.normal(size=(N, 4, 5, 5)).astype(np.float32)
    v0 = {w.name: init_v(w.w, w.qparams) for w in weights}
    fp_clipped = UnitProgram(model, unit, clipped, (N, 4, 5, 5), provider=CPU).forward(x, None)
    soft, hard = program.forward(x, v0), program.forward(x, v0, hard=True)
    np.testing.assert_allclose(soft, fp_clipped, atol=1e-5)
    assert np.abs(hard - fp_clipped).max() > 1e-2  # 4-bit rounding shows


def test_hard_quantize_at_init_is_round_half_up() -> None:
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32)
    qp = choose_qparams(w, 4, symmetric=False, axis=0)
    q = hard_quantize(w, qp, init_v(w, qp))
    assert q.dtype == np.int32
    nearest = quantize(w, qp)
    scaled = w / qp.scale.reshape(-1, 1, 1, 1)
    tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-5
    np.testing.assert_array_equal(q[~tie], nearest[~tie])
    assert np.all(np.abs(q - nearest) <= 1)
    down = np.clip(np.floor(scaled) + qp.zero_point.reshape(-1, 1, 1, 1), qp.qmin, qp.qmax)
    np.testing.assert_array_equal(hard_quantize(w, qp, np.full(w.shape, -1.0)), down)


def test_losses_match_numpy_and_fisher_weights_the_error() -> None:
    rng = np.random.default_rng(4)
    model, unit, weights = _conv_relu(rng)
    batch = (N, 3, 5, 5)
    x = rng.normal(size=batch).astype(np.float32)
    y = rng.normal(size=(N, 4, 5, 5)).astype(np.float32)
    v = {w.name: rng.normal(size=w.w.shape).astype(np.float32) for w in weights}
    plain = UnitProgram(model, unit, weights, batch, provider=CPU)
    rec, reg, _ = plain.step(x, y, v, 3.0, 0.01)
    out = plain.forward(x, v).astype(np.float64)
    assert rec == pytest.approx(((out - y) ** 2).sum(axis=1).mean(), rel=1e-5)
    h = rectified_sigmoid(v["W"]).astype(np.float64)
    assert reg == pytest.approx((1 - np.abs(2 * h - 1) ** 3.0).sum(), rel=1e-5)
    fisher = UnitProgram(model, unit, weights, batch, fisher=True, provider=CPU)
    f = rng.uniform(0, 2, size=y.shape).astype(np.float32)
    assert fisher.step(x, y, v, 3.0, 0.01, fisher_w=np.ones_like(y))[0] == pytest.approx(rec, rel=1e-6)
    assert fisher.step(x, y, v, 3.0, 0.01, fisher_w=2 * np.ones_like(y))[0] == pytest.approx(
        2 * rec, rel=1e-6
    )
    weighted = fisher.step(x, y, v, 3.0, 0.01, fisher_w=f)[0]
    assert weighted == pytest.approx((f * (out - y) ** 2).sum(axis=1).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="fisher_w"):
        plain.step(x, y, v, 3.0, 0.01, fisher_w=f)
    with pytest.raises(ValueError, match="shape"):
        plain.step(x[:1], y, v, 3.0, 0.01)


def test_total_gradient_includes_the_regulariser() -> None:
    rng = np.random.default_rng(5)
    model, unit, weights = _gemm(rng)
    program = UnitProgram(model, unit, weights, (3, 6), provider=CPU)
    x, y = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    v = {"W": rng.normal(size=(4, 6)).astype(np.float32)}
    _, _, g0 = program.step(x, y, v, 2.0, 0.0)
    _, _, g1 = program.step(x, y, v, 2.0, 1.0)
    h = rectified_sigmoid(v["W"]).astype(np.float64)
    sig = 1 / (1 + np.exp(-v["W"].astype(np.float64)))
    inside = (sig * 1.2 - 0.1 > 0) & (sig * 1.2 - 0.1 < 1)
    d_reg = -2.0 * np.abs(2 * h - 1) * np.sign(2 * h - 1) * 2 * sig * (1 - sig) * 1.2 * inside
    np.testing.assert_allclose(g1["W"] - g0["W"], d_reg, atol=1e-5)


def test_activation_fake_quant_is_exact_and_its_step_gradient_is_lsq() -> None:
    rng = np.random.default_rng(6)
    model, unit, weights = _gemm(rng)
    x = (rng.normal(size=(3, 6)) * 2).astype(np.float32)
    qx = choose_qparams(x * 0.7, 8, symmetric=False, axis=None)  # some inputs clip
    program = UnitProgram(model, unit, weights, (3, 6), act_quant={"x": qx}, provider=CPU)
    xq = dequantize(quantize(x, qx), qx)
    w = weights[0].w
    np.testing.assert_allclose(
        program.forward(x, None),
        xq @ w.T + _init(model, "B"),
        rtol=1e-6,
        atol=1e-6,
    )
    y = rng.normal(size=(3, 4)).astype(np.float32)
    v = {"W": rng.normal(size=w.shape).astype(np.float32)}
    rec, _, grads = program.step(x, y, v, 2.0, 0.0)
    w_soft = adaround._soft_weight(w, weights[0].qparams, v["W"]).astype(np.float64)
    out = xq.astype(np.float64) @ w_soft.T + _init(model, "B")
    assert rec == pytest.approx(((out - y) ** 2).sum(1).mean(), rel=1e-5)
    d_xq = (2 * (out - y) / 3) @ w_soft  # dL/dx'
    s, z = float(qx.scale), float(qx.zero_point)
    c = np.clip(x / s, qx.qmin - z, qx.qmax - z)
    inside = (x / s > qx.qmin - z) & (x / s < qx.qmax - z)
    d_s = np.where(inside, np.round(c) - x / s, c)  # LSQ: dx'/ds
    assert grads["x"].shape == ()
    assert float(grads["x"]) == pytest.approx(float((d_xq * d_s).sum()), rel=1e-4)


def test_act_quant_inside_the_unit_and_bad_entries() -> None:
    rng = np.random.default_rng(7)
    model, unit, weights = _conv_relu(rng)
    x = rng.normal(size=(N, 3, 5, 5)).astype(np.float32)
    qc = QParams(8, False, np.array(0.02, np.float32), np.array(128, np.int32), None)
    qr = QParams(8, False, np.array(0.01, np.float32), np.array(0, np.int32), None)
    program = UnitProgram(model, unit, weights, (N, 3, 5, 5), act_quant={"c": qc, "r": qr}, provider=CPU)
    fp = UnitProgram(model, unit, weights, (N, 3, 5, 5), provider=CPU).forward(x, None)
    expect = dequantize(quantize(np.maximum(dequantize(quantize(_conv_out(model, x), qc), qc), 0), qr), qr)
    np.testing.assert_allclose(program.forward(x, None), expect, atol=1e-6)
    assert not np.allclose(program.forward(x, None), fp)
    v = {"W": init_v(weights[0].w, weights[0].qparams)}
    _, _, grads = program.step(
        x, fp, v, 2.0, 0.01, act_steps={"c": np.array(0.03, np.float32), "r": qr.scale}
    )
    assert set(grads) == {"W", "c", "r"} and np.isfinite(grads["c"]) and grads["W"].shape == (4, 3, 3, 3)
    with pytest.raises(ConfigError, match="nowhere"):
        UnitProgram(model, unit, weights, (N, 3, 5, 5), act_quant={"nowhere": qc}, provider=CPU)
    per_channel = QParams(8, False, np.ones(4, np.float32), np.zeros(4, np.int32), 1)
    with pytest.raises(ConfigError, match="per tensor"):
        UnitProgram(model, unit, weights, (N, 3, 5, 5), act_quant={"c": per_channel}, provider=CPU)


def _conv_out(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The FP Conv output of the conv_relu case, via onnx.reference."""
    w, b = _init(model, "W"), _init(model, "B")
    node = helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return np.asarray(list(ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": x}))[0])


def test_optimisation_levels_agree() -> None:
    """ENABLE_ALL (the sessions' level) matches DISABLE_ALL on the gradient model to 1e-5."""
    rng = np.random.default_rng(8)
    model, unit, weights = _depthwise(rng, 2)
    program = UnitProgram(model, unit, weights, (N, 4, 7, 7), provider=CPU)
    assert program.optimization == "ORT_ENABLE_ALL" and program.provider == CPU
    feeds = _feeds(program.gradient_model, rng, np.float32)
    feeds["adj_loss"] = np.ones(1, np.float32)
    results = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(program.gradient_model.SerializeToString(), so, providers=[CPU])
        results.append(sess.run(None, feeds))
    for a, b in zip(*results, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def test_clip_rule_masks_with_one_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CLIP_MASK, every Clip's adjoint is g * Cast(x == Clip(x)): no Where, Not, Less, Greater
    or And left in the gradient model, and the gradients equal those of onnx-ad's rule."""
    from onnx_mixquant.rounding.reconstruct import _dwconv

    rng = np.random.default_rng(12)
    model, unit, weights = _depthwise(rng, 2)
    batch = (N, 4, 7, 7)
    gradients = {}
    for lean in (True, False):
        monkeypatch.setattr(_dwconv, "CLIP_MASK", lean)
        program = UnitProgram(model, unit, weights, batch, provider=CPU)
        ops = Counter(node.op_type for node in program.gradient_model.graph.node)
        masks = {op: ops[op] for op in ("Where", "Not", "Less", "Greater", "And")}
        assert (set(masks.values()) == {0}) is lean, masks
        assert (ops["Equal"] == ops["Clip"] > 0) is lean
        gradients[lean] = program.gradient_model
    feeds = _feeds(gradients[True], rng, np.float32)
    feeds["adj_loss"] = np.ones(1, np.float32)
    lean, reference = (
        ort.InferenceSession(gradients[flag].SerializeToString(), providers=[CPU]).run(None, feeds)
        for flag in (True, False)
    )
    for a, b in zip(lean, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def _size_one_transposes(proto: onnx.ModelProto) -> tuple[int, int]:
    """(Transposes that only move axes of size 1, all Transposes) of a model, by inferred shapes."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    moves = total = 0
    for node in inferred.graph.node:
        if node.op_type == "Transpose":
            total += 1
            perm, dims = list(helper.get_attribute_value(node.attribute[0])), shapes[node.input[0]]
            moved = [a for a in perm if dims[a] != 1]
            moves += moved == sorted(moved)
    return moves, total


def test_gradient_model_has_one_static_seed_and_no_size_one_transposes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step's gradient model takes adj_loss of shape [1], so shapes are static and the
    Transposes that only move axes of size 1 (the depthwise unit has some) became Reshapes."""
    from onnx_mixquant.rounding.reconstruct import _dwconv

    model, unit, weights = _depthwise(np.random.default_rng(13), 2)
    program = UnitProgram(model, unit, weights, (N, 4, 7, 7), provider=CPU)
    (seed,) = [v for v in program.gradient_model.graph.input if v.name == "adj_loss"]
    assert [d.dim_value for d in seed.type.tensor_type.shape.dim] == [1]
    moves, total = _size_one_transposes(program.gradient_model)
    assert moves == 0 and total > 0
    monkeypatch.setattr(_dwconv, "SEED_RESHAPES", False)
    plain = UnitProgram(model, unit, weights, (N, 4, 7, 7), provider=CPU).gradient_model
    assert _size_one_transposes(plain)[0] > 0


def test_grouped_conv_rule_is_scoped() -> None:
    import onnx_ad

    rng = np.random.default_rng(9)
    model, unit, weights = _depthwise(rng, 1)
    training = adaround._build(
        model, unit, weights, (N, 4, 7, 7), fisher=False, act_quant={}, dtype=np.dtype(np.float32)
    ).training
    with pytest.raises(onnx_ad.UnsupportedOperator, match="grouped"):
        onnx_ad.reverse(training, inputs=["V:Wd"], outputs=["loss"], layout="onnx")
    with grouped_conv_rule():
        onnx_ad.reverse(training, inputs=["V:Wd"], outputs=["loss"], layout="onnx")


def test_differentiable() -> None:
    for op in (
        "Conv",
        "Relu",
        "Gemm",
        "MatMul",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "Clip",
        "Pad",
        "Constant",
        "HardSwish",
        "LSTM",
        "GroupNormalization",
    ):
        assert differentiable(op), op
    for op in ("StringNormalizer", "NoSuchOp", "QLinearConv", "SequenceAt"):
        assert not differentiable(op), op


def _weight_grad(x: np.ndarray, r: np.ndarray, shape: tuple[int, ...], group: int, stride: int,
                 pads: list[int], dil: int) -> np.ndarray:  # fmt: skip
    """d sum(r * Conv(x, W)) / dW by the definition, in float64."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    m_all, per_group, k1, k2 = shape
    ho, wo = r.shape[2:]
    dw = np.zeros(shape)
    for m, c, i, j in np.ndindex(m_all, per_group, k1, k2):
        channel = m // (m_all // group) * per_group + c
        rows = slice(i * dil, i * dil + stride * (ho - 1) + 1, stride)
        cols = slice(j * dil, j * dil + stride * (wo - 1) + 1, stride)
        dw[m, c, i, j] = (xp[:, channel, rows, cols] * r[:, m]).sum()
    return dw


def _conv_gradient(
    conv: onnx.NodeProto, x_shape: tuple[int, ...], w_shape: tuple[int, ...], r: np.ndarray
) -> onnx.ModelProto:
    """_dwconv.reverse of ``loss = sum(r * conv(x, w))`` with respect to ``w``."""
    from onnx_mixquant.rounding.reconstruct._dwconv import reverse

    nodes = [
        conv,
        helper.make_node("Mul", ["y", "r"], ["p"]),
        helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, w_shape)],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(r, "r")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return reverse(onnx.shape_inference.infer_shapes(proto), ["w"], "loss")


@pytest.mark.parametrize(
    ("c", "m", "k", "h", "group", "stride", "pads", "dil"),
    [
        (4, 4, 3, 7, 4, 1, [1, 1, 1, 1], 1),  # depthwise: a group per (sample, channel)
        (4, 4, 5, 9, 4, 2, [2, 1, 1, 2], 1),  # depthwise, stride 2, asymmetric pads
        (4, 4, 3, 9, 4, 1, [1, 1, 1, 1], 2),  # depthwise, dilation 2
        (4, 8, 3, 9, 4, 1, [1, 1, 1, 1], 1),  # channel multiplier 2
        (6, 4, 3, 8, 2, 3, [2, 0, 1, 1], 2),  # 2 groups of 3 channels, dilation 2
        (3, 5, 1, 6, 1, 1, [0, 0, 0, 0], 1),  # pointwise, many positions: batched matmul
        (8, 9, 1, 1, 1, 1, [0, 0, 0, 0], 1),  # pointwise, one position: one matmul
        (3, 4, 3, 7, 1, 1, [1, 1, 1, 1], 1),  # group 1, 3x3: im2col
        (5, 3, 3, 9, 1, 2, [2, 0, 1, 1], 2),  # im2col, stride 2, dilation 2, asymmetric pads
        (4, 6, 1, 7, 1, 2, [0, 0, 0, 0], 1),  # 1x1 with stride 2: im2col
        (3, 10, 3, 3, 1, 1, [1, 1, 1, 1], 1),  # im2col, fewer positions than filters: one matmul
        (3, 4, 3, 7, 1, 1, [1, 1, 1, 1], 0),  # no room for im2col: onnx-ad's rule
    ],
)
def test_conv_weight_rules_with_two_seeds(
    c: int,
    m: int,
    k: int,
    h: int,
    group: int,
    stride: int,
    pads: list[int],
    dil: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules of _dwconv match the definition, per seed (adj_loss = [1, -2]); each case runs the
    rule its comment names (dil = 0: dilation 1 with IM2COL_BYTES = 0)."""
    from onnx_mixquant.rounding.reconstruct import _dwconv

    if dil == 0:
        monkeypatch.setattr(_dwconv, "IM2COL_BYTES", 0)
        dil = 1

    rng = np.random.default_rng(10)
    x = rng.normal(size=(3, c, h, h)).astype(np.float32)
    w_shape = (m, c // group, k, k)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=[stride] * 2, pads=pads,
                            dilations=[dil] * 2)  # fmt: skip
    ho = (h + pads[0] + pads[2] - dil * (k - 1) - 1) // stride + 1
    wo = (h + pads[1] + pads[3] - dil * (k - 1) - 1) // stride + 1
    r = rng.normal(size=(3, m, ho, wo)).astype(np.float32)
    gradient = _conv_gradient(conv, x.shape, w_shape, r)
    ops = [node.op_type for node in gradient.graph.node]
    if group > 1:
        rule = "depthwise" if c == m == group else "grouped"
    elif k == 1 and stride == 1:
        rule = "pointwise"
    else:
        rule = "im2col" if _dwconv.IM2COL_BYTES else "onnx-ad"
    # besides the forward Conv: grouped: a grouped Conv; depthwise: one with a group per (sample,
    # channel) and no Transpose of X; pointwise: a MatMul; im2col: the one-hot Conv with a group per
    # input channel, and a MatMul; onnx-ad's: a group-1 Conv
    expect_ops = {"grouped": (2, 0), "depthwise": (2, 0), "pointwise": (1, 1), "im2col": (2, 1),
                  "onnx-ad": (2, 0)}[rule]  # fmt: skip
    assert (ops.count("Conv"), ops.count("MatMul")) == expect_ops
    convs = [node for node in gradient.graph.node if node.op_type == "Conv"]
    groups = [helper.get_attribute_value(a) for n in convs[1:] for a in n.attribute if a.name == "group"]
    assert groups == {"grouped": [group], "depthwise": [len(x) * c], "pointwise": [], "im2col": [c],
                      "onnx-ad": [1]}[rule]  # fmt: skip
    if rule == "depthwise":  # X only reshaped to (1, N*C, H, W), never transposed
        x_views = {n.output[0] for n in gradient.graph.node if n.op_type == "Reshape" and n.input[0] == "x"}
        assert x_views
        assert not [n for n in gradient.graph.node if n.op_type == "Transpose" and n.input[0] in x_views]
    sess = ort.InferenceSession(gradient.SerializeToString(), providers=[CPU])
    w = rng.normal(size=w_shape).astype(np.float32)
    (adj,) = sess.run(["adj_w"], {"x": x, "w": w, "adj_loss": np.array([1.0, -2.0], np.float32)})
    expect = _weight_grad(x, r, w_shape, group, stride, pads, dil)
    assert adj.shape == (*w_shape, 2)
    np.testing.assert_allclose(adj[..., 0], expect, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adj[..., 1], -2 * expect, rtol=1e-4, atol=1e-4)


def test_im2col_rule_on_a_1d_conv() -> None:
    """The im2col weight adjoint of a 1-D Conv (stride 2, dilation 2, asymmetric pads) matches the
    definition, seed by seed."""

    rng = np.random.default_rng(11)
    x = rng.normal(size=(3, 4, 11)).astype(np.float32)
    w_shape, pads, stride, dil = (5, 4, 3), [2, 1], 2, 2
    wo = (11 + sum(pads) - dil * 2 - 1) // stride + 1
    r = rng.normal(size=(3, 5, wo)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride], pads=pads, dilations=[dil])
    gradient = _conv_gradient(conv, x.shape, w_shape, r)
    assert [n.op_type for n in gradient.graph.node].count("MatMul") == 1  # the im2col rule
    sess = ort.InferenceSession(gradient.SerializeToString(), providers=[CPU])
    w = rng.normal(size=w_shape).astype(np.float32)
    (adj,) = sess.run(["adj_w"], {"x": x, "w": w, "adj_loss": np.array([1.0, -2.0], np.float32)})
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[1])))
    expect = np.zeros(w_shape)
    for m, c, k in np.ndindex(*w_shape):
        expect[m, c, k] = (xp[:, c, k * dil : k * dil + stride * (wo - 1) + 1 : stride] * r[:, m]).sum()
    np.testing.assert_allclose(adj[..., 0], expect, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adj[..., 1], -2 * expect, rtol=1e-4, atol=1e-4)
