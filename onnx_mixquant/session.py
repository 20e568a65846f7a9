"""onnxruntime sessions: which providers work here, which ones compute the output, opening one.

onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot run (no GPU, missing CUDA
libraries) and then falls back to the CPU with an error log, so :func:`available_providers` probes
CUDA once per process by running a tiny Conv (so cuDNN loads too), onnxruntime's logger silenced,
and once more after ``onnxruntime.preload_dlls()`` where the first try failed. The stages whose
results go into the output model (calibration, bias correction, BRECQ) take their providers from
:func:`compute_providers`, which follows ``QuantConfig.device`` through :func:`compute_on` (the
pipeline wraps a run in it) and is the CPU alone by default; :func:`with_cuda_options` sets up
their CUDA sessions. :func:`open_session` opens a model file on one provider (CPU as fallback) at
an explicit graph optimisation level, for validation.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_mixquant.config import Device
from onnx_mixquant.errors import ConfigError

__all__ = [
    "CPU",
    "CUDA",
    "available_providers",
    "compute_on",
    "compute_providers",
    "first_line",
    "open_session",
    "with_cuda_options",
]

logger = logging.getLogger(__name__)

#: onnxruntime provider names.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: onnxruntime's default logger severity (WARNING). The Python API has no getter, so the CUDA
#: probe restores this value after silencing the logger.
_ORT_DEFAULT_SEVERITY = 2
_ORT_FATAL = 4
#: CUDA provider options of :func:`with_cuda_options`: cuDNN picks each convolution's algorithm by
#: its heuristics instead of onnxruntime's default exhaustive search, which times the candidates in
#: every new session (measured on an H200, ResNet-20 `cpu-fast`: BRECQ 19 s instead of 24 s).
CUDA_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}
#: False: :func:`with_cuda_options` leaves onnxruntime's CUDA defaults (dev tools time the difference).
USE_CUDA_OPTIONS = True


def _probe_model_bytes() -> bytes:
    """A 1x1 Conv of a 1x1 image. Opening a session on it loads the CUDA provider library (cuBLAS,
    cudart); running it loads cuDNN, which onnxruntime opens only at the first convolution."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 1, 1, 1]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 1, 1, 1]))
    w.const_value = ir.tensor(np.full((1, 1, 1, 1), 2.0, np.float32), name="w")
    node = ir.node("Conv", inputs=[x, w])
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 1, 1, 1])
    graph = ir.Graph(
        inputs=[x], outputs=[y], nodes=[node], initializers=[w], opset_imports={"": 13}, name="probe"
    )
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()


@contextlib.contextmanager
def _prints_to_debug_log(what: str) -> Iterator[None]:
    """What onnxruntime's Python code ``print``s within the block goes to the debug log (one line,
    labelled ``what``) instead of the user's stdout."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        if text := printed.getvalue().strip():
            logger.debug("%s: %s", what, " | ".join(text.splitlines()))


def _cuda_runs() -> bool:
    """Open and run the probe model on CUDA alone; True when CUDA computed its output.

    Where the CUDA provider loads but finds no device (``CUDA_VISIBLE_DEVICES=``), onnxruntime's
    Python API prints an "EP Error ... Falling back to CPUExecutionProvider" banner to stdout and
    opens the session on the CPU; that text goes to the debug log instead.
    """
    so = ort.SessionOptions()
    so.log_severity_level = _ORT_FATAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        with _prints_to_debug_log("CUDA probe, onnxruntime printed"):
            sess = ort.InferenceSession(_probe_model_bytes(), sess_options=so, providers=[CUDA])
        if sess.get_providers()[0] != CUDA:
            logger.debug("CUDA probe: session runs on %s", sess.get_providers())
            return False
        (y,) = sess.run(None, {"x": np.full((1, 1, 1, 1), 3.0, np.float32)})
    except Exception as e:  # any failure to open or run the probe means no CUDA
        logger.debug("CUDA probe failed: %s", first_line(e))
        return False
    logger.debug("CUDA probe: Conv ran on CUDA, output %s", np.ravel(y))
    return bool(np.ravel(y)[0] == 6.0)


def _preload_cuda_libraries() -> None:
    """``onnxruntime.preload_dlls()``: load CUDA and cuDNN from pip's ``nvidia-*`` wheels (those
    ``onnxruntime-gpu[cuda,cudnn]`` or PyTorch installed) when they are not on the loader's path.
    It reports what it could not load with ``print``; that goes to the debug log instead."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21
        return
    with _prints_to_debug_log("onnxruntime.preload_dlls()"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload()
        except Exception as e:  # a failed preload only means the probe fails again
            logger.debug("onnxruntime.preload_dlls() failed: %s", first_line(e))


@functools.cache
def _cuda_works() -> bool:
    """Open and run a tiny Conv on CUDA, onnxruntime's logger silenced; True when CUDA really runs it.

    When the first try fails (CUDA or cuDNN not on the loader's path), onnxruntime's
    ``preload_dlls`` loads them from pip's ``nvidia-*`` wheels, where present, and the probe runs
    once more. The "cannot load libcublasLt" error is written by onnxruntime's *default* logger
    while loading the provider library, so SessionOptions.log_severity_level alone does not
    silence it; the default severity is raised to FATAL for the probe and reset to onnxruntime's
    default after (the Python API offers no getter to restore a user-set value).
    """
    if CUDA not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        if _cuda_runs():
            return True
        _preload_cuda_libraries()
        return _cuda_runs()
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


#: An ``ort.InferenceSession`` providers list: names, or (name, options) pairs.
ProviderList = list[str | tuple[str, dict[str, str]]]


def with_cuda_options(providers: Sequence[str], so: ort.SessionOptions) -> ProviderList:
    """``providers`` for ``ort.InferenceSession``, with :data:`CUDA_OPTIONS` for CUDA and
    ``so.use_deterministic_compute`` (onnxruntime's deterministic kernels where it has them) when
    CUDA is among them. A CPU-only list comes back as it is, ``so`` untouched.

    Even so, two CUDA runs of the same command gave different output models (H200, BENCHMARKS.md),
    which is why ``QuantConfig.device`` is CPU unless asked otherwise.
    """
    if not USE_CUDA_OPTIONS or CUDA not in providers:
        return list(providers)
    so.use_deterministic_compute = True
    return [(p, dict(CUDA_OPTIONS)) if p == CUDA else p for p in providers]


def available_providers(try_cuda: bool) -> tuple[str, ...]:
    """Providers that actually work here: probes CUDA once, quietly (onnxruntime-gpu lists it
    even on CPU-only machines and falls back with an error log); always ends with
    CPUExecutionProvider."""
    providers = (CUDA, CPU) if try_cuda and _cuda_works() else (CPU,)
    logger.debug("onnxruntime providers: %s", ", ".join(providers))
    return providers


#: The device of the enclosing :func:`compute_on` (CPU outside one).
_COMPUTE: ContextVar[Device] = ContextVar("onnx_mixquant_compute", default=Device.CPU)


@contextlib.contextmanager
def compute_on(device: Device) -> Iterator[None]:
    """Within the block, :func:`compute_providers` follows ``device`` (``QuantConfig.device``).

    Raises:
        ConfigError: ``Device.CUDA`` where onnxruntime cannot run CUDA (no onnxruntime-gpu, no GPU,
            or CUDA/cuDNN not loadable).
    """
    if device is Device.CUDA and not _cuda_works():
        raise ConfigError(
            "device 'cuda': onnxruntime cannot run CUDA here "
            f"(providers {', '.join(ort.get_available_providers())}; it needs onnxruntime-gpu, an NVIDIA "
            "GPU and the CUDA and cuDNN libraries); use device 'cpu', or 'auto' to fall back to the CPU"
        )
    token = _COMPUTE.set(device)
    try:
        yield
    finally:
        _COMPUTE.reset(token)


def compute_providers() -> tuple[str, ...]:
    """The providers for the stages whose results go into the output model: the CPU alone, unless
    the enclosing :func:`compute_on` asked for CUDA or auto (then CUDA first where it works)."""
    return available_providers(_COMPUTE.get() is not Device.CPU)


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
