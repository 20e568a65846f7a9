"""Configuration: one :class:`QuantConfig` made of per-stage frozen dataclasses.

Every field is checked in ``__post_init__`` and a bad value raises :class:`ConfigError` naming the
option. The CLI maps its flags one to one onto these fields.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from onnx_mixquant.errors import ConfigError

__all__ = [
    "DEFAULT_BITS",
    "ExportConfig",
    "Granularity",
    "QemReference",
    "QuantConfig",
    "QuantizerConfig",
    "ScaleMethod",
    "SearchConfig",
    "SearchRule",
    "Symmetry",
    "ValidateConfig",
    "WeightOverride",
]

#: Candidate widths of the bit-width search when the user gives none.
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
MIN_BITS = 2
MAX_BITS = 8


class Symmetry(enum.Enum):
    """Asymmetric: unsigned range with a zero-point. Symmetric: signed range, zero-point 0."""

    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"


class Granularity(enum.Enum):
    """One scale per output channel, or one per tensor."""

    PER_CHANNEL = "per-channel"
    PER_TENSOR = "per-tensor"


class ScaleMethod(enum.Enum):
    """Min-max range, or BRECQ's search over shrunk ranges minimising mean ``|w - w'|^p``."""

    MINMAX = "minmax"
    MSE = "mse"


class SearchRule(enum.Enum):
    """How the bit-width of each weight is chosen.

    ``QEM``: the MixQuant paper rule, smallest width whose roundoff error is within QEM times the
    reference error. ``BUDGET``: minimise the summed normalised error under an average-bits or byte
    budget. ``UNIFORM``: every weight at ``SearchConfig.uniform_bits`` (the baseline).
    """

    QEM = "qem"
    BUDGET = "budget"
    UNIFORM = "uniform"


class QemReference(enum.Enum):
    """What the QEM multiplies: each layer's own smallest error, or the model-wide smallest one."""

    LAYER = "layer"
    MODEL = "model"


def _check_bits(bits: int, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{what}: bit-width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}"
        )


@dataclass(frozen=True)
class WeightOverride:
    """Pin a width (``bits``) or keep float (``bits=None``) for weights matching ``pattern``.

    ``pattern`` is an exact weight or consumer-node name, or ``re:REGEX`` searched in both.
    """

    pattern: str
    bits: int | None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ConfigError("weight override: empty name pattern")
        if self.bits is not None:
            _check_bits(self.bits, f"override {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ConfigError(
                    f"override {self.pattern!r}: invalid regular expression: {e}"
                ) from e

    def matches(self, names: tuple[str, ...]) -> bool:
        """True when the pattern matches any of ``names`` (a weight name and its consumers' names)."""
        if self.pattern.startswith("re:"):
            rx = re.compile(self.pattern[3:])
            return any(rx.search(n) for n in names)
        return self.pattern in names


@dataclass(frozen=True)
class QuantizerConfig:
    """The base weight quantizer (used by the error table and by the rounding stage)."""

    symmetry: Symmetry = Symmetry.ASYMMETRIC
    granularity: Granularity = Granularity.PER_CHANNEL
    scale_method: ScaleMethod = ScaleMethod.MINMAX
    mse_p: float = 2.4
    mse_steps: int = 80

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mse_p) and self.mse_p > 0):
            raise ConfigError(f"mse_p must be a positive number, got {self.mse_p!r}")
        if not 1 <= self.mse_steps <= 100:
            raise ConfigError(f"mse_steps must be in 1..100, got {self.mse_steps!r}")


@dataclass(frozen=True)
class SearchConfig:
    """The MixQuant bit-width search."""

    rule: SearchRule = SearchRule.BUDGET
    candidate_bits: tuple[int, ...] = DEFAULT_BITS
    qem: float = 300.0
    qem_reference: QemReference = QemReference.LAYER
    target_bits: float | None = 4.0
    target_bytes: int | None = None
    uniform_bits: int = 8
    overrides: tuple[WeightOverride, ...] = ()
    first_last_8bit: bool = False

    def __post_init__(self) -> None:
        if not self.candidate_bits:
            raise ConfigError("candidate bit-widths: empty list")
        for b in self.candidate_bits:
            _check_bits(b, "candidate bit-widths")
        object.__setattr__(self, "candidate_bits", tuple(sorted(set(self.candidate_bits))))
        if not (math.isfinite(self.qem) and self.qem >= 1.0):
            raise ConfigError(f"qem must be a number >= 1, got {self.qem!r}")
        _check_bits(self.uniform_bits, "uniform bits")
        if self.rule is SearchRule.BUDGET:
            if (self.target_bits is None) == (self.target_bytes is None):
                raise ConfigError("budget rule: give exactly one of target_bits and target_bytes")
            if self.target_bits is not None and not (
                math.isfinite(self.target_bits) and MIN_BITS <= self.target_bits <= MAX_BITS
            ):
                raise ConfigError(
                    f"target bits must be in {MIN_BITS}..{MAX_BITS}, got {self.target_bits!r}"
                )
            if self.target_bytes is not None and self.target_bytes <= 0:
                raise ConfigError(f"target bytes must be positive, got {self.target_bytes!r}")


@dataclass(frozen=True)
class ExportConfig:
    """The QDQ rewrite and the saved file."""

    #: Store 2-bit weights as INT2/UINT2 (opset 25) instead of INT4/UINT4 (opset 21).
    use_int2: bool = False
    #: Convert the model to the opset the chosen storage types need; when False, refuse instead.
    allow_opset_upgrade: bool = True
    #: Save weights as external data when the serialized model would exceed this many bytes.
    external_data_threshold: int = 2_000_000_000

    def __post_init__(self) -> None:
        if self.external_data_threshold <= 0:
            raise ConfigError("external_data_threshold must be positive")


@dataclass(frozen=True)
class ValidateConfig:
    """Running the FP and quantized models side by side in onnxruntime."""

    enabled: bool = True
    #: Random samples drawn when no sample data are given.
    num_samples: int = 8
    #: Values for symbolic input dimensions, by dim name (e.g. {"N": 1}).
    dims: Mapping[str, int] = field(default_factory=dict)
    #: Also run on CUDA when onnxruntime can actually use it.
    try_cuda: bool = True
    #: Fail (QualityGateError) when any output's SQNR is below this many dB.
    min_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples!r}")
        for k, v in self.dims.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"dimension {k!r}: value must be a positive integer, got {v!r}")
        object.__setattr__(self, "dims", dict(self.dims))
        if self.min_sqnr_db is not None and not math.isfinite(self.min_sqnr_db):
            raise ConfigError(f"min_sqnr_db must be a finite number, got {self.min_sqnr_db!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Everything one quantization run needs; each stage receives only its own part."""

    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    seed: int = 0
