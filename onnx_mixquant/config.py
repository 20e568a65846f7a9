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
    "ActivationConfig",
    "BiasConfig",
    "BiasCorrection",
    "CalibMethod",
    "Device",
    "ExportConfig",
    "ImageLayout",
    "ImageSpec",
    "Granularity",
    "Objective",
    "IterSplit",
    "QemReference",
    "QuantConfig",
    "QuantizerConfig",
    "ReconConfig",
    "ReconGranularity",
    "RECON_PRESETS",
    "RoundingMethod",
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
    """Asymmetric: unsigned range with a zero-point. Symmetric: signed range, zero-point 0.

    ``SYMMETRIC_INT8``: symmetric for the widths stored in 8-bit containers (5-8 bits), which
    onnxruntime fuses into integer kernels (fastest with int8 weights), asymmetric for the widths
    stored in 4- or 2-bit containers (2-4 bits), which it runs as DequantizeLinear + float op anyway:
    there a zero point costs nothing, and a symmetric 2-bit grid has only three useful levels.
    """

    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"
    SYMMETRIC_INT8 = "symmetric-int8"

    def symmetric_at(self, bits: int) -> bool:
        """True when weights of width ``bits`` use the signed, zero-point-0 grid."""
        if self is Symmetry.SYMMETRIC_INT8:
            return bits > 4
        return self is Symmetry.SYMMETRIC


#: Widest width that uses block-wise scales (``QuantizerConfig.block_size``): per-channel scales
#: keep 5-8 bits accurate, and onnxruntime fuses int8 per-channel weights with activation Q/DQ.
BLOCK_MAX_BITS = 4


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
        raise ConfigError(f"{what}: bit-width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


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
                raise ConfigError(f"override {self.pattern!r}: invalid regular expression: {e}") from e

    def matches(self, names: tuple[str, ...]) -> bool:
        """True when the pattern matches any of ``names`` (a weight name and its consumers' names)."""
        if self.pattern.startswith("re:"):
            rx = re.compile(self.pattern[3:])
            return any(rx.search(n) for n in names)
        return self.pattern in names


@dataclass(frozen=True)
class QuantizerConfig:
    """The base weight quantizer (used by the error table and by the rounding stage)."""

    #: None: ``SYMMETRIC_INT8`` when activations are quantized -- onnxruntime's QLinearConv is several
    #: times slower with uint8 weights with zero points (measured, BENCHMARKS.md), and widths in 4/2-bit
    #: containers are never fused, so they keep the more accurate asymmetric grid -- else asymmetric.
    symmetry: Symmetry | None = None
    granularity: Granularity = Granularity.PER_CHANNEL
    scale_method: ScaleMethod = ScaleMethod.MINMAX
    mse_p: float = 2.4
    mse_steps: int = 80
    #: Block-wise scales for 2-D MatMul / Gemm weights at widths <= ``BLOCK_MAX_BITS``: one scale
    #: and zero point per ``block_size`` consecutive elements along the reduction axis K and per
    #: output column (DequantizeLinear ``block_size``, opset 21). None or 0: per-channel everywhere.
    #: Wider widths, Conv / ConvTranspose weights and per-tensor granularity are never block-wise.
    block_size: int | None = 32

    def symmetric_at(self, bits: int) -> bool:
        """True when weights of width ``bits`` get the symmetric grid (None counts as asymmetric)."""
        return self.symmetry is not None and self.symmetry.symmetric_at(bits)

    def block_at(self, bits: int) -> int | None:
        """The block size a block-eligible (2-D MatMul / Gemm) weight of width ``bits`` uses, or
        None for per-channel (or per-tensor) scales."""
        if not self.block_size or bits > BLOCK_MAX_BITS or self.granularity is not Granularity.PER_CHANNEL:
            return None
        return self.block_size

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 0):
            raise ConfigError(f"block_size must be a non-negative integer or None, got {bs!r}")
        if not (math.isfinite(self.mse_p) and self.mse_p > 0):
            raise ConfigError(f"mse_p must be a positive number, got {self.mse_p!r}")
        if not 1 <= self.mse_steps <= 100:
            raise ConfigError(f"mse_steps must be in 1..100, got {self.mse_steps!r}")


class Objective(enum.Enum):
    """What the budget rule minimises, per weight and candidate width.

    ``ROUNDOFF``: the weight's normalised roundoff error ``e_b / mean(W^2)`` (the MixQuant table
    alone). ``OUTPUT``: the measured relative error of the model's outputs with only that weight
    quantized at that width, on calibration samples when given, else on synthetic inputs
    (:mod:`onnx_mixquant.search.sensitivity`). ``GUARDED``: the roundoff error, multiplied for each weight
    whose measured output error per unit of roundoff error exceeds ``guard_ratio`` times the
    model's median by its measured ratio (an outlier guard: a classifier or LM head that the
    roundoff rule would crush); the roundoff error alone where the model cannot be probed or has
    no logits / probability output.
    """

    ROUNDOFF = "roundoff"
    OUTPUT = "output"
    GUARDED = "guarded"


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
    #: The budget rule's objective (see Objective).
    objective: Objective = Objective.GUARDED
    #: Samples the OUTPUT / GUARDED objectives run the model on per probe.
    sensitivity_samples: int = 4
    #: GUARDED: a weight is an outlier when its sensitivity ratio exceeds this x the median.
    guard_ratio: float = 10.0

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
                raise ConfigError(f"target bits must be in {MIN_BITS}..{MAX_BITS}, got {self.target_bits!r}")
            if self.target_bytes is not None and self.target_bytes <= 0:
                raise ConfigError(f"target bytes must be positive, got {self.target_bytes!r}")


class CalibMethod(enum.Enum):
    """How an activation range is chosen from calibration statistics.

    ``MINMAX``: observed min and max. ``PERCENTILE``: the ``percentile`` / ``100 - percentile``
    quantiles of the histogram. ``MSE``: the range minimising mean ``|x - x'|^p`` over the histogram
    (DESIGN.md's p-norm search, p = 2.4).
    """

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class ImageLayout(enum.Enum):
    """Tensor layout a model expects for an image batch."""

    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True)
class ImageSpec:
    """Preprocessing for a folder of images (decode -> RGB/BGR -> resize -> crop -> scale/normalise).

    ``resize``: short side in pixels before the crop (None: no resize). ``crop``: (height, width)
    centre crop (None: none). Pixel values are first multiplied by ``scale`` (e.g. 1/255), then
    ``(x - mean) / std`` per channel.
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    layout: ImageLayout = ImageLayout.NCHW
    bgr: bool = False
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize < 1:
            raise ConfigError(f"image resize must be a positive pixel count, got {self.resize!r}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            raise ConfigError(f"image crop must be two positive sizes (height, width), got {self.crop!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"image scale must be a positive number, got {self.scale!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("image mean and std need three values (one per colour channel)")
        if any(not (math.isfinite(v) and v > 0) for v in self.std):
            raise ConfigError(f"image std values must be positive, got {self.std!r}")


@dataclass(frozen=True)
class ActivationConfig:
    """Static activation quantization (needs calibration data)."""

    #: None: on when calibration data are given (the CLI's ``--calib`` and ``quantize(calib=...)``
    #: alike; ``pipeline.resolve_config`` settles it), False: weight-only (``--weight-only``).
    enabled: bool | None = None
    #: None: PERCENTILE, the best of the three on two of the three bench models (BENCHMARKS.md),
    #: except in attention graphs (calibrate/activations.py), where MINMAX is (MiniLM-L6 W8A8: cosine to the
    #: FP32 embeddings 0.995 against 0.953 with PERCENTILE and 0.994 with MSE); see method_for().
    method: CalibMethod | None = None
    #: PERCENTILE keeps this share (in %) of the values inside the range.
    percentile: float = 99.999
    #: Histogram bins for PERCENTILE and MSE.
    num_bins: int = 2048
    #: p of the MSE search's score mean(|x - x'|^p).
    mse_p: float = 2.4
    #: uint8 asymmetric (False, the default) or int8 symmetric (True).
    symmetric: bool = False
    #: Keep graph outputs (e.g. logits) in float.
    keep_outputs_float: bool = True
    #: Node names (exact, or "re:REGEX") and op types whose activations stay float.
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    #: Calibration samples used at most (seeded sample when the source has more).
    calib_size: int | None = None
    batch_size: int = 16

    def method_for(self, attention: bool) -> CalibMethod:
        """The range method: the one set, else MINMAX in attention graphs and PERCENTILE elsewhere."""
        if self.method is not None:
            return self.method
        return CalibMethod.MINMAX if attention else CalibMethod.PERCENTILE

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if not 16 <= self.num_bins <= 1 << 16:
            raise ConfigError(f"num_bins must be in 16..65536, got {self.num_bins!r}")
        if not (math.isfinite(self.mse_p) and self.mse_p > 0):
            raise ConfigError(f"activation mse_p must be positive, got {self.mse_p!r}")
        if self.calib_size is not None and self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size!r}")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size must be >= 1, got {self.batch_size!r}")


class Device(enum.Enum):
    """Where the stages whose results go into the output model run in onnxruntime (calibration,
    bias correction, BRECQ). ``CPU``: the same input and seed give a byte-identical model.
    ``CUDA`` (an error where onnxruntime cannot run it) and ``AUTO`` (CUDA where it can, else the
    CPU): faster, but onnxruntime's CUDA kernels do not round the same way from run to run, so
    neither is the output (measured on an H200: BENCHMARKS.md)."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


class RoundingMethod(enum.Enum):
    """How weights are rounded onto their grid: nearest, BRECQ's learned (AdaRound) rounding, or
    GPTQ's layer-wise second-order rounding (``rounding.METHODS`` maps each to its function)."""

    NEAREST = "nearest"
    BRECQ = "brecq"
    GPTQ = "gptq"


class ReconGranularity(enum.Enum):
    """Reconstruction units: single-entry single-exit blocks, or single layers."""

    BLOCK = "block"
    LAYER = "layer"


class IterSplit(enum.Enum):
    """How BRECQ's iterations are split between units: ``iters`` each, or the same total in
    proportion to the square root of each unit's relative rounding error (``reconstruct._budget``)."""

    EVEN = "even"
    ERROR = "error"


@dataclass(frozen=True)
class ReconConfig:
    """BRECQ block reconstruction (``RoundingMethod.BRECQ``); defaults are the reference constants."""

    method: RoundingMethod = RoundingMethod.NEAREST
    granularity: ReconGranularity = ReconGranularity.BLOCK
    iters: int = 20000
    samples: int = 1024
    batch: int = 32
    lr: float = 1e-3
    #: Share of the iterations without the rounding regulariser (lambda = 0).
    warmup: float = 0.2
    lam: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    #: Weight the squared error by (|dKL/d unit output| + 1)^2, the reference's diagonal Fisher
    #: (needs a classifier: the first model output [batch, classes] logits).
    fisher: bool = False
    #: ``EVEN``: ``iters`` per unit; ``ERROR``: ``iters`` per unit on average, more where the
    #: nearest-rounding error is larger (a quarter to four times ``iters``).
    split: IterSplit = IterSplit.EVEN
    #: With activation quantization: iterations per unit learning the activation step sizes (LSQ,
    #: after the rounding; the reference ran a quarter of ``iters``). 0 (default): keep the
    #: calibrated steps. Measured (BENCHMARKS.md): on EfficientNet-Lite0 W4A8 with its Imagenette
    #: calibration images the learned steps cut the ReLU6 and pooled-feature ranges by 7-14 % (lower
    #: held-out error per unit) and MixQuant + BRECQ fell from 0.860 to 0.828 top-1 (KL to FP32 0.048
    #: -> 1.27); on resnet20 W4A8 the difference was within noise.
    act_iters: int = 0
    #: Adam learning rate of the activation steps, cosine-annealed to 0 (reference 4e-4).
    act_lr: float = 4e-4

    def __post_init__(self) -> None:
        for name in ("iters", "samples", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reconstruction {name} must be >= 1, got {getattr(self, name)!r}")
        if isinstance(self.act_iters, bool) or not isinstance(self.act_iters, int) or self.act_iters < 0:
            raise ConfigError(f"activation-step iterations must be >= 0, got {self.act_iters!r}")
        if not (math.isfinite(self.act_lr) and self.act_lr > 0):
            raise ConfigError(f"activation-step learning rate must be > 0, got {self.act_lr!r}")
        if self.batch > self.samples:
            raise ConfigError(f"reconstruction batch ({self.batch}) exceeds its samples ({self.samples})")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not (self.lr > 0 and self.lam >= 0 and self.beta_start >= self.beta_end > 0):
            raise ConfigError("need lr > 0, lambda >= 0 and beta_start >= beta_end > 0")


#: Named settings for --recon-preset: (iterations per unit, samples, batch).
RECON_PRESETS: dict[str, tuple[int, int, int]] = {
    "paper": (20000, 1024, 32),
    "cpu": (2000, 512, 32),
    "cpu-fast": (500, 256, 32),
}


class BiasCorrection(enum.Enum):
    """Empirical bias correction after rounding: none, the output layers only, or every layer."""

    OFF = "off"
    OUTPUT = "output"
    ALL = "all"


@dataclass(frozen=True)
class BiasConfig:
    """Empirical bias correction (needs calibration data): add to each layer's bias the shift
    quantization made in its per-channel output mean (see ``rounding/biascorrect.py``)."""

    #: None: ``ALL`` when calibration data are given (they are needed), else ``OFF``. With BRECQ,
    #: ``ALL`` also corrects each unit's layers as soon as its rounding is learned, before the next
    #: unit trains (``rounding/reconstruct/_unitbias.py``). Measured
    #: (BENCHMARKS.md): resnet20 W4A8 MixQuant + nearest 0.7925 -> 0.8058 top-1 in 1-2 s,
    #: EfficientNet-Lite0 W4A8 0.834 -> 0.853 in about 15 s on 2 cores.
    mode: BiasCorrection | None = None
    #: Calibration samples the means are measured on (the first ones; FP and quantized means are
    #: compared on the same samples, so few suffice: resnet20 and EfficientNet-Lite0 W4 gave the same
    #: top-1 from 32 as from 256, BENCHMARKS.md). ``ALL`` costs about three forward passes over
    #: them and keeps the tensors alive at each layer for all of them in memory.
    samples: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"bias correction samples must be a positive integer, got {self.samples!r}")


@dataclass(frozen=True)
class ExportConfig:
    """The QDQ rewrite and the saved file."""

    #: Store 2-bit weights as INT2/UINT2 (opset 25) instead of INT4/UINT4 (opset 21).
    use_int2: bool = False
    #: Store widths 2 (without ``use_int2``), 3, 5, 6 and 7 bit-packed at their own width (a uint8
    #: initializer and standard ops that onnxruntime folds at load) instead of in INT4/INT8.
    pack_widths: bool = True
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
    #: Fail when FP32 top-1 minus quantized top-1, in points (0.01), exceeds this on any run;
    #: needs labelled samples and a classifier-like output.
    max_top1_drop: float | None = None
    #: Fail when the top-1 agreement of FP32 and quantized predictions on any classifier-like
    #: output is below this fraction on any run; needs real (not random) samples.
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples!r}")
        for k, v in self.dims.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"dimension {k!r}: value must be a positive integer, got {v!r}")
        object.__setattr__(self, "dims", dict(self.dims))
        if self.min_sqnr_db is not None and not math.isfinite(self.min_sqnr_db):
            raise ConfigError(f"min_sqnr_db must be a finite number, got {self.min_sqnr_db!r}")
        drop = self.max_top1_drop
        if drop is not None and not (math.isfinite(drop) and 0 <= drop <= 100):
            raise ConfigError(f"max_top1_drop (--max-top1-drop) must be 0..100 points, got {drop!r}")
        agree = self.min_agreement
        if agree is not None and not (math.isfinite(agree) and 0 <= agree <= 1):
            raise ConfigError(f"min_agreement (--min-agreement) must be a fraction 0..1, got {agree!r}")
        if not self.enabled:
            gates = ((self.min_sqnr_db, "--min-sqnr"), (drop, "--max-top1-drop"), (agree, "--min-agreement"))
            for given, flag in gates:
                if given is not None:
                    raise ConfigError(f"{flag} needs validation; do not combine it with --no-validate")


@dataclass(frozen=True)
class QuantConfig:
    """Everything one quantization run needs; each stage receives only its own part."""

    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    seed: int = 0
    #: Where calibration, bias correction and BRECQ run (:class:`Device`).
    device: Device = Device.CPU
