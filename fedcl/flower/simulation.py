"""Run the fedcl Flower app in-process on Flower's simulation engine (Ray): what `fedcl simulate` and the
benchmark call.  Every virtual client is a SuperNode with node config `partition-id` / `num-partitions`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedcl.data import class_histogram, format_histogram, load_dataset, partition, plot_histogram
from fedcl.files import atomic_write
from fedcl.flower.results import read_csv
from fedcl.flower.settings import FedSettings

#: Keep Flower and Ray quiet and offline (no telemetry, no update checks).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def client_resources(n_clients: int, gpu_fraction: float | None = None) -> dict[str, float]:
    """One CPU per client and, when CUDA is present, a GPU fraction (default: the GPU shared by up to 4
    concurrent clients, never less than 1/n_clients)."""
    import torch

    if not torch.cuda.is_available():
        return {"num_cpus": 1, "num_gpus": 0.0}
    fraction = gpu_fraction if gpu_fraction is not None else max(0.25, 1.0 / max(1, n_clients))
    if not 0 < fraction <= 1:
        raise ValueError(f"gpu fraction must lie in (0, 1], got {fraction}")
    return {"num_cpus": 1, "num_gpus": fraction}


def write_partitions(settings: FedSettings, n_clients: int) -> str:
    """Write partitions.txt / partitions.png (samples per class and client) under out_dir; return the table."""
    dataset = load_dataset(settings.dataset, settings.data_root or None)
    parts = partition(dataset.train_labels, n_clients, settings.partitioner, alpha=settings.alpha,
                      k=settings.classes_per_client, seed=settings.seed, size=settings.client_samples)
    histogram = class_histogram(dataset.train_labels, parts, dataset.n_classes)
    table = format_histogram(histogram)
    out = Path(settings.out_dir)
    atomic_write(out / "partitions.txt", lambda f: f.write(table.encode() + b"\n"))
    plot_histogram(histogram, out / "partitions.png",
                   title=f"{settings.dataset}: {settings.partitioner} partition of {n_clients} clients")
    return table


#: Simulation engines: Flower's (Ray, one worker process per client) or the in-process `LocalGrid`.
ENGINES = ("ray", "local")


def simulate(settings: FedSettings, n_clients: int, *, gpu_fraction: float | None = None,
             verbose: bool = False, engine: str = "ray") -> list[dict[str, Any]]:
    """Run the ServerApp and `n_clients` ClientApps with Flower's `run_simulation` (engine "ray") or with the
    clients in this process, one after another (engine "local", `fedcl.flower.local_grid`); return the rows of
    rounds.csv."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    from fedcl.flower.client_app import app as client_app
    from fedcl.flower.server_app import make_server_app, run_federation

    if n_clients < settings.min_nodes:
        settings = replace(settings, min_nodes=n_clients)
    if engine == "local":
        from fedcl.flower.local_grid import LocalGrid

        run_federation(LocalGrid(client_app, n_clients), settings)
        return read_csv(Path(settings.out_dir) / "rounds.csv")
    backend = {"client_resources": client_resources(n_clients, gpu_fraction),
               "init_args": {"include_dashboard": False}}
    run_simulation(server_app=make_server_app(settings), client_app=client_app, num_supernodes=n_clients,
                   backend_config=backend, verbose_logging=verbose)
    return read_csv(Path(settings.out_dir) / "rounds.csv")
