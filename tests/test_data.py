"""Datasets: the embedded default, Fashion-MNIST from IDX, clear errors, class-balanced sampling."""

import gzip

import numpy as np
import pytest
import torch

from fedcl.data import ClassIndex, DatasetNotFoundError, load_dataset, read_idx
from fedcl.data import datasets as datasets_module


def test_digits_fixed_split_and_normalisation():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.image_shape == (1, 8, 8) and a.n_classes == 10
    assert len(a.train_labels) == 1257 and len(a.test_labels) == 540
    assert torch.equal(a.train_images, b.train_images)  # fixed split
    assert abs(float(a.train_images.mean())) < 1e-4 and abs(float(a.train_images.std()) - 1) < 1e-3
    assert torch.bincount(a.train_labels).min() >= 120  # stratified


def test_fashion_mnist_from_debian_idx_files():
    data = load_dataset("fashion-mnist")
    assert data.image_shape == (1, 28, 28) and len(data.train_labels) == 60000 and len(data.test_labels) == 10000
    assert data.classes[0] == "T-shirt/top" and data.n_classes == 10
    assert abs(data.mean[0] - 0.286) < 1e-3 and abs(data.std[0] - 0.353) < 1e-3


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_root_and_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=False)
        _write_idx(raw / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    data = load_dataset("fmnist", data_root=str(tmp_path))
    assert len(data.train_labels) == 20 and len(data.test_labels) == 10


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist.*--data-root"):
        load_dataset("fashion-mnist", data_root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_dataset("mnist", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_read_idx_rejects_corrupt_files(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x09\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_class_index_sampling_is_balanced_distinct_and_reproducible():
    labels = torch.tensor([0] * 10 + [1] * 3 + [3] * 6)
    index = ClassIndex(labels, n_classes=4)
    assert index.present.tolist() == [0, 1, 3]
    picks, classes = index.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(labels[picks], classes)
    assert torch.bincount(classes, minlength=4).tolist() == [5, 3, 0, 5]
    assert len(set(picks.tolist())) == len(picks)
    again, _ = index.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    exact, exact_classes = index.sample(5, torch.Generator().manual_seed(1), exact=True)
    assert torch.bincount(exact_classes, minlength=4).tolist() == [5, 5, 0, 5]
    assert set(exact[exact_classes == 1].tolist()) == {10, 11, 12}  # the short class cycles through its own
    with pytest.raises(ValueError):
        ClassIndex(torch.tensor([0, 5]), n_classes=3)
