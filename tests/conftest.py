"""Shared fixtures: small models built inline, the bundled demo model, the optional bench set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
BENCH = REPO.parent / "shared" / "bench"
DEMO_MODEL = MODELS / "digits_cnn.onnx"
DEMO_SAMPLES = MODELS / "digits_test.npz"
DEMO_CALIB = MODELS / "digits_calib.npz"

needs_bench = pytest.mark.skipif(not (BENCH / "models").is_dir(), reason="../shared/bench is absent")


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(arr, name)


def make_mixed_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(W1 init, bias) -> Relu -> Conv(W2 from a Constant node) -> Flatten
    -> Gemm(W3, transB=1) -> MatMul(W4) -> y[N,5]; W4 also feeds an Add (a shared weight)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.normal(size=(8,)).astype(np.float32)
    w2 = rng.standard_t(3, size=(4, 8, 3, 3)).astype(np.float32) * 0.2
    w3 = rng.normal(size=(16, 4 * 8 * 8)).astype(np.float32) * 0.05
    w4 = rng.normal(size=(16, 5)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Constant", [], ["W2"], name="w2_const", value=_init("W2v", w2)),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "W4"], ["m"], name="matmul"),
        helper.make_node("ReduceSum", ["W4"], ["w4sum"], name="w4_sum", keepdims=0),
        helper.make_node("Add", ["m", "w4sum"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[_init("W1", w1), _init("B1", b1), _init("W3", w3), _init("W4", w4)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_if_model(seed: int = 0) -> onnx.ModelProto:
    """cond ? x @ Wt : x @ We, with Wt a then-branch initializer and We an outer-scope weight."""
    rng = np.random.default_rng(seed)
    wt = rng.normal(size=(6, 4)).astype(np.float32)
    we = rng.normal(size=(6, 4)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["yt"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("yt", TensorProto.FLOAT, ["N", 4])],
        initializer=[_init("Wt", wt)],
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "We"], ["ye"], name="else_mm")],
        "else",
        [],
        [helper.make_tensor_value_info("ye", TensorProto.FLOAT, ["N", 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
        "ifmodel",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[_init("We", we)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def mixed_model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.onnx"
    onnx.save(make_mixed_model(), path)
    return path


@pytest.fixture
def if_model_path(tmp_path: Path) -> Path:
    path = tmp_path / "ifmodel.onnx"
    onnx.save(make_if_model(), path)
    return path
