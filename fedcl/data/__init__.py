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
from fedcl.data.partition import (
    PARTITIONERS,
    class_histogram,
    format_histogram,
    partition,
    partition_classes,
    partition_dirichlet,
    partition_dirichlet_sized,
    partition_iid,
    plot_histogram,
)
from fedcl.data.sampling import ClassIndex

__all__ = [
    "FASHION_MNIST_DIR",
    "PARTITIONERS",
    "ClassIndex",
    "DatasetNotFoundError",
    "ImageDataset",
    "available_datasets",
    "class_histogram",
    "format_histogram",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "partition",
    "partition_classes",
    "partition_dirichlet",
    "partition_dirichlet_sized",
    "partition_iid",
    "plot_histogram",
    "read_idx",
]
