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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_mixquant.config import IterSplit, ReconConfig, ReconGranularity
from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.numerics import QParams, dequantize
from onnx_mixquant.read import WeightSite, fold_pads_into_convs
from onnx_mixquant.rounding.biascorrect import BiasReport, BiasTarget
from onnx_mixquant.rounding.nearest import QuantizedWeight
from onnx_mixquant.rounding.reconstruct._budget import relative_error, split_iterations
from onnx_mixquant.rounding.reconstruct._common import (
    Adam,
    Cache,
    Eta,
    ReconProgress,
    Run,
    cache_inputs,
    held_out_error,
    run_tensor,
    set_weight,
    training_count,
)
from onnx_mixquant.rounding.reconstruct._unitbias import UnitBias
from onnx_mixquant.rounding.reconstruct.actsteps import ActUnitReport, learn_activation_steps
from onnx_mixquant.rounding.reconstruct.adaround import (
    UnitProgram,
    UnitWeight,
    differentiable,
    hard_quantize,
    init_v,
)
from onnx_mixquant.rounding.reconstruct.blocks import Unit, partition
from onnx_mixquant.rounding.reconstruct.fisher import FisherProgram, fisher_weight
from onnx_mixquant.session import compute_providers

if TYPE_CHECKING:
    from onnx_mixquant.rounding.stage import ActivationHook

__all__ = ["ReconResult", "UnitReport", "reconstruct"]

logger = logging.getLogger(__name__)


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
    #: "" (not asked), "used", or why the unit's error could not be Fisher-weighted.
    fisher: str = ""


@dataclass(frozen=True)
class ReconResult:
    """Integer weights after reconstruction, and a report per unit.

    ``act_params``: 8-bit activation parameters with learned steps (by tensor name) when the
    activation stage ran, else None; ``act_units``: its report per unit.
    """

    weights: Mapping[str, QuantizedWeight]
    units: tuple[UnitReport, ...]
    provider: str
    seconds: float
    act_params: Mapping[str, QParams] | None = None
    act_units: tuple[ActUnitReport, ...] = ()
    #: With ``bias_targets``: every target's float bias after the per-unit correction (by
    #: initializer name), what the correction did, and why it stopped early (None: it did not).
    biases: Mapping[str, np.ndarray] = field(default_factory=dict)
    bias: BiasReport | None = None
    bias_error: str | None = None


def _schedule(t: int, iters: int, cfg: ReconConfig) -> tuple[float, float]:
    """(beta, lambda) at iteration t of ``iters``: lambda 0 in the warm-up, then beta from start to
    end linearly."""
    warm = int(cfg.warmup * iters)
    if t < warm:
        return cfg.beta_start, 0.0
    rel = (t - warm) / max(1, iters - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel), cfg.lam


def _train_unit(
    program: UnitProgram,
    x: np.ndarray,
    y: np.ndarray,
    weights: Sequence[UnitWeight],
    cfg: ReconConfig,
    iters: int,
    rng: np.random.Generator,
    tick: Callable[[int, str], None],
    f: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``iters`` steps of Adam on the rounding variables of one unit (error weighted by ``f`` when
    given); returns the trained V per weight."""
    v = {w.name: init_v(w.w, w.qparams) for w in weights}
    adam = Adam(v, cfg.lr)
    n = len(x)
    t0 = time.perf_counter()
    for t in range(iters):
        idx = np.sort(rng.choice(n, cfg.batch, replace=False))
        beta, lam = _schedule(t, iters, cfg)
        rec, reg, grads = program.step(x[idx], y[idx], v, beta, lam, None if f is None else f[idx])
        adam.step(v, grads)
        if t % 25 == 0 or t == iters - 1:
            rate = (t + 1) / max(time.perf_counter() - t0, 1e-9)
            tick(t + 1, f"loss {rec:.4g} reg {reg:.3g} {rate:.1f} it/s")
    return v


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
    activations: ActivationHook | None = None,
    bias_targets: Sequence[BiasTarget] = (),
    bias_samples: int = 64,
    bias_strict: bool = True,
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
        activations: with activation quantization, the activation stage: it plans and
            calibrates the activations of the weight-quantized model; their steps are then
            learned unit by unit (``cfg.act_iters`` > 0, :mod:`.actsteps`).
        bias_targets: biases to correct unit by unit (:mod:`._unitbias`), each unit's right after
            its rounding is fixed, on the first ``bias_samples`` samples; from
            ``biascorrect.plan_correction`` on ``fp_model``. ``bias_strict``: a failed measurement
            raises; otherwise the correction stops there and ``ReconResult.bias_error`` says why.
    """
    t_start = time.perf_counter()
    provider = compute_providers()[0]
    fp_model = _without_zero_pads(fp_model)
    units = partition(
        fp_model,
        [s for s in sites if s.name in nearest],
        blocks=cfg.granularity is ReconGranularity.BLOCK,
        differentiable=differentiable,
    )
    budget = _unit_iterations(units, nearest, weights, cfg)
    eta = Eta(sum(budget))
    run = Run(
        fp_model, fp_model.clone(), {}, cfg, np.random.default_rng(seed), Cache(), provider, progress, eta
    )
    result = dict(nearest)
    reports = []
    act_params: dict[str, QParams] | None = None
    act_units: tuple[ActUnitReport, ...] = ()
    ub = None
    try:
        run.inputs = cache_inputs(calib, cfg.samples, run.cache)
        if bias_targets:
            ub = UnitBias(fp_model, bias_targets, run.inputs, bias_samples, cfg.batch, strict=bias_strict)
        for i, unit in enumerate(units):
            stage = f"unit {i + 1}/{len(units)}"
            rep, learned = _reconstruct_unit(unit, run, nearest, weights, budget[i], stage)
            reports.append(rep)
            result.update(learned)
            for name in unit.weights:
                if name in result:
                    set_weight(run.work, name, dequantize(result[name].q, result[name].qparams))
            if ub is not None:
                ub.correct(run.work, unit)
        if activations is not None and cfg.act_iters > 0:
            plan, params = activations.calibrate(run.work)
            act_params, act_units = learn_activation_steps(units, run, activations, plan, params)
    finally:
        run.cache.close()
    return ReconResult(
        weights=result,
        units=tuple(reports),
        provider=provider,
        seconds=time.perf_counter() - t_start,
        act_params=act_params,
        act_units=act_units,
        biases={} if ub is None else ub.biases(run.work),
        bias=None if ub is None else ub.report(),
        bias_error=None if ub is None else ub.error,
    )


def _without_zero_pads(model: ir.Model) -> ir.Model:
    """A copy with zero Pad -> Conv pairs folded (exact; what activation quantization does anyway),
    which saves the Pad and its adjoint in every training step (about a fifth of an EfficientNet
    MBConv step); ``model`` itself when nothing folds or a node has no name (display names of
    unnamed nodes count positions, and the weight sites name their readers by them)."""
    if not all(node.name for node in model.graph):
        return model
    folded = model.clone()
    return folded if fold_pads_into_convs(folded) else model


def _fisher_weights(
    unit: Unit, run: Run, program: UnitProgram, x: np.ndarray, v: Mapping[str, np.ndarray]
) -> np.ndarray:
    """(|dKL/dt| + 1)^2 per sample, t = the unit's output with nearest rounding (the reference's
    ``save_grad_data``: the model quantized up to this unit, the rest FP)."""
    batch = run.cfg.batch
    fisher = FisherProgram(run.work, unit.output, batch, provider=run.provider)
    p_fp = run.p_fp()
    f = run.cache.new((len(x), *program.output_shape[1:]), np.dtype(np.float32))
    for lo in range(0, len(x), batch):
        lo = min(lo, len(x) - batch)  # the last batch overlaps the one before
        sl = slice(lo, lo + batch)
        t = program.forward(np.ascontiguousarray(x[sl]), v, hard=True)
        feeds = {k: np.ascontiguousarray(a[sl]) for k, a in run.inputs.items()}
        f[sl] = fisher_weight(fisher.grad(feeds, t, p_fp[sl]))
    return f


def _unit_iterations(
    units: Sequence[Unit],
    nearest: Mapping[str, QuantizedWeight],
    weights: Mapping[str, np.ndarray],
    cfg: ReconConfig,
) -> list[int]:
    """Iterations per unit (0 for a unit that is not trained), split by ``cfg.split``."""
    trained = [i for i, u in enumerate(units) if _trainable(u, nearest)]
    out = [0] * len(units)
    if cfg.split is IterSplit.EVEN:
        for i in trained:
            out[i] = cfg.iters
        return out
    errors = [
        relative_error([n for n in units[i].weights if n in nearest], nearest, weights) for i in trained
    ]
    for i, k in zip(trained, split_iterations(errors, cfg.iters, cfg.split), strict=True):
        out[i] = k
    if trained:
        logger.info(
            "iterations split by rounding error: %d to %d per unit (%d in all)",
            min(out[i] for i in trained),
            max(out),
            sum(out),
        )
    return out


def _trainable(unit: Unit, nearest: Mapping[str, QuantizedWeight]) -> bool:
    """Whether ``unit`` gets a training program: it has quantized weights and a gradient."""
    return unit.differentiable and any(n in nearest for n in unit.weights)


def _reconstruct_unit(
    unit: Unit,
    run: Run,
    nearest: Mapping[str, QuantizedWeight],
    weights: Mapping[str, np.ndarray],
    iters: int,
    stage: str,
) -> tuple[UnitReport, dict[str, QuantizedWeight]]:
    names = tuple(n for n in unit.weights if n in nearest)
    if not _trainable(unit, nearest):
        return _nearest_report(unit, names, unit.reason), {}
    cfg, t0 = run.cfg, time.perf_counter()
    x = run_tensor(run.work, unit.input, run.inputs, run.cache, run.provider)
    y = run_tensor(run.fp_model, unit.output, run.inputs, run.cache, run.provider)
    n_train = training_count(len(x), cfg.batch)
    uw = [UnitWeight(name=n, w=weights[n], qparams=nearest[n].qparams) for n in names]
    try:
        program = UnitProgram(
            run.fp_model, unit, uw, (cfg.batch, *x.shape[1:]), fisher=cfg.fisher, provider=run.provider
        )
    except UnsupportedModelError as e:  # e.g. a layer reading two activations: keep nearest rounding
        logger.warning("%s %s: %s; keeping nearest rounding", stage, unit.name, e)
        run.eta.total -= iters  # no training after all
        return _nearest_report(unit, names, str(e)), {}
    f, fisher_note = None, ""
    if cfg.fisher:
        try:
            f, fisher_note = _fisher_weights(unit, run, program, x, _nearest_v(uw, nearest)), "used"
        except UnsupportedModelError as e:
            logger.warning("%s %s: no Fisher weighting: %s", stage, unit.name, e)
            f, fisher_note = np.ones((len(x), *program.output_shape[1:]), np.float32), str(e)

    def tick(done: int, info: str) -> None:
        if run.progress is not None:
            left = run.eta.left(done)
            run.progress(stage, done, iters, f"{info}, {left}" if left else info)

    t_train = time.perf_counter()
    v = _train_unit(program, x[:n_train], y[:n_train], uw, cfg, iters, run.rng, tick, f)
    t_train = time.perf_counter() - t_train
    run.eta.finished += iters
    held = slice(n_train, None) if n_train < len(x) else slice(None)
    held_f = None if f is None else f[held]
    loss_near = held_out_error(program, x[held], y[held], _nearest_v(uw, nearest), cfg.batch, weight=held_f)
    loss_learn = held_out_error(program, x[held], y[held], v, cfg.batch, weight=held_f)
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
        iters=iters,
        seconds=seconds,
        iters_per_second=iters / max(t_train, 1e-9),
        loss_nearest=loss_near,
        loss_learned=loss_learn,
        rounding="learned" if keep else "nearest",
        fisher=fisher_note,
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
