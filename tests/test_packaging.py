"""The installed distribution holds every module of the source package (a subpackage left out of
pyproject.toml installs a tool whose --method brecq fails with ModuleNotFoundError)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "onnx_mixquant"


def test_every_source_module_is_installed() -> None:
    try:
        files = importlib.metadata.files("onnx-mixquant") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnx-mixquant is not installed")
    installed = {Path(str(f)).as_posix() for f in files if str(f).startswith("onnx_mixquant/")}
    if not installed:
        pytest.skip("editable install: the distribution lists no module files")
    source = {f"onnx_mixquant/{p.relative_to(SOURCE).as_posix()}" for p in SOURCE.rglob("*.py")}
    assert source, SOURCE
    assert not sorted(source - installed), "modules missing from the installed distribution"
