"""Federated continual learning: the memory core, task streams, metrics, replay training, the client's memory that
survives a restart, the server's replay slices, and a real 3-client 2-task simulation through `fedcl simulate`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcl.continual_metrics import step_metrics
from fedcl.data.streams import class_groups, groups_seen, task_order
from fedcl.distill import create_distiller
from fedcl.flower import client_app, continual_client
from fedcl.flower.records import SYNTHETIC_KEY, model_to_arrays, synset_from_record, synset_to_record
from fedcl.flower.settings import FedSettings
from fedcl.flower.simulation import QUIET_ENV
from fedcl.memory import DistilledMemory
from fedcl.models import create_model
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError
from fedcl.train import TrainConfig, evaluate_model, train_model
from strategies import ContinualFedAvg, SyntheticMemory, TaskSchedule, TrafficLog

ROOT = Path(__file__).resolve().parents[1]
#: CPU-sized continual settings on digits: 3 clients, 2 tasks of 5 classes, 1 round per task, width 16.
TINY = dict(dataset="digits", scenario="continual", tasks=2, rounds_per_task=1, width=16, distill_iterations=5,
            batch_real=16, ipc=3, min_nodes=3, local_epochs=2)


#: The tests create messages themselves, so they need what a ServerApp process would have set.
pytestmark = pytest.mark.usefixtures("server_identity")


def test_memory_budget_is_never_exceeded_and_every_class_stays(digits):
    distiller = create_distiller("random", seed=0)
    groups = class_groups(10, 5, seed=0)
    total = DistilledMemory(12, compress="truncate")
    per_class = DistilledMemory(images_per_class=3)
    for key, classes in enumerate(groups):
        keep = torch.isin(digits.train_labels, torch.tensor(classes))
        for memory in (total, per_class):
            memory.add(key, digits.train_images[keep], digits.train_labels[keep], distiller, n_classes=10)
            assert len(memory) <= memory.capacity()
            assert memory.seen_classes() == sorted(c for g in groups[:key + 1] for c in g)
    assert len(total) <= 12 and [h["ipc"] for h in total.history] == [6, 3, 2, 1, 1]
    assert len(per_class) == 30
    images, labels, tasks = per_class.tensors()
    assert images.shape == (30, 1, 8, 8) and torch.bincount(labels).tolist() == [3] * 10 and tasks.sum() == 0


def test_memory_dump_restore_round_trips_and_refuses_foreign_files(digits, tmp_path):
    memory = DistilledMemory(images_per_class=2)
    memory.add(4, digits.train_images[:200], digits.train_labels[:200], create_distiller("random"), n_classes=10)
    again = DistilledMemory(images_per_class=2)
    again.restore(memory.dump())
    assert torch.equal(again.sets[4].images, memory.sets[4].images)
    memory.save(tmp_path)
    assert DistilledMemory(images_per_class=2).load(tmp_path)["files"] == {"4": "set-004.safetensors"}
    blobs = memory.dump()
    blobs["memory.json"] = b'{"files": {"0": "../x.safetensors"}}'
    with pytest.raises(SyntheticSetError, match="outside"):
        DistilledMemory(images_per_class=2).restore(blobs)
    blobs = memory.dump()
    blobs["set-004.safetensors"] = blobs["set-004.safetensors"][:50]
    with pytest.raises(SyntheticSetError, match="set-004"):
        DistilledMemory(images_per_class=2).restore(blobs)


def test_task_streams_are_seeded_and_cover_every_class():
    groups = class_groups(10, 5, seed=3)
    assert sorted(c for g in groups for c in g) == list(range(10)) and groups == class_groups(10, 5, seed=3)
    assert task_order(5, client=2) == [0, 1, 2, 3, 4]
    orders = [task_order(5, c, "per-client", seed=0) for c in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders) and len({tuple(o) for o in orders}) > 1
    assert groups_seen(5, 4, 0) == [0]
    assert groups_seen(5, 4, 0, "per-client") == sorted({o[0] for o in orders})
    with pytest.raises(ValueError, match="divisor"):
        class_groups(10, 3)


def test_average_accuracy_forgetting_and_backward_transfer():
    matrix = [{0: 0.9}, {0: 0.6, 1: 0.8}, {0: 0.7, 1: 0.4, 2: 1.0}]
    rows = step_metrics(matrix)
    assert rows[0] == {"avg_accuracy": 0.9, "forgetting": 0.0, "bwt": 0.0}
    assert rows[1]["forgetting"] == pytest.approx(0.3) and rows[1]["bwt"] == pytest.approx(-0.3)
    assert rows[2]["avg_accuracy"] == pytest.approx(0.7)
    assert rows[2]["forgetting"] == pytest.approx((0.2 + 0.4) / 2)  # best earlier 0.9 and 0.8
    assert rows[2]["bwt"] == pytest.approx((-0.2 - 0.4) / 2)


def test_replay_in_training_keeps_an_old_class(digits):
    old, new = digits.train_labels == 0, digits.train_labels == 1
    memory = (digits.train_images[old][:10], digits.train_labels[old][:10])
    test_old = digits.test_labels == 0
    scores = []
    for replay in (None, memory):
        torch.manual_seed(0)
        net = create_model("convnet", (1, 8, 8), 10, width=16)
        config = TrainConfig(epochs=5, batch_size=32, dsa=False)
        train_model(net, digits.train_images[old], digits.train_labels[old], config, device="cpu")
        train_model(net, digits.train_images[new], digits.train_labels[new], config, device="cpu", replay=replay,
                    replay_batch_size=16)
        scores.append(evaluate_model(net, digits.test_images[test_old], digits.test_labels[test_old], device="cpu"))
    assert scores[0] < 0.2 and scores[1] > 0.8  # fine-tuning forgets class 0; ten replayed images keep it


class _Recorder(torch.nn.Module):
    """A linear classifier that keeps every input batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.batches = torch.nn.Linear(64, 10), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("replay_dsa", [False, True])
def test_replay_dsa_augments_the_memory_samples_and_leaves_the_new_ones(replay_dsa):
    gen = torch.Generator().manual_seed(0)
    new, memory = torch.rand(32, 1, 8, 8, generator=gen), torch.rand(6, 1, 8, 8, generator=gen)
    net = _Recorder()
    config = TrainConfig(epochs=1, batch_size=16, dsa=False, replay_dsa=replay_dsa)
    train_model(net, new, torch.zeros(32, dtype=torch.long), config, device="cpu",
                replay=(memory, torch.ones(6, dtype=torch.long)), replay_batch_size=8)

    def stored(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return (rows.flatten(1)[:, None] == pool.flatten(1)[None]).all(-1).any(-1)

    assert len(net.batches) == 2 and all(len(b) == 16 + 8 for b in net.batches)
    assert all(stored(b[:16], new).all() for b in net.batches)  # the new task's samples as they are
    replayed = torch.cat([b[16:] for b in net.batches])
    if replay_dsa:
        assert not stored(replayed, memory).any()  # every memory sample went through its own augmentation
    else:
        assert stored(replayed, memory).all()


def test_the_replay_dsa_setting_reaches_the_clients_training(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(continual_client, "train_model", lambda *a, **k: seen.append(a[3]) or [0.0])
    settings = FedSettings(**TINY, strategy="fedavg-replay", replay_dsa=True)
    node = _node(tmp_path)
    client_app.distill(_instruction(settings, 0, "train.distill"), node)
    with torch.random.fork_rng():
        net = create_model("convnet", (1, 8, 8), 10, width=16)
    client_app.train(_instruction(settings, 1, "train", arrays=model_to_arrays(net)), node)
    assert [c.replay_dsa for c in seen] == [True]
    assert FedSettings.from_config({"replay-dsa": "true"}).replay_dsa and not FedSettings().replay_dsa


def test_task_schedule():
    schedule = TaskSchedule(rounds_per_task=2, tasks=3, distill_round=True)
    assert schedule.num_rounds == 9
    assert [schedule.task_of(r) for r in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [schedule.phase(r) for r in range(1, 7)] == ["train", "train", "distill"] * 2
    assert [schedule.last_round(t) for t in range(3)] == [3, 6, 9]
    assert [r for r in range(1, 10) if schedule.is_task_start(r)] == [1, 4, 7]
    assert TaskSchedule(1, 4, distill_round=False).num_rounds == 4


def _instruction(settings: FedSettings, task: int, message_type: str, **records) -> Message:
    config = ConfigRecord({**settings.to_config(), "task": task, "server-round": 1})
    return Message(content=RecordDict({"config": config, **records}), dst_node_id=1, message_type=message_type)


def _node(tmp_path: Path) -> Context:
    """A fresh client context (empty state), as after a SuperNode restart; the memory-dir is the same."""
    node_config = {"partition-id": 0, "num-partitions": 3, "memory-dir": str(tmp_path)}
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_client_restarted_between_tasks_resumes_its_memory_from_disk(tmp_path):
    settings = FedSettings(**TINY, strategy="fed-distill-server")
    first = _node(tmp_path)
    reply = client_app.distill(_instruction(settings, 0, "train.distill"), first)
    uploaded = synset_from_record(reply.content, image_shape=(1, 8, 8), n_classes=10)
    before = continual_client.load_memory(settings, first)
    assert len(before) == len(uploaded) <= settings.ipc * 5 and (tmp_path / "run-7" / "memory.json").is_file()

    restarted = _node(tmp_path)
    resumed = continual_client.load_memory(settings, restarted)
    assert sorted(resumed.sets) == sorted(before.sets)
    assert all(torch.equal(resumed.sets[k].images, before.sets[k].images) for k in before.sets)

    with torch.random.fork_rng():
        net = create_model("convnet", (1, 8, 8), 10, width=16)
    train = _instruction(settings, 1, "train", arrays=model_to_arrays(net))
    reply = client_app.train(train, restarted)
    assert isinstance(reply.content["arrays"], ArrayRecord) and reply.content["metrics"]["num-examples"] > 0
    client_app.distill(_instruction(settings, 1, "train.distill"), restarted)
    after = continual_client.load_memory(settings, _node(tmp_path))
    assert sorted(after.sets) == [0, 1] and after.sets[0].images.equal(before.sets[0].images)
    assert len(after) <= settings.ipc * len(after.seen_classes())  # the budget: ipc images per class held


def test_server_sends_each_client_a_slice_of_the_classes_it_never_had():
    strategy = ContinualFedAvg(schedule=TaskSchedule(1, 2, True), image_shape=(1, 8, 8), n_classes=10,
                               server_memory=True, slice_ipc=2)
    meta = SyntheticMeta(method="dm", n_classes=10, ipc=3)
    for node, classes in ((11, [0, 1]), (12, [1, 2, 3])):
        labels = torch.tensor(classes).repeat_interleave(3)
        strategy.memory.add(node, SyntheticSet(torch.randn(len(labels), 1, 8, 8), labels, meta))
    for node, expected in ((11, [2, 3]), (12, [0]), (13, [0, 1, 2, 3])):
        msg = Message(content=RecordDict({"config": ConfigRecord({"task": 1})}), dst_node_id=node,
                      message_type="train")
        content = strategy._with_slice(msg, 3).content
        replay = synset_from_record(content, image_shape=(1, 8, 8), n_classes=10)
        assert replay.classes() == expected and len(replay) == 2 * len(expected)
        assert "config" in content and SYNTHETIC_KEY in content.array_records


def test_a_rehearsing_client_trains_the_sent_model_on_its_memory_alone(monkeypatch, tmp_path):
    trained = []

    def recording(net, images, labels, config, **options):
        trained.append((images, config))
        return train_model(net, images, labels, config, **options)

    monkeypatch.setattr(continual_client, "train_model", recording)
    settings = FedSettings(**TINY, strategy="fedavg-replay", rehearsal_epochs=2, local_lr=0.05)
    node = _node(tmp_path)
    with torch.random.fork_rng():
        sent = model_to_arrays(create_model("convnet", (1, 8, 8), 10, width=16))
    reply = client_app.distill(_instruction(settings, 0, "train.distill", arrays=sent), node)
    memory = continual_client.load_memory(settings, node)
    assert reply.content["metrics"]["rehearsal-examples"] == len(memory) > 0
    assert len(trained) == 1 and trained[0][0].equal(memory.labelled()[0]) and trained[0][1].epochs == 2
    returned = reply.content.array_records["arrays"]
    assert list(returned) == list(sent)
    assert any(not torch.equal(torch.from_numpy(returned[k].numpy()), torch.from_numpy(sent[k].numpy()))
               for k in sent)

    plain = FedSettings(**TINY, strategy="fedavg-replay")
    reply = client_app.distill(_instruction(plain, 0, "train.distill"), _node(tmp_path / "plain"))
    assert "arrays" not in reply.content.array_records and "rehearsal-examples" not in reply.content["metrics"]
    assert not FedSettings(**TINY, strategy="fedavg", rehearsal_epochs=2).rehearses  # no memory, no rehearsal
    with pytest.raises(ValueError, match="rehearsal-epochs"):
        FedSettings(**TINY, rehearsal_epochs=-1)


def test_the_server_averages_the_rehearsed_models_by_the_images_each_trained_on():
    strategy = ContinualFedAvg(schedule=TaskSchedule(1, 2, True), image_shape=(1, 8, 8), n_classes=10,
                               rehearse=True, min_available_nodes=1, min_train_nodes=1)

    def layer(value: float, shape=(2, 3)) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.full(shape, value, dtype=np.float32))})

    grid = SimpleNamespace(get_node_ids=lambda: [5])
    messages = list(strategy.configure_train(2, layer(0.0), ConfigRecord({"task": 0}), grid))
    assert [m.metadata.message_type for m in messages] == ["train.distill"]
    assert "arrays" in messages[0].content.array_records  # the model the clients rehearse

    def reply(arrays: ArrayRecord | None, n: int) -> SimpleNamespace:
        content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "memory-images": n, "synthetic-images": 0,
                                                       "task": 0, "rehearsal-examples": n})})
        if arrays is not None:
            content["arrays"] = arrays
        return SimpleNamespace(content=content, has_error=lambda: False, metadata=SimpleNamespace(src_node_id=n))

    replies = [reply(layer(1.0), 10), reply(layer(4.0), 30), reply(layer(9.0, (3, 2)), 100), reply(None, 0)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert np.allclose(arrays["w"].numpy(), 0.25 * 1.0 + 0.75 * 4.0)  # the wrong-shaped model is left out
    assert [node for node, _ in strategy.traffic[2].failures] == [100]


def test_a_continual_simulation_with_rehearsal_sends_and_averages_the_model_at_each_task_end(tmp_path):
    from fedcl.flower.simulation import simulate

    rows = {}
    for epochs in (0, 2):
        settings = FedSettings(**TINY, strategy="fed-distill", local_lr=0.05, rehearsal_epochs=epochs,
                               out_dir=str(tmp_path / str(epochs)))
        rows[epochs] = simulate(settings, 3, engine="local")[1:]  # 2 tasks x (1 FedAvg + 1 distillation round)
        assert len(rows[epochs]) == 4 and all(int(r["clients_failed"]) == 0 for r in rows[epochs])
    model_bytes = int(rows[0][0]["downlink_bytes"])  # a FedAvg round sends the model to every client
    for distill_round in (1, 3):
        assert int(rows[2][distill_round]["downlink_bytes"]) - int(rows[0][distill_round]["downlink_bytes"]) \
            >= 0.9 * model_bytes
        assert int(rows[2][distill_round]["uplink_bytes"]) > int(rows[0][distill_round]["uplink_bytes"])
    assert rows[2][3]["accuracy"] != rows[0][3]["accuracy"]  # the averaged rehearsed model became the task's model


def test_a_client_without_data_for_the_task_is_not_a_failure_but_a_missing_set_is():
    """A reply that declares no synthetic images and carries none is an empty upload (Dirichlet can leave a client
    without examples of a task's classes); a reply that claims images but carries no set is a failure."""
    memory = SyntheticMemory(image_shape=(1, 8, 8), n_classes=10, max_images=100, max_bytes=2**20)
    labels = torch.tensor([0, 1]).repeat_interleave(3)
    valid = synset_to_record(SyntheticSet(torch.randn(6, 1, 8, 8), labels, SyntheticMeta("dm", 10, 3)))
    replies = [(21, RecordDict({**valid, "metrics": MetricRecord({"synthetic-images": 6})})),
               (22, RecordDict({"metrics": MetricRecord({"synthetic-images": 0, "num-examples": 0})})),
               (23, RecordDict({"metrics": MetricRecord({"synthetic-images": 6})}))]
    traffic = TrafficLog()
    accepted = memory.accept(4, [SimpleNamespace(content=c, metadata=SimpleNamespace(src_node_id=n),
                                                 has_error=lambda: False) for n, c in replies], traffic)
    assert accepted == 1 and sorted(memory.sets) == [21]
    assert [node for node, _ in traffic[4].failures] == [23] and "no synthetic set" in traffic[4].failures[0][1]


def test_continual_strategies_and_settings_are_checked():
    assert FedSettings(scenario="continual", strategy="fedavg-replay").memory_distiller == "random"
    assert FedSettings(scenario="continual", strategy="fed-distill").server_memory is False
    assert FedSettings(scenario="continual", strategy="fedavg").memory_distiller is None
    assert FedSettings(scenario="continual", strategy="fedavg-replay").unread_keys == {
        "distill-iterations", "batch-real", "distiller", "distiller-opt", "init", "dp-epsilon", "dp-delta", "dp-clip"}
    assert FedSettings(scenario="continual", strategy="fed-distill").unread_keys == frozenset()
    assert FedSettings(strategy="fedavg").unread_keys == frozenset()  # the standard scenario: nothing assumed
    with pytest.raises(ValueError, match="continual scenario"):
        FedSettings(scenario="continual", strategy="hybrid")
    with pytest.raises(ValueError, match="for the standard scenario"):
        FedSettings(strategy="fed-distill-server")
    with pytest.raises(ValueError, match="distillation round"):
        ContinualFedAvg(schedule=TaskSchedule(1, 2, False), image_shape=(1, 8, 8), n_classes=10, server_memory=True)


@pytest.mark.slow
def test_fedcl_simulate_continual_three_clients_two_tasks(tmp_path):
    out = tmp_path / "fcl"
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--scenario", "continual", "--dataset", "digits",
           "--clients", "3", "--tasks", "2", "--strategy", "fed-distill", "--seed", "0", "--out", str(out),
           "--width", "16", "--distill-iterations", "5", "--rounds-per-task", "2", "--init", "real", "--local-epochs", "5", "--local-lr", "0.05",
           "--local-batch-size", "16", "--replay-batch-size", "16", "--ipc", "3", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "tasks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"task", "avg_accuracy", "forgetting", "uplink_bytes"} <= set(rows[0])
    assert [int(r["task"]) for r in rows] == [0, 1]
    assert float(rows[0]["avg_accuracy"]) > 0.4 and float(rows[1]["avg_accuracy"]) > 0.4  # 5 classes each: chance 0.2
    assert float(rows[0]["forgetting"]) == 0 and int(rows[1]["round"]) == 6  # 2 FedAvg + 1 distillation round
    assert float(rows[1]["acc_task0"]) > 0.3  # the memory kept task 0 alive
    assert all(int(r["uplink_bytes"]) > 0 and int(r["clients_failed"]) == 0 for r in rows)
    assert (out / "tasks.png").stat().st_size > 0 and "fed-distill" in done.stdout


def test_local_grid_delivers_in_process_and_reports_a_crash_as_an_error_reply():
    from flwr.clientapp import ClientApp

    from fedcl.flower.local_grid import LocalGrid

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("simulated crash")
        context.state["seen"] = ConfigRecord({"n": int(context.state.config_records.get("seen", {}).get("n", 0)) + 1})
        return Message(content=RecordDict({"config": ConfigRecord({"pid": context.node_config["partition-id"]})}),
                       reply_to=msg)

    grid = LocalGrid(app, 2)
    nodes = list(grid.get_node_ids())
    for _ in range(2):
        replies = grid.send_and_receive([Message(content=RecordDict(), dst_node_id=n, message_type="train")
                                         for n in nodes])
    ok, crashed = replies
    assert ok.content["config"]["pid"] == 0 and ok.metadata.src_node_id == nodes[0]
    assert crashed.has_error() and "simulated crash" in crashed.error.reason
    assert grid.contexts[nodes[0]].state["seen"]["n"] == 2  # Context.state persists across rounds


def test_a_continual_run_is_reproducible(tmp_path):
    from fedcl.flower.simulation import simulate

    runs = []
    for i in range(2):
        settings = FedSettings(**{**TINY, "min_nodes": 4, "width": 8, "rounds_per_task": 2, "local_epochs": 5},
                               local_lr=0.05, local_batch_size=16, strategy="fedavg", out_dir=str(tmp_path / str(i)))
        runs.append([row["accuracy"] for row in simulate(settings, 4, engine="local")])
    assert runs[0] == runs[1]  # Flower samples nodes in random order; aggregation must not depend on it


def test_the_memory_core_imports_neither_flower_nor_avalanche():
    code = ("import sys, fedcl.memory, fedcl.continual_metrics, fedcl.data.streams; "
            "assert not {'flwr', 'avalanche'} & set(sys.modules), sorted({'flwr', 'avalanche'} & set(sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_comparison_says_plainly_which_memory_wins_on_each_seed():
    from fedcl.flower.comparison import verdicts

    def row(name, accuracies):
        return {"run": name, "seed_accuracy": accuracies, "avg_accuracy": (sum(accuracies) / len(accuracies), 0.0)}

    table = [row("fedavg-replay", [0.85, 0.82]), row("fed-distill", [0.90, 0.80]),
             row("fed-distill-server", [0.95, 0.90])]
    assert verdicts(table) == [
        "fed-distill - fedavg-replay: +1.50 points of final average accuracy (seeds: +5.00, -2.00); fed-distill wins "
        "on 1 of 2 seeds (same client memory: ipc images per class)",
        "fed-distill-server - fedavg-replay: +9.00 points of final average accuracy (seeds: +10.00, +8.00); "
        "fed-distill-server wins on every seed (same client memory: ipc images per class)"]


def test_a_replay_strategy_keeps_real_images_whatever_the_distillers_options(tmp_path):
    from fedcl.flower.node import client_distiller
    from fedcl.flower.simulation import simulate

    for strategy, name in (("fedavg-replay", "random"), ("fedavg-herding", "herding")):
        settings = FedSettings(**TINY, strategy=strategy, distiller_opt="lr_img=10")
        assert client_distiller(settings, pid=0, step=0).name == name  # DM's option stays with DM
    settings = FedSettings(**TINY, strategy="fedavg-herding", distiller_opt="lr_img=10",
                           out_dir=str(tmp_path / "herding"))
    rows = simulate(settings, 2, engine="local")
    assert all(int(r["clients_failed"]) == 0 for r in rows), [r["failure_reasons"] for r in rows]
