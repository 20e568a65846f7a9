"""Empirical bias correction: give each quantized layer's output back its FP mean.

Quantizing a layer's weights (and its input activations) shifts the mean of its output per
channel: E[W'x'] != E[Wx], and the shift propagates. Nagel et al. (2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.2, the empirical variant) add the
difference of per-channel means, measured on calibration data, to the layer's bias::

    b_c  <-  b_c + (E[y_c] - E[y'_c])        y: FP output, y': quantized model's output,
                                              mean over the batch and every non-channel axis

``ALL`` corrects the layers one at a time in graph order, each measured on the model whose earlier
layers are already corrected, so a layer's correction covers the shift it inherits as well as its
own (one pass over the calibration data per layer; onnxruntime runs only the part of the model
that layer's mean depends on). Correcting every layer from one shared measurement instead (or
iterating that, Jacobi-style) diverges on residual networks: a shift inherited through the skip
connections is then removed at every layer at once (resnet20 W4: mean error 0.07 -> 0.13 -> 0.29
-> 0.55 over three such rounds). ``OUTPUT`` corrects only the layers no other corrected layer reads
from (the logits of a classifier), from one pass.

Stages: :func:`plan_correction` on the FP model (adds a zero bias to a Conv/Gemm without one),
:func:`reference_means` on the FP model, then, on the quantized model (Q/DQ weights and
activations, biases still float), :func:`correct_biases`, which writes the bias initializers in
place. Means go through ReduceMean nodes added to a clone of each model, so nothing larger than a
channel vector leaves onnxruntime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir  # noqa: TID251

from onnx_mixquant.calibrate import batch_samples, probe_session
from onnx_mixquant.config import BiasConfig, BiasCorrection
from onnx_mixquant.errors import CalibrationError
from onnx_mixquant.rounding import _segments
from onnx_mixquant.rounding._biasplan import BiasPlan, BiasTarget, plan_correction, reader, reader_output
from onnx_mixquant.toolkit import default_opset

__all__ = [
    "BiasLayer",
    "BiasPlan",
    "BiasReport",
    "BiasTarget",
    "correct_biases",
    "first_samples",
    "plan_correction",
    "reference_means",
]

logger = logging.getLogger(__name__)

_MEAN_PREFIX = "onnx_mixquant_bias_mean"


@dataclass(frozen=True)
class BiasLayer:
    """One corrected layer: mean |FP mean - quantized mean| over its channels before and after the
    correction, and the largest change of a bias entry."""

    node: str
    bias: str
    channels: int
    created: bool
    error_before: float
    error_after: float
    max_change: float


@dataclass(frozen=True)
class BiasReport:
    """What :func:`correct_biases` did; ``num_samples`` is what the means were measured on."""

    mode: str
    #: How each layer was measured with the earlier ones corrected: "segments" (the model run in
    #: segments, one pass), "prefixes" (a pass per layer), or "output layers" (one pass, ``OUTPUT``).
    method: str
    num_samples: int
    provider: str
    seconds: float
    layers: tuple[BiasLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    #: Lowest held-out output SQNR (dB) with and without the correction, when it was checked
    #: (``_datacheck.check_bias``); None when it was not.
    held_out_db: tuple[float, float] | None = None
    #: False when the check found the model better without it, and it was not written.
    kept: bool = True


def _add_means(model: ir.Model, targets: Sequence[BiasTarget]) -> list[str]:
    """Add a ReduceMean over every non-channel axis of each target's output, as graph outputs."""
    graph = model.graph
    opset = default_opset(model)
    names = []
    for i, t in enumerate(targets):
        src = reader_output(graph, t.bias)
        axes = list(t.reduce_axes)
        name = f"{_MEAN_PREFIX}_{i}"
        if opset >= 18:
            a = ir.tensor(np.array(axes, np.int64), name=f"{name}_axes")
            av = ir.Value(
                name=a.name, const_value=a, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(axes)])
            )
            graph.register_initializer(av)
            node = ir.node("ReduceMean", [src, av], {"keepdims": 0}, name=name)
        else:
            node = ir.node("ReduceMean", [src], {"axes": axes, "keepdims": 0}, name=name)
        out = node.outputs[0]
        out.name, out.type, out.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape([t.channels])
        graph.insert_after(reader(graph, t.bias), node)
        graph.outputs.append(out)
        names.append(name)
    return names


def _measure(
    sess: object,
    names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    targets: Sequence[BiasTarget],
    tick: Callable[[], None],
) -> tuple[list[np.ndarray], int]:
    """Per-channel means of each target's output over all ``batches`` (float64), and the sample count."""
    sums = [np.zeros(t.channels) for t in targets]
    count = 0
    for i, feed in enumerate(batches):
        try:
            outs = sess.run(names, feed)  # type: ignore[attr-defined]
        except Exception as e:
            raise CalibrationError(
                f"bias correction: onnxruntime cannot run calibration batch {i}: {e}"
            ) from e
        n = batch_samples(feed)
        for s, o in zip(sums, outs, strict=True):
            s += n * np.asarray(o, np.float64).reshape(-1)
        count += n
        tick()
    if count == 0:
        raise CalibrationError("bias correction: no calibration samples")
    means = [s / count for s in sums]
    for t, m in zip(targets, means, strict=True):
        if not np.all(np.isfinite(m)):
            raise CalibrationError(f"bias correction: the output of {t.node!r} has NaN/Inf values")
    return means, count


def first_samples(batches: Iterable[dict[str, np.ndarray]], limit: int) -> Iterator[dict[str, np.ndarray]]:
    """The first batches, up to the one that reaches ``limit`` samples (batches are never cut: a
    model may fix its batch size)."""
    seen = 0
    for feed in batches:
        if seen >= limit:
            return
        seen += batch_samples(feed)
        yield feed


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    return tick


def reference_means(
    model: ir.Model,
    targets: Sequence[BiasTarget],
    batches: Iterable[dict[str, np.ndarray]],
    progress: Callable[[int, int], None] | None = None,
    total_batches: int = 0,
) -> list[np.ndarray]:
    """The FP model's per-channel output mean of each target (``model`` is not modified)."""
    if not targets:
        return []
    return _means(model, targets, batches, _ticker(progress, total_batches))[0]


def _topological(graph: ir.Graph, targets: Sequence[BiasTarget]) -> list[BiasTarget]:
    """``targets`` in graph order of the nodes reading their biases (ONNX graphs are sorted)."""
    position = {id(node): i for i, node in enumerate(graph)}
    return sorted(targets, key=lambda t: position[id(reader(graph, t.bias))])


def correct_biases(
    model: ir.Model,
    plan: BiasPlan,
    reference: Sequence[np.ndarray],
    batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    cfg: BiasConfig,
    progress: Callable[[int, int], None] | None = None,
    total_batches: int = 0,
) -> BiasReport:
    """Correct the biases of ``plan``'s targets (per ``cfg.mode``) in ``model``, in place.

    ``ALL``: layer by layer in graph order, each measured with every earlier layer already
    corrected: the model is run in segments cut after each layer (``_segments.py``, about one
    forward pass in all), or, for graphs with subgraphs, a prefix of the model per layer (half a
    forward pass each on average). ``OUTPUT``: the output layers, from one pass (they do not feed
    one another). A pass before and one after measure the errors for the report.

    Args:
        model: the quantized model, biases still float initializers named as in the plan.
        plan: from :func:`plan_correction` on the FP model.
        reference: :func:`reference_means` of ``plan.targets``, same order.
        batches: returns a fresh iterable of calibration feeds (called once per pass).
        cfg: the mode and the samples to measure on.
        progress: (steps done, steps in all).
        total_batches: batches per pass (for ``progress``).
    """
    start = time.perf_counter()
    mode = cfg.mode or BiasCorrection.OFF  # None is resolved by the pipeline before this stage
    chosen = set(plan.active(mode))
    if not chosen:
        return BiasReport(mode.value, "-", 0, "-", 0.0, (), plan.skipped)
    active = _topological(model.graph, [t for t in plan.targets if t in chosen])
    ref_by_bias = {t.bias: r for t, r in zip(plan.targets, reference, strict=True)}
    ref = [ref_by_bias[t.bias] for t in active]
    initial = [_bias_array(model, t.bias) for t in active]
    segments = None
    if mode is BiasCorrection.ALL:
        segments = _segments.plan_segments(model.graph, [reader(model.graph, t.bias) for t in active])
        if isinstance(segments, str):
            logger.info("bias correction: one prefix pass per layer (%s)", segments)
    steps = 2 * total_batches
    if isinstance(segments, list):
        steps += len(active)
    elif isinstance(segments, str):
        steps += (len(active) - 1) * total_batches
    tick = _ticker(progress, steps)

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        return first_samples(batches(), cfg.samples)

    before_means, count, provider = _means(model, active, feeds(), tick)
    before = [r - m for r, m in zip(ref, before_means, strict=True)]
    if segments is None:  # OUTPUT: the layers do not feed one another
        bias = [(b + e * t.gain).astype(np.float32) for b, e, t in zip(initial, before, active, strict=True)]
    elif isinstance(segments, list):
        bias = _sequential_segments(model, active, ref, initial, segments, list(feeds()), tick)
    else:
        bias = _sequential_prefixes(model, active, ref, initial, before[0], feeds, tick)
    _write(model, active, bias)
    try:
        after_means, _, _ = _means(model, active, feeds(), tick)
    except Exception:
        _write(model, active, initial)  # leave the model as it came
        raise
    after = [r - m for r, m in zip(ref, after_means, strict=True)]
    layers = tuple(
        BiasLayer(
            t.node,
            t.bias,
            t.channels,
            t.created,
            float(np.mean(np.abs(e0))),
            float(np.mean(np.abs(e1))),
            float(np.max(np.abs(b1 - b0))),
        )
        for t, e0, e1, b0, b1 in zip(active, before, after, initial, bias, strict=True)
    )
    seconds = time.perf_counter() - start
    how = "output layers" if segments is None else "segments" if isinstance(segments, list) else "prefixes"
    logger.info("bias correction (%s, %s): %d layers, %.1f s", mode.value, how, len(layers), seconds)
    return BiasReport(mode.value, how, count, provider, seconds, layers, plan.skipped)


def _means(
    model: ir.Model,
    targets: Sequence[BiasTarget],
    feeds: Iterable[dict[str, np.ndarray]],
    tick: Callable[[], None],
) -> tuple[list[np.ndarray], int, str]:
    """Each target's per-channel output mean in ``model``, the sample count and the provider."""
    probe = model.clone()
    names = _add_means(probe, targets)
    with probe_session(probe, early_free=True) as sess:
        means, count = _measure(sess, names, feeds, targets, tick)
        return means, count, sess.get_providers()[0]


def _sequential_segments(
    model: ir.Model,
    active: Sequence[BiasTarget],
    ref: Sequence[np.ndarray],
    initial: Sequence[np.ndarray],
    segments: list[_segments.Segment],
    feeds: list[dict[str, np.ndarray]],
    tick: Callable[[], None],
) -> list[np.ndarray]:
    """Each layer's correction from its output with every earlier layer corrected; the corrected
    output (the bias enters it additively) is what later segments read."""
    bias = list(initial)
    weights = np.array([batch_samples(f) for f in feeds], np.float64)

    def on_cut(k: int, outs: list[np.ndarray]) -> list[np.ndarray]:
        t = active[k]
        per_batch = [np.mean(o, axis=t.reduce_axes, dtype=np.float64) for o in outs]
        mean = np.average(np.stack(per_batch), axis=0, weights=weights)
        err = ref[k] - mean
        bias[k] = (bias[k] + err * t.gain).astype(np.float32)
        shape = [1] * t.rank
        shape[t.channel_axis] = t.channels
        shift = err.astype(np.float32).reshape(shape)
        return [o + shift for o in outs]

    _segments.run_segments(model, segments, feeds, on_cut, tick)
    return bias


def _sequential_prefixes(
    model: ir.Model,
    active: Sequence[BiasTarget],
    ref: Sequence[np.ndarray],
    initial: Sequence[np.ndarray],
    first_error: np.ndarray,
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
    tick: Callable[[], None],
) -> list[np.ndarray]:
    """Each layer's correction from a pass over the part of the model its output depends on,
    with the biases as inputs of one session (graphs the segments cannot cut)."""
    probe = model.clone()
    names = _add_means(probe, active)
    for t in active:
        v = probe.graph.initializers.pop(t.bias)
        v.const_value = None
        probe.graph.inputs.append(v)
    bias = list(initial)
    with probe_session(probe, early_free=True) as sess:
        for k, t in enumerate(active):
            if k == 0:
                err = first_error
            else:
                with_bias = ({**f, **{a.bias: b for a, b in zip(active, bias, strict=True)}} for f in feeds())
                err = ref[k] - _measure(sess, [names[k]], with_bias, [t], tick)[0][0]
            bias[k] = (bias[k] + err * t.gain).astype(np.float32)
    return bias


def _write(model: ir.Model, targets: Sequence[BiasTarget], biases: Sequence[np.ndarray]) -> None:
    for t, b in zip(targets, biases, strict=True):
        model.graph.initializers[t.bias].const_value = ir.tensor(b, name=t.bias)


def _bias_array(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name].const_value
    assert value is not None  # checked by the plan
    return value.numpy().astype(np.float32)
