"""Datasets, class-balanced sampling and (in later modules) client partitions and task streams."""

from fedcl.data.datasets import (
    FASHION_MNIST_DIR,
    DatasetNotFoundError,
    ImageDataset,
    available_datasets,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx,
)
from fedcl.data.sampling import ClassIndex

__all__ = [
    "FASHION_MNIST_DIR",
    "ClassIndex",
    "DatasetNotFoundError",
    "ImageDataset",
    "available_datasets",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "read_idx",
]
