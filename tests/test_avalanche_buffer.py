"""DistilledBuffer: budget, resizing that keeps every class, save/load, sample layout, soft-label loss terms."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("avalanche")

from fedcl.avalanche.benchmarks import LabelledTensors, make_benchmark, permute_pixels, permuted_scenario  # noqa: E402
from fedcl.avalanche.buffer import DistilledBuffer, memory_dataset, truncate  # noqa: E402
from fedcl.avalanche.plugin import ReplayCollate, fit_columns, soft_replay_correction  # noqa: E402
from fedcl.data import ClassIndex, load_dataset  # noqa: E402
from fedcl.distill.base import Distiller, DistillResult  # noqa: E402
from fedcl.memory import class_key  # noqa: E402
from fedcl.runtime import generator  # noqa: E402
from fedcl.synthetic import SyntheticSetError  # noqa: E402

AGENT = SimpleNamespace(device=torch.device("cpu"))


class SoftLabelDistiller(Distiller):
    """Real images per class with smoothed one-hot labels: stands in for a learned-label distiller."""

    name = "test-soft"

    def _distill(self, images, labels, ipc, n_classes, callback) -> DistillResult:
        picks, classes = ClassIndex(labels, n_classes).sample(ipc, generator(self.seed), exact=True)
        soft = torch.full((len(picks), n_classes), 0.1 / n_classes)
        soft[torch.arange(len(picks)), classes] += 0.9
        return DistillResult(images[picks].clone(), soft)


@pytest.fixture(scope="module")
def digits_stream():
    return make_benchmark("split-digits", seed=0).scenario


def _fill(buffer: DistilledBuffer, stream, upto: int | None = None) -> list[int]:
    """post_adapt every experience; return the memory size after each."""
    sizes = []
    for exp in list(stream.train_stream)[:upto]:
        buffer.post_adapt(AGENT, exp)
        sizes.append(len(buffer.buffer))
        seen = sorted(c for e in list(stream.train_stream)[:exp.current_experience + 1]
                      for c in e.classes_in_this_experience)
        assert buffer.seen_classes() == seen
        assert sorted(set(buffer.buffer.targets)) == seen
    return sizes


@pytest.mark.parametrize("compress", ["redistill", "herding", "truncate"])
def test_budget_is_never_exceeded_and_every_seen_class_stays(digits_stream, compress):
    buffer = DistilledBuffer(10, distiller="random", compress=compress)
    sizes = _fill(buffer, digits_stream)
    assert all(size <= 10 for size in sizes)
    assert sizes == [10, 8, 6, 8, 10]  # ipc 5, 2, 1, 1, 1 for 2, 4, 6, 8, 10 classes
    assert [h["ipc"] for h in buffer.history] == [5, 2, 1, 1, 1]


def test_resizing_redistils_old_sets_with_dm(digits_stream):
    options = {"iterations": 2, "batch_real": 8, "model_cfg": {"width": 8}}
    buffer = DistilledBuffer(8, distiller="dm", distiller_options=options)
    _fill(buffer, digits_stream, upto=2)
    first = buffer.sets[class_key(0, digits_stream.train_stream[0].classes_in_this_experience[0])]
    assert first.meta.method == "dm" and first.meta.ipc == 2 and len(first) == 2
    buffer.resize(AGENT, 4)
    assert len(buffer.buffer) == 4 and buffer.seen_classes() == [1, 4, 5, 7]


def test_images_per_class_budget_grows_with_classes(digits_stream):
    buffer = DistilledBuffer(images_per_class=3, distiller="random")
    assert _fill(buffer, digits_stream, upto=3) == [6, 12, 18]


def test_budget_below_the_classes_keeps_the_most_recent_ones(digits_stream):
    buffer = DistilledBuffer(3, distiller="random")
    buffer.post_adapt(AGENT, digits_stream.train_stream[0])
    buffer.post_adapt(AGENT, digits_stream.train_stream[1])
    first, second = (e.classes_in_this_experience for e in list(digits_stream.train_stream)[:2])
    assert len(buffer.buffer) == 3
    assert buffer.seen_classes() == sorted([max(first), *second])  # the older experience's smaller class goes


def test_invalid_budgets_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        DistilledBuffer(10, images_per_class=2)
    with pytest.raises(ValueError, match="compress"):
        DistilledBuffer(10, compress="drop")


def test_memory_samples_have_the_streams_layout(digits_stream):
    buffer = DistilledBuffer(10, distiller="random")
    exp = digits_stream.train_stream[0]
    buffer.post_adapt(AGENT, exp)
    x, y, t = buffer.buffer[0]
    x0, y0, t0 = exp.dataset[0]
    assert x.shape == x0.shape and type(y) is type(y0) and type(t) is type(t0)
    assert list(buffer.buffer.targets_task_labels) == [0] * 10


def test_the_memory_dataset_is_a_task_aware_avalanche_dataset():
    images, labels, tasks = torch.randn(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    data = memory_dataset(images, labels, tasks)
    assert list(data.targets) == labels.tolist() and list(data.targets_task_labels) == tasks.tolist()
    x, y, t = data[3]
    assert torch.equal(x, images[3]) and (y, t) == (1, 1)
    assert sorted(data.task_set) == [0, 1] and list(data.task_set[1].targets) == [1, 2, 2]  # task-balanced replay
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=6, collate_fn=data.collate_fn)))
    assert torch.equal(batch[1], labels) and torch.equal(batch[2], tasks)


def test_the_avalanche_adapters_import_only_public_avalanche_names():
    private = []
    for path in sorted((Path(__file__).resolve().parents[1] / "fedcl" / "avalanche").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("avalanche"):
                private += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") or any(p.startswith("_") for p in node.module.split("."))]
    assert private == []


def test_save_load_round_trips(digits_stream, tmp_path):
    buffer = DistilledBuffer(12, distiller=SoftLabelDistiller(), compress="truncate")
    _fill(buffer, digits_stream, upto=2)
    buffer.save(tmp_path / "memory")
    restored = DistilledBuffer(12, distiller="random")
    restored.load(tmp_path / "memory")
    assert sorted(restored.sets) == sorted(buffer.sets)
    for key, synset in buffer.sets.items():
        assert torch.equal(restored.sets[key].images, synset.images)
        assert torch.equal(restored.sets[key].labels, synset.labels)
    assert list(restored.buffer.targets) == list(buffer.buffer.targets)
    assert torch.equal(restored.soft_targets()[1], buffer.soft_targets()[1])
    restored.post_adapt(AGENT, digits_stream.train_stream[2])  # resumes: the next experience fits in
    assert len(restored.buffer) <= 12 and len(restored.seen_classes()) == 6


def test_load_refuses_a_path_outside_the_memory_directory(digits_stream, tmp_path):
    buffer = DistilledBuffer(10, distiller="random")
    buffer.post_adapt(AGENT, digits_stream.train_stream[0])
    buffer.save(tmp_path)
    (tmp_path / "memory.json").write_text('{"files": {"0": "../elsewhere.safetensors"}}')
    with pytest.raises(SyntheticSetError, match="outside"):
        DistilledBuffer(10).load(tmp_path)


def test_truncate_keeps_the_first_images_of_each_class(digits_stream):
    synset = SoftLabelDistiller().distill(torch.randn(40, 1, 8, 8), torch.arange(40) % 4, ipc=5)
    small = truncate(synset, 2)
    assert len(small) == 8 and small.meta.ipc == 2 and small.classes() == [0, 1, 2, 3]
    assert torch.equal(small.images[0], synset.images[0])


def test_the_soft_replay_correction_turns_the_batch_mean_ce_into_the_soft_mix():
    soft = torch.tensor([[0.5, 0.2, 0.3], [0.0, 0.5, 0.5]])
    output = torch.randn(5, 3, generator=generator(3))
    target = torch.tensor([0, 2, 1, 0, 1])
    logp = output.log_softmax(dim=1)
    corrected = torch.nn.functional.cross_entropy(output, target) + soft_replay_correction(
        output, target, torch.tensor([3, 1]), soft)
    expected = (-logp[0, 0] - logp[2, 1] - logp[4, 1] - (soft[0] * logp[3]).sum() - (soft[1] * logp[1]).sum()) / 5
    assert torch.allclose(corrected, expected)
    one_hot = torch.nn.functional.one_hot(target[[3, 1]], 3).float()  # hard rows as distributions: no change
    assert torch.allclose(soft_replay_correction(output, target, torch.tensor([3, 1]), one_hot), torch.tensor(0.0),
                          atol=1e-6)


def test_memory_samples_name_their_rows_through_the_replay_collate(digits_stream):
    buffer = DistilledBuffer(12, distiller=SoftLabelDistiller(), compress="truncate")
    _fill(buffer, digits_stream, upto=2)
    assert [buffer.buffer[i].row for i in range(len(buffer.buffer))] == list(range(12))
    current = [list(digits_stream.train_stream[2].dataset[i]) for i in range(3)]
    samples = [current[0], buffer.buffer[7], current[1], buffer.buffer[2], current[2]]
    batch = ReplayCollate(None)(samples)
    assert batch.memory_positions == [1, 3] and batch.memory_rows == [7, 2]
    assert torch.equal(batch[0][1], buffer.buffer[7][0]) and batch[1].tolist()[3] == buffer.buffer[2][1]
    targets = buffer.row_targets()
    assert targets.shape == (12, 10) and torch.equal(targets.argmax(dim=1), torch.tensor(list(buffer.buffer.targets)))
    hard = DistilledBuffer(10, distiller="random")
    hard.post_adapt(AGENT, digits_stream.train_stream[0])
    assert hard.row_targets() is None


def test_fit_columns_pads_or_cuts_and_renormalises():
    rows = torch.tensor([[0.5, 0.25, 0.25]])
    assert torch.allclose(fit_columns(rows, 2), torch.tensor([[2 / 3, 1 / 3]]))
    assert torch.allclose(fit_columns(rows, 4), torch.tensor([[0.5, 0.25, 0.25, 0.0]]))


def test_permuted_scenario_repeats_classes_with_new_pixel_orders():
    dataset = load_dataset("digits")
    scenario = permuted_scenario(dataset, 3, seed=0)
    assert [e.classes_in_this_experience for e in scenario.train_stream] == [list(range(10))] * 3
    first, second = scenario.train_stream[0].dataset[0][0], scenario.train_stream[1].dataset[0][0]
    assert (dataset.train_images == first).flatten(1).all(dim=1).any()  # experience 0: identity permutation
    assert not torch.equal(second, first) and torch.equal(second.flatten().sort()[0], first.flatten().sort()[0])
    order = torch.randperm(64, generator=generator(1))
    assert torch.equal(permute_pixels(dataset.train_images[:2], order).flatten(1), dataset.train_images[:2].flatten(1)[:, order])
    assert LabelledTensors(dataset.train_images[:3], dataset.train_labels[:3]).targets == dataset.train_labels[:3].tolist()


def test_experience_keyed_memory_keeps_permuted_domains_apart():
    scenario = permuted_scenario(load_dataset("digits"), 3, seed=0)
    by_experience = DistilledBuffer(30, distiller="random", key="experience")
    by_class = DistilledBuffer(30, distiller="random")
    for exp in scenario.train_stream:
        by_experience.post_adapt(AGENT, exp)
        by_class.post_adapt(AGENT, exp)
    assert sorted(by_experience.sets) == [0, 1, 2] and len(by_experience.buffer) == 30
    assert [h["ipc"] for h in by_experience.history] == [3, 1, 1]
    assert sorted(by_class.sets) == [class_key(0, c) for c in range(10)] and len(by_class.buffer) == 30
    with pytest.raises(ValueError, match="key must be"):
        DistilledBuffer(10, key="task")
