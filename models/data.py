"""Local data for devices and simulations: datasets as plain numpy, loaders, partitions, mini-batches."""

from __future__ import annotations

import gzip
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_file import atomic_write

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Dataset:
    """Images x float32 [N, 1, H, W] in [0, 1] and labels y int64 [N]."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be a float32 array, got {getattr(self.x, 'dtype', type(self.x))}")
        if self.x.ndim != 4 or self.x.shape[1] != 1:
            raise ValueError(f"Dataset.x must have shape [N, 1, H, W], got {list(self.x.shape)}")
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64:
            raise ValueError(f"Dataset.y must be an int64 array, got {getattr(self.y, 'dtype', type(self.y))}")
        if self.y.ndim != 1:
            raise ValueError(f"Dataset.y must have shape [N], got {list(self.y.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Dataset.x has {len(self.x)} samples but y has {len(self.y)} labels")
        if len(self.y) and self.y.min() < 0:
            raise ValueError(f"Dataset.y must hold labels >= 0, found {self.y.min()}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        """1 + the largest label (0 for an empty dataset)."""
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, indices: np.ndarray) -> Dataset:
        """The samples at `indices`, in that order."""
        return Dataset(self.x[indices], self.y[indices])


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'tierfl[demo]')") from exc
    bunch = sklearn_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    return Dataset(x, np.asarray(bunch.target, dtype=np.int64))


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    """[N,H,W], [N,1,H,W] or square [N,H*W] pixels (uint8 or float) -> float32 [N,1,H,W] in [0, 1]."""
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"{source}: flat x of shape {list(x.shape)} is not square images "
                             f"({x.shape[1]} is not a perfect square)")
        x = x.reshape(len(x), side, side)
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{source}: x must be [N,H,W], [N,1,H,W] or [N,H*W], got {list(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: x must be uint8 (0-255) or float (0-1), got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Integer labels [N] -> int64."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: y must be a 1-D integer array, got {y.dtype} {list(y.shape)}")
    return y.astype(np.int64, copy=False)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load an .npz holding `x` ([N,H,W], [N,1,H,W] or square [N,H*W]; uint8 or float) and integer `y`."""
    source = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file not found: {source}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not the arrays 'x' and 'y'")
        with data:
            missing = [key for key in ("x", "y") if key not in data.files]
            if missing:
                raise ValueError(f"missing array(s) {missing}; found {sorted(data.files)}, "
                                 "expected 'x' (images) and 'y' (labels)")
            x, y = data["x"], data["y"]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{source}: not a usable dataset .npz: {exc}") from exc
    return Dataset(_as_images(x, source), _as_labels(y, source))


def save_npz(path: str | os.PathLike[str], dataset: Dataset) -> None:
    """Write `dataset` as an uncompressed .npz atomically (temp file in the same folder, then rename)."""
    atomic_write(path, lambda out: np.savez(out, x=dataset.x, y=dataset.y))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes with `ndim` dimensions, validating its header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = raw[:4]
    if len(header) != 4 or header[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if header[2] != _IDX_UBYTE or header[3] != ndim:
        raise ValueError(f"{path}: expected an unsigned-byte IDX file with {ndim} dimension(s), "
                         f"got type 0x{header[2]:02x} with {header[3]}")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike[str] = FASHION_MNIST_ROOT, split: str = "train") -> Dataset:
    """Fashion-MNIST from the IDX gz files of Debian's dataset-fashion-mnist (60k train / 10k test, 28x28)."""
    if split not in _FASHION_FILES:
        raise ValueError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    folder = Path(root)
    images_name, labels_name = _FASHION_FILES[split]
    missing = [name for name in (images_name, labels_name) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}); "
                                "install it with: sudo apt-get install dataset-fashion-mnist")
    images = _read_idx(folder / images_name, ndim=3)
    labels = _read_idx(folder / labels_name, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    return Dataset(_as_images(images, str(folder)), labels.astype(np.int64))


def load_dataset(spec: str) -> Dataset:
    """Load by name: 'digits', 'fashion-mnist[:train|:test]', or a path to an .npz file."""
    name, _, split = spec.partition(":")
    if name == "digits" and not split:
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(split=split or "train")
    if spec.endswith(".npz") or Path(spec).is_file():
        return load_npz(spec)
    raise ValueError(f"unknown dataset {spec!r}: expected 'digits', 'fashion-mnist[:train|:test]' "
                     "or a path to an .npz file")


def train_test_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split by a seeded random permutation into (train, test); test gets round(N * fraction) samples."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(ds))
    n_test = int(round(len(ds) * test_fraction))
    return ds.subset(np.sort(order[n_test:])), ds.subset(np.sort(order[:n_test]))


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split indices 0..n-1 into `num_clients` shuffled parts of near-equal size."""
    _check_clients(n, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(y: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 10, max_attempts: int = 1000) -> list[np.ndarray]:
    """Non-IID label skew (NIID-Bench style): per class, shares ~ Dir(alpha); resampled until all have >= min_size.

    As in NIID-Bench, a client already holding N/num_clients samples gets no share of later classes.
    """
    y = np.asarray(y)
    _check_clients(len(y), num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(y):
        raise ValueError(f"cannot give {num_clients} clients {min_size} samples each from {len(y)} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for indices in by_class:
            open_clients = sizes < len(y) / num_clients
            shares = rng.dirichlet(np.full(num_clients, alpha)) * open_clients
            if shares.sum() <= 0:  # tiny alpha can underflow every open client's share to 0
                shares = open_clients.astype(np.float64)
            cuts = (np.cumsum(shares / shares.sum())[:-1] * len(indices)).astype(int)
            for client, chunk in enumerate(np.split(rng.permutation(indices), cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) partition of {len(y)} samples over {num_clients} clients "
                     f"gave every client >= {min_size} samples in {max_attempts} attempts; "
                     "raise alpha, lower min_size or use fewer clients")


def _check_clients(n: int, num_clients: int) -> None:
    """Validate a partition request."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"cannot split {n} samples over {num_clients} clients")


def batches(ds: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled mini-batches (x, y) covering the dataset once; the last one may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(len(ds))
    for start in range(0, len(ds), batch_size):
        picked = order[start:start + batch_size]
        yield ds.x[picked], ds.y[picked]
