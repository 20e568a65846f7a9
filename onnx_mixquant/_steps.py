"""Plumbing the pipeline and its helpers share: progress callbacks, stage timings, batch facts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from onnx_mixquant.read import ReadModel

__all__ = ["Progress", "free_batch", "stage_progress", "timed"]

#: progress(stage, done, total, info=""): called by long stages; the CLI draws it on stderr.
Progress = Callable[..., None]


def stage_progress(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    """``progress`` bound to one stage's name, as stages call it: (done, total)."""
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of the block in ``timings[stage]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 4)


def free_batch(read: ReadModel) -> bool:
    """True when every input has an axis 0 that the model leaves free (no fixed batch size), so
    batches may be joined or cut."""
    return bool(read.inputs) and all(
        inp.dims and not (isinstance(inp.dims[0], int) and inp.dims[0] >= 0) for inp in read.inputs
    )
