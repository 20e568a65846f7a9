"""Tests of onnx_mixquant.rounding.reconstruct.fisher: BRECQ's Fisher weights from the KL gradient.

The float64 program (run by onnx.reference) is checked against central finite differences of the
KL loss of a "tail" model written by hand (the model's nodes but the one making the tensor, the
tensor an input, onnx.reference), then the float32 onnxruntime program against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.rounding.reconstruct.fisher import FisherProgram, fisher_weight, softmax

CPU = "CPUExecutionProvider"
N = 2  # batch
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def _node(op: str, ins: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=f"{op}_{out}", **attrs)


def _head(x: str) -> list[onnx.NodeProto]:
    """GlobalAveragePool -> Flatten -> Gemm: 4 channels to logits [N, 4]."""
    return [_node("GlobalAveragePool", [x], "g"), _node("Flatten", ["g"], "f"),
            _node("Gemm", ["f", "Wg", "Bg"], "logits", transB=1)]  # fmt: skip


def _residual() -> tuple[list[onnx.NodeProto], str]:
    """x -> Conv -> Relu (T) -> Conv -> Relu -> Add(T) -> head: T is a whole block's input."""
    nodes = [
        _node("Conv", ["x", "W1", "B1"], "c1", pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], "T"),
        _node("Conv", ["T", "W2", "B2"], "c2", pads=[1, 1, 1, 1]),
        _node("Relu", ["c2"], "r2"),
        _node("Add", ["r2", "T"], "s"),
    ]
    return [*nodes, *_head("s")], "T"


def _skip() -> tuple[list[onnx.NodeProto], str]:
    """x -> Conv -> Relu (b) -> Conv (T) -> Relu -> Conv -> Add(b) -> head: the skip bypasses T."""
    nodes = [
        _node("Conv", ["x", "W1", "B1"], "c1", pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], "b"),
        _node("Conv", ["b", "W2", "B2"], "T", pads=[1, 1, 1, 1]),
        _node("Relu", ["T"], "r"),
        _node("Conv", ["r", "W3"], "c3"),
        _node("Add", ["c3", "b"], "s"),
    ]
    return [*nodes, *_head("s")], "T"


def _inits(dtype: type) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"W1": (4, 3, 3, 3), "B1": (4,), "W2": (4, 4, 3, 3), "B2": (4,), "W3": (4, 4, 1, 1)}
    shapes |= {"Wg": (4, 4), "Bg": (4,)}
    return {k: (rng.normal(size=s) * 0.5).astype(np.float32).astype(dtype) for k, s in shapes.items()}


def _proto(
    nodes: list[onnx.NodeProto], dtype: type, inputs: dict[str, list], out: str = "logits", opset: int = 17
) -> onnx.ModelProto:
    """The model ``inputs -> nodes -> out`` (float ``dtype``), shape-inferred."""
    inits = _inits(dtype)
    used = {i for n in nodes for i in n.input}
    elem = _TYPES[np.dtype(dtype)]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(k, elem, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(out, elem, None)],
        initializer=[numpy_helper.from_array(a, k) for k, a in inits.items() if k in used],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _model(case: str, dtype: type, opset: int = 17) -> ir.Model:
    nodes, _ = CASES[case]()
    return ir.from_proto(_proto(nodes, dtype, {"x": ["N", 3, 6, 6]}, opset=opset))


def _tail(case: str) -> ReferenceEvaluator:
    """The float64 model without the node that makes T; x and T are inputs."""
    nodes, tensor = CASES[case]()
    kept = [n for n in nodes if tensor not in n.output]
    return ReferenceEvaluator(_proto(kept, np.float64, {"x": [N, 3, 6, 6], tensor: [N, 4, 6, 6]}))


def _kl(tail: ReferenceEvaluator, x: np.ndarray, t: np.ndarray, p: np.ndarray) -> float:
    """BRECQ's F.kl_div(log_softmax(logits), p, reduction="batchmean"), in float64."""
    (logits,) = tail.run(["logits"], {"x": x, "T": t})
    z = logits - logits.max(axis=1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float((p * (np.log(p) - log_q)).sum() / len(p))


def _shortcut() -> tuple[list[onnx.NodeProto], str]:
    """x -> Conv -> Relu (T); T[:, 0:2, 1::2, ::2] zero-padded to 4 channels (pads from a Constant
    -> Cast chain) + Conv(T, stride 2) -> head: a ResNet option-A shortcut (a Slice with steps 2,
    odd and even starts, its adjoint built by _dwconv's rule)."""
    const = helper.make_node(
        "Constant",
        [],
        ["padf"],
        value=numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.float32)),
    )
    bounds = {"st": [0, 1, 0], "en": [2, 100, 100], "ax": [1, 2, 3], "sp": [1, 2, 2]}
    consts = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.array(v, np.int64)))
        for k, v in bounds.items()
    ]
    nodes = [
        *consts,
        const,
        _node("Cast", ["padf"], "pads", to=TensorProto.INT64),
        _node("Conv", ["x", "W1", "B1"], "c1", pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], "T"),
        _node("Slice", ["T", "st", "en", "ax", "sp"], "sl"),
        _node("Pad", ["sl", "pads"], "short"),
        _node("Conv", ["T", "W2", "B2"], "c2", pads=[1, 1, 1, 1], strides=[2, 2]),
        _node("Add", ["c2", "short"], "s"),
    ]
    return [*nodes, *_head("s")], "T"


CASES = {"residual": _residual, "skip": _skip, "shortcut": _shortcut}


@pytest.mark.parametrize(
    ("case", "opset"), [("residual", 17), ("skip", 17), ("residual", 12), ("shortcut", 17), ("shortcut", 12)]
)
def test_gradient_matches_finite_differences(case: str, opset: int) -> None:
    """Opset 12 builds log-softmax from ReduceMax/Exp/ReduceSum/Log (no LogSoftmax rule there)."""
    rng = np.random.default_rng(1)
    program = FisherProgram(_model(case, np.float64, opset), "T", N, dtype=np.float64)
    assert program.input_names == ("x",) and program.tensor_shape == (N, 4, 6, 6)
    assert program.output_shape == (N, 4) and program.provider == "onnx.reference"
    x, t = rng.normal(size=(N, 3, 6, 6)), rng.normal(size=(N, 4, 6, 6))
    logits = rng.normal(size=(N, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    g = program.grad({"x": x}, t, p)
    assert g.shape == t.shape and g.dtype == np.float64
    tail, eps = _tail(case), 1e-6

    def fd(direction: np.ndarray) -> float:
        return (_kl(tail, x, t + eps * direction, p) - _kl(tail, x, t - eps * direction, p)) / (2 * eps)

    direction = rng.normal(size=t.shape)
    assert float((g * direction).sum()) == pytest.approx(fd(direction), rel=1e-6)
    for i in rng.choice(t.size, 3, replace=False):
        basis = np.zeros(t.size)
        basis[i] = 1.0
        assert g.ravel()[i] == pytest.approx(fd(basis.reshape(t.shape)), rel=1e-5, abs=1e-9)
    # the float32 onnxruntime program agrees with the float64 one
    program32 = FisherProgram(_model(case, np.float32, opset), "T", N, provider=CPU)
    assert program32.provider == CPU and program32.optimization == "ORT_ENABLE_ALL"
    f32 = [a.astype(np.float32) for a in (x, t, p)]
    g32 = program32.grad({"x": f32[0]}, f32[1], f32[2])
    assert g32.dtype == np.float32
    assert np.abs(g32 - g).max() <= 1e-4 * np.abs(g).max()


def test_gradient_vanishes_at_the_fp_point() -> None:
    """At t = T's FP value and p = softmax(FP logits) the KL is at its minimum."""
    rng = np.random.default_rng(2)
    model = _model("skip", np.float32)
    fp = ReferenceEvaluator(ir.to_proto(model))
    x = rng.normal(size=(N, 3, 6, 6)).astype(np.float32)
    t, logits = fp.run(["T", "logits"], {"x": x})
    program = FisherProgram(model, "T", N, provider=CPU)
    p = softmax(logits)
    at_min = program.grad({"x": x, "unused": x}, t, p)
    moved = program.grad({"x": x}, t + rng.normal(size=t.shape).astype(np.float32), p)
    assert np.abs(at_min).max() < 1e-7  # float32: about 1e-9
    assert np.abs(moved).max() > 1e-5  # about 4e-4 (GlobalAveragePool divides by 36)


def test_logits_as_the_tensor() -> None:
    """A unit that is the last layer: d loss / d logits = (softmax(logits) - p) / N."""
    rng = np.random.default_rng(3)
    program = FisherProgram(_model("residual", np.float32), "logits", N, provider=CPU)
    assert program.tensor_shape == (N, 4)
    logits = rng.normal(size=(N, 4)).astype(np.float32)
    p = softmax(rng.normal(size=(N, 4)))
    np.testing.assert_allclose(program.grad({}, logits, p), (softmax(logits) - p) / N, atol=1e-7)


def test_fisher_weight_and_softmax() -> None:
    g = np.array([[-2.0, 0.0], [0.5, 3.0]])
    f = fisher_weight(g)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, [[9.0, 1.0], [2.25, 16.0]])
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], np.float32)
    p = softmax(logits)
    assert p.dtype == np.float32 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(p[1], [1.0, 0.0, 0.0], atol=1e-30)


def test_unsupported_models() -> None:
    feature_map = [_node("Conv", ["x", "W1"], "T", pads=[1, 1, 1, 1]), _node("Relu", ["T"], "out")]
    model = ir.from_proto(_proto(feature_map, np.float32, {"x": ["N", 3, 6, 6]}, out="out"))
    with pytest.raises(UnsupportedModelError, match=r"\[batch, classes\] logits; output 'out' has shape"):
        FisherProgram(model, "T", N, provider=CPU)
    with pytest.raises(UnsupportedModelError, match="'nowhere' is not a tensor of the main graph"):
        FisherProgram(_model("residual", np.float32), "nowhere", N, provider=CPU)
    with pytest.raises(UnsupportedModelError, match="'W1' is not a tensor"):
        FisherProgram(_model("residual", np.float32), "W1", N, provider=CPU)
    # MaxRoiPool has no reverse rule in onnx-ad 0.3.0
    rois = numpy_helper.from_array(np.array([[0, 0, 0, 3, 3]], np.float32), "rois")
    pooled = [
        _node("Conv", ["x", "W1"], "T", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["rois"], value=rois),
        _node("MaxRoiPool", ["T", "rois"], "m", pooled_shape=[1, 1]),
        _node("Flatten", ["m"], "f"),
        _node("Gemm", ["f", "Wg", "Bg"], "logits", transB=1),
    ]
    model = ir.from_proto(_proto(pooled, np.float32, {"x": ["N", 3, 6, 6]}))
    with pytest.raises(UnsupportedModelError, match="onnx-ad cannot differentiate"):
        FisherProgram(model, "T", N, provider=CPU)
