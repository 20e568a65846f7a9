"""Bias correction inside BRECQ: as soon as a unit's rounding is fixed, its layers get their FP
per-channel output means back (``rounding/biascorrect.py``, layer by layer in graph order), so every later
unit is trained on inputs whose means are already corrected.

Measured on resnet20 W3 weight-only (BENCHMARKS.md): correcting after BRECQ instead left uniform
BRECQ at 0.7938 and MixQuant + BRECQ at 0.7950 top-1; correcting unit by unit gave 0.7981 and 0.8010
with KL to FP32 21 % and 11 % lower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_mixquant.config import BiasConfig, BiasCorrection
from onnx_mixquant.errors import MixQuantError
from onnx_mixquant.rounding.biascorrect import (
    BiasLayer,
    BiasPlan,
    BiasReport,
    BiasTarget,
    correct_biases,
    reference_means,
)
from onnx_mixquant.rounding.reconstruct.blocks import Unit

__all__ = ["UnitBias"]

logger = logging.getLogger(__name__)


class UnitBias:
    """The biases to correct unit by unit, their FP means, and the samples both are measured on.

    Args:
        fp_model: the FP model (the reference means).
        targets: biases to correct (from ``biascorrect.plan_correction`` on the FP model, whose
            zero biases the reconstruction's models share).
        inputs: the cached calibration samples (model inputs); the first ``samples`` are used.
        batch: samples per onnxruntime call.
        strict: raise when a measurement fails; otherwise stop correcting and keep the reason in
            ``error`` (the correction was not asked for explicitly).
    """

    def __init__(
        self,
        fp_model: ir.Model,
        targets: Sequence[BiasTarget],
        inputs: Mapping[str, np.ndarray],
        samples: int,
        batch: int,
        *,
        strict: bool,
    ) -> None:
        n = min(samples, len(next(iter(inputs.values()))))
        self.feeds = [
            {k: np.ascontiguousarray(v[lo : min(lo + batch, n)]) for k, v in inputs.items()}
            for lo in range(0, n, batch)
        ]
        self.num_samples, self.strict = n, strict
        self.targets = tuple(targets)
        self.layers: list[BiasLayer] = []
        #: The execution provider the corrections ran on ("-": none ran).
        self.provider = "-"
        self.error: str | None = None
        #: Time spent measuring and correcting, all units together.
        self.seconds = 0.0
        self.reference: list[np.ndarray] = []
        self._guard(lambda: self.reference.extend(reference_means(fp_model, self.targets, self.feeds)))

    def _guard(self, action: Callable[[], object]) -> None:
        """Run ``action``, timed; a failure raises (``strict``) or stops the correction."""
        start = time.perf_counter()
        try:
            action()
        except (MixQuantError, ValueError) as e:
            if self.strict:
                raise
            logger.warning("bias correction inside BRECQ stopped: %s", e)
            self.error = str(e)
        finally:
            self.seconds += time.perf_counter() - start

    def correct(self, work: ir.Model, unit: Unit) -> None:
        """Correct the biases of ``unit``'s layers in ``work`` (in place), in graph order."""
        if self.error is not None:
            return
        members = set(unit.nodes)
        chosen = [(t, r) for t, r in zip(self.targets, self.reference, strict=True) if t.node in members]
        if not chosen:
            return
        plan = BiasPlan(tuple(t for t, _ in chosen), ())
        cfg = BiasConfig(BiasCorrection.ALL, self.num_samples)

        def run() -> None:
            report = correct_biases(work, plan, [r for _, r in chosen], lambda: self.feeds, cfg)
            self.layers.extend(report.layers)
            self.provider = report.provider

        self._guard(run)

    def report(self) -> BiasReport:
        """What the correction did, for the reconstruction report."""
        return BiasReport(
            "all", "units", self.num_samples, self.provider, self.seconds, tuple(self.layers), ()
        )

    def biases(self, work: ir.Model) -> dict[str, np.ndarray]:
        """The current value of every target bias in ``work`` (by initializer name)."""
        out = {}
        for t in self.targets:
            value = work.graph.initializers[t.bias].const_value
            assert value is not None  # checked by the plan
            out[t.bias] = value.numpy().astype(np.float32)
        return out
