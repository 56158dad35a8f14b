"""Local data for devices and simulations: datasets as plain numpy, loaders, partitions, mini-batches.

A dataset holds N samples of any shape, x float32 [N, *sample] and labels y int64 [N]. A model
takes one sample shape (its card's `input_shape`, without the batch axis) and a number of
classes; `fit_to_model` shapes the data for it or says why it cannot. A sample fits when:

1. it has the model's shape;
2. it has it once axes of size 1 are left out: a single channel added or dropped
   ([28, 28] -> [1, 28, 28], [1, 40, 49] -> [40, 49]);
3. the model takes flat samples [F] and the sample holds F values: flattened row-major
   ([3, 4] -> [12], [1, 8, 8] -> [64]);
4. the model takes single-channel images [1, H, W] and the sample is flat with H*W values:
   reshaped row by row ([784] -> [1, 28, 28]).

Nothing else is mapped: values are never transposed, cropped, resized or picked by channel, so
[3, 32, 32] data for a [1, 28, 28] model, or [100, 3] windows for a [3, 100] model, are refused.
Every label must be below the model's number of classes.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
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
_MAX_LABEL = 2**62  # float labels beyond this are not taken for class numbers (and would not fit int64)


@dataclass(frozen=True)
class Dataset:
    """Samples x float32 [N, *sample] (any sample shape, e.g. [1, H, W], [C, T], [F]) and labels y int64 [N]."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be a float32 array, got {getattr(self.x, 'dtype', type(self.x))}")
        if self.x.ndim < 2:
            raise ValueError(f"Dataset.x must have shape [N, *sample] (2 or more axes), got {list(self.x.shape)}")
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
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: x's shape without the batch axis."""
        return tuple(self.x.shape[1:])

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


def _as_samples(x: np.ndarray, source: str) -> np.ndarray:
    """x [N, *sample] -> float32; single-channel images as ever: [N,H,W] and square flat [N,H*W] -> [N,1,H,W]."""
    if x.ndim < 2:
        raise ValueError(f"{source}: x must hold one sample per row, [N, *sample], got shape {list(x.shape)}; "
                         "for one value per sample save x.reshape(-1, 1)")
    if 0 in x.shape[1:]:
        raise ValueError(f"{source}: x's samples hold no values (shape {list(x.shape)})")
    if x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        x = x.reshape(len(x), math.isqrt(x.shape[1]), math.isqrt(x.shape[1]))
    if x.ndim == 3:
        x = x[:, None]
    return _as_float(x, source)


def _as_float(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 -> float32 / 255; float16/32/64 -> float32 as is, refused if any value is NaN, infinite or too large."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: x must be uint8 (0-255, scaled to 0-1) or float (taken as is), got {x.dtype}; "
                         "save it as float32 scaled as the model expects")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, counted below
        values = x.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        bad_samples = int(np.count_nonzero(~finite.reshape(len(finite), -1).all(axis=1)))
        too_large = " or beyond float32's range" if x.dtype.itemsize > 4 else ""
        raise ValueError(f"{source}: x holds {int(np.count_nonzero(~finite))} NaN or infinite values{too_large} "
                         f"(in {bad_samples} of {len(x)} samples); drop or repair those samples")
    return values


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Class labels [N] of any integer dtype, or floats that are whole numbers -> int64 (>= 0)."""
    if y.ndim != 1:
        raise ValueError(f"{source}: y must be 1-D, one class label per sample, got shape {list(y.shape)}")
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (np.abs(y) < _MAX_LABEL)
        whole[whole] = np.floor(y[whole]) == y[whole]
        if not whole.all():
            raise ValueError(f"{source}: y must hold class labels, but {int(np.count_nonzero(~whole))} of its "
                             f"{y.dtype} values are not whole numbers (first: {y[~whole][0]}); save y as integers")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: y must hold integer class labels, got {y.dtype}; save y as integers 0, 1, ...")
    elif len(y) and np.issubdtype(y.dtype, np.unsignedinteger) and y.max() >= _MAX_LABEL:
        raise ValueError(f"{source}: y holds label {y.max()}, too large for a class label")
    labels = y.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{source}: y holds {int(np.count_nonzero(labels < 0))} negative labels (smallest "
                         f"{labels.min()}); class labels count from 0")
    return labels


def _check_declared_size(data: np.lib.npyio.NpzFile, key: str) -> None:
    """ValueError if one array of an open .npz claims more bytes than its member holds (or is no array).

    numpy allocates what a header claims before it reads: a header claiming terabytes must not get that far.
    """
    member = data.zip.getinfo(key if key in data.zip.namelist() else f"{key}.npy")
    with data.zip.open(member) as stream:
        major, _ = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and declared > member.file_size:  # objects are pickled: _read_array refuses them
        raise ValueError(f"{key!r} claims {declared:,} bytes ({dtype} of shape {list(shape)}) but its member holds "
                         f"{member.file_size:,}")


def _read_array(data: np.lib.npyio.NpzFile, key: str, source: str) -> np.ndarray:
    """One array of an open .npz (never unpickled)."""
    try:
        return data[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise ValueError(f"{source}: {key!r} is an array of Python objects (dtype=object), which is never loaded "
                         f"(unpickling can run code); save {key} as a numeric array, e.g. np.asarray({key}, "
                         f"{'np.float32' if key == 'x' else 'np.int64'})") from None


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load an .npz holding `x` [N, *sample] (uint8 scaled to 0-1, float as is) and class labels `y` [N].

    x keeps its shape, except single-channel images as ever: [N, H, W] and flat [N, H*W] with H == W
    are read as [N, 1, H, W] (`fit_to_model` maps them back for a model that takes other shapes).
    Labels may be of any integer dtype, or floats that are whole numbers.
    """
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
                                 "expected 'x' (samples) and 'y' (labels)")
            for key in ("x", "y"):
                _check_declared_size(data, key)
            x, y = _read_array(data, "x", source), _read_array(data, "y", source)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if str(exc).startswith(source):
            raise
        raise ValueError(f"{source}: not a usable dataset .npz: {exc}") from exc
    except MemoryError as exc:  # honest sizes (a zip member's too may claim more than it holds), too large here
        raise ValueError(f"{source}: its arrays do not fit in this machine's memory ({exc}); "
                         "split the data into smaller .npz files") from None
    samples, labels = _as_samples(x, source), _as_labels(y, source)
    if len(samples) != len(labels):
        raise ValueError(f"{source}: x holds {len(samples)} samples but y {len(labels)} labels")
    return Dataset(samples, labels)


def _fits(sample: tuple[int, ...], model: tuple[int, ...]) -> bool:
    """Whether samples of shape `sample` may be reshaped to `model` (the module's rules 1-4)."""
    if sample == model:
        return True
    if [d for d in sample if d != 1] == [d for d in model if d != 1]:
        return True
    if len(model) == 1:
        return math.prod(sample) == model[0]
    return len(model) == 3 and model[0] == 1 and len(sample) == 1 and sample[0] == model[1] * model[2]


def fit_to_model(data: Dataset, input_shape: Sequence[int], num_classes: int, source: str) -> Dataset:
    """`data` shaped for a model taking samples of `input_shape` into `num_classes` classes (module docstring's rules).

    ValueError naming `source` when a sample does not fit the model's input or a label is out of range.
    """
    model = _check_model(input_shape, num_classes)
    _check_labels(data.y, num_classes, source)
    return _reshaped(data, model, source)


def fit_split(train: Dataset, test: Dataset, input_shape: Sequence[int], num_classes: int,
              source: str) -> tuple[Dataset, Dataset]:
    """`fit_to_model` of both parts of a train/test split, labels counted over both."""
    model = _check_model(input_shape, num_classes)
    _check_labels(np.concatenate([train.y, test.y]), num_classes, source)
    return _reshaped(train, model, source), _reshaped(test, model, source)


def _check_model(input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """The model's sample shape as a tuple; ValueError when it or its class count is not usable."""
    model = tuple(input_shape)
    if not model or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in model):
        raise ValueError(f"the model's input shape {list(model)} is not one sample's shape of sizes >= 1")
    if num_classes < 1:
        raise ValueError(f"the model's class count must be >= 1, got {num_classes}")
    return tuple(int(d) for d in model)


def _check_labels(y: np.ndarray, num_classes: int, source: str) -> None:
    """ValueError naming the labels out of range and how many samples carry them."""
    out = y >= num_classes
    if not out.any():
        return
    bad = np.unique(y[out])
    named = ", ".join(str(label) for label in bad[:5]) + (f", ... ({len(bad)} distinct)" if len(bad) > 5 else "")
    raise ValueError(f"{source}: label{'s' if len(bad) > 1 else ''} {named} out of range: "
                     f"{int(np.count_nonzero(out))} of {len(y)} samples have labels >= {num_classes}, but the model "
                     f"has {num_classes} classes (labels 0 to {num_classes - 1}); relabel the data or train a model "
                     "with more classes")


def _reshaped(data: Dataset, model: tuple[int, ...], source: str) -> Dataset:
    """`data` with samples of shape `model`, or ValueError naming both shapes."""
    sample = data.sample_shape
    if sample == model:
        return data
    if not _fits(sample, model):
        note = ""
        if source.endswith(".npz") and len(sample) == 3 and sample[0] == 1:
            _, height, width = sample
            flat = f", or flat [N, {height * width}]," if height == width else ""
            note = (f" (an .npz x of shape [N, {height}, {width}]{flat} is read as single-channel images "
                    f"[N, 1, {height}, {width}])")
        wanted = ", ".join(map(str, model))
        raise ValueError(f"{source}: x holds samples of shape {list(sample)} but the model takes {list(model)}{note}; "
                         f"give this device x of shape [N, {wanted}] (N samples of the model's input)")
    return Dataset(data.x.reshape(len(data), *model), data.y)


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
    return Dataset(_as_samples(images, str(folder)), labels.astype(np.int64))


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
