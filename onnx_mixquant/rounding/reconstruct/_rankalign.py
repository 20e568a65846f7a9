"""Full-rank operands for the broadcasting element-wise ops of a gradient graph.

onnxruntime's CPU broadcast loop is slow when a tensor whose last axis has size 1 meets an operand
of lower rank: its inner span is then that one element. onnx-ad puts its seed axis last (size 1
in BRECQ), so every adjoint tensor ends in a size-1 axis, as do the weights of 1x1 Convs, and
their scalar operands (a ReLU adjoint's ``Where(mask, g, 0)``, the rounding regulariser's
``Pow(u, beta)``, ...) hit that loop. Measured with onnxruntime 1.31 (2 threads): ``Mul`` of a
``[320, 1152, 1]`` tensor by a scalar 4.1 ms, by the same scalar shaped ``[1, 1, 1]`` 0.10 ms; of a
``[32, 32, 112, 112, 1]`` tensor 114 ms vs 8 ms without the trailing axis.

ONNX broadcasting aligns shapes from the right, so giving the lower-rank operand leading 1s changes
no value: a constant gets a reshaped copy, any other value an ``Unsqueeze``.

The same size-1 seed axis makes Transposes that only move axes of size 1 (the adjoint rules' "seed
axis first" layouts). onnxruntime's CPU provider copies element by element for them, and its
transpose optimizer pushes them through the element-wise adjoints onto more tensors: on
EfficientNet-Lite0's 112x112 MBConv (batch 32), two such Transposes of 38.5M elements took 40 ms
of a 300 ms step in onnxruntime's profile, and the step took 264 ms without them.
:func:`transposes_as_reshapes` turns each into a Reshape (no copy), which changes no value: the
axes that are not 1 keep their order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnx_mixquant.toolkit import name_maker

__all__ = ["BROADCASTING", "align_ranks", "transposes_as_reshapes"]

#: Element-wise ops whose inputs broadcast against each other (ONNX multidirectional or, for
#: PRelu, unidirectional broadcasting).
BROADCASTING = frozenset(
    {
        "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
        "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum",
        "Where", "Xor",
    }
)  # fmt: skip


def align_ranks(model: ir.Model) -> int:
    """Give every lower-rank input of a broadcasting op of ``model``'s main graph the rank of the
    op's output (shapes must be inferred), in place; returns how many inputs changed.

    Inputs of unknown rank, ops of unknown output rank and ops outside the default domain are left
    as they are.
    """
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    fresh = _name_maker(graph)
    reshaped: dict[tuple[int, int], ir.Value] = {}  # (id of the value, rank) -> its aligned copy
    changed = 0

    for node in list(graph):
        if node.op_type not in BROADCASTING or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0].shape
        if out is None:
            continue
        rank = len(out)
        for i, value in enumerate(node.inputs):
            if value is None or value.shape is None or len(value.shape) >= rank:
                continue
            missing = rank - len(value.shape)
            shape = ir.Shape([1] * missing + list(value.shape))
            key = (id(value), rank)
            if key in reshaped:  # made for an earlier node (graph order: it comes first)
                node.replace_input_with(i, reshaped[key])
            elif value.is_initializer() and value.const_value is not None:
                array = value.const_value.numpy()
                array = array.reshape((1,) * missing + array.shape)
                name = fresh(f"{value.name}_rank{rank}")
                new = ir.Value(
                    name=name, const_value=ir.tensor(array, name=name), type=value.type, shape=shape
                )
                graph.register_initializer(new)
                reshaped[key] = new
                node.replace_input_with(i, new)
            else:
                if opset >= 13:
                    axes = _int64_initializer(graph, fresh(f"{value.name}_rank{rank}_axes"), range(missing))
                    unsqueeze = ir.node("Unsqueeze", [value, axes])
                else:
                    unsqueeze = ir.node("Unsqueeze", [value], {"axes": list(range(missing))})
                name = fresh(f"{value.name}_rank{rank}")
                result = _insert_before(graph, node, unsqueeze, name, value.type, shape)
                reshaped[key] = result
                node.replace_input_with(i, result)
            changed += 1
    return changed


def transposes_as_reshapes(model: ir.Model) -> int:
    """Replace every Transpose of ``model``'s main graph that moves only axes of size 1 by a Reshape
    to its output shape (module docstring), in place; returns how many changed.

    Needs the static shape of the Transpose's input (inferred); a Transpose whose output is a graph
    output is left as it is.
    """
    graph = model.graph
    fresh = _name_maker(graph)
    changed = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        value, out = node.inputs[0], node.outputs[0]
        if value.shape is None or out.is_graph_output():
            continue
        dims = [d for d in value.shape if isinstance(d, int)]
        if len(dims) != len(value.shape):
            continue
        perm = list(node.attributes.get_ints("perm", list(reversed(range(len(dims))))))
        moved = [axis for axis in perm if dims[axis] != 1]
        if moved != sorted(moved):
            continue
        target = [dims[axis] for axis in perm]
        shape = _int64_initializer(graph, fresh(f"{out.name}_shape"), target)
        reshape = ir.node("Reshape", [value, shape])
        name = fresh(f"{node.name or out.name}_as_reshape")
        out.replace_all_uses_with(_insert_before(graph, node, reshape, name, out.type, ir.Shape(target)))
        graph.remove(node, safe=True)
        changed += 1
    return changed


def _name_maker(graph: ir.Graph) -> Callable[[str], str]:
    """Fresh names outside those of ``graph``'s node outputs, inputs and initializers."""
    taken: set[str | None] = {v.name for node in graph for v in node.outputs}
    return name_maker(taken | {v.name for v in graph.inputs} | set(graph.initializers))


def _int64_initializer(graph: ir.Graph, name: str, values: Iterable[int]) -> ir.Value:
    """A 1-D int64 initializer of ``graph`` (axes, a shape)."""
    array = np.array(list(values), dtype=np.int64)
    value = ir.Value(
        name=name,
        const_value=ir.tensor(array, name=name),
        type=ir.TensorType(ir.DataType.INT64),
        shape=ir.Shape([array.size]),
    )
    graph.register_initializer(value)
    return value


def _insert_before(
    graph: ir.Graph, before: ir.Node, node: ir.Node, name: str, type_: ir.TypeProtocol | None, shape: ir.Shape
) -> ir.Value:
    """Insert the one-output ``node`` before ``before``; it and its output are called ``name``."""
    node.name = name
    result = node.outputs[0]
    result.name, result.type, result.shape = name, type_, shape
    graph.insert_before(before, node)
    return result
