"""Tests for onnx_mixquant.data.sources: load_samples and open_calibration (every source kind, sampling,
batching, spooling, memory), and every error naming its file, item and input."""

from __future__ import annotations

import gc
import tempfile
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_mixquant.config import ImageSpec
from onnx_mixquant.data import preprocess
from onnx_mixquant.data.sources import load_samples, open_calibration
from onnx_mixquant.errors import CalibrationError, ConfigError
from onnx_mixquant.read.model import ModelInput

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
    with pytest.raises(CalibrationError, match="folder .* is empty"):  # a folder of samples is read too
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


# ------------------------------------------------------------------------- open_calibration
def _feeds_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def _cat(batches: Iterable[dict[str, np.ndarray]], key: str = "x") -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def _npy_folder(folder: Path, n: int, shape: tuple[int, ...] = (4,)) -> np.ndarray:
    """n single samples (one rank short of X) whose values are their index; returns them stacked."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.stack([np.full(shape, i, np.float32) for i in range(n)])
    for i, sample in enumerate(data):
        np.save(folder / f"s{i:03d}.npy", sample)
    return data


def test_folder_of_npy_samples(tmp_path: Path) -> None:
    data = _npy_folder(tmp_path / "calib", 10)
    (tmp_path / "calib" / "README.txt").write_text("ignored")
    calib = open_calibration(tmp_path / "calib", [X], batch_size=4)
    assert calib.source == str(tmp_path / "calib")
    assert (calib.num_samples, calib.batch_size, calib.num_batches) == (10, 4, 3)
    first = list(calib.batches())
    assert [b["x"].shape for b in first] == [(4, 4), (4, 4), (2, 4)]
    assert all(type(b["x"]) is np.ndarray and b["x"].dtype == np.float32 for b in first)
    assert np.array_equal(_cat(first), data)
    assert _feeds_equal(first, list(calib.batches()))  # re-iterable: same data, same order


def test_folder_of_npz_batches_two_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    a, b = _arrays(n=3), _arrays(n=4, t=5)
    np.savez(folder / "a.npz", x=a["x"], mask=a["mask"], labels=np.arange(3))  # labels are ignored
    np.savez(folder / "b.npz", x=b["x"], mask=b["mask"])
    np.savez(folder / "c.npz", x=a["x"][0], mask=a["mask"][0])  # one sample: rank one short
    calib = open_calibration(folder, [X, M], batch_size=5)
    got = list(calib.batches())
    assert [g["x"].shape[0] for g in got] == [5, 3] and calib.num_samples == 8
    for k in ("x", "mask"):
        assert np.array_equal(_cat(got, k), np.concatenate([a[k], b[k], a[k][:1]]))


def test_list_of_paths_keeps_its_order(tmp_path: Path) -> None:
    data = _npy_folder(tmp_path, 3)
    paths = [tmp_path / "s002.npy", str(tmp_path / "s000.npy")]
    calib = open_calibration(paths, [X], batch_size=8)
    assert np.array_equal(_cat(calib.batches()), data[[2, 0]])
    with pytest.raises(CalibrationError, match="nope.npy.*not found"):
        open_calibration([tmp_path / "nope.npy"], [X])
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(CalibrationError, match="a.txt.*unsupported type"):
        open_calibration([tmp_path / "s000.npy", tmp_path / "a.txt"], [X])


def test_single_npz_and_npy(tmp_path: Path) -> None:
    a = _arrays(n=7)
    calib = open_calibration(_npz(tmp_path, "all.npz", **a), [X, M], batch_size=3)
    got = list(calib.batches())
    assert [g["x"].shape[0] for g in got] == [3, 3, 1]
    assert np.array_equal(_cat(got, "mask"), a["mask"])
    np.save(tmp_path / "all.npy", a["x"])
    got = list(open_calibration(tmp_path / "all.npy", [X], batch_size=3).batches())
    assert np.array_equal(_cat(got), a["x"]) and all(type(g["x"]) is np.ndarray for g in got)


def _pb(path: Path, array: np.ndarray, name: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(numpy_helper.from_array(array, name).SerializeToString())


def test_onnx_test_data_sets(tmp_path: Path) -> None:
    a, b = _arrays(n=2), _arrays(n=3)
    # set 2 names its tensors (files in the other order); set 10 relies on the input order
    _pb(tmp_path / "test_data_set_2" / "input_0.pb", a["mask"], "mask")
    _pb(tmp_path / "test_data_set_2" / "input_1.pb", a["x"], "x")
    _pb(tmp_path / "test_data_set_2" / "output_0.pb", np.zeros(3, np.float32), "y")
    _pb(tmp_path / "test_data_set_10" / "input_0.pb", b["x"])
    _pb(tmp_path / "test_data_set_10" / "input_1.pb", b["mask"])
    calib = open_calibration(tmp_path, [X, M], batch_size=4)
    got = list(calib.batches())
    assert calib.num_samples == 5 and [g["x"].shape[0] for g in got] == [4, 1]
    for k in ("x", "mask"):  # numeric order of the sets: 2 before 10
        assert np.array_equal(_cat(got, k), np.concatenate([a[k], b[k]]))
    one = open_calibration(tmp_path / "test_data_set_10", [X, M])
    assert np.array_equal(_cat(one.batches()), b["x"])


def test_onnx_test_data_errors(tmp_path: Path) -> None:
    _pb(tmp_path / "test_data_set_0" / "input_0.pb", _arrays()["x"], "y")
    with pytest.raises(CalibrationError, match="input_0.pb: tensor 'y' is not a model input; inputs: 'x'"):
        open_calibration(tmp_path, [X])
    _pb(tmp_path / "test_data_set_0" / "input_0.pb", _arrays()["x"])
    with pytest.raises(CalibrationError, match="test_data_set_0: no array for model input\\(s\\) 'mask'"):
        open_calibration(tmp_path, [X, M])
    (tmp_path / "test_data_set_0" / "input_0.pb").write_bytes(b"\xff\xff garbage")
    with pytest.raises(CalibrationError, match="cannot read ONNX tensor file.*input_0.pb"):
        open_calibration(tmp_path, [X])


IMG = ModelInput("img", "float32", ("N", 3, 2, 2))


class _FakePreprocessor:
    """Stands in for preprocess.ImagePreprocessor: pixel value = length of the file name."""

    made = 0

    def __init__(self, spec: ImageSpec) -> None:
        assert isinstance(spec, ImageSpec)
        type(self).made += 1

    def __call__(self, path: Path) -> np.ndarray:
        if path.read_bytes() == b"bad":
            raise CalibrationError(f"cannot decode image {str(path)!r}")
        size = 3 if path.stem == "big" else 2
        return np.full((3, size, 2), len(path.name), np.float32)


@pytest.fixture
def fake_images(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(_FakePreprocessor, "made", 0)
    monkeypatch.setattr(preprocess, "ImagePreprocessor", _FakePreprocessor)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "cc.jpeg", "notes.txt"):
        (folder / name).write_bytes(b"image")
    return folder


def test_image_folder(fake_images: Path) -> None:
    calib = open_calibration(fake_images, [IMG], batch_size=2, image_spec=ImageSpec())
    assert calib.num_samples == 3 and _FakePreprocessor.made == 0  # built lazily
    got = list(calib.batches())
    assert [g["img"].shape for g in got] == [(2, 3, 2, 2), (1, 3, 2, 2)]
    assert [float(v) for v in _cat(got, "img")[:, 0, 0, 0]] == [5, 5, 7]  # a.JPG, b.png, cc.jpeg
    assert _feeds_equal(got, list(calib.batches())) and _FakePreprocessor.made == 1


def test_image_folder_errors(fake_images: Path) -> None:
    with pytest.raises(CalibrationError, match="images.*is a folder of images: give the preprocessing"):
        open_calibration(fake_images, [IMG])
    with pytest.raises(CalibrationError, match="single-input models only; this model has 2 inputs"):
        open_calibration(fake_images, [IMG, X], image_spec=ImageSpec())
    (fake_images / "b.png").write_bytes(b"bad")
    with pytest.raises(CalibrationError, match="cannot decode image.*b.png"):
        list(open_calibration(fake_images, [IMG], image_spec=ImageSpec()).batches())
    (fake_images / "b.png").write_bytes(b"image")
    (fake_images / "big.png").write_bytes(b"image")
    with pytest.raises(CalibrationError, match="big.png: input 'img': sample shape .* differs .*a.JPG"):
        list(
            open_calibration(
                fake_images, [ModelInput("img", "float32", ("N", 3, "H", 2))], image_spec=ImageSpec()
            ).batches()
        )
    with pytest.raises(CalibrationError, match="big.png: input 'img': dim 2 must be 2, got 3"):
        list(open_calibration(fake_images, [IMG], batch_size=1, image_spec=ImageSpec()).batches())
    np.save(fake_images / "x.npy", np.zeros((3, 2, 2), np.float32))
    with pytest.raises(CalibrationError, match="mixes images .* and arrays \\(x.npy"):
        open_calibration(fake_images, [IMG], image_spec=ImageSpec())


def test_real_image_preprocessing(tmp_path: Path) -> None:
    """The real preprocess.ImagePreprocessor: RGB / 255 in NCHW, one sample per file, name order."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    for name, rgb in zip(["b.png", "a.png"], pixels, strict=True):
        image.fromarray(rgb).save(tmp_path / name)
    inp = ModelInput("img", "float32", ("N", 3, 4, 4))
    got = list(open_calibration(tmp_path, [inp], batch_size=8, image_spec=ImageSpec()).batches())
    assert len(got) == 1 and got[0]["img"].dtype == np.float32
    expected = pixels[::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255  # a.png first
    np.testing.assert_allclose(got[0]["img"], expected, atol=1e-6)
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="c.png"):
        list(open_calibration(tmp_path, [inp], image_spec=ImageSpec()).batches())


def test_calib_size_is_a_seeded_subset(tmp_path: Path) -> None:
    _npy_folder(tmp_path / "one", 20)
    np.savez(tmp_path / "all.npz", x=np.repeat(np.arange(20, dtype=np.float32)[:, None], 4, axis=1))

    def picked(source: Path, seed: int) -> list[int]:
        calib = open_calibration(source, [X], calib_size=6, seed=seed, batch_size=4)
        assert calib.num_samples == 6 and calib.num_batches == 2
        return [int(v) for v in _cat(calib.batches())[:, 0]]

    expected = sorted(np.random.default_rng(3).choice(20, size=6, replace=False).tolist())
    assert picked(tmp_path / "one", 3) == expected == picked(tmp_path / "all.npz", 3)
    assert picked(tmp_path / "one", 3) == expected  # deterministic
    assert picked(tmp_path / "one", 4) != expected
    whole = open_calibration(tmp_path / "one", [X], calib_size=20)
    assert [int(v) for v in _cat(whole.batches())[:, 0]] == list(range(20))


def test_fixed_batch_dim(tmp_path: Path) -> None:
    _npy_folder(tmp_path, 5)
    one = open_calibration(tmp_path, [ModelInput("x", "float32", (1, 4))], batch_size=16)
    assert one.batch_size == 1 and [b["x"].shape for b in one.batches()] == [(1, 4)] * 5
    two = ModelInput("x", "float32", (2, 4))
    with pytest.raises(CalibrationError, match="fixes axis 0 to 2.*5 samples"):
        open_calibration(tmp_path, [two])
    calib = open_calibration(tmp_path, [two], calib_size=4)
    assert [b["x"].shape for b in calib.batches()] == [(2, 4)] * 2
    with pytest.raises(CalibrationError, match="fixes axis 0 to 2.*3 samples"):
        calib.as_samples(limit=3)
    with pytest.raises(CalibrationError, match="fix different batch sizes"):
        open_calibration(tmp_path, [two, ModelInput("m", "int64", (1, 3))])


def test_as_samples(tmp_path: Path) -> None:
    data = _npy_folder(tmp_path, 10)
    calib = open_calibration(tmp_path, [X], batch_size=4)
    s = calib.as_samples(limit=6)
    assert s.source == str(tmp_path) and s.labels is None
    assert [f["x"].shape[0] for f in s.feeds] == [4, 2] and np.array_equal(_cat(s.feeds), data[:6])
    assert np.array_equal(_cat(calib.as_samples().feeds), data)
    with pytest.raises(ConfigError, match="limit"):
        calib.as_samples(limit=0)


class _Reader:
    """A CalibrationDataReader-like object: get_next() gives batches of 2 and then None."""

    def __init__(self, n: int = 5) -> None:
        self.data = _arrays(n=2 * n)
        self.calls = 0
        self._it = iter(range(n))

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        i = next(self._it, None)
        return None if i is None else {k: v[2 * i : 2 * i + 2] for k, v in self.data.items()}


class _RewindReader(_Reader):
    def __init__(self, n: int = 5) -> None:
        super().__init__(n)
        self.n, self.rewinds = n, 0

    def rewind(self) -> None:
        self.rewinds += 1
        self._it = iter(range(self.n))


def test_reader_with_rewind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reader = _RewindReader()
    calib = open_calibration(reader, [X, M], batch_size=3)
    assert calib.source == "CalibrationDataReader _RewindReader" and calib.num_samples == 10
    first = list(calib.batches())
    assert [b["x"].shape[0] for b in first] == [3, 3, 3, 1] and reader.rewinds == 2
    assert np.array_equal(_cat(first, "mask"), reader.data["mask"])
    assert _feeds_equal(first, list(calib.batches())) and reader.rewinds == 3
    assert list(tmp_path.iterdir()) == []  # nothing spooled
    sub = open_calibration(_RewindReader(), [X, M], calib_size=4, seed=1)
    rows = sorted(np.random.default_rng(1).choice(10, size=4, replace=False).tolist())
    assert np.array_equal(_cat(sub.batches()), reader.data["x"][rows])
    reader.n = 4  # the reader now gives less after rewind()
    fewer = r"_RewindReader: get_next\(\) gave 4 items after rewind\(\), 5 on the first pass"
    with pytest.raises(CalibrationError, match=fewer):
        list(calib.batches())


def test_reader_without_rewind_is_spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reader = _Reader()
    calib = open_calibration(reader, [X, M], batch_size=4)
    (spool,) = tmp_path.iterdir()
    assert len(list(spool.glob("*.npy"))) == 10
    first = list(calib.batches())
    assert np.array_equal(_cat(first), reader.data["x"]) and _feeds_equal(first, list(calib.batches()))
    with calib:
        pass
    assert not spool.exists()
    reader = _Reader()
    calib = open_calibration(reader, [X, M], calib_size=3)  # the first 3 samples, read no further
    assert reader.calls == 2 and np.array_equal(_cat(calib.batches()), reader.data["x"][:3])
    del calib
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # the finalizer deleted the spool


def test_onnxruntime_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    class OrtReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": np.ones((2, 4), np.float32)}, {"x": np.zeros((1, 4), np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with open_calibration(OrtReader(), [X]) as calib:
        assert calib.source == "CalibrationDataReader OrtReader"
        assert [float(v) for v in _cat(calib.batches())[:, 0]] == [1, 1, 0]
    assert list(tmp_path.iterdir()) == []


def test_generator_and_lists_of_dicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = _arrays(n=6)
    gen = ({"x": data["x"][i], "mask": data["mask"][i]} for i in range(6))  # single samples
    calib = open_calibration(gen, [X, M], batch_size=4)
    assert calib.source == "iterable generator" and calib.num_samples == 6
    first = list(calib.batches())
    assert np.array_equal(_cat(first, "mask"), data["mask"]) and _feeds_equal(first, list(calib.batches()))
    calib.close()
    items = [{"x": data["x"][:4], "mask": data["mask"][:4]}, {"x": data["x"][4:], "mask": data["mask"][4:]}]
    listed = open_calibration(items, [X, M], batch_size=3)
    assert listed.source == "list of 2 input dicts"
    assert _feeds_equal(list(listed.batches()), list(open_calibration(data, [X, M], batch_size=3).batches()))
    assert list(tmp_path.iterdir()) == []


def test_python_object_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = _arrays()["x"]
    gen = ({"x": x[:2]} if i < 2 else {"x": x[:2].astype(np.float64)} for i in range(3))
    wrong = "item 2 of iterable generator: input 'x': expected dtype float32, got float64"
    with pytest.raises(CalibrationError, match=wrong):
        open_calibration(gen, [X])
    assert list(tmp_path.iterdir()) == []  # a failed spool is deleted
    with pytest.raises(CalibrationError, match="item 1 of list of 2 input dicts: expected a dict.*got int"):
        open_calibration([{"x": x}, 3], [X])
    with pytest.raises(CalibrationError, match="item 0 of .*: no array for model input\\(s\\) 'mask'"):
        open_calibration([{"x": x}], [X, M])
    with pytest.raises(CalibrationError, match="_Reader.*no samples"):
        open_calibration(_Reader(n=0), [X])
    with pytest.raises(CalibrationError, match="unsupported calibration source of type int"):
        open_calibration(42, [X])
    with pytest.raises(CalibrationError, match="empty list"):
        open_calibration([], [X])


def test_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    with pytest.raises(CalibrationError, match="calib' not found"):
        open_calibration(folder, [X])
    folder.mkdir()
    with pytest.raises(CalibrationError, match="calib' is empty"):
        open_calibration(folder, [X])
    (folder / "notes.txt").write_text("")
    with pytest.raises(CalibrationError, match="calib' has no supported files"):
        open_calibration(folder, [X])
    (folder / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="cannot read calibration file .*bad.npy"):
        open_calibration(folder, [X])
    (folder / "bad.npy").unlink()
    np.savez(folder / "x.npz", x=np.zeros((2, 4), np.float64))
    with pytest.raises(CalibrationError, match="x.npz: input 'x': expected dtype float32, got float64"):
        open_calibration(folder, [X])
    np.savez(folder / "x.npz", x=np.zeros((2, 4, 1), np.float32))
    with pytest.raises(CalibrationError, match="x.npz: input 'x': expected rank 2 .* or 1 \\(one sample\\)"):
        open_calibration(folder, [X])
    np.savez(folder / "x.npz", x=np.zeros((2, 5), np.float32))
    with pytest.raises(CalibrationError, match="x.npz: input 'x': dim 1 must be 4, got 5"):
        open_calibration(folder, [X])
    np.savez(folder / "x.npz", x=np.zeros((2, 4), np.float32), extra=np.zeros(2))
    with pytest.raises(CalibrationError, match="x.npz: unexpected key 'extra'"):
        open_calibration(folder, [X])
    np.save(folder / "y.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(CalibrationError, match="y.npy: a .npy file holds one array, but the model has 2 in"):
        open_calibration(folder / "y.npy", [X, M])


def test_shapes_must_agree_to_be_batched(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", mask=np.zeros((2, 5), np.int64))
    np.savez(tmp_path / "b.npz", mask=np.zeros((2, 6), np.int64))
    with pytest.raises(CalibrationError, match="b.npz: input 'mask': sample shape \\(6,\\) differs .*a.npz"):
        open_calibration(tmp_path, [M], batch_size=2)
    calib = open_calibration(tmp_path, [M], batch_size=1)  # batches of 1 may differ
    assert [b["mask"].shape for b in calib.batches()] == [(1, 5), (1, 5), (1, 6), (1, 6)]


def test_file_changed_after_open(tmp_path: Path) -> None:
    _npy_folder(tmp_path, 3)
    calib = open_calibration(tmp_path, [X])
    np.save(tmp_path / "s001.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(CalibrationError, match="s001.npy: 2 samples now, 1 when opened"):
        list(calib.batches())


def test_bad_calibration_options(tmp_path: Path) -> None:
    _npy_folder(tmp_path, 2)
    with pytest.raises(ConfigError, match="batch size"):
        open_calibration(tmp_path, [X], batch_size=0)
    with pytest.raises(ConfigError, match="calib_size"):
        open_calibration(tmp_path, [X], calib_size=0)


@pytest.mark.parametrize("layout", ["npy-folder", "npz-folder", "one-npy"])
def test_memory_stays_near_one_batch(tmp_path: Path, layout: str) -> None:
    """200 samples of 64 KB: iterating in batches of 4 must not hold the 12.8 MB at once."""
    inp = ModelInput("x", "float32", ("N", 16384))
    n, total = 200, 200 * 16384 * 4
    rng = np.random.default_rng(0)
    if layout == "one-npy":
        np.save(tmp_path / "all.npy", rng.standard_normal((n, 16384), dtype=np.float32))
        source = tmp_path / "all.npy"
    else:
        for i in range(n):
            sample = rng.standard_normal(16384, dtype=np.float32)
            if layout == "npy-folder":
                np.save(tmp_path / f"{i:03d}.npy", sample)
            else:
                np.savez(tmp_path / f"{i:03d}.npz", x=sample)
        source = tmp_path
    calib = open_calibration(source, [inp], batch_size=4)
    tracemalloc.start()
    try:
        seen = sum(b["x"].shape[0] for b in calib.batches())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == n
    assert peak < 0.2 * total, f"peak {peak} bytes for {total} bytes of samples"
