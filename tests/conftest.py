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


def dq_integers(model: onnx.ModelProto | Path) -> dict[str, np.ndarray]:
    """The integer input of every main-graph DequantizeLinear that is a stored tensor, by name:
    initializers as stored, bit-packed weights unpacked by running their unpack ops (everything
    upstream of the DQ input, all constants) in onnxruntime at ORT_DISABLE_ALL."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    out = {}
    computed: dict[str, int] = {}
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear"):
        name = dq.input[0]
        if name in inits:
            out[name] = numpy_helper.to_array(inits[name])
            continue
        seen, stack, constant = set(), [name], True
        while stack and constant:
            v = stack.pop()
            if v in inits or v == "" or v in seen:
                continue
            seen.add(v)
            node = producers.get(v)
            constant = node is not None
            stack.extend(node.input if node is not None else [])
        if constant:
            zp = dq.input[2]
            zp_type = inits[zp].data_type if zp in inits else producers[zp].attribute[0].t.data_type
            computed[name] = zp_type
    if computed:
        upstream = _ancestors(computed, producers, inits)
        nodes = [n for n in g.node if any(o in upstream for o in n.output)]
        used = {i for n in nodes for i in n.input}
        sub = helper.make_graph(
            nodes,
            "dq_integers",
            [],
            [helper.make_tensor_value_info(n, t, None) for n, t in computed.items()],
            initializer=[inits[i] for i in sorted(used) if i in inits],
        )
        small = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(small.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out.update(zip(computed, sess.run(list(computed), {}), strict=True))
    return out


def _ancestors(targets: dict[str, int], producers: dict, inits: dict) -> set[str]:
    """Every value name computed on the way to ``targets`` (initializers excluded)."""
    seen: set[str] = set()
    stack = list(targets)
    while stack:
        v = stack.pop()
        if v in seen or v in inits or v not in producers:
            continue
        seen.add(v)
        stack.extend(producers[v].input)
    return seen
