"""The fedcl ClientApp: distil the local partition, train locally (FedAvg rounds), evaluate.

Message types it answers (Flower's `<category>.<action>` routing):
- `train.distill`: distil the client's partition into `ipc` synthetic images per class on the client's device
  (plain DM with random networks, or DM against the global model when the message carries one) and reply with
  the SyntheticSet as records (`fedcl.flower.records`) and a MetricRecord.
- `train`: load the global model, train it `local-epochs` on the partition, reply with the weights.
- `evaluate`: accuracy of the global model on the client's partition.
Every instruction carries the run's settings in its ConfigRecord `config` (see `FedSettings`); the client's
partition comes from its node config (`partition-id`, `num-partitions`).
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.data import ImageDataset, load_dataset, partition
from fedcl.distill import Source, create_distiller
from fedcl.flower.guided_dm import GlobalModelDM
from fedcl.flower.records import arrays_to_model, model_to_arrays, synset_to_record
from fedcl.flower.settings import FedSettings
from fedcl.models import create_model
from fedcl.runtime import resolve_device, seeded
from fedcl.train import TrainConfig, evaluate_model, train_model

app = ClientApp()


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


def _settings(msg: Message) -> tuple[FedSettings, int]:
    config = msg.content.config_records.get("config", {})
    return FedSettings.from_config(config), int(config.get("server-round", 1))


def _global_model(settings: FedSettings, dataset: ImageDataset, arrays: ArrayRecord) -> torch.nn.Module:
    with seeded(settings.seed):
        net = create_model(settings.model, dataset.image_shape, dataset.n_classes, **settings.model_cfg)
    return arrays_to_model(net, arrays)


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    """Distil the local partition; guided by the global model when the instruction carries one."""
    settings, server_round = _settings(msg)
    dataset, images, labels, pid = local_data(settings, context)
    options = dict(model=settings.model, model_cfg=settings.model_cfg, device=settings.device,
                   seed=settings.seed * 100_003 + pid * 1009 + server_round, iterations=settings.distill_iterations,
                   batch_real=settings.batch_real)
    if "arrays" in msg.content.array_records:
        state = _global_model(settings, dataset, msg.content.array_records["arrays"]).state_dict()
        distiller = GlobalModelDM(global_state=state, noise=settings.guide_noise, **options)
    else:
        distiller = create_distiller("dm", **options)
    start = time.perf_counter()
    synset = distiller.distill(images, labels, ipc=settings.ipc, n_classes=dataset.n_classes,
                               source=Source.of(dataset))
    content = synset_to_record(synset, settings.upload_dtype)
    content["metrics"] = MetricRecord({"num-examples": int(labels.numel()), "synthetic-images": len(synset),
                                       "distill-seconds": time.perf_counter() - start})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """FedAvg local update: `local-epochs` of SGD on the partition, starting from the global weights."""
    settings, server_round = _settings(msg)
    dataset, images, labels, pid = local_data(settings, context)
    net = _global_model(settings, dataset, msg.content.array_records["arrays"])
    config = TrainConfig(epochs=settings.local_epochs, lr=settings.local_lr, batch_size=settings.local_batch_size,
                         decay_at=1.0, dsa=False)
    losses = train_model(net, images, labels, config, device=resolve_device(settings.device),
                         seed=settings.seed * 100_003 + pid * 1009 + server_round)
    content = RecordDict({"arrays": model_to_arrays(net),
                          "metrics": MetricRecord({"num-examples": int(labels.numel()), "train-loss": losses[-1]})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this client's partition (how well it fits the local distribution)."""
    settings, _ = _settings(msg)
    dataset, images, labels, _ = local_data(settings, context)
    net = _global_model(settings, dataset, msg.content.array_records["arrays"])
    accuracy = evaluate_model(net, images, labels, device=resolve_device(settings.device))
    content = RecordDict({"metrics": MetricRecord({"num-examples": int(labels.numel()), "local-accuracy": accuracy})})
    return Message(content=content, reply_to=msg)
