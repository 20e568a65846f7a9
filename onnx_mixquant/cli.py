"""Command line: ``onnx-mixquant IN.onnx OUT.onnx [options]``. The only module that prints or exits.

Exit codes: 0 success; 1 bad model, data or environment (one-line message); 2 bad usage or option
value; 3 a quality gate (``--min-sqnr``) failed, so the output was not written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

from onnx_mixquant import __version__
from onnx_mixquant.config import (
    DEFAULT_BITS,
    ExportConfig,
    Granularity,
    QemReference,
    QuantConfig,
    QuantizerConfig,
    ScaleMethod,
    SearchConfig,
    SearchRule,
    Symmetry,
    ValidateConfig,
    WeightOverride,
)
from onnx_mixquant.errors import ConfigError, MixQuantError
from onnx_mixquant.pipeline import quantize
from onnx_mixquant.report import format_text, to_json, write_json

__all__ = ["main"]

EXIT_GATE = 3
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


def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{value!r} is not a size like 800000, 750kB or 1.5MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parse_bits_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from e


def _parse_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> list[tuple[str, int]]:
    out = []
    for item in value:
        name, sep, num = item.rpartition("=")
        if not sep or not name or not num.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=INTEGER")
        out.append((name, int(num)))
    return out


class _StageBars:
    """Progress on stderr: one click progress bar per stage on a terminal, else one line per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            if not self.tty:
                click.echo(f"onnx-mixquant: {stage} ({total} steps)", err=True)
                return
            self.bar = click.progressbar(
                length=total, label=f"{stage:<12}", file=sys.stderr, show_pos=True
            )
            self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _search_config(opts: dict[str, Any]) -> SearchConfig:
    given = [
        k for k in ("qem", "target_bits", "target_size", "uniform_bits") if opts[k] is not None
    ]
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
            symmetry=Symmetry(opts["symmetry"]),
            granularity=Granularity(opts["granularity"]),
            scale_method=ScaleMethod(opts["scale_method"]),
        ),
        search=_search_config(opts),
        export=ExportConfig(use_int2=opts["int2"], allow_opset_upgrade=opts["opset_upgrade"]),
        validate=ValidateConfig(
            enabled=opts["validate"],
            num_samples=opts["num_samples"],
            dims=dict(opts["dim"]),
            try_cuda=opts["cuda"],
            min_sqnr_db=opts["min_sqnr"],
        ),
        seed=opts["seed"],
    )


def _ask_dim(input_name: str, dim: str) -> int:
    return int(
        click.prompt(
            f"input {input_name!r} has symbolic dimension {dim!r}; value",
            type=click.IntRange(min=1),
            err=True,
        )
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("input_model", type=click.Path(path_type=Path))
@click.argument("output_model", type=click.Path(path_type=Path))
@click.option(
    "--target-bits",
    type=float,
    help="Budget rule: average weight bits (parameter-weighted). Default rule: --target-bits 4.",
)
@click.option(
    "--target-size",
    callback=_parse_size,
    help="Budget rule: bytes for the weights, each width priced at its INT2/INT4/INT8 container (e.g. 1.5MB).",
)
@click.option(
    "--qem",
    type=float,
    help="MixQuant paper rule: smallest width whose error is within QEM x the reference error.",
)
@click.option(
    "--qem-reference",
    type=click.Choice([r.value for r in QemReference]),
    default="layer",
    show_default=True,
    help="QEM reference: the layer's own smallest error, or the model's smallest 8-bit error.",
)
@click.option("--uniform-bits", type=int, help="Baseline: every weight at this width (no search).")
@click.option(
    "--candidate-bits",
    default=",".join(map(str, DEFAULT_BITS)),
    show_default=True,
    callback=_parse_bits_list,
    help="Widths the search may choose.",
)
@click.option(
    "--bits",
    "bits",
    multiple=True,
    callback=_parse_pairs,
    metavar="NAME=B",
    help="Pin a width for a weight or node name ('re:REGEX' for a pattern). Repeatable.",
)
@click.option(
    "--keep-float",
    multiple=True,
    metavar="REGEX",
    help="Keep weights whose name or consumer node name matches in float. Repeatable.",
)
@click.option(
    "--first-last-8bit", is_flag=True, help="Keep the first and last quantized layers at 8 bits."
)
@click.option(
    "--symmetry",
    type=click.Choice([s.value for s in Symmetry]),
    default="asymmetric",
    show_default=True,
)
@click.option(
    "--granularity",
    type=click.Choice([g.value for g in Granularity]),
    default="per-channel",
    show_default=True,
)
@click.option(
    "--scale-method",
    type=click.Choice([m.value for m in ScaleMethod]),
    default="minmax",
    show_default=True,
    help="Min-max range, or the MSE search over shrunk ranges.",
)
@click.option(
    "--int2", is_flag=True, help="Store 2-bit weights as INT2/UINT2 (opset 25) instead of INT4."
)
@click.option(
    "--opset-upgrade/--no-opset-upgrade",
    default=True,
    show_default=True,
    help="Convert the model's opset when the integer types need it (else refuse).",
)
@click.option(
    "--samples",
    type=click.Path(path_type=Path),
    help="Validation inputs: .npz keyed by input name (optional 'labels') or .npy.",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Random validation samples when --samples is not given.",
)
@click.option(
    "--dim",
    "dim",
    multiple=True,
    callback=_parse_pairs,
    metavar="NAME=N",
    help="Value of a symbolic input dimension for random samples (e.g. N=1). Repeatable.",
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="Run FP and quantized models in onnxruntime and compare.",
)
@click.option(
    "--cuda/--no-cuda",
    default=True,
    show_default=True,
    help="Also validate on CUDA when onnxruntime can use it.",
)
@click.option(
    "--min-sqnr",
    type=float,
    metavar="DB",
    help="Fail (exit 3, output not written) if any output's SQNR is below DB.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    help="Write the full report as JSON.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the JSON report on stdout (the table goes to stderr).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(__version__, prog_name="onnx-mixquant")
def main(
    input_model: Path,
    output_model: Path,
    report_path: Path | None,
    as_json: bool,
    verbose: int,
    quiet: bool,
    **opts: Any,
) -> None:
    """Quantize the weights of INPUT_MODEL to mixed precision and write OUTPUT_MODEL (QDQ ONNX)."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = build_config(opts)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    if report_path is not None and not report_path.absolute().parent.is_dir():
        raise click.BadParameter(
            f"folder {report_path.absolute().parent} does not exist", param_hint="--report"
        )
    bars = _StageBars(enabled=not quiet)
    try:
        report = quantize(
            input_model,
            output_model,
            cfg,
            samples_path=opts["samples"],
            progress=bars,
            ask_dim=_ask_dim if sys.stdin.isatty() else None,
        )
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    except MixQuantError as e:
        raise click.ClickException(str(e)) from e
    finally:
        bars.close()
    if report_path is not None:
        try:
            write_json(report, report_path)
        except OSError as e:
            raise click.ClickException(
                f"{report_path}: cannot write the report: {e.strerror}"
            ) from e
    text = format_text(report)
    if as_json:
        click.echo(text, err=True)
        click.echo(json.dumps(to_json(report), indent=2))
    else:
        click.echo(text)
    if report.gate_failures:
        sys.exit(EXIT_GATE)
