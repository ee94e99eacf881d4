"""Avalanche's storage-policy contract, kept by DistilledBuffer / DistilledReplayPlugin in every pipeline.

In the spirit of Avalanche's own storage-policy and replay tests: the budget is never exceeded; resize works down
and up; post_adapt adds the experience's classes and task labels; replay batches mix current and memory samples
exactly as ReplayPlugin does; online and task-aware online streams train to the end; a budget below the number of
classes trains to the end; the plugin pickles; a budget in bytes is never exceeded in the stored form.  Tiny synthetic data and distillers keep the module fast.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.benchmarks.scenarios.online import split_online_stream  # noqa: E402
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin  # noqa: E402
from avalanche.training.storage_policy import ClassBalancedBuffer, ExemplarsBuffer  # noqa: E402

from fedcl.avalanche import DistilledBuffer, DistilledReplayPlugin  # noqa: E402
from fedcl.avalanche.benchmarks import LabelledTensors  # noqa: E402
from fedcl.avalanche.buffer import CPU_ITERATIONS, CPU_WIDTH, strategy_device  # noqa: E402
from fedcl.distill.base import DistillResult  # noqa: E402
from fedcl.distill.coreset import RandomCoreset  # noqa: E402
from fedcl.memory import HISTORY, class_key, stored_cost  # noqa: E402

AGENT = SimpleNamespace(device=torch.device("cpu"))
N_CLASSES = 6
TINY_DM = {"iterations": 2, "batch_real": 8, "model_cfg": {"width": 4}, "dsa": False}


def tiny_benchmark(task_labels: bool = False, per_class: int = 20) -> object:
    """6 classes of 1x8x8 images (class-shifted noise) in 3 experiences of 2 classes, in class order."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLASSES).repeat_interleave(per_class)
    images = torch.randn(len(labels), 1, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1) * 0.5
    data = LabelledTensors(images, labels)
    return nc_benchmark(data, LabelledTensors(images[::5], labels[::5]), n_experiences=3, task_labels=task_labels,
                        shuffle=False, seed=0, fixed_class_order=list(range(N_CLASSES)))


def online(bench: object, size: int = 10) -> list:
    """The benchmark's training stream split into experiences of `size` samples (Avalanche's online split)."""
    return list(split_online_stream(bench.train_stream, experience_size=size, seed=0))


def naive(plugin: SupervisedPlugin, *extra: SupervisedPlugin) -> Naive:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, N_CLASSES))
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=torch.nn.CrossEntropyLoss(), train_mb_size=8, train_epochs=1, eval_mb_size=64,
                 device="cpu", plugins=[plugin, *extra], evaluator=None)


def memory_tasks(buffer: ExemplarsBuffer) -> dict[int, set[int]]:
    """Class -> the task labels its memory samples carry."""
    found: dict[int, set[int]] = {}
    for y, t in zip(buffer.buffer.targets, buffer.buffer.targets_task_labels):
        found.setdefault(int(y), set()).add(int(t))
    return found


class SizeSpy(RandomCoreset):
    """The random distiller, recording how many samples every call distils from."""

    name = "test-size-spy"

    def __init__(self, **base) -> None:
        super().__init__(**base)
        self.sizes: list[int] = []

    def _distill(self, images, labels, ipc, n_classes, callback) -> DistillResult:
        self.sizes.append(len(labels))
        return super()._distill(images, labels, ipc, n_classes, callback)


class BatchSpy(SupervisedPlugin):
    """Records, for every training mini-batch, its size and how many of its rows are memory images."""

    def __init__(self, replay: ReplayPlugin) -> None:
        super().__init__()
        self.replay, self.batches = replay, []

    def before_training_iteration(self, strategy, **kwargs):
        memory = self.replay.storage_policy.buffer
        if len(memory) == 0 or not isinstance(strategy.dataloader, ReplayDataLoader):
            return
        held = torch.stack([memory[i][0] for i in range(len(memory))]).flatten(1)
        from_memory = int((torch.cdist(strategy.mb_x.flatten(1), held).min(dim=1).values == 0).sum())
        self.batches.append((len(strategy.mb_x), from_memory))


def test_the_buffer_is_an_exemplars_buffer_whose_max_size_is_the_budget():
    buffer = DistilledBuffer(7, distiller="random")
    assert isinstance(buffer, ExemplarsBuffer) and buffer.max_size == 7
    plugin = DistilledReplayPlugin(mem_size=7, distiller="random")
    assert plugin.storage_policy.max_size == 7 and len(plugin.storage_policy.buffer) == 0


@pytest.mark.parametrize("mem_size", [1, 4, 5, 12])
def test_the_budget_is_never_exceeded_in_an_online_stream(mem_size):
    buffer = DistilledBuffer(mem_size, distiller="random")
    for exp in online(tiny_benchmark()):
        buffer.post_adapt(AGENT, exp)
        assert 0 < len(buffer.buffer) <= mem_size
        assert len(buffer.buffer.targets) == len(buffer.buffer.targets_task_labels) == len(buffer.buffer)
    assert len(buffer.seen_classes()) == min(mem_size, N_CLASSES)
    assert any(h["updated_classes"] for h in buffer.history)  # classes reappeared across small experiences


def test_the_memory_is_keyed_by_class_and_updates_a_reappearing_class_in_place():
    buffer = DistilledBuffer(12, distiller="random")
    stream = online(tiny_benchmark())
    for exp in stream:
        buffer.post_adapt(AGENT, exp)
    assert sorted(buffer.sets) == [class_key(0, c) for c in range(N_CLASSES)]
    assert all(len(s) == 2 and s.classes() == [key] for key, s in buffer.sets.items())
    assert sum(s.meta.extra["absorbed"] for s in buffer.sets.values()) == sum(len(e.dataset) for e in stream)


def test_resize_down_keeps_the_most_recent_classes_and_up_is_used_as_classes_return():
    bench = tiny_benchmark()
    buffer = DistilledBuffer(12, distiller="random")
    for exp in bench.train_stream:
        buffer.post_adapt(AGENT, exp)
    assert len(buffer.buffer) == 12
    buffer.resize(AGENT, 6)
    assert buffer.max_size == 6 and len(buffer.buffer) == 6 and buffer.seen_classes() == list(range(6))
    buffer.resize(AGENT, 4)
    assert len(buffer.buffer) == 4 and buffer.seen_classes() == [2, 3, 4, 5]  # experience 0's classes go first
    buffer.resize(AGENT, 8)
    assert buffer.max_size == 8 and len(buffer.buffer) == 4  # nothing to grow from until data comes
    buffer.post_adapt(AGENT, bench.train_stream[2])  # classes 4 and 5 return and grow to 8 // 4 images
    assert [len(buffer.sets[class_key(0, c)]) for c in (2, 3, 4, 5)] == [1, 1, 2, 2]


@pytest.mark.parametrize("task_labels", [False, True])
def test_post_adapt_adds_the_experiences_classes_with_their_task_labels(task_labels):
    bench = tiny_benchmark(task_labels=task_labels)
    buffer = DistilledBuffer(12, distiller="random")
    expected: dict[int, set[int]] = {}
    for exp in online(bench, size=20):
        buffer.post_adapt(AGENT, exp)
        for y, t in zip(exp.dataset.targets, exp.dataset.targets_task_labels):
            expected.setdefault(int(y), set()).add(int(t))
        assert memory_tasks(buffer) == expected
    assert not hasattr(exp, "task_labels")  # what online experiences lack
    assert {t for ts in expected.values() for t in ts} == ({0, 1, 2} if task_labels else {0})


def test_mixed_task_labels_in_one_experience_are_kept_apart():
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(40, 1, 8, 8, generator=gen), torch.tensor([0, 1] * 20)
    tasks = torch.arange(40) // 20
    buffer = DistilledBuffer(8, distiller="random")
    buffer.memory.absorb(images, labels, RandomCoreset(), n_classes=2, tasks=tasks)
    buffer._rebuild()
    assert sorted(buffer.sets) == [class_key(0, 0), class_key(0, 1), class_key(1, 0), class_key(1, 1)]
    assert memory_tasks(buffer) == {0: {0, 1}, 1: {0, 1}}


def test_replay_batches_mix_current_and_memory_samples_as_replay_plugin_does():
    bench = tiny_benchmark()
    recorded = {}
    for name, replay in (("stock", ReplayPlugin(mem_size=10, batch_size_mem=4)),
                         ("distilled", DistilledReplayPlugin(mem_size=10, distiller="random", batch_size_mem=4))):
        spy = BatchSpy(replay)
        strategy = naive(replay, spy)
        for exp in list(bench.train_stream)[:2]:
            strategy.train(exp)
        recorded[name] = spy.batches
    assert recorded["distilled"] == recorded["stock"]
    assert recorded["stock"] and all(size - from_memory == 8 and 0 < from_memory <= 4
                                     for size, from_memory in recorded["stock"])


@pytest.mark.parametrize("task_labels", [False, True])
def test_online_streams_train_to_the_end_with_a_tiny_dm(task_labels):
    bench = tiny_benchmark(task_labels=task_labels)
    plugin = DistilledReplayPlugin(mem_size=6, distiller="dm", distiller_options=TINY_DM, update_iterations=1)
    strategy = naive(plugin)
    stream = online(bench, size=10)
    for exp in stream:
        strategy.train(exp)
        assert len(plugin.storage_policy.buffer) <= 6
    assert strategy.clock.train_exp_counter == len(stream) == 12
    assert sorted(memory_tasks(plugin.storage_policy)) == list(range(N_CLASSES))
    if task_labels:  # every class's replayed images keep the task label of the data they came from
        assert memory_tasks(plugin.storage_policy) == {c: {c // 2} for c in range(N_CLASSES)}
    assert plugin.buffer.history[-1]["updated_classes"] == 2  # the last experience's classes were held
    last = {(int(t), int(y)) for y, t in zip(stream[-1].dataset.targets, stream[-1].dataset.targets_task_labels)}
    assert all(plugin.buffer.sets[class_key(t, c)].meta.extra["iterations"] == 1 for t, c in last)


def test_a_reappearing_class_is_warm_started_from_its_images():
    bench = tiny_benchmark()
    frozen = dict(TINY_DM, lr_img=0.0)  # no steps: the result is the start the update was given
    buffer = DistilledBuffer(4, distiller="dm", distiller_options=frozen)
    stream = online(bench, size=10)
    buffer.post_adapt(AGENT, stream[0])
    before = {k: s.images.clone() for k, s in buffer.sets.items()}
    buffer.post_adapt(AGENT, stream[1])
    for key, images in before.items():
        assert torch.equal(buffer.sets[key].images, images)


def test_the_cost_of_an_update_does_not_grow_with_the_stream():
    gen = torch.Generator().manual_seed(2)
    spy = SizeSpy()
    buffer = DistilledBuffer(3, distiller=spy)
    for _ in range(80):
        images, labels = torch.randn(10, 1, 8, 8, generator=gen), torch.zeros(10, dtype=torch.long)
        buffer.memory.absorb(images, labels, spy, n_classes=1)
    assert len(buffer.memory) == 3
    assert max(spy.sizes) <= 10 + HISTORY + 3 and spy.sizes[-1] == spy.sizes[-2]
    assert buffer.sets[class_key(0, 0)].meta.extra["absorbed"] == 800


def test_a_budget_below_the_class_count_trains_to_the_end():
    bench = tiny_benchmark()
    plugin = DistilledReplayPlugin(mem_size=3, distiller="random")
    strategy = naive(plugin)
    for exp in bench.train_stream:
        strategy.train(exp)
        assert len(plugin.storage_policy.buffer) <= 3
    assert strategy.clock.train_exp_counter == 3
    assert plugin.buffer.seen_classes() == [3, 4, 5]  # one image for each of the most recent classes


def test_the_plugin_pickles_before_and_after_training():
    bench = tiny_benchmark()
    plugin = DistilledReplayPlugin(mem_size=6, distiller="dm", distiller_options=TINY_DM)
    assert pickle.loads(pickle.dumps(plugin)).storage_policy.max_size == 6
    strategy = naive(plugin)
    strategy.train(bench.train_stream[0])
    copy = pickle.loads(pickle.dumps(plugin))
    assert list(copy.storage_policy.buffer.targets) == list(plugin.storage_policy.buffer.targets)
    for key, synset in plugin.buffer.sets.items():
        assert torch.equal(copy.buffer.sets[key].images, synset.images)
    copy.storage_policy.post_adapt(AGENT, bench.train_stream[1])  # the copy goes on
    assert len(copy.storage_policy.buffer) == 4 and copy.buffer.seen_classes() == [0, 1, 2, 3]


class DictSamples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(1, 8, 8), "label": 0}


class PairSamples(DictSamples):
    def __getitem__(self, index: int) -> tuple:
        return (torch.zeros(1, 8, 8), torch.zeros(3)), 0, 0


@pytest.mark.parametrize("data, named", [(DictSamples(), "dictionary"), (PairSamples(), "tuple")])
def test_dictionary_and_multi_input_samples_are_refused_before_training(data, named):
    plugin = DistilledReplayPlugin(mem_size=4, distiller="random")
    strategy = SimpleNamespace(experience=SimpleNamespace(dataset=data))
    with pytest.raises(TypeError, match=rf"\(image, label\[, task label.*{named}"):
        plugin.before_training_exp(strategy)
    with pytest.raises(TypeError, match="not supported"):
        plugin.storage_policy.post_adapt(AGENT, strategy.experience)


def test_a_strategy_without_a_real_device_falls_back_to_auto():
    assert strategy_device(SimpleNamespace(device=Mock())) == "auto"
    assert strategy_device(SimpleNamespace(device="not-a-device")) == "auto"
    assert strategy_device(SimpleNamespace()) == "auto"
    assert strategy_device(SimpleNamespace(device="cpu")) == torch.device("cpu")
    buffer = DistilledBuffer(4, distiller="dm", distiller_options=TINY_DM)
    buffer.post_adapt(SimpleNamespace(device=Mock()), tiny_benchmark().train_stream[0])
    assert len(buffer.buffer) == 4 and buffer.sets[class_key(0, 0)].meta.method == "dm"


def test_a_stored_image_costs_its_pixels_in_the_stored_dtype_plus_its_label():
    image = torch.zeros(3, 1, 8, 8)
    assert stored_cost(image, "float32") == (64 * 4 + 8, 0)
    assert stored_cost(image, "uint8") == (64 + 8, 2 * 4)  # one byte per pixel; a scale and offset per set


@pytest.mark.parametrize("storage, images", [("float32", 12), ("uint8", 42)])
def test_a_byte_budget_holds_what_the_stored_form_allows_and_is_never_exceeded(storage, images):
    budget = 12 * (64 * 4 + 8)  # 12 float32 images; (budget - 6 sets x 8) // 72 = 43 uint8 ones, 7 per class
    plugin = DistilledReplayPlugin(mem_size=None, mem_bytes=budget, distiller="random",
                                   distiller_options={"storage": storage})
    strategy = naive(plugin)
    for exp in online(tiny_benchmark()):
        strategy.train(exp)
        assert 0 < plugin.buffer.memory.nbytes <= budget
        assert all(s.meta.storage == storage for s in plugin.buffer.sets.values())
    assert len(plugin.storage_policy.buffer) == images and len(plugin.buffer.seen_classes()) == N_CLASSES
    assert plugin.storage_policy.buffer[0][0].dtype == torch.float32  # replayed decoded


def test_a_uint8_dm_memory_is_updated_from_its_dequantised_images():
    frozen = dict(TINY_DM, lr_img=0.0, storage="uint8")  # no steps: the update returns the images it started from
    buffer = DistilledBuffer(mem_bytes=4 * 80, distiller="dm", distiller_options=frozen)
    stream = online(tiny_benchmark(), size=10)
    buffer.post_adapt(AGENT, stream[0])
    before = {k: s.float_images() for k, s in buffer.sets.items()}
    buffer.post_adapt(AGENT, stream[1])
    assert buffer.history[-1]["updated_classes"] == 2 and buffer.memory.nbytes <= 4 * 80
    for key, images in before.items():
        synset = buffer.sets[key]
        assert synset.meta.storage == "uint8"
        assert torch.allclose(synset.float_images(), images, atol=float(synset.scale.max()))


def test_a_byte_budget_is_exclusive_with_an_image_budget():
    with pytest.raises(ValueError, match="exactly one memory budget"):
        DistilledReplayPlugin(mem_size=100, mem_bytes=10_000, distiller="random")


def test_a_built_distilled_buffer_is_taken_as_the_storage_policy():
    buffer = DistilledBuffer(6, distiller="random", progress=False)
    plugin = DistilledReplayPlugin(storage_policy=buffer, batch_size_mem=4)
    assert plugin.storage_policy is buffer and plugin.mem_size == 6 and plugin.batch_size_mem == 4
    strategy = naive(plugin)
    for exp in tiny_benchmark().train_stream:
        strategy.train(exp)
    assert buffer.seen_classes() == list(range(N_CLASSES)) and len(buffer.buffer) == 6


def test_any_avalanche_exemplars_buffer_can_be_the_storage_policy(tmp_path):
    policy = ClassBalancedBuffer(8, adaptive_size=True)
    plugin = DistilledReplayPlugin(storage_policy=policy)
    spy = BatchSpy(plugin)
    strategy = naive(plugin, spy)
    for exp in list(tiny_benchmark().train_stream)[:2]:
        strategy.train(exp)
    assert plugin.storage_policy is policy and len(policy.buffer) == 8
    assert sorted(set(policy.buffer.targets)) == [0, 1, 2, 3]
    assert spy.batches and all(from_memory > 0 for _, from_memory in spy.batches)  # experience 1 replayed it
    with pytest.raises(TypeError, match="needs a DistilledBuffer"):
        plugin.save(tmp_path)


@pytest.mark.parametrize("extra", [{"mem_size": 6}, {"distiller": "dm"}, {"distiller_options": {"iterations": 3}},
                                   {"progress": False}])
def test_a_storage_policy_with_buffer_building_arguments_is_refused(extra):
    with pytest.raises(ValueError, match=rf"storage_policy is an already-built memory; \['{next(iter(extra))}'\]"):
        DistilledReplayPlugin(storage_policy=DistilledBuffer(6, distiller="random"), **extra)
    with pytest.raises(TypeError, match="ExemplarsBuffer"):
        DistilledReplayPlugin(storage_policy=[])


def test_the_shorthand_builds_a_distilled_buffer_of_200_images_by_default():
    plugin = DistilledReplayPlugin()
    assert isinstance(plugin.storage_policy, DistilledBuffer) and plugin.storage_policy.max_size == 200
    assert plugin.storage_policy.progress is True and plugin.storage_policy._distiller_spec == "dm"


def test_on_cpu_a_named_distiller_gets_the_small_budget_and_given_options_win():
    buffer = DistilledBuffer(4, distiller="dm")
    assert buffer.distiller_settings("cpu") == {"iterations": CPU_ITERATIONS, "model_cfg": {"width": CPU_WIDTH}}
    assert CPU_ITERATIONS <= 200 and CPU_WIDTH <= 32
    assert DistilledBuffer(4, distiller="dm").distiller_settings(torch.device("cuda")) == {}  # DM's own: 1000, 128
    given = DistilledBuffer(4, distiller="dm", distiller_options={"iterations": 7, "model_cfg": {"depth": 2}})
    assert given.distiller_settings("cpu") == {"iterations": 7, "model_cfg": {"width": CPU_WIDTH, "depth": 2}}
    wide = DistilledBuffer(4, distiller="dm", distiller_options={"model_cfg": {"width": 128}, "iterations": 1000})
    assert wide.distiller_settings("cpu") == {"iterations": 1000, "model_cfg": {"width": 128}}
    other = DistilledBuffer(4, distiller="dm", distiller_options={"model": "mlp"})
    assert other.distiller_settings("cpu") == {"iterations": CPU_ITERATIONS, "model": "mlp"}
    assert "iterations" not in DistilledBuffer(4, distiller="random").distiller_settings("cpu")


def test_the_distiller_built_on_a_cpu_strategy_has_the_cpu_budget(capsys):
    options = {"iterations": 2, "batch_real": 8, "dsa": False}  # the iterations given; the width from the default
    buffer = DistilledBuffer(4, distiller="dm", distiller_options=options)
    buffer.post_adapt(AGENT, tiny_benchmark().train_stream[0])
    assert buffer.distiller.iterations == 2 and buffer.distiller.model_cfg == {"width": CPU_WIDTH}
    assert buffer.distiller.device == torch.device("cpu")
    assert buffer.sets[class_key(0, 0)].meta.extra["model_cfg"] == {"width": CPU_WIDTH}
    line = capsys.readouterr().err
    assert "DistilledBuffer: distilled 40 samples (2 new classes; dm, 2 iterations, on cpu)" in line
    assert line.count("\n") == 1
    quiet = DistilledBuffer(4, distiller="dm", distiller_options=options, progress=False)
    quiet.post_adapt(AGENT, tiny_benchmark().train_stream[0])
    assert capsys.readouterr().err == ""
