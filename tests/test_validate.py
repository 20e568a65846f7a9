"""Tests for onnx_mixquant.validate.compare: metrics against NumPy, providers, dims and random samples."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_mixquant.config import ValidateConfig
from onnx_mixquant.errors import CalibrationError, ConfigError, ExportError
from onnx_mixquant.validate import compare as V

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CFG = ValidateConfig(try_cuda=False)
HAS_GPU = os.path.exists("/dev/nvidiactl")

MATMUL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N,4] x) => (float[N,10] y, float[N] s) <float[4,10] W = {ZEROS}, int64[1] axes = {1}> {
    y = MatMul(x, W)
    s = ReduceSum<keepdims=0>(y, axes)
}
""".replace("ZEROS", ", ".join(["0.0"] * 40))


def _save_matmul(path: Path, w: np.ndarray, external: bool = False) -> Path:
    """x -> MatMul(W) -> y [N, 10] (classifier-like) and s = sum(y, axis 1) [N]."""
    model = ir.from_onnx_text(MATMUL)
    model.graph.initializers["W"].const_value = ir.tensor(w, name="W")
    # External data for W only: onnxruntime cannot read an external ``axes`` during shape inference.
    ir.save(
        model,
        path,
        external_data=path.name + ".data" if external else None,
        size_threshold_bytes=100,
    )
    return path


@pytest.fixture
def weights() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)


@pytest.fixture
def x_batches() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.standard_normal((n, 4)).astype(np.float32) for n in (5, 5, 3)]


def _samples(batches: list[np.ndarray], labels: np.ndarray | None = None) -> V.Samples:
    return V.Samples(feeds=tuple({"x": b} for b in batches), labels=labels, source="test")


def _sqnr(fp: np.ndarray, q: np.ndarray) -> float:
    fp, q = fp.astype(np.float64), q.astype(np.float64)
    return 10 * math.log10(np.sum(fp**2) / np.sum((fp - q) ** 2))


def test_identical_models_give_inf_sqnr(
    tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]
) -> None:
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    q = _save_matmul(tmp_path / "q.onnx", weights)
    res = V.validate(fp, q, _samples(x_batches), CFG)
    assert res.providers == (CPU,)
    assert [(r.provider, r.optimization) for r in res.runs] == [
        (CPU, "ORT_ENABLE_ALL"),
        (CPU, "ORT_DISABLE_ALL"),
    ]
    assert res.num_samples == 13 and res.sample_source == "test"
    for run in res.runs:
        assert [o.name for o in run.outputs] == ["y", "s"]
        y, s = run.outputs
        assert y.sqnr_db == math.inf and y.max_abs_error == 0.0 and y.top1_agreement == 1.0
        assert s.sqnr_db == math.inf and s.top1_agreement is None  # rank 1: not a classifier
        assert run.top1_fp is None and run.top1_quant is None


def test_perturbed_weights_match_numpy(
    tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]
) -> None:
    delta = (0.3 * np.random.default_rng(3).standard_normal(weights.shape)).astype(np.float32)
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    q = _save_matmul(tmp_path / "q.onnx", weights + delta)
    x = np.concatenate(x_batches)
    y_fp, y_q = x @ weights, x @ (weights + delta)
    agree = float(np.mean(np.argmax(y_fp, 1) == np.argmax(y_q, 1)))
    assert agree < 1.0  # the perturbation must be big enough to test agreement
    res = V.validate(fp, q, _samples(x_batches), CFG)
    for run in res.runs:
        y, s = run.outputs
        assert y.sqnr_db == pytest.approx(_sqnr(y_fp, y_q), abs=1e-3)
        assert y.max_abs_error == pytest.approx(float(np.max(np.abs(y_fp - y_q))), rel=1e-4)
        assert y.top1_agreement == pytest.approx(agree)
        assert s.sqnr_db == pytest.approx(_sqnr(y_fp.sum(1), y_q.sum(1)), abs=1e-3)


def test_labels_give_accuracy(tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]) -> None:
    delta = (0.3 * np.random.default_rng(3).standard_normal(weights.shape)).astype(np.float32)
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    q = _save_matmul(tmp_path / "q.onnx", weights + delta)
    x = np.concatenate(x_batches)
    labels = np.argmax(x @ weights, 1).astype(np.int64)
    labels[:4] = (labels[:4] + 1) % 10  # 4 of 13 wrong for the FP model
    expected_q = float(np.mean(np.argmax(x @ (weights + delta), 1) == labels))
    res = V.validate(fp, q, _samples(x_batches, labels), CFG)
    for run in res.runs:
        assert run.top1_fp == pytest.approx(9 / 13)
        assert run.top1_quant == pytest.approx(expected_q)


def test_label_count_mismatch(tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]) -> None:
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    with pytest.raises(CalibrationError, match="12 labels for 13 samples"):
        V.validate(fp, fp, _samples(x_batches, np.zeros(12, np.int64)), CFG)


def test_progress_and_external_data(tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]) -> None:
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    q = _save_matmul(tmp_path / "q.onnx", weights, external=True)
    assert (tmp_path / "q.onnx.data").exists()
    calls: list[tuple[int, int]] = []
    res = V.validate(fp, q, _samples(x_batches), CFG, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 9) for i in range(1, 10)]  # 3 batches x (FP + 2 quantized runs)
    assert all(r.outputs[0].sqnr_db == math.inf for r in res.runs)


def test_session_failure_is_export_error(
    tmp_path: Path, weights: np.ndarray, x_batches: list[np.ndarray]
) -> None:
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    bad = ir.from_onnx_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N,4] x) => (float[N,10] y, float[N] s) { y = NoSuchOp(x) s = NoSuchOp(x) }
    """)
    q = tmp_path / "broken.onnx"
    ir.save(bad, q)
    with pytest.raises(ExportError) as info:
        V.validate(fp, q, _samples(x_batches), CFG)
    msg = str(info.value)
    assert "broken.onnx" in msg and CPU in msg and "ORT_ENABLE_ALL" in msg and "NoSuchOp" in msg
    assert "\n" not in msg


def test_bad_feeds_and_empty_samples(tmp_path: Path, weights: np.ndarray) -> None:
    fp = _save_matmul(tmp_path / "fp.onnx", weights)
    with pytest.raises(CalibrationError, match="batch 0"):
        V.validate(fp, fp, _samples([np.zeros((2, 3), np.float32)]), CFG)
    with pytest.raises(CalibrationError, match="no sample batches"):
        V.validate(fp, fp, _samples([]), CFG)


def test_cuda_probe_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    assert V.available_providers(False) == (CPU,)
    V._cuda_works.cache_clear()
    providers = V.available_providers(True)
    assert providers[-1] == CPU
    if not HAS_GPU:
        assert providers == (CPU,)
    assert V.available_providers(True) == providers  # cached: the probe runs once per process
    assert V._cuda_works.cache_info().misses == 1
    out, err = capfd.readouterr()
    # onnxruntime-gpu logs "Failed to load libcublasLt" from C++ to fd 2 unless its default
    # logger is silenced; capfd sees fd-level output, so this checks the C++ logger too.
    assert out == "" and err == ""


def test_cuda_probe_retries_after_preloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed probe loads CUDA/cuDNN from pip's nvidia wheels (preload_dlls) and probes once more;
    a probe that works first time preloads nothing."""
    from onnx_mixquant import session as S

    monkeypatch.setattr(S.ort, "get_available_providers", lambda: [CUDA, CPU])
    preloads: list[int] = []
    monkeypatch.setattr(S.ort, "preload_dlls", lambda: preloads.append(1), raising=False)
    cases = (([False, True], True, 1), ([False, False], False, 1), ([True], True, 0))
    for answers, works, preloaded in cases:
        preloads.clear()
        calls = iter(answers)
        monkeypatch.setattr(S, "_cuda_runs", lambda calls=calls: next(calls))
        S._cuda_works.cache_clear()
        assert S._cuda_works() is works
        assert len(preloads) == preloaded
        assert next(calls, None) is None  # every answer was asked for, no more
    S._cuda_works.cache_clear()


def test_preload_prints_go_to_the_debug_log(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime.preload_dlls reports missing libraries with print() and warnings; neither may
    reach the user's terminal (they are expected on CPU-only machines)."""
    import warnings

    from onnx_mixquant import session as S

    def noisy() -> None:
        print("Failed to load libcudart.so.13: cannot open shared object file")
        warnings.warn("Failed to register bundled CUDA plugin EP", stacklevel=1)

    monkeypatch.setattr(S.ort, "preload_dlls", noisy, raising=False)
    with caplog.at_level("DEBUG", logger=S.__name__):
        S._preload_cuda_libraries()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "Failed to load libcudart.so.13" in caplog.text


def test_cuda_probe_runs_a_conv() -> None:
    """The probe model is a valid Conv whose output the probe checks (2 * 3 = 6), so a session
    that opens but cannot run a convolution (cuDNN missing) counts as no CUDA."""
    import onnx
    import onnxruntime as ort

    from onnx_mixquant import session as S

    model = onnx.load_from_string(S._probe_model_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    (y,) = sess.run(None, {"x": np.full((1, 1, 1, 1), 3.0, np.float32)})
    assert y.ravel().tolist() == [6.0]


def test_cuda_probe_keeps_onnxruntime_fallback_banner_off_stdout(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """With the CUDA provider loadable but no device (CUDA_VISIBLE_DEVICES=), onnxruntime's Python
    API prints an "EP Error ... Falling back" banner and opens the session on the CPU (seen on a
    GPU machine); the probe answers False and the banner goes to the debug log only."""
    from onnx_mixquant import session as S

    real = S.ort.InferenceSession

    def falling_back(model: bytes, sess_options: object, providers: list[str]) -> object:
        print("*************** EP Error ***************")
        print(f"EP Error CUDA failure 100: no CUDA-capable device is detected when using {providers}")
        print("Falling back to ['CPUExecutionProvider'] and retrying.")
        return real(model, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(S.ort, "InferenceSession", falling_back)
    with caplog.at_level("DEBUG", logger=S.__name__):
        assert S._cuda_runs() is False
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "no CUDA-capable device is detected" in caplog.text


def test_cuda_options_set_up_cuda_only() -> None:
    """CUDA sessions whose results go into the output model: deterministic compute and heuristic
    cuDNN algorithm choice; CPU-only lists and their options stay as they are."""
    import onnxruntime as ort

    from onnx_mixquant import session as S

    so = ort.SessionOptions()
    assert S.with_cuda_options([CPU], so) == [CPU] and so.use_deterministic_compute is False
    chain = S.with_cuda_options((CUDA, CPU), so)
    assert chain == [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    assert so.use_deterministic_compute is True
    chain[0][1]["x"] = "y"  # a copy: callers cannot change CUDA_OPTIONS
    assert S.CUDA_OPTIONS == {"cudnn_conv_algo_search": "HEURISTIC"}


def test_output_affecting_sessions_take_the_cuda_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session whose results reach the output model (BRECQ training and its inputs/targets,
    calibration and bias correction) asks for CUDA through with_cuda_options()."""
    import onnx
    import onnxruntime as ort

    from onnx_mixquant.calibrate import ranges as calibrate
    from onnx_mixquant.rounding.reconstruct import _common, adaround

    seen: list[tuple[object, bool]] = []

    def record(model: object, sess_options: ort.SessionOptions, providers: list[object]) -> str:
        seen.append((providers[0], sess_options.use_deterministic_compute))
        return "session"

    model = onnx.parser.parse_model(MATMUL)
    monkeypatch.setattr(ort, "InferenceSession", record)
    monkeypatch.setattr(calibrate, "compute_providers", lambda: (CUDA, CPU))
    adaround._session(model, [CUDA, CPU], 1)
    _common._session(ir.from_proto(model), [], CUDA)
    calibrate._new_session(model.SerializeToString())
    assert seen == [((CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), True)] * 3


def test_compute_providers_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU (the default, also outside any compute_on) keeps every output-affecting stage on the CPU
    even where CUDA works; auto takes CUDA where it works; cuda without CUDA is a ConfigError."""
    from onnx_mixquant import session as S
    from onnx_mixquant.config import Device

    for works in (True, False):
        monkeypatch.setattr(S, "_cuda_works", lambda works=works: works)
        assert S.compute_providers() == (CPU,)
        with S.compute_on(Device.CPU):
            assert S.compute_providers() == (CPU,)
        with S.compute_on(Device.AUTO):
            assert S.compute_providers() == ((CUDA, CPU) if works else (CPU,))
            with S.compute_on(Device.CPU):  # nested: the inner one wins, then the outer comes back
                assert S.compute_providers() == (CPU,)
            assert S.compute_providers() == ((CUDA, CPU) if works else (CPU,))
        assert S.compute_providers() == (CPU,)
    with pytest.raises(ConfigError, match="device 'cuda': onnxruntime cannot run CUDA here"):
        with S.compute_on(Device.CUDA):
            pass
    monkeypatch.setattr(S, "_cuda_works", lambda: True)
    with S.compute_on(Device.CUDA):
        assert S.compute_providers() == (CUDA, CPU)
