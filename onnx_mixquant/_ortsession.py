"""onnxruntime sessions for :mod:`onnx_mixquant.validate`: which providers work here, and opening one.

onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot run (no GPU, missing CUDA
libraries) and then falls back to the CPU with an error log, so :func:`available_providers` probes
CUDA once per process with a tiny model, onnxruntime's logger silenced. :func:`open_session` opens a
model file on one provider (CPU as fallback) at an explicit graph optimisation level.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

__all__ = ["CPU", "CUDA", "available_providers", "first_line", "open_session"]

logger = logging.getLogger(__name__)

#: onnxruntime provider names.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: onnxruntime's default logger severity (WARNING). The Python API has no getter, so the CUDA
#: probe restores this value after silencing the logger.
_ORT_DEFAULT_SEVERITY = 2
_ORT_FATAL = 4


def _identity_model_bytes() -> bytes:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.node("Identity", inputs=[x])
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([1])
    graph = ir.Graph(inputs=[x], outputs=[y], nodes=[node], opset_imports={"": 13}, name="probe")
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()


@functools.cache
def _cuda_works() -> bool:
    """Open a tiny session on CUDA, onnxruntime's logger silenced; True when CUDA really runs it.

    The "cannot load libcublasLt" error is written by onnxruntime's *default* logger while loading
    the provider library, so SessionOptions.log_severity_level alone does not silence it; the
    default severity is raised to FATAL for the probe and reset to onnxruntime's default after
    (the Python API offers no getter to restore a user-set value).
    """
    if CUDA not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = _ORT_FATAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        sess = ort.InferenceSession(_identity_model_bytes(), sess_options=so, providers=[CUDA])
        logger.debug("CUDA probe: session runs on %s", sess.get_providers())
        return sess.get_providers()[0] == CUDA
    except Exception as e:  # any failure to open the probe means no CUDA
        logger.debug("CUDA probe failed: %s", e)
        return False
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def available_providers(try_cuda: bool) -> tuple[str, ...]:
    """Providers that actually work here: probes CUDA once, quietly (onnxruntime-gpu lists it
    even on CPU-only machines and falls back with an error log); always ends with
    CPUExecutionProvider."""
    providers = (CUDA, CPU) if try_cuda and _cuda_works() else (CPU,)
    logger.debug("onnxruntime providers: %s", ", ".join(providers))
    return providers


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_session(
    path: Path, provider: str, level_name: str, level: ort.GraphOptimizationLevel
) -> ort.InferenceSession:
    """Session from the path (so external data next to the file load); raises the bare ORT error."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3  # errors only: CUDA's "nodes placed on CPU" warnings are expected
    chain = [provider] if provider == CPU else [provider, CPU]
    sess = ort.InferenceSession(str(path), sess_options=so, providers=chain)
    if (got := sess.get_providers())[0] != provider:
        logger.warning("%s: asked for %s at %s, got %s", path, provider, level_name, got)
    return sess
