"""Image preprocessing as an ONNX graph run by onnxruntime (custom ops from onnxruntime-extensions).

decode (jpg/png/...) -> RGB or BGR -> resize short side -> centre crop -> x * scale -> (x - mean) / std
-> NCHW or NHWC float32. The same graph can be saved for deployment (``save_preprocess_model``).

The graph (opset 18) is::

    image uint8[num_bytes]                      the encoded file
    DecodeImage {color_space="rgb"}             onnxruntime-extensions -> uint8 (H, W, C), C = 3
                                                (1 for a greyscale JPEG)
    Cast float
    Resize linear, antialias, half_pixel        only with spec.resize: short side -> resize, long
                                                side -> floor(long * resize / short) (torchvision)
    Slice                                       only with spec.crop: top = (H - h) // 2, floored
    Expand (H, W, 1) -> (H, W, 3)               greyscale JPEG -> three equal channels
    Gather [2, 1, 0] on the channel axis        only with spec.bgr
    Mul scale, Sub mean, Div std                mean/std in the output channel order
    Transpose (2, 0, 1) for NCHW, Unsqueeze 0   -> pixels float32 (1, 3, H, W) or (1, H, W, 3)

Resize with ``antialias=1, exclude_outside=1`` is Pillow's BILINEAR filter computed in float: on
ImageNet images downscaled from 256 px to 224/160/100 px and upscaled to 300/512 px it is within
0.003 grey levels of Pillow's resize of float ("F") images, and within 1 level (0.3 on average) of
Pillow's uint8 resize, which rounds. Without antialias the difference reaches 20-67 levels.

DecodeImage (onnxruntime-extensions 0.15 on Linux: IJG libjpeg 9e, libpng 1.6) decodes JPEG and
PNG only, and ignores EXIF orientation (as Pillow's Image.open does). JPEGs without chroma
subsampling decode like Pillow (libjpeg-turbo); 4:2:0 and 4:2:2 ones differ in the chroma
upsampling: 0.4-0.7 grey levels on average on the benchmark images, up to 76 at sharp colour
edges, luma 0.14 on average. libjpeg runs with its default error handler, which ends the whole
process on a malformed JPEG and loops forever on one truncated in its image data, and interlaced
PNGs come out scrambled; so the bytes are checked in Python first (``_imagefile.py``, 0.1 ms
a file): every JPEG marker up to end-of-image, and the frame, scan and table headers as libjpeg
checks them; PNG not interlaced. BMP (uncompressed 8/24/32-bit) is decoded with NumPy and handed
to the graph as PNG; a saved graph does not read BMP. With the checks, none of 4,600 randomly
corrupted or truncated JPEGs stopped or hung the process (each gave pixels or CalibrationError),
but a file crafted to pass them can still do so.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxruntime_extensions

from onnx_mixquant.config import ImageLayout, ImageSpec
from onnx_mixquant.data._imagefile import _checked_bytes
from onnx_mixquant.errors import CalibrationError

__all__ = ["IMAGE_SUFFIXES", "ImagePreprocessor", "build_preprocess_model", "save_preprocess_model"]

logger = logging.getLogger(__name__)

#: File suffixes (lower case) treated as images in a calibration folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")

#: onnxruntime-extensions registers DecodeImage in this domain (not "ai.onnx.contrib", which holds
#: its older ops: a DecodeImage node there is "not a registered function/op").
EXT_DOMAIN = "com.microsoft.extensions"
_OPSET = 18  # Resize antialias and axes
_IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13, 1.20 up to 10
#: Preprocessing is decode + resize: nothing for the optimiser to fuse; BASIC keeps the arithmetic
#: exactly as written (and equal to a NumPy reference).
OPTIMIZATION_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def build_preprocess_model(spec: ImageSpec) -> ir.Model:
    """The preprocessing graph: input ``image`` (uint8[num_bytes], an encoded file), output
    ``pixels`` float32 of shape (1, C, H, W) for NCHW or (1, H, W, C) for NHWC.

    Args:
        spec: resize, crop, channel order, scale, mean/std and layout (see the module docstring).

    Returns:
        A new model (opset 18 and ``com.microsoft.extensions`` 1); it needs onnxruntime-extensions'
        custom-op library to run.
    """
    tape = ir.tape.Tape()
    image = ir.val("image", ir.DataType.UINT8, ["num_bytes"])
    x = _op(tape, "DecodeImage", [image], "decoded", {"color_space": "rgb"}, domain=EXT_DOMAIN)
    x = _op(tape, "Cast", [x], "as_float", {"to": ir.DataType.FLOAT})
    if spec.resize is not None:
        x = _resize_short_side(tape, x, spec.resize)
    if spec.crop is not None:
        x = _centre_crop(tape, x, spec.crop)
    x = _op(tape, "Expand", [x, _const(tape, "three_channels", [1, 1, 3])], "rgb")
    if spec.bgr:
        x = _op(tape, "Gather", [x, _const(tape, "bgr_order", [2, 1, 0])], "bgr", {"axis": 2})
    x = _normalise(tape, x, spec)
    pixels = _to_layout(tape, x, spec.layout)
    pixels.dtype = ir.DataType.FLOAT
    h, w = spec.crop if spec.crop is not None else ("height", "width")
    pixels.shape = ir.Shape([1, 3, h, w] if spec.layout is ImageLayout.NCHW else [1, h, w, 3])
    graph = ir.Graph(
        [image],
        [pixels],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": _OPSET, EXT_DOMAIN: 1},
        name="onnx_mixquant_preprocess",
    )
    return ir.Model(graph, ir_version=_IR_VERSION, producer_name="onnx_mixquant", doc_string=repr(spec))


def _op(
    tape: ir.tape.Tape,
    op_type: str,
    inputs: list[ir.Value | None],
    name: str,
    attributes: dict[str, ir.DataType | int | str | list[int]] | None = None,
    *,
    domain: str = "",
) -> ir.Value:
    return tape.op(op_type, inputs, attributes, domain=domain, name=name, output=ir.val(name))


def _const(tape: ir.tape.Tape, name: str, values: list[int] | list[float]) -> ir.Value:
    dtype = np.float32 if isinstance(values[0], float) else np.int64
    return tape.initializer(ir.tensor(np.asarray(values, dtype=dtype), name=name))


def _resize_short_side(tape: ir.tape.Tape, x: ir.Value, size: int) -> ir.Value:
    """(H, W, C) -> (H', W', C) with min(H', W') = size and the other side floor(side * size / short)."""
    hw = _op(tape, "Shape", [x], "size_in", {"start": 0, "end": 2})
    short = _op(tape, "ReduceMin", [hw], "short_side", {"keepdims": 1})
    scaled = _op(tape, "Mul", [hw, _const(tape, "resize_to", [size])], "size_times_target")
    sizes = _op(tape, "Div", [scaled, short], "size_out")  # int64: floors; short side -> size exactly
    attrs: dict[str, ir.DataType | int | str | list[int]] = {
        "mode": "linear",
        "antialias": 1,
        "exclude_outside": 1,  # renormalise the filter at the borders, as Pillow does
        "coordinate_transformation_mode": "half_pixel",
        "axes": [0, 1],
    }
    return _op(tape, "Resize", [x, None, None, sizes], "resized", attrs)


def _centre_crop(tape: ir.tape.Tape, x: ir.Value, crop: tuple[int, int]) -> ir.Value:
    """(H, W, C) -> (h, w, C) from top = (H - h) // 2, left = (W - w) // 2; a side shorter than the
    crop is kept whole (ImagePreprocessor reports it)."""
    hw = _op(tape, "Shape", [x], "size_before_crop", {"start": 0, "end": 2})
    size = _const(tape, "crop_size", list(crop))
    margin = _op(tape, "Sub", [hw, size], "crop_margin")
    margin = _op(tape, "Max", [margin, _const(tape, "zero", [0])], "crop_margin_clipped")
    starts = _op(tape, "Div", [margin, _const(tape, "two", [2])], "crop_start")  # floored
    ends = _op(tape, "Add", [starts, size], "crop_end")
    return _op(tape, "Slice", [x, starts, ends, _const(tape, "crop_axes", [0, 1])], "cropped")


def _normalise(tape: ir.tape.Tape, x: ir.Value, spec: ImageSpec) -> ir.Value:
    """x * scale, then (x - mean) / std on the last (channel) axis; no-op steps are left out."""
    if spec.scale != 1.0:
        x = _op(tape, "Mul", [x, _const(tape, "scale", [float(spec.scale)])], "scaled")
    if any(m != 0.0 for m in spec.mean):
        x = _op(tape, "Sub", [x, _const(tape, "mean", [float(m) for m in spec.mean])], "centred")
    if any(s != 1.0 for s in spec.std):
        x = _op(tape, "Div", [x, _const(tape, "std", [float(s) for s in spec.std])], "normalised")
    return x


def _to_layout(tape: ir.tape.Tape, x: ir.Value, layout: ImageLayout) -> ir.Value:
    if layout is ImageLayout.NCHW:
        x = _op(tape, "Transpose", [x], "chw", {"perm": [2, 0, 1]})
    return _op(tape, "Unsqueeze", [x, _const(tape, "batch_axis", [0])], "pixels")


def save_preprocess_model(spec: ImageSpec, path: str | Path) -> None:
    """Write the preprocessing graph to ``path`` (atomically).

    The graph is written to a temporary file in the target folder, then renamed over ``path``, so
    a reader never sees a half-written file and a failure leaves an existing file unchanged.

    Raises:
        OSError: the folder does not exist or cannot be written.
    """
    path = Path(path)
    model = build_preprocess_model(spec)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    os.close(fd)
    try:
        ir.save(model, tmp, format="protobuf")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved the image preprocessing graph to %s", path)


class ImagePreprocessor:
    """Runs the preprocessing graph in onnxruntime, one image file at a time.

    Attributes:
        spec: the preprocessing.
        model: the graph the session runs (as :func:`build_preprocess_model` returns it).
        optimization_level: the session's onnxruntime graph optimisation level.
    """

    def __init__(self, spec: ImageSpec) -> None:
        """Build the graph and its CPU session.

        Raises:
            CalibrationError: onnxruntime cannot load the graph (onnxruntime-extensions missing or
                too old to have DecodeImage).
        """
        self.spec = spec
        self.model = build_preprocess_model(spec)
        self.optimization_level = OPTIMIZATION_LEVEL
        so = ort.SessionOptions()
        so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
        so.graph_optimization_level = self.optimization_level
        so.intra_op_num_threads = 1  # one small image: a thread pool only adds overhead (2x slower)
        try:
            self._session = ort.InferenceSession(
                ir.to_proto(self.model).SerializeToString(),
                sess_options=so,
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime's errors share no base class but Exception
            raise CalibrationError(
                f"onnxruntime cannot load the image preprocessing graph (it needs onnxruntime-extensions "
                f"with DecodeImage in domain {EXT_DOMAIN!r}): {e}"
            ) from e
        logger.debug("image preprocessing session ready: %s", spec)

    def __call__(self, path: Path) -> np.ndarray:
        """One image file -> float32 array (C, H, W) or (H, W, C), no batch axis.

        Raises:
            CalibrationError: the file cannot be read or decoded (the message names it), or it is
                smaller than the crop.
        """
        path = Path(path)
        encoded = _checked_bytes(path)
        try:
            (pixels,) = self._session.run(["pixels"], {"image": encoded})
        except Exception as e:  # onnxruntime's errors share no base class but Exception
            reason = str(e).rpartition("Status Message: ")[2]  # drop onnxruntime's prefix
            raise CalibrationError(f"image {str(path)!r} cannot be decoded: {reason}") from e
        if self.spec.crop is not None:
            hw = pixels.shape[2:] if self.spec.layout is ImageLayout.NCHW else pixels.shape[1:3]
            if tuple(hw) != tuple(self.spec.crop):
                after = " after resizing" if self.spec.resize is not None else ""
                raise CalibrationError(
                    f"image {str(path)!r} is smaller than the {self.spec.crop[0]}x{self.spec.crop[1]} "
                    f"crop (height x width){after}: only {hw[0]}x{hw[1]} pixels are left"
                )
        return np.asarray(pixels[0], dtype=np.float32)
