"""Client partitions of a labelled training set: IID, Dirichlet label skew (class-wise, or client-wise with equal
client sizes) and k classes per client.

Federated experiments give each of `n_clients` clients a disjoint share of the training split.  Every partition is
a pure function of (labels, n_clients, scheme parameters, seed), so a client can rebuild its own share from its
partition id alone - no index lists travel over the network.  `class_histogram` and `format_histogram` /
`plot_histogram` show how skewed a partition is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedcl.files import save_figure
from fedcl.runtime import generator as make_generator

PARTITIONERS = ("iid", "dirichlet", "dirichlet-sized", "classes")
#: `plot_histogram` draws at most this many clients' bars.
MAX_PLOTTED_CLIENTS = 200


def partition_iid(labels: torch.Tensor, n_clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Shuffle all samples and deal them out in `n_clients` near-equal shares."""
    _check(labels, n_clients)
    order = torch.randperm(labels.numel(), generator=make_generator(seed))
    return [part.sort().values for part in order.tensor_split(n_clients)]


def partition_dirichlet(labels: torch.Tensor, n_clients: int, *, alpha: float, seed: int = 0,
                        min_size: int = 1, max_attempts: int = 100) -> list[torch.Tensor]:
    """Label skew: each class is split across clients in proportions drawn from Dirichlet(alpha).

    Small alpha (0.1) gives each client a few dominant classes; large alpha (100) is close to IID.  Draws are
    repeated (from the same seeded generator) until every client holds at least `min_size` samples, as in the
    usual protocol (Hsu et al. 2019; FedLab, Flower Datasets).
    """
    _check(labels, n_clients)
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    gen = make_generator(seed)
    n_classes = int(labels.max()) + 1
    concentration = torch.full((n_clients,), float(alpha), dtype=torch.float64)
    for _ in range(max_attempts):
        shares: list[list[torch.Tensor]] = [[] for _ in range(n_clients)]
        for c in range(n_classes):
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.randperm(members.numel(), generator=gen)]
            proportions = torch._standard_gamma(concentration, generator=gen)
            proportions = proportions / proportions.sum()
            cuts = (torch.cumsum(proportions, 0)[:-1] * members.numel()).round().long()
            for client, piece in enumerate(torch.tensor_split(members, cuts)):
                shares[client].append(piece)
        parts = [torch.cat(s).sort().values for s in shares]
        if min(p.numel() for p in parts) >= min_size:
            return parts
    raise ValueError(f"could not give every one of {n_clients} clients >= {min_size} samples with alpha={alpha} "
                     f"in {max_attempts} draws; use fewer clients or a larger alpha")


def partition_dirichlet_sized(labels: torch.Tensor, n_clients: int, *, alpha: float, seed: int = 0,
                              size: int = 0) -> list[torch.Tensor]:
    """Client-wise label skew with equal sizes: every client gets `size` samples (0: `labels.numel() // n_clients`,
    the whole split shared out), its class mix q drawn from Dirichlet(alpha * p), p the class shares of the whole
    split (Hsu et al. 2019).  A `size` below the share gives a federation of that many clients with `size` samples
    each, as in cross-device runs whose clients hold a few samples whatever their number.

    Samples are drawn without replacement from per-class pools (each shuffled once): a client's counts are a
    multinomial draw from q; what a class pool cannot supply is drawn again from q renormalised over the classes
    left, so every client is full and no sample is dealt twice.  Unlike `partition_dirichlet` (each class split
    across clients), this never fails for many small clients, e.g. 10,000 clients of 6 images; the samples left
    over (`labels.numel() - n_clients * size`) belong to no client.  Small alpha concentrates each client on
    few classes; large alpha gives each client nearly the split's class shares.
    """
    _check(labels, n_clients)
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    gen = make_generator(seed)
    n_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=n_classes)
    prior = counts.double() / counts.sum()
    pools = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    pools = [pool[torch.randperm(pool.numel(), generator=gen)] for pool in pools]
    used = [0] * n_classes
    left = counts.clone()
    share = labels.numel() // n_clients
    if not 0 <= size <= share:
        raise ValueError(f"size (samples per client) must lie in 0..{share} for {n_clients} clients of "
                         f"{labels.numel()} samples, got {size}")
    size = size or share
    concentration = (float(alpha) * prior).clamp_min(1e-12)
    parts = []
    for _ in range(n_clients):
        mix = torch._standard_gamma(concentration, generator=gen)
        taken = torch.zeros(n_classes, dtype=torch.long)
        need = size
        while need > 0:
            weights = mix * (left > 0)
            if not float(weights.sum()) > 0:  # the mix puts (numerically) no weight on the classes left
                weights = (left > 0).double()
            draw = torch.multinomial(weights, need, replacement=True, generator=gen)
            take = torch.minimum(torch.bincount(draw, minlength=n_classes), left)
            taken += take
            left -= take
            need -= int(take.sum())
        pieces = []
        for c in torch.nonzero(taken).flatten().tolist():
            pieces.append(pools[c][used[c]:used[c] + int(taken[c])])
            used[c] += int(taken[c])
        parts.append(torch.cat(pieces).sort().values if pieces else torch.empty(0, dtype=torch.long))
    return parts


def partition_classes(labels: torch.Tensor, n_clients: int, *, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Pathological skew: every client holds `k` classes; each class's samples are split evenly among the
    clients that hold it.  Classes are assigned round-robin over a seeded permutation, so every class is used
    when n_clients * k >= n_classes."""
    _check(labels, n_clients)
    n_classes = int(labels.max()) + 1
    if not 1 <= k <= n_classes:
        raise ValueError(f"k (classes per client) must lie in 1..{n_classes}, got {k}")
    gen = make_generator(seed)
    cycle = torch.randperm(n_classes, generator=gen).repeat((n_clients * k) // n_classes + 1)
    owned = [cycle[i * k:(i + 1) * k].tolist() for i in range(n_clients)]
    holders = {c: [i for i, cls in enumerate(owned) if c in cls] for c in range(n_classes)}
    shares: list[list[torch.Tensor]] = [[] for _ in range(n_clients)]
    for c, clients in holders.items():
        if not clients:
            continue
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        for client, piece in zip(clients, members.tensor_split(len(clients))):
            shares[client].append(piece)
    return [torch.cat(s).sort().values if s else torch.empty(0, dtype=torch.long) for s in shares]


def partition(labels: torch.Tensor, n_clients: int, scheme: str = "iid", *, alpha: float = 0.5, k: int = 2,
              seed: int = 0, size: int = 0) -> list[torch.Tensor]:
    """Partition by scheme name: "iid", "dirichlet" or "dirichlet-sized" (use `alpha`; dirichlet-sized also
    `size`, the samples per client, 0: all shared out) or "classes" (uses `k`)."""
    if scheme == "iid":
        return partition_iid(labels, n_clients, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, n_clients, alpha=alpha, seed=seed)
    if scheme == "dirichlet-sized":
        return partition_dirichlet_sized(labels, n_clients, alpha=alpha, seed=seed, size=size)
    if scheme == "classes":
        return partition_classes(labels, n_clients, k=k, seed=seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {list(PARTITIONERS)}")


def class_histogram(labels: torch.Tensor, parts: list[torch.Tensor], n_classes: int | None = None) -> torch.Tensor:
    """(n_clients, n_classes) table of how many samples of each class every client holds."""
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    return torch.stack([torch.bincount(labels[p], minlength=n_classes) for p in parts])


def format_histogram(histogram: torch.Tensor) -> str:
    """The histogram as a fixed-width text table: one row per client, one column per class, and the totals."""
    n_classes = histogram.shape[1]
    width = max(5, len(str(int(histogram.max()) if histogram.numel() else 0)) + 1)
    header = "client" + "".join(f"{c:>{width}}" for c in range(n_classes)) + f"{'total':>{width + 2}}"
    rows = [f"{i:>6}" + "".join(f"{int(v):>{width}}" for v in row) + f"{int(row.sum()):>{width + 2}}"
            for i, row in enumerate(histogram)]
    return "\n".join([header, *rows])


def plot_histogram(histogram: torch.Tensor, path: str | os.PathLike[str], title: str = "") -> Path:
    """Write a stacked bar chart (one bar per client, one colour per class) as a PNG.

    Of more than `MAX_PLOTTED_CLIENTS` clients only the first are drawn (the title says so): a bar per client of
    thousands would make a figure wider than matplotlib can render."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = histogram[:MAX_PLOTTED_CLIENTS]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * shown.shape[0] + 2), 3.5))
    bottom = torch.zeros(shown.shape[0])
    cmap = plt.get_cmap("tab20" if shown.shape[1] > 10 else "tab10")
    for c in range(shown.shape[1]):
        ax.bar(range(shown.shape[0]), shown[:, c].float(), bottom=bottom, color=cmap(c % cmap.N), label=str(c))
        bottom += shown[:, c].float()
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    cut = f" (first {len(shown)} of {len(histogram)} clients)" if len(shown) < len(histogram) else ""
    ax.set_title((title or "samples per class and client") + cut)
    if shown.shape[1] <= 20:
        ax.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def _check(labels: torch.Tensor, n_clients: int) -> None:
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if not 1 <= n_clients <= labels.numel():
        raise ValueError(f"n_clients must lie in 1..{labels.numel()} (the number of samples), got {n_clients}")
