"""Validate: run the FP32 and the quantized model side by side in onnxruntime and compare outputs.

Each session sets its graph optimisation level explicitly; the quantized model is checked at
ORT_ENABLE_ALL (what users deploy) and with optimisations off (the plain QDQ semantics), on the CPU
provider and on CUDA when onnxruntime can really use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_mixquant.config import ValidateConfig
from onnx_mixquant.graph import ModelInput

__all__ = [
    "OutputMetrics",
    "RunMetrics",
    "Samples",
    "ValidationResult",
    "available_providers",
    "random_samples",
    "resolve_dims",
    "validate",
]

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Samples:
    """Inputs to run both models on.

    Attributes:
        feeds: batches, each a dict input name -> array (batch on axis 0).
        labels: int64 class labels for all samples concatenated (for top-1 accuracy), or None.
        source: where they came from, e.g. "random (seed 0)" or a file path.
    """

    feeds: tuple[Feed, ...]
    labels: np.ndarray | None
    source: str


@dataclass(frozen=True)
class OutputMetrics:
    """FP vs quantized on one model output.

    sqnr_db = 10 log10(sum(fp^2) / sum((fp - q)^2)) over all samples (inf when equal);
    top1_agreement: fraction of samples whose argmax over the last axis agrees (only for
    classifier-like outputs: rank 2, last dim > 1), else None.
    """

    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class RunMetrics:
    """One onnxruntime configuration of the quantized model (provider x optimisation level)."""

    provider: str
    optimization: str  # "ORT_ENABLE_ALL" | "ORT_DISABLE_ALL"
    outputs: tuple[OutputMetrics, ...]
    top1_fp: float | None  # accuracy against labels, when labels are given
    top1_quant: float | None


@dataclass(frozen=True)
class ValidationResult:
    """All runs, plus what was available."""

    runs: tuple[RunMetrics, ...]
    num_samples: int
    sample_source: str
    providers: tuple[str, ...]  # providers that actually ran


def resolve_dims(inputs: Sequence[ModelInput], dims: dict[str, int] | None) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input; symbolic dims from ``dims`` by dim name. Raises ConfigError listing
    every unresolved symbolic dim (input name, position, dim name) when one is missing."""
    raise NotImplementedError


def random_samples(inputs: Sequence[ModelInput], shapes: dict[str, tuple[int, ...]], num: int, seed: int) -> Samples:
    """``num`` random feeds of the resolved shapes (standard normal for float inputs, small
    non-negative ints for integer inputs, random bools), from np.random.default_rng(seed)."""
    raise NotImplementedError


def available_providers(try_cuda: bool) -> tuple[str, ...]:
    """Providers that actually work here: probes CUDA once, quietly (onnxruntime-gpu lists it even
    on CPU-only machines and falls back with an error log); always ends with CPUExecutionProvider."""
    raise NotImplementedError


def validate(
    fp_path: Path,
    quant_path: Path,
    samples: Samples,
    cfg: ValidateConfig,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationResult:
    """Run FP (CPU, ORT_DISABLE_ALL... reference) and quantized models on ``samples``; metrics per run."""
    raise NotImplementedError
