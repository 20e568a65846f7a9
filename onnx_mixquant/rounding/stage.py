"""The rounding stage's contract: a bit plan and (optionally) calibration data in, integer weights
and corrected biases out, whatever the method.

A method is a function ``(RoundingJob) -> RoundingResult`` registered in
:data:`METHODS` under its :class:`~onnx_mixquant.config.RoundingMethod`; the pipeline only calls
:func:`round_weights`, so a new method (GPTQ-class, say) is added here and in the enum, not in the
pipeline. Data-aware methods read the calibration data through :class:`RoundingData`:

* ``batches``: the model's calibration inputs, one fresh pass per call;
* ``stream``: a per-layer stream of activations: the values of named tensors of a given model (the
  float one, or one whose earlier layers are already rounded) on the calibration data, one batch at
  a time, so memory is bounded by a layer's activations for one batch, not by the model or the
  number of samples (what a layer-wise second-order method needs to build each layer's Hessian);
* hooks for the extras a method may do per unit: learning the activation steps
  (:class:`ActivationHook`, given when activations are quantized) and correcting biases
  (``bias_targets``).

The stage's own code imports no calibration or activation module: the pipeline passes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from onnx_mixquant.config import QuantConfig, RoundingMethod
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import QParams
from onnx_mixquant.rounding.nearest import QuantizedWeight, round_nearest

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnx_mixquant.read import WeightSite
    from onnx_mixquant.report import ReconReport
    from onnx_mixquant.rounding.biascorrect import BiasTarget

__all__ = [
    "METHODS",
    "ActivationHook",
    "ActivationStream",
    "RoundingData",
    "RoundingFn",
    "RoundingJob",
    "RoundingPlan",
    "RoundingResult",
    "round_weights",
]

#: progress(stage, done, total, info=""), as the pipeline's.
Progress = Callable[..., None]
#: Model inputs by name, for one batch.
Feed = dict[str, np.ndarray]


class ActivationStream(Protocol):
    """``stream(model, names)``: the values of the tensors ``names`` of ``model`` on the
    calibration data, one dict per batch (tensor name -> array with the batch on axis 0)."""

    def __call__(self, model: ir.Model, names: Sequence[str], /) -> Iterator[dict[str, np.ndarray]]: ...


class ActivationHook(Protocol):
    """The activation stage as a method may call it: plan and calibrate the activation Q/DQ of a
    (weight-rounded) model, then insert it with given parameters. ``plan`` is the activation
    stage's own plan object; a method only passes it back and reads ``plan.sites`` (each with
    ``name`` and ``shared_with``) and ``plan.calibrated()``."""

    def calibrate(self, model: ir.Model) -> tuple[Any, dict[str, QParams]]: ...

    def insert(self, model: ir.Model, plan: Any, params: Mapping[str, QParams]) -> None: ...


@dataclass(frozen=True)
class RoundingPlan:
    """What to round: the float weights, each one's per-channel axis, width (None: stays float)
    and, for block-wise weights, the reduction axis the blocks run along."""

    sites: Sequence[WeightSite]
    weights: Mapping[str, np.ndarray]
    axes: Mapping[str, int | None]
    bits: Mapping[str, int | None]
    blocks: Mapping[str, int] | None = None


@dataclass(frozen=True)
class RoundingData:
    """Calibration data and per-unit hooks for data-aware methods (see the module docstring)."""

    batches: Callable[[], Iterable[Feed]]
    num_batches: int
    source: str
    stream: ActivationStream | None = None
    activations: ActivationHook | None = None
    #: Biases to correct unit by unit (from ``biascorrect.plan_correction`` on the FP model), on the
    #: first ``bias_samples`` samples; ``bias_strict``: a failed measurement raises, else the
    #: correction stops with a note.
    bias_targets: Sequence[BiasTarget] = ()
    bias_samples: int = 64
    bias_strict: bool = True


@dataclass(frozen=True)
class RoundingResult:
    """Integer weights for every weight with a width, and what else the method settled."""

    weights: dict[str, QuantizedWeight]
    #: Float biases corrected by the method (initializer name -> values), written by the pipeline.
    biases: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: 8-bit activation parameters the method learned (tensor name -> parameters), or None.
    act_params: Mapping[str, QParams] | None = None
    report: ReconReport | None = None
    notes: tuple[str, ...] = ()
    #: Lines the text report shows for the method (what it did and measured).
    summary: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundingJob:
    """One call of a rounding method: the FP model (not modified), what to round, the data (None:
    no calibration data), all settings, and progress(stage, done, total, info="")."""

    model: ir.Model
    plan: RoundingPlan
    data: RoundingData | None
    cfg: QuantConfig
    progress: Progress | None = None


#: A rounding method (see the module docstring).
RoundingFn = Callable[[RoundingJob], RoundingResult]


def nearest(job: RoundingJob) -> RoundingResult:
    """Round to nearest on the base quantizer's grid (data-free)."""
    plan, progress = job.plan, job.progress
    step = None if progress is None else (lambda done, total: progress("rounding", done, total))
    return RoundingResult(
        round_nearest(plan.weights, plan.axes, plan.bits, job.cfg.quantizer, step, blocks=plan.blocks)
    )


def _brecq(job: RoundingJob) -> RoundingResult:
    from onnx_mixquant.rounding.brecq import brecq  # onnx-ad is only needed here

    return brecq(job)


def _gptq(job: RoundingJob) -> RoundingResult:
    from onnx_mixquant.rounding.gptq import gptq

    return gptq(job)


#: Rounding methods by the option that selects them.
METHODS: dict[RoundingMethod, RoundingFn] = {
    RoundingMethod.NEAREST: nearest,
    RoundingMethod.BRECQ: _brecq,
    RoundingMethod.GPTQ: _gptq,
}


def round_weights(
    model: ir.Model,
    plan: RoundingPlan,
    data: RoundingData | None,
    cfg: QuantConfig,
    progress: Progress | None = None,
) -> RoundingResult:
    """Round every weight of ``plan`` with the method ``cfg.recon.method`` selects.

    Raises:
        ConfigError: no such method, or a data-aware method without calibration data.
    """
    method = METHODS.get(cfg.recon.method)
    if method is None:
        raise ConfigError(f"no rounding method {cfg.recon.method.value!r}")
    return method(RoundingJob(model, plan, data, cfg, progress))
