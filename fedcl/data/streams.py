"""Class-incremental task streams for federated continual learning.

The classes are shuffled once (seeded) and cut into `n_tasks` groups of equal size; task t of a client is its
partition's samples of one group.  With the "shared" order every client meets group t at step t; with
"per-client" each client meets the groups in its own seeded order.  Like partitions, a stream is a pure function of
(labels, partition, settings, seed), so a client rebuilds its own from its partition id and the server knows which
classes the federation has seen after every step without asking.
"""

from __future__ import annotations

import torch

from fedcl.runtime import generator as make_generator

TASK_ORDERS = ("shared", "per-client")


def class_groups(n_classes: int, n_tasks: int, seed: int = 0) -> list[list[int]]:
    """The classes in a seeded random order, cut into `n_tasks` equal groups (each sorted)."""
    if not 1 <= n_tasks <= n_classes or n_classes % n_tasks:
        raise ValueError(f"{n_classes} classes do not split evenly into {n_tasks} tasks; choose a divisor of "
                         f"{n_classes}")
    order = torch.randperm(n_classes, generator=make_generator(seed)).tolist()
    size = n_classes // n_tasks
    return [sorted(order[i * size:(i + 1) * size]) for i in range(n_tasks)]


def task_order(n_tasks: int, client: int, order: str = "shared", seed: int = 0) -> list[int]:
    """The class groups client `client` meets at steps 0..n_tasks-1."""
    if order == "shared":
        return list(range(n_tasks))
    if order == "per-client":
        return torch.randperm(n_tasks, generator=make_generator(seed * 7919 + client + 1)).tolist()
    raise ValueError(f"unknown task order {order!r}; choose one of {list(TASK_ORDERS)}")


def groups_seen(n_tasks: int, n_clients: int, step: int, order: str = "shared", seed: int = 0) -> list[int]:
    """Class groups that some client has met by the end of `step` (sorted)."""
    return sorted({g for c in range(n_clients) for g in task_order(n_tasks, c, order, seed)[:step + 1]})
