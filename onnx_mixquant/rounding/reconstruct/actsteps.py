"""BRECQ's second stage: the step sizes of 8-bit activations, learned unit by unit (LSQ).

After the rounding of every weight is fixed, the activations are calibrated on the weight-quantized
model (the user's calibration method), and then, for each unit in topological order, the steps of
the activation tensors its nodes make are learned so that the unit, with its quantized weights and
all its activation fake-quants, reproduces the FP unit's output (Esser et al.'s LSQ gradient through
the straight-through estimator, :mod:`.adaround`). The unit's inputs come from the model with every
earlier unit fully quantized (weights and activations, learned steps), its targets from the FP
model. Adam with learning rate ``act_lr`` cosine-annealed to 0 (the reference: 4e-4, 5000
iterations); zero points stay fixed. A unit keeps the calibrated steps when the learned ones do not
lower its held-out error.

Tensors that share the parameters of another (outputs of pass-through ops) are not trained: a
pass-through op of a quantized tensor stays on its grid, so their fake-quant is the identity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.numerics import QParams
from onnx_mixquant.rounding.reconstruct._common import Adam, Run, held_out_error, run_tensor, training_count
from onnx_mixquant.rounding.reconstruct.adaround import UnitProgram
from onnx_mixquant.rounding.reconstruct.blocks import Unit
from onnx_mixquant.toolkit import node_names

if TYPE_CHECKING:
    from onnx_mixquant.rounding.stage import ActivationHook

__all__ = ["ActUnitReport", "learn_activation_steps"]

logger = logging.getLogger(__name__)

#: A learned step never falls below this share of its calibrated value.
_MIN_STEP_SHARE = 1e-3


@dataclass(frozen=True)
class ActUnitReport:
    """What the activation-step stage did in one unit."""

    name: str
    tensors: tuple[str, ...]
    iters: int
    seconds: float
    loss_calibrated: float | None
    loss_learned: float | None
    steps: str  # "learned" | "calibrated"
    reason: str


def _producers(model: ir.Model) -> dict[str, str]:
    """Tensor name -> display name of the node that makes it."""
    names = node_names(model)
    return {v.name or "": names[n] for n in model.graph for v in n.outputs}


def _cosine(t: int, total: int, lr: float) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * t / max(total, 1)))


def learn_activation_steps(
    units: Sequence[Unit],
    run: Run,
    hook: ActivationHook,
    plan: Any,
    params: Mapping[str, QParams],
) -> tuple[dict[str, QParams], tuple[ActUnitReport, ...]]:
    """Learn the steps of the calibrated activation tensors, unit by unit.

    Args:
        units: the reconstruction units of ``run.work``, in topological order.
        run: the FP model (targets), ``work`` (the FP graph with every quantized weight replaced by
            its dequantized value), the cached calibration samples, the settings (``act_iters``,
            ``act_lr``, ``batch``), the batch generator, the cache, the provider and the progress
            callback, progress(stage, done, total, info).
        hook: the activation stage (inserts the Q/DQ of ``plan``).
        plan: the activation plan of ``run.work`` (from ``hook.calibrate``).
        params: calibrated 8-bit parameters of every ``plan.calibrated()`` tensor.

    Returns:
        (the parameters with learned steps that were kept, by tensor name; a report per unit).
    """
    out, kept = dict(params), {}
    sites = {s.name: s for s in plan.sites}
    made_by = _producers(run.work)
    reports = []
    for i, unit in enumerate(units):
        stage = f"activation steps {i + 1}/{len(units)}"
        own = set(unit.nodes)
        learn = [s.name for s in plan.sites if s.shared_with is None and made_by.get(s.name) in own]
        if not learn or not unit.differentiable:
            why = "no calibrated activation made in the unit" if unit.differentiable else unit.reason
            reports.append(ActUnitReport(unit.name, (), 0, 0.0, None, None, "calibrated", why))
            continue
        fixed = {}
        if unit.input in sites:
            fixed[unit.input] = out[sites[unit.input].shared_with or unit.input]
        act = {**fixed, **{t: out[t] for t in learn}}
        rep, learned = _unit(unit, run, (hook, plan), out, act, learn, stage)
        reports.append(rep)
        out.update(learned)
        kept.update(learned)
    return kept, tuple(reports)


def _unit(
    unit: Unit,
    run: Run,
    planned: tuple[ActivationHook, Any],
    current: Mapping[str, QParams],
    act: Mapping[str, QParams],
    learn: Sequence[str],
    stage: str,
) -> tuple[ActUnitReport, dict[str, QParams]]:
    """Learn the steps ``learn`` of one unit, the other activations at ``current`` (``act``: the
    parameters of the unit's own fake-quants); returns its report and the steps it keeps."""
    t0 = time.perf_counter()
    cfg, rng, progress = run.cfg, run.rng, run.progress
    quantized = run.work.clone()
    hook, plan = planned
    hook.insert(quantized, plan, current)
    x = run_tensor(quantized, unit.input, run.inputs, run.cache, run.provider)
    y = run_tensor(run.fp_model, unit.output, run.inputs, run.cache, run.provider)
    try:
        program = UnitProgram(
            run.work, unit, [], (cfg.batch, *x.shape[1:]), act_quant=act, provider=run.provider
        )
    except UnsupportedModelError as e:
        logger.warning("%s %s: %s; keeping the calibrated steps", stage, unit.name, e)
        return ActUnitReport(unit.name, tuple(learn), 0, 0.0, None, None, "calibrated", str(e)), {}
    n = len(x)
    n_train = training_count(n, cfg.batch)
    start = {t: np.asarray(qp.scale, np.float32).copy() for t, qp in act.items()}
    steps = {t: s.copy() for t, s in start.items()}
    trained = {t: steps[t] for t in learn}
    adam = Adam(trained, cfg.act_lr)
    total, t_train = cfg.act_iters, time.perf_counter()
    for t in range(total):
        idx = np.sort(rng.choice(n_train, cfg.batch, replace=False))
        rec, _, grads = program.step(x[idx], y[idx], {}, 2.0, 0.0, act_steps=steps)
        adam.lr = _cosine(t, total, cfg.act_lr)
        adam.step(trained, {k: grads[k] for k in learn})
        for k in learn:
            np.maximum(trained[k], start[k] * _MIN_STEP_SHARE, out=trained[k])
        if progress is not None and (t % 25 == 0 or t == total - 1):
            rate = (t + 1) / max(time.perf_counter() - t_train, 1e-9)
            progress(stage, t + 1, total, f"loss {rec:.4g} {rate:.1f} it/s")
    held_x, held_y = (x[n_train:], y[n_train:]) if n_train < n else (x, y)
    before = held_out_error(program, held_x, held_y, {}, cfg.batch, act_steps=start)
    after = held_out_error(program, held_x, held_y, {}, cfg.batch, act_steps=steps)
    keep = after <= before
    seconds = time.perf_counter() - t0
    logger.info("%s %s: held-out error calibrated %.4g -> learned %.4g (%s) in %.1f s", stage, unit.name,
                before, after, "kept" if keep else "calibrated kept", seconds)  # fmt: skip
    learned = {
        t: dataclasses.replace(act[t], scale=np.asarray(steps[t], np.float32).reshape(np.shape(act[t].scale)))
        for t in learn
    }
    report = ActUnitReport(unit.name, tuple(learn), total, seconds, before, after,
                           "learned" if keep else "calibrated", "")  # fmt: skip
    return report, (learned if keep else {})
