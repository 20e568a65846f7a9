"""Pieces both reconstruction stages share: Adam, the on-disk sample cache, tensor runs."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_mixquant.config import ReconConfig
from onnx_mixquant.rounding.reconstruct.adaround import UnitProgram
from onnx_mixquant.session import with_cuda_options

__all__ = [
    "HELD_OUT",
    "Adam",
    "Cache",
    "Eta",
    "ReconProgress",
    "Run",
    "cache_inputs",
    "held_out_error",
    "run_tensor",
    "set_weight",
    "softmax",
    "training_count",
]

#: progress(stage, done, total, info): info carries the loss, iterations per second and the time
#: the stage has left.
ReconProgress = Callable[[str, int, int, str], None]

#: No estimate of the time left before this share of the work is done (the first unit's caching
#: and graph building would dominate it).
_ETA_MIN_SHARE = 0.02


@dataclass
class Eta:
    """Time left in a stage of ``total`` units of work (iterations), from the rate so far: all the
    time since the start (sample caching and graph building included) over the work done.
    ``finished``: the work of the parts (units) already done."""

    total: int
    clock: Callable[[], float] = time.perf_counter
    finished: int = 0
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self, current: int = 0) -> str:
        """E.g. "about 12 min left" with ``current`` units of work done in the running part; ""
        before a first estimate is possible or once all is done."""
        done = self.finished + current
        if self.total <= 0 or done < _ETA_MIN_SHARE * self.total or done >= self.total:
            return ""
        seconds = (self.clock() - self.start) * (self.total - done) / done
        if seconds < 90:
            return f"about {max(1, round(seconds))} s left"
        if seconds < 5400:
            return f"about {round(seconds / 60)} min left"
        return f"about {seconds / 3600:.1f} h left"


#: At most this many samples are held out of training to check a unit's result (a quarter of them
#: when there are fewer than 256).
HELD_OUT = 64


def training_count(n: int, batch: int) -> int:
    """How many of ``n`` samples (the first ones) a unit trains on; the rest, at least one batch, are
    held out. All ``n`` when there are too few to spare a batch (then the check reuses them)."""
    held = min(HELD_OUT, n // 4)
    return n - held if held >= batch and n - held >= batch else n


class Adam:
    """Adam (Kingma & Ba) on a dict of arrays, in place."""

    def __init__(self, params: Mapping[str, np.ndarray], lr: float) -> None:
        self.lr, self.t = lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        corr = math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for k, g in grads.items():
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            params[k] -= self.lr * corr * self.m[k] / (np.sqrt(self.v[k]) + eps)


class Cache:
    """Arrays of all calibration samples, memory-mapped in a temporary folder."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-mixquant-recon-")
        self._n = 0

    def new(self, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        self._n += 1
        path = Path(self._dir.name) / f"a{self._n}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> None:
        self._dir.cleanup()


def _session(model: ir.Model, outputs: Sequence[str], provider: str) -> ort.InferenceSession:
    """A session of ``model`` with ``outputs`` exposed as graph outputs (on a copy)."""
    copy = model.clone()
    values = {v.name: v for n in copy.graph for v in n.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    existing = {v.name for v in copy.graph.outputs}
    for name in outputs:
        if name not in existing:
            copy.graph.outputs.append(values[name])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = with_cuda_options([provider], so)
    return ort.InferenceSession(ir.to_proto(copy).SerializeToString(), so, providers=providers)


def run_tensor(
    model: ir.Model,
    name: str,
    inputs: Mapping[str, np.ndarray],
    cache: Cache,
    provider: str,
    batch: int = 64,
) -> np.memmap:
    """Tensor ``name`` for every cached sample, written batch by batch into a memory map."""
    sess = _session(model, [name], provider)
    n = len(next(iter(inputs.values())))
    out: np.memmap | None = None
    for lo in range(0, n, batch):
        feed = {k: np.ascontiguousarray(v[lo : lo + batch]) for k, v in inputs.items()}
        got = sess.run([name], feed)[0]
        if out is None:
            out = cache.new((n, *got.shape[1:]), got.dtype)
        out[lo : lo + len(got)] = got
    assert out is not None
    return out


def cache_inputs(batches: Iterator[dict[str, np.ndarray]], limit: int, cache: Cache) -> dict[str, np.memmap]:
    """The first ``limit`` calibration samples of every model input, on disk."""
    out: dict[str, np.memmap] = {}
    done = 0
    for feed in batches:
        take = min(limit - done, len(next(iter(feed.values()))))
        for k, v in feed.items():
            if k not in out:
                out[k] = cache.new((limit, *v.shape[1:]), v.dtype)
            out[k][done : done + take] = v[:take]
        done += take
        if done >= limit:
            break
    if done < limit:
        out = {k: v[:done] for k, v in out.items()}  # type: ignore[misc]
    return out


def set_weight(model: ir.Model, name: str, w: np.ndarray) -> None:
    """Replace the value of weight ``name`` (a main-graph initializer or Constant node) by ``w``."""
    tensor = ir.tensor(w.astype(np.float32), name=name)
    if name in model.graph.initializers:
        model.graph.initializers[name].const_value = tensor
        return
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].name == name:
            node.attributes["value"] = ir.AttrTensor("value", tensor)
            return
    raise KeyError(name)


def held_out_error(
    program: UnitProgram,
    x: np.ndarray,
    y: np.ndarray,
    v: Mapping[str, np.ndarray],
    batch: int,
    *,
    act_steps: Mapping[str, np.ndarray] | None = None,
    weight: np.ndarray | None = None,
) -> float:
    """Mean per-sample squared error (times ``weight``, e.g. Fisher's) of the hard-rounded unit on
    ``x``, with activation steps ``act_steps`` (whole batches only)."""
    total, count = 0.0, 0
    for lo in range(0, len(x) - batch + 1, batch):
        out = program.forward(np.ascontiguousarray(x[lo : lo + batch]), v, hard=True, act_steps=act_steps)
        diff = out.astype(np.float64) - y[lo : lo + batch]
        square = diff * diff if weight is None else diff * diff * weight[lo : lo + batch]
        total += float(np.sum(square))
        count += batch
    return total / max(count, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (classes of ``[N, classes]`` logits), float32; shifted by the row
    maximum (no overflow), computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Run:
    """What every unit of one reconstruction reads, in both stages: models, cached samples, settings."""

    fp_model: ir.Model
    work: ir.Model  # the FP graph, weights of the units done so far replaced by their quantized values
    inputs: Mapping[str, np.ndarray]
    cfg: ReconConfig
    rng: np.random.Generator
    cache: Cache
    provider: str
    progress: ReconProgress | None
    #: The time the rounding stage has left.
    eta: Eta
    _p_fp: np.ndarray | None = None

    def p_fp(self) -> np.ndarray:
        """FP class probabilities of every cached sample (softmax of the first output), once."""
        if self._p_fp is None:
            name = self.fp_model.graph.outputs[0].name or ""
            self._p_fp = softmax(run_tensor(self.fp_model, name, self.inputs, self.cache, self.provider))
        return self._p_fp
