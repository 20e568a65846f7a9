"""Partition a model into reconstruction units (BRECQ blocks, or single layers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from onnx_mixquant.graph import WeightSite

__all__ = ["Unit", "partition"]


@dataclass(frozen=True)
class Unit:
    """A single-entry single-exit piece of the main graph holding quantized weights.

    Attributes:
        name: display name (e.g. "block 3: /layer1/layer1.0/conv1/Conv .. /layer1/layer1.0/Relu_1").
        nodes: display names (graph.node_names) of its nodes, in topological order.
        input: the activation tensor entering the unit (a graph input or an inner tensor).
        output: the tensor leaving it.
        weights: weight-site names read by its nodes.
        kind: "block" or "layer".
        reason: why a layer unit is not part of a block ("" for blocks).
    """

    name: str
    nodes: tuple[str, ...]
    input: str
    output: str
    weights: tuple[str, ...]
    kind: str
    reason: str


def partition(
    model: ir.Model,
    sites: Sequence[WeightSite],
    *,
    blocks: bool = True,
    differentiable: Callable[[str], bool] | None = None,
) -> tuple[Unit, ...]:
    """Units in topological order; every site consumed by a main-graph node is in exactly one."""
    raise NotImplementedError
