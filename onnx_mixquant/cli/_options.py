"""The command line's option parsing: click callbacks for option values, and the QuantConfig /
ImageSpec built from the parsed options (``onnx_mixquant.cli.command`` holds the command itself)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from onnx_mixquant.config import (
    RECON_PRESETS,
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    CalibMethod,
    Device,
    ExportConfig,
    Granularity,
    ImageLayout,
    ImageSpec,
    IterSplit,
    Objective,
    QemReference,
    QuantConfig,
    QuantizerConfig,
    ReconConfig,
    ReconGranularity,
    RoundingMethod,
    ScaleMethod,
    SearchConfig,
    SearchRule,
    Symmetry,
    ValidateConfig,
    WeightOverride,
)

__all__ = [
    "IMAGE_KEYS",
    "build_config",
    "calib_source",
    "image_spec",
    "parse_bits_list",
    "parse_hw",
    "parse_pairs",
    "parse_size",
    "parse_triple",
]


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
}


def parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{value!r} is not a size like 800000, 750kB or 1.5MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_bits_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from e


def parse_hw(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not H or HxW (e.g. 224 or 224x224)")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def parse_triple(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not three comma-separated numbers") from e
    if len(out) != 3:
        raise click.BadParameter(f"{value!r} is not three comma-separated numbers")
    return out


def parse_pairs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for item in value:
        name, sep, num = item.rpartition("=")
        if not sep or not name or not num.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=INTEGER")
        out.append((name, int(num)))
    return out


def _search_config(opts: dict[str, Any]) -> SearchConfig:
    given = [k for k in ("qem", "target_bits", "target_size", "uniform_bits") if opts[k] is not None]
    if len(given) > 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"choose one bit-width rule; got {flags}")
    overrides = [WeightOverride(n, b) for n, b in opts["bits"]]
    overrides += [WeightOverride("re:" + rx, None) for rx in opts["keep_float"]]
    common: dict[str, Any] = dict(
        candidate_bits=opts["candidate_bits"],
        overrides=tuple(overrides),
        first_last_8bit=opts["first_last_8bit"],
        qem_reference=QemReference(opts["qem_reference"]),
        objective=Objective(opts["objective"]),
    )
    if opts["qem"] is not None:
        return SearchConfig(rule=SearchRule.QEM, qem=opts["qem"], target_bits=None, **common)
    if opts["uniform_bits"] is not None:
        return SearchConfig(
            rule=SearchRule.UNIFORM, uniform_bits=opts["uniform_bits"], target_bits=None, **common
        )
    if opts["target_size"] is not None:
        return SearchConfig(
            rule=SearchRule.BUDGET, target_bits=None, target_bytes=opts["target_size"], **common
        )
    target = opts["target_bits"] if opts["target_bits"] is not None else SearchConfig().target_bits
    return SearchConfig(rule=SearchRule.BUDGET, target_bits=target, **common)


def build_config(opts: dict[str, Any]) -> QuantConfig:
    """QuantConfig from the parsed CLI options (ConfigError on a bad value)."""
    return QuantConfig(
        quantizer=QuantizerConfig(
            symmetry=Symmetry(opts["symmetry"]) if opts["symmetry"] else None,
            granularity=Granularity(opts["granularity"]),
            scale_method=ScaleMethod(opts["scale_method"]),
            block_size=opts["block_size"] or None,
        ),
        search=_search_config(opts),
        export=ExportConfig(
            use_int2=opts["int2"], allow_opset_upgrade=opts["opset_upgrade"], pack_widths=opts["pack"]
        ),
        validate=ValidateConfig(
            enabled=opts["validate"],
            num_samples=opts["num_samples"],
            dims=dict(opts["dim"]),
            try_cuda=opts["cuda"],
            min_sqnr_db=opts["min_sqnr"],
            max_top1_drop=opts["max_top1_drop"],
            min_agreement=opts["min_agreement"],
        ),
        activations=_activation_config(opts),
        recon=_recon_config(opts),
        bias=BiasConfig(
            mode=BiasCorrection(opts["bias_correction"]) if opts["bias_correction"] else None,
            samples=opts["bias_samples"],
        ),
        seed=opts["seed"],
        device=Device(opts["device"]),
    )


def _recon_config(opts: dict[str, Any]) -> ReconConfig:
    iters, samples, batch = RECON_PRESETS[opts["recon_preset"]]
    return ReconConfig(
        method=RoundingMethod(opts["method"]),
        granularity=ReconGranularity(opts["recon_granularity"]),
        iters=opts["iters"] or iters,
        samples=opts["recon_samples"] or samples,
        batch=opts["recon_batch"] or batch,
        fisher=opts["fisher"],
        split=IterSplit(opts["recon_split"]),
        act_iters=opts["act_iters"],
    )


def _activation_config(opts: dict[str, Any]) -> ActivationConfig:
    if opts["weight_only"] and opts["static_activations"]:
        raise click.UsageError("--weight-only and --static-activations contradict each other: choose one")
    return ActivationConfig(
        enabled=False if opts["weight_only"] else (True if opts["static_activations"] else None),
        method=CalibMethod(opts["calib_method"]) if opts["calib_method"] else None,
        percentile=opts["percentile"],
        symmetric=opts["act_type"] == "int8",
        keep_outputs_float=not opts["quantize_outputs"],
        exclude_nodes=tuple(opts["exclude_node"]),
        exclude_op_types=tuple(opts["exclude_op_type"]),
        calib_size=opts["calib_size"],
    )


IMAGE_KEYS = ("resize", "crop", "layout", "bgr", "scale", "mean", "std")


def image_spec(opts: dict[str, Any]) -> ImageSpec | None:
    """ImageSpec from --image-config and the --image-* options (options override the file)."""
    given: dict[str, Any] = {}
    if opts["image_config"] is not None:
        given.update(_read_image_config(opts["image_config"]))
    cli = {
        "resize": opts["image_resize"],
        "crop": opts["image_crop"],
        "layout": opts["image_layout"],
        "bgr": opts["bgr"],
        "scale": opts["image_scale"],
        "mean": opts["mean"],
        "std": opts["std"],
    }
    given.update({k: v for k, v in cli.items() if v is not None})
    if not given:
        return None
    if "layout" in given:
        given["layout"] = ImageLayout(given["layout"])
    for key in ("crop", "mean", "std"):
        if key in given:
            given[key] = tuple(given[key])
    return ImageSpec(**given)


def _read_image_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot read: {e.strerror}", param_hint="--image-config") from e
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{path}: not valid JSON: {e}", param_hint="--image-config") from e
    if not isinstance(raw, dict) or set(raw) - set(IMAGE_KEYS):
        extra = sorted(set(raw) - set(IMAGE_KEYS)) if isinstance(raw, dict) else raw
        raise click.BadParameter(
            f"{path}: expected an object with keys {', '.join(IMAGE_KEYS)}; unexpected: {extra}",
            param_hint="--image-config",
        )
    if isinstance(raw.get("crop"), int):
        raw["crop"] = (raw["crop"], raw["crop"])
    return raw


def calib_source(paths: tuple[Path, ...]) -> Path | list[Path] | None:
    """The --calib (or --samples) paths as one source: None, one path, or a list of files."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else list(paths)
