"""reconstruct.blocks.partition: BRECQ units from cut points, and the layer fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import make_if_model, make_mixed_model
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.read.model import find_weight_sites, read_model
from onnx_mixquant.rounding.reconstruct.blocks import Unit, partition
from onnx_mixquant.toolkit import node_names

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "models"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/bench is absent")


class _Net:
    """A model under construction: nodes named after their outputs, seeded random weights."""

    def __init__(self, channels: int = 4) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(0)
        self.c = channels

    def op(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        return self.op("Constant", [], name, value=numpy_helper.from_array(value, name + "_v"))

    def conv(self, x: str, out: str, cin: int = 0, cout: int = 0, k: int = 3, group: int = 1) -> str:
        cin, cout = cin or self.c, cout or self.c
        w = self.rng.normal(size=(cout, cin // group, k, k)).astype(np.float32) * 0.3
        self.inits.append(numpy_helper.from_array(w, out + "_W"))
        pads = [k // 2] * 4
        return self.op("Conv", [x, out + "_W"], out, pads=pads, group=group)

    def model(self, output: str, inputs: dict[str, list[int | str]] | None = None) -> ir.Model:
        inputs = inputs or {"x": ["N", self.c, 6, 6]}
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            initializer=self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
        return ir.from_proto(proto)


def _partition(model: ir.Model, **kwargs: object) -> tuple[Unit, ...]:
    sites, _ = find_weight_sites(model)
    units = partition(model, sites, **kwargs)  # type: ignore[arg-type]
    _check_units(model, units, sites)
    return units


def _check_units(model: ir.Model, units: tuple[Unit, ...], sites: tuple) -> None:
    """Each main-graph site in exactly one unit; each unit a closed graph from its inputs."""
    weights = [w for u in units for w in u.weights]
    assert len(weights) == len(set(weights))
    main = {s.name for s in sites if s.graph == ""}
    assert set(weights) <= main
    by_name = {name: node for node, name in node_names(model).items()}
    for unit in units:
        members = [by_name[n] for n in (*unit.nodes, *unit.const_nodes)]
        produced = {v.name for node in members for v in node.outputs}
        given = {unit.input, *unit.extra_inputs, *unit.shape_inputs}
        for node in members:
            for v in node.inputs:
                assert v is None or v.name in produced | given or v.is_initializer(), (unit.name, v)
        assert unit.output in produced and unit.input not in produced
        assert unit.name.startswith(f"{unit.kind} {units.index(unit)}: {unit.nodes[0]}")


def _residual(shortcut: str) -> _Net:
    """x -> conv1 -> relu1 -> conv2 -> add(., x | 1x1 conv(x)) -> out (Relu)."""
    net = _Net()
    r1 = net.op("Relu", [net.conv("x", "c1")], "r1")
    c2 = net.conv(r1, "c2")
    skip = net.conv("x", "sc", k=1) if shortcut == "conv" else "x"
    net.op("Relu", [net.op("Add", [c2, skip], "add")], "out")
    return net


def test_chain_every_cut_ends_a_unit() -> None:
    """conv-relu-conv-relu: every tensor is a cut point; each layer with its activation is a unit."""
    net = _Net()
    net.op("Relu", [net.conv(net.op("Relu", [net.conv("x", "c1")], "r1"), "c2")], "r2")
    units = _partition(net.model("r2"))
    assert [(u.nodes, u.input, u.output, u.kind, u.reason) for u in units] == [
        (("c1", "r1"), "x", "r1", "block", ""),
        (("c2", "r2"), "r1", "r2", "block", ""),
    ]
    assert [u.weights for u in units] == [("c1_W",), ("c2_W",)]


def test_linear_bottleneck_joins_the_layers_before_it() -> None:
    """conv-relu-conv: the last conv has no activation (MBConv projection): one block."""
    net = _Net()
    net.conv(net.op("Relu", [net.conv("x", "c1")], "r1"), "c2")
    (unit,) = _partition(net.model("c2"))
    assert (unit.nodes, unit.input, unit.output, unit.weights) == (
        ("c1", "r1", "c2"),
        "x",
        "c2",
        ("c1_W", "c2_W"),
    )


def test_residual_identity_shortcut_is_one_block() -> None:
    (unit,) = _partition(_residual("identity").model("out"))
    assert unit.nodes == ("c1", "r1", "c2", "add", "out")
    assert (unit.input, unit.output, unit.kind, unit.weights) == ("x", "out", "block", ("c1_W", "c2_W"))
    assert unit.name == "block 0: c1 .. out"


def test_residual_conv_shortcut_is_one_block_of_three() -> None:
    (unit,) = _partition(_residual("conv").model("out"))
    assert set(unit.nodes) == {"c1", "r1", "c2", "sc", "add", "out"}
    assert unit.weights == ("c1_W", "c2_W", "sc_W")


def test_stem_then_blocks_then_head() -> None:
    """stem conv+relu | residual block | pool-flatten-gemm: the ResNet shape, 3 units."""
    net = _Net()
    r0 = net.op("Relu", [net.conv("x", "c0")], "r0")
    r1 = net.op("Relu", [net.conv(r0, "c1")], "r1")
    net.op("Relu", [net.op("Add", [net.conv(r1, "c2"), r0], "add")], "out")
    flat = net.op("Flatten", [net.op("GlobalAveragePool", ["out"], "gap")], "flat")
    net.inits.append(numpy_helper.from_array(np.ones((3, net.c), np.float32), "fc_W"))
    net.op("Gemm", [flat, "fc_W"], "fc", transB=1)
    units = _partition(net.model("fc"))
    assert [u.nodes for u in units] == [("c0", "r0"), ("c1", "r1", "c2", "add", "out"), ("gap", "flat", "fc")]
    assert [u.input for u in units] == ["x", "r0", "out"]


def test_inverted_residual_with_depthwise_conv() -> None:
    """expand 1x1 -> Clip -> depthwise (group=C) -> Clip -> project 1x1 -> Add(x): one block."""
    net = _Net()
    lo, hi = net.const("lo", np.array(0, np.float32)), net.const("hi", np.array(6, np.float32))
    e = net.op("Clip", [net.conv("x", "expand", cout=16, k=1), lo, hi], "e6")
    d = net.op("Clip", [net.conv(e, "dw", cin=16, cout=16, group=16), lo, hi], "d6")
    net.op("Add", [net.conv(d, "project", cin=16, k=1), "x"], "out")
    (unit,) = _partition(net.model("out"))
    assert unit.nodes == ("expand", "e6", "dw", "d6", "project", "out")
    assert unit.weights == ("expand_W", "dw_W", "project_W")
    assert unit.const_nodes == ("lo", "hi")


def _padded_head() -> _Net:
    """Constant->Cast pads -> Pad -> conv -> relu -> conv -> relu -> pool -> Reshape(Shape(x)) -> Gemm."""
    net = _Net()
    pads = net.op("Cast", [net.const("pads64", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32))], "pads", to=7)
    r1 = net.op("Relu", [net.conv(net.op("Pad", ["x", pads], "pad"), "c1")], "r1")
    r2 = net.op("Relu", [net.conv(r1, "c2")], "r2")
    batch = net.op("Gather", [net.op("Shape", ["x"], "shape"), net.const("zero", np.array(0))], "n")
    axes = net.const("axes", np.array([0]))
    dims = net.op(
        "Concat", [net.op("Unsqueeze", [batch, axes], "n1"), net.const("m1", np.array([-1]))], "dims", axis=0
    )
    flat = net.op("Reshape", [net.op("GlobalAveragePool", [r2], "gap"), dims], "flat")
    net.inits.append(numpy_helper.from_array(np.ones((3, net.c), np.float32), "fc_W"))
    net.op("Gemm", [flat, "fc_W"], "fc", transB=1)
    return net


def test_constant_chains_are_const_nodes() -> None:
    model = _padded_head().model("fc")
    units = _partition(model, max_weights=2)  # 2: keep the conv layers out of the head's block
    assert [u.nodes for u in units] == [("pad", "c1", "r1"), ("c2", "r2"), ("gap", "flat", "fc")]
    assert units[0].const_nodes == ("pads64", "pads")
    assert units[2].const_nodes == ("shape", "zero", "n", "axes", "n1", "m1", "dims")
    assert units[2].shape_inputs == ("x",)  # Shape(x) sets the batch size: only x's shape is read
    merged = _partition(model)  # by default the linear Gemm pulls in the conv layers before it
    assert [u.nodes for u in merged] == [("pad", "c1", "r1", "c2", "r2", "gap", "flat", "fc")]
    assert merged[0].shape_inputs == ()  # x is the unit's own input


def test_units_extract_and_run_standalone() -> None:
    """Each unit's nodes + const_nodes, fed its inputs, give the full model's tensor exactly."""
    model = _padded_head().model("fc")
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    for unit in _partition(model, max_weights=2):
        sub = ir.convenience.extract(model.graph, [unit.input, *unit.shape_inputs], [unit.output])
        sub.opset_imports.update(model.opset_imports)
        assert len(sub) == len(unit.nodes) + len(unit.const_nodes)
        probe = ir.from_proto(ir.to_proto(model))
        values = {v.name: v for node in probe.graph for v in node.outputs}
        probe.graph.outputs.clear()
        probe.graph.outputs.extend(
            [values[unit.output]] + ([values[unit.input]] if unit.input != "x" else [])
        )
        expected, *given = _run(probe, {"x": x})
        feeds = {unit.input: given[0] if given else x, **{name: x for name in unit.shape_inputs}}
        np.testing.assert_array_equal(_run(ir.Model(sub, ir_version=8), feeds)[0], expected)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_layer_granularity() -> None:
    units = _partition(_residual("conv").model("out"), blocks=False)
    assert [(u.nodes, u.input, u.output) for u in units] == [
        (("c1", "r1"), "x", "r1"),  # Relu folded in: it is the only reader of c1
        (("c2",), "r1", "c2"),  # read by the Add: no activation to fold
        (("sc",), "x", "sc"),
    ]
    assert {(u.kind, u.reason) for u in units} == {("layer", "layer granularity requested")}


def test_block_with_op_without_gradient_splits_into_layers() -> None:
    """Swish (x * Sigmoid(x)) inside a residual block; Sigmoid has no gradient rule."""
    net = _Net()
    c1 = net.conv("x", "c1")
    s1 = net.op("Mul", [c1, net.op("Sigmoid", [c1], "sig")], "s1")
    net.op("Add", [net.conv(s1, "c2"), "x"], "out")
    model = net.model("out")
    (block,) = _partition(model)
    assert block.kind == "block"
    units = _partition(model, differentiable=lambda op: op != "Sigmoid")
    assert [(u.nodes, u.kind, u.reason, u.differentiable) for u in units] == [
        (("c1",), "layer", "op Sigmoid has no gradient rule", True),
        (("c2",), "layer", "op Sigmoid has no gradient rule", True),
    ]


def test_layer_with_op_without_gradient_is_flagged() -> None:
    net = _Net()
    net.conv(net.op("Relu", [net.conv("x", "c1")], "r1"), "c2")
    for blocks in (True, False):
        units = _partition(net.model("c2"), blocks=blocks, differentiable=lambda op: op != "Relu")
        assert [(u.nodes, u.kind, u.differentiable) for u in units] == [
            (("c1", "r1"), "layer", False),
            (("c2",), "layer", True),
        ]
        assert units[0].reason == "op Relu in this layer has no gradient rule"


def test_max_weights_splits_a_block() -> None:
    units = _partition(_residual("conv").model("out"), max_weights=2)
    assert [u.weights for u in units] == [("c1_W",), ("c2_W",), ("sc_W",)]
    assert {(u.kind, u.reason) for u in units} == {
        ("layer", "no single-entry single-exit block of at most 2 layers")
    }
    with pytest.raises(ConfigError, match="max_weights=0"):
        _partition(_residual("conv").model("out"), max_weights=0)


def test_no_cut_points_falls_back_to_layers() -> None:
    """A second input read by every layer: no single-entry block anywhere."""
    net = _Net()
    a1 = net.op("Add", [net.conv("x", "c1"), "m"], "a1")
    net.op("Add", [net.conv(a1, "c2"), "m"], "out")
    model = net.model("out", {"x": ["N", 4, 6, 6], "m": ["N", 4, 6, 6]})
    units = _partition(model)
    assert [(u.nodes, u.input, u.kind) for u in units] == [(("c1",), "x", "layer"), (("c2",), "a1", "layer")]
    assert units[0].reason == "no single-entry single-exit block of at most 8 layers"


def test_layer_reading_two_activations() -> None:
    """Gemm(x, W, C=Relu(x)): input x, extra input the Relu output."""
    net = _Net()
    net.inits.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "W"))
    net.op("Gemm", ["x", "W", net.op("Relu", ["x"], "r")], "y")
    (unit,) = _partition(net.model("y", {"x": ["N", 4]}), blocks=False)
    assert (unit.nodes, unit.input, unit.extra_inputs) == (("y",), "x", ("r",))


def test_subgraph_sites_get_no_unit() -> None:
    model = ir.from_proto(make_if_model())
    sites, _ = find_weight_sites(model)
    assert sites and _partition(model) == ()


def test_shared_and_constant_weights() -> None:
    """conftest's mixed model: W2 from a Constant node, W4 also read by a ReduceSum."""
    model = ir.from_proto(onnx.shape_inference.infer_shapes(make_mixed_model()))
    units = _partition(model)
    assert [u.nodes for u in units] == [("conv1", "relu1", "conv2"), ("flatten", "gemm"), ("matmul", "add")]
    assert [u.const_nodes for u in units] == [("w2_const",), (), ("w4_sum",)]
    assert units[2].weights == ("W4",)
    assert units == _partition(model)  # deterministic


@needs_bench
@pytest.mark.parametrize(
    ("name", "blocks", "sizes"),
    [
        ("resnet20_cifar10", 11, [1] + [2] * 9 + [1]),
        ("resnet56_cifar10", 29, [1] + [2] * 27 + [1]),
        ("efficientnet_lite0", 17, [3] * 16 + [2]),
    ],
)
def test_bench_models(name: str, blocks: int, sizes: list[int]) -> None:
    read = read_model(BENCH / f"{name}.onnx")
    units = partition(read.model, read.sites)
    _check_units(read.model, units, read.sites)
    assert [len(u.weights) for u in units] == sizes and len(units) == blocks
    assert {u.kind for u in units} == {"block"}
    assert sorted(w for u in units for w in u.weights) == sorted(s.name for s in read.sites)
    layers = partition(read.model, read.sites, blocks=False)
    _check_units(read.model, layers, read.sites)
    assert len(layers) == len(read.sites)
