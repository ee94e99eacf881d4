"""The fedcl ClientApp: distil the local partition, train locally (FedAvg rounds), evaluate.

Message types it answers (Flower's `<category>.<action>` routing):
- `train.distill`: distil the client's partition into `ipc` synthetic images per class on the client's device
  with the run's `distiller` (DM by default, from noise; guided by the global model when the message carries one
  and the distiller takes a guide; differentially private with `dp-epsilon`, charged to the client's
  `PrivacyLedger`) and reply with the SyntheticSet as records (`fedcl.flower.records`) and a MetricRecord.
- `train`: load the global model, train it `local-epochs` on the partition, reply with the weights.
- `evaluate`: accuracy of the global model on the client's partition.
Every instruction carries the run's settings in its ConfigRecord `config` (see `FedSettings`); the client's
partition comes from its node config (`partition-id`, `num-partitions`).  In the continual scenario `train` and
`train.distill` are answered by `fedcl.flower.continual_client` (a task stream and a replay memory that survives
in `Context.state` and, with node config `memory-dir`, on disk).
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.distill import Source
from fedcl.flower import continual_client
from fedcl.flower.node import PrivacyLedger, client_distiller, client_seed, global_model, local_data, message_settings
from fedcl.flower.protocol import (
    ARRAYS,
    DISTILL_ACTION,
    DISTILL_SECONDS,
    EPSILON_SPENT,
    LOCAL_ACCURACY,
    METRICS,
    NUM_EXAMPLES,
    SYNTHETIC_IMAGES,
    TRAIN_LOSS,
)
from fedcl.flower.records import model_to_arrays, synset_to_record
from fedcl.runtime import resolve_device
from fedcl.train import TrainConfig, evaluate_model, train_model

app = ClientApp()


@app.train(DISTILL_ACTION)
def distill(msg: Message, context: Context) -> Message:
    """Distil the local partition; guided by the global model when the instruction carries one."""
    settings, server_round, task = message_settings(msg)
    if settings.scenario == "continual":
        return continual_client.distill_task(msg, context, settings, server_round, task)
    dataset, images, labels, pid = local_data(settings, context)
    images, labels = well_held_classes(images, labels, settings.min_class_images)
    ledger = PrivacyLedger(settings, context) if settings.dp_epsilon > 0 else None
    if ledger is not None:
        ledger.check()
    guide = None
    if ARRAYS in msg.content.array_records:
        guide = global_model(settings, dataset, msg.content.array_records[ARRAYS]).state_dict()
    distiller = client_distiller(settings, pid, server_round, guide)
    start = time.perf_counter()
    synset = distiller.distill(images, labels, ipc=settings.ipc, n_classes=dataset.n_classes,
                               source=Source.of(dataset))
    content = synset_to_record(synset, settings.upload_dtype)
    metrics = {NUM_EXAMPLES: int(labels.numel()), SYNTHETIC_IMAGES: len(synset),
               DISTILL_SECONDS: time.perf_counter() - start}
    if ledger is not None:
        metrics[EPSILON_SPENT] = ledger.charge()
    content[METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def well_held_classes(images: torch.Tensor, labels: torch.Tensor,
                      min_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of the classes held in at least `min_images` images (ValueError, reported to the server as this
    client's failure, when no class is)."""
    counts = torch.bincount(labels)
    keep = counts[labels] >= min_images
    if not bool(keep.any()):
        raise ValueError(f"no class with at least {min_images} images here (min-class-images); nothing to distil")
    return images[keep], labels[keep]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """FedAvg local update: `local-epochs` of SGD on the partition, starting from the global weights."""
    settings, server_round, task = message_settings(msg)
    if settings.scenario == "continual":
        return continual_client.train_task(msg, context, settings, server_round, task)
    dataset, images, labels, pid = local_data(settings, context)
    net = global_model(settings, dataset, msg.content.array_records[ARRAYS])
    config = TrainConfig(epochs=settings.local_epochs, lr=settings.local_lr, batch_size=settings.local_batch_size,
                         decay_at=1.0, dsa=False)
    losses = train_model(net, images, labels, config, device=resolve_device(settings.device),
                         seed=client_seed(settings.seed, pid, server_round))
    content = RecordDict({ARRAYS: model_to_arrays(net),
                          METRICS: MetricRecord({NUM_EXAMPLES: int(labels.numel()), TRAIN_LOSS: losses[-1]})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this client's partition (how well it fits the local distribution)."""
    settings, _, _ = message_settings(msg)
    dataset, images, labels, _ = local_data(settings, context)
    net = global_model(settings, dataset, msg.content.array_records[ARRAYS])
    accuracy = evaluate_model(net, images, labels, device=resolve_device(settings.device))
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: int(labels.numel()), LOCAL_ACCURACY: accuracy})})
    return Message(content=content, reply_to=msg)
