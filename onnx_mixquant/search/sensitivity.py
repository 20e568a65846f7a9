"""Output sensitivity: what quantizing one weight at one width does to the model's outputs.

The data-free budget rule minimises the summed normalised roundoff error ``e_i(b) / mean(W_i^2)``.
Under a linear, independent-noise model every layer's relative error reaches the output alike,
so a large tensor is the cheapest place to take bits from; real models break that model where it
matters most (measured: SmolLM2's LM head, 21 % of the weights, got 2 bits and perplexity 10
million; a captcha OCR's 8210-way classifier got 3 bits and exact match fell from 0.45 to 0.07).
This stage measures instead, for every weight site ``i`` and candidate width ``b``::

    D[i, b] = mean over outputs k of  ||y_k(W_i -> Q_b(W_i)) - y_k||^2 / ||y_k||^2

the relative error of the model's outputs with *only* that weight rounded to nearest at ``b``
(the base quantizer's grid), where an output that holds logits (made by a MatMul / Gemm, with an
optional constant bias, through reshapes) is compared after a softmax over its last axis: a
classifier's decisions live in its probabilities, and the raw logits' error hides them (measured
on the captcha OCR, 8 calibration images: its classifier at 3 bits moved the logits by 2.2 %, no
more than a 3-bit conv, but the probabilities by 50 % against at most 16 % for any conv, and
flipped 32 % of the decisions), on a few samples: calibration data when given, else the synthetic
inputs of :mod:`onnx_mixquant.data.synthetic`. The budget rule then minimises ``sum_i D[i, b_i]``
(additivity, as HAWQ and AIMET's AMP assume).

Mechanics: one onnxruntime session on a copy of the model in which every probed weight (a
main-graph initializer, or a ``Constant`` node turned into one) is also a graph input, so feeding
the fake-quantized array substitutes it and every other weight keeps its stored value. Widths up
to :data:`PROBED_MAX_BITS` are run; above it the error is far below the others' and ``D`` follows
the roundoff error's ratio to the highest probed width. Weights the copy cannot expose (inside
``If`` / ``Loop`` bodies) get their normalised roundoff error times the median ratio
``D / normalised error`` of the probed weights at the same width, so both live on one scale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnx_mixquant.calibrate import probe_session
from onnx_mixquant.config import QuantizerConfig
from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.numerics import choose_qparams, fake_quantize
from onnx_mixquant.rounding import grid_of

__all__ = ["PROBED_MAX_BITS", "Sensitivity", "guarded_objective", "measure_sensitivity", "output_kinds"]

logger = logging.getLogger(__name__)

#: Widths above this are not run (their output error is extrapolated from the roundoff error).
PROBED_MAX_BITS = 5
#: An output error that is not finite counts as this (never chosen when anything else fits).
_BROKEN = 1e6
#: Ops between a logits-producing MatMul / Gemm and a graph output that keep it logits.
_RESHAPES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"})

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Sensitivity:
    """Measured output error per weight and width, and how it was obtained.

    Attributes:
        names: weight names, in the order of the error table's rows.
        bits: widths (columns), as in the error table.
        output_error: D (n, k), relative output error (see the module docstring).
        probed: names whose row was measured (the others are scaled roundoff errors).
        samples: samples each probe ran on; source: where they came from.
        seconds: wall time of the measurement.
    """

    names: tuple[str, ...]
    bits: tuple[int, ...]
    output_error: np.ndarray
    probed: tuple[str, ...]
    samples: int
    source: str
    seconds: float
    #: The widths that were run (the other columns are extrapolated).
    run_bits: tuple[int, ...] = ()


def _expose(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model, list[str]]:
    """A clone in which each of ``names`` that can be is a main-graph initializer and input
    (``Constant`` nodes lifted to initializers by onnx_ir's pass, keeping their names)."""
    probe = model.clone()
    LiftConstantsToInitializersPass(size_limit=0)(probe)
    graph = probe.graph
    exposed = []
    for name in names:
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        if value not in graph.inputs:
            graph.inputs.append(value)
        exposed.append(name)
    return probe, exposed


def _producer_through_reshapes(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in _RESHAPES and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def output_kinds(model: ir.Model) -> dict[str, str]:
    """Per graph output: "logits" (MatMul / Gemm, optionally + a constant bias, then reshapes),
    "probabilities" (Softmax), "log_probabilities" (LogSoftmax) or "raw"."""
    kinds = {}
    for out in model.graph.outputs:
        node = _producer_through_reshapes(out)
        kind = "raw"
        if node is not None and node.op_type == "Add":
            ins = [v for v in node.inputs if v is not None]
            made = [v for v in ins if v.const_value is None and v.producer() is not None]
            if (
                len(made) == 1
                and len(ins) == 2
                and (ins[0].const_value is not None or ins[1].const_value is not None)
            ):
                node = made[0].producer()
            else:
                node = None
        if node is not None:
            kind = {"MatMul": "logits", "Gemm": "logits", "Softmax": "probabilities"}.get(node.op_type, kind)
            kind = "log_probabilities" if node.op_type == "LogSoftmax" else kind
        kinds[out.name or ""] = kind
    return kinds


def _compared(y: np.ndarray, kind: str) -> np.ndarray:
    """What the error is measured on: probabilities for logits, the values otherwise (float64)."""
    y = np.asarray(y, dtype=np.float64)
    if kind == "log_probabilities":
        return np.exp(y)
    if kind == "logits" and y.ndim >= 1 and y.shape[-1] > 1:
        e = np.exp(y - np.max(y, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)
    return y


def _relative_errors(
    run: Callable[[Feed], list[np.ndarray]], feeds: Sequence[Feed], refs: Sequence[list[np.ndarray]]
) -> float:
    sq: np.ndarray | None = None
    energy: np.ndarray | None = None
    for feed, ref in zip(feeds, refs, strict=True):
        outs = run(feed)
        d = np.array([np.sum(np.square(o - r)) for o, r in zip(outs, ref, strict=True)])
        e = np.array([np.sum(np.square(r, dtype=np.float64)) for r in ref])
        sq, energy = (d, e) if sq is None or energy is None else (sq + d, energy + e)
    assert sq is not None and energy is not None
    rel = sq / np.where(energy > 0, energy, 1.0)
    value = float(np.mean(rel))
    return value if np.isfinite(value) else _BROKEN


def measure_sensitivity(
    model: ir.Model,
    weights: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
    normalised: np.ndarray,
    bits: Sequence[int],
    quantizer: QuantizerConfig,
    feeds: Sequence[Feed],
    source: str,
    progress: Callable[[int, int], None] | None = None,
    probe_bits: Sequence[int] | None = None,
    blocks: Mapping[str, int] | None = None,
) -> Sensitivity:
    """Measure D[i, b] for every weight in ``weights`` (error-table order) and width in ``bits``.

    Args:
        model: the FP model (not modified; a clone is probed).
        weights: name -> float32 array, in the error table's row order.
        axes: name -> per-channel axis.
        normalised: the error table's normalised roundoff errors (n, k), for extrapolation.
        bits: the error table's widths (ascending).
        quantizer: the base quantizer (grid per width).
        feeds: input batches to run (a few samples).
        source: where the feeds came from, for the report.
        progress: progress(done, total) per probed weight.
        probe_bits: the widths to run (the others follow the roundoff error's ratio to the
            nearest run width); None: every width up to :data:`PROBED_MAX_BITS`.
        blocks: the weights that may be block-wise and their reduction axes
            (:func:`onnx_mixquant.rounding.block_axes`): each width is probed on the grid the
            error table and the rounding stage use (:func:`onnx_mixquant.rounding.grid_of`).

    Raises:
        UnsupportedModelError: onnxruntime cannot open or run the probe model.
    """
    t0 = time.perf_counter()
    names = tuple(weights)
    probe, exposed = _expose(model, names)
    out = np.full((len(names), len(bits)), np.nan)
    wanted = set(probe_bits) if probe_bits is not None else {b for b in bits if b <= PROBED_MAX_BITS}
    run_cols = [j for j, b in enumerate(bits) if b in wanted] or [0]
    with probe_session(probe) as sess:
        kinds = output_kinds(model)
        out_names = [o.name for o in sess.get_outputs()]

        def run(feed: Feed) -> list[np.ndarray]:
            try:
                outs = sess.run(out_names, feed)
            except Exception as e:
                raise UnsupportedModelError(f"sensitivity probe: onnxruntime failed: {e}") from e
            return [_compared(o, kinds.get(n, "raw")) for o, n in zip(outs, out_names, strict=True)]

        refs = [run(f) for f in feeds]
        for i, name in enumerate(names):
            if name in exposed:
                w = weights[name]
                for j in run_cols:
                    axis, block = grid_of(name, bits[j], axes, blocks, quantizer)
                    qp = choose_qparams(
                        w,
                        bits[j],
                        symmetric=quantizer.symmetric_at(bits[j]),
                        axis=axis,
                        method=quantizer.scale_method,
                        p=quantizer.mse_p,
                        steps=quantizer.mse_steps,
                        block_size=block,
                    )
                    wq = fake_quantize(w, qp).astype(w.dtype, copy=False)
                    subst = [{**f, name: wq} for f in feeds]
                    out[i, j] = _relative_errors(run, subst, refs)
            if progress is not None:
                progress(i + 1, len(names))
    _extrapolate(out, normalised, run_cols)
    _fill_unprobed(out, normalised, [n in exposed for n in names])
    seconds = time.perf_counter() - t0
    samples = sum(int(np.shape(next(iter(f.values())))[0]) if f else 1 for f in feeds)
    logger.info(
        "sensitivity: %d of %d weights probed on %d samples in %.1f s",
        len(exposed),
        len(names),
        samples,
        seconds,
    )
    probed = tuple(n for n in names if n in exposed)
    run_bits = tuple(bits[j] for j in run_cols)
    return Sensitivity(names, tuple(bits), out, probed, samples, source, seconds, run_bits)


def _extrapolate(out: np.ndarray, normalised: np.ndarray, run_cols: Sequence[int]) -> None:
    """Columns not run: D scales like the roundoff error from the nearest run width (in place)."""
    cols = np.asarray(run_cols)
    for j in range(out.shape[1]):
        if j in run_cols:
            continue
        k = int(cols[np.argmin(np.abs(cols - j))])
        safe = np.where(normalised[:, k] > 0, normalised[:, k], 1.0)
        out[:, j] = np.where(normalised[:, k] > 0, out[:, k] / safe, 0.0) * normalised[:, j]


def guarded_objective(
    normalised: np.ndarray, sens: Sensitivity, ratio: float
) -> tuple[np.ndarray, dict[str, float]]:
    """The GUARDED objective: ``normalised`` with each outlier row weighted by its sensitivity.

    A weight's sensitivity ratio is the mean over the run widths of ``D / normalised``; a probed
    weight whose ratio exceeds ``ratio`` x the median of the probed weights is an outlier, and its
    row is multiplied by ``its ratio / median``: where the probe and the roundoff estimate
    disagree that much, the measurement wins. Returns the objective and the factors by name.
    """
    probed = np.array([n in set(sens.probed) for n in sens.names], dtype=bool)
    cols = [j for j, b in enumerate(sens.bits) if b in sens.run_bits]
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(normalised[:, cols] > 0, sens.output_error[:, cols] / normalised[:, cols], 0.0)
    score = np.where(probed, np.nanmean(per, axis=1), 0.0)
    median = float(np.median(score[probed])) if probed.any() else 0.0
    factor = np.ones(len(sens.names))
    if median > 0:
        factor = np.where(score > ratio * median, score / median, 1.0)
    boosted = {n: float(f) for n, f in zip(sens.names, factor, strict=True) if f > 1.0}
    return normalised * factor[:, None], boosted


def _fill_unprobed(out: np.ndarray, normalised: np.ndarray, probed: Sequence[bool]) -> None:
    """Rows not probed: normalised error x the probed rows' median D / normalised error, per width."""
    mask = np.asarray(probed, dtype=bool)
    if mask.all():
        return
    for j in range(out.shape[1]):
        ok = mask & (normalised[:, j] > 0) & np.isfinite(out[:, j])
        scale = float(np.median(out[ok, j] / normalised[ok, j])) if ok.any() else 1.0
        out[~mask, j] = normalised[~mask, j] * scale
