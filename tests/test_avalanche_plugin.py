"""DistilledReplayPlugin inside a real Avalanche Naive strategy, and the `fedcl cl` command."""

from __future__ import annotations

import csv

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.benchmarks.utils.data_loader import ReplayDataLoader  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin  # noqa: E402
from test_avalanche_buffer import SoftLabelDistiller  # noqa: E402

from fedcl.avalanche import DistilledReplayPlugin, make_benchmark  # noqa: E402
from fedcl.cli import main  # noqa: E402
from fedcl.models import create_model  # noqa: E402


class Spy(SupervisedPlugin):
    """Records the loader and criterion type of every training epoch."""

    def __init__(self, recorded: list) -> None:
        super().__init__()
        self.recorded = recorded

    def before_training_epoch(self, strategy, **kwargs):
        self.recorded.append((type(strategy.dataloader), type(strategy._criterion)))


def _naive(plugin: DistilledReplayPlugin, recorded: list, evaluator=None) -> Naive:
    model = create_model("convnet", (1, 8, 8), 10, width=8)
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=256,
                 device="cpu", plugins=[plugin, Spy(recorded)], evaluator=evaluator)


def _stream_accuracy(model: torch.nn.Module, stream) -> float:
    """Accuracy of `model` over every sample of an Avalanche stream, computed here without Avalanche's metrics."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for experience in stream:
            for x, y, *_ in torch.utils.data.DataLoader(experience.dataset, batch_size=512):
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
    return correct / total


@pytest.mark.slow
def test_plugin_runs_inside_naive_on_split_digits():
    benchmark = make_benchmark("split-digits", seed=0)
    plugin = DistilledReplayPlugin(mem_size=20, distiller="dm", source=benchmark.source,
                                   distiller_options={"iterations": 2, "batch_real": 8, "model_cfg": {"width": 8}})
    recorded: list = []
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = _naive(plugin, recorded, evaluator)
    seen = []
    for exp in benchmark.scenario.train_stream:
        strategy.train(exp)
        seen += exp.classes_in_this_experience
        assert len(plugin.buffer.buffer) <= 20
        assert plugin.buffer.seen_classes() == sorted(seen)
    assert recorded[0][0] is not ReplayDataLoader  # nothing to replay before the first experience
    assert all(loader is ReplayDataLoader for loader, _ in recorded[1:])
    assert [h["ipc"] for h in plugin.buffer.history] == [10, 5, 3, 2, 2]
    held = next(iter(plugin.buffer.sets.values()))
    assert held.meta.method == "dm" and held.meta.dataset == "digits"
    memory = plugin.buffer.buffer
    results = strategy.eval(benchmark.scenario.test_stream)  # evaluation after replay training runs too
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert accuracy == pytest.approx(_stream_accuracy(strategy.model, benchmark.scenario.test_stream))
    assert plugin.buffer.buffer is memory and len(memory) <= 20  # evaluation leaves the memory alone


class LossSpy(SupervisedPlugin):
    """After the replay plugin's before_backward: the loss, outputs and labels of every replay mini-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list = []

    def before_backward(self, strategy, **kwargs):
        if isinstance(strategy.dataloader, ReplayDataLoader):
            self.batches.append((strategy.loss.detach().clone(), strategy.mb_output.detach().clone(),
                                 strategy.mb_x.clone(), strategy.mb_y.clone(), type(strategy._criterion)))


def test_soft_labelled_memory_rows_are_trained_on_their_soft_targets():
    benchmark = make_benchmark("split-digits", seed=0)
    first, second = list(benchmark.scenario.train_stream)[:2]
    plugin = DistilledReplayPlugin(mem_size=10, distiller=SoftLabelDistiller(), batch_size_mem=8, progress=False)
    spy = LossSpy()
    model = create_model("convnet", (1, 8, 8), 10, width=8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=256,
                     device="cpu", plugins=[plugin, spy], evaluator=None)
    strategy.train(first)
    images = torch.cat([s.images for s in plugin.buffer.sets.values()]).flatten(1)
    soft = torch.cat([s.labels for s in plugin.buffer.sets.values()])
    strategy.train(second)
    assert spy.batches and all(criterion is torch.nn.CrossEntropyLoss for *_, criterion in spy.batches)
    old_classes = torch.tensor(first.classes_in_this_experience)
    replayed = []
    for loss, output, x, y, _ in spy.batches:
        memory = torch.isin(y, old_classes)  # class-incremental: rows of the first experience's classes
        replayed.append(int(memory.sum()))
        index = torch.cdist(x[memory].flatten(1), images).argmin(dim=1)  # the memory rows, found here by pixels
        logp = output.log_softmax(dim=1)
        current = -logp[~memory].gather(1, y[~memory, None]).sum()
        expected = (current - (soft[index] * logp[memory]).sum()) / len(y)
        assert torch.allclose(loss, expected, atol=1e-5)
        assert not torch.allclose(loss, torch.nn.functional.cross_entropy(output, y), atol=1e-3)
    assert set(replayed) == {8, 2}  # 10 memory samples in draws of 8: the replayed rows per batch vary
    assert isinstance(strategy._criterion, torch.nn.CrossEntropyLoss)


def test_plugin_save_and_load(tmp_path):
    benchmark = make_benchmark("split-digits", seed=0)
    plugin = DistilledReplayPlugin(mem_size=10, distiller="random")
    plugin.buffer.post_adapt(type("Agent", (), {"device": "cpu"})(), benchmark.scenario.train_stream[0])
    plugin.save(tmp_path)
    restored = DistilledReplayPlugin(mem_size=10, distiller="random")
    restored.load(tmp_path)
    assert sorted(restored.buffer.sets) == sorted(plugin.buffer.sets)
    for key, synset in plugin.buffer.sets.items():
        assert torch.equal(restored.buffer.sets[key].images, synset.images)


@pytest.mark.slow
def test_cl_command_writes_results_csv(tmp_path, capsys):
    out = tmp_path / "cl"
    code = main(["cl", "--benchmark", "split-digits", "--strategy", "naive", "replay", "herding", "distilled",
                 "joint", "--mem-size", "20", "--epochs", "1", "--seed", "0", "--out", str(out), "--width", "8",
                 "--distill-iterations", "2"])
    assert code == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["naive", "replay", "herding", "distilled", "joint"]
    for row in rows[:4]:  # the final average accuracy is the one measured after the last experience
        assert float(row["final_accuracy"]) == pytest.approx(float(row["acc_after_exp4"]))
    assert float(rows[4]["final_accuracy"]) == pytest.approx(float(rows[4]["acc_after_exp0"]))  # joint: one step
    # every memory changes what is learnt once there is something to replay: no two rows agree after experience 1
    assert len({row["acc_after_exp1"] for row in rows[:4]}) == 4
    assert float(rows[3]["distill_seconds_per_exp"]) > 0
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "final average accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_cl_command_gives_every_memory_the_same_bytes(tmp_path, capsys):
    out = tmp_path / "cl"
    budget = 20 * (8 * 8 + 8)  # twenty uint8 8x8 digits with their int64 labels
    code = main(["cl", "--benchmark", "split-digits", "--strategy", "replay", "herding", "distilled",
                 "--mem-bytes", str(budget), "--storage", "uint8", "--epochs", "1", "--seed", "0", "--out", str(out),
                 "--width", "8", "--distill-iterations", "2"])
    assert code == 0
    rows = {r["strategy"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert all(int(r["mem_bytes"]) == budget for r in rows.values())
    assert int(rows["replay"]["memory_bytes"]) == int(rows["herding"]["memory_bytes"]) == budget  # 20 real images
    held = int(rows["distilled"]["memory_bytes"])
    # a whole number of images per class (10 classes), each uint8 set with its own scale and offset (8 bytes)
    assert budget - 10 * (72 + 8) < held <= budget
    assert f"{budget:,} B" in capsys.readouterr().out


def test_cl_command_refuses_a_byte_budget_below_one():
    with pytest.raises(SystemExit, match="--mem-bytes must be >= 1"):
        main(["cl", "--mem-bytes", "0"])


class PlainCollate(SupervisedPlugin):
    """Replaces the replay loader's collate function after the replay plugin set it."""

    def before_training_exp(self, strategy, **kwargs):
        if isinstance(strategy.dataloader, ReplayDataLoader):
            strategy.dataloader.loader_kwargs["collate_fn"] = torch.utils.data.default_collate


def test_batches_that_lose_their_memory_rows_warn_and_keep_the_criterions_loss():
    benchmark = make_benchmark("split-digits", seed=0)
    plugin = DistilledReplayPlugin(mem_size=10, distiller=SoftLabelDistiller(), progress=False)
    spy = LossSpy()
    model = create_model("convnet", (1, 8, 8), 10, width=8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, device="cpu",
                     plugins=[plugin, PlainCollate(), spy], evaluator=None)
    strategy.train(benchmark.scenario.train_stream[0])
    with pytest.warns(UserWarning, match="do not name their memory rows") as caught:
        strategy.train(benchmark.scenario.train_stream[1])
    assert sum("memory rows" in str(w.message) for w in caught) == 1  # once, not every batch
    assert spy.batches and all(torch.allclose(loss, torch.nn.functional.cross_entropy(output, y))
                               for loss, output, _, y, _ in spy.batches)


def test_a_memory_of_data_of_unknown_normalisation_keeps_its_pixels(digits):
    """Without `source` the plugin knows nothing of the data's range, so it must not clip the images into [0, 1]
    (normalised images span about -0.8..2 on Fashion-MNIST): a random-coreset memory holds the real images."""
    benchmark = make_benchmark("split-digits", seed=0)
    plugin = DistilledReplayPlugin(mem_size=10, distiller="random", progress=False)
    strategy = _naive(plugin, [])
    strategy.train(benchmark.scenario.train_stream[0])
    held = torch.stack([plugin.storage_policy.buffer[i][0] for i in range(len(plugin.storage_policy.buffer))])
    assert held.min() < 0 and held.max() > 1  # digits' normalised pixels, outside [0, 1]
    nearest = torch.cdist(held.flatten(1), digits.train_images.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert nearest.min(dim=1).values.max() == 0
