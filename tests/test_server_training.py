"""Server-side training is injected into the strategies that train on their pooled memory: a user's callable
receives the model, the memory and the round and its result becomes the global model; by default the strategies
train with `MemoryTraining`, seeded by the round."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcl.flower.protocol import ARRAYS, DISTILL_MESSAGE, MEMORY_IMAGES, METRICS, NUM_EXAMPLES, SYNTHETIC_IMAGES, TASK
from fedcl.flower.records import model_to_arrays, synset_to_record
from fedcl.models import create_model
from fedcl.synthetic import SyntheticMeta, SyntheticSet
from fedcl.train import TrainConfig
from strategies import ContinualFedAvg, FedAvgDistill, FedDistill, MemoryTraining, TaskSchedule

SHAPE, CLASSES, MODEL_CFG = (1, 8, 8), 4, {"width": 4, "depth": 1}
GLOBAL = model_to_arrays(create_model("convnet", SHAPE, CLASSES, **MODEL_CFG))
OPTIONS = {"image_shape": SHAPE, "n_classes": CLASSES, "model_cfg": MODEL_CFG, "device": "cpu",
           "min_available_nodes": 1, "min_train_nodes": 1, "fraction_evaluate": 0.0}


class Recorder:
    """A server trainer that records what it was given and returns the model with every weight zeroed."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, arrays, memory, server_round):
        self.calls.append((len(memory), server_round))
        return ArrayRecord({k: Array(np.zeros_like(v.numpy())) for k, v in arrays.items()})


def _upload(node: int, *, continual: bool = False) -> SimpleNamespace:
    labels = torch.arange(CLASSES).repeat_interleave(2)
    synset = SyntheticSet(torch.randn(len(labels), *SHAPE), labels,
                          SyntheticMeta(method="dm", n_classes=CLASSES, ipc=2, mean=(0.5,), std=(0.25,)))
    content = synset_to_record(synset)
    metrics = {NUM_EXAMPLES: 20, SYNTHETIC_IMAGES: len(labels), **({MEMORY_IMAGES: 8, TASK: 0} if continual else {})}
    content[METRICS] = MetricRecord(metrics)
    return SimpleNamespace(content=content, has_error=lambda: False,
                           metadata=SimpleNamespace(src_node_id=node, message_type=DISTILL_MESSAGE))


def _update(node: int) -> SimpleNamespace:
    content = RecordDict({ARRAYS: GLOBAL, METRICS: MetricRecord({NUM_EXAMPLES: 10})})
    return SimpleNamespace(content=content, has_error=lambda: False,
                           metadata=SimpleNamespace(src_node_id=node, message_type="train"))


CASES = {
    "fed-distill": (lambda t: FedDistill(**OPTIONS, server_training=t), 1, [_upload(1), _upload(2)]),
    "hybrid": (lambda t: FedAvgDistill(**OPTIONS, server_training=t), 1, [_update(1), _upload(1)]),
    "continual": (lambda t: ContinualFedAvg(**OPTIONS, schedule=TaskSchedule(1, 2, True), server_memory=True,
                                            server_training=t), 2, [_upload(1, continual=True)]),
}


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_injected_trainer_makes_the_global_model(name):
    make, server_round, replies = CASES[name]
    trainer = Recorder()
    strategy = make(trainer)
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2])
    list(strategy.configure_train(server_round, GLOBAL, ConfigRecord({TASK: 0}), grid))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert trainer.calls == [(len(strategy.memory), server_round)] and len(strategy.memory) > 0
    assert all(not v.numpy().any() for v in arrays.values())


def test_the_default_trainer_is_memory_training_with_the_strategys_settings():
    config = TrainConfig(epochs=3)
    strategy = FedDistill(**OPTIONS, train_config=config, seed=5)
    assert strategy.server_training == MemoryTraining("convnet", config, MODEL_CFG, "cpu", 5)
