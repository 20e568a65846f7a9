"""Read stage (first): an ONNX model file -> :class:`ReadModel`.

Takes a model path; gives the loaded onnx_ir model (checked, shapes inferred once, external data
left on disk), its graph inputs, its weight sites (the float tensors feeding a Conv, ConvTranspose,
Gemm or MatMul weight operand) and the stored tensors left float, with why (:mod:`.model`, over the
one walk of :mod:`._scan`). :mod:`.prepare` folds zero-padding Pad nodes into the Convs that read
them, before activation quantization.
"""

from onnx_mixquant.read.model import (
    MIN_OPSET,
    ModelInput,
    ReadModel,
    SkippedWeight,
    WeightSite,
    find_weight_sites,
    first_reader,
    load_model,
    read_model,
    weight_array,
    weight_values,
)
from onnx_mixquant.read.prepare import fold_pads_into_convs

__all__ = [
    "MIN_OPSET",
    "ModelInput",
    "ReadModel",
    "SkippedWeight",
    "WeightSite",
    "find_weight_sites",
    "first_reader",
    "fold_pads_into_convs",
    "load_model",
    "read_model",
    "weight_array",
    "weight_values",
]
