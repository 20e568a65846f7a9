"""Command line: ``onnx-mixquant IN.onnx OUT.onnx [options]``. The only module that prints or exits.

Exit codes: 0 success; 1 bad model, data or environment (one-line message); 2 bad usage or option
value (also a gate that these samples cannot evaluate); 3 a quality gate (``--min-sqnr``,
``--max-top1-drop``, ``--min-agreement``) failed, so the output was not written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from onnx_mixquant import __version__
from onnx_mixquant.cli._options import (
    build_config,
    calib_source,
    image_spec,
    parse_bits_list,
    parse_hw,
    parse_pairs,
    parse_size,
    parse_triple,
)
from onnx_mixquant.config import (
    DEFAULT_BITS,
    RECON_PRESETS,
    ActivationConfig,
    BiasConfig,
    BiasCorrection,
    CalibMethod,
    Device,
    Granularity,
    ImageLayout,
    IterSplit,
    Objective,
    QemReference,
    QuantizerConfig,
    ReconGranularity,
    RoundingMethod,
    ScaleMethod,
    SearchConfig,
    Symmetry,
)
from onnx_mixquant.data import save_preprocess_model
from onnx_mixquant.errors import ConfigError, MixQuantError
from onnx_mixquant.export import same_file
from onnx_mixquant.pipeline import quantize
from onnx_mixquant.report import format_text, to_json, write_json

__all__ = ["main"]

EXIT_GATE = 3
#: Seconds between progress lines when stderr is not a terminal.
LOG_EVERY_S = 10.0


class _StageBars:
    """Progress on stderr: one click progress bar per stage on a terminal, else one line per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.stage: str | None = None
        self.last: float | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.last = stage, None
            if self.tty:
                self.bar = click.progressbar(
                    length=total,
                    label=f"{stage:<12}",
                    file=sys.stderr,
                    show_pos=True,
                    item_show_func=lambda item: item,
                )
                self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(done - self.bar.pos, current_item=info or None)
            return
        now = time.monotonic()
        if self.last is None or now - self.last >= LOG_EVERY_S:  # no terminal (CI logs): a line per 10 s
            self.last = now
            click.echo(f"onnx-mixquant: {stage} {done}/{total} {info}".rstrip(), err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _check_side_outputs(input_model: Path, output_model: Path, side: dict[str, Path | None]) -> None:
    """Refuse a report or preprocessing path that names the input model, the output model or another
    side output of the same run: writing it would destroy that file.

    Raises:
        click.BadParameter: (exit 2) naming the option and the file it would overwrite.
    """
    taken = [("the input model", input_model), ("the output model", output_model)]
    for option, path in side.items():
        if path is None:
            continue
        for what, other in taken:
            if same_file(path, other):
                raise click.BadParameter(f"{path} is {what}; choose another file", param_hint=option)
        taken.append((f"the {option} file", path))


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
    callback=parse_size,
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
    "--objective",
    type=click.Choice([o.value for o in Objective]),
    default=SearchConfig().objective.value,
    show_default=True,
    help="What the budget rule minimises: each weight's roundoff error (roundoff); the model's "
    "output error with that weight quantized, measured on calibration samples or synthetic inputs "
    "(output); or the roundoff error with the weights the probe finds far more sensitive than the "
    "rest (a classifier or LM head) weighted up (guarded; roundoff where the model cannot be run).",
)
@click.option(
    "--candidate-bits",
    default=",".join(map(str, DEFAULT_BITS)),
    show_default=True,
    callback=parse_bits_list,
    help="Widths the search may choose.",
)
@click.option(
    "--bits",
    "bits",
    multiple=True,
    callback=parse_pairs,
    metavar="NAME=B",
    help="Pin a width for a weight or node name ('re:REGEX' for a pattern). Repeatable.",
)
@click.option(
    "--keep-float",
    multiple=True,
    metavar="REGEX",
    help="Keep weights whose name or consumer node name matches in float. Repeatable.",
)
@click.option("--first-last-8bit", is_flag=True, help="Keep the first and last quantized layers at 8 bits.")
@click.option(
    "--symmetry",
    type=click.Choice([s.value for s in Symmetry]),
    help="Weight grid. Default with 8-bit activations: symmetric-int8 (symmetric int8 for widths 5-8, "
    "where onnxruntime's integer kernels are fastest with it; asymmetric for 2-4 bits, never fused); "
    "asymmetric (uint + zero point) for weight-only models.",
)
@click.option(
    "--granularity",
    type=click.Choice([g.value for g in Granularity]),
    default="per-channel",
    show_default=True,
)
@click.option(
    "--block-size",
    type=click.IntRange(min=0),
    default=QuantizerConfig().block_size,
    show_default=True,
    help="Block-wise scales for 2-D MatMul / Gemm weights at 2-4 bits: one scale and zero point per "
    "N consecutive weights along the reduction axis (DequantizeLinear block_size, opset 21). "
    "0: per-channel everywhere. Conv weights and 5-8 bits stay per-channel.",
)
@click.option(
    "--scale-method",
    type=click.Choice([m.value for m in ScaleMethod]),
    default="minmax",
    show_default=True,
    help="Min-max range, or the MSE search over shrunk ranges.",
)
@click.option("--int2", is_flag=True, help="Store 2-bit weights as INT2/UINT2 (opset 25) instead of INT4.")
@click.option(
    "--pack/--no-pack",
    default=True,
    show_default=True,
    help="Store widths 2, 3, 5, 6 and 7 bit-packed at their own width (unpacked by ops onnxruntime "
    "folds at load); --no-pack stores them in INT4/INT8.",
)
@click.option(
    "--opset-upgrade/--no-opset-upgrade",
    default=True,
    show_default=True,
    help="Convert the model's opset when the integer types need it (else refuse).",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in RoundingMethod]),
    default="nearest",
    show_default=True,
    help="Weight rounding: nearest; BRECQ block reconstruction (learned AdaRound rounding; needs --calib); or "
    "GPTQ (MatMul/Gemm weights rounded row by row with second-order error compensation from each layer's "
    "calibration inputs, on the same grid; other weights nearest; needs --calib).",
)
@click.option(
    "--recon-preset",
    type=click.Choice(sorted(RECON_PRESETS)),
    default="cpu",
    show_default=True,
    help="BRECQ iterations/samples/batch: "
    + "; ".join(f"{k}: {v[0]} it, {v[1]} samples, batch {v[2]}" for k, v in RECON_PRESETS.items())
    + ".",
)
@click.option("--iters", type=click.IntRange(min=1), help="BRECQ iterations per unit (overrides the preset).")
@click.option(
    "--recon-split",
    type=click.Choice([s.value for s in IterSplit]),
    default=IterSplit.EVEN.value,
    show_default=True,
    help="BRECQ: how the iterations are split between units. even: --iters each; error: the same "
    "total, in proportion to the square root of each unit's relative nearest-rounding error "
    "(a quarter to four times --iters), which gives a MixQuant plan's narrowed units more.",
)
@click.option(
    "--recon-samples", type=click.IntRange(min=1), help="BRECQ calibration samples (overrides the preset)."
)
@click.option("--recon-batch", type=click.IntRange(min=1), help="BRECQ batch size (overrides the preset).")
@click.option(
    "--recon-granularity",
    type=click.Choice([g.value for g in ReconGranularity]),
    default="block",
    show_default=True,
    help="BRECQ units: single-entry single-exit blocks, or single layers.",
)
@click.option(
    "--fisher",
    is_flag=True,
    help="BRECQ: weight each unit's squared error by (|dKL/d output| + 1)^2, the diagonal Fisher of "
    "the reference (needs a classifier whose first output is [batch, classes] logits).",
)
@click.option(
    "--act-iters",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="BRECQ with --calib: iterations per unit learning the 8-bit activation step sizes (LSQ) "
    "after the rounding (the reference: a quarter of --iters); 0 keeps the calibrated steps.",
)
@click.option(
    "--bias-correction",
    type=click.Choice([m.value for m in BiasCorrection]),
    help="Empirical bias correction (needs --calib): add to each layer's bias the shift quantization "
    "made in its per-channel output mean on calibration samples, layer by layer ('all') or for the "
    "last layers only ('output').  [default: all with --calib, else off]",
)
@click.option(
    "--bias-samples",
    type=click.IntRange(min=1),
    default=BiasConfig().samples,
    show_default=True,
    help="Calibration samples the bias correction measures on.",
)
@click.option(
    "--calib",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Calibration data for 8-bit activations: a folder of .npy/.npz, one .npz, ONNX "
    "test_data_set folders, a folder of images (with --image-* options), or several files. Repeatable.",
)
@click.option(
    "--calib-size", type=click.IntRange(min=1), help="Use at most N calibration samples (seeded sample)."
)
@click.option(
    "--calib-method",
    type=click.Choice([m.value for m in CalibMethod]),
    help="Activation range: min/max, percentile of the histogram, or the p-norm (MSE) search. "
    "Default: percentile; minmax in attention graphs (transformers), whose outliers carry information.",
)
@click.option(
    "--percentile",
    type=float,
    default=ActivationConfig().percentile,
    show_default=True,
    help="Share of values kept inside the range with --calib-method percentile.",
)
@click.option(
    "--act-type",
    type=click.Choice(["uint8", "int8"]),
    default="uint8",
    show_default=True,
    help="Activation type: asymmetric uint8 or symmetric int8.",
)
@click.option(
    "--weight-only",
    is_flag=True,
    help="Keep activations float even with --calib (calibration data then serve the bias correction and validation).",
)
@click.option(
    "--static-activations",
    is_flag=True,
    help="With --calib, quantize activations to 8 bits in attention graphs (transformers) too, where by "
    "default they stay float: there only the inputs of 8-bit weight MatMuls get Q/DQ, which onnxruntime "
    "runs as integer kernels, at a measured accuracy cost (MiniLM-L6 W8: cosine to the FP32 embeddings "
    "0.9997 weight-only, 0.995 with them).",
)
@click.option(
    "--quantize-outputs", is_flag=True, help="Also quantize graph outputs (default: they stay float)."
)
@click.option(
    "--exclude-node",
    multiple=True,
    metavar="NAME",
    help="Keep this node's activations float (exact name or 're:REGEX'). Repeatable.",
)
@click.option(
    "--exclude-op-type",
    multiple=True,
    metavar="OP",
    help="Keep activations of every node of this op type float. Repeatable.",
)
@click.option(
    "--image-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON file with image preprocessing: resize, crop, layout, bgr, scale, mean, std.",
)
@click.option(
    "--image-resize", type=click.IntRange(min=1), help="Resize images so the short side has N pixels."
)
@click.option(
    "--image-crop", callback=parse_hw, metavar="H[xW]", help="Centre crop to H x W pixels (or H x H)."
)
@click.option(
    "--image-layout",
    type=click.Choice([m.value for m in ImageLayout]),
    help="Layout the model expects  [default: NCHW].",
)
@click.option("--bgr", is_flag=True, default=None, help="Feed BGR instead of RGB.")
@click.option(
    "--image-scale", type=float, help="Multiply pixel values (0..255) by this first  [default: 1/255]."
)
@click.option(
    "--mean",
    callback=parse_triple,
    metavar="R,G,B",
    help="Subtract per channel after scaling  [default: 0,0,0].",
)
@click.option(
    "--std",
    callback=parse_triple,
    metavar="R,G,B",
    help="Divide per channel after the mean  [default: 1,1,1].",
)
@click.option(
    "--save-preprocess",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the image preprocessing graph (ONNX) here.",
)
@click.option(
    "--samples",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Validation inputs, in any form --calib takes (with the same --image-* options): a .npz "
    "keyed by input name (optional 'labels'), a folder of .npy/.npz, ONNX test_data_set folders, a "
    "folder of images (class sub-folders give labels: sub-folder index in sorted order), or several "
    "files. Repeatable. Default with --calib: min(64, N/4) calibration samples held out (seeded).",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV of 'path,label' rows labelling the --samples files (one sample each); paths relative "
    "to the --samples folder (else to the CSV's folder). Overrides other labels.",
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
    callback=parse_pairs,
    metavar="NAME=N",
    help="Value of a symbolic input dimension for random validation samples, by dim name (batch=1) or "
    "by input and axis (pixel_values:2=224, for unnamed dims). Repeatable. Dims not given get "
    "defaults: batch 1, sequence 128, image 224, other 16.",
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
    "--device",
    type=click.Choice([d.value for d in Device]),
    default=Device.CPU.value,
    show_default=True,
    help="Where calibration, bias correction and BRECQ run. cpu: the same input and seed give a "
    "byte-identical model. cuda (an error without a usable CUDA) or auto (CUDA where onnxruntime can "
    "run it): BRECQ 3.4x faster on an H200, but the output differs in the last bits from run to run.",
)
@click.option(
    "--min-sqnr",
    type=float,
    metavar="DB",
    help="Fail (exit 3, output not written) if any output's SQNR is below DB.",
)
@click.option(
    "--max-top1-drop",
    type=float,
    metavar="POINTS",
    help="Fail (exit 3, output not written) if FP32 top-1 minus quantized top-1 exceeds POINTS "
    "(0.01; e.g. 1.0) on any run. Needs labelled samples and a classifier-like output.",
)
@click.option(
    "--min-agreement",
    type=float,
    metavar="FRACTION",
    help="Fail (exit 3, output not written) if FP32 and quantized top-1 predictions agree on less "
    "than FRACTION (e.g. 0.98) of the samples on any run. Needs real samples (--samples or --calib).",
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
    labels_path: Path | None,
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
    _check_side_outputs(
        input_model, output_model, {"--report": report_path, "--save-preprocess": opts["save_preprocess"]}
    )
    if report_path is not None and not report_path.absolute().parent.is_dir():
        raise click.BadParameter(
            f"folder {report_path.absolute().parent} does not exist", param_hint="--report"
        )
    try:
        spec = image_spec(opts)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    if opts["save_preprocess"] is not None:
        if spec is None:
            raise click.UsageError("--save-preprocess needs image preprocessing options")
        try:
            save_preprocess_model(spec, opts["save_preprocess"])
        except OSError as e:
            raise click.ClickException(f"{opts['save_preprocess']}: cannot write: {e.strerror}") from e
    bars = _StageBars(enabled=not quiet)
    try:
        report = quantize(
            input_model,
            output_model,
            cfg,
            samples_path=calib_source(opts["samples"]),
            labels_path=labels_path,
            calib=calib_source(opts["calib"]),
            image_spec=spec,
            progress=bars,
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
            raise click.ClickException(f"{report_path}: cannot write the report: {e.strerror}") from e
    text = format_text(report)
    if as_json:
        click.echo(text, err=True)
        click.echo(json.dumps(to_json(report), indent=2))
    else:
        click.echo(text)
    if report.gate_failures:
        sys.exit(EXIT_GATE)
