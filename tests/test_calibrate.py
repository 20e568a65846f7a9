"""calibrate.collect_ranges: ranges vs NumPy references, batch-split independence, bounded memory.

Also covers _calibplan.py (sizes, groups, runs) and _histogram.py."""

from __future__ import annotations

import gc
import logging
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mixquant.calibrate import _calibplan, _histogram
from onnx_mixquant.calibrate import ranges as calibrate
from onnx_mixquant.calibrate._histogram import StreamingHistogram, fake_quant_scores, grid_exponent, mse_range
from onnx_mixquant.calibrate.ranges import CalibrationResult, TensorRange, collect_ranges
from onnx_mixquant.config import ActivationConfig, CalibMethod
from onnx_mixquant.errors import CalibrationError

INTERMEDIATE = ("x", "c", "r", "y")


def make_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv(4 ch, 3x3, pad 1) -> c -> Relu -> r -> Transpose(0,2,3,1) -> t
    -> MatMul(4x5) -> y[N,H,W,5]; also s = Shape(x) (int64) as a second output."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.5
    m = rng.normal(size=(4, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "M"], ["y"]),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    graph = helper.make_graph(
        nodes,
        "calib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s", TensorProto.INT64, [4]),
        ],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(m, "M")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def reference_values(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All values of each INTERMEDIATE tensor over all feeds, from an unoptimised ORT session."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    for name in ("c", "r"):
        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(["c", "r", "y"], f) for f in feeds]
    ref = {n: np.concatenate([o[k].ravel() for o in outs]) for k, n in enumerate(("c", "r", "y"))}
    ref["x"] = np.concatenate([f["x"].ravel() for f in feeds])
    return ref


def random_feeds(num: int, batch: int, seed: int = 1, grow: bool = False, hw: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"x": (rng.normal(size=(batch, 3, hw, hw)) * (1.0 + i if grow else 1.0)).astype(np.float32)}
        for i in range(num)
    ]


def split(feeds: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    x = np.concatenate([f["x"] for f in feeds])
    return [{"x": x[i : i + size]} for i in range(0, len(x), size)]


def bin_width_bound(values: np.ndarray, num_bins: int) -> float:
    """Largest possible final bin width: at most twice the width (max - min) / (n - 2)."""
    return 2.0 * float(values.max() - values.min()) / (num_bins - 2)


def assert_near_percentile(values: np.ndarray, q: float, got: float, tol: float) -> None:
    """``got`` is within ``tol`` of the order statistics around np.percentile(values, q) (one rank of
    slack each side: the histogram targets rank q N, NumPy interpolates at q (N - 1))."""
    s = np.sort(values)
    k = q / 100.0 * (s.size - 1)
    lo, hi = s[max(int(np.floor(k)) - 1, 0)], s[min(int(np.ceil(k)) + 1, s.size - 1)]
    assert lo - tol <= got <= hi + tol, (got, np.percentile(values, q), tol)


def fake_quant(x: np.ndarray, rmin: float, rmax: float) -> np.ndarray:
    """uint8 asymmetric fake quantization, range widened to hold 0 (as the kernel does)."""
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    scale = (hi - lo) / 255.0
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def score(x: np.ndarray, rmin: float, rmax: float) -> float:
    """The MSE search's criterion on raw values: sum |x - fq(x)|^2.4."""
    v = x.ravel().astype(np.float64)
    return float(np.sum(np.abs(v - fake_quant(v, rmin, rmax)) ** 2.4))


@pytest.fixture(scope="module")
def proto() -> onnx.ModelProto:
    return make_model()


def run(proto: onnx.ModelProto, feeds: list[dict], **kw: Any) -> CalibrationResult:
    return collect_ranges(ir.from_proto(proto), INTERMEDIATE, iter(feeds), ActivationConfig(**kw))


def test_minmax_equals_numpy(proto: onnx.ModelProto) -> None:
    feeds = random_feeds(6, 3, grow=True)
    ref = reference_values(proto, feeds)
    res = run(proto, feeds, method=CalibMethod.MINMAX)
    assert set(res.ranges) == set(INTERMEDIATE)
    assert res.num_samples == 18 and res.method == "minmax" and res.provider.endswith("ExecutionProvider")
    for name, values in ref.items():
        r = res.ranges[name]
        assert isinstance(r, TensorRange) and r.name == name
        np.testing.assert_allclose([r.rmin, r.rmax], [values.min(), values.max()], rtol=1e-5, atol=1e-6)
        assert (r.observed_min, r.observed_max) == (r.rmin, r.rmax)
    assert res.ranges["x"].rmin == float(ref["x"].min())  # a graph input: exact
    assert res.ranges["r"].rmin == 0.0


@pytest.mark.parametrize("grow", [False, True], ids=["fixed-range", "growing-range"])
def test_percentile_close_to_numpy(proto: onnx.ModelProto, grow: bool) -> None:
    feeds = random_feeds(12, 4, grow=grow)
    ref = reference_values(proto, feeds)
    res = run(proto, feeds, method=CalibMethod.PERCENTILE, percentile=99.9)
    for name, values in ref.items():
        r = res.ranges[name]
        tol = bin_width_bound(values, 2048)
        assert_near_percentile(values, 99.9, r.rmax, tol)
        if values.min() < 0:
            assert_near_percentile(values, 0.1, r.rmin, tol)
        assert r.observed_min <= r.rmin <= r.rmax <= r.observed_max
    assert res.ranges["r"].rmin == 0.0  # non-negative tensor: rmin is the observed min


def test_percentile_100_is_minmax(proto: onnx.ModelProto) -> None:
    feeds = random_feeds(3, 2)
    a = run(proto, feeds, method=CalibMethod.PERCENTILE, percentile=100.0)
    b = run(proto, feeds, method=CalibMethod.MINMAX)
    assert {n: (r.rmin, r.rmax) for n, r in a.ranges.items()} == {
        n: (r.rmin, r.rmax) for n, r in b.ranges.items()
    }


def test_mse_clips_outliers_and_lowers_the_error(proto: onnx.ModelProto) -> None:
    # At 8 bits and p = 2.4 clipping an outlier pays only when it is rare (about one in a million
    # values), so the sample is large: 1.2 M Gaussian values and two outliers.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3, 32, 32)).astype(np.float32)
    x.flat[[5, 700_000]] = [12.0, -10.0]
    res = run(proto, split([{"x": x}], 100), method=CalibMethod.MSE)
    r = res.ranges["x"]
    assert (r.observed_min, r.observed_max) == (-10.0, 12.0)
    assert r.rmax - r.rmin < 0.9 * (r.observed_max - r.observed_min)
    assert -10.0 < r.rmin < -4.0 and 4.0 < r.rmax < 12.0
    assert score(x, r.rmin, r.rmax) <= score(x, -10.0, 12.0)


def test_mse_on_uniform_data_stays_near_minmax(proto: onnx.ModelProto) -> None:
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.uniform(-1.0, 3.0, size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(10)]
    r = run(proto, feeds, method=CalibMethod.MSE).ranges["x"]
    span = r.observed_max - r.observed_min
    assert abs(r.rmin - r.observed_min) <= 0.03 * span
    assert abs(r.rmax - r.observed_max) <= 0.03 * span


def test_mse_symmetric_range(proto: onnx.ModelProto) -> None:
    res = run(proto, random_feeds(4, 4), method=CalibMethod.MSE, symmetric=True)
    for r in res.ranges.values():
        t = max(abs(r.rmin), abs(r.rmax))
        assert r.rmin == max(r.observed_min, -t) and r.rmax == min(r.observed_max, t)


@pytest.mark.parametrize("method", list(CalibMethod))
def test_independent_of_batch_split(proto: onnx.ModelProto, method: CalibMethod) -> None:
    feeds = random_feeds(16, 4, grow=True)
    one = run(proto, split(feeds, 64), method=method)
    many = run(proto, split(feeds, 2), method=method)
    assert one.num_samples == many.num_samples == 64
    assert one.ranges == many.ranges  # exact: the histogram depends only on the values


def test_model_is_not_modified(proto: onnx.ModelProto) -> None:
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    collect_ranges(model, ["c", "y"], iter(random_feeds(2, 2)), ActivationConfig(method=CalibMethod.MSE))
    assert ir.to_proto(model).SerializeToString() == before
    assert [v.name for v in model.graph.outputs] == ["y", "s"]


def peak_bytes(proto: onnx.ModelProto, num: int) -> int:
    def batches() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        for _ in range(num):
            yield {"x": rng.normal(size=(8, 3, 32, 32)).astype(np.float32)}

    model = ir.from_proto(proto)
    cfg = ActivationConfig(method=CalibMethod.PERCENTILE)
    gc.collect()
    tracemalloc.start()
    try:
        collect_ranges(model, INTERMEDIATE, batches(), cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_batches(proto: onnx.ModelProto) -> None:
    peak_bytes(proto, 1)  # warm-up: imports, provider probe
    few, many = peak_bytes(proto, 5), peak_bytes(proto, 50)
    one_batch_outputs = 8 * (3 + 4 + 4 + 5) * 32 * 32 * 4
    assert many < few + one_batch_outputs, (few, many)


def test_progress_and_external_data_path(proto: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = mkdtemp(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(calibrate, "_EXTERNAL_THRESHOLD", 0)
    monkeypatch.setattr(calibrate.tempfile, "mkdtemp", recording_mkdtemp)
    calls: list[tuple[int, int]] = []
    feeds = random_feeds(3, 2)
    ext = collect_ranges(
        ir.from_proto(proto), ["c"], iter(feeds), ActivationConfig(), lambda d, t: calls.append((d, t)), 3
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    ours = [p for p in made if p.name.startswith("onnx_mixquant_calib.")]
    assert len(ours) == 1 and not ours[0].exists()
    monkeypatch.undo()
    plain = run(proto, feeds)
    assert ext.ranges["c"] == plain.ranges["c"]


def test_errors(proto: onnx.ModelProto) -> None:
    model, cfg = ir.from_proto(proto), ActivationConfig()
    with pytest.raises(CalibrationError, match="no calibration samples"):
        collect_ranges(model, ["c"], iter([]), cfg)
    with pytest.raises(ValueError, match="'nope'.*'gone'"):
        collect_ranges(model, ["c", "nope", "gone"], iter(random_feeds(1, 1)), cfg)
    with pytest.raises(ValueError, match="'s'.*not floating point|not floating point.*'s'"):
        collect_ranges(model, ["s"], iter(random_feeds(1, 1)), cfg)
    with pytest.raises(CalibrationError, match="batch 0"):
        collect_ranges(model, ["c"], iter([{"x": np.zeros((1, 3, 8, 8), np.float64)}]), cfg)


def test_nan_values(proto: onnx.ModelProto, caplog: pytest.LogCaptureFixture) -> None:
    model = ir.from_proto(proto)
    nan = {"x": np.full((1, 3, 8, 8), np.nan, np.float32)}
    with pytest.raises(CalibrationError, match="'x'"):
        collect_ranges(model, ["x"], iter([nan]), ActivationConfig())
    part = random_feeds(1, 2)[0]["x"]
    part[0, 0, 0, 0] = np.inf
    with caplog.at_level(logging.WARNING, logger="onnx_mixquant.calibrate.ranges"):
        r = collect_ranges(model, ["x"], iter([{"x": part}]), ActivationConfig()).ranges["x"]
    assert "NaN/Inf" in caplog.text
    finite = part[np.isfinite(part)]
    assert (r.rmin, r.rmax) == (float(finite.min()), float(finite.max()))


def test_histogram_growth_equals_numpy_histogram() -> None:
    rng = np.random.default_rng(5)
    hist = StreamingHistogram(64)
    chunks = [rng.normal(size=1000) * s + o for s, o in ((1, 0), (0.1, 3), (5, -2), (2, 30), (1, 0))]
    for c in chunks:
        hist.add(c, float(c.min()), float(c.max()))
    values = np.concatenate(chunks)
    edges = (hist.lo + np.arange(65)) * hist.width
    assert edges[0] <= values.min() and values.max() < edges[-1]
    assert hist.width <= 2 * (values.max() - values.min()) / 62
    expected, _ = np.histogram(values, bins=edges)
    assert hist.counts.sum() == values.size
    assert np.abs(hist.counts - expected).sum() <= 2  # float rounding at bin edges only
    assert (hist.vmin, hist.vmax) == (values.min(), values.max())


def test_histogram_constant_then_wider() -> None:
    hist = StreamingHistogram(16)
    hist.add(np.zeros(10), 0.0, 0.0)
    assert hist.quantile(0.5) == 0.0
    hist.add(np.array([1.0, -1.0]), -1.0, 1.0)
    assert hist.counts.sum() == 12 and hist.width <= 2 * 2.0 / 14
    assert hist.quantile(0.0) == -1.0 and hist.quantile(1.0) == 1.0


def test_fake_quant_scores_worked_example() -> None:
    centres, counts = np.array([3.1, 0.0]), np.array([1, 5])
    score = fake_quant_scores(centres, counts, np.array([-1.0]), np.array([3.0]), 1.0, False)
    np.testing.assert_allclose(score, [3.1 - 191 * 4 / 255])
    sym = fake_quant_scores(centres, counts, np.array([-3.0]), np.array([3.0]), 2.0, True)
    np.testing.assert_allclose(sym, [0.1**2])
    assert _histogram.mse_range.__doc__


# -- memory budget: groups of tensors, runs of samples; ranges independent of both ------------

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,8,8,5] y)
  <float[4,3,3,3] W = {WV}, float[4,5] M = {MV}, float[1] k = {0.5}> {
    c = Conv<pads=[1,1,1,1]>(x, W)
    r = Relu(c)
    t = Transpose<perm=[0,2,3,1]>(r)
    p = Mul(M, k)
    y = MatMul(t, p)
}
"""
#: x, the Conv / Relu / Transpose / MatMul outputs (bytes per sample 768, 1024, 1024, 1024, 1280)
#: and p, which does not depend on the batch (80 bytes per run).
TEXT_NAMES = ["x", "c", "r", "t", "p", "y"]
PER_SAMPLE = 1024 * 3 + 1280
WORK = 2 * 1280  # twice the largest node output


def text_model(batch: int | str = "N") -> ir.Model:
    rng = np.random.default_rng(7)
    text = TEXT.replace("WV", ", ".join(f"{v:.3f}" for v in rng.normal(size=108)))
    text = text.replace("MV", ", ".join(f"{v:.3f}" for v in rng.normal(size=20)))
    return ir.from_onnx_text(text.replace("[N,", f"[{batch},"))


def text_samples(n: int = 48) -> np.ndarray:
    """Samples whose range grows with their index (the first batch's range depends on its size)."""
    x = np.random.default_rng(8).normal(size=(n, 3, 8, 8)).astype(np.float32)
    return x * (1.0 + np.arange(n, dtype=np.float32)[:, None, None, None])


def batched(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + size]} for i in range(0, len(x), size)]


@pytest.mark.parametrize("method", list(CalibMethod))
def test_ranges_identical_whatever_the_batch_size_and_budget(method: CalibMethod) -> None:
    model, x, cfg = text_model(), text_samples(), ActivationConfig(method=method)

    def calibrate_(size: int, budget: int | None = None, one_shot: bool = False) -> CalibrationResult:
        feeds = batched(x, size)
        source: Any = iter(feeds) if one_shot else (lambda: iter(feeds))
        return collect_ranges(model, TEXT_NAMES, source, cfg, memory_budget=budget)

    ref = calibrate_(16)
    assert (ref.groups, ref.run_samples, ref.num_samples) == (1, 16, 48)
    for size in (1, 3):
        assert calibrate_(size).ranges == ref.ranges, size
    tiny = calibrate_(16, budget=1)  # one tensor per group (x is read from the feeds), 1 sample per run
    assert (tiny.groups, tiny.run_samples, tiny.num_samples) == (5, 1, 48)
    assert tiny.ranges == ref.ranges
    assert calibrate_(3, budget=1, one_shot=True).ranges == ref.ranges
    two = calibrate_(16, budget=2 * (PER_SAMPLE + 80 + WORK))
    assert (two.groups, two.run_samples) == (1, 2) and two.ranges == ref.ranges
    half_m = np.asarray(model.graph.initializers["M"].const_value) * np.float32(0.5)
    assert ref.ranges["p"].observed_max == float(half_m.max())


class RunSpy:
    """Records the bytes of the outputs of every InferenceSession.run (and the samples fed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes: list[int] = []
        self.samples: list[int] = []
        real = ort.InferenceSession.run

        def spy(sess: Any, names: Any, feed: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
            outs = real(sess, names, feed, *args, **kwargs)
            self.bytes.append(sum(np.asarray(o).nbytes for o in outs))
            self.samples.append(len(feed["x"]))
            return outs

        monkeypatch.setattr(ort.InferenceSession, "run", spy)


def test_each_run_returns_at_most_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, cfg = text_model(), text_samples(32), ActivationConfig(method=CalibMethod.PERCENTILE)
    spy = RunSpy(monkeypatch)
    collect_ranges(model, TEXT_NAMES, batched(x, 16), cfg)  # default budget: whole batches
    assert spy.samples == [16, 16] and max(spy.bytes) == 16 * PER_SAMPLE + 80
    for budget, per_run in ((PER_SAMPLE + 80 + WORK, 1), (3 * (PER_SAMPLE + 80 + WORK), 3)):
        spy.bytes.clear()
        spy.samples.clear()
        res = collect_ranges(model, TEXT_NAMES, batched(x, 16), cfg, memory_budget=budget)
        assert res.run_samples == per_run and max(spy.samples) == per_run
        assert sum(spy.samples) == 32 and max(spy.bytes) + WORK <= budget
    spy.bytes.clear()
    res = collect_ranges(model, TEXT_NAMES, batched(x, 16), cfg, memory_budget=1500 + WORK)
    assert res.groups == 4 and max(spy.bytes) <= 1500  # c | r | t p | y: ~1 KiB each
    assert len(spy.bytes) == 4 * 32


def test_sizes_measured_when_shapes_are_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, cfg = text_model(), text_samples(8), ActivationConfig()
    ref = collect_ranges(model, TEXT_NAMES, batched(x, 4), cfg, memory_budget=1500 + WORK)
    monkeypatch.setattr(_calibplan, "_reinfer", lambda model, one: {})
    spy = RunSpy(monkeypatch)
    got = collect_ranges(model, TEXT_NAMES, batched(x, 4), cfg, memory_budget=1500 + WORK)
    assert got.ranges == ref.ranges and got.groups == ref.groups
    measured = len(spy.samples) - 4 * 8  # runs before calibration: one sample each
    assert measured >= 1 and spy.samples[:measured] == [1] * measured


def test_fixed_batch_is_the_smallest_run(caplog: pytest.LogCaptureFixture) -> None:
    model, x, cfg = text_model(2), text_samples(8), ActivationConfig(method=CalibMethod.MSE)
    ref = collect_ranges(text_model(), TEXT_NAMES, batched(x, 8), cfg)
    with caplog.at_level(logging.WARNING, logger="onnx_mixquant.calibrate._calibplan"):
        got = collect_ranges(model, TEXT_NAMES, batched(x, 2), cfg, memory_budget=1)
    assert got.run_samples == 2 and got.ranges == ref.ranges
    assert "above the calibration memory budget" in caplog.text


def test_passes_must_see_the_same_data() -> None:
    model, x, cfg = text_model(), text_samples(8), ActivationConfig()
    calls: list[int] = []

    def shrinking() -> Iterator[dict[str, np.ndarray]]:
        calls.append(1)
        return iter(batched(x[: 8 - len(calls)], 4))

    with pytest.raises(CalibrationError, match="changed between passes"):
        collect_ranges(model, TEXT_NAMES, shrinking, cfg, memory_budget=1)
    steps: list[tuple[int, int]] = []
    res = collect_ranges(
        model,
        ["c", "y"],
        lambda: iter(batched(x, 4)),
        cfg,
        lambda d, t: steps.append((d, t)),
        2,
        memory_budget=1,
    )
    assert res.groups == 2 and steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_group_probe_is_pruned_and_taps_requested_tensors() -> None:
    probe = calibrate._probe_model(text_model(), ["r"], taps=["c", "r", "y"])
    assert [n.op_type for n in probe.graph] == ["Conv", "ReduceSum", "Relu"]  # tap right after c
    tap = list(probe.graph)[1]
    assert tap.inputs[0] is not None and tap.inputs[0].name == "c"  # no Conv+Relu fusion across c
    assert [v.name for v in probe.graph.outputs] == ["r", tap.outputs[0].name]
    assert [v.name for v in probe.graph.inputs] == ["x"] and "M" not in probe.graph.initializers


def histogram_state(chunks: list[np.ndarray], num_bins: int = 64) -> tuple:
    hist = StreamingHistogram(num_bins)
    for c in chunks:
        if c.size:
            hist.add(c, float(c.min()), float(c.max()))
    return hist.counts.tolist(), hist.exp, hist.lo, hist.vmin, hist.vmax


def test_histogram_depends_only_on_the_values() -> None:
    rng = np.random.default_rng(6)
    parts = [np.zeros(50)] + [rng.normal(size=2000) * s + o for s, o in ((1, 0), (1e-3, 3), (40, -20))]
    # 5000 makes the width 2^7: a negative float32 subnormal times 2^-7 rounds to -0.0.
    parts.append(np.array([5000.0, -1e-45, -1e-40, 1e-45, -0.0]))
    values = np.concatenate(parts).astype(np.float32)
    whole = histogram_state([values])
    assert whole[1] == 7 and sum(whole[0]) == values.size
    for seed in range(4):
        r = np.random.default_rng(seed)
        v = values if seed == 0 else r.permutation(values)
        cuts = np.sort(r.choice(np.arange(1, v.size), size=[3, 30, 300, 1000][seed], replace=False))
        assert histogram_state(np.split(v, cuts)) == whole, seed
    edges = (whole[2] + np.arange(65)) * 2.0 ** whole[1]
    assert edges[0] <= values.min() and values.max() < edges[-1]


def test_histogram_ranges_ignore_repetition() -> None:
    """A tensor that does not depend on the batch is seen once per run: same range however often."""
    v = np.random.default_rng(9).normal(size=1000).astype(np.float32)
    once, thrice = StreamingHistogram(128), StreamingHistogram(128)
    once.add(v, float(v.min()), float(v.max()))
    for _ in range(3):
        thrice.add(v, float(v.min()), float(v.max()))
    assert once.quantile(0.99) == thrice.quantile(0.99)
    assert mse_range(once, 2.4, False) == mse_range(thrice, 2.4, False)


def test_grid_exponent_is_the_smallest_that_fits() -> None:
    assert grid_exponent(-1.0, 1.0, 16) == -2  # -4..4 at 0.25; -8..8 (17 bins) at 0.125
    assert grid_exponent(0.0, 0.0, 16) == -126 and grid_exponent(0.0, 3.5, 4) == 0
    assert grid_exponent(1000.0, 1000.001, 2048) == -20  # 1049 bins at 2^-20, 2098 at 2^-21
    assert grid_exponent(1e6, 1e6, 16) == -30  # bin indices stay below 2^50: 1e6 * 2^30 < 2^50
