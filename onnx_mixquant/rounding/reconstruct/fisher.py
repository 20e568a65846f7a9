"""BRECQ's Fisher weights: the gradient of the task loss w.r.t. a unit's output (Li et al. 2021).

BRECQ weights a unit's squared reconstruction error elementwise by ``f = (|g| + 1)^2``, where ``g``
is the gradient, per calibration batch, of the KL divergence between the FP model's predictions
and those of the model whose unit output ``T`` is the quantized unit's (later layers FP)::

    p     = softmax(FP logits)                                   [N, classes], given
    loss  = sum(p (log p - log_softmax(logits(T)))) / N          F.kl_div(..., reduction="batchmean")
    g     = d loss / d T                                         T's shape

The ``p log p`` term does not depend on ``T``, so the program differentiates
``-sum(p log_softmax(logits)) / N``, which has the same gradient (and no ``0 log 0``).

The program is the model cut at ``T`` (``T`` a graph input; nodes that only fed it removed; nodes
upstream of ``T`` that still feed the rest, e.g. a skip connection around a single layer, stay and
read the model inputs), with a static batch and the loss appended. :func:`._dwconv.reverse` turns
it into a gradient model with the seed input ``adj_<loss>`` (fed ``[1]``) and the last output
``adj_<T>`` (``T``'s shape plus a seed axis of 1). float32 programs run in onnxruntime, float64
ones (finite-difference tests) in ``onnx.reference``: onnxruntime's CPU has no float64 Conv.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ad
import onnx_ir as ir
import onnx_ir.passes.common
from onnx.reference import ReferenceEvaluator

from onnx_mixquant.errors import UnsupportedModelError
from onnx_mixquant.rounding.reconstruct._common import softmax
from onnx_mixquant.rounding.reconstruct._dwconv import reverse
from onnx_mixquant.rounding.reconstruct.adaround import _LEVEL, _session
from onnx_mixquant.session import compute_providers
from onnx_mixquant.toolkit import default_opset, name_maker

__all__ = ["FisherProgram", "fisher_weight", "softmax"]

logger = logging.getLogger(__name__)


def fisher_weight(g: np.ndarray) -> np.ndarray:
    """BRECQ's elementwise weight ``(|g| + 1)^2`` as float32, ``g``'s shape.

    Example: ``g = [-2, 0, 0.5]`` gives ``[9, 1, 2.25]``.
    """
    return np.square(np.abs(np.asarray(g, dtype=np.float32)) + np.float32(1.0))


class FisherProgram:
    """d KL(softmax(fp logits) || softmax(logits)) / d tensor, for a model whose tensor ``tensor``
    is fed from outside.

    Attributes:
        dtype: float32 or float64, the type of ``t``, ``p_fp`` and the gradient.
        input_names: the model's own graph inputs, in order (:meth:`grad` reads those the cut
            model still uses).
        tensor_shape: static shape of ``tensor``, batch first.
        output_shape: ``(batch, classes)``, the shape of the logits and of ``p_fp``.
        provider: where the gradient model runs ("onnx.reference" for float64).
        optimization: the onnxruntime graph optimisation level ("none" for onnx.reference).
        training_model, gradient_model: the cut model with its loss, and its gradient model.
    """

    def __init__(
        self,
        model: ir.Model,
        tensor: str,
        batch: int,
        *,
        provider: str | None = None,
        threads: int = 0,
        dtype: type | np.dtype = np.float32,
    ) -> None:
        """Build the cut model, its gradient model and the session that runs it.

        Args:
            model: the work model (not modified): FP structure, earlier units' weights already
                quantized-dequantized; its first output is the logits.
            tensor: a tensor of the main graph (the unit output), of type ``dtype``.
            batch: the static batch size of every call.
            provider: an onnxruntime provider; default: ``session.compute_providers()``.
            threads: onnxruntime intra-op threads (0: its default).
            dtype: float32 (onnxruntime) or float64 (onnx.reference): the model's float type.

        Raises:
            UnsupportedModelError: no ``[batch, classes]`` first output, ``tensor`` not in the main
                graph or not reaching the logits, shapes not inferable, or an op onnx-ad cannot
                differentiate between ``tensor`` and the logits.
        """
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        self.input_names = tuple(v.name or "" for v in model.graph.inputs)
        cut, self.output_shape = _cut(model.clone(), tensor, batch, self.dtype)
        self.training_model = _infer(ir.to_proto(cut), tensor)
        loss = self.training_model.graph.output[0].name
        try:
            self.gradient_model = reverse(self.training_model, [tensor], loss, seeds=1)
        except onnx_ad.UnsupportedOperator as e:
            raise UnsupportedModelError(f"--fisher: tensor {tensor!r}: onnx-ad cannot differentiate"
                                        f" the logits: {e}") from e  # fmt: skip
        *inputs, t_in, p_in = cut.graph.inputs
        self._tensor, self._p, self.tensor_shape = tensor, p_in.name or "", _spec(t_in)[0]
        self._inputs = {v.name or "": _spec(v) for v in inputs}
        # reverse() adds one input, the seed adj_<loss> [nadj], and appends the output adj_<tensor>
        (self._seed,) = {v.name for v in self.gradient_model.graph.input[len(cut.graph.inputs) :]}
        self._fetch = self.gradient_model.graph.output[-1].name
        self._run, self.provider, self.optimization = _runner(self.gradient_model, self.dtype, provider,
                                                              threads)  # fmt: skip
        logger.debug("fisher %r: %s -> %s on %s", tensor, self.tensor_shape, self.output_shape, self.provider)

    def grad(self, inputs: Mapping[str, np.ndarray], t: np.ndarray, p_fp: np.ndarray) -> np.ndarray:
        """d loss / d t for ``loss = sum(p_fp (log p_fp - log_softmax(logits))) / batch``.

        Args:
            inputs: the model's graph inputs for one batch (those the program does not read are
                ignored).
            t: values of ``tensor``, ``tensor_shape``.
            p_fp: FP probabilities (:func:`softmax` of the FP logits), ``output_shape``.

        Returns:
            The gradient, ``tensor_shape``, in the program's dtype.
        """
        feeds = {self._tensor: _array(t, self.tensor_shape, self.dtype, "t")}
        feeds[self._p] = _array(p_fp, self.output_shape, self.dtype, "p_fp")
        feeds[self._seed] = np.ones(1, self.dtype)
        for name, (shape, dtype) in self._inputs.items():
            if name not in inputs:
                raise ValueError(f"no value given for model input {name!r}")
            feeds[name] = _array(inputs[name], shape, dtype, f"input {name!r}")
        (adj,) = self._run([self._fetch], feeds)
        return np.asarray(adj)[..., 0]


def _cut(model: ir.Model, tensor: str, batch: int, dtype: np.dtype) -> tuple[ir.Model, tuple[int, int]]:
    """Edit ``model`` in place into ``(inputs it still reads..., tensor, p) -> loss``, batch static."""
    graph, float_type = model.graph, ir.DataType.from_numpy(dtype)
    logits, classes = _logits(graph)
    candidates = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
    if tensor not in candidates:
        raise UnsupportedModelError(f"--fisher: tensor {tensor!r} is not a tensor of the main graph")
    old = candidates[tensor]
    if old.dtype is not None and old.dtype != float_type:
        raise UnsupportedModelError(f"--fisher: tensor {tensor!r} is {old.dtype}, not {float_type}")
    taken = {v.name for n in graph.all_nodes() for v in (*n.inputs, *n.outputs) if v}
    names = name_maker(taken | set(candidates) | set(graph.initializers))
    old.name = names(f"{tensor}__cut")
    cut = ir.val(tensor, float_type, _batched(old, batch, tensor))
    graph.outputs.clear()  # replace_all_uses_with refuses graph outputs
    old.replace_all_uses_with(cut)
    logits = cut if logits is old else logits  # the unit is the classifier's last layer
    p = ir.val(names("fisher_p"), float_type, [batch, classes])
    scale = np.asarray(-1.0 / batch, dtype)
    graph.outputs.append(_append_loss(graph, logits, p, scale, default_opset(model), names))
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    _fold_constants(model, names)
    if not cut.uses():
        raise UnsupportedModelError(f"--fisher: tensor {tensor!r} does not reach the logits {logits.name!r}")
    used = [v for v in graph.inputs if v.uses() and v.const_value is None]  # not initializers
    for v in used:
        v.shape = ir.Shape(_batched(v, batch, v.name or ""))
    graph.inputs.clear()
    graph.inputs.extend([*used, cut, p])
    for node in graph:  # inferred again for the static batch
        for v in node.outputs:
            v.shape = None
    return model, (batch, classes)


def _fold_constants(model: ir.Model, names: Callable[[str], str]) -> None:
    """Replace the nodes that compute from stored tensors only (Constant chains, e.g. the pads of a
    ResNet option-A shortcut: Constant -> Concat -> Reshape -> Slice -> Transpose -> Cast) by
    initializers, so that shape inference sees their values."""
    graph, opset = model.graph, default_opset(model)
    for node in list(graph):
        ins = [v for v in node.inputs if v is not None]
        if node.domain not in ("", "ai.onnx") or (not ins and node.op_type != "Constant"):
            continue
        if any(v.const_value is None or v.is_graph_input() for v in ins):
            continue
        args = {v.name or "": v.const_value.numpy() for v in ins if v.const_value is not None}
        evaluator = ReferenceEvaluator(ir.serde.serialize_node(node), opsets={"": opset})
        for out, array in zip(node.outputs, evaluator.run(None, args), strict=True):
            folded = ir.val(names(f"{out.name}__folded"), const_value=ir.tensor(np.asarray(array)))
            graph.register_initializer(folded)
            out.replace_all_uses_with(folded)
        graph.remove(node, safe=True)


def _logits(graph: ir.Graph) -> tuple[ir.Value, int]:
    """The first graph output and its number of classes; it must be ``[batch, classes]``."""
    logits = graph.outputs[0] if graph.outputs else None
    shape = None if logits is None else logits.shape
    if logits is None or shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        name = logits.name if logits else None
        raise UnsupportedModelError(f"--fisher needs a classifier whose first output is [batch, classes]"
                                    f" logits; output {name!r} has shape {shape}")  # fmt: skip
    return logits, shape[1]


def _append_loss(
    graph: ir.Graph, logits: ir.Value, p: ir.Value, scale: np.ndarray, opset: int, names: Callable[[str], str]
) -> ir.Value:
    """Append ``scale ReduceSum(p LogSoftmax(logits, axis=1))``, ``scale = -1 / batch``.

    onnx-ad 0.3.0 refuses LogSoftmax before opset 13 (it flattened to 2-D then), so there
    log-softmax is ``z - Log(ReduceSum(Exp(z)))`` with ``z = logits - ReduceMax(logits)``.
    """

    def op(op_type: str, *inputs: ir.Value, **attrs: int | list[int]) -> ir.Value:
        node = ir.node(op_type, list(inputs), attrs or None, name=names(f"fisher_{op_type}"))
        node.outputs[0].name = names(f"fisher_{op_type.lower()}")
        graph.append(node)
        return node.outputs[0]

    if opset >= 13:
        log_p = op("LogSoftmax", logits, axis=1)
    else:
        z = op("Sub", logits, op("ReduceMax", logits, axes=[1], keepdims=1))
        log_p = op("Sub", z, op("Log", op("ReduceSum", op("Exp", z), axes=[1], keepdims=1)))
    c = ir.val(names("fisher_scale"), const_value=ir.tensor(scale))
    graph.register_initializer(c)
    loss = op("Mul", op("ReduceSum", op("Mul", p, log_p), keepdims=0), c)
    loss.name = names("fisher_loss")
    return loss


def _batched(v: ir.Value, batch: int, name: str) -> list[int]:
    """``v``'s shape with its first dimension set to ``batch``; the others must be static."""
    dims = list(v.shape or [])
    if not dims or not all(isinstance(d, int) for d in dims[1:]):
        raise UnsupportedModelError(f"--fisher: {name!r} has shape {v.shape}: needs a batch axis and"
                                    " static other dimensions")  # fmt: skip
    return [batch, *(d for d in dims[1:] if isinstance(d, int))]


def _infer(proto: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """Strict shape inference; every tensor computed from ``tensor`` must get a static shape."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise UnsupportedModelError(f"--fisher: tensor {tensor!r}: shapes not inferred: {e}") from e
    info = {v.name: v.type.tensor_type for v in (*proto.graph.value_info, *proto.graph.output)}
    reached = {tensor}
    for node in proto.graph.node:
        if not reached.isdisjoint(node.input):
            reached.update(node.output)
            for name in node.output:
                tt = info.get(name)
                if not (tt and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)):
                    raise UnsupportedModelError(f"--fisher: tensor {tensor!r}: no static shape for {name!r}")
    return proto


def _spec(v: ir.Value) -> tuple[tuple[int, ...], np.dtype]:
    """Static shape and NumPy dtype of a graph input of the cut model."""
    assert v.shape is not None and v.shape.is_static() and v.dtype is not None
    return tuple(int(d) for d in v.shape), np.dtype(v.dtype.numpy())  # type: ignore[arg-type]


def _runner(
    gradient: onnx.ModelProto, dtype: np.dtype, provider: str | None, threads: int
) -> tuple[Callable[..., Any], str, str]:
    """``run(fetches, feeds)`` of the gradient model, the provider and the optimisation level:
    onnxruntime for float32, onnx.reference for float64 (onnxruntime has no float64 Conv)."""
    if dtype == np.float64:
        return ReferenceEvaluator(gradient).run, "onnx.reference", "none"
    cpu = "CPUExecutionProvider"
    providers = list(compute_providers() if provider is None else dict.fromkeys([provider, cpu]))
    session = _session(gradient, providers, threads)
    return session.run, session.get_providers()[0], _LEVEL.name


def _array(a: object, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` and ``shape``; ValueError otherwise."""
    array = np.asarray(a, dtype=dtype, order="C")
    if array.shape != tuple(shape):
        raise ValueError(f"{what}: shape {array.shape}, expected {tuple(shape)}")
    return array
