"""The ``onnx-mixquant`` console script: says which extra to install when onnxruntime is missing
(one line, exit 1), instead of the traceback that importing the package would end in."""

from __future__ import annotations

import importlib.util
import sys


def main() -> None:
    """Run the command line, or explain the missing onnxruntime."""
    try:
        from onnx_mixquant.cli import main as cli_main
    except ImportError as e:
        if importlib.util.find_spec("onnxruntime") is not None:
            raise
        sys.stderr.write(f"Error: {e}\n")  # onnx_mixquant's message names both extras
        raise SystemExit(1) from None
    cli_main()
