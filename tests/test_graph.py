"""Tests of onnx_mixquant.read.model: loading, shape inference and the weight-site scan."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_mixquant.errors import ModelLoadError, UnsupportedModelError
from onnx_mixquant.read.model import (
    MIN_OPSET,
    ModelInput,
    SkippedWeight,
    WeightSite,
    find_weight_sites,
    first_reader,
    load_model,
    read_model,
    weight_array,
    weight_values,
)
from onnx_mixquant.toolkit import default_opset, node_names

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "models"
HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def _init(name: str, shape: tuple[int, ...], dtype: str = "float", seed: int = 0) -> str:
    """Text of an initializer ``name`` holding seeded values (ints for int64)."""
    size = int(np.prod(shape))
    if dtype == "int64":
        values = [str(v) for v in range(size)]
    else:
        values = [str(v) for v in np.random.default_rng(seed).standard_normal(size).round(3)]
    dims = ",".join(map(str, shape))
    return f"{dtype}[{dims}] {name} = {{{', '.join(values)}}}"


def _model(inputs: str, outputs: str, inits: list[str], body: str, opset: int = 17) -> ir.Model:
    header = HEADER.replace("17", str(opset))
    text = f"{header}\ng ({inputs}) => ({outputs}) <{', '.join(inits)}> {{\n{body}\n}}"
    return ir.from_onnx_text(text)


def _scan(model: ir.Model) -> tuple[dict[str, WeightSite], dict[str, SkippedWeight]]:
    sites, skipped = find_weight_sites(model)
    return {s.name: s for s in sites}, {s.name: s for s in skipped}


@pytest.mark.parametrize(
    ("node", "shape", "axis"),
    [
        ("y = Conv (x, w)", (4, 3, 3, 3), 0),
        ("y = ConvTranspose (x, w)", (3, 4, 3, 3), 1),
        ("y = ConvTranspose <group = 3> (x, w)", (3, 2, 3, 3), 0),
        ("y = Gemm (x, w)", (3, 4), 1),
        ("y = Gemm <transB = 1> (x, w)", (4, 3), 0),
        ("y = MatMul (x, w)", (3, 4), 1),
        ("y = MatMul (x, w)", (2, 3, 4), 2),
        ("y = MatMul (w, x)", (4, 3), 0),
        ("y = MatMul (w, x)", (2, 4, 3), 1),
    ],
)
def test_weight_axis_per_op(node: str, shape: tuple[int, ...], axis: int) -> None:
    model = _model("float[N,3,8,8] x", "float y", [_init("w", shape)], node)
    sites, skipped = find_weight_sites(model)
    op = node.split()[2]
    assert skipped == ()
    assert sites == (WeightSite("w", shape, axis, (f"{op}_0",), (op,), (), "", "initializer"),)
    assert sites[0].size == int(np.prod(shape))


def test_constant_node_weight_and_weight_array() -> None:
    model = _model(
        "float[N,3] x",
        "float y",
        [],
        "w = Constant <value = float[3,2] {1, 2, 3, 4, 5, 6}> ()\ny = MatMul (x, w)",
    )
    (site,), _ = find_weight_sites(model)
    assert (site.name, site.source, site.axis, site.shape) == ("w", "constant", 1, (3, 2))
    array = weight_array(weight_values(model)["w"])
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.arange(1, 7, dtype=np.float32).reshape(3, 2))


def test_weights_in_if_branches_and_loop_body_in_walk_order() -> None:
    model = _model(
        "float[N,3] x, bool c, int64 n",
        "float y, float z, float u",
        [_init("w_main", (3, 3)), _init("w_late", (3, 3), seed=1)],
        f"""
        z = Loop (n, c, x) <body = body (int64 i, bool ci, float[N,3] xi) => (bool co, float xo)
            <{_init("w_loop", (3, 3), seed=2)}> {{ co = Identity (ci)  xo = MatMul (xi, w_loop) }}>
        y = If (c) <
            then_branch = t () => (float ty) <{_init("w_then", (3, 3), seed=3)}>
                {{ ty = MatMul (x, w_then) }},
            else_branch = e () => (float ey) {{
                w_else = Constant <value = float[3,3] {{1,2,3,4,5,6,7,8,9}}> ()
                h = MatMul (x, w_main)
                ey = MatMul (h, w_else) }}>
        u = MatMul (y, w_late)
        """,
    )
    sites, skipped = find_weight_sites(model)
    assert skipped == ()
    assert [(s.name, s.graph, s.source, s.consumers) for s in sites] == [
        ("w_loop", "Loop_0/body", "initializer", ("MatMul_2",)),
        ("w_then", "If_3/then_branch", "initializer", ("MatMul_4",)),
        ("w_main", "", "initializer", ("MatMul_6",)),
        ("w_else", "If_3/else_branch", "constant", ("MatMul_7",)),
        ("w_late", "", "initializer", ("MatMul_8",)),
    ]
    values = weight_values(model)
    assert list(values) == [s.name for s in sites]
    assert values["w_loop"].graph is not model.graph
    assert weight_array(values["w_else"]).shape == (3, 3)
    names = node_names(model)
    readers = {k: first_reader(v) for k, v in values.items()}
    assert {k: names[n] for k, n in readers.items() if n is not None} == {
        "w_loop": "MatMul_2",
        "w_then": "MatMul_4",
        "w_main": "If_3",  # read inside the else branch: a DQ must go before the If
        "w_else": "MatMul_7",
        "w_late": "MatMul_8",
    }


def test_shared_weight_is_one_site_and_keeps_other_readers() -> None:
    model = _model(
        "float[N,3,8,8] x",
        "float y, float z, float s",
        [_init("w", (3, 3, 1, 1))],
        "a = Conv (x, w)\ny = Conv (a, w)\nz = Add (w, w)\ns = Relu (w)",
    )
    (site,), _ = find_weight_sites(model)
    assert site.consumers == ("Conv_0", "Conv_1")
    assert site.op_types == ("Conv", "Conv")
    assert site.other_consumers == ("Add_2", "Relu_3")
    assert site.axis == 0


def test_consumers_disagreeing_on_axis_give_per_tensor() -> None:
    model = _model(
        "float[N,4] x",
        "float y, float z",
        [_init("w", (4, 4))],
        "y = MatMul (x, w)\nz = Gemm <transB = 1> (x, w)",
    )
    (site,), _ = find_weight_sites(model)
    assert site.axis is None
    assert site.op_types == ("MatMul", "Gemm")


def test_node_names_fall_back_without_clashing() -> None:
    model = _model(
        "float[N,3,8,8] x",
        "float y",
        [_init("w", (3, 3, 1, 1))],
        "a = Conv (x, w)\n[Conv_0] y = Relu (a)",
    )
    assert sorted(node_names(model).values()) == ["Conv_0", "Conv_0_"]
    (site,), _ = find_weight_sites(model)
    assert site.consumers == ("Conv_0_",)
    assert [n.name for n in model.graph] == ["", "Conv_0"]  # the model is not renamed


def test_biases_stay_float() -> None:
    model = _model(
        "float[N,3,8,8] x, float[N,4] v",
        "float y, float g, float m",
        [
            _init("w", (4, 3, 3, 3)),
            _init("b", (4,)),
            _init("gw", (4, 4)),
            _init("gc", (4,)),
            _init("mw", (4, 4)),
            _init("mb", (4,)),
        ],
        "y = Conv (x, w, b)\ng = Gemm (v, gw, gc)\nmm = MatMul (v, mw)\nm = Add (mm, mb)",
    )
    sites, skipped = _scan(model)
    assert list(sites) == ["w", "gw", "mw"]
    assert skipped["b"].reason == "bias of Conv_0 (biases stay float)"
    assert skipped["gc"].reason == "bias of Gemm_1 (biases stay float)"
    assert skipped["mb"].reason == "bias of Add_3 (biases stay float)"
    assert skipped["b"] == SkippedWeight("b", (4,), "FLOAT", skipped["b"].reason)


def test_tensors_left_alone_and_why() -> None:
    model = _model(
        "float[N,3] x, float[N,3,8,8] img, float[3] k",
        "float r, float d, float ga, float mm, float v, float i, float c, float o, float p",
        [
            _init("shape", (2,), "int64"),
            _init("q", (4, 3), "int64"),
            _init("q_scale", (1,)),
            _init("ga_a", (3, 3)),
            _init("mm_a", (3, 3)),
            _init("mm_b", (3, 3), seed=1),
            _init("vec", (3,)),
            _init("ident", (3, 3)),
            _init("unused", (3, 3)),
            _init("fp16", (4, 3, 1, 1)),
        ],
        """
        r = Reshape (x, shape)
        d = DequantizeLinear (q, q_scale)
        ga = Gemm (ga_a, x)
        mm = MatMul (mm_a, mm_b)
        v = MatMul (x, vec)
        i = Identity (ident)
        two = Constant <value_float = 2.0> ()
        ax = Constant <value = int64[1] {0}> ()
        c = Mul (x, two)
        o = Unsqueeze (x, ax)
        p = Conv (img, fp16)
        """,
    )
    fp16 = model.graph.initializers["fp16"]
    fp16.const_value = ir.tensor(np.ones((4, 3, 1, 1), np.float16), name="fp16")
    fp16.dtype = ir.DataType.FLOAT16
    sites, skipped = _scan(model)
    assert sites == {}
    assert first_reader(model.graph.initializers["unused"]) is None
    reasons = {name: s.reason for name, s in skipped.items()}
    assert reasons == {
        "shape": "integer tensor",
        "q": "already quantized",
        "q_scale": "already quantized",
        "ga_a": "input A of Gemm Gemm_2 (only B is quantized)",
        "mm_a": "both inputs of MatMul MatMul_3 are constant",
        "mm_b": "both inputs of MatMul MatMul_3 are constant",
        "vec": "rank-1 weight of MatMul_4 (rank < 2)",
        "ident": "not a weight of Conv/ConvTranspose/Gemm/MatMul (read by Identity)",
        "unused": "unused",
        "fp16": "dtype FLOAT16 not supported",
        "two": "scalar/1-D constant",
        "ax": "integer tensor",
    }
    assert list(reasons)[-2:] == ["two", "ax"]  # initializers first, then Constant nodes
    assert skipped["shape"].dtype == "INT64"
    assert (skipped["two"].dtype, skipped["two"].shape) == ("FLOAT", ())
    assert skipped["fp16"].shape == (4, 3, 1, 1)


def test_overridable_graph_input_is_skipped() -> None:
    text = f"""<ir_version: 3, opset_import: ["" : 11]>
    g (float[N,3] x, float[3,4] w) => (float y) <{_init("w", (3, 4))}> {{ y = MatMul (x, w) }}"""
    model = ir.from_onnx_text(text)
    sites, skipped = _scan(model)
    assert sites == {}
    assert skipped["w"].reason == "overridable graph input"


def test_duplicate_value_name_in_subgraph_raises() -> None:
    model = _model(
        "float[N,3] x, bool c",
        "float y",
        [_init("w", (3, 3))],
        f"""y = If (c) <
            then_branch = t () => (float ty) <{_init("w", (3, 3))}> {{ ty = MatMul (x, w) }},
            else_branch = e () => (float ey) {{ ey = MatMul (x, w) }}>""",
    )
    with pytest.raises(UnsupportedModelError, match=r"'w' is defined twice.*If_0/then_branch"):
        find_weight_sites(model)


def test_weight_array_refuses_non_float32() -> None:
    model = _model("int64[2] x", "int64 y", [_init("s", (2,), "int64")], "y = Add (x, s)")
    with pytest.raises(UnsupportedModelError, match="'s': dtype INT64"):
        weight_array(model.graph.initializers["s"])
    with pytest.raises(UnsupportedModelError, match="no stored tensor"):
        weight_array(model.graph.inputs[0])


def _conv_model(opset: int = 17) -> ir.Model:
    return _model(
        "float[N,3,8,8] x",
        "float[N,4,8,8] y",
        [_init("w", (4, 3, 3, 3)), _init("b", (4,))],
        "h = Conv <pads = [1, 1, 1, 1]> (x, w, b)\ny = Relu (h)",
        opset,
    )


def test_read_model_facts(tmp_path: Path) -> None:
    path = tmp_path / "conv.onnx"
    ir.save(_conv_model(), path)
    read = read_model(path)
    assert read.path == path
    assert read.file_bytes == path.stat().st_size
    assert read.opset == 17 == default_opset(read.model)
    assert read.inputs == (ModelInput("x", "float32", ("N", 3, 8, 8)),)
    assert read.output_names == ("y",)
    assert [s.name for s in read.sites] == ["w"]
    assert [s.name for s in read.skipped] == ["b"]
    h = read.model.graph.node(0).outputs[0]
    assert h.shape is not None and list(h.shape)[1:] == [4, 8, 8]  # inferred once
    assert list(read.model.graph.initializers) == ["w", "b"]  # file order kept


def test_external_data_loads(tmp_path: Path) -> None:
    model = _conv_model()
    expected = weight_array(model.graph.initializers["w"]).copy()
    path = tmp_path / "conv.onnx"
    ir.save(model, path, external_data="w.data", size_threshold_bytes=0)
    assert (tmp_path / "w.data").is_file()
    read = read_model(path)
    value = weight_values(read.model)["w"]
    assert isinstance(value.const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(weight_array(value), expected)
    assert read.file_bytes == path.stat().st_size + (tmp_path / "w.data").stat().st_size
    assert read.model.graph.node(0).outputs[0].shape is not None  # shapes inferred
    (tmp_path / "w.data").unlink()
    with pytest.raises(ModelLoadError, match=r"conv\.onnx: external data file 'w.data'"):
        load_model(path)


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.onnx"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "truncated":
        ir.save(_conv_model(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "tensor":
        tensor = ir.tensor(np.ones((4, 4), np.float32), name="t")
        path.write_bytes(ir.serde.serialize_tensor(tensor).SerializeToString())
    elif kind == "graph":
        path.write_bytes(ir.serde.serialize_graph(_conv_model().graph).SerializeToString())
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "not a valid ONNX model: empty file"),
        ("random", "not a valid ONNX model"),
        ("truncated", "not a valid ONNX model"),
        ("tensor", "not a.* ONNX model"),
        ("graph", "not a.* ONNX model"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, kind: str, message: str) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(ModelLoadError, match=f"{kind}.onnx: {message}") as info:
        read_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("opset", "word"), [(7, "older"), (MIN_OPSET - 1, "older"), (99, "newer")])
def test_load_rejects_unsupported_opset(tmp_path: Path, opset: int, word: str) -> None:
    path = tmp_path / "old.onnx"
    ir.save(_conv_model(opset), path)
    with pytest.raises(UnsupportedModelError, match=f"old.onnx: opset {opset} is {word}"):
        load_model(path)


def test_min_opset_loads(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    ir.save(_conv_model(MIN_OPSET), path)
    assert default_opset(load_model(path)) == MIN_OPSET


@pytest.mark.skipif(not BENCH.is_dir(), reason="shared/bench not present")
@pytest.mark.parametrize(("name", "convs"), [("resnet20_cifar10", 19), ("efficientnet_lite0", 49)])
def test_bench_models(name: str, convs: int) -> None:
    read = read_model(BENCH / f"{name}.onnx")
    ops = collections.Counter(s.op_types for s in read.sites)
    assert ops == {("Conv",): convs, ("Gemm",): 1}
    assert read.sites[-1].op_types == ("Gemm",) and read.sites[-1].axis == 0
    assert all(s.axis == 0 and s.graph == "" and not s.other_consumers for s in read.sites)
    assert read.inputs == (ModelInput("input", "float32", ("N", 3, *read.inputs[0].dims[2:])),)
    assert read.output_names == ("logits",)
    reasons = collections.Counter(
        (s.dtype, s.reason.split(" of ")[0] if s.reason.startswith("bias") else s.reason)
        for s in read.skipped
    )
    assert reasons[("FLOAT", "bias")] == convs + 1
    assert {dtype for dtype, reason in reasons if reason == "integer tensor"} == {"INT64"}
    assert all(dtype == "INT64" or reason != "integer tensor" for dtype, reason in reasons)
    if name == "efficientnet_lite0":  # ReLU6 bounds and Pad values of the "same" padding
        assert reasons[("FLOAT", "not a weight of Conv/ConvTranspose/Gemm/MatMul (read by Clip)")]
        assert reasons[("FLOAT", "not a weight of Conv/ConvTranspose/Gemm/MatMul (read by Pad)")]
    first = weight_array(weight_values(read.model)[read.sites[0].name])
    assert first.dtype == np.float32 and first.shape == read.sites[0].shape
