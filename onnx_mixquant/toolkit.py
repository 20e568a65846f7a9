"""Graph helpers every stage uses: the model's default opset, fresh names, node display names.

Generic onnx_ir helpers with no stage of their own (onnxruntime sessions are in :mod:`.session`).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

__all__ = ["default_opset", "name_maker", "node_names"]


def default_opset(model: ir.Model) -> int:
    """The model's opset version for the default ONNX domain, or -1 when it imports none."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    return -1 if version is None else int(version)


def name_maker(taken: set[str | None]) -> Callable[[str], str]:
    """Fresh names outside ``taken``, which each new name joins: ``stem``, else ``stem_1``, ``stem_2``, ..."""

    def name(stem: str) -> str:
        fresh, i = stem, 0
        while fresh in taken:
            i += 1
            fresh = f"{stem}_{i}"
        taken.add(fresh)
        return fresh

    return name


def node_names(model: ir.Model) -> dict[ir.Node, str]:
    """Display name of every node, subgraphs included; unique and stable; the model is unchanged.

    A node's own name when it has one, else ``f"{op_type}_{i}"``, ``i`` its position in a
    depth-first walk of the model (subgraph nodes right after their owner). Weight sites and
    reports name nodes this way.
    """
    from onnx_mixquant.read._scan import scan_model  # here: read/ imports this module

    return scan_model(model).names
