"""Which quantized nodes onnxruntime fused into integer kernels, and which run in float.

onnxruntime writes the graph it will execute when ``SessionOptions.optimized_model_filepath`` is
set. A fused DQ -> Conv -> Q group becomes one QLinearConv (or QGemm, QLinearMatMul, MatMulNBits)
whose name starts with the Conv's name; a group that could not be fused keeps the float node under
its own name. The probe copy gives every node its display name first, so unnamed nodes are found too.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_mixquant.toolkit import node_names

__all__ = ["FusionResult", "check_fusion"]

logger = logging.getLogger(__name__)

#: Integer kernels a quantized group may become (op type prefixes).
INTEGER_KERNELS = ("QLinear", "QGemm", "MatMulNBits", "MatMulInteger", "ConvInteger", "DynamicQuantize")
#: Larger models are not probed (the optimized copy would need external data of its own).
MAX_PROBE_BYTES = 1_500_000_000


@dataclass(frozen=True)
class FusionResult:
    """Per quantized node: the integer kernel it became, or why it stays float.

    Attributes:
        provider: the execution provider probed.
        fused: node name -> kernel op type (e.g. "QLinearConv").
        unfused: node name -> what runs instead (e.g. "Conv (float)").
    """

    provider: str
    fused: Mapping[str, str]
    unfused: Mapping[str, str]


def check_fusion(
    model_path: Path, targets: Sequence[str], provider: str = "CPUExecutionProvider"
) -> FusionResult | None:
    """Probe ``model_path`` at ORT_ENABLE_ALL and classify each node named in ``targets``.

    Returns None when the model is too large to probe (over ``MAX_PROBE_BYTES``).
    """
    model = ir.load(model_path)
    size = sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None
    )
    if size > MAX_PROBE_BYTES:
        logger.info("fusion check skipped: %d bytes of weights", size)
        return None
    names = node_names(model)
    for node, name in names.items():
        node.name = name
    with tempfile.TemporaryDirectory(prefix="onnx-mixquant-fusion-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(optimized)
        so.log_severity_level = 3  # the "hardware specific optimizations" notice is expected here
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=[provider])
        graph = onnx.load(optimized, load_external_data=False).graph
        after = [(n.name, n.op_type) for n in graph.node]
    return _classify(targets, after, provider)


def _classify(targets: Sequence[str], after: Sequence[tuple[str, str]], provider: str) -> FusionResult:
    fused: dict[str, str] = {}
    unfused: dict[str, str] = {}
    for name in targets:
        same = [o for n, o in after if n == name]
        kernels = [
            o for n, o in after if (n == name or n.startswith(name + "_")) and o.startswith(INTEGER_KERNELS)
        ]
        if kernels:
            fused[name] = kernels[0]
        elif same:
            unfused[name] = f"{same[0]} (float)"
        else:
            unfused[name] = "removed or renamed by onnxruntime (not an integer kernel)"
    logger.info("fusion on %s: %d fused, %d float", provider, len(fused), len(unfused))
    return FusionResult(provider=provider, fused=fused, unfused=unfused)
