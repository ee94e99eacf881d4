"""Client partitions: reproducible by seed, disjoint, Dirichlet skew (class-wise and client-wise with equal sizes) and
k classes per client, histograms."""

from __future__ import annotations

import pytest
import torch

from fedcl.data import (
    class_histogram,
    format_histogram,
    load_dataset,
    partition,
    partition_classes,
    partition_dirichlet,
    partition_dirichlet_sized,
    plot_histogram,
)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return load_dataset("digits").train_labels


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "dirichlet-sized", "classes"])
def test_partitions_are_reproducible_disjoint_and_complete(labels, scheme):
    parts = partition(labels, 5, scheme, alpha=0.3, k=2, seed=3)
    again = partition(labels, 5, scheme, alpha=0.3, k=2, seed=3)
    other = partition(labels, 5, scheme, alpha=0.3, k=2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    everything = torch.cat(parts)
    assert everything.unique().numel() == everything.numel()  # disjoint
    if scheme in ("iid", "dirichlet"):
        assert everything.numel() == labels.numel()  # complete
    assert all(p.numel() > 0 for p in parts)


def _dominance(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean share of each client's most frequent class (1/n_classes for perfectly balanced clients)."""
    hist = class_histogram(labels, parts).float()
    return float((hist.max(dim=1).values / hist.sum(dim=1)).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    skewed = _dominance(labels, partition_dirichlet(labels, 10, alpha=0.1, seed=0))
    mild = _dominance(labels, partition_dirichlet(labels, 10, alpha=100.0, seed=0))
    iid = _dominance(labels, partition(labels, 10, "iid", seed=0))
    assert skewed > 0.4 > mild and abs(mild - iid) < 0.05


def test_dirichlet_sized_gives_every_client_the_same_size(labels):
    parts = partition_dirichlet_sized(labels, 7, alpha=0.3, seed=0)
    assert {p.numel() for p in parts} == {labels.numel() // 7}
    everything = torch.cat(parts)
    assert everything.unique().numel() == everything.numel() == 7 * (labels.numel() // 7)


def test_dirichlet_sized_with_a_fixed_size_per_client(labels):
    parts = partition(labels, 20, "dirichlet-sized", alpha=0.5, seed=0, size=6)
    assert {p.numel() for p in parts} == {6} and torch.cat(parts).unique().numel() == 120
    with pytest.raises(ValueError, match="size"):
        partition_dirichlet_sized(labels, 20, alpha=0.5, size=labels.numel() // 20 + 1)


def test_dirichlet_sized_skew_grows_as_alpha_shrinks(labels):
    skewed = _dominance(labels, partition_dirichlet_sized(labels, 10, alpha=0.1, seed=0))
    medium = _dominance(labels, partition_dirichlet_sized(labels, 10, alpha=1.0, seed=0))
    mild = _dominance(labels, partition_dirichlet_sized(labels, 10, alpha=1000.0, seed=0))
    iid = _dominance(labels, partition(labels, 10, "iid", seed=0))
    assert skewed > medium > mild and skewed > 0.5 and abs(mild - iid) < 0.05


def test_dirichlet_sized_works_for_ten_thousand_clients_of_six():
    """Where the class-wise partition cannot give 10,000 clients a sample each, the client-wise one gives each
    exactly 6, disjoint (60,000 labels of 10 equal classes, as Fashion-MNIST's training split)."""
    labels = torch.arange(60_000) % 10
    with pytest.raises(ValueError, match="could not give every one"):
        partition_dirichlet(labels, 10_000, alpha=0.5, seed=0, max_attempts=3)
    parts = partition_dirichlet_sized(labels, 10_000, alpha=0.5, seed=0)
    assert len(parts) == 10_000 and {p.numel() for p in parts} == {6}
    everything = torch.cat(parts)
    assert everything.unique().numel() == 60_000
    again = partition_dirichlet_sized(labels, 10_000, alpha=0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_sized_drains_a_class_pool_and_renormalises():
    """A rare class cannot fill the clients that favour it: they take the classes left, and stay full."""
    labels = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(95, dtype=torch.long)])
    parts = partition_dirichlet_sized(labels, 10, alpha=0.05, seed=1)
    hist = class_histogram(labels, parts, 2)
    assert (hist.sum(dim=1) == 10).all() and hist[:, 0].sum() <= 5


def test_k_classes_per_client(labels):
    parts = partition_classes(labels, 5, k=2, seed=0)
    hist = class_histogram(labels, parts, 10)
    assert ((hist > 0).sum(dim=1) == 2).all()
    assert ((hist > 0).sum(dim=0) >= 1).all()  # 5 clients x 2 classes cover all 10 classes


def test_bad_arguments_are_clear_errors(labels):
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, 3, alpha=0)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet_sized(labels, 3, alpha=-1)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(labels, 3, "shards")
    with pytest.raises(ValueError, match="k"):
        partition_classes(labels, 3, k=11)


def test_histogram_table_and_png(labels, tmp_path):
    parts = partition(labels, 3, "dirichlet", alpha=0.5, seed=0)
    hist = class_histogram(labels, parts, 10)
    table = format_histogram(hist)
    assert table.splitlines()[0].split()[0] == "client" and len(table.splitlines()) == 4
    assert table.splitlines()[1].split()[-1] == str(parts[0].numel())
    png = plot_histogram(hist, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_png_of_thousands_of_clients_draws_the_first_ones(tmp_path):
    from PIL import Image

    from fedcl.data.partition import MAX_PLOTTED_CLIENTS

    hist = torch.randint(0, 3, (10_000, 10))
    with Image.open(plot_histogram(hist, tmp_path / "h.png")) as png:
        width = png.size[0]
    with Image.open(plot_histogram(hist[:MAX_PLOTTED_CLIENTS], tmp_path / "first.png")) as png:
        assert width == png.size[0]  # the same figure as the first clients' alone
