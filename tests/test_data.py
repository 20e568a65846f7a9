"""Tests for onnx_mixquant.data.load_samples: good files, and every error naming file and input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnx_mixquant.data import load_samples
from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.graph import ModelInput

X = ModelInput("x", "float32", ("N", 4))
M = ModelInput("mask", "int64", ("N", "T"))
IDS = ModelInput("ids", "int64", ("N", "T"))


def _arrays(n: int = 7, t: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "mask": rng.integers(0, 2, (n, t)).astype(np.int64),
    }


def _npz(tmp_path: Path, name: str = "s.npz", /, **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_with_labels(tmp_path: Path) -> None:
    a = _arrays()
    labels = np.arange(7, dtype=np.int32)
    path = _npz(tmp_path, **a, labels=labels)
    s = load_samples(path, [X, M], batch_size=3)
    assert s.source == str(path)
    assert [f["x"].shape[0] for f in s.feeds] == [3, 3, 1]
    for k in ("x", "mask"):
        assert np.array_equal(np.concatenate([f[k] for f in s.feeds]), a[k])
        assert s.feeds[0][k].dtype == a[k].dtype
    assert s.labels is not None and s.labels.dtype == np.int64
    assert np.array_equal(s.labels, labels)


def test_limit_keeps_first_samples(tmp_path: Path) -> None:
    a = _arrays()
    path = _npz(tmp_path, **a, labels=np.arange(7))
    s = load_samples(path, [X, M], batch_size=2, limit=5)
    assert [f["x"].shape[0] for f in s.feeds] == [2, 2, 1]
    assert np.array_equal(np.concatenate([f["x"] for f in s.feeds]), a["x"][:5])
    assert s.labels is not None and list(s.labels) == [0, 1, 2, 3, 4]
    assert sum(f["x"].shape[0] for f in load_samples(path, [X, M], limit=100).feeds) == 7


def test_npy_single_input(tmp_path: Path) -> None:
    x = _arrays()["x"]
    path = tmp_path / "x.npy"
    np.save(path, x)
    s = load_samples(path, [X], batch_size=4)
    assert [f["x"].shape[0] for f in s.feeds] == [4, 3] and s.labels is None
    assert np.array_equal(np.concatenate([f["x"] for f in s.feeds]), x)
    with pytest.raises(CalibrationError, match="x.npy.*2 inputs \\('x', 'mask'\\)"):
        load_samples(path, [X, M])


def test_fixed_batch_axis(tmp_path: Path) -> None:
    fixed = ModelInput("x", "float32", (1, 4))
    path = _npz(tmp_path, x=_arrays(n=5)["x"])
    s = load_samples(path, [fixed], batch_size=32)
    assert [f["x"].shape for f in s.feeds] == [(1, 4)] * 5
    two = ModelInput("x", "float32", (2, 4))
    with pytest.raises(CalibrationError, match="fixes axis 0 to 2.*5 samples"):
        load_samples(path, [two])
    assert [f["x"].shape for f in load_samples(path, [two], limit=4).feeds] == [(2, 4)] * 2
    with pytest.raises(CalibrationError, match="fixes axis 0 to 2.*3 samples"):
        load_samples(path, [two], limit=3)


def test_unknown_dims_and_type_accept_anything(tmp_path: Path) -> None:
    loose = ModelInput("x", "?", ("?", ""))
    path = _npz(tmp_path, x=np.zeros((3, 9), np.float16))
    assert load_samples(path, [loose]).feeds[0]["x"].shape == (3, 9)


def test_unexpected_key(tmp_path: Path) -> None:
    path = _npz(tmp_path, "data.npz", **_arrays(), extra=np.zeros(7))
    with pytest.raises(CalibrationError) as info:
        load_samples(path, [X, M])
    msg = str(info.value)
    assert "data.npz" in msg and "'extra'" in msg and "'x'" in msg and "'mask'" in msg and "'labels'" in msg


def test_missing_input(tmp_path: Path) -> None:
    path = _npz(tmp_path, "data.npz", x=_arrays()["x"])
    with pytest.raises(CalibrationError, match="data.npz.*'mask'"):
        load_samples(path, [X, M])


def test_dtype_is_checked_not_cast(tmp_path: Path) -> None:
    a = _arrays()
    path = _npz(tmp_path, "data.npz", x=a["x"].astype(np.float64), mask=a["mask"])
    with pytest.raises(CalibrationError) as info:
        load_samples(path, [X, M])
    msg = str(info.value)
    assert "data.npz" in msg and "'x'" in msg and "float32" in msg and "float64" in msg


def test_rank_and_static_dims(tmp_path: Path) -> None:
    path = _npz(tmp_path, "data.npz", x=np.zeros((7, 4, 1), np.float32))
    with pytest.raises(CalibrationError, match="data.npz: input 'x': expected rank 2"):
        load_samples(path, [X])
    path = _npz(tmp_path, "data.npz", x=np.zeros((7, 5), np.float32))
    with pytest.raises(CalibrationError, match="input 'x': dim 1 must be 4, got 5"):
        load_samples(path, [X])


def test_shared_dim_names_must_agree(tmp_path: Path) -> None:
    path = _npz(tmp_path, "data.npz", mask=np.zeros((7, 5), np.int64), ids=np.zeros((7, 6), np.int64))
    with pytest.raises(CalibrationError) as info:
        load_samples(path, [M, IDS])
    msg = str(info.value)
    assert "data.npz" in msg and "'ids'" in msg and "'mask'" in msg and "'T'" in msg


def test_sample_counts_must_agree(tmp_path: Path) -> None:
    a = _arrays()
    path = _npz(tmp_path, "data.npz", x=a["x"], mask=a["mask"][:6])
    with pytest.raises(CalibrationError, match="data.npz: inputs hold different numbers of samples"):
        load_samples(path, [X, M])
    path = _npz(tmp_path, "empty.npz", x=np.zeros((0, 4), np.float32))
    with pytest.raises(CalibrationError, match="empty.npz: no samples"):
        load_samples(path, [X])


def test_labels_checked(tmp_path: Path) -> None:
    x = _arrays()["x"]
    with pytest.raises(CalibrationError, match="data.npz: 6 labels for 7 samples"):
        load_samples(_npz(tmp_path, "data.npz", x=x, labels=np.arange(6)), [X])
    with pytest.raises(CalibrationError, match="data.npz: 'labels' must hold integer"):
        load_samples(_npz(tmp_path, "data.npz", x=x, labels=np.zeros(7)), [X])


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated"])
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(CalibrationError, match="missing.npz.*not found"):
        load_samples(tmp_path / "missing.npz", [X])
    with pytest.raises(CalibrationError, match="is a directory"):
        load_samples(tmp_path, [X])
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(content)
    with pytest.raises(CalibrationError, match="corrupt.npz"):
        load_samples(bad, [X])


def test_corrupt_member(tmp_path: Path) -> None:
    path = _npz(tmp_path, "data.npz", x=_arrays()["x"])
    raw = bytearray(path.read_bytes())
    raw[100:140] = b"\xff" * 40  # inside x.npy's header / data
    path.write_bytes(bytes(raw))
    with pytest.raises(CalibrationError, match="data.npz"):
        load_samples(path, [X])


def test_bad_options(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_arrays()["x"])
    with pytest.raises(ConfigError, match="batch size"):
        load_samples(path, [X], batch_size=0)
    with pytest.raises(ConfigError, match="limit"):
        load_samples(path, [X], limit=0)


def test_input_named_labels_is_an_input(tmp_path: Path) -> None:
    inp = ModelInput("labels", "int64", ("N",))
    s = load_samples(_npz(tmp_path, "data.npz", labels=np.arange(3)), [inp])
    assert s.labels is None and list(s.feeds[0]["labels"]) == [0, 1, 2]
