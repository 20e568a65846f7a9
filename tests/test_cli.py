"""The command line: success on the demo model, every bad input, quality gate, determinism."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_SAMPLES, make_mixed_model
from onnx import TensorProto, helper

from onnx_mixquant.cli import main


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_demo_model_end_to_end(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "demo_q.onnx"
    report = tmp_path / "report.json"
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(out),
            "--calib",
            str(DEMO_CALIB),
            "--samples",
            str(DEMO_SAMPLES),
            "--report",
            str(report),
            "-q",
        ],
    )  # the README's first command
    assert res.exit_code == 0, res.output
    assert "validation on 540 samples" in res.output
    assert "activations: UINT8 percentile ranges from 256 samples" in res.output
    data = json.loads(report.read_text())
    assert data["output_written"] is True
    assert 3.5 <= data["average_bits"] <= 4.0
    assert out.stat().st_size < 0.3 * DEMO_MODEL.stat().st_size
    run = data["validation"]["runs"][0]
    assert run["top1_fp"] == pytest.approx(0.9778, abs=1e-4)
    assert run["top1_quant"] >= 0.95
    assert {w["bits"] for w in data["weights"]} - {None} != {4}  # mixed widths
    sk = {s["name"]: s["reason"] for s in data["skipped"]}
    assert "bias" in sk["conv1.bias"]
    assert _files(tmp_path) == ["demo_q.onnx", "report.json"]
    readme = (DEMO_MODEL.parents[1] / "README.md").read_text()
    assert "--calib models/digits_calib.npz --samples models/digits_test.npz" in readme


def test_same_input_same_bytes(runner: CliRunner, tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}.onnx"
        res = runner.invoke(
            main,
            [
                str(DEMO_MODEL),
                str(out),
                "--no-validate",
                "-q",
                "--seed",
                "3",
                "--calib",
                str(DEMO_CALIB),
                "--calib-size",
                "100",
            ],
        )
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_min_sqnr_gate_fails_and_writes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(out),
            "--uniform-bits",
            "2",
            "--min-sqnr",
            "60",
            "--samples",
            str(DEMO_SAMPLES),
            "--report",
            str(report),
            "-q",
        ],
    )
    assert res.exit_code == 3, res.output
    assert "FAILED" in res.output and "--min-sqnr 60" in res.output
    assert not out.exists()
    assert json.loads(report.read_text())["output_written"] is False
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(out),
            "--uniform-bits",
            "8",
            "--min-sqnr",
            "20",
            "--samples",
            str(DEMO_SAMPLES),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert out.exists()


def _expect_error(runner: CliRunner, args: list[str], code: int, *needles: str) -> None:
    res = runner.invoke(main, args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


def test_bad_input_files(runner: CliRunner, tmp_path: Path) -> None:
    out = str(tmp_path / "o.onnx")
    _expect_error(runner, [str(tmp_path / "nope.onnx"), out], 1, "nope.onnx")
    _expect_error(runner, [str(tmp_path), out], 1, "director")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(3000))
    _expect_error(runner, [str(junk), out], 1, "junk.onnx")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(DEMO_MODEL.read_bytes()[:5000])
    _expect_error(runner, [str(trunc), out], 1, "trunc.onnx")
    tensor = tmp_path / "tensor.onnx"
    tensor.write_bytes(helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString())
    _expect_error(runner, [str(tensor), out], 1, "tensor.onnx")
    old = tmp_path / "old.onnx"
    m = make_mixed_model()
    m.opset_import[0].version = 7
    onnx.save(m, old)
    _expect_error(runner, [str(old), out], 1, "opset")
    assert not Path(out).exists()


def test_no_quantizable_weights(runner: CliRunner, tmp_path: Path) -> None:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    _expect_error(runner, [str(path), str(tmp_path / "o.onnx")], 1, "no quantizable weights")


def test_output_paths(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = DEMO_MODEL.read_bytes()
    _expect_error(runner, [str(DEMO_MODEL), str(DEMO_MODEL)], 1, "input model")
    assert DEMO_MODEL.read_bytes() == before
    _expect_error(runner, [str(DEMO_MODEL), str(tmp_path / "no" / "o.onnx")], 1, "does not exist")
    # root can write anywhere, so make the permission check see a read-only folder
    real_access = os.access
    monkeypatch.setattr(
        "onnx_mixquant.export.qdq.os.access",
        lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode),
    )
    _expect_error(runner, [str(DEMO_MODEL), str(tmp_path / "o.onnx")], 1, "not writable")
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--target-bits", "12"], "target bits"),
        (["--target-bits", "4", "--qem", "10"], "choose one"),
        (["--qem", "0.1"], "qem"),
        (["--uniform-bits", "9"], "bit-width"),
        (["--candidate-bits", "2,x"], "comma-separated"),
        (["--bits", "conv1.weight"], "NAME=INTEGER"),
        (["--bits", "conv1.weight=1"], "bit-width"),
        (["--bits", "no_such_weight=4"], "no_such_weight"),
        (["--keep-float", "("], "regular expression"),
        (["--target-size", "lots"], "size"),
        (["--symmetry", "sideways"], "sideways"),
        (["--num-samples", "0"], "num-samples"),
        (["--act-iters", "-1"], "act-iters"),
        (["--recon-split", "random"], "recon-split"),
        (["--method", "brecq"], "--calib"),
    ],
)
def test_bad_options_exit_2(runner: CliRunner, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "o.onnx"
    _expect_error(runner, [str(DEMO_MODEL), str(out), "--no-validate", *args], 2, needle)
    assert not out.exists()


def test_plain_command_defaults_symbolic_dims(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    res = runner.invoke(main, [str(DEMO_MODEL), str(out), "-q"], input="")
    assert res.exit_code == 0, res.output
    assert out.exists() and "RANDOM samples (indicative only" in res.output
    assert "top-1" not in res.output  # no headline figure from random inputs
    res = runner.invoke(main, [str(DEMO_MODEL), str(out), "--dim", "N=2", "-q", "--json"])
    assert res.exit_code == 0, res.output
    v = json.loads(res.stdout)["validation"]
    assert v["indicative"] is True and v["num_samples"] == 16  # 8 samples of batch 2


def test_bad_samples_file(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((3, 1, 8, 8), dtype=np.float64))
    _expect_error(
        runner,
        [str(DEMO_MODEL), str(tmp_path / "o.onnx"), "--samples", str(bad)],
        1,
        "bad.npz",
        "float64",
    )


def test_json_to_stdout(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(tmp_path / "o.onnx"),
            "--samples",
            str(DEMO_SAMPLES),
            "--json",
            "-q",
            "--qem",
            "300",
        ],
    )
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["rule"] == "qem"
    assert all(w["storage"] in {"UINT4", "UINT4 blk32", "UINT8", None} for w in data["weights"])


def test_calibrated_w8a8_fuses_and_reports(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "a8.onnx"
    report = tmp_path / "r.json"
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(out),
            "--calib",
            str(DEMO_CALIB),
            "--calib-size",
            "64",
            "--uniform-bits",
            "8",
            "--samples",
            str(DEMO_SAMPLES),
            "--report",
            str(report),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    acts = data["activations"]
    assert acts["num_samples"] == 64 and acts["dtype"] == "UINT8" and acts["method"] == "percentile"
    assert set(acts["fusion"]["fused"].values()) >= {"QLinearConv"} and acts["fusion"]["unfused"] == {}
    assert data["validation"]["runs"][0]["top1_quant"] >= 0.96
    assert "6 of 6 quantized Conv/Gemm/MatMul fused" in res.output
    model = onnx.load(out)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(acts["tensors"])


def test_weight_only_with_calib_and_int8_activations(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(
        main, [str(DEMO_MODEL), str(tmp_path / "w.onnx"), "--calib", str(DEMO_SAMPLES), "--weight-only", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert "activations: float" in res.output
    assert "validation on 64 samples" in res.output  # calibration data validate the model
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(tmp_path / "s.onnx"),
            "--calib",
            str(DEMO_SAMPLES),
            "--act-type",
            "int8",
            "--calib-method",
            "percentile",
            "--json",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.stderr
    acts = json.loads(res.stdout)["activations"]
    assert acts["dtype"] == "INT8" and acts["method"] == "percentile"
    assert all(t["zero_point"] == 0 for t in acts["tensors"])


def test_calibration_errors(runner: CliRunner, tmp_path: Path) -> None:
    out = str(tmp_path / "o.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(runner, [str(DEMO_MODEL), out, "--calib", str(empty)], 1, "empty")
    _expect_error(runner, [str(DEMO_MODEL), out, "--calib", str(tmp_path / "missing.npz")], 1, "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((3, 1, 9, 8), dtype=np.float32))
    _expect_error(runner, [str(DEMO_MODEL), out, "--calib", str(bad)], 1, "bad.npz")
    _expect_error(
        runner, [str(DEMO_MODEL), out, "--calib", str(DEMO_SAMPLES), "--calib-size", "0"], 2, "calib-size"
    )
    _expect_error(runner, [str(DEMO_MODEL), out, "--mean", "1,2"], 2, "three")
    _expect_error(runner, [str(DEMO_MODEL), out, "--image-crop", "big"], 2, "HxW")
    cfg = tmp_path / "img.json"
    cfg.write_text('{"resize": 8, "colour": "red"}')
    _expect_error(runner, [str(DEMO_MODEL), out, "--image-config", str(cfg)], 2, "colour")
    _expect_error(
        runner, [str(DEMO_MODEL), out, "--save-preprocess", str(tmp_path / "p.onnx")], 2, "--save-preprocess"
    )
    assert not Path(out).exists()


def test_image_folder_calibration_and_saved_preprocessing(runner: CliRunner, tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    images = tmp_path / "imgs" / "class_a"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = np.load(DEMO_SAMPLES)["input"][:12]
    for i, sample in enumerate(x):  # digits are x/16 in [0, 1]: store as grey PNGs
        grey = np.clip(sample[0] * 255, 0, 255).astype(np.uint8)
        pil.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(images / f"{i:02d}.png")
    del rng
    cfg = tmp_path / "img.json"
    cfg.write_text(json.dumps({"scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1], "layout": "NCHW"}))
    pre = tmp_path / "pre.onnx"
    res = runner.invoke(
        main,
        [
            str(DEMO_MODEL),
            str(tmp_path / "o.onnx"),
            "--calib",
            str(tmp_path / "imgs"),
            "--image-config",
            str(cfg),
            "--save-preprocess",
            str(pre),
            "-q",
        ],
    )
    # the demo model takes one channel, the images give three: a clear error naming the mismatch
    assert res.exit_code == 1, res.output
    assert "00.png" in res.output or "channel" in res.output or "dim" in res.output
    onnx.checker.check_model(onnx.load(pre))


def test_brecq_options_reach_the_report(runner: CliRunner, tmp_path: Path) -> None:
    """--method brecq with --fisher and --act-iters: every unit Fisher-weighted, the activation
    stage run with the given iterations, the symmetric-int8 grid resolved for A8."""
    out = tmp_path / "b.onnx"
    args = [str(DEMO_MODEL), str(out), "--calib", str(DEMO_CALIB), "--method", "brecq", "--iters", "12"]
    args += ["--recon-samples", "96", "--recon-batch", "16", "--fisher", "--act-iters", "7", "--json", "-q"]
    res = runner.invoke(main, [*args, "--no-validate"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    rec = data["reconstruction"]
    assert rec["fisher"] is True and rec["iters"] == 12 and rec["samples"] == 96
    assert {u["fisher"] for u in rec["units"]} == {"used"}
    assert rec["act_units"] and {a["iters"] for a in rec["act_units"] if a["tensors"]} == {7}
    assert data["settings"]["quantizer"]["symmetry"] == "symmetric-int8"
    assert data["settings"]["recon"]["act_iters"] == 7 and out.exists()


def test_recon_split_reaches_the_units(runner: CliRunner, tmp_path: Path) -> None:
    """--recon-split error: the units' iterations differ and sum to --iters per unit."""
    out = tmp_path / "s.onnx"
    args = [str(DEMO_MODEL), str(out), "--calib", str(DEMO_CALIB), "--method", "brecq", "--iters", "20"]
    args += ["--recon-samples", "96", "--recon-batch", "16", "--recon-split", "error", "--json", "-q"]
    res = runner.invoke(main, [*args, "--no-validate", "--weight-only", "--target-bits", "3"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    rec = data["reconstruction"]
    iters = [u["iters"] for u in rec["units"]]
    assert rec["split"] == "error" and data["settings"]["recon"]["split"] == "error"
    assert sum(iters) == 20 * len(iters) and len(set(iters)) > 1


def test_device_cuda_without_cuda_is_a_usage_error(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device cuda where onnxruntime cannot run CUDA: exit 2, a message saying what is missing and
    what to use instead, no output; --device auto falls back to the CPU and records its choice."""
    from onnx_mixquant import session as _ortsession

    monkeypatch.setattr(_ortsession, "_cuda_works", lambda: False)
    out = tmp_path / "q.onnx"
    needles = ("device 'cuda': onnxruntime cannot run CUDA here", "'auto' to fall back to the CPU")
    _expect_error(runner, [str(DEMO_MODEL), str(out), "--device", "cuda", "-q"], 2, *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    report = tmp_path / "r.json"
    args = [
        "--device",
        "auto",
        "-q",
        "--calib",
        str(DEMO_CALIB),
        "--calib-size",
        "64",
        "--report",
        str(report),
    ]
    res = runner.invoke(main, [str(DEMO_MODEL), str(out), *args])
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["settings"]["device"] == "auto"
    _expect_error(runner, [str(DEMO_MODEL), str(out), "--device", "gpu"], 2, "'gpu' is not one of")


@pytest.mark.parametrize("target", ["input", "input-link", "output", "report"])
def test_side_outputs_never_overwrite_the_models(runner: CliRunner, tmp_path: Path, target: str) -> None:
    """--report and --save-preprocess naming the input (any spelling), the output or each other:
    usage error, every file intact, nothing written."""
    src = tmp_path / "in.onnx"
    src.write_bytes(DEMO_MODEL.read_bytes())
    (tmp_path / "link.onnx").symlink_to(src)
    out = tmp_path / "out.onnx"
    paths = {
        "input": ["--report", str(tmp_path / "." / "in.onnx")],
        "input-link": ["--save-preprocess", str(tmp_path / "link.onnx"), "--image-scale", "1"],
        "output": ["--report", str(out)],
        "report": [
            "--report",
            str(tmp_path / "r.json"),
            "--save-preprocess",
            str(tmp_path / "r.json"),
            "--image-scale",
            "1",
        ],
    }[target]
    before = src.read_bytes()
    result = runner.invoke(main, [str(src), str(out), *paths, "--no-validate"])
    assert result.exit_code == 2, result.output
    assert "choose another file" in result.output
    assert src.read_bytes() == before and not out.exists() and not (tmp_path / "r.json").exists()
