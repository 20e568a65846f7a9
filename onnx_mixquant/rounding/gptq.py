"""GPTQ (Frantar et al., ICLR 2023) as a rounding method: layer by layer, the integers of each
MatMul / Gemm weight are chosen one input row at a time, and each row's rounding error is
compensated on the rows not rounded yet through the inverse of the layer's input Hessian
``H = X^T X`` (``X``: the layer's inputs on the calibration data, one row per token or sample).

The grid is the one nearest rounding uses (its scales and zero points, per channel or block-wise:
GPTQ's "static groups"), so only the integers change and the export is the same. Layers are taken
in graph order; each layer's inputs are read through the rounding stage's per-layer activation
stream on a copy of the model whose earlier layers already hold their rounded weights, so a layer
also compensates what its predecessors' rounding did to its inputs. Layers that read the same
tensor (query/key/value, gate/up) share one pass. Memory: one batch of one tensor and one K x K
matrix at a time, besides the model.

Weights GPTQ does not handle keep nearest rounding, and the report says why: Conv weights, weights
inside subgraphs or stored in Constant nodes, weights read by several nodes, a MatMul whose weight
is its first operand, a Gemm with transA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import QParams, broadcast_params, dequantize
from onnx_mixquant.rounding.nearest import QuantizedWeight
from onnx_mixquant.rounding.stage import RoundingJob, RoundingResult, nearest
from onnx_mixquant.toolkit import node_names

if TYPE_CHECKING:
    from onnx_mixquant.read import WeightSite

__all__ = ["GptqLayer", "gptq", "gptq_round"]

logger = logging.getLogger(__name__)

#: Rows rounded between two lazy updates of the rest of the weight (the reference's 128).
ROWS_PER_UPDATE = 128
#: Dampening added to the Hessian's diagonal, as a share of its mean (the reference's 0.01).
DAMP = 0.01


@dataclass(frozen=True)
class GptqLayer:
    """One weight as GPTQ sees it: the tensor its node reads as input, whether the stored weight is
    ``[N, K]`` (Gemm with transB) rather than ``[K, N]``, and the proxy loss
    ``tr((W - W') H (W - W')^T) / tr(W H W^T)`` of nearest rounding and of GPTQ's."""

    name: str
    input: str
    transposed: bool
    loss_nearest: float = float("nan")
    loss_gptq: float = float("nan")


def _plan_layers(
    job: RoundingJob, rounded: Mapping[str, QuantizedWeight]
) -> tuple[list[GptqLayer], dict[str, str]]:
    """The weights GPTQ rounds, in graph order, and why each other rounded weight is left nearest."""
    model = job.model
    by_name = {name: node for node, name in node_names(model).items()}
    order = {node: i for i, node in enumerate(model.graph)}
    found: list[tuple[int, GptqLayer]] = []
    skipped: dict[str, str] = {}
    for site in job.plan.sites:
        if site.name not in rounded:
            continue
        why, layer, pos = _layer(site, by_name, order, model.graph)
        if layer is None:
            skipped[site.name] = why
        else:
            found.append((pos, layer))
    return [layer for _, layer in sorted(found, key=lambda t: t[0])], skipped


def _layer(
    site: WeightSite, by_name: Mapping[str, ir.Node], order: Mapping[ir.Node, int], graph: ir.Graph
) -> tuple[str, GptqLayer | None, int]:
    """Why ``site`` is not a GPTQ layer (and None), or ("", the layer, its node's position)."""
    if site.graph or site.source != "initializer":
        return "inside a subgraph or a Constant node", None, 0
    if set(site.op_types) - {"MatMul", "Gemm"}:
        return f"{site.op_types[0]} weight (GPTQ handles MatMul and Gemm)", None, 0
    if len(site.consumers) != 1 or site.other_consumers or len(site.shape) != 2:
        return "read by several nodes, or not 2-D", None, 0
    node = by_name.get(site.consumers[0])
    if node is None:
        return "its node was not found", None, 0
    a, b = node.inputs[0], node.inputs[1]
    if b is None or b.name != site.name or a is None or a.name is None:
        return "the weight is the first operand", None, 0
    transposed = False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].as_int():
            return "Gemm with transA", None, 0
        transposed = attrs.get("transB") is not None and bool(attrs["transB"].as_int())
    if a.producer() is None and a not in graph.inputs:
        return "its input is not computed in the main graph", None, 0
    return "", GptqLayer(site.name, a.name, transposed), order[node]


def _hessian(batches: Iterable[dict[str, np.ndarray]], name: str, k: int) -> tuple[np.ndarray, int]:
    """``X^T X`` (float64) of the tensor ``name`` over ``batches``, its last axis K; and the rows."""
    h = np.zeros((k, k), dtype=np.float64)
    rows = 0
    for batch in batches:
        x = np.asarray(batch[name], dtype=np.float64).reshape(-1, k)
        h += x.T @ x
        rows += x.shape[0]
    return h, rows


def gptq_round(w_kn: np.ndarray, h: np.ndarray, qp_kn: QParams) -> np.ndarray:
    """GPTQ's integers for the weight ``w_kn`` (``[K, N]``, float32) on the grid ``qp_kn`` (its
    axes in ``[K, N]`` order) given the Hessian ``h`` (``[K, K]``); int32, same shape."""
    k, n = w_kn.shape
    s, z = broadcast_params(qp_kn, 2, w_kn.shape)
    s = np.broadcast_to(s, w_kn.shape).astype(np.float64)
    z = np.broadcast_to(z, w_kn.shape).astype(np.float64)
    lo, hi = qp_kn.qmin, qp_kn.qmax
    w = w_kn.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    q = np.empty((k, n), dtype=np.int32)
    for i1 in range(0, k, ROWS_PER_UPDATE):
        i2 = min(i1 + ROWS_PER_UPDATE, k)
        err = np.empty((i2 - i1, n), dtype=np.float64)
        for i in range(i1, i2):
            row = w[i]
            qi = np.clip(np.rint(row.astype(np.float32) / s[i].astype(np.float32)) + z[i], lo, hi)
            q[i] = qi.astype(np.int32)
            e = (row - (qi - z[i]) * s[i]) / u[i, i]
            w[i + 1 : i2] -= np.outer(u[i, i + 1 : i2], e)
            err[i - i1] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q


def _proxy_loss(w_kn: np.ndarray, deq_kn: np.ndarray, h: np.ndarray) -> float:
    d = (w_kn - deq_kn).astype(np.float64)
    ref = float(np.einsum("kn,kl,ln->", w_kn, h, w_kn))
    return float(np.einsum("kn,kl,ln->", d, h, d)) / max(ref, 1e-30)


def _kn(qp: QParams) -> QParams:
    """The parameters of a ``[N, K]`` weight for its transpose ``[K, N]``."""
    t = (lambda a: a.T) if np.ndim(qp.scale) == 2 else (lambda a: a)
    axis = None if qp.axis is None else 1 - qp.axis
    return replace(qp, scale=t(qp.scale), zero_point=t(qp.zero_point), axis=axis)


def gptq(job: RoundingJob) -> RoundingResult:
    """Round every MatMul / Gemm weight of ``job.plan`` with GPTQ, the others to nearest.

    Raises:
        ConfigError: no calibration data.
    """
    data = job.data
    if data is None or data.stream is None:
        raise ConfigError("--method gptq needs calibration data (--calib PATH)")
    t0 = time.perf_counter()
    rounded = dict(nearest(job).weights)
    todo, skipped = _plan_layers(job, rounded)
    groups: dict[str, list[GptqLayer]] = {}
    for layer in todo:
        groups.setdefault(layer.input, []).append(layer)
    work = job.model.clone()
    done: list[GptqLayer] = []
    for i, (name, group) in enumerate(groups.items()):
        k = job.plan.weights[group[0].name].shape[1 if group[0].transposed else 0]
        h, rows = _hessian(data.stream(work, [name]), name, k)
        for layer in group:
            done.append(_round_layer(layer, job.plan.weights[layer.name], h, rounded, work))
        if job.progress is not None:
            job.progress("gptq", i + 1, len(groups))
        logger.debug("GPTQ: %d weights reading %s (%d rows)", len(group), name, rows)
    report = GptqReport(
        layers=tuple(done), skipped=tuple(sorted(skipped.items())), seconds=time.perf_counter() - t0
    )
    return RoundingResult(rounded, summary=report.lines())


def _round_layer(
    layer: GptqLayer, w: np.ndarray, h: np.ndarray, rounded: dict[str, QuantizedWeight], work: ir.Model
) -> GptqLayer:
    """Round one weight (updating ``rounded`` and its float value in ``work``); with its losses."""
    base = rounded[layer.name]
    qp_kn = _kn(base.qparams) if layer.transposed else base.qparams
    w_kn = w.T if layer.transposed else w
    q_kn = gptq_round(w_kn, h, qp_kn)
    q = q_kn.T if layer.transposed else q_kn
    new = QuantizedWeight(layer.name, np.ascontiguousarray(q).astype(base.q.dtype), base.qparams)
    rounded[layer.name] = new
    deq = dequantize(new.q, new.qparams)
    work.graph.initializers[layer.name].const_value = ir.tensor(deq, name=layer.name)
    near = dequantize(base.q, base.qparams)
    near_kn, deq_kn = (near.T, deq.T) if layer.transposed else (near, deq)
    return replace(layer, loss_nearest=_proxy_loss(w_kn, near_kn, h), loss_gptq=_proxy_loss(w_kn, deq_kn, h))


@dataclass(frozen=True)
class GptqReport:
    """What GPTQ did: each layer's proxy losses, the weights left at nearest rounding and why."""

    layers: tuple[GptqLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    seconds: float

    def lines(self) -> tuple[str, ...]:
        """The report's text lines."""
        if not self.layers:
            return (f"GPTQ: no MatMul/Gemm weight to round ({len(self.skipped)} kept nearest rounding)",)
        near = float(np.mean([x.loss_nearest for x in self.layers]))
        ours = float(np.mean([x.loss_gptq for x in self.layers]))
        out = [
            f"GPTQ ({self.seconds:.1f} s): {len(self.layers)} MatMul/Gemm weights; mean relative layer "
            f"output error {near:.3g} with nearest rounding -> {ours:.3g}"
        ]
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        out.extend(f"  kept nearest rounding: {n} weights: {why}" for why, n in sorted(reasons.items()))
        return tuple(out)
