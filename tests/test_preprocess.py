"""Tests of onnx_mixquant.data.preprocess: the ONNX preprocessing graph, its session and the file checks.

Images are made here (PNG and BMP with NumPy + zlib; one small JPEG embedded below). Pillow is
optional: the tests that compare with it, or need it to write JPEG variants, skip without it. The
tests on real JPEGs use ../shared/bench and skip where it is absent.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_extensions
import pytest

from onnx_mixquant.config import ImageLayout, ImageSpec
from onnx_mixquant.data.preprocess import (
    EXT_DOMAIN,
    ImagePreprocessor,
    build_preprocess_model,
    save_preprocess_model,
)
from onnx_mixquant.errors import CalibrationError

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="benchmark images (../shared/bench) absent")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: 16x12 baseline JPEG (quality 95, no chroma subsampling, made once with Pillow) of
#: R = 16 * x, G = 128, B = 20 * y. Decoded it is within 4 levels of that (mean 0.6-1.3 per channel).
TINY_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAIBAQEBAQIBAQECAgICAgQDAgICAgUEBAMEBgUGBgYFBgYGBwkIBgcJBwYGCAsI"
    "CQoKCgoKBggLDAsKDAkKCgr/2wBDAQICAgICAgUDAwUKBwYHCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoK"
    "CgoKCgoKCgoKCgoKCgr/wAARCAAMABADAREAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAA"
    "AgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6"
    "Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
    "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREA"
    "AgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPE"
    "xcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDw74UeFf8AVfu/TtX53nPhJq/3f4H4F4bY"
    "/wCA+mvhR4V/1X7v07V+U5x4Sb/u/wAD/QDw2x/wHkfwo061/dfu/Sv9Zc54aym79w/zU8Nqs/c1Ppn4T6fa4iPl+lflOccN"
    "ZTr7h/oB4bVZ+5qf/9k="
)


# ------------------------------------------------------------------------------------ helpers
def png_bytes(pixels: np.ndarray, *, interlace: bool = False) -> bytes:
    """uint8 (H, W) grey, (H, W, 2) grey+alpha, (H, W, 3) RGB or (H, W, 4) RGBA -> PNG bytes."""
    img = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = img.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    if interlace:  # Adam7: seven passes of sub-images, each row with filter byte 0
        starts_steps = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2)]
        subs = [img[y0::dy, x0::dx] for y0, x0, dy, dx in [*starts_steps, (1, 0, 2, 1)]]
    else:
        subs = [img]
    raw = b"".join(b"\0" + row.tobytes() for sub in subs if sub.size for row in sub)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, colour_type, 0, 0, int(interlace)])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def bmp_bytes(rgb: np.ndarray, *, bits: int = 24, top_down: bool = False) -> bytes:
    """uint8 (H, W, 3) -> uncompressed 24-bit or 32-bit BMP (BITMAPINFOHEADER) bytes."""
    h, w, _ = rgb.shape
    px = rgb[..., ::-1]  # BGR
    if bits == 32:
        px = np.concatenate([px, np.full((h, w, 1), 255, np.uint8)], axis=2)
    rows = px if top_down else px[::-1]
    stride = (bits * w + 31) // 32 * 4
    body = np.zeros((h, stride), np.uint8)
    body[:, : w * bits // 8] = rows.reshape(h, -1)

    def le(value: int, size: int) -> bytes:
        return int(value).to_bytes(size, "little", signed=True)

    info = le(40, 4) + le(w, 4) + le(-h if top_down else h, 4) + le(1, 2) + le(bits, 2) + bytes(24)
    return b"BM" + le(54 + body.size, 4) + bytes(4) + le(54, 4) + info + body.tobytes()


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@cache
def preprocessor(spec: ImageSpec) -> ImagePreprocessor:
    return ImagePreprocessor(spec)


def reference(rgb: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The pipeline in NumPy for spec.resize None: floored centre crop, channel order, normalise."""
    x: np.ndarray = rgb.astype(np.float32)
    if spec.crop is not None:
        (h, w), (H, W) = spec.crop, x.shape[:2]
        top, left = (H - h) // 2, (W - w) // 2
        x = x[top : top + h, left : left + w]
    if spec.bgr:
        x = x[..., ::-1]
    x = x * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x.transpose(2, 0, 1) if spec.layout is ImageLayout.NCHW else x


def raw_spec(**kw: object) -> ImageSpec:
    """Pixel values as decoded: (H, W, 3) float, no normalisation."""
    return ImageSpec(scale=1.0, layout=ImageLayout.NHWC, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (11, 16, 3), dtype=np.uint8)


# -------------------------------------------------------------------------- exact PNG values
@pytest.mark.parametrize("layout", list(ImageLayout))
@pytest.mark.parametrize("bgr", [False, True])
@pytest.mark.parametrize("crop", [None, (4, 9)])
def test_png_matches_numpy_reference(tmp_path, rgb, layout, bgr, crop):
    spec = ImageSpec(crop=crop, layout=layout, bgr=bgr, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    got = preprocessor(spec)(write(tmp_path, "a.png", png_bytes(rgb)))
    want = reference(rgb, spec)
    assert got.dtype == np.float32 and got.shape == want.shape
    # the same float32 operations in the same order: equal up to the last bit in practice
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_centre_crop_offset_is_floored(tmp_path):
    """11x16 -> 4x9: (11-4)/2 = 3.5 and (16-9)/2 = 3.5; floored to 3 (torchvision rounds to 4)."""
    y, x = np.mgrid[0:11, 0:16]
    img = np.stack([y * 10, x * 10, np.zeros_like(x)], axis=-1).astype(np.uint8)
    got = preprocessor(raw_spec(crop=(4, 9)))(write(tmp_path, "ramp.png", png_bytes(img)))
    assert got.shape == (4, 9, 3)
    assert (got[0, 0, 0], got[0, 0, 1]) == (30.0, 30.0)  # top = 3, left = 3
    np.testing.assert_array_equal(got, img[3:7, 3:12].astype(np.float32))


def test_scale_only_and_defaults(tmp_path, rgb):
    got = preprocessor(ImageSpec())(write(tmp_path, "a.png", png_bytes(rgb)))
    np.testing.assert_allclose(got, rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255), rtol=1e-6)


# ------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize(
    ("hw", "size", "want"),
    [
        ((30, 50), 20, (20, 33)),  # landscape: long side floor(50 * 20 / 30) = 33
        ((50, 30), 20, (33, 20)),  # portrait
        ((24, 24), 10, (10, 10)),  # square
        ((7, 12), 16, (16, 27)),  # upscale: floor(12 * 16 / 7) = 27
        ((9, 31), 9, (9, 31)),  # short side already the size
    ],
)
def test_resize_short_side_keeps_aspect_ratio(tmp_path, hw, size, want):
    img = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = preprocessor(raw_spec(resize=size))(write(tmp_path, "a.png", png_bytes(img)))
    assert got.shape == (*want, 3)
    assert min(got.shape[:2]) == size
    long_in, long_out = max(hw), max(got.shape[:2])
    assert long_out == long_in * size // min(hw)  # torchvision's int(size * long / short)


def test_resize_to_the_same_size_is_exact(tmp_path, rgb):
    got = preprocessor(raw_spec(resize=11))(write(tmp_path, "a.png", png_bytes(rgb)))
    np.testing.assert_array_equal(got, rgb.astype(np.float32))


def test_resize_then_crop(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    spec = ImageSpec(resize=20, crop=(16, 16))
    got = preprocessor(spec)(write(tmp_path, "a.png", png_bytes(img)))
    full = preprocessor(raw_spec(resize=20))(write(tmp_path, "a.png", png_bytes(img)))
    assert got.shape == (3, 16, 16)
    want = full[2:18, 8:24].transpose(2, 0, 1) / np.float32(255)  # (20-16)//2, (33-16)//2
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(("hw", "size"), [((40, 56), 24), ((40, 56), 17), ((21, 30), 64)])
def test_resize_matches_pillow_bilinear(tmp_path, hw, size):
    """Resize(linear, antialias=1, exclude_outside=1) is Pillow's BILINEAR filter, in float."""
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = preprocessor(raw_spec(resize=size))(write(tmp_path, "a.png", png_bytes(img)))
    out_wh = (got.shape[1], got.shape[0])
    bilinear = image_mod.Resampling.BILINEAR
    per_channel = [
        np.asarray(image_mod.fromarray(img[..., c].astype(np.float32), "F").resize(out_wh, bilinear))
        for c in range(3)
    ]
    np.testing.assert_allclose(got, np.stack(per_channel, axis=-1), atol=0.01)  # measured <= 0.003
    as_uint8 = np.asarray(image_mod.fromarray(img).resize(out_wh, bilinear), np.float32)
    assert np.abs(np.round(got) - as_uint8).max() <= 1  # Pillow rounds its uint8 result
    assert np.abs(got - as_uint8).mean() < 0.5


# ------------------------------------------------------------------------ channels and formats
def test_grey_and_alpha_pngs_give_three_channels(tmp_path, rgb):
    grey = rgb[..., 0]
    for name, pixels, want in [
        ("grey.png", grey, np.repeat(grey[..., None], 3, axis=2)),
        ("grey_alpha.png", np.stack([grey, rgb[..., 1]], axis=-1), np.repeat(grey[..., None], 3, axis=2)),
        ("rgba.png", np.concatenate([rgb, rgb[..., :1]], axis=2), rgb),  # alpha is dropped
    ]:
        got = preprocessor(raw_spec())(write(tmp_path, name, png_bytes(pixels)))
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=name)


@pytest.mark.parametrize(("bits", "top_down"), [(24, False), (32, True), (24, True)])
def test_bmp_is_read(tmp_path, bits, top_down):
    img = np.random.default_rng(4).integers(0, 256, (7, 13, 3), dtype=np.uint8)  # odd width: row padding
    got = preprocessor(raw_spec())(write(tmp_path, "a.bmp", bmp_bytes(img, bits=bits, top_down=top_down)))
    np.testing.assert_array_equal(got, img.astype(np.float32))


def test_jpeg_is_decoded_as_rgb(tmp_path):
    got = preprocessor(raw_spec())(write(tmp_path, "tiny.jpg", TINY_JPEG))
    y, x = np.mgrid[0:12, 0:16]
    want = np.stack([x * 16, np.full_like(x, 128), y * 20], axis=-1).astype(np.float32)
    assert got.shape == (12, 16, 3)
    assert np.abs(got - want).mean(axis=(0, 1)).max() < 2  # JPEG loss (quality 95): 0.6-1.3 levels
    bgr = preprocessor(raw_spec(bgr=True))(write(tmp_path, "tiny.jpg", TINY_JPEG))
    np.testing.assert_array_equal(bgr, got[..., ::-1])


def test_pillow_made_jpeg_variants(tmp_path):
    """Greyscale (one channel in libjpeg) gives three; progressive decodes like Pillow; CMYK is refused."""
    image_mod = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    pil = image_mod.fromarray(img)
    pil.convert("L").save(tmp_path / "grey.jpg", quality=90)
    pil.save(tmp_path / "progressive.jpg", quality=90, progressive=True, subsampling=0)
    pil.convert("CMYK").save(tmp_path / "cmyk.jpg")
    # no chroma subsampling, so no upsampling difference: greyscale is bit-identical to Pillow's
    # decoding; the progressive one differs by 1 level in 1 pixel of 960 (rounding in libjpeg 9e)
    for name, tolerance in (("grey.jpg", 0), ("progressive.jpg", 1)):
        got = preprocessor(raw_spec())(tmp_path / name)
        want = np.asarray(image_mod.open(tmp_path / name).convert("RGB"), np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=name)
    with pytest.raises(CalibrationError, match=r"cmyk\.jpg.*4 colour components"):
        preprocessor(raw_spec())(tmp_path / "cmyk.jpg")


# --------------------------------------------------------------------------------- bad files
def _bad_files(folder: Path, rgb: np.ndarray) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected phrase in the CalibrationError message)."""
    png = png_bytes(rgb)
    bmp = bmp_bytes(rgb)
    idat = png.index(b"IDAT") + 10  # a byte inside the compressed data: the chunk's CRC fails
    cases = {
        "missing": (folder / "missing.jpg", "cannot be read"),
        "folder": (folder, "cannot be read"),
        "empty": (write(folder, "empty.png", b""), "empty file"),
        "text": (write(folder, "text.jpg", b"this is not an image\n"), "not a JPEG, PNG or BMP"),
        "gif": (write(folder, "a.jpg", b"GIF89a" + bytes(40)), "not a JPEG, PNG or BMP"),
        "png_truncated": (write(folder, "cut.png", png[: len(png) // 2]), "cannot be decoded"),
        "png_bad_crc": (write(folder, "crc.png", png[:idat] + b"\0" + png[idat + 1 :]), "cannot be decoded"),
        "png_interlaced": (write(folder, "adam7.png", png_bytes(rgb, interlace=True)), "interlaced PNG"),
        "bmp_1bit": (write(folder, "a.bmp", bmp[:28] + b"\x01\x00" + bmp[30:]), "1-bit"),
        "bmp_truncated": (write(folder, "cut.bmp", bmp[:100]), "truncated or corrupt BMP"),
    }
    return cases


def test_bad_files_raise_calibration_error_naming_the_file(tmp_path, rgb):
    for name, (path, phrase) in _bad_files(tmp_path, rgb).items():
        with pytest.raises(CalibrationError) as info:
            preprocessor(raw_spec())(path)
        assert str(path) in str(info.value) and phrase in str(info.value), (name, str(info.value))


def _bad_jpegs() -> dict[str, bytes]:
    """JPEGs that end the process (libjpeg's error exit) or hang it unless refused beforehand."""
    sof, dht, sos = TINY_JPEG.index(b"\xff\xc0"), TINY_JPEG.index(b"\xff\xc4"), TINY_JPEG.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(TINY_JPEG[sos + 2 : sos + 4], "big")  # first entropy-coded byte
    j = bytearray(TINY_JPEG)
    twelve_bit, bad_huffman = bytearray(j), bytearray(j)
    twelve_bit[sof + 4] = 12
    bad_huffman[dht + 5] = 3  # three 1-bit codes cannot exist
    return {
        "header_cut.jpg": TINY_JPEG[:sof],  # "Improper call to JPEG library": exit(1)
        "scan_cut.jpg": TINY_JPEG[: scan + 40],  # jpeg_read_scanlines never ends
        "only_soi.jpg": TINY_JPEG[:2],
        "twelve_bit.jpg": bytes(twelve_bit),
        "bad_huffman.jpg": bytes(bad_huffman),
        "marker_in_data.jpg": TINY_JPEG[: scan + 10] + b"\xff\x6c" + TINY_JPEG[scan + 10 :],
        "text.jpg": b"<html>404 Not Found</html>\n",
    }


def test_corrupt_jpegs_raise_instead_of_ending_the_process(tmp_path):
    """Run in a child process: a regression would kill (or hang) it, not the test session."""
    paths = [write(tmp_path, name, data) for name, data in _bad_jpegs().items()]
    child = textwrap.dedent(
        """
        import sys
        from onnx_mixquant.config import ImageSpec
        from onnx_mixquant.errors import CalibrationError
        from onnx_mixquant.data.preprocess import ImagePreprocessor
        run = ImagePreprocessor(ImageSpec())
        for path in sys.argv[1:]:
            try:
                run(path)
                print("decoded", path)
            except CalibrationError as e:
                print("refused", e)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", child, *map(str, paths)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths), done.stdout
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith("refused") and str(path) in line and "cannot be decoded" in line, line


def test_image_smaller_than_crop(tmp_path, rgb):
    with pytest.raises(CalibrationError, match=r"small\.png.*smaller than the 12x12 crop.*11x12"):
        preprocessor(ImageSpec(crop=(12, 12)))(write(tmp_path, "small.png", png_bytes(rgb)))


# ---------------------------------------------------------------------------- saved graph
def test_saved_graph_is_valid_and_gives_the_same_output(tmp_path, rgb):
    spec = ImageSpec(resize=14, crop=(8, 10), bgr=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    target = tmp_path / "pre.onnx"
    target.write_bytes(b"old content")  # replaced atomically
    save_preprocess_model(spec, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pre.onnx"]  # no temporary file left
    model = onnx.load(target)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, EXT_DOMAIN: 1}
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["pixels"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(target), sess_options=so, providers=["CPUExecutionProvider"])
    for name, data in [("a.png", png_bytes(rgb)), ("tiny.jpg", TINY_JPEG)]:
        path = write(tmp_path, name, data)
        (pixels,) = session.run(None, {"image": np.frombuffer(data, np.uint8)})
        assert pixels.shape == (1, 3, 8, 10)
        np.testing.assert_array_equal(pixels[0], preprocessor(spec)(path))


def test_save_into_a_missing_folder_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        save_preprocess_model(ImageSpec(), tmp_path / "no" / "pre.onnx")


def test_graph_ops():
    plain = build_preprocess_model(ImageSpec())
    ops = [n.op_type for n in plain.graph]
    assert ops == ["DecodeImage", "Cast", "Expand", "Mul", "Transpose", "Unsqueeze"]
    full = build_preprocess_model(ImageSpec(resize=8, crop=(4, 4), bgr=True, layout=ImageLayout.NHWC))
    ops = [n.op_type for n in full.graph]
    assert "Gather" in ops and "Transpose" not in ops
    (resize,) = [n for n in full.graph if n.op_type == "Resize"]
    assert resize.attributes["antialias"].as_int() == 1 and resize.attributes["mode"].as_string() == "linear"


# ----------------------------------------------------------- real images (../shared/bench)
@needs_bench
def test_cifar_jpegs_against_pillow():
    """20 CIFAR-10 test JPEGs (32x32, 4:2:0) against Pillow's decoding.

    DecodeImage uses IJG libjpeg 9e, Pillow libjpeg-turbo: they upsample the subsampled chroma
    differently (libjpeg 9 by DCT scaling, turbo by a triangle filter). Measured on these 20: mean
    |diff| 0.73 grey levels (per image at most 3.1), max 44 at sharp colour edges; the luma
    (BT.601) differs by 0.13 levels on average (per image at most 0.32). On 500 random CIFAR
    images: 0.71 overall, per image at most 4.7, luma per image at most 0.47. Without chroma
    subsampling the two agree (test_pillow_made_jpeg_variants).
    """
    image_mod = pytest.importorskip("PIL.Image")
    files = sorted((BENCH / "data" / "cifar10" / "eval").glob("*/*.jpg"))[:20]
    assert len(files) == 20
    run = preprocessor(raw_spec())
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    means = []
    for f in files:
        got = run(f)
        want = np.asarray(image_mod.open(f).convert("RGB"), np.float32)
        assert got.shape == want.shape == (32, 32, 3)
        means.append(np.abs(got - want).mean())
        assert means[-1] < 4.0, f
        assert np.abs(got @ luma - want @ luma).mean() < 0.5, f  # same image, chroma aside
    assert np.mean(means) < 1.0


@needs_bench
def test_imagenet_jpegs_against_pillow_reference():
    """5 ImageNet eval images (256 px short side): floored 224 crop, (x - 127) / 128, NCHW.

    Same decoder difference as for CIFAR (1 grey level = 1/128 here): measured mean |diff| 0.15-0.62
    levels per image (0.0012-0.0048), max 9-29 levels (0.07-0.23) at sharp colour edges.
    """
    image_mod = pytest.importorskip("PIL.Image")
    files = sorted((BENCH / "data" / "imagenet" / "eval").glob("*.JPEG"))[:5]
    spec = ImageSpec(crop=(224, 224), scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3)
    run = preprocessor(spec)
    for f in files:
        got = run(f)
        want = reference(np.asarray(image_mod.open(f).convert("RGB")), spec)
        assert got.shape == want.shape == (3, 224, 224)
        assert np.abs(got - want).mean() < 1.0 / 128, f  # under 1 grey level on average
