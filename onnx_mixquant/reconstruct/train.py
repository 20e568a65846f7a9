"""BRECQ's per-unit optimisation: AdaRound variables learned with Adam, unit after unit.

For each unit, in topological order: its inputs come from the model with every earlier unit
already quantized (hard rounding), its targets from the FP model; both are computed by
onnxruntime over the calibration samples and kept in memory-mapped files on disk, so memory does
not grow with the number of samples. The rounding variables V start where the soft rounding
equals the fractional part of w/s, Adam (lr 1e-3) minimises

    mean_batch sum (out - y)^2  +  lam * sum (1 - |2 h(V) - 1|^beta)

with lam = 0 during the warm-up (20 %) and beta annealed linearly from 20 to 2 after it (the
reference constants), and the result is hard-rounded. A unit keeps nearest rounding when the learned
rounding does not lower its reconstruction error on held-out samples (reported).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_mixquant.config import ReconConfig, ReconGranularity
from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.graph import WeightSite
from onnx_mixquant.numerics import dequantize
from onnx_mixquant.reconstruct.adaround import UnitProgram, UnitWeight, differentiable, hard_quantize, init_v
from onnx_mixquant.reconstruct.blocks import Unit, partition
from onnx_mixquant.rounding import QuantizedWeight
from onnx_mixquant.validate import available_providers

__all__ = ["ReconResult", "UnitReport", "reconstruct"]

logger = logging.getLogger(__name__)

#: progress(stage, done, total, info): info carries the loss and iterations per second.
ReconProgress = Callable[[str, int, int, str], None]
#: Samples held out of training to compare learned and nearest rounding.
HELD_OUT = 64


@dataclass(frozen=True)
class UnitReport:
    """What reconstruction did to one unit."""

    name: str
    kind: str
    reason: str
    weights: tuple[str, ...]
    iters: int
    seconds: float
    iters_per_second: float
    loss_nearest: float | None
    loss_learned: float | None
    rounding: str  # "learned" | "nearest"


@dataclass(frozen=True)
class ReconResult:
    """Integer weights after reconstruction, and a report per unit."""

    weights: Mapping[str, QuantizedWeight]
    units: tuple[UnitReport, ...]
    provider: str
    seconds: float


def _schedule(t: int, cfg: ReconConfig) -> tuple[float, float]:
    """(beta, lambda) at iteration t: lambda 0 in the warm-up, then beta from start to end linearly."""
    warm = int(cfg.warmup * cfg.iters)
    if t < warm:
        return cfg.beta_start, 0.0
    rel = (t - warm) / max(1, cfg.iters - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel), cfg.lam


class _Adam:
    """Adam (Kingma & Ba) on a dict of arrays, in place."""

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        self.lr, self.t = lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        corr = math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for k, g in grads.items():
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            params[k] -= self.lr * corr * self.m[k] / (np.sqrt(self.v[k]) + eps)


class _Cache:
    """Arrays of all calibration samples, memory-mapped in a temporary folder."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-mixquant-recon-")
        self._n = 0

    def new(self, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        self._n += 1
        path = Path(self._dir.name) / f"a{self._n}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> None:
        self._dir.cleanup()


def _session(model: ir.Model, outputs: Sequence[str], provider: str) -> ort.InferenceSession:
    """A session of ``model`` with ``outputs`` exposed as graph outputs (on a copy)."""
    copy = model.clone()
    values = {v.name: v for n in copy.graph for v in n.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    existing = {v.name for v in copy.graph.outputs}
    for name in outputs:
        if name not in existing:
            copy.graph.outputs.append(values[name])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(ir.to_proto(copy).SerializeToString(), so, providers=[provider])


def _run(
    model: ir.Model,
    name: str,
    inputs: Mapping[str, np.ndarray],
    cache: _Cache,
    provider: str,
    batch: int = 64,
) -> np.memmap:
    """Tensor ``name`` for every cached sample, written batch by batch into a memory map."""
    sess = _session(model, [name], provider)
    n = len(next(iter(inputs.values())))
    out: np.memmap | None = None
    for lo in range(0, n, batch):
        feed = {k: np.ascontiguousarray(v[lo : lo + batch]) for k, v in inputs.items()}
        got = sess.run([name], feed)[0]
        if out is None:
            out = cache.new((n, *got.shape[1:]), got.dtype)
        out[lo : lo + len(got)] = got
    assert out is not None
    return out


def _cache_inputs(
    batches: Iterator[dict[str, np.ndarray]], limit: int, cache: _Cache
) -> dict[str, np.memmap]:
    """The first ``limit`` calibration samples of every model input, on disk."""
    out: dict[str, np.memmap] = {}
    done = 0
    for feed in batches:
        take = min(limit - done, len(next(iter(feed.values()))))
        for k, v in feed.items():
            if k not in out:
                out[k] = cache.new((limit, *v.shape[1:]), v.dtype)
            out[k][done : done + take] = v[:take]
        done += take
        if done >= limit:
            break
    if done < limit:
        out = {k: v[:done] for k, v in out.items()}  # type: ignore[misc]
    return out


def _set_weight(model: ir.Model, name: str, w: np.ndarray) -> None:
    """Replace the value of weight ``name`` (a main-graph initializer or Constant node) by ``w``."""
    tensor = ir.tensor(w.astype(np.float32), name=name)
    if name in model.graph.initializers:
        model.graph.initializers[name].const_value = tensor
        return
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].name == name:
            node.attributes["value"] = ir.AttrTensor("value", tensor)
            return
    raise KeyError(name)


def _train_unit(
    program: UnitProgram,
    x: np.ndarray,
    y: np.ndarray,
    weights: Sequence[UnitWeight],
    cfg: ReconConfig,
    rng: np.random.Generator,
    tick: Callable[[int, str], None],
) -> dict[str, np.ndarray]:
    """Adam on the rounding variables of one unit; returns the trained V per weight."""
    v = {w.name: init_v(w.w, w.qparams) for w in weights}
    adam = _Adam(v, cfg.lr)
    n = len(x)
    t0 = time.perf_counter()
    for t in range(cfg.iters):
        idx = np.sort(rng.choice(n, cfg.batch, replace=False))
        beta, lam = _schedule(t, cfg)
        rec, reg, grads = program.step(x[idx], y[idx], v, beta, lam)
        adam.step(v, grads)
        if t % 25 == 0 or t == cfg.iters - 1:
            rate = (t + 1) / max(time.perf_counter() - t0, 1e-9)
            tick(t + 1, f"loss {rec:.4g} reg {reg:.3g} {rate:.1f} it/s")
    return v


def _held_out_error(
    program: UnitProgram, x: np.ndarray, y: np.ndarray, v: Mapping[str, np.ndarray], batch: int
) -> float:
    """Mean per-sample squared error of the hard-rounded unit on ``x`` (whole batches only)."""
    total, count = 0.0, 0
    for lo in range(0, len(x) - batch + 1, batch):
        out = program.forward(np.ascontiguousarray(x[lo : lo + batch]), v, hard=True)
        diff = out.astype(np.float64) - y[lo : lo + batch]
        total += float(np.sum(diff * diff))
        count += batch
    return total / max(count, 1)


def _nearest_v(
    weights: Sequence[UnitWeight], nearest: Mapping[str, QuantizedWeight]
) -> dict[str, np.ndarray]:
    """V whose hard rounding reproduces the nearest-rounded integers (floor + 1 where q rounded up)."""
    out = {}
    for w in weights:
        qp = w.qparams
        floor = np.floor(w.w / np.asarray(qp.scale).reshape(_bshape(w.w, qp.axis))) + np.asarray(
            qp.zero_point
        ).reshape(_bshape(w.w, qp.axis))
        up = nearest[w.name].q.astype(np.float32) > floor
        out[w.name] = np.where(up, 1.0, -1.0).astype(np.float32)
    return out


def _bshape(w: np.ndarray, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * w.ndim
    shape[axis] = w.shape[axis]
    return tuple(shape)


def reconstruct(
    fp_model: ir.Model,
    sites: Sequence[WeightSite],
    nearest: Mapping[str, QuantizedWeight],
    weights: Mapping[str, np.ndarray],
    calib: Iterator[dict[str, np.ndarray]],
    cfg: ReconConfig,
    *,
    seed: int = 0,
    progress: ReconProgress | None = None,
) -> ReconResult:
    """Learn the rounding of every quantized weight, unit by unit (BRECQ).

    Args:
        fp_model: the FP32 model (not modified).
        sites: its weight sites.
        nearest: nearest-rounded weights with the base quantizer's parameters (the starting point;
            weights of units that cannot be trained keep these).
        weights: float weights by name.
        calib: calibration batches (model inputs); the first ``cfg.samples`` samples are used.
        cfg: iterations, samples, batch, schedule.
        seed: seeds the batch sampling.
        progress: progress(stage, done, total, info) per unit.
    """
    t_start = time.perf_counter()
    provider = available_providers(True)[0]
    units = partition(
        fp_model,
        [s for s in sites if s.name in nearest],
        blocks=cfg.granularity is ReconGranularity.BLOCK,
        differentiable=differentiable,
    )
    rng = np.random.default_rng(seed)
    cache = _Cache()
    work = fp_model.clone()
    result = dict(nearest)
    reports = []
    try:
        inputs = _cache_inputs(calib, cfg.samples, cache)
        for i, unit in enumerate(units):
            stage = f"unit {i + 1}/{len(units)}"
            rep, learned = _reconstruct_unit(
                unit, fp_model, work, inputs, nearest, weights, cfg, rng, cache, provider, stage, progress
            )
            reports.append(rep)
            result.update(learned)
            for name in unit.weights:
                if name in result:
                    _set_weight(work, name, dequantize(result[name].q, result[name].qparams))
    finally:
        cache.close()
    return ReconResult(
        weights=result, units=tuple(reports), provider=provider, seconds=time.perf_counter() - t_start
    )


def _reconstruct_unit(
    unit: Unit,
    fp_model: ir.Model,
    work: ir.Model,
    inputs: Mapping[str, np.ndarray],
    nearest: Mapping[str, QuantizedWeight],
    weights: Mapping[str, np.ndarray],
    cfg: ReconConfig,
    rng: np.random.Generator,
    cache: _Cache,
    provider: str,
    stage: str,
    progress: ReconProgress | None,
) -> tuple[UnitReport, dict[str, QuantizedWeight]]:
    names = tuple(n for n in unit.weights if n in nearest)
    if not names or not unit.differentiable:
        return _nearest_report(unit, names, unit.reason), {}
    t0 = time.perf_counter()
    x = _run(work, unit.input, inputs, cache, provider)
    y = _run(fp_model, unit.output, inputs, cache, provider)
    n_train = max(cfg.batch, len(x) - HELD_OUT) if len(x) > cfg.batch + HELD_OUT else len(x)
    uw = [UnitWeight(name=n, w=weights[n], qparams=nearest[n].qparams) for n in names]
    try:
        program = UnitProgram(fp_model, unit, uw, (cfg.batch, *x.shape[1:]), provider=provider)
    except UnsupportedModelError as e:  # e.g. a layer reading two activations: keep nearest rounding
        logger.warning("%s %s: %s; keeping nearest rounding", stage, unit.name, e)
        return _nearest_report(unit, names, str(e)), {}

    def tick(done: int, info: str) -> None:
        if progress is not None:
            progress(stage, done, cfg.iters, info)

    t_train = time.perf_counter()
    v = _train_unit(program, x[:n_train], y[:n_train], uw, cfg, rng, tick)
    t_train = time.perf_counter() - t_train
    held_x, held_y = (x[n_train:], y[n_train:]) if len(x) - n_train >= cfg.batch else (x, y)
    loss_near = _held_out_error(program, held_x, held_y, _nearest_v(uw, nearest), cfg.batch)
    loss_learn = _held_out_error(program, held_x, held_y, v, cfg.batch)
    learned = {
        w.name: QuantizedWeight(
            w.name, hard_quantize(w.w, w.qparams, v[w.name]).astype(nearest[w.name].q.dtype), w.qparams
        )
        for w in uw
    }
    keep = loss_learn <= loss_near
    seconds = time.perf_counter() - t0
    logger.info(
        "%s %s: held-out error nearest %.4g -> learned %.4g (%s) in %.1f s",
        stage,
        unit.name,
        loss_near,
        loss_learn,
        "kept" if keep else "nearest kept",
        seconds,
    )
    return UnitReport(
        name=unit.name,
        kind=unit.kind,
        reason=unit.reason,
        weights=names,
        iters=cfg.iters,
        seconds=seconds,
        iters_per_second=cfg.iters / max(t_train, 1e-9),
        loss_nearest=loss_near,
        loss_learned=loss_learn,
        rounding="learned" if keep else "nearest",
    ), (learned if keep else {})


def _nearest_report(unit: Unit, names: tuple[str, ...], reason: str) -> UnitReport:
    """Report of a unit that keeps nearest rounding without training."""
    return UnitReport(
        name=unit.name,
        kind=unit.kind,
        reason=reason,
        weights=names,
        iters=0,
        seconds=0.0,
        iters_per_second=0.0,
        loss_nearest=None,
        loss_learned=None,
        rounding="nearest",
    )
