"""Validation that means something: samples held out of the calibration data (never read by
calibration, bias correction or BRECQ), validation samples in every form --calib takes with their
labels, and the top-1 gates (--max-top1-drop, --min-agreement)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_SAMPLES

from onnx_mixquant.cli import main
from onnx_mixquant.config import (
    ImageSpec,
    QuantConfig,
    ReconConfig,
    RoundingMethod,
    SearchConfig,
    ValidateConfig,
)
from onnx_mixquant.data import preprocess
from onnx_mixquant.data import sources as data
from onnx_mixquant.data.sources import load_samples, open_calibration
from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.pipeline import quantize
from onnx_mixquant.read.model import ModelInput
from onnx_mixquant.report._assemble import gate_failures
from onnx_mixquant.report.document import to_json
from onnx_mixquant.validate.compare import OutputMetrics, RunMetrics, ValidationResult

X = ModelInput("x", "float32", ("N", 4))
IMG = ModelInput("img", "float32", ("N", 3, 2, 2))


def _indexed(n: int) -> np.ndarray:
    """n samples whose every value is the sample's index."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)


def _ids(arrays: Any) -> list[int]:
    return [int(v) for v in np.concatenate([np.asarray(a)[:, 0] for a in arrays])] if arrays else []


def _split(path: Path, **kw: Any) -> tuple[list[int], list[int], data.CalibrationData]:
    calib = open_calibration(path, [X], batch_size=4, **kw)
    held = calib.held_out()
    return (
        _ids([b["x"] for b in calib.batches()]),
        _ids([] if held is None else [f["x"] for f in held.feeds]),
        calib,
    )


# ------------------------------------------------------------------------------- the split
def test_held_out_samples_are_disjoint_seeded_and_a_quarter(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=_indexed(40), labels=np.arange(40) % 10)
    used, held, calib = _split(path, holdout=64)
    assert len(held) == calib.num_held_out == 10 and len(used) == calib.num_samples == 30
    assert sorted(used + held) == list(range(40)) and used == sorted(used) and held == sorted(held)
    assert _split(path, holdout=64)[:2] == (used, held)  # same seed, same split
    assert _split(path, holdout=64, seed=1)[1] != held
    few_used, few_held, _ = _split(path, holdout=3)
    assert len(few_held) == 3 and len(few_used) == 37
    sub_used, sub_held, sub = _split(path, holdout=64, calib_size=12)
    assert sub_held == held and sub.num_samples == 12 and not set(sub_used) & set(held)
    samples = calib.held_out()
    assert samples is not None and samples.labels is not None
    assert samples.labels.tolist() == [i % 10 for i in held]
    assert samples.source.startswith(f"held out from {path}: 10 samples; labels:")
    assert calib.as_samples().labels is not None and _ids([f["x"] for f in calib.as_samples().feeds]) == used


def test_no_hold_out_below_four_samples_or_without_asking(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=_indexed(3))
    used, held, calib = _split(path, holdout=64)
    assert (used, held, calib.num_held_out, calib.held_out()) == ([0, 1, 2], [], 0, None)
    np.savez(path, x=_indexed(40))
    assert _split(path)[1] == [] and _split(path, calib_size=5)[0] == _split(path, calib_size=5, holdout=0)[0]
    with pytest.raises(ConfigError, match="holdout"):
        open_calibration(path, [X], holdout=-1)


def test_hold_out_keeps_the_fixed_batch(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=_indexed(22))
    calib = open_calibration(path, [ModelInput("x", "float32", (2, 4))], holdout=64)
    assert (calib.num_held_out, calib.num_samples, calib.batch_size) == (4, 18, 2)
    held = calib.held_out()
    assert held is not None and all(f["x"].shape == (2, 4) for f in held.feeds)


def test_spooled_iterable_keeps_calib_size_beside_the_hold_out() -> None:
    def items() -> Iterator[dict[str, np.ndarray]]:
        for i in range(10):
            yield {"x": _indexed(10)[i : i + 1]}

    calib = open_calibration(items(), [X], calib_size=4, holdout=64)
    held = calib.held_out()
    assert held is not None and calib.num_held_out == 2 and calib.num_samples == 4
    used = _ids([b["x"] for b in calib.batches()])
    assert not set(used) & set(_ids([f["x"] for f in held.feeds]))
    calib.close()


# ------------------------------------------------------------------------ samples and labels
def test_samples_from_a_folder_of_labelled_npz_and_lists(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    np.savez(folder / "a.npz", x=_indexed(3), labels=np.array([1, 2, 3]))
    np.savez(folder / "b.npz", x=_indexed(2), labels=np.array([4, 5]))
    s = load_samples(folder, [X], batch_size=4)
    assert s.labels is not None and s.labels.tolist() == [1, 2, 3, 4, 5]
    assert [f["x"].shape[0] for f in s.feeds] == [4, 1] and "'labels' arrays" in s.source
    s = load_samples([folder / "b.npz", folder / "a.npz"], [X])
    assert s.labels is not None and s.labels.tolist() == [4, 5, 1, 2, 3]
    np.savez(folder / "c.npz", x=_indexed(1))  # no labels: no accuracy, no error
    assert load_samples(folder, [X]).labels is None
    np.savez(folder / "c.npz", x=_indexed(1), labels=np.array([1.5]))
    with pytest.raises(CalibrationError, match="c.npz: 'labels' must hold integer"):
        load_samples(folder, [X])


def test_labels_csv(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.npy", "b.npy"]):
        np.save(folder / name, _indexed(4)[i])
    np.save(folder / "sub" / "c.npy", _indexed(4)[2])
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.npy,7\nb.npy,3\nsub/c.npy,9\n")
    s = load_samples(folder, [X], labels=csv)
    assert s.labels is not None and s.labels.tolist() == [7, 3] and f"labels from {csv}" in s.source
    files = [folder / "sub" / "c.npy", folder / "a.npy"]
    csv.write_text("s/sub/c.npy,9\ns/a.npy,7\n")  # a list of files: relative to the CSV's folder
    s = load_samples(files, [X], labels=csv)
    assert s.labels is not None and s.labels.tolist() == [9, 7]
    csv.write_text("a.npy,7\n")
    with pytest.raises(CalibrationError, match="labels.csv' has no row for .*b.npy"):
        load_samples(folder, [X], labels=csv)
    csv.write_text("a.npy,cat\n")
    with pytest.raises(CalibrationError, match="labels.csv:1: label 'cat' is not a non-negative integer"):
        load_samples(folder, [X], labels=csv)
    np.savez(tmp_path / "batch.npz", x=_indexed(3))
    csv.write_text("batch.npz,1\n")
    with pytest.raises(CalibrationError, match="batch.npz: holds 3 samples, but labels file"):
        load_samples(tmp_path / "batch.npz", [X], labels=csv)


class _FakePreprocessor:
    """Stands in for preprocess.ImagePreprocessor: every pixel is the file name's length."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def __call__(self, path: Path) -> np.ndarray:
        return np.full((3, 2, 2), len(path.name), np.float32)


def test_image_class_sub_folders_give_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "ImagePreprocessor", _FakePreprocessor)
    folder = tmp_path / "val"
    for cls, names in {"dog": ["d1.png", "d22.png"], "cat": ["c333.png"], "emu": ["e4444.jpg"]}.items():
        (folder / cls).mkdir(parents=True)
        for n in names:
            (folder / cls / n).write_bytes(b"image")
    s = load_samples(folder, [IMG], image_spec=ImageSpec())
    pixels = [int(v) for v in np.concatenate([f["img"] for f in s.feeds])[:, 0, 0, 0]]
    assert pixels == [8, 6, 7, 9]  # cat/c333, dog/d1, dog/d22, emu/e4444: sorted paths
    assert s.labels is not None and s.labels.tolist() == [0, 1, 1, 2]  # cat=0, dog=1, emu=2
    assert "sorted order, 0='cat', 1='dog', 2='emu'" in s.source
    csv = tmp_path / "l.csv"
    csv.write_text("cat/c333.png,5\ndog/d1.png,4\ndog/d22.png,4\nemu/e4444.jpg,3\n")
    s = load_samples(folder, [IMG], image_spec=ImageSpec(), labels=csv)
    assert s.labels is not None and s.labels.tolist() == [5, 4, 4, 3]  # the CSV wins
    calib = open_calibration(folder, [IMG], image_spec=ImageSpec(), holdout=64)
    held = calib.held_out()
    assert held is not None and held.labels is not None and calib.num_held_out == 1
    one = tmp_path / "one"
    (one / "all").mkdir(parents=True)
    (one / "all" / "a.png").write_bytes(b"image")
    assert load_samples(one, [IMG], image_spec=ImageSpec()).labels is None  # one folder: no classes


# --------------------------------------------------------------------------------- pipeline
def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Record every calibration batch and every held-out sample the pipeline reads."""
    read: list[np.ndarray] = []
    held: list[np.ndarray] = []
    batches, held_out = data.CalibrationData.batches, data.CalibrationData.held_out

    def spy_batches(self: data.CalibrationData) -> Iterator[dict[str, np.ndarray]]:
        for b in batches(self):
            read.append(b["input"].copy())
            yield b

    def spy_held_out(self: data.CalibrationData) -> Any:
        s = held_out(self)
        held.extend(f["input"] for f in (s.feeds if s is not None else ()))
        return s

    monkeypatch.setattr(data.CalibrationData, "batches", spy_batches)
    monkeypatch.setattr(data.CalibrationData, "held_out", spy_held_out)
    return read, held


def _rows(arrays: list[np.ndarray]) -> set[bytes]:
    return {row.tobytes() for a in arrays for row in a}


@pytest.mark.parametrize("method", [RoundingMethod.NEAREST, RoundingMethod.BRECQ])
def test_calibration_bias_correction_and_brecq_never_see_held_out_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: RoundingMethod
) -> None:
    if method is RoundingMethod.BRECQ:
        pytest.importorskip("onnx_ad")
    read, held = _spy(monkeypatch)
    cfg = QuantConfig(recon=ReconConfig(method=method, iters=5, samples=64, batch=16))
    report = quantize(DEMO_MODEL, tmp_path / "q.onnx", cfg, calib=DEMO_SAMPLES)
    v = report.validation
    assert v is not None and v.sample_source.startswith(f"held out from {DEMO_SAMPLES}: 64 samples")
    assert v.num_samples == 64 and v.runs[0].top1_fp is not None  # DEMO_SAMPLES has labels
    assert report.activations is not None and report.activations.num_samples == 540 - 64
    assert report.bias_correction is not None and (report.reconstruction is not None) == (
        method is RoundingMethod.BRECQ
    )
    all_rows = _rows([np.load(DEMO_SAMPLES)["input"]])
    assert len(_rows(held)) == 64 and len(_rows(read)) == 540 - 64
    assert not _rows(held) & _rows(read) and _rows(held) | _rows(read) == all_rows


def test_same_seed_same_split_byte_identical(tmp_path: Path) -> None:
    cfg = QuantConfig(search=SearchConfig(target_bits=3.0))
    reports = [quantize(DEMO_MODEL, tmp_path / f"{n}.onnx", cfg, calib=DEMO_SAMPLES) for n in "ab"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a, b = (to_json(r)["validation"] for r in reports)
    assert a == b and a is not None
    other = quantize(
        DEMO_MODEL, tmp_path / "c.onnx", QuantConfig(search=cfg.search, seed=1), calib=DEMO_SAMPLES
    )
    assert other.validation is not None and other.validation.runs != reports[0].validation.runs  # type: ignore[union-attr]


def test_too_few_calibration_samples_are_validated_on_and_labelled(tmp_path: Path) -> None:
    x = np.load(DEMO_CALIB)["input"][:3]
    report = quantize(DEMO_MODEL, tmp_path / "q.onnx", calib=[{"input": x}])
    v = report.validation
    assert v is not None and v.num_samples == 3
    assert v.sample_source == "calibration data (not held out): list of 1 input dicts"
    assert any("not an independent check" in w for w in report.warnings)


def test_no_hold_out_with_samples_or_without_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read, held = _spy(monkeypatch)
    quantize(DEMO_MODEL, tmp_path / "q.onnx", calib=DEMO_CALIB, samples_path=DEMO_SAMPLES)
    assert not held and len(_rows(read)) == 256
    read.clear()
    off = QuantConfig(validate=ValidateConfig(enabled=False))
    quantize(DEMO_MODEL, tmp_path / "r.onnx", off, calib=DEMO_CALIB)
    assert len(_rows(read)) == 256


# ------------------------------------------------------------------------------------ gates
def _result(
    top1: tuple[float, float] | None, agreement: float | None, indicative: bool = False
) -> ValidationResult:
    fp, q = top1 if top1 is not None else (None, None)
    out = OutputMetrics("y", 30.0, 0.1, agreement)
    run = RunMetrics("CPUExecutionProvider", "ORT_ENABLE_ALL", (out,), fp, q)
    return ValidationResult((run,), 10, "test", ("CPUExecutionProvider",), indicative)


def test_gate_failures() -> None:
    drop = QuantConfig(validate=ValidateConfig(max_top1_drop=1.0))
    assert gate_failures(_result((0.90, 0.89), 1.0), drop) == []  # exactly 1 point: passes
    (msg,) = gate_failures(_result((0.90, 0.885), 1.0), drop)
    assert "drop 1.50 points > --max-top1-drop 1" in msg and "ORT_ENABLE_ALL" in msg
    with pytest.raises(ConfigError, match="--max-top1-drop needs a top-1 accuracy"):
        gate_failures(_result(None, 1.0), drop)
    agree = QuantConfig(validate=ValidateConfig(min_agreement=0.95))
    assert gate_failures(_result(None, 0.95), agree) == []
    (msg,) = gate_failures(_result(None, 0.9), agree)
    assert "top-1 agreement 90.00% < --min-agreement 0.95" in msg
    with pytest.raises(ConfigError, match="--min-agreement .*no output is classifier-like"):
        gate_failures(_result(None, None), agree)
    with pytest.raises(ConfigError, match="--min-agreement .*random inputs"):
        gate_failures(_result(None, None, indicative=True), agree)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_top1_drop": -1.0}, "max_top1_drop"),
        ({"max_top1_drop": float("nan")}, "max_top1_drop"),
        ({"min_agreement": 1.5}, "min_agreement"),
        ({"min_agreement": 0.9, "enabled": False}, "--min-agreement needs validation"),
        ({"max_top1_drop": 1.0, "enabled": False}, "--max-top1-drop needs validation"),
        ({"min_sqnr_db": 20.0, "enabled": False}, "--min-sqnr needs validation"),
    ],
)
def test_gate_config_checks(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ValidateConfig(**kw)


def _cli(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, [str(DEMO_MODEL), str(out), "-q", *args])
    return res.exit_code, res.output, out


def test_cli_top1_gates_pass_and_fail(tmp_path: Path) -> None:
    code, output, out = _cli(
        tmp_path, "--samples", str(DEMO_SAMPLES), "--max-top1-drop", "100", "--min-agreement", "0"
    )
    assert code == 0 and out.exists(), output
    out.unlink()
    code, output, out = _cli(
        tmp_path, "--samples", str(DEMO_SAMPLES), "--uniform-bits", "2", "--max-top1-drop", "1"
    )
    assert code == 3 and not out.exists() and "FAILED: top-1 97.78% -> " in output, output
    code, output, out = _cli(
        tmp_path,
        "--calib",
        str(DEMO_SAMPLES),
        "--uniform-bits",
        "2",
        "--bias-correction",
        "off",
        "--min-agreement",
        "0.99",
    )
    assert code == 3 and not out.exists() and "< --min-agreement 0.99" in output, output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--samples", str(DEMO_CALIB), "--max-top1-drop", "1"], "--max-top1-drop needs labelled"),
        (["--calib", str(DEMO_CALIB), "--max-top1-drop", "1"], "--max-top1-drop needs labelled"),
        (["--min-agreement", "0.9"], "--min-agreement needs real validation samples"),
        (["--max-top1-drop", "1", "--dim", "N=1"], "--max-top1-drop needs real validation samples"),
        (["--samples", str(DEMO_SAMPLES), "--no-validate", "--min-agreement", "0.9"], "needs validation"),
        (["--samples", str(DEMO_SAMPLES), "--min-agreement", "2"], "fraction 0..1"),
        (["--labels", "x.csv"], "--labels labels the files of --samples"),
    ],
)
def test_cli_gate_usage_errors(tmp_path: Path, args: list[str], match: str) -> None:
    code, output, out = _cli(tmp_path, *args)
    assert code == 2 and match in output.replace("\n", " "), output
    assert not out.exists()


def test_cli_samples_folder_with_labels_csv(tmp_path: Path) -> None:
    test = np.load(DEMO_SAMPLES)
    folder = tmp_path / "val"
    folder.mkdir()
    rows = ["path,label"]
    for i in range(20):
        np.save(folder / f"s{i:02d}.npy", test["input"][i])
        rows.append(f"s{i:02d}.npy,{test['labels'][i]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = tmp_path / "r.json"
    args = ["--samples", str(folder), "--labels", str(tmp_path / "labels.csv"), "--report", str(report)]
    code, output, out = _cli(tmp_path, *args, "--max-top1-drop", "50")
    assert code == 0, output
    v = json.loads(report.read_text())
    assert v["validation"]["num_samples"] == 20 and v["validation"]["runs"][0]["top1_fp"] == 1.0
    assert "labels from" in v["validation"]["sample_source"]
    assert v["settings"]["samples"] == str(folder) and v["settings"]["labels"].endswith("labels.csv")
    assert "top-1 accuracy" in output
