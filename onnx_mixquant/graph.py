"""Read the model: load with onnx_ir, check it, infer shapes once, list the weight sites.

A *weight site* is a float tensor stored in the model (an initializer or a ``Constant`` node's value,
in the main graph or in an ``If``/``Loop``/``Scan`` subgraph) that feeds the weight operand of a
Conv, ConvTranspose, Gemm (B) or MatMul (the constant operand). Every other float tensor stored in
the model is listed as skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = [
    "MIN_OPSET",
    "ModelInput",
    "ReadModel",
    "SkippedWeight",
    "WeightSite",
    "find_weight_sites",
    "load_model",
    "read_model",
    "weight_array",
    "weight_values",
]

#: Oldest default-domain opset the tool accepts.
MIN_OPSET = 10


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight tensor.

    Attributes:
        name: the tensor (value) name, unique in the model.
        shape: its shape.
        axis: per-channel axis for its consumers (Conv: 0; ConvTranspose group=1: 1; Gemm B: 0 if
            transB else 1; MatMul constant B: rank-1, constant A: rank-2), non-negative; None when
            consumers disagree (then it is quantized per tensor).
        consumers: names of the quantizable nodes that read it as their weight.
        op_types: their op types, same order.
        other_consumers: names of other nodes that also read it (they will read the dequantized value).
        graph: "" for the main graph, else the path of the subgraph, e.g. "loop_node/body".
        source: "initializer" or "constant" (a Constant node's output).
    """

    name: str
    shape: tuple[int, ...]
    axis: int | None
    consumers: tuple[str, ...]
    op_types: tuple[str, ...]
    other_consumers: tuple[str, ...]
    graph: str
    source: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class SkippedWeight:
    """A tensor stored in the model that is not quantized, and why."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, element type (NumPy dtype name) and dims (int, or str when symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass
class ReadModel:
    """What the read stage hands on: the IR model plus facts about it."""

    model: ir.Model
    path: Path
    file_bytes: int
    opset: int
    inputs: tuple[ModelInput, ...]
    output_names: tuple[str, ...]
    sites: tuple[WeightSite, ...]
    skipped: tuple[SkippedWeight, ...]


def load_model(path: str | Path) -> ir.Model:
    """Load ``path`` (external data included); ModelLoadError / UnsupportedModelError on bad input."""
    raise NotImplementedError


def find_weight_sites(model: ir.Model) -> tuple[tuple[WeightSite, ...], tuple[SkippedWeight, ...]]:
    """Every weight site, in topological order of first consumer, and every skipped float tensor."""
    raise NotImplementedError


def weight_values(model: ir.Model) -> dict[str, ir.Value]:
    """Map of weight-site name -> the ir.Value holding it (initializer or Constant output)."""
    raise NotImplementedError


def weight_array(value: ir.Value) -> np.ndarray:
    """The float32 array held by an initializer or a Constant node's output value."""
    raise NotImplementedError


def read_model(path: str | Path) -> ReadModel:
    """load_model + shape inference (once) + opset check + find_weight_sites."""
    raise NotImplementedError
