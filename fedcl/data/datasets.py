"""Datasets as normalised tensors: the embedded `digits`, Fashion-MNIST from IDX files, torchvision roots.

Everything is loaded fully into memory as float32 NCHW tensors normalised with per-channel training statistics:
the distillation workloads index random class-balanced batches, which is fastest from one tensor.
Nothing is downloaded unless `download=True` is passed explicitly.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Where Debian's `dataset-fashion-mnist` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names where we looked and how to fix it."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image dataset with a fixed train/test split, normalised by its training statistics."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"shape={self.image_shape}, classes={self.n_classes})")


def _normalised(name: str, train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
                classes: tuple[str, ...]) -> ImageDataset:
    """Build an ImageDataset from [0, 1] float arrays (N, C, H, W), normalising with training statistics."""
    train_t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    test_t = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    mean = train_t.mean(dim=(0, 2, 3))
    std = train_t.std(dim=(0, 2, 3))
    view = (1, -1, 1, 1)
    return ImageDataset(
        name=name,
        train_images=(train_t - mean.view(view)) / std.view(view),
        train_labels=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_images=(test_t - mean.view(view)) / std.view(view),
        test_labels=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        classes=classes,
        mean=tuple(round(float(m), 6) for m in mean),
        std=tuple(round(float(s), 6) for s in std),
    )


def load_digits_dataset(data_root: str | None = None, download: bool = False) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package).

    Fixed stratified split: 70 % train (1,257), 30 % test (540), `random_state=0`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.3, stratify=bunch.target,
                                              random_state=0)
    return _normalised("digits", x_tr, y_tr, x_te, y_te, tuple(str(c) for c in range(10)))


#: Largest (decompressed) IDX file read: far above the datasets' (47 MB), far below a gzip bomb's.
MAX_IDX_BYTES = 2**30


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as an unsigned-byte array, checking its header.

    A corrupt gzip stream, a bad header or a size that does not match the header raises ValueError naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file: {err}") from None
    if len(data) > MAX_IDX_BYTES:
        raise ValueError(f"{path} is oversize: more than {MAX_IDX_BYTES} bytes")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if ndim == 0:
        raise ValueError(f"{path} is not a valid IDX file: its header declares no dimensions")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = math.prod(dims)
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data) - offset} bytes of data for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_directory(data_root: str | None) -> Path | None:
    """The first directory holding all four Fashion-MNIST IDX files: data_root, its torchvision layout, Debian's."""
    candidates = []
    if data_root is not None:
        root = Path(data_root)
        candidates += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    candidates.append(FASHION_MNIST_DIR)
    for directory in candidates:
        if all(_find_idx(directory, stem) for pair in _IDX_FILES.values() for stem in pair):
            return directory
    return None


def load_fashion_mnist(data_root: str | None = None, download: bool = False) -> ImageDataset:
    """Fashion-MNIST (60,000 / 10,000, 28x28) from IDX files, gzipped or not.

    Looks in `data_root`, `data_root/FashionMNIST/raw`, then Debian's /usr/share/datasets/fashion-mnist.
    With `download=True` and nothing found, torchvision downloads it into `data_root`.
    """
    directory = _idx_directory(data_root)
    if directory is None and download:
        _torchvision_download("FashionMNIST", data_root)
        directory = _idx_directory(data_root)
    if directory is None:
        where = f"{data_root} and {FASHION_MNIST_DIR}" if data_root else str(FASHION_MNIST_DIR)
        raise DatasetNotFoundError(
            f"Fashion-MNIST IDX files not found in {where}: install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist), pass --data-root DIR holding the four IDX files, "
            "or add --download on a machine with internet access"
        )
    arrays = {split: (read_idx(_find_idx(directory, x)), read_idx(_find_idx(directory, y)))
              for split, (x, y) in _IDX_FILES.items()}
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    return _normalised("fashion-mnist", x_tr[:, None] / 255.0, y_tr, x_te[:, None] / 255.0, y_te,
                       FASHION_MNIST_CLASSES)


def _torchvision_download(cls_name: str, data_root: str | None) -> None:
    if data_root is None:
        raise DatasetNotFoundError("--download needs --data-root DIR to download into")
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    for train in (True, False):
        cls(data_root, train=train, download=True)


def _torchvision_loader(cls_name: str, display: str) -> Callable[[str | None, bool], ImageDataset]:
    """A loader for a torchvision dataset class stored under `data_root` (downloaded only on request)."""

    def load(data_root: str | None = None, download: bool = False) -> ImageDataset:
        import torchvision.datasets as tvd

        if data_root is None:
            raise DatasetNotFoundError(f"{display} needs --data-root DIR (a torchvision root holding {cls_name}/)")
        cls = getattr(tvd, cls_name)
        try:
            train = cls(data_root, train=True, download=download)
            test = cls(data_root, train=False, download=download)
        except RuntimeError as err:
            raise DatasetNotFoundError(
                f"{display} not found in {data_root} ({err}): put the torchvision files there or add --download "
                "on a machine with internet access"
            ) from None
        x_tr, x_te = (_as_nchw(np.asarray(d.data)) for d in (train, test))
        return _normalised(display.lower(), x_tr, np.asarray(train.targets), x_te, np.asarray(test.targets),
                           tuple(train.classes))

    load.__doc__ = f"{display} through torchvision from a local root; downloads only with download=True."
    return load


def _as_nchw(data: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) arrays to float [0, 1] (N, C, H, W)."""
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return data.astype(np.float32) / 255.0


_LOADERS: dict[str, Callable[[str | None, bool], ImageDataset]] = {
    "digits": load_digits_dataset,
    "fashion-mnist": load_fashion_mnist,
    "mnist": _torchvision_loader("MNIST", "MNIST"),
    "cifar10": _torchvision_loader("CIFAR10", "CIFAR10"),
}
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10"}


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, data_root: str | None = None, download: bool = False) -> ImageDataset:
    """Load a dataset by name (see `available_datasets()`); `digits` is embedded and always available."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {available_datasets()}")
    return _LOADERS[key](data_root, download)
