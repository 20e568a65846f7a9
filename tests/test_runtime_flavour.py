"""Without onnxruntime the package and the console script name both extras; no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDE = "import sys; sys.modules['onnxruntime'] = None; "


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HIDE + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_console_script_names_both_extras_without_a_traceback() -> None:
    argv = "sys.argv = ['onnx-mixquant', 'a.onnx', 'b.onnx']; "
    res = _run(argv + "import onnx_mixquant_launcher as m; m.main()")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "onnx-mixquant[cpu]" in res.stderr and "onnx-mixquant[gpu]" in res.stderr


def test_import_error_names_both_extras() -> None:
    res = _run("import onnx_mixquant")
    assert res.returncode == 1 and "ImportError" in res.stderr and "onnx-mixquant[gpu]" in res.stderr
