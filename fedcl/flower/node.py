"""What a client node works from: the run settings in an instruction, its partition of the data, the global model.

Shared by the ClientApp's handlers (`fedcl.flower.client_app`) and the continual-learning ones
(`fedcl.flower.continual_client`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message

from fedcl.data import ImageDataset, load_dataset, partition
from fedcl.flower.protocol import CONFIG, SERVER_ROUND, TASK
from fedcl.flower.records import arrays_to_model
from fedcl.flower.settings import FedSettings
from fedcl.models import create_model
from fedcl.runtime import seeded


@lru_cache(maxsize=2)
def _dataset(name: str, data_root: str) -> ImageDataset:
    return load_dataset(name, data_root or None)


@lru_cache(maxsize=8)
def _partition(name: str, data_root: str, n_clients: int, scheme: str, alpha: float, k: int,
               seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(partition(_dataset(name, data_root).train_labels, n_clients, scheme, alpha=alpha, k=k, seed=seed))


def local_data(settings: FedSettings, context: Context) -> tuple[ImageDataset, torch.Tensor, torch.Tensor, int]:
    """(dataset, images, labels, partition id) of this client's share of the training split."""
    pid = int(context.node_config.get("partition-id", 0))
    n_clients = int(context.node_config.get("num-partitions", 1))
    if not 0 <= pid < n_clients:
        raise ValueError(f"node config partition-id={pid} is outside 0..{n_clients - 1}")
    dataset = _dataset(settings.dataset, settings.data_root)
    index = _partition(settings.dataset, settings.data_root, n_clients, settings.partitioner, settings.alpha,
                       settings.classes_per_client, settings.seed)[pid]
    if index.numel() == 0:
        raise ValueError(f"partition {pid} of {n_clients} is empty")
    return dataset, dataset.train_images[index], dataset.train_labels[index], pid


def message_settings(msg: Message) -> tuple[FedSettings, int, int]:
    """(settings, server round, task) carried by an instruction's ConfigRecord: parsed once per message by the
    handler, which passes them down (task 0 outside the continual scenario)."""
    config = msg.content.config_records.get(CONFIG, {})
    return FedSettings.from_config(config), int(config.get(SERVER_ROUND, 1)), int(config.get(TASK, 0))


def client_seed(run_seed: int, pid: int, step: int) -> int:
    """The seed of partition `pid`'s work at one step (a server round, or a task for a continual memory):
    distinct for every (run seed, partition, step), so no two clients or rounds share a random stream."""
    return run_seed * 100_003 + pid * 1009 + step


def global_model(settings: FedSettings, dataset: ImageDataset, arrays: ArrayRecord) -> torch.nn.Module:
    """The run's model architecture holding the weights in `arrays`."""
    with seeded(settings.seed):
        net = create_model(settings.model, dataset.image_shape, dataset.n_classes, **settings.model_cfg)
    return arrays_to_model(net, arrays)
