"""Data sets for the Table 1 protocol: scikit-learn digits, MNIST-1D, Fashion-MNIST.

Every loader returns a :class:`Splits` of float32 inputs and int64 labels with a fixed
train / validation / test partition. The validation split is carved out of the training set
(never out of the test set) and is what regularizer strengths are tuned on; the test split is
only ever used for the numbers reported in the table.

Input layouts (the channel axis lets one CNN definition serve all three):

* digits: ``[N, 1, 8, 8]`` (1,797 images; 0..16 grey levels, standardized)
* mnist1d: ``[N, 1, 40]`` (5,000 signals generated locally by the ``mnist1d`` package)
* fashion-mnist: ``[N, 1, 28, 28]`` (60,000 + 10,000 images from the IDX files)
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_FILES",
    "Splits",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist1d",
    "read_idx",
]

DATASETS = ("digits", "mnist1d", "fashion-mnist")

#: The four standard Fashion-MNIST files (each may also be present with a ``.gz`` suffix).
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"

# IDX type codes -> numpy dtypes (big-endian on disk, as the format prescribes).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Splits:
    """A data set with fixed train / validation / test splits.

    Inputs are float32 ``[N, 1, *spatial]``; labels int64 ``[N]`` in ``0..num_classes-1``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)`` or ``(1, 40)``."""
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def subset_train(self, n: int) -> "Splits":
        """The same splits with only the first ``n`` training samples (for tiny smoke runs)."""
        if n < 1:
            raise ValueError(f"subset_train: argument 'n' must be >= 1, got {n}")
        return Splits(self.name, self.x_train[:n], self.y_train[:n], self.x_val, self.y_val,
                      self.x_test, self.y_test, self.num_classes)


def _val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"argument 'val_fraction' must be in (0, 1), got {val_fraction}")
    # A private generator: the split must not depend on (or disturb) the global RNG state.
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _finish(name, x_tr, y_tr, x_te, y_te, num_classes, val_fraction, split_seed) -> Splits:
    """Carve validation out of train, standardize with train statistics, convert to torch."""
    tr, va = _val_split(len(y_tr), val_fraction, split_seed)
    x_fit = x_tr[tr]
    # One mean/std over all pixels (not per pixel): constant border pixels would give 0/0.
    mean = float(x_fit.mean())
    std = float(x_fit.std()) or 1.0

    def prep(x):
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    def lab(y):
        return torch.from_numpy(np.asarray(y).astype(np.int64))

    return Splits(name, prep(x_fit), lab(y_tr[tr]), prep(x_tr[va]), lab(y_tr[va]), prep(x_te), lab(y_te),
                  num_classes)


def load_digits(*, val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits (bundled with scikit-learn, no download).

    The 1,797 images are split once, by a fixed seeded permutation, into 80% train+val and
    20% test; ``val_fraction`` of train+val becomes the validation split.
    """
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = d.images.astype(np.float64)[:, None, :, :]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(12345).permutation(len(y))
    n_test = int(round(0.2 * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return _finish("digits", x[tr], y[tr], x[te], y[te], 10, val_fraction, split_seed)


def load_mnist1d(*, val_fraction: float = 0.2, split_seed: int = 0, num_samples: int = 5000) -> Splits:
    """MNIST-1D (Greydanus 2020), generated locally with the ``mnist1d`` package's defaults.

    ``mnist1d.data.make_dataset`` builds the data from its templates (no network access); it
    seeds numpy's global RNG, so the caller's global state is saved and restored around it.
    The package's own 80/20 split gives train+val and test.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dataset 'mnist1d' needs the 'mnist1d' package: pip install mnist1d") from e

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    state = np.random.get_state()
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(state)
    x_tr = np.asarray(ds["x"], dtype=np.float64)[:, None, :]
    x_te = np.asarray(ds["x_test"], dtype=np.float64)[:, None, :]
    return _finish("mnist1d", x_tr, np.asarray(ds["y"]), x_te, np.asarray(ds["y_test"]), 10,
                   val_fraction, split_seed)


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array of its stored shape and dtype."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"read_idx: {path!r} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path!r} has unknown IDX type code 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"read_idx: {path!r} is truncated (header)")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape)) if ndim else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path!r} holds {len(body)} data bytes, its header {tuple(shape)} "
                         f"needs {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_idx(data_dir: str, stem: str) -> str | None:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.isfile(p):
            return p
    return None


def load_fashion_mnist(data_dir: str | None, *, val_fraction: float = 1 / 12, split_seed: int = 0) -> Splits:
    """Fashion-MNIST from the four standard IDX files (gzipped or not) in ``data_dir``.

    The default validation split is 5,000 of the 60,000 training images.
    """
    if not data_dir:
        raise ValueError("dataset 'fashion-mnist' needs --data-dir: a directory holding "
                         + ", ".join(f + "[.gz]" for f in FASHION_MNIST_FILES.values())
                         + f"; get them from {FASHION_MNIST_URL}")
    paths = {k: _find_idx(data_dir, stem) for k, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"fashion-mnist: missing in --data-dir {data_dir!r}: " + ", ".join(m + "[.gz]" for m in missing)
            + f". Download the four files from {FASHION_MNIST_URL} into that directory.")
    arr = {k: read_idx(p) for k, p in paths.items()}
    for part in ("train", "test"):
        x, y = arr["x_" + part], arr["y_" + part]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"fashion-mnist: {part} images {x.shape} and labels {y.shape} do not match "
                             "(expected [N, H, W] images and [N] labels)")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"fashion-mnist: {part} labels must be in 0..9, got {y.min()}..{y.max()}")
    x_tr = arr["x_train"].astype(np.float64)[:, None] / 255.0
    x_te = arr["x_test"].astype(np.float64)[:, None] / 255.0
    return _finish("fashion-mnist", x_tr, arr["y_train"], x_te, arr["y_test"], 10, val_fraction, split_seed)


def load_dataset(name: str, data_dir: str | None = None, **kw) -> Splits:
    """Load ``name`` in {"digits", "mnist1d", "fashion-mnist"}; ``kw`` goes to the loader."""
    if name == "digits":
        return load_digits(**kw)
    if name == "mnist1d":
        return load_mnist1d(**kw)
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(data_dir, **kw)
    raise ValueError(f"argument 'dataset' must be one of {', '.join(DATASETS)}, got {name!r}")
