"""One continual-learning run: a benchmark, a strategy, a memory, Avalanche's metrics.

Shared by `fedcl cl` and `simulations/bench_cl.py` so both compare strategies under the same protocol: the same
ConvNet, optimiser (SGD lr 0.01, momentum 0.9), epochs and batch composition (`train_mb_size` current samples,
plus `batch_size_mem` memory samples for every replay strategy through Avalanche's ReplayDataLoader).

Strategies:
  naive      fine-tuning, no memory (lower bound)
  replay     Avalanche ReplayPlugin with ClassBalancedBuffer: real images chosen at random, balanced per class
  herding    Avalanche ReplayPlugin with ParametricBuffer(groupby="class") and HerdingSelectionStrategy
  distilled  fedcl DistilledReplayPlugin (the chosen distiller)
  joint      Avalanche JointTraining on all experiences at once (upper bound; no forgetting is defined)

Budgets.  `mem_size` gives every memory the same number of images.  `mem_bytes` gives every memory the same bytes
instead.  A real image costs what it costs natively - one byte per pixel (uint8) plus its int64 label - so a
real-image buffer holds `mem_bytes // (pixels + 8)` images, and the distilled memory as many synthetic images as
its sets, kept in their stored form (`storage`: float32, float16 or uint8), fit in the same bytes
(`SyntheticSet.nbytes`, see `fedcl.memory.DistilledMemory`): a float32 distilled memory holds a quarter of the
images a real-image buffer does.  `memory_bytes` reports what each memory holds at the end, counted the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training import JointTraining, Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer, HerdingSelectionStrategy, ParametricBuffer

from fedcl.avalanche.benchmarks import CLBenchmark
from fedcl.avalanche.finetune import MemoryFinetunePlugin
from fedcl.avalanche.plugin import DistilledReplayPlugin
from fedcl.memory import stored_cost
from fedcl.models import create_model
from fedcl.runtime import resolve_device, seeded

STRATEGIES = ("naive", "replay", "herding", "distilled", "joint")
_ACC_EXP = "Top1_Acc_Exp/eval_phase/test_stream/Task{task:03d}/Exp{exp:03d}"
_ACC_STREAM = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
_FORGETTING = "StreamForgetting/eval_phase/test_stream"
_BWT = "StreamBWT/eval_phase/test_stream"


@dataclass(frozen=True)
class RunConfig:
    """Protocol of one run (the same for every strategy it is compared with)."""

    strategy: str
    mem_size: int = 100
    mem_bytes: int | None = None  # a byte budget instead of mem_size (see the module docstring)
    storage: str = "float32"  # stored form of the distilled sets (real images always count as uint8)
    distiller: str = "dm"
    distiller_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    train_mb_size: int = 128
    batch_size_mem: int = 128
    lr: float = 0.01
    model_cfg: dict[str, Any] = field(default_factory=lambda: {"width": 32})
    seed: int = 0
    device: str = "auto"
    tensorboard: str | None = None
    finetune_epochs: int = 0  # memory strategies: epochs on the memory alone after each experience (0 = none)


@dataclass
class RunResult:
    """Metrics of one run; accuracies in [0, 1]."""

    strategy: str
    seed: int
    mem_size: int
    final_accuracy: float
    forgetting: float
    bwt: float
    accuracy_after: list[float]  # stream accuracy after training each experience (joint: one value)
    final_per_experience: list[float]
    distill_seconds: list[float]  # per experience (distilled replay only)
    train_seconds: float
    mem_bytes: int = 0  # the byte budget (0: the memory was sized in images)
    memory_bytes: int = 0  # bytes the memory holds at the end (0: no memory)

    def row(self) -> dict[str, Any]:
        """A flat CSV row."""
        data = asdict(self)
        per_exp = data.pop("final_per_experience")
        after = data.pop("accuracy_after")
        distill = data.pop("distill_seconds")
        data["distill_seconds_per_exp"] = sum(distill) / len(distill) if distill else 0.0
        data.update({f"acc_exp{i}": a for i, a in enumerate(per_exp)})
        data.update({f"acc_after_exp{i}": a for i, a in enumerate(after)})
        return data


def run(benchmark: CLBenchmark, config: RunConfig) -> RunResult:
    """Train `config.strategy` over the benchmark's train stream, evaluating on the whole test stream after each
    experience; return Avalanche's final accuracy, forgetting and backward transfer."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose one of {list(STRATEGIES)}")
    device = resolve_device(config.device)
    scenario = benchmark.scenario
    with seeded(config.seed):
        model = create_model("convnet", benchmark.dataset.image_shape, benchmark.n_classes, **config.model_cfg)
    loggers = _loggers(config)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True), bwt_metrics(stream=True),
                                 loggers=loggers)
    plugins = _plugins(config, benchmark, model)
    strategy = _strategy(config, model, plugins, evaluator, device)
    torch.manual_seed(config.seed)  # Avalanche's loaders shuffle with the global generator
    start = time.perf_counter()
    accuracy_after, metrics = [], {}
    stream = scenario.train_stream if config.strategy != "joint" else [scenario.train_stream]
    for experience in stream:
        strategy.train(experience)
        metrics = strategy.eval(scenario.test_stream)
        accuracy_after.append(float(metrics[_ACC_STREAM]))
    seconds = time.perf_counter() - start
    for logger in loggers:
        logger.writer.close()  # flush the TensorBoard event file
    distill = [h["distill_seconds"] + h["compress_seconds"] for h in plugins[0].buffer.history] \
        if config.strategy == "distilled" else []
    per_exp = [float(metrics[_ACC_EXP.format(task=e.task_label, exp=e.current_experience)])
               for e in scenario.test_stream]
    held = memory_bytes(plugins[0], benchmark.dataset.image_shape) if plugins else 0
    return RunResult(config.strategy, config.seed, config.mem_size if config.mem_bytes is None else 0,
                     accuracy_after[-1], _metric(metrics, _FORGETTING, config), _metric(metrics, _BWT, config),
                     accuracy_after, per_exp, distill, round(seconds, 2), config.mem_bytes or 0, held)


def image_bytes(image_shape: tuple[int, ...], storage: str = "uint8") -> int:
    """Bytes of one real image of `image_shape` and its int64 label stored as `storage` (by default as it is
    stored natively, one byte per pixel), counted as a synthetic image is (`fedcl.memory.stored_cost`)."""
    return stored_cost(torch.zeros(1, *image_shape), storage)[0]


def memory_bytes(plugin: Any, image_shape: tuple[int, ...], real_storage: str = "uint8") -> int:
    """Bytes a replay plugin's memory holds: the distilled sets' stored payload (`SyntheticSet.nbytes`), or the
    number of real samples an Avalanche buffer holds times `image_bytes` in `real_storage`."""
    if isinstance(plugin, DistilledReplayPlugin):
        return sum(s.nbytes for s in plugin.buffer.sets.values())
    return len(plugin.storage_policy.buffer) * image_bytes(image_shape, real_storage)


def _metric(metrics: dict[str, Any], key: str, config: RunConfig) -> float:
    """A stream metric; NaN for joint training, where forgetting and backward transfer are undefined."""
    return math.nan if config.strategy == "joint" else float(metrics.get(key, math.nan))


def _loggers(config: RunConfig) -> list[Any]:
    if not config.tensorboard:
        return []
    from avalanche.logging import TensorboardLogger

    return [TensorboardLogger(tb_log_dir=str(Path(config.tensorboard) / f"{config.strategy}-seed{config.seed}"))]


def _plugins(config: RunConfig, benchmark: CLBenchmark, model: torch.nn.Module) -> list[Any]:
    """The strategy's replay plugin (none for naive and joint), followed by the memory fine-tuning phase when
    `finetune_epochs` is set; the same phase for every memory, so that they stay comparable."""
    replay = _replay_plugin(config, benchmark, model)
    if replay is None:
        return []
    if config.finetune_epochs:
        return [replay, MemoryFinetunePlugin(replay, epochs=config.finetune_epochs, lr=config.lr, seed=config.seed)]
    return [replay]


def _replay_plugin(config: RunConfig, benchmark: CLBenchmark, model: torch.nn.Module) -> Any:
    common = {"batch_size": config.train_mb_size, "batch_size_mem": config.batch_size_mem}
    real_images = config.mem_size if config.mem_bytes is None else \
        config.mem_bytes // image_bytes(benchmark.dataset.image_shape)
    if config.strategy in ("replay", "herding") and real_images < 1:
        raise ValueError(f"a memory of {config.mem_bytes} bytes cannot hold one uint8 image of shape "
                         f"{benchmark.dataset.image_shape} and its label")
    if config.strategy == "replay":
        policy = ClassBalancedBuffer(real_images, adaptive_size=True)
        return ReplayPlugin(real_images, storage_policy=policy, **common)
    if config.strategy == "herding":
        policy = ParametricBuffer(real_images, groupby="class",
                                  selection_strategy=FlatHerdingSelection(model, "features"))
        return ReplayPlugin(real_images, storage_policy=policy, **common)
    if config.strategy == "distilled":
        options = {"model_cfg": dict(config.model_cfg), **config.distiller_options}
        if config.storage != "float32":
            options["storage"] = config.storage
        key = "experience" if benchmark.name.startswith("permuted") else "class"  # domains stay apart
        mem_size = config.mem_size if config.mem_bytes is None else None
        return DistilledReplayPlugin(mem_size, config.distiller, mem_bytes=config.mem_bytes,
                                     distiller_options=options, source=benchmark.source,
                                     n_classes=benchmark.n_classes, key=key, seed=config.seed, **common)
    return None


def _strategy(config: RunConfig, model: torch.nn.Module, plugins: list[Any], evaluator: Any,
              device: torch.device) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    kwargs = {"model": model, "optimizer": optimizer, "criterion": torch.nn.CrossEntropyLoss(),
              "train_mb_size": config.train_mb_size, "train_epochs": config.epochs, "eval_mb_size": 512,
              "device": device, "plugins": plugins, "evaluator": evaluator}
    return JointTraining(**kwargs) if config.strategy == "joint" else Naive(**kwargs)


class FlatHerdingSelection(HerdingSelectionStrategy):
    """Avalanche's herding on a convolutional layer's output, flattened to one feature vector per sample."""

    def make_sorted_indices_from_features(self, features: torch.Tensor) -> list[int]:
        return super().make_sorted_indices_from_features(features.flatten(1))
