"""onnx-ad 0.3.0 glue: the Conv weight adjoints it lacks or builds slowly, and a leaner gradient model.

- onnx-ad differentiates a Conv with ``group > 1`` (the depthwise convs of MobileNet/EfficientNet)
  with respect to its input but raises ``UnsupportedOperator`` for its weight; and it builds the
  weight adjoint of every other Conv as a convolution with an image-sized kernel, which MLAS runs
  as im2col + one GEMM with as many columns as the kernel has taps (9 for a 3x3): 3-4x the time
  of the forward Conv. :func:`grouped_conv_rule` installs, for the duration of a ``with`` block, a
  reverse rule for ``Conv`` that delegates to onnx-ad's rule and builds those weight adjoints
  itself: a grouped Conv (DESIGN.md, "Gradients without a deep-learning framework"), a matrix
  product (1x1), and im2col + a batched matrix product (any other group-1 Conv whose im2col
  matrix fits :data:`IM2COL_BYTES`). onnx-ad looks its rules up in the dict
  ``onnx_ad.rules.REVERSE`` at every node, so the override is seen by ``onnx_ad.reverse`` and
  undone on exit.
  The same block installs a leaner rule for ``Clip`` (:func:`_clip_reverse`, ReLU6's adjoint).
- :func:`reverse` runs onnx-ad under that rule and drops work onnxruntime would do for nothing.
- :func:`differentiable` reads onnx-ad's rule tables.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ad
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import helper
from onnx_ad import UnsupportedOperator, lower, rules
from onnx_ad._build import attribute

from onnx_mixquant.rounding.reconstruct._rankalign import align_ranks, transposes_as_reshapes

__all__ = [
    "ALIGN_RANKS",
    "CLIP_MASK",
    "DEPTHWISE_DIRECT",
    "IM2COL_BYTES",
    "SEED_RESHAPES",
    "differentiable",
    "grouped_conv_rule",
    "reverse",
]

_LOCK = threading.Lock()
#: Recurrent ops onnx-ad rewrites as a Scan over their equations before differentiating.
_RECURRENT = ("RNN", "GRU", "LSTM")
#: Largest im2col matrix (bytes, one batch) the weight adjoint of a group-1 Conv may build; a
#: larger one keeps onnx-ad's convolution form, which needs no such buffer. 9x the Conv input
#: for a 3x3 kernel: EfficientNet-Lite0's stem at batch 32 builds 41 MiB.
IM2COL_BYTES = 256 << 20
#: Whether :func:`reverse` aligns the ranks of broadcasting operands (:mod:`._rankalign`); off only
#: to measure it (``tools/bench_unit.py --without rank-align``).
ALIGN_RANKS = True
#: Whether Clip's input adjoint is ``g * Cast(x == Clip(x))`` (:func:`_clip_reverse`) rather than
#: onnx-ad's two comparisons, two Nots, an And and a Where; off only to measure it
#: (``tools/bench_unit.py --without clip-mask``).
CLIP_MASK = True
#: Whether a depthwise Conv's weight adjoint takes one group per (sample, channel)
#: (:func:`_depthwise_adjoint`) rather than transposing X and G; off only to measure it
#: (``tools/bench_unit.py --without dw-direct``).
DEPTHWISE_DIRECT = True
#: Whether :func:`reverse` turns Transposes that only move axes of size 1 (the seed axis, with
#: ``seeds=1``) into Reshapes (:func:`._rankalign.transposes_as_reshapes`); off only to measure it
#: (``tools/bench_unit.py --without seed-reshape``).
SEED_RESHAPES = True

_Rule = Callable[[Any, Any, list[Any]], list[Any]]


@functools.cache
def differentiable(op_type: str) -> bool:
    """Whether onnx-ad 0.3.0 (with :func:`grouped_conv_rule`) carries a gradient through ``op_type``.

    True for ops with a reverse rule (a grouped Conv included), ops onnx-ad lowers or rewrites
    (LRN, LSTM, ...), ops without inputs (``Constant``), and ops whose ONNX function body onnx-ad
    expands (all of its ops differentiable, or built per node for a context-dependent one). False
    otherwise: sequences, strings, QLinearConv, unknown ops.
    """
    if op_type in rules.REVERSE or op_type in lower.LOWERINGS or op_type in _RECURRENT:
        return True
    try:
        schema = onnx.defs.get_schema(op_type)
    except onnx.defs.SchemaError:
        return False
    if schema.max_input == 0 or schema.has_context_dependent_function:  # type: ignore[attr-defined]
        return True  # nothing can flow into it; onnx-ad expands the body for the node's types
    body = schema.function_body.node if schema.has_function else [None]  # type: ignore[attr-defined]
    return all(n is not None and differentiable(n.op_type) for n in body)


def reverse(
    model: onnx.ModelProto, inputs: Sequence[str], output: str, seeds: int | None = None
) -> onnx.ModelProto:
    """``onnx_ad.reverse(model, inputs, [output], layout="onnx")`` under :func:`grouped_conv_rule`,
    without two kinds of dead weight onnxruntime would run (measured, 2 CPU threads):

    - adjoints onnx-ad builds and then discards (of Clip's bounds, Pow's exponent): a third of an
      EfficientNet MBConv step;
    - its ReduceSums over axes of size 1 (no-ops; ~60 ms each on a 1x1 Conv's 0.4M-element V),
      two thirds of a step on EfficientNet's head;

    and with every lower-rank operand of a broadcasting op at full rank (:mod:`._rankalign`).

    The result has the seed input ``adj_<output>`` (shape ``[nadj]``, or ``[seeds]`` when given)
    and, after ``model``'s own outputs, one output ``adj_<x>`` of shape ``x.shape + [nadj]`` per
    entry of ``inputs``. With ``seeds`` every shape can be static, and Transposes that only move
    axes of size 1 become Reshapes (:func:`._rankalign.transposes_as_reshapes`).

    Raises:
        onnx_ad.UnsupportedOperator: an op between ``inputs`` and ``output`` has no rule.
    """
    with grouped_conv_rule():
        gradient = ir.from_proto(onnx_ad.reverse(model, inputs=list(inputs), outputs=[output], layout="onnx"))
    if seeds is not None:
        (seed,) = [v for v in gradient.graph.inputs if v.name == f"adj_{output}"]
        seed.shape = ir.Shape([seeds])
    onnx_ir.passes.common.ShapeInferencePass(strict_mode=False, data_prop=False)(gradient)
    for node in list(gradient.graph):
        if _noop_reduce(node) and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(node.inputs[0])  # type: ignore[arg-type]
            gradient.graph.remove(node, safe=True)
    if SEED_RESHAPES:
        transposes_as_reshapes(gradient)
    if ALIGN_RANKS:
        align_ranks(gradient)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(gradient)
    return ir.to_proto(gradient)


def _noop_reduce(node: ir.Node) -> bool:
    """A ReduceSum (keepdims) over constant axes that all have size 1, or over none with noop set."""
    if (
        node.op_type != "ReduceSum"
        or len(node.inputs) < 2
        or node.inputs[0] is None
        or node.inputs[1] is None
    ):
        return False
    axes, shape = ir.convenience.get_const_tensor(node.inputs[1]), node.inputs[0].shape
    if axes is None or shape is None or node.attributes.get_int("keepdims", 1) != 1:
        return False
    listed = [int(a) for a in axes.numpy().ravel()]
    if not listed:
        return node.attributes.get_int("noop_with_empty_axes", 0) == 1
    return all(shape[a] == 1 for a in listed)


@contextlib.contextmanager
def grouped_conv_rule() -> Iterator[None]:
    """Within the block, ``onnx_ad.reverse`` also differentiates grouped Convs w.r.t. the weight,
    Slices with steps > 1, and Clip with :func:`_clip_reverse` (with :data:`CLIP_MASK`).

    Thread-safe: concurrent blocks run one after the other (the rule table is process-global).
    """
    with _LOCK:
        saved = {op: rules.REVERSE[op] for op in ("Conv", "Slice", "Clip")}
        rules.REVERSE["Conv"] = functools.partial(_conv_reverse, saved["Conv"])
        rules.REVERSE["Slice"] = functools.partial(_slice_reverse, saved["Slice"])
        if CLIP_MASK:
            rules.REVERSE["Clip"] = functools.partial(_clip_reverse, saved["Clip"])
        try:
            yield
        finally:
            rules.REVERSE.update(saved)


def _clip_reverse(original: _Rule, ctx: Any, node: Any, grads: list[Any]) -> list[Any]:
    """onnx-ad's Clip rule where a bound's adjoint is wanted; otherwise the input adjoint as
    ``g * Cast(x == Clip(x))``: x is inside [min, max] (bounds included, as in onnx-ad's rule)
    exactly where clipping leaves it unchanged. onnx-ad's mask takes two comparisons, two Nots
    and an And, and selects with a Where, which onnxruntime's CPU provider runs at 2-3x the time
    of a Mul: in its profile of EfficientNet-Lite0's 112x112 MBConv step (batch 32), 37 % of the
    step (BENCHMARKS.md, "gradient-graph rewrites", ``clip-mask``)."""
    bounds = [name for name in node.input[1:3] if name]
    if not bounds or any(ctx.asked_for(name) for name in bounds):
        return original(ctx, node, grads)
    x, y = node.input[0], node.output[0]
    inside = ctx.b.op("Equal", [x, y], stem="clip_inside")
    derivative = ctx.b.op("Cast", [inside], to=ctx.dtype(y, x), stem="clip_d")
    return [ctx.b.op("Mul", [grads[0], ctx.lift(derivative)], stem="a_" + x)] + [None] * (len(node.input) - 1)


def _slice_reverse(original: _Rule, ctx: Any, node: Any, grads: list[Any]) -> list[Any]:
    """onnx-ad's Slice rule, extended to positive steps > 1 (the ``x[:, :, ::2, ::2]`` of a ResNet
    option-A shortcut): along such an axis the adjoint interleaves ``step - 1`` zeros after every
    element (Unsqueeze, zero Pad on the new axis, Reshape), trims to the input, then zero-pads the
    start and end offsets like a step-1 slice."""
    starts, ends, axes, steps = rules._slice_bounds(ctx, node)
    if steps is None or all(step == 1 for step in steps):
        return original(ctx, node, grads)
    shape, out_shape = ctx.shapes.static(node.input[0]), ctx.shapes.static(node.output[0])
    if (
        starts is None
        or ends is None
        or any(step < 1 for step in steps)
        or shape is None
        or out_shape is None
    ):
        raise UnsupportedOperator("Slice with a step other than 1 is differentiated only with a positive "
                                  "step, constant bounds and static shapes")  # fmt: skip
    b, rank = ctx.b, len(shape)
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    g, dims = ctx.full(grads[0], node.output[0]), list(out_shape)
    before, after = [0] * (rank + 1), [0] * (rank + 1)
    for axis, start, step in zip(axes, starts, steps, strict=True):
        extent, count = shape[axis], out_shape[axis]
        start = min(max(start + extent if start < 0 else start, 0), extent)
        if step > 1 and count > 0:
            new_axis = [axis + 1]
            if ctx.opset >= 13:
                g = b.op("Unsqueeze", [g, b.ints(new_axis)], stem="slice_up")
            else:
                g = b.op("Unsqueeze", [g], axes=new_axis, stem="slice_up")
            tail = [0] * (rank + 2)
            tail[axis + 1] = step - 1
            g = rules._pad(ctx, g, [0] * (rank + 2), tail)
            dims[axis] = min(count * step, extent - start)
            if count * step > dims[axis]:  # the zeros after the last element run past the input
                wide = [*dims[:axis], count * step, *dims[axis + 1 :], -1]
                g = b.op("Reshape", [g, b.ints(wide)], stem="slice_up")
                g = b.op("Slice", [g, b.ints([0]), b.ints([dims[axis]]), b.ints([axis])], stem="slice_up")
            else:
                g = b.op("Reshape", [g, b.ints([*dims, -1])], stem="slice_up")
        before[axis], after[axis] = start, extent - start - dims[axis]
    return [rules._pad(ctx, g, before, after)] + [None] * (len(node.input) - 1)


def _conv_reverse(original: _Rule, ctx: Any, node: Any, grads: list[Any]) -> list[Any]:
    """onnx-ad's Conv rule, with the weight adjoint built here: that of a grouped Conv (which onnx-ad
    lacks), a 1x1 Conv and, where its im2col matrix fits, any other Conv (module docstring).

    onnx-ad's rule skips the weight when it is not asked for (``ctx.asked_for``), so the weight is
    hidden from it while it builds the input and bias adjoints, and added back here.
    """
    w = node.input[1]
    adjoint = _weight_rule(ctx, node)
    if adjoint is None:
        return original(ctx, node, grads)
    wanted = ctx.wanted
    ctx.wanted = (set(node.input) if wanted is None else set(wanted)) - {w}
    try:
        contributions = list(original(ctx, node, grads))
    finally:
        ctx.wanted = wanted
    contributions[1] = adjoint(ctx, node, ctx.full(grads[0], node.output[0]))
    return contributions


def _weight_rule(ctx: Any, node: Any) -> Callable[[Any, Any, str], str] | None:
    """The adjoint builder of ``node``'s weight, or None where onnx-ad's rule stays (the weight is
    not asked for, or a group-1 Conv's im2col matrix would not fit)."""
    if not ctx.asked_for(node.input[1]):
        return None
    if attribute(node, "group", 1) != 1:
        return _weight_adjoint
    if _pointwise(ctx, node):
        return _pointwise_adjoint
    return _im2col_adjoint if _im2col(ctx, node) else None


def _pointwise(ctx: Any, node: Any) -> bool:
    """A 1x1 Conv, group 1, stride 1, no padding, with static shapes: a matrix product per sample."""
    spatial = len(ctx.shapes.static(node.input[1]) or ()) - 2
    ones, zeros = [1] * spatial, [0] * (2 * spatial)
    return (
        spatial > 0
        and ctx.shapes.static(node.input[0]) is not None
        and list(ctx.shapes.static(node.input[1])[2:]) == ones
        and attribute(node, "group", 1) == 1
        and list(attribute(node, "strides", ones)) == ones
        and list(attribute(node, "dilations", ones)) == ones
        and list(attribute(node, "pads", zeros)) == zeros
        and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
    )


def _pointwise_adjoint(ctx: Any, node: Any, seeded: str) -> str:
    """dL/dW of a 1x1 Conv as a matrix product (onnx-ad's generic rule convolves with an
    image-sized kernel: several times slower on CPU). With P positions and S seeds::

        many positions:  sum_n G_n X_n^T,   G [N, M, P, S] -> [N, S*M, P],  X [N, C, P]
        few positions:   G' X'^T,           G -> [S*M, N*P],                X -> [C, N*P]
        either: [S*M, C] -> [S, M, C] -> [M, C, S] -> [M, C, 1.., S]

    The batched form makes N*M*C partial sums, the other transposes X and G; the smaller wins.
    """
    x, w = node.input[0], node.input[1]
    shape_x, shape_w = ctx.shapes.static(x), ctx.shapes.static(w)
    b, rank = ctx.b, len(shape_x)
    n, m, c, positions = shape_x[0], shape_w[0], shape_w[1], int(np.prod(shape_x[2:]))
    xt = b.op("Reshape", [x, b.ints([n, c, positions])], stem="pw_x")
    if n * m * c <= n * positions * (m + c):
        gt = b.op("Transpose", [seeded], perm=[0, rank, *range(1, rank)], stem="pw_g")
        gt = b.op("Reshape", [gt, b.ints([n, -1, positions])], stem="pw_g")
        product = b.op("MatMul", [gt, b.op("Transpose", [xt], perm=[0, 2, 1])], stem="pw_mm")
        product = ctx.reduce_sum(product, [0], keepdims=0)
    else:
        xt = b.op("Reshape", [b.op("Transpose", [xt], perm=[0, 2, 1]), b.ints([n * positions, c])])
        gt = b.op("Transpose", [seeded], perm=[rank, 1, 0, *range(2, rank)], stem="pw_g")
        gt = b.op("Reshape", [gt, b.ints([-1, n * positions])], stem="pw_g")
        product = b.op("MatMul", [gt, xt], stem="pw_mm")
    product = b.op("Reshape", [product, b.ints([-1, m, c])], stem="pw_split")
    product = b.op("Transpose", [product], perm=[1, 2, 0], stem="pw_t")
    return str(b.op("Reshape", [product, b.ints([m, c, *([1] * (rank - 2)), -1])], stem="pw_weight"))


def _im2col(ctx: Any, node: Any) -> bool:
    """A group-1 Conv with static shapes whose im2col matrix (one batch) fits :data:`IM2COL_BYTES`."""
    shapes = [ctx.shapes.static(name) for name in (node.input[0], node.input[1], node.output[0])]
    if any(shape is None for shape in shapes) or len(shapes[1]) < 3:
        return False
    shape_x, shape_w, shape_y = shapes
    itemsize = helper.tensor_dtype_to_np_dtype(ctx.dtype(node.input[0])).itemsize
    size = shape_x[0] * shape_x[1] * int(np.prod(shape_w[2:])) * int(np.prod(shape_y[2:])) * itemsize
    return (
        attribute(node, "group", 1) == 1
        and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
        and size <= IM2COL_BYTES
    )


def _im2col_adjoint(ctx: Any, node: Any, seeded: str) -> str:
    """dL/dW of a group-1 Conv as im2col + matrix products (S seeds, T kernel taps, P output
    positions)::

        cols = Conv(X, E, group=C, the forward's pads, strides and dilations)   [N, C*T, *Ho]
               E [C*T, 1, *K]: filter c*T + t is 1 at tap t (one-hot), so
               cols[n, c*T + t, o] = X_pad[n, c, o * stride + tap(t) * dilation]
        dW   = sum_n cols[n] G[n]^T      cols -> [N, C*T, P],  G [N, M, *Ho, S] -> [S, N, P, M]
               (P <= M: cols -> [C*T, N*P] times G -> [S, N*P, M], one product per seed)
               [S, C*T, M] -> [S, C, *K, M] -> [M, C, *K, S]

    The one-hot Conv costs about the forward Conv; the products have C*T rows and S*M columns,
    where onnx-ad's form is a GEMM with T (9 for 3x3) columns, which MLAS runs at a fraction of
    its speed. The im2col matrix is T times the Conv input (capped by :data:`IM2COL_BYTES`). A
    ResNet-20 training step over all its units is 1.4x faster (BENCHMARKS.md, ``bench_unit``).
    """
    x, w, y = node.input[0], node.input[1], node.output[0]
    shape_x, shape_w, shape_y = (ctx.shapes.static(name) for name in (x, w, y))
    b, spatial = ctx.b, len(shape_w) - 2
    n, m, c, kernel = shape_x[0], shape_w[0], shape_w[1], list(shape_w[2:])
    taps, positions, rank = int(np.prod(kernel)), int(np.prod(shape_y[2:])), 2 + spatial
    onehot = np.zeros((c * taps, taps))
    onehot[np.arange(c * taps), np.tile(np.arange(taps), c)] = 1.0
    cols = b.op(
        "Conv", [x, b.constant(onehot.reshape(c * taps, 1, *kernel), ctx.dtype(x))],
        group=c, kernel_shape=kernel, stem="ic_cols",
        **_geometry(node, spatial),
    )  # fmt: skip
    cols = b.op("Reshape", [cols, b.ints([n, c * taps, positions])], stem="ic_cols")
    # G [N, M, *Ho, S] -> [S, N, M, *Ho] -> [S*N, M, P] -> [S*N, P, M]. The seed axis goes to the
    # front first: onnxruntime moves that Transpose up through the elementwise adjoints before
    # it (a ReLU's Where), which then run without the trailing size-1 axis that makes them
    # several times slower (EfficientNet-Lite0's stem: 177 vs 52 ms a step). The other is a 3-D
    # transpose (4-D ones with a size-1 axis ran 5x slower).
    gt = b.op("Transpose", [seeded], perm=[rank, *range(rank)], stem="ic_g")
    gt = b.op("Reshape", [gt, b.ints([-1, m, positions])], stem="ic_g")
    gt = b.op("Transpose", [gt], perm=[0, 2, 1], stem="ic_g")
    if positions > m:  # S is 1 in BRECQ; either form is exact for any S
        # one product per sample, then the sum over the batch (N*C*T*S*M partial sums):
        # [N, C*T, P] x [S, N, P, M] -> [S, N, C*T, M] -> [S, C*T, M]
        gt = b.op("Reshape", [gt, b.ints([-1, n, positions, m])], stem="ic_g")
        product = ctx.reduce_sum(b.op("MatMul", [cols, gt], stem="ic_mm"), [1], keepdims=0)
    else:
        # no more positions than filters: transposing cols (N*C*T*P) costs less than those
        # partial sums, one product over N*P (ResNet-20's 8x8 stage, 64 filters: 0.9 vs 1.7 ms;
        # with 256 positions and 32 filters the batched form wins, 0.6 vs 2.1 ms):
        # [C*T, N*P] x [S, N*P, M] -> [S, C*T, M]
        cols = b.op("Transpose", [cols], perm=[1, 0, 2], stem="ic_cols")
        cols = b.op("Reshape", [cols, b.ints([c * taps, n * positions])], stem="ic_cols")
        gt = b.op("Reshape", [gt, b.ints([-1, n * positions, m])], stem="ic_g")
        product = b.op("MatMul", [cols, gt], stem="ic_mm")
    # [S, C*T, M] -> [S, C, *K, M] -> [M, C, *K, S]
    product = b.op("Reshape", [product, b.ints([-1, c, *kernel, m])], stem="ic_split")
    return str(b.op("Transpose", [product], perm=[rank, *range(1, rank), 0], stem="ic_weight"))


def _weight_adjoint(ctx: Any, node: Any, seeded: str) -> str:
    """dL/dW of ``Y = Conv(X, W, group=g)`` as one grouped Conv.

    Shapes (S: onnx-ad's trailing seed axis, 1 for one seed; C/g input channels per group)::

        X  [N, C, *H]         W  [M, C/g, *K]        G = dL/dY  [N, M, *Ho, S]
        dL/dW[m, c, k] = sum_n sum_o G[n, m, o] X_pad[n, group(m) * C/g + c, o * stride + k * dilation]

    Swapping batch and channel axes turns each group's sum over ``n`` into a convolution over
    ``N`` input channels, and ``group = g`` keeps the groups apart::

        X'  = X [N, g, C/g, *H] -> [C/g, g, N, *H] -> [C/g, g*N, *H]      (batch = channel in group)
        G'  = G -> [M, S, N, *Ho] -> [M*S, N, *Ho]                        (one filter per (m, seed))
        P   = Conv(X', G', group=g, pads=pads, strides=dilations, dilations=strides)  [C/g, M*S, *K']
        dW  = P[..., :K] -> [C/g, M, S, *K] -> [M, C/g, *K, S]

    A depthwise Conv (``C/g = 1``, ``M = C``) is DESIGN.md's construction: input ``(1, C*N, H, W)``,
    kernel G transposed to ``(C, N, Ho, Wo)``, ``group = C``, the forward pads, dilation = the
    forward stride, cropped to the kernel size. ``K' >= K``; it exceeds ``K`` where the stride does
    not divide the padded extent, hence the crop. Worked example (1-D, N = 1, one channel, stride
    2, no pad): ``X = [x0..x4]``, ``K = 3`` gives ``Ho = 2`` and ``dW[k] = g0 x[k] + g1 x[k+2]``:
    the correlation of X with the 2-tap filter ``[g0, g1]`` dilated by 2.

    Raises:
        UnsupportedOperator: a shape of X, W or Y is not static.
    """
    x, w, y = node.input[0], node.input[1], node.output[0]
    shape_x, shape_w, shape_y = (ctx.shapes.static(name) for name in (x, w, y))
    if shape_x is None or shape_w is None or shape_y is None:
        raise UnsupportedOperator(
            f"grouped Conv {node.name or y!r}: its weight gradient needs static shapes of X, W and Y"
        )
    b, spatial, group = ctx.b, len(shape_w) - 2, attribute(node, "group", 1)
    n, m, per_group = shape_x[0], shape_w[0], shape_w[1]
    kernel, rank = list(shape_w[2:]), 2 + spatial
    space = list(range(3, 3 + spatial))
    if per_group == 1 and m == group and DEPTHWISE_DIRECT:
        return _depthwise_adjoint(ctx, node, seeded)
    geometry = _geometry(node, spatial)
    strides, dilations, pads = geometry["strides"], geometry["dilations"], geometry["pads"]
    # X [N, C, *H] -> [N, g, C/g, *H] -> [C/g, g, N, *H] -> [C/g, g*N, *H]
    xt = b.op("Reshape", [x, b.ints([n, group, per_group, *shape_x[2:]])], stem="dw_x")
    xt = b.op("Transpose", [xt], perm=[2, 1, 0, *space], stem="dw_x")
    xt = b.op("Reshape", [xt, b.ints([per_group, group * n, *shape_x[2:]])], stem="dw_x")
    # G [N, M, *Ho, S] -> [M, S, N, *Ho] -> [M*S, N, *Ho]: filters of one group stay contiguous
    gt = b.op("Transpose", [seeded], perm=[1, rank, 0, *range(2, rank)], stem="dw_g")
    gt = b.op("Reshape", [gt, b.ints([-1, n, *shape_y[2:]])], stem="dw_g")
    product = b.op(
        "Conv", [xt, gt], group=group, pads=pads, strides=dilations, dilations=strides, stem="dw_conv_w"
    )
    # [C/g, M*S, *K'] -> crop to K -> [C/g, M, S, *K] -> [M, C/g, *K, S]
    product = ctx.slice(product, [0] * spatial, kernel, list(range(2, rank)), stem="dw_crop")
    product = b.op("Reshape", [product, b.ints([per_group, m, -1, *kernel])], stem="dw_split")
    return str(b.op("Transpose", [product], perm=[1, 0, *space, 2], stem="dw_weight"))


def _depthwise_adjoint(ctx: Any, node: Any, seeded: str) -> str:
    """dL/dW of a depthwise Conv (``C/g = 1``, ``M = C = g``) with one group per (sample, channel)
    instead of one per channel, so neither X nor G is transposed::

        X'  = X [N, C, *H] -> [1, N*C, *H]                               (a free reshape)
        G'  = G [N, C, *Ho, S] -> [N, C, S, *Ho] -> [N*C*S, 1, *Ho]       (moves S; free when S = 1)
        P   = Conv(X', G', group=N*C, pads=pads, strides=dilations, dilations=strides)  [1, N*C*S, *K']
        dW  = P[..., :K] -> [N, C, S, *K] -> sum over N -> [C, 1, S, *K] -> [C, 1, *K, S]

    :func:`_weight_adjoint`'s form sums over N inside the Conv but transposes X and G, each the size
    of the layer's activations: at EfficientNet-Lite0's 112x112 depthwise Conv (batch 32) the two
    transposes took as long as its Conv (BENCHMARKS.md, "gradient-graph rewrites").
    """
    x, w, y = node.input[0], node.input[1], node.output[0]
    shape_x, shape_w, shape_y = (ctx.shapes.static(name) for name in (x, w, y))
    b, spatial = ctx.b, len(shape_w) - 2
    n, channels, kernel, rank = shape_x[0], shape_w[0], list(shape_w[2:]), 2 + spatial
    geometry = _geometry(node, spatial)
    xt = b.op("Reshape", [x, b.ints([1, n * channels, *shape_x[2:]])], stem="dw_x")
    gt = b.op("Transpose", [seeded], perm=[0, 1, rank, *range(2, rank)], stem="dw_g")
    gt = b.op("Reshape", [gt, b.ints([-1, 1, *shape_y[2:]])], stem="dw_g")
    product = b.op(
        "Conv", [xt, gt], group=n * channels, pads=geometry["pads"],
        strides=geometry["dilations"], dilations=geometry["strides"], stem="dw_conv_w",
    )  # fmt: skip
    product = ctx.slice(product, [0] * spatial, kernel, list(range(2, rank)), stem="dw_crop")
    product = b.op("Reshape", [product, b.ints([n, channels, -1, *kernel])], stem="dw_split")
    product = ctx.reduce_sum(product, [0], keepdims=0)  # [C, S, *K]
    product = b.op("Reshape", [product, b.ints([channels, 1, -1, *kernel])], stem="dw_split")
    return str(b.op("Transpose", [product], perm=[0, 1, *range(3, 3 + spatial), 2], stem="dw_weight"))


def _geometry(node: Any, spatial: int) -> dict[str, list[int]]:
    """A Conv node's ``pads``, ``strides`` and ``dilations``, with ONNX's defaults."""
    return {
        "pads": list(attribute(node, "pads", [0] * (2 * spatial))),
        "strides": list(attribute(node, "strides", [1] * spatial)),
        "dilations": list(attribute(node, "dilations", [1] * spatial)),
    }
