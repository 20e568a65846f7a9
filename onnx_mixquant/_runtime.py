"""Which onnxruntime flavour is installed: the package needs one, and installs neither by itself.

Following the convention of optimum and rembg, onnxruntime comes from an extra: ``[cpu]``
(``onnxruntime``) or ``[gpu]`` (``onnxruntime-gpu``), never both (both install the same
``onnxruntime`` module and overwrite each other's files), and a plain install never replaces the
flavour the user already has.
"""

from __future__ import annotations

import importlib.util

__all__ = ["MISSING_ONNXRUNTIME", "onnxruntime_missing"]

MISSING_ONNXRUNTIME = (
    "onnx-mixquant needs onnxruntime, and neither flavour is installed: "
    "pip install 'onnx-mixquant[cpu]' (onnxruntime) or 'onnx-mixquant[gpu]' (onnxruntime-gpu; "
    "it also runs on the CPU). Keep one of the two: both provide the same module."
)


def onnxruntime_missing() -> bool:
    """True when no onnxruntime flavour can be imported."""
    return importlib.util.find_spec("onnxruntime") is None
