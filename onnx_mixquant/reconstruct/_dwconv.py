"""The weight gradient of a grouped (depthwise) Conv, which onnx-ad 0.3.0 does not differentiate.

onnx-ad 0.3.0 differentiates a Conv with ``group > 1`` with respect to its input but raises
``UnsupportedOperator`` for its weight. :func:`grouped_conv_rule` installs, for the duration of a
``with`` block, a reverse rule for ``Conv`` that delegates everything to onnx-ad's own rule and adds
the weight adjoint of a grouped Conv as one more grouped Conv (DESIGN.md, "Gradients without a
deep-learning framework"). onnx-ad looks its rules up in the dict ``onnx_ad.rules.REVERSE`` at each
node, so the override is visible to ``onnx_ad.reverse`` and is undone on exit.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from onnx_ad import UnsupportedOperator, rules
from onnx_ad._build import attribute

__all__ = ["grouped_conv_rule"]

_LOCK = threading.Lock()

_Rule = Callable[[Any, Any, list[Any]], list[Any]]


@contextlib.contextmanager
def grouped_conv_rule() -> Iterator[None]:
    """Within the block, ``onnx_ad.reverse`` also differentiates grouped Convs w.r.t. the weight.

    Thread-safe: concurrent blocks run one after the other (the rule table is process-global).
    """
    with _LOCK:
        original = rules.REVERSE["Conv"]
        rules.REVERSE["Conv"] = functools.partial(_conv_reverse, original)
        try:
            yield
        finally:
            rules.REVERSE["Conv"] = original


def _conv_reverse(original: _Rule, ctx: Any, node: Any, grads: list[Any]) -> list[Any]:
    """onnx-ad's Conv rule, with the weight adjoint of a grouped Conv added.

    onnx-ad's rule skips the weight when it is not asked for (``ctx.asked_for``), so the weight is
    hidden from it while it builds the input and bias adjoints, and added back here.
    """
    w = node.input[1]
    if attribute(node, "group", 1) == 1 or not ctx.asked_for(w):
        return original(ctx, node, grads)
    wanted = ctx.wanted
    ctx.wanted = (set(node.input) if wanted is None else set(wanted)) - {w}
    try:
        contributions = list(original(ctx, node, grads))
    finally:
        ctx.wanted = wanted
    contributions[1] = _weight_adjoint(ctx, node, ctx.full(grads[0], node.output[0]))
    return contributions


def _weight_adjoint(ctx: Any, node: Any, seeded: str) -> str:
    """dL/dW of ``Y = Conv(X, W, group=g)`` as one grouped Conv; the kernel of the paper-style loop.

    Shapes (S: onnx-ad's trailing seed axis, 1 for one seed; C/g input channels per group)::

        X  [N, C, *H]         W  [M, C/g, *K]        G = dL/dY  [N, M, *Ho, S]
        dL/dW[m, c, k] = sum_n sum_o G[n, m, o] X_pad[n, group(m) * C/g + c, o * stride + k * dilation]

    Swapping batch and channel axes turns each group's sum over ``n`` into a convolution over
    ``N`` input channels, and ``group = g`` keeps the groups apart:

        X'  = X [N, g, C/g, *H] -> [C/g, g, N, *H] -> [C/g, g*N, *H]      (batch = channel in group)
        G'  = G -> [M, S, N, *Ho] -> [M*S, N, *Ho]                        (one filter per (m, seed))
        P   = Conv(X', G', group=g, pads=pads, strides=dilations, dilations=strides)  [C/g, M*S, *K']
        dW  = P[..., :K] -> [C/g, M, S, *K] -> [M, C/g, *K, S]

    A depthwise Conv (``C/g = 1``, ``M = C``) is DESIGN.md's construction: input ``(1, C*N, H, W)``,
    kernel G transposed to ``(C, N, Ho, Wo)``, ``group = C``, the forward pads, dilation = the
    forward stride, cropped to the kernel size. ``K' >= K``; it exceeds ``K`` where the stride does
    not divide the padded extent, hence the crop. Worked example (1-D, N = 1, one channel, stride
    2, no pad): ``X = [x0..x4]``, ``K = 3`` gives ``Ho = 2`` and ``dW[k] = g0 x[k] + g1 x[k+2]``:
    the convolution of X with the 2-tap filter ``[g0, g1]`` dilated by 2.

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
    strides = list(attribute(node, "strides", [1] * spatial))
    dilations = list(attribute(node, "dilations", [1] * spatial))
    pads = list(attribute(node, "pads", [0] * (2 * spatial)))
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
