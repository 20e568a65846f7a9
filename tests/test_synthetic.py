"""Synthetic validation inputs: default dims by role, value ranges from the graph, fallbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_mixquant.data import synthetic as S
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.read.model import ModelInput

ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
enc (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask,
     int64[batch, sequence] token_type_ids) => (float[batch, sequence, 4] out) <
    float[30, 4] words = {WORDS},
    float[2, 4] types = {0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5}
> {
    ids32 = Cast <to = 6> (input_ids)
    w = Gather (words, ids32)
    t = Gather (types, token_type_ids)
    m = Cast <to = 1> (attention_mask)
    axes = Constant <value_ints = [-1]> ()
    mu = Unsqueeze (m, axes)
    s = Add (w, t)
    out = Mul (s, mu)
}
""".replace("{WORDS}", "{" + ", ".join(f"{v}.0" for v in range(120)) + "}")

# A MatMul whose reduction dim is unnamed: the default (16) is rejected, a fallback (32) runs.
NEEDS_32 = """
<ir_version: 8, opset_import: ["" : 17]>
mm (float[N, ?] x) => (float[N, 2] y) {
    y = MatMul (x, w)
}
"""


def _encoder(tmp_path: Path) -> tuple[Path, ir.Model]:
    model = ir.from_onnx_text(ENCODER)
    path = tmp_path / "enc.onnx"
    ir.save(model, path)
    return path, model


def _inputs(model: ir.Model) -> list[ModelInput]:
    out = []
    for v in model.graph.inputs:
        assert v.shape is not None and v.dtype is not None
        dims = tuple(d if isinstance(d, int) else (d.value or "?") for d in v.shape)
        out.append(ModelInput(v.name or "", v.dtype.numpy().name, dims))
    return out


def test_default_dims_by_role() -> None:
    inputs = [
        ModelInput("pixel_values", "float32", ("N", 3, "?", "?")),
        ModelInput("ids", "int64", ("batch", "seq")),
        ModelInput("feats", "float32", ("batch", "frames", 80)),
        ModelInput("nhwc", "float32", (-1, "?", "?", 3)),
    ]
    plan = S.plan_inputs(inputs, None)
    assert plan.shapes == {
        "pixel_values": (1, 3, S.DEFAULT_IMAGE, S.DEFAULT_IMAGE),
        "ids": (1, S.DEFAULT_SEQUENCE),
        "feats": (1, S.DEFAULT_SEQUENCE, 80),
        "nhwc": (1, S.DEFAULT_IMAGE, S.DEFAULT_IMAGE, 3),
    }
    assert "input 'pixel_values' dim 2 (unnamed): 224 (image default)" in plan.chosen


def test_user_dims_by_name_and_by_position_win() -> None:
    inputs = [ModelInput("x", "float32", ("N", 3, "?", "?")), ModelInput("y", "float32", ("N", "L"))]
    plan = S.plan_inputs(inputs, None, {"N": 2, "x:2": 48, "x:3": 192, "L": 7})
    assert plan.shapes == {"x": (2, 3, 48, 192), "y": (2, 7)}
    assert plan.chosen == ()


def test_shared_dim_names_share_a_value() -> None:
    inputs = [ModelInput("a", "int64", ("b", "s")), ModelInput("c", "float32", ("b", "s", "s"))]
    plan = S.plan_inputs(inputs, None, {"s": 5})
    assert plan.shapes == {"a": (1, 5), "c": (1, 5, 5)}


def test_value_rules_from_the_graph(tmp_path: Path) -> None:
    path, model = _encoder(tmp_path)
    inputs = _inputs(model)
    plan = S.plan_inputs(inputs, model)
    assert plan.rules["input_ids"] == S.InputRule("index", 30, "indexes a table of 30 rows")
    assert plan.rules["token_type_ids"].kind == "index" and plan.rules["token_type_ids"].high == 2
    assert plan.rules["attention_mask"].kind == "mask"
    samples, used, why = S.synthetic_samples(path, inputs, model, None, 3, seed=4)
    assert why is None and samples is not None and samples.synthetic
    ids = np.concatenate([f["input_ids"] for f in samples.feeds])
    types = np.concatenate([f["token_type_ids"] for f in samples.feeds])
    assert ids.shape == (3, S.DEFAULT_SEQUENCE) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 30 and ids.max() > 10  # the whole table, not [0, 10)
    assert set(np.unique(types)) <= {0, 1}
    assert all((f["attention_mask"] == 1).all() for f in samples.feeds)
    again, _, _ = S.synthetic_samples(path, inputs, model, None, 3, seed=4)
    assert again is not None
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(samples.feeds, again.feeds, strict=True) for k in a)


def test_fallback_size_when_the_default_is_rejected(tmp_path: Path) -> None:
    model = ir.from_onnx_text(NEEDS_32)
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((32, 2), np.float32), name="w"))
    w.type, w.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([32, 2])
    model.graph.register_initializer(w)
    model.graph[0].replace_input_with(1, w)
    path = tmp_path / "mm.onnx"
    ir.save(model, path)
    samples, plan, why = S.synthetic_samples(path, _inputs(model), model, None, 2, seed=0)
    assert why is None and samples is not None
    assert plan.shapes["x"] == (1, 32) and "input 'x' dim 1 (unnamed): 32 (fallback)" in plan.chosen
    # a user value that does not fit: no fallback for dims the user gave; validation is impossible
    none, _, why = S.synthetic_samples(path, _inputs(model), model, {"x:1": 5}, 2, seed=0)
    assert none is None and why is not None and "rejects synthetic inputs" in why


def test_unknown_element_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match="input 'x'.*unknown element type"):
        S.plan_inputs([ModelInput("x", "?", (2,))], None)
    with pytest.raises(ConfigError, match=">= 1"):
        S.synthetic_samples(Path("unused.onnx"), [], None, None, 0, seed=0)


def test_fallback_moves_every_input_sharing_the_dim_name() -> None:
    inputs = [ModelInput("a", "float32", ("N", "L")), ModelInput("b", "float32", ("N", "L", 4))]
    plan = S.plan_inputs(inputs, None)
    assert plan.shapes == {"a": (1, S.DEFAULT_OTHER), "b": (1, S.DEFAULT_OTHER, 4)}
    assert plan.guessed == ("input 'a' dim 1 ('L'): 16 (other default)",)  # the shared name once
    moved = S._with_size(plan, inputs, 32)
    assert moved.shapes == {"a": (1, 32), "b": (1, 32, 4)}
    assert moved.chosen == (
        "input 'a' dim 0 ('N'): 1 (batch default)",
        "input 'a' dim 1 ('L'): 32 (fallback)",
    )
