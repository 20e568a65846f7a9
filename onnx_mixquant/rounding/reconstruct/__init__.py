"""BRECQ block reconstruction: AdaRound rounding (and activation step sizes) learned unit by unit.

Modules: ``blocks`` partitions the graph into reconstruction units; ``adaround`` builds each unit's
training graph (ONNX) and its gradient graph (onnx-ad, reverse mode) and runs both in onnxruntime;
``train`` runs the per-unit optimisation (Adam in NumPy) over a memory-mapped cache of unit inputs
and targets, and returns integer weights for the export stage.
"""
