"""Output sensitivity: the probe substitutes exactly one weight, logits are compared as
probabilities, unprobed rows are scaled onto the probed ones, and the search follows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_mixquant.config import QuantizerConfig, SearchConfig
from onnx_mixquant.numerics import choose_qparams, fake_quantize
from onnx_mixquant.search import sensitivity as S
from onnx_mixquant.search.budget import build_error_table, search_bitwidths

# x -> MatMul(w1) -> Relu -> MatMul(w2) + b -> logits; w3 is a Constant node feeding a side output.
MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 8] x) => (float[N, 5] logits, float[N, 4] side) {
    w3 = Constant <value = float[8, 4] w3 {W3}> ()
    h = MatMul (x, w1)
    r = Relu (h)
    z = MatMul (r, w2)
    logits = Add (z, b)
    side = MatMul (x, w3)
}
"""


def _mlp(rng: np.random.Generator) -> ir.Model:
    w3 = rng.standard_normal((8, 4)).astype(np.float32)
    model = ir.from_onnx_text(MLP.replace("{W3}", "{" + ", ".join(f"{v:.6f}" for v in w3.ravel()) + "}"))
    for name, shape in (("w1", (8, 16)), ("w2", (16, 5)), ("b", (5,))):
        t = ir.tensor(rng.standard_normal(shape).astype(np.float32), name=name)
        v = ir.Value(name=name, const_value=t, shape=ir.Shape(list(shape)), type=ir.TensorType(t.dtype))
        model.graph.register_initializer(v)
        for node in model.graph:
            for i, inp in enumerate(node.inputs):
                if inp is not None and inp.name == name and inp is not v:
                    node.replace_input_with(i, v)
    return model


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    out = {n: model.graph.initializers[n].const_value.numpy() for n in ("w1", "w2")}
    const = next(n for n in model.graph if n.op_type == "Constant")
    out["w3"] = const.attributes["value"].as_tensor().numpy()
    return out


def test_output_kinds() -> None:
    model = _mlp(np.random.default_rng(0))
    assert S.output_kinds(model) == {"logits": "logits", "side": "logits"}
    norm = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        ln (float[N, 4] x, float[4] g, float[4] be) => (float[N, 4] y, float[N, 4] p) {
            m = Mul (x, g)
            y = Add (m, be)
            p = Softmax (x)
        }
        """
    )
    assert S.output_kinds(norm) == {"y": "raw", "p": "probabilities"}


def test_probe_substitutes_one_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    weights = _weights(model)
    axes = {"w1": 1, "w2": 1, "w3": 1}
    q = QuantizerConfig()
    table = build_error_table(weights, axes, q, (2, 3, 4, 8))
    feeds = [{"x": rng.standard_normal((3, 8)).astype(np.float32)}]
    sens = S.measure_sensitivity(model, weights, axes, table.normalised(), table.bits, q, feeds, "test")
    assert sens.probed == ("w1", "w2", "w3")  # the Constant node's weight too
    # recompute D[w2, 3 bits] by hand: only w2 fake-quantized, logits compared as probabilities
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    w2q = fake_quantize(weights["w2"], choose_qparams(weights["w2"], 3, symmetric=False, axis=1))
    by_hand = _model_with(model, "w2", w2q, tmp_path / "q.onnx")
    ref = ort.InferenceSession(str(path)).run(None, feeds[0])
    got = ort.InferenceSession(str(by_hand)).run(None, feeds[0])

    def soft(y: np.ndarray) -> np.ndarray:
        e = np.exp(y.astype(np.float64) - y.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    rel = [np.sum((soft(a) - soft(b)) ** 2) / np.sum(soft(a) ** 2) for a, b in zip(ref, got, strict=True)]
    assert sens.output_error[1, 1] == pytest.approx(np.mean(rel), rel=1e-6)
    assert rel[1] == 0.0  # the side output does not read w2
    # widths above PROBED_MAX_BITS follow the roundoff error's ratio
    ratio = sens.output_error[:, 2] / table.normalised()[:, 2]
    np.testing.assert_allclose(sens.output_error[:, 3], ratio * table.normalised()[:, 3])


def _model_with(model: ir.Model, name: str, value: np.ndarray, path: Path) -> Path:
    copy = model.clone()
    copy.graph.initializers[name].const_value = ir.tensor(value, name=name)
    ir.save(copy, path)
    return path


def test_unprobed_rows_take_the_median_ratio() -> None:
    out = np.array([[4.0, 2.0], [9.0, 3.0], [np.nan, np.nan]])
    norm = np.array([[2.0, 1.0], [3.0, 1.0], [10.0, 5.0]])
    S._fill_unprobed(out, norm, [True, True, False])
    np.testing.assert_allclose(out[2], [10.0 * 2.5, 5.0 * 2.5])


def test_search_minimises_the_given_objective() -> None:
    rng = np.random.default_rng(2)
    weights = {"big": rng.standard_normal((64, 64)).astype(np.float32), "small": rng.standard_normal((8, 8))}
    weights["small"] = weights["small"].astype(np.float32)
    table = build_error_table(weights, {"big": 0, "small": 0}, QuantizerConfig(), (2, 4, 8))
    cfg = SearchConfig(target_bits=4.0, candidate_bits=(2, 4, 8))
    plain = search_bitwidths(table, cfg)
    assert plain.bits["big"] == 4
    # an output error that makes "small" the sensitive one: it gets 8 bits, paid for by "big"
    objective = table.normalised().copy()
    objective[0] *= 1e-3
    objective[1] *= 1e3
    steered = search_bitwidths(table, cfg, objective=objective)
    assert plain.bits["small"] < 8 and steered.bits == {"big": 2, "small": 8}
    with pytest.raises(ValueError, match="shaped"):
        search_bitwidths(table, cfg, objective=objective[:1])


def test_guarded_objective_weights_up_outliers_only() -> None:
    normalised = np.array([[0.1, 0.02], [0.2, 0.04], [0.1, 0.03], [0.4, 0.1], [0.5, 0.1]])
    ratios = np.array([1.0, 2.0, 1.5, 300.0, 1.0])  # D / normalised per weight
    sens = S.Sensitivity(
        names=("a", "b", "c", "head", "sub"),
        bits=(3, 4),
        output_error=normalised * ratios[:, None],
        probed=("a", "b", "c", "head"),  # "sub" (inside an If body) was not probed
        samples=4,
        source="test",
        seconds=0.0,
        run_bits=(3, 4),
    )
    objective, boosted = S.guarded_objective(normalised, sens, ratio=10.0)
    # median ratio of the probed rows is 1.75: only "head" (300 > 17.5) is weighted, by 300 / 1.75
    assert boosted == {"head": pytest.approx(300.0 / 1.75)}
    np.testing.assert_allclose(objective[3], normalised[3] * 300.0 / 1.75)
    np.testing.assert_array_equal(np.delete(objective, 3, axis=0), np.delete(normalised, 3, axis=0))


def test_guarded_pipeline_moves_a_flagged_head_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline probes the model and hands the guarded objective to the search: a head the
    probe flags gets more bits than the roundoff rule gives it (the probe's numbers are forced)."""
    from onnx_mixquant import QuantConfig, ValidateConfig, quantize
    from onnx_mixquant.config import Objective

    rng = np.random.default_rng(3)
    src = tmp_path / "m.onnx"
    ir.save(_mlp(rng), src)
    real = S.measure_sensitivity
    seen: dict[str, object] = {}

    def flag_w2(*args: object, **kwargs: object) -> S.Sensitivity:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        seen["run_bits"] = found.run_bits
        err = np.array(found.output_error)
        err[found.names.index("w2")] *= 1e4
        return S.Sensitivity(
            found.names, found.bits, err, found.probed, found.samples, found.source, 0.0, found.run_bits
        )

    plans = {}
    for objective in (Objective.ROUNDOFF, Objective.GUARDED):
        cfg = QuantConfig(
            search=SearchConfig(target_bits=3.0, objective=objective), validate=ValidateConfig(enabled=False)
        )
        monkeypatch.setattr(S, "measure_sensitivity", flag_w2)
        report = quantize(src, tmp_path / f"{objective.value}.onnx", cfg)
        plans[objective] = {w.name: w.bits for w in report.weights}
    assert seen["run_bits"] == (3, 4)  # the guard runs two widths only
    assert "outliers weighted up: w2" in report.objective and "synthetic inputs" in report.objective
    assert plans[Objective.GUARDED]["w2"] > plans[Objective.ROUNDOFF]["w2"]


def test_guard_is_skipped_without_a_decision_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_mixquant import QuantConfig, ValidateConfig, quantize

    model = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        det (float[N, 8] x) => (float[N, 8] y) <float[8, 8] w = {WEIGHTS}> {
            h = MatMul (x, w)
            y = Sigmoid (h)
        }
        """.replace("{WEIGHTS}", "{" + ", ".join(f"{v / 7:.4f}" for v in range(64)) + "}")
    )
    src = tmp_path / "det.onnx"
    ir.save(model, src)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed a model with raw outputs only")

    monkeypatch.setattr(S, "measure_sensitivity", never)
    report = quantize(src, tmp_path / "q.onnx", QuantConfig(validate=ValidateConfig(enabled=False)))
    assert report.objective.startswith("roundoff (guard not needed")
