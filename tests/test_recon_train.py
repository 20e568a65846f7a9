"""BRECQ training loop pieces: the beta/lambda schedule and Adam."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant.config import ReconConfig
from onnx_mixquant.errors import ConfigError

train = pytest.importorskip("onnx_mixquant.rounding.reconstruct.train")
_common = pytest.importorskip("onnx_mixquant.rounding.reconstruct._common")


def test_schedule_warmup_then_linear_beta() -> None:
    cfg = ReconConfig(iters=100, samples=64, batch=8)
    assert train._schedule(0, 100, cfg) == (20.0, 0.0)
    assert train._schedule(19, 100, cfg) == (20.0, 0.0)  # 20 % warm-up: no regulariser
    beta, lam = train._schedule(20, 100, cfg)
    assert (beta, lam) == (20.0, 0.01)
    assert train._schedule(60, 100, cfg)[0] == pytest.approx(11.0)  # halfway from 20 to 2
    assert train._schedule(100, 100, cfg)[0] == pytest.approx(2.0)


def test_schedule_follows_the_units_own_iterations() -> None:
    """A unit given twice the iterations (error split) warms up and anneals over its own count."""
    cfg = ReconConfig(iters=100, samples=64, batch=8)
    assert train._schedule(39, 200, cfg) == (20.0, 0.0)
    assert train._schedule(40, 200, cfg) == (20.0, 0.01)
    assert train._schedule(120, 200, cfg)[0] == pytest.approx(11.0)


def test_adam_minimises_a_quadratic() -> None:
    target = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    params = {"v": np.zeros(3, dtype=np.float32)}
    adam = _common.Adam(params, lr=0.05)
    for _ in range(500):
        adam.step(params, {"v": 2 * (params["v"] - target)})
    np.testing.assert_allclose(params["v"], target, atol=1e-2)


def test_recon_config_checks() -> None:
    with pytest.raises(ConfigError, match="batch"):
        ReconConfig(samples=16, batch=32)
    with pytest.raises(ConfigError, match="warmup"):
        ReconConfig(warmup=1.0)


def _pad_conv(named: bool) -> ir.Model:
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad" if named else ""),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [pads, w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def test_training_copy_folds_zero_pads_only_when_every_node_is_named() -> None:
    named = _pad_conv(True)
    folded = train._without_zero_pads(named)
    assert folded is not named and [n.op_type for n in folded.graph] == ["Conv"]
    assert list(folded.graph[0].attributes["pads"].value) == [1, 1, 1, 1]
    assert [n.op_type for n in named.graph] == ["Pad", "Conv"]  # the input model is untouched
    unnamed = _pad_conv(False)
    assert train._without_zero_pads(unnamed) is unnamed


@pytest.mark.parametrize(
    ("n", "batch", "train_on"),
    [(256, 32, 192), (1024, 32, 960), (128, 8, 96), (128, 16, 96), (96, 16, 72), (40, 16, 40), (64, 32, 64)],
)
def test_training_count_holds_out_a_quarter_up_to_64(n: int, batch: int, train_on: int) -> None:
    assert _common.training_count(n, batch) == train_on


def test_eta_extrapolates_the_rate_so_far() -> None:
    now = [100.0]
    eta = _common.Eta(total=1000, clock=lambda: now[0])
    assert eta.left(10) == ""  # 1 % done: too early to tell
    now[0] = 130.0  # 30 s for the first 100 iterations -> 270 s for the other 900
    assert eta.left(100) == "about 4 min left"
    assert eta.left(950) == "about 2 s left"
    now[0] = 100.0 + 3 * 3600  # 3 h for 500: 3 h more
    assert eta.left(500) == "about 3.0 h left"
    now[0] = 160.0
    eta.finished = 400  # earlier parts count: 600 done in 60 s
    assert eta.left(200) == "about 40 s left"
    assert eta.left(600) == ""  # done
    assert _common.Eta(total=0, clock=lambda: 0.0).left(0) == ""
