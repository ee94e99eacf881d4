"""Soft-labelled replay memories: the model's predictions as labels, their survival through relabelling,
compression and persistence, replay with them, and a continual simulation on digits with `label-temperature`."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcl.data import load_dataset
from fedcl.data.streams import class_groups
from fedcl.distill import create_distiller
from fedcl.flower import client_app, continual_client
from fedcl.flower.records import model_to_arrays, synset_from_record
from fedcl.flower.settings import FedSettings
from fedcl.memory import DistilledMemory
from fedcl.models import create_model
from fedcl.train import common_labels, soft_predictions
from strategies import ContinualFedAvg, TaskSchedule

#: CPU-sized continual settings on digits: 3 clients, 2 tasks of 5 classes, 1 round per task, width 16.
TINY = dict(dataset="digits", scenario="continual", tasks=2, rounds_per_task=1, width=16, distill_iterations=5,
            batch_real=16, ipc=3, min_nodes=3, local_epochs=2, label_temperature=2.0)


#: The tests create messages themselves, so they need what a ServerApp process would have set.
pytestmark = pytest.mark.usefixtures("server_identity")


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", (1, 8, 8), 10, width=16)


def _soft_memory(digits, compress: str = "truncate") -> tuple[DistilledMemory, torch.Tensor]:
    """A memory of 4 classes x 4 random real images, its set relabelled with a random net's predictions."""
    memory = DistilledMemory(16, compress=compress)
    keep = torch.isin(digits.train_labels, torch.tensor([0, 1, 2, 3]))
    synset = memory.add(0, digits.train_images[keep], digits.train_labels[keep], create_distiller("random", seed=0),
                        n_classes=10)
    predicted = soft_predictions(_net(), synset.images, temperature=2.0, classes=[0, 1, 2, 3], device="cpu")
    labels = 0.5 * torch.nn.functional.one_hot(synset.hard_labels, 10).float() + 0.5 * predicted
    memory.relabel(0, labels)
    return memory, labels


def test_soft_predictions_are_distributions_over_the_classes_met(digits):
    images = digits.train_images[:32]
    sharp = soft_predictions(_net(), images, temperature=0.5, classes=[2, 5], device="cpu")
    flat = soft_predictions(_net(), images, temperature=8.0, classes=[2, 5], device="cpu")
    for probs in (sharp, flat):
        assert probs.shape == (32, 10) and torch.allclose(probs.sum(dim=1), torch.ones(32))
        assert probs[:, [0, 1, 3, 4, 6, 7, 8, 9]].abs().max() == 0  # no mass on classes not met
    assert (flat.max(dim=1).values <= sharp.max(dim=1).values + 1e-6).all()  # a higher temperature is flatter
    with pytest.raises(ValueError, match="temperature"):
        soft_predictions(_net(), images, temperature=0.0)


def test_relabel_keeps_every_class_and_refuses_to_change_one(digits):
    memory, labels = _soft_memory(digits)
    held = memory.sets[0]
    assert held.soft_labels and torch.equal(held.labels, labels) and len(memory) == 16
    assert held.classes() == [0, 1, 2, 3] and torch.bincount(held.hard_labels).tolist() == [4, 4, 4, 4]
    wrong = torch.nn.functional.one_hot((held.hard_labels + 1) % 10, 10).float()
    with pytest.raises(ValueError, match="keep every image's class"):
        memory.relabel(0, wrong)
    with pytest.raises(ValueError, match="one label per image"):
        memory.relabel(0, labels[:3])


def test_soft_labels_survive_save_load_and_dump_restore(digits, tmp_path):
    memory, labels = _soft_memory(digits)
    memory.save(tmp_path / "memory")
    loaded, restored = DistilledMemory(16), DistilledMemory(16)
    loaded.load(tmp_path / "memory")
    restored.restore(memory.dump())
    assert torch.equal(loaded.sets[0].labels, labels) and torch.equal(restored.sets[0].labels, labels)


@pytest.mark.parametrize("compress", ["truncate", "herding", "redistill"])
def test_compression_keeps_each_kept_image_s_own_soft_label(digits, compress):
    memory, labels = _soft_memory(digits, compress)
    original = memory.sets[0]
    memory.resize(8, create_distiller("random", seed=1))  # 4 classes: 2 images per class
    shrunk = memory.sets[0]
    assert len(memory) == 8 and shrunk.soft_labels and shrunk.classes() == [0, 1, 2, 3]
    # every kept image is one of the held ones (truncation, herding, random re-selection) and keeps its label
    match = torch.cdist(shrunk.images.flatten(1), original.images.flatten(1)).argmin(dim=1)
    assert torch.equal(shrunk.images, original.images[match]) and torch.equal(shrunk.labels, labels[match])


def test_replay_targets_mix_hard_and_soft_sets(digits):
    memory, labels = _soft_memory(digits)
    keep = torch.isin(digits.train_labels, torch.tensor([4, 5]))
    memory.add(1, digits.train_images[keep], digits.train_labels[keep], create_distiller("random", seed=0),
               n_classes=10)
    images, targets = memory.labelled()
    assert images.shape == (12, 1, 8, 8) and targets.shape == (12, 10)  # budget 16: 6 classes -> 2 per class
    assert memory.sets[0].soft_labels and not memory.sets[1].soft_labels
    assert torch.allclose(targets.sum(dim=1), torch.ones(12)) and targets[8:].max(dim=1).values.eq(1).all()
    assert torch.equal(targets.argmax(dim=1), memory.tensors()[1])
    assert [t.tolist() for t in common_labels(torch.tensor([1]), torch.tensor([2]))] == [[1], [2]]
    assert common_labels(torch.tensor([1]), torch.ones(1, 4) / 4)[0].tolist() == [[0.0, 1.0, 0.0, 0.0]]


def _instruction(settings: FedSettings, task: int, message_type: str, **records) -> Message:
    config = ConfigRecord({**settings.to_config(), "task": task, "server-round": 1})
    return Message(content=RecordDict({"config": config, **records}), dst_node_id=1, message_type=message_type)


def _node() -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


def test_a_client_labels_its_new_memory_with_the_global_model_and_replays_it():
    settings = FedSettings(**TINY, strategy="fed-distill-server")
    node, arrays = _node(), model_to_arrays(_net())
    reply = client_app.distill(_instruction(settings, 0, "train.distill", arrays=arrays), node)
    uploaded = synset_from_record(reply.content, image_shape=(1, 8, 8), n_classes=10)
    memory = continual_client.load_memory(settings, node)
    held = memory.sets[next(iter(memory.sets))]
    met = class_groups(10, 2, settings.seed)[next(iter(memory.sets))]
    assert held.soft_labels and torch.equal(uploaded.labels, held.labels)
    assert len(memory) <= settings.ipc * len(met) and torch.allclose(held.labels.sum(dim=1), torch.ones(len(held)))
    assert (held.labels.max(dim=1).values >= 0.5).all()  # half the mass stays on the true class
    unmet = [c for c in range(10) if c not in met]
    assert held.labels[:, unmet].abs().max() == 0
    replay = continual_client.replay_data(settings, _instruction(settings, 1, "train"), node,
                                          load_dataset("digits"))
    assert replay is not None and replay[1].shape == (len(held), 10)
    reply = client_app.train(_instruction(settings, 1, "train", arrays=arrays), node)
    assert reply.content["metrics"]["num-examples"] > 0


def test_distillation_requests_carry_the_model_only_when_asked():
    settings = FedSettings(**TINY, strategy="fed-distill")
    for with_model in (False, True):
        strategy = ContinualFedAvg(schedule=TaskSchedule(1, 2, True), image_shape=(1, 8, 8), n_classes=10,
                                   distill_with_model=with_model, min_available_nodes=1, min_train_nodes=1)

        class Grid:
            def get_node_ids(self):
                return [5]

        messages = list(strategy.configure_train(2, model_to_arrays(_net()), ConfigRecord(settings.to_config()),
                                                 Grid()))
        assert [m.metadata.message_type for m in messages] == ["train.distill"]
        assert ("arrays" in messages[0].content.array_records) is with_model
    with pytest.raises(ValueError, match="label-temperature"):
        FedSettings(**{**TINY, "label_temperature": -1.0})


def test_a_continual_simulation_with_soft_labels_completes(tmp_path):
    from fedcl.flower.simulation import simulate

    settings = FedSettings(**TINY, strategy="fed-distill", local_lr=0.05, local_batch_size=16, replay_batch_size=16,
                           out_dir=str(tmp_path))
    rows = simulate(settings, 3, engine="local")[1:]  # after round 0: 2 tasks x (1 FedAvg + 1 distillation round)
    assert len(rows) == 4 and all(int(r["clients_failed"]) == 0 and 0 < float(r["accuracy"]) <= 1 for r in rows)
    train, distill = int(rows[0]["downlink_bytes"]), int(rows[1]["downlink_bytes"])
    assert distill > 0.9 * train  # the distillation request carried the global model to label the memory with
