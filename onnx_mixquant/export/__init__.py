"""Export stage: integer weights -> the QDQ ONNX model, saved.

Takes the model and the rounding stage's :class:`~onnx_mixquant.rounding.QuantizedWeight` s; gives
the model with each quantized weight replaced by integer tensor -> DequantizeLinear (:mod:`.qdq`),
widths ONNX has no type for bit-packed (:mod:`._packing`), and the file staged beside the target
until it is committed.
"""

from onnx_mixquant.export.qdq import (
    ExportResult,
    StagedModel,
    Storage,
    check_destination,
    insert_qdq,
    pack_weights,
    packs,
    required_opset,
    same_file,
    stage_model,
    storage_for,
    upgrade_opset,
)

__all__ = [
    "ExportResult",
    "StagedModel",
    "Storage",
    "check_destination",
    "same_file",
    "insert_qdq",
    "pack_weights",
    "packs",
    "required_opset",
    "stage_model",
    "storage_for",
    "upgrade_opset",
]
