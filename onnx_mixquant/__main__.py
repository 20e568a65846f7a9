"""``python -m onnx_mixquant`` runs the command line."""

from onnx_mixquant.cli import main

main()
