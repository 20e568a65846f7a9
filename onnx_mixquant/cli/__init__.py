"""The command line: ``onnx-mixquant IN.onnx OUT.onnx [options]`` (:mod:`.command`), its options
parsed into a QuantConfig (:mod:`._options`). The console script and ``python -m onnx_mixquant``
call :func:`main`."""

from onnx_mixquant.cli.command import main

__all__ = ["main"]
