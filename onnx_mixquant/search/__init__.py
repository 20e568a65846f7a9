"""Search stage: weight arrays -> a bit plan (MixQuant), one width per weight site.

Takes the weights of the read stage and the search settings; gives the roundoff-error table and
the :class:`BitPlan` that meets the bit / size / QEM budget (:mod:`.budget`, NumPy only). With
``--objective output`` or ``guarded`` it also takes the model and samples: :mod:`.sensitivity`
measures each weight's effect on the outputs in onnxruntime and reweights the table.
"""

from onnx_mixquant.search.budget import (
    PACKED_WIDTHS,
    BitPlan,
    ErrorTable,
    build_error_table,
    container_bits,
    search_bitwidths,
    stored_bytes,
)
from onnx_mixquant.search.sensitivity import (
    PROBED_MAX_BITS,
    Sensitivity,
    guarded_objective,
    measure_sensitivity,
    output_kinds,
)

__all__ = [
    "PACKED_WIDTHS",
    "PROBED_MAX_BITS",
    "BitPlan",
    "ErrorTable",
    "Sensitivity",
    "build_error_table",
    "container_bits",
    "guarded_objective",
    "measure_sensitivity",
    "output_kinds",
    "search_bitwidths",
    "stored_bytes",
]
