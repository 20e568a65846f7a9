"""Tests of onnx_mixquant.numerics: bit-exact with onnx.reference, properties, edge cases."""

from __future__ import annotations

import tracemalloc
from typing import cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_mixquant import numerics
from onnx_mixquant.config import ScaleMethod
from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.numerics import (
    QParams,
    check_finite,
    choose_qparams,
    dequantize,
    fake_quantize,
    quant_range,
    quantize,
    roundoff_error,
    roundoff_errors,
)

PROPS = settings(max_examples=300, deadline=None, derandomize=True, database=None)
AXES = [None, 0, 1, -1]

# ONNX storage type -> (signed, bits, min opset)
STORAGE: dict[int, tuple[bool, int, int]] = {
    TensorProto.UINT8: (False, 8, 21),
    TensorProto.INT8: (True, 8, 21),
    TensorProto.UINT4: (False, 4, 21),
    TensorProto.INT4: (True, 4, 21),
    TensorProto.UINT2: (False, 2, 25),
    TensorProto.INT2: (True, 2, 25),
}


def _container(bits: int, signed: bool, smallest: bool) -> int:
    """The ONNX type a ``bits`` grid is stored in: the 8-bit one, or the smallest that holds it."""
    if smallest and bits <= 2:
        return TensorProto.INT2 if signed else TensorProto.UINT2
    if smallest and bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def _reference(op: str, x: np.ndarray, qp: QParams, elem_type: int) -> np.ndarray:
    """Run one QuantizeLinear / DequantizeLinear node in onnx.reference with ``qp``'s parameters."""
    opset = STORAGE[elem_type][2]
    scale = numpy_helper.from_array(np.asarray(qp.scale, np.float32), "s")
    zp = np.asarray(qp.zero_point)
    z = helper.make_tensor("z", elem_type, zp.shape, zp.astype(np.int32).ravel().tolist())
    node = helper.make_node(op, ["x", "s", "z"], ["y"])
    if qp.axis is not None:
        node.attribute.append(helper.make_attribute("axis", qp.axis))
    in_type: int
    out_type: int
    if op == "QuantizeLinear":
        in_type, out_type = TensorProto.FLOAT, elem_type
    else:
        in_type, out_type = elem_type, TensorProto.FLOAT
        x = x.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", in_type, x.shape)],
        [helper.make_tensor_value_info("y", out_type, x.shape)],
        initializer=[scale, z],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    outputs = cast(list, ReferenceEvaluator(model).run(None, {"x": x}))
    return np.asarray(outputs[0])


def _scale_like(qp: QParams, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """``qp.scale`` broadcast to ``shape`` along ``qp.axis``."""
    s = np.asarray(qp.scale, dtype)
    if qp.axis is not None:
        dims = [1] * len(shape)
        dims[qp.axis] = -1
        s = s.reshape(dims)
    return np.broadcast_to(s, shape)


def _random_case(seed: int, bits: int, symmetric: bool, axis: int | None):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 3, 5)) * rng.uniform(0.1, 3.0, (4, 1, 1))).astype(np.float32)
    w[0, 0, 0] = 0.0
    qp = choose_qparams(w, bits, symmetric=symmetric, axis=axis)
    # Probes: the weights, points past the range (saturation) and near-.5 ties, stacked along an
    # axis other than the channel axis.
    s = _scale_like(qp, w.shape)
    ties = ((np.floor(w / s) + np.float32(0.5)) * s).astype(np.float32)
    stack = 0 if qp.axis is None else (qp.axis + 1) % 3
    return np.concatenate([w, np.float32(3) * w, np.float32(-3) * w, ties], axis=stack), qp


# --- ranges and the worked example ------------------------------------------------------------


def test_quant_range() -> None:
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(4, True) == (-8, 7)
    assert quant_range(3, False) == (0, 7)
    assert quant_range(2, True) == (-2, 1)
    for bad in (1, 9, 0, True, 4.0):
        with pytest.raises(ValueError):
            quant_range(bad, False)  # type: ignore[arg-type]


def test_worked_example_of_the_docstring() -> None:
    w = np.array([-1.0, 0.5, 2.0], np.float32)
    qp = choose_qparams(w, 2, symmetric=False, axis=None)
    assert qp.scale.shape == () and qp.scale.dtype == np.float32 and float(qp.scale) == 1.0
    assert qp.zero_point.dtype == np.int32 and int(qp.zero_point) == 1
    assert quantize(w, qp).tolist() == [0, 1, 3]
    assert dequantize(quantize(w, qp), qp).tolist() == [-1.0, 0.0, 2.0]
    assert roundoff_error(w, qp) == pytest.approx(0.25 / 3)


def test_axis_is_normalised_and_shapes() -> None:
    w = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    qp = choose_qparams(w, 4, symmetric=True, axis=-1)
    assert qp.axis == 2 and qp.scale.shape == (4,) and qp.zero_point.shape == (4,)
    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == np.int32
    assert np.array_equal(qp.zero_point, np.zeros(4, np.int32))
    q = quantize(w, qp)
    assert q.dtype == np.int32 and q.shape == w.shape
    with pytest.raises(ValueError):
        choose_qparams(w, 4, symmetric=True, axis=3)


# --- bit-exactness with onnx.reference ------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("smallest", [False, True], ids=["8bit-container", "int4-int2"])
def test_quantize_matches_onnx_reference(bits: int, symmetric: bool, axis, smallest: bool) -> None:
    x, qp = _random_case(bits * 10 + symmetric, bits, symmetric, axis)
    storage = _container(bits, symmetric, smallest)
    ref = _reference("QuantizeLinear", x, qp, storage).astype(np.int32)
    # Widths below the container's: the container saturates first, then the range is restricted.
    expected = np.clip(ref, qp.qmin, qp.qmax)
    got = quantize(x, qp)
    assert got.dtype == np.int32
    assert np.array_equal(got, expected)
    assert got.min() == qp.qmin and got.max() == qp.qmax  # the probes do saturate


@pytest.mark.parametrize("elem_type", list(STORAGE))
def test_quantize_rounds_exact_ties_half_to_even(elem_type: int) -> None:
    signed, bits, _ = STORAGE[elem_type]
    k = np.arange(-6, 6)
    x = ((k + 0.5) * 0.25).astype(np.float32)  # x / s is exactly k + 0.5
    z = 0 if signed else 1
    qp = QParams(bits, signed, np.array(0.25, np.float32), np.array(z, np.int32), None)
    expected = np.clip(np.where(k % 2 == 0, k, k + 1) + z, qp.qmin, qp.qmax)
    assert np.array_equal(quantize(x, qp), expected)
    ref = _reference("QuantizeLinear", x, qp, elem_type).astype(np.int32)
    assert np.array_equal(quantize(x, qp), ref)


def test_quantize_ties_per_channel() -> None:
    scale = np.array([0.5, 0.25, 2.0], np.float32)
    k = np.arange(-4, 4)
    x = ((k + 0.5)[None, :] * scale[:, None]).astype(np.float32)
    qp = QParams(8, False, scale, np.array([3, 128, 250], np.int32), 0)
    ref = _reference("QuantizeLinear", x, qp, TensorProto.UINT8).astype(np.int32)
    assert np.array_equal(quantize(x, qp), ref)
    assert quantize(x, qp)[1].tolist() == [124, 126, 126, 128, 128, 130, 130, 132]


@pytest.mark.parametrize("elem_type", list(STORAGE))
@pytest.mark.parametrize("axis", AXES)
def test_dequantize_matches_onnx_reference(elem_type: int, axis) -> None:
    signed, bits, _ = STORAGE[elem_type]
    rng = np.random.default_rng(elem_type)
    shape = (3, 4, 5)
    n = 1 if axis is None else shape[axis]
    qmin, qmax = quant_range(bits, signed)
    scale = (rng.uniform(1e-3, 10.0, n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, n).astype(np.int32)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    qp = QParams(bits, signed, scale, zp, None if axis is None else axis % 3)
    q = rng.integers(qmin, qmax + 1, shape).astype(np.int32)
    ref = _reference("DequantizeLinear", q, qp, elem_type)
    got = dequantize(q, qp)
    assert got.dtype == np.float32 == ref.dtype
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


# --- properties ---------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    elems = st.floats(-1e4, 1e4, width=32, allow_subnormal=True)
    w = draw(hnp.arrays(np.float32, shape, elements=elems))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    axis = draw(st.sampled_from([None, *range(len(shape)), -1]))
    return w, bits, symmetric, axis


def _check_half_step(x: np.ndarray, qp: QParams, slack: float) -> None:
    """|x - fq(x)| <= s/2 (times ``1 + slack``) + float eps for every x inside the grid's range."""
    s = _scale_like(qp, x.shape, np.float64)
    z = _scale_like(QParams(qp.bits, qp.signed, qp.zero_point, qp.zero_point, qp.axis), x.shape)
    lo, hi = (qp.qmin - z) * s, (qp.qmax - z) * s
    err = np.abs(x.astype(np.float64) - fake_quantize(x, qp))
    eps = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x), s)
    inside = (x >= lo) & (x <= hi) if slack == 0 else np.ones(x.shape, bool)
    assert np.all(err[inside] <= s[inside] / 2 * (1 + slack) + eps[inside])


@PROPS
@given(_cases(), st.floats(-2.0, 2.0))
def test_roundoff_is_at_most_half_a_step_inside_the_range(case, t) -> None:
    w, bits, symmetric, axis = case
    qp = choose_qparams(w, bits, symmetric=symmetric, axis=axis)
    assert np.all(qp.scale > 0) and np.all(np.isfinite(qp.scale))
    assert np.all(qp.scale >= np.finfo(np.float32).tiny)
    # the weights lie inside the range up to float rounding of the scale
    _check_half_step(w, qp, slack=1e-5)
    # points spread over t times the range, t in [-2, 2]
    s = _scale_like(qp, w.shape, np.float64)
    x = (t * s * (2**qp.bits - 1)).astype(np.float32)
    _check_half_step(x, qp, slack=0)


@PROPS
@given(_cases())
def test_quantize_is_idempotent_in_range_and_deterministic(case) -> None:
    w, bits, symmetric, axis = case
    w_copy = w.copy()
    qp = choose_qparams(w, bits, symmetric=symmetric, axis=axis)
    q = quantize(w, qp)
    assert q.dtype == np.int32 and q.shape == w.shape
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    assert np.array_equal(quantize(dequantize(q, qp), qp), q)
    # a second call gives equal output, and nothing is mutated
    qp2 = choose_qparams(w, bits, symmetric=symmetric, axis=axis)
    assert np.array_equal(qp.scale, qp2.scale) and np.array_equal(qp.zero_point, qp2.zero_point)
    assert np.array_equal(quantize(w, qp2), q)
    assert np.array_equal(fake_quantize(w, qp), fake_quantize(w, qp))
    assert np.array_equal(w, w_copy)


@PROPS
@given(_cases())
def test_zero_is_exactly_representable_in_asymmetric_mode(case) -> None:
    w, bits, _, axis = case
    qp = choose_qparams(w, bits, symmetric=False, axis=axis)
    assert np.all(qp.zero_point >= qp.qmin) and np.all(qp.zero_point <= qp.qmax)
    zeros = np.zeros_like(w)
    assert np.all(fake_quantize(zeros, qp) == 0.0)
    w0 = np.where(np.arange(w.size).reshape(w.shape) % 2 == 0, np.float32(0.0), w)
    assert np.all(fake_quantize(w0, qp)[w0 == 0] == 0.0)


# --- non-monotone error in the width ----------------------------------------------------------


def test_more_bits_can_give_more_error() -> None:
    """DESIGN's example: w = [1, 1/3] is on the symmetric 3-bit grid (s = 1/3), not the 4-bit one.

    So the error table is not monotone in the width; the search must not assume it is.
    """
    w = np.array([1.0, 1.0 / 3.0], np.float32)
    e = roundoff_errors(w, [3, 4], symmetric=True, axis=None)
    assert e[0] < 1e-12
    assert e[1] == pytest.approx((1 / 3 - 2 / 7) ** 2 / 2, rel=1e-5)
    assert e[1] > e[0]
    # asymmetric (range [0, 1]): the 2-bit grid (s = 1/3) is exact, the 3-bit one (s = 1/7) is not
    e = roundoff_errors(w, [2, 3], symmetric=False, axis=None)
    assert e[0] < 1e-12 < e[1]


# --- degenerate inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", list(ScaleMethod))
def test_degenerate_channels_get_valid_scales(bits: int, symmetric: bool, method) -> None:
    w = np.zeros((5, 4), np.float32)
    w[1] = 2.5  # constant positive
    w[2] = -0.7  # constant negative
    w[3] = 1e-45  # subnormal
    w[4, 0] = 3.0  # single nonzero element
    for axis in (0, None):
        qp = choose_qparams(w, bits, symmetric=symmetric, axis=axis, method=method)
        scale = np.atleast_1d(qp.scale)
        assert np.all(np.isfinite(scale)) and np.all(scale >= np.finfo(np.float32).tiny)
        fq = fake_quantize(w, qp)
        assert np.all(np.isfinite(fq)) and np.all(fq[w == 0] == 0.0)
    qp = choose_qparams(w, bits, symmetric=symmetric, axis=0, method=method)
    assert qp.scale[0] == 1.0 and qp.zero_point[0] == (0 if symmetric else qp.qmin)
    if method is ScaleMethod.MINMAX:
        np.testing.assert_allclose(fake_quantize(w, qp)[1:3], w[1:3], rtol=1e-6)
    for x in (np.zeros(7, np.float32), np.array(-2.0, np.float32), np.array([3.0], np.float32)):
        qp = choose_qparams(x, bits, symmetric=symmetric, axis=None, method=method)
        assert np.isfinite(qp.scale) and qp.scale > 0 and qp.scale.shape == ()
        assert np.all(fake_quantize(np.zeros_like(x), qp) == 0.0)


def test_extreme_magnitudes_do_not_overflow() -> None:
    big = np.finfo(np.float32).max
    w = np.array([[big, -big, 0.0], [1e-44, -1e-45, 0.0]], np.float32)
    for symmetric in (False, True):
        qp = choose_qparams(w, 8, symmetric=symmetric, axis=0)
        assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale > 0)
        assert np.all(np.isfinite(fake_quantize(w, qp)))


def test_check_finite_names_the_tensor() -> None:
    check_finite("ok", np.ones((2, 2), np.float32))
    check_finite("empty", np.zeros((0,), np.float32))
    w = np.ones((3, 4), np.float32)
    w[0, 1], w[2, 2], w[2, 3] = np.nan, np.inf, -np.inf
    msg = r"weight 'conv1\.weight': contains NaN/Inf"
    with pytest.raises(UnsupportedModelError, match=msg) as e:
        check_finite("conv1.weight", w)
    assert "1 NaN" in str(e.value) and "2 Inf" in str(e.value) and "(3, 4)" in str(e.value)


# --- the MSE search -----------------------------------------------------------------------------


def _p_error(w: np.ndarray, qp: QParams, p: float = 2.4) -> np.ndarray:
    return np.mean(np.abs(w.astype(np.float64) - fake_quantize(w, qp)) ** p, axis=1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_beats_minmax_on_heavy_tails(bits: int, symmetric: bool) -> None:
    w = np.random.default_rng(bits).standard_t(2, (8, 512)).astype(np.float32)
    mm = choose_qparams(w, bits, symmetric=symmetric, axis=0)
    mse = choose_qparams(w, bits, symmetric=symmetric, axis=0, method=ScaleMethod.MSE)
    assert np.all(_p_error(w, mse) <= _p_error(w, mm) * (1 + 1e-5))
    assert np.all(mse.scale <= mm.scale)
    if bits < 8:  # at 8 bits rounding noise is too small for clipping the tails to pay
        assert np.any(mse.scale < mm.scale)
    # candidate 0 is min-max
    one = choose_qparams(w, bits, symmetric=symmetric, axis=0, method=ScaleMethod.MSE, steps=1)
    assert np.array_equal(one.scale, mm.scale) and np.array_equal(one.zero_point, mm.zero_point)


def test_mse_search_is_the_per_channel_argmin_over_candidates() -> None:
    rng = np.random.default_rng(3)
    w = rng.laplace(size=(4, 64)).astype(np.float32)
    qp = choose_qparams(w, 3, symmetric=False, axis=0, method=ScaleMethod.MSE, steps=20)
    for c in range(4):
        rmin, rmax = min(float(w[c].min()), 0.0), max(float(w[c].max()), 0.0)
        scores = []
        for i in range(20):
            f = 1.0 - 0.01 * i
            s = np.array((rmax * f - rmin * f) / 7, np.float32)
            z = np.array(np.clip(np.rint(-rmin * f / float(s)), 0, 7), np.int32)
            cand = QParams(3, False, s, z, None)
            scores.append(float(_p_error(w[c : c + 1], cand)[0]))
        best = int(np.argmin(scores))
        cand_qp = QParams(3, False, qp.scale[c].reshape(()), qp.zero_point[c].reshape(()), None)
        assert float(_p_error(w[c : c + 1], cand_qp)[0]) == pytest.approx(scores[best], rel=1e-5)


def test_mse_search_memory_is_bounded() -> None:
    w = np.random.default_rng(0).standard_normal((64, 16384)).astype(np.float32)  # 4 MiB
    tracemalloc.start()
    try:
        choose_qparams(w, 4, symmetric=False, axis=0, method=ScaleMethod.MSE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < w.nbytes  # 80 candidates, yet less than one copy of the weight at a time


# --- roundoff_errors and chunking -----------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("method", list(ScaleMethod))
def test_roundoff_errors_matches_per_width_calls(symmetric: bool, axis, method) -> None:
    w = np.random.default_rng(1).standard_t(3, (6, 5, 7)).astype(np.float32)
    bits = [2, 3, 4, 5, 6, 7, 8]
    kw = {"symmetric": symmetric, "axis": axis, "method": method, "steps": 30}
    got = roundoff_errors(w, bits, **kw)
    want = [roundoff_error(w, choose_qparams(w, b, **kw)) for b in bits]
    assert got.dtype == np.float64 and got.shape == (7,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # float64 ground truth
    for b, e in zip(bits, got, strict=True):
        fq = fake_quantize(w, choose_qparams(w, b, **kw))
        assert e == pytest.approx(np.mean((w.astype(np.float64) - fq) ** 2), rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 50), (40, 3, 2), (40, 3, 1), (5, 30, 1), (1, 1, 9)])
@pytest.mark.parametrize("axis", [None, 1])
def test_chunking_does_not_change_results(monkeypatch, shape, axis) -> None:
    w = np.random.default_rng(2).standard_t(3, shape).astype(np.float32)
    kw = {"symmetric": False, "axis": axis, "method": ScaleMethod.MSE, "steps": 10}
    whole = choose_qparams(w, 3, **kw), roundoff_errors(w, [2, 5], **kw)
    monkeypatch.setattr(numerics, "_CHUNK", 7)
    small = choose_qparams(w, 3, **kw), roundoff_errors(w, [2, 5], **kw)
    assert np.array_equal(whole[0].scale, small[0].scale)
    assert np.array_equal(whole[0].zero_point, small[0].zero_point)
    np.testing.assert_allclose(whole[1], small[1], rtol=1e-6)
