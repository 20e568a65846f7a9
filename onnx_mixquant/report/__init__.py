"""Report stage (last): what a run did, as a dataclass, a JSON document and a terminal table.

Takes what every stage handed on; gives the :class:`Report` and its renderings
(:mod:`.document`), and the pieces the pipeline assembles into it: per-weight rows, the quality
gate, warnings and the resolved settings (:mod:`._assemble`).
"""

from onnx_mixquant.report._assemble import (
    check_gate_inputs,
    gate_failures,
    settings_dict,
    warnings_for,
    weight_reports,
)
from onnx_mixquant.report.document import (
    ActivationReport,
    ActivationTensor,
    ReconReport,
    Report,
    WeightReport,
    format_text,
    to_json,
    write_json,
)

__all__ = [
    "ActivationReport",
    "ActivationTensor",
    "ReconReport",
    "Report",
    "WeightReport",
    "check_gate_inputs",
    "format_text",
    "gate_failures",
    "settings_dict",
    "to_json",
    "warnings_for",
    "weight_reports",
    "write_json",
]
