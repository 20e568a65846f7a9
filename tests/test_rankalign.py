"""Rank alignment of broadcasting operands (rounding/reconstruct/_rankalign.py): same values, full ranks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant.rounding.reconstruct._rankalign import BROADCASTING, align_ranks, transposes_as_reshapes


def _model(opset: int) -> onnx.ModelProto:
    """x [2, 3, 1] against scalars, a [3, 1] constant and a scalar input used twice; a Relu (not
    broadcasting) and an op whose inputs already have full rank."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Where", ["c", "m", "zero"], ["w"]),
        helper.make_node("Abs", ["w"], ["a"]),
        helper.make_node("Pow", ["a", "beta"], ["p"]),
        helper.make_node("Add", ["p", "col"], ["s"]),
        helper.make_node("Sub", ["s", "beta"], ["t"]),
        helper.make_node("Mul", ["t", "x"], ["u"]),
        helper.make_node("Relu", ["u"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 1]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, [2, 3, 1]),
            helper.make_tensor_value_info("beta", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 1])],
        initializer=[
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array([[1.0], [-2.0], [3.0]], np.float32), "col"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["out"], feeds)[0])


@pytest.mark.parametrize("opset", [11, 17])
def test_operands_get_full_rank_and_values_stay(opset: int) -> None:
    proto = _model(opset)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 1)).astype(np.float32)
    feeds = {"x": x, "c": x > 0, "beta": np.array(1.7, np.float32)}
    model = ir.from_proto(proto)
    onnx_ir.passes.common.ShapeInferencePass(strict_mode=False, data_prop=False)(model)
    # two, zero, col, and beta at Pow and at Sub (one Unsqueeze, shared)
    assert align_ranks(model) == 5
    for node in model.graph:
        if node.op_type in BROADCASTING:
            assert all(v is not None and v.shape is not None and len(v.shape) == 3 for v in node.inputs)
    unsqueezes = [node for node in model.graph if node.op_type == "Unsqueeze"]
    assert len(unsqueezes) == 1 and unsqueezes[0].inputs[0].name == "beta"
    assert model.graph.initializers["col_rank3"].const_value.numpy().shape == (1, 3, 1)  # type: ignore[union-attr]
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    aligned = ir.to_proto(model)
    onnx.checker.check_model(aligned, full_check=True)
    np.testing.assert_array_equal(_run(aligned, feeds), _run(proto, feeds))


def test_unknown_ranks_and_full_rank_inputs_are_left_alone() -> None:
    model = ir.from_proto(_model(17))  # no shape inference: output ranks unknown
    assert align_ranks(model) == 0


def test_transposes_that_move_only_size_one_axes_become_reshapes() -> None:
    """[2, 1, 3, 1] -> perm [1, 3, 0, 2] keeps 2 before 3: a Reshape. perm [3, 2, 1, 0] swaps them,
    a Transpose of a symbolic-shaped input and one feeding a graph output stay Transposes."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 3, 0, 2], name="moves_ones"),
        helper.make_node("Transpose", ["x"], ["b"], perm=[3, 2, 1, 0], name="reorders"),
        helper.make_node("Transpose", ["y"], ["c"], perm=[1, 0], name="symbolic"),
        helper.make_node("Transpose", ["x"], ["d"], perm=[1, 0, 2, 3], name="to_output"),
        helper.make_node("Relu", ["a"], ["out_a"]),
        helper.make_node("Relu", ["b"], ["out_b"]),
        helper.make_node("Relu", ["c"], ["out_c"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3, 1]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out_a", "out_b", "out_c", "d")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    onnx_ir.passes.common.ShapeInferencePass()(model)
    assert transposes_as_reshapes(model) == 1
    kinds = {node.name: node.op_type for node in model.graph}
    assert [kinds[n] for n in ("reorders", "symbolic", "to_output")] == ["Transpose"] * 3
    assert "moves_ones" not in kinds
    assert sorted(kinds.values()).count("Reshape") == 1
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.normal(size=(2, 1, 3, 1)).astype(np.float32),
        "y": rng.normal(size=(4, 1)).astype(np.float32),
    }
    sessions = [
        ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        for p in (proto, ir.to_proto(model))
    ]
    before, after = (s.run(None, feeds) for s in sessions)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert after[0].shape == (1, 1, 2, 3)
