"""Continual-learning benchmarks from local data (no downloads), built with Avalanche's own `nc_benchmark`.

- split-digits: scikit-learn's embedded 8x8 digits, class-incremental, 5 experiences x 2 classes.
- split-fmnist: Fashion-MNIST (Debian package dataset-fashion-mnist), class-incremental, 5 experiences x 2 classes.
- permuted-fmnist: Fashion-MNIST, one fixed pixel permutation per experience (the first is the identity), all 10
  classes in every experience, one head (task label 0) - the domain-incremental protocol of Permuted MNIST.

Images are fedcl's normalised float32 NCHW tensors; samples are (image, int label, task label) like Avalanche's
classic benchmarks, so the same strategies, plugins and metrics apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedcl.data import ImageDataset, load_dataset
from fedcl.distill.base import Source
from fedcl.runtime import generator as make_generator

#: name -> (fedcl dataset, scenario kind)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "split-digits": ("digits", "split"),
    "split-fmnist": ("fashion-mnist", "split"),
    "permuted-fmnist": ("fashion-mnist", "permuted"),
}


class LabelledTensors(TensorDataset):
    """(image, int label) pairs with the `targets` attribute that Avalanche's generators read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(images, labels)
        self.targets = labels.tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tensors[0][index], int(self.tensors[1][index])


@dataclass
class CLBenchmark:
    """An Avalanche scenario plus what fedcl needs beside it: the source dataset and its normalisation."""

    name: str
    scenario: Any  # avalanche NCScenario
    dataset: ImageDataset

    @property
    def source(self) -> Source:
        return Source.of(self.dataset)

    @property
    def n_classes(self) -> int:
        return self.dataset.n_classes


def available_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def make_benchmark(name: str, *, seed: int = 0, n_experiences: int = 5, data_root: str | None = None) -> CLBenchmark:
    """Build benchmark `name` (see `available_benchmarks()`); `seed` fixes the class order or the permutations."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {available_benchmarks()}")
    dataset_name, kind = BENCHMARKS[name]
    dataset = load_dataset(dataset_name, data_root)
    if kind == "split":
        scenario = split_scenario(dataset, n_experiences, seed)
    else:
        scenario = permuted_scenario(dataset, n_experiences, seed)
    return CLBenchmark(name, scenario, dataset)


def split_scenario(dataset: ImageDataset, n_experiences: int, seed: int) -> Any:
    """Class-incremental split: the classes in a seeded random order, n_classes / n_experiences per experience."""
    from avalanche.benchmarks import nc_benchmark

    if dataset.n_classes % n_experiences:
        raise ValueError(f"{dataset.n_classes} classes do not split evenly into {n_experiences} experiences")
    return nc_benchmark(LabelledTensors(dataset.train_images, dataset.train_labels),
                        LabelledTensors(dataset.test_images, dataset.test_labels),
                        n_experiences=n_experiences, task_labels=False, shuffle=True, seed=seed)


def permuted_scenario(dataset: ImageDataset, n_experiences: int, seed: int) -> Any:
    """Domain-incremental permuted data: experience i sees every class with pixel permutation i (0 = identity)."""
    from avalanche.benchmarks import nc_benchmark

    gen = make_generator(seed)
    n_pixels = dataset.train_images[0].numel()
    train, test = [], []
    for i in range(n_experiences):
        order = torch.arange(n_pixels) if i == 0 else torch.randperm(n_pixels, generator=gen)
        train.append(LabelledTensors(permute_pixels(dataset.train_images, order), dataset.train_labels))
        test.append(LabelledTensors(permute_pixels(dataset.test_images, order), dataset.test_labels))
    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, shuffle=False,
                        one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True)


def permute_pixels(images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The same permutation of the flattened C*H*W values applied to every image."""
    return images.flatten(1)[:, order].reshape(images.shape).contiguous()
