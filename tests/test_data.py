"""Local datasets, loaders, partitions and mini-batches of models.data."""

from __future__ import annotations

import gzip
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from models.data import (FASHION_MNIST_ROOT, Dataset, batches, dirichlet_partition, iid_partition, load_dataset,
                         load_digits, load_fashion_mnist, load_npz, save_npz, train_test_split)


def _toy(n: int = 12, side: int = 4, classes: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.random((n, 1, side, side), dtype=np.float32), np.arange(n, dtype=np.int64) % classes)


def _label_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label histogram and the global one."""
    classes = int(y.max()) + 1
    overall = np.bincount(y, minlength=classes) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - overall).sum()
                          for p in parts]))


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.fixture(scope="module")
def fashion_train() -> Dataset:
    return load_fashion_mnist(split="train")


# --- Dataset -----------------------------------------------------------------

def test_dataset_basics() -> None:
    ds = _toy()
    assert len(ds) == 12 and ds.num_classes == 3
    sub = ds.subset(np.array([3, 1]))
    assert np.array_equal(sub.y, [0, 1]) and sub.x.shape == (2, 1, 4, 4)
    with pytest.raises(AttributeError):
        ds.x = ds.x  # type: ignore[misc]


@pytest.mark.parametrize(("x", "y", "message"), [
    (np.zeros((2, 1, 4, 4), np.float64), np.zeros(2, np.int64), "x must be a float32"),
    (np.zeros(2, np.float32), np.zeros(2, np.int64), r"x must have shape \[N, \*sample\]"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int32), "y must be an int64"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1), np.int64), r"y must have shape \[N\]"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros(3, np.int64), "x has 2 samples but y has 3"),
    (np.zeros((2, 1, 4, 4), np.float32), np.array([0, -1]), "labels >= 0"),
])
def test_dataset_validation(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Dataset(x, y)


def test_load_digits() -> None:
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10
    assert len(load_dataset("digits")) == 1797


# --- npz -------------------------------------------------------------------

def test_npz_round_trip_is_atomic(tmp_path: Path) -> None:
    ds = _toy()
    path = tmp_path / "local.npz"
    save_npz(path, _toy(n=3))
    save_npz(path, ds)  # overwrite in place
    back = load_npz(path)
    assert np.array_equal(back.x, ds.x) and np.array_equal(back.y, ds.y)
    assert [p.name for p in tmp_path.iterdir()] == ["local.npz"]
    assert np.array_equal(load_dataset(str(path)).y, ds.y)


@pytest.mark.parametrize("layout", ["nhw", "n1hw", "flat"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_npz_accepted_layouts(tmp_path: Path, layout: str, dtype: type) -> None:
    pixels = np.arange(3 * 25).reshape(3, 5, 5) % 256
    shaped = {"nhw": pixels, "n1hw": pixels[:, None], "flat": pixels.reshape(3, 25)}[layout]
    x = shaped.astype(np.uint8) if dtype is np.uint8 else (shaped / 255.0).astype(dtype)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([2, 0, 1], dtype=np.int32))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.x.shape == (3, 1, 5, 5) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_allclose(ds.x[:, 0], pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, r"missing array\(s\) \['y'\]"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(2, np.int64)}, r"missing array\(s\) \['x', 'y'\]"),
    ({"x": np.zeros(2, np.uint8), "y": np.zeros(2, np.int64)}, r"one sample per row, \[N, \*sample\]"),
    ({"x": np.zeros((2, 4, 4), np.int32), "y": np.zeros(2, np.int64)}, "uint8 .* or float"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.full(2, 0.5, np.float32)}, "not whole numbers"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros((2, 1), np.int64)}, "y must be 1-D"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, None], dtype=object)}, r"Python objects \(dtype=object\)"),
])
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_not_a_file_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip file")
    with pytest.raises(ValueError, match="not a usable dataset .npz"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_npz(tmp_path / "single.npy")


def test_npz_whose_header_claims_terabytes_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / "x.npy", "wb") as out:  # a header of 2**40 float32 values, and no data
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        for name in ("x.npy", "y.npy"):
            archive.write(tmp_path / name, name)
    with pytest.raises(ValueError, match=r"bomb.npz: not a usable dataset .npz: 'x' claims 4,398,046,511,104 bytes"):
        load_npz(tmp_path / "bomb.npz")


# --- Fashion-MNIST -----------------------------------------------------------

def test_fashion_mnist_train(fashion_train: Dataset) -> None:
    assert fashion_train.x.shape == (60000, 1, 28, 28) and fashion_train.x.dtype == np.float32
    assert 0.0 <= fashion_train.x.min() and fashion_train.x.max() == 1.0
    assert np.array_equal(np.bincount(fashion_train.y), [6000] * 10)


def test_fashion_mnist_test_split() -> None:
    ds = load_dataset("fashion-mnist:test")
    assert ds.x.shape == (10000, 1, 28, 28) and np.array_equal(np.bincount(ds.y), [1000] * 10)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_dataset("fashion-mnist:validation")


def _write_idx(path: Path, header: bytes, body: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(header + body)


@pytest.mark.parametrize(("header", "body", "message"), [
    (b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28), bytes(2 * 784 - 1), "header says"),
    (b"\x00\x00\x0d\x03" + struct.pack(">III", 2, 28, 28), bytes(2 * 784 * 4), "type 0x0d"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 784), bytes(2 * 784), "3 dimension"),
    (b"\x1f\x8b\x08\x03" + struct.pack(">III", 2, 28, 28), bytes(2 * 784), "bad magic"),
    (b"\x00\x00\x08\x03\x00\x00", b"", "truncated"),
])
def test_fashion_mnist_bad_idx(tmp_path: Path, header: bytes, body: bytes, message: str) -> None:
    shutil.copy(Path(FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz", tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", header, body)
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist(tmp_path, split="test")


def test_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    shutil.copy(Path(FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz", tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28),
               bytes(2 * 784))
    with pytest.raises(ValueError, match="2 images but 10000 labels"):
        load_fashion_mnist(tmp_path, split="test")


def test_load_dataset_unknown_spec() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


# --- splits and partitions ---------------------------------------------------

def test_train_test_split() -> None:
    ds = _toy(n=100)
    train, test = train_test_split(ds, 0.2, seed=1)
    assert (len(train), len(test)) == (80, 20)
    again, _ = train_test_split(ds, 0.2, seed=1)
    other, _ = train_test_split(ds, 0.2, seed=2)
    assert np.array_equal(train.x, again.x) and not np.array_equal(train.x, other.x)
    rows = {row.tobytes() for row in np.concatenate([train.x, test.x])}
    assert len(rows) == 100
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(ds, 1.0, seed=0)


def test_iid_partition() -> None:
    parts = iid_partition(103, 10, seed=3)
    _assert_disjoint_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=3)))
    assert not np.array_equal(parts[0], iid_partition(103, 10, seed=4)[0])
    with pytest.raises(ValueError, match="cannot split 3 samples over 5 clients"):
        iid_partition(3, 5, seed=0)


def test_dirichlet_partition_disjoint_covering_seeded(fashion_train: Dataset) -> None:
    y = fashion_train.y
    parts = dirichlet_partition(y, 20, alpha=0.5, seed=7)
    _assert_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 10 and all(p.dtype == np.int64 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_partition(y, 20, alpha=0.5, seed=7)))
    assert not np.array_equal(parts[0], dirichlet_partition(y, 20, alpha=0.5, seed=8)[0])


def test_dirichlet_partition_skew_follows_alpha(fashion_train: Dataset) -> None:
    y = fashion_train.y
    skewed = _label_skew(y, dirichlet_partition(y, 10, alpha=0.1, seed=0))
    near_iid = _label_skew(y, dirichlet_partition(y, 10, alpha=100.0, seed=0))
    assert skewed > 0.4 and near_iid < 0.05, (skewed, near_iid)


def test_dirichlet_partition_min_size_and_errors() -> None:
    y = np.arange(200) % 10
    parts = dirichlet_partition(y, 8, alpha=0.3, seed=0, min_size=15)
    _assert_disjoint_cover(parts, 200)
    assert min(len(p) for p in parts) >= 15
    _assert_disjoint_cover(dirichlet_partition(y, 10, alpha=0.001, seed=0), 200)  # no NaN shares
    with pytest.raises(ValueError, match="in 5 attempts"):
        dirichlet_partition(y, 10, alpha=0.5, seed=0, min_size=20, max_attempts=5)
    with pytest.raises(ValueError, match="cannot give 10 clients 30 samples"):
        dirichlet_partition(y, 10, alpha=1.0, seed=0, min_size=30)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(y, 4, alpha=0.0, seed=0)


# --- batches -----------------------------------------------------------------

def test_batches_cover_once_shuffled_with_partial_last() -> None:
    ds = _toy(n=10)
    got = list(batches(ds, 4, np.random.default_rng(0)))
    assert [len(by) for _, by in got] == [4, 4, 2]
    assert all(bx.shape[1:] == (1, 4, 4) and bx.dtype == np.float32 and by.dtype == np.int64 for bx, by in got)
    seen = np.concatenate([bx for bx, _ in got])
    order = [int(np.flatnonzero((ds.x == row).all(axis=(1, 2, 3)))[0]) for row in seen]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    again = list(batches(ds, 4, np.random.default_rng(0)))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, again))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(ds, 0, np.random.default_rng(0)))
