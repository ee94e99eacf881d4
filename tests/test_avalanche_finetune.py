"""MemoryFinetunePlugin inside a real Avalanche Naive strategy: after each experience the model trains on the
memory alone, for Avalanche's own buffers and for the distilled one, and the plugin refuses to run before its
replay plugin."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ClassBalancedBuffer  # noqa: E402

from fedcl.avalanche import DistilledReplayPlugin, MemoryFinetunePlugin, make_benchmark  # noqa: E402
from fedcl.avalanche import finetune as finetune_module  # noqa: E402
from fedcl.avalanche.experiment import RunConfig, run  # noqa: E402
from fedcl.models import create_model  # noqa: E402
from fedcl.train import evaluate_model  # noqa: E402


@pytest.fixture(scope="module")
def benchmark():
    return make_benchmark("split-digits", seed=0)


def _naive(plugins: list) -> Naive:
    torch.manual_seed(0)  # the model's initialisation and the loaders' shuffling
    model = create_model("convnet", (1, 8, 8), 10, width=8)
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=256,
                 device="cpu", plugins=plugins, evaluator=None)


def test_finetuning_fits_the_model_to_the_random_memory_of_every_class_seen(benchmark):
    random.seed(0)  # the buffer's random selection, whatever ran before
    replay = ReplayPlugin(20, storage_policy=ClassBalancedBuffer(20, adaptive_size=True))
    strategy = _naive([replay, MemoryFinetunePlugin(replay, epochs=60, lr=0.05)])
    seen = []
    for exp in list(benchmark.scenario.train_stream)[:3]:
        strategy.train(exp)
        seen += exp.classes_in_this_experience
        images, labels = finetune_module.memory_tensors(replay.storage_policy)
        assert sorted(set(labels.tolist())) == sorted(seen)
        # right after the phase the model classifies its memory (the newest classes no longer crowd out the old;
        # without the phase it gets 15-25 % of these images right)
        assert evaluate_model(strategy.model, images, labels, device="cpu") >= 0.75


def test_finetuning_trains_on_the_distilled_memory(benchmark, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune_module, "train_model",
                        lambda model, images, labels, config, **kw: calls.append((len(images), set(labels.tolist()))))
    replay = DistilledReplayPlugin(mem_size=20, distiller="random", source=benchmark.source)
    strategy = _naive([replay, MemoryFinetunePlugin(replay, epochs=1)])
    for exp in list(benchmark.scenario.train_stream)[:2]:
        strategy.train(exp)
    first, second = (set(e.classes_in_this_experience) for e in list(benchmark.scenario.train_stream)[:2])
    assert calls == [(20, first), (20, first | second)]


def test_finetuning_must_follow_its_replay_plugin(benchmark):
    replay = ReplayPlugin(20)
    strategy = _naive([MemoryFinetunePlugin(replay), replay])
    with pytest.raises(ValueError, match="after its replay plugin"):
        strategy.train(benchmark.scenario.train_stream[0])
    with pytest.raises(TypeError, match="storage_policy"):
        MemoryFinetunePlugin(object())
    with pytest.raises(ValueError, match="epochs"):
        MemoryFinetunePlugin(replay, epochs=0)


def test_run_config_adds_the_phase_to_memory_strategies_only(benchmark, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune_module, "train_model", lambda *a, **kw: calls.append(1))
    common = {"mem_size": 20, "epochs": 1, "train_mb_size": 32, "batch_size_mem": 32, "model_cfg": {"width": 8},
              "device": "cpu", "finetune_epochs": 2}
    run(benchmark, RunConfig(strategy="naive", **common))
    assert calls == []
    run(benchmark, RunConfig(strategy="replay", **common))
    assert len(calls) == benchmark.scenario.n_experiences
