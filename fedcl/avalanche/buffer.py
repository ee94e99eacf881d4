"""DistilledBuffer: an Avalanche storage policy whose memory is distilled data, one SyntheticSet per class.

The memory is keyed by class (and task label), not by experience, so streams whose classes reappear - online
streams of many small experiences (`split_online_stream`), repeated or blurry class orders - work as they do with
Avalanche's class-balanced buffers.  After each training experience, every class in it is taken into memory
(`DistilledMemory.absorb`): a new class is distilled (DM by default, any registered distiller or a Distiller
instance) into `ipc` synthetic images; a class already held is updated from its new samples, warm-started from its
current images, in `update_iterations` distillation iterations, so the cost of an experience does not grow with
the length of the stream.  Every sample's task label is read from the experience's dataset
(`targets_task_labels`), and each replayed image keeps the task label of the data it was distilled from.

Budget.  With `max_size` images in all, ipc = max_size // (classes held) and the sets already held are compressed
to the new ipc - re-distilled from their own synthetic images (default), herded or truncated within them.  When
the classes seen outnumber `max_size`, the memory keeps one image for each of the `max_size` most recently seen
classes and drops the older ones: the memory never exceeds the budget and training never stops because of it
(`fedcl.memory.DistilledMemory.fit_budget`).  With `images_per_class` the memory grows by that many images per new
class instead; with `mem_bytes` the budget is bytes of the stored sets, and the images it holds are what the
distiller's stored form (`storage`: float32, float16, uint8) allows (see `fedcl.memory.DistilledMemory`).

Samples.  The experience's samples must be sequences (image, label[, task label, ...]) whose image is one (C, H, W)
tensor - the layout of Avalanche's classification datasets.  Dictionary samples and multi-input samples (a tuple
of tensors in the image slot) are refused with a TypeError naming the supported layout, before the first
experience trains when the buffer is used through DistilledReplayPlugin.

`key="experience"` keeps the earlier layout instead - one set per experience (an online experience's origin
experience), distilled from that experience's data alone - for domain-incremental streams that reuse the class ids
under one task label (permuted-fmnist), where one set per class would blend the domains into the same images.

Distillation budget.  A distiller given by name is built at the first experience on the strategy's device, with
defaults fitted to it (`default_options`): on CPU a small budget - DM and the other iterative methods at
CPU_ITERATIONS (150) iterations on a ConvNet of width CPU_WIDTH (32) - so that an ordinary CPU pipeline (split
Fashion-MNIST, five experiences) distils in 10-25 s per experience on one thread; on CUDA the distiller's own,
paper-scale defaults (DM: 1,000 iterations, ConvNet width 128).  Every option given in `distiller_options` wins
over these defaults (a `model_cfg` key by key).  With `progress` (the default) one line per experience goes to
stderr: the classes distilled and updated, the distiller, its iterations and the seconds it took; progress=False
silences it.

The memory replays through Avalanche's loaders as an AvalancheDataset of (image, label, task label) samples in the
same layout as the experience's own samples; each memory sample is a `MemorySample` (a list) that also knows its
row in the memory, so a collate function can tell replayed rows from current ones (`DistilledReplayPlugin` does,
to give soft-labelled rows their target distributions: `row_targets()`).  `save(dir)` / `load(dir)` write and
read the memory as SyntheticSet files, to resume a run.

The memory logic (budget, per-class compression, incremental updates, persistence) is
`fedcl.memory.DistilledMemory`, the one implementation shared with the federated continual client; this class
adapts it to Avalanche's storage-policy contract and loaders.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.utils import (
    AvalancheDataset,
    DataAttribute,
    TaskAwareSupervisedClassificationDataset,
    TaskLabels,
    concat_datasets,
)
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader

from fedcl.distill.base import Distiller, Source, accepted_options, create_distiller, default_model
from fedcl.memory import COMPRESSIONS, DistilledMemory, truncate
from fedcl.runtime import resolve_device

#: How the memory is keyed: one set per (task label, class), or one per experience.
KEYS = ("class", "experience")
__all__ = ["COMPRESSIONS", "CPU_ITERATIONS", "CPU_WIDTH", "KEYS", "DistilledBuffer", "MemorySample", "check_layout",
           "dataset_tensors", "default_options", "experience_tensors", "memory_dataset", "merge_options",
           "strategy_device", "truncate"]


class DistilledBuffer(ExemplarsBuffer):
    """Replay memory of distilled experiences.

    max_size: total images in memory (the usual Avalanche budget); or
    images_per_class: a fixed number of images per class (then the memory grows with the classes; max_size None);
    mem_bytes: total bytes of the stored sets (`SyntheticSet.nbytes`; max_size None): as many images as the
        distiller's stored form allows - a uint8 image costs one byte per pixel, a float32 one four.
    distiller: a registered distiller name, built on the strategy's device at the first experience with the
        device's defaults (`default_options`: on CPU 150 iterations on a width-32 ConvNet, on CUDA the
        distiller's own, e.g. DM's 1,000 iterations on a width-128 ConvNet), overridden by `distiller_options`,
        and `seed`; or a ready Distiller instance (used as configured).
    compress: how existing sets shrink when new classes arrive under `max_size`: "redistill" (the distiller
        again, from the stored synthetic images), "herding" (herding within them, pixel features) or "truncate"
        (the first images of each class).
    update_iterations: distillation iterations when a class already in memory reappears, warm-started from its
        images (default: a tenth of the distiller's iterations, at least 1).
    key: "class" (default: one set per task label and class, updated as classes reappear) or "experience" (one
        set per experience, replaced when the experience comes again; one task label per experience).
    source: name and normalisation of the real data, copied into the sets' metadata (what `to_grid_png` needs).
    n_classes: label space of the stream (default: the scenario's, else the largest label seen + 1).
    progress: one line per experience on stderr (classes distilled, distiller, iterations, seconds); default on.
        A bar over the distiller's iterations as well: distiller_options={"progress": True}.
    """

    def __init__(self, max_size: int | None = None, *, images_per_class: int | None = None,
                 mem_bytes: int | None = None, distiller: str | Distiller = "dm",
                 distiller_options: dict[str, Any] | None = None, compress: str = "redistill",
                 update_iterations: int | None = None, source: Source | None = None,
                 n_classes: int | None = None, key: str = "class", seed: int = 0, progress: bool = True) -> None:
        if update_iterations is not None and update_iterations < 1:
            raise ValueError(f"update_iterations must be >= 1, got {update_iterations}")
        if key not in KEYS:
            raise ValueError(f"key must be one of {KEYS}, got {key!r}")
        self.key = key
        self.memory = DistilledMemory(max_size, images_per_class=images_per_class, mem_bytes=mem_bytes,
                                      compress=compress, seed=seed)
        if isinstance(distiller, Distiller) and distiller_options:
            raise ValueError("distiller_options only apply to a distiller given by name")
        super().__init__(max_size)  # type: ignore[arg-type]
        self.source, self.n_classes = source or Source(), n_classes
        self.seed, self.progress, self.update_iterations = int(seed), progress, update_iterations
        self._distiller_spec, self._options = distiller, dict(distiller_options or {})
        self._distiller: Distiller | None = distiller if isinstance(distiller, Distiller) else None
        self.label_as_tensor = False
        self._row_targets: torch.Tensor | None = None

    # ------------------------------------------------------------------ what is in memory
    @property
    def sets(self) -> dict[int, Any]:
        """Key -> distilled SyntheticSet: `fedcl.memory.class_key(task label, class)` -> that class's set, or
        with key="experience" experience id -> that experience's set."""
        return self.memory.sets

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per experience: its step, the ipc, the memory size, the classes new to memory and updated,
        seconds distilling it and compressing older sets."""
        return self.memory.history

    @property
    def images_per_class(self) -> int | None:
        return self.memory.images_per_class

    @property
    def compress(self) -> str:
        return self.memory.compress

    @property
    def n_groups(self) -> int:
        """Classes held, counted once per task label."""
        return self.memory.n_groups

    def seen_classes(self) -> list[int]:
        return self.memory.seen_classes()

    def ipc_for(self, n_groups: int) -> int:
        """Images per class for `n_groups` classes under the budget (at least 1; see `DistilledMemory.fit_budget`)."""
        return self.memory.ipc_for(n_groups)

    def soft_targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, target distributions) of the soft-labelled sets in memory, or None when all labels are hard."""
        return self.memory.soft_targets()

    def row_targets(self) -> torch.Tensor | None:
        """One target distribution per memory row, in the order of `buffer` (`MemorySample.row`), when some held
        set is soft-labelled (hard-labelled rows are one-hot); None when every label is hard."""
        return self._row_targets

    @property
    def distiller(self) -> Distiller | None:
        """The distiller, once built (a ready instance from the start, one given by name at the first experience)."""
        return self._distiller

    def distiller_settings(self, device: torch.device | str) -> dict[str, Any]:
        """The options a distiller given by name is built with on `device`: the device's defaults
        (`default_options`), overridden by `distiller_options`."""
        device = resolve_device(device) if str(device) == "auto" else torch.device(device)
        return merge_options(default_options(str(self._distiller_spec), device), self._options)

    # ------------------------------------------------------------------ Avalanche contract
    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Take the classes of the experience just trained on into memory: new ones distilled, held ones updated,
        older sets compressed to make room."""
        images, labels, tasks = experience_tensors(exp)
        if len(labels) == 0:
            return
        start = time.perf_counter()
        distiller, n_classes = self._distiller_for(agent_state), self._label_space(exp, labels)
        if self.key == "class":
            self.memory.absorb(images, labels, distiller, n_classes=n_classes, tasks=tasks, source=self.source,
                               update_iterations=self.update_iterations)
        else:
            origin = getattr(exp, "origin_experience", exp)
            self.memory.add(int(origin.current_experience), images, labels, distiller, n_classes=n_classes,
                            source=self.source, task=single_task(tasks))
        self.label_as_tensor = isinstance(exp.dataset[0][1], torch.Tensor)
        self._rebuild()
        if self.progress:
            self._report(labels, time.perf_counter() - start)

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change the total budget; held sets are compressed to fit, and below one image per class the least
        recently seen classes are dropped.  A larger budget is used as classes arrive or reappear."""
        distiller = self._distiller_for(strategy) if self.sets else None
        self.memory.resize(new_size, distiller)
        self.max_size = new_size
        self._rebuild()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write every experience's set as a safetensors file and an index DIR/memory.json."""
        return self.memory.save(directory, label_as_tensor=self.label_as_tensor)

    def load(self, directory: str | Path) -> None:
        """Replace the memory with the sets saved in `directory` (validated, never unpickled)."""
        index = self.memory.load(directory)
        self.label_as_tensor = bool(index.get("label_as_tensor", False))
        self._rebuild()

    # ------------------------------------------------------------------ internals
    def _distiller_for(self, agent_state: Any) -> Distiller:
        """The distiller, built on first use on the strategy's device."""
        if self._distiller is None:
            device = strategy_device(agent_state)
            options = {"seed": self.seed, **self.distiller_settings(device)}
            self._distiller = create_distiller(str(self._distiller_spec), device=device, **options)
        return self._distiller

    def _report(self, labels: torch.Tensor, seconds: float) -> None:
        """The progress line of the experience just taken into memory."""
        record, distiller = self.history[-1], self._distiller
        iterations = getattr(distiller, "iterations", None)
        done = f"{record['new_classes']} new classes" if "new_classes" in record else "1 experience"
        if record.get("updated_classes"):
            done += f", {record['updated_classes']} updated"
        run = f"{distiller.name}, {iterations} iterations" if iterations else distiller.name
        print(f"DistilledBuffer: distilled {len(labels)} samples ({done}; {run}, on {distiller.device}) into "
              f"{record['ipc']} images per class, memory {len(self.buffer)} images, {seconds:.1f} s",
              file=sys.stderr, flush=True)

    def _label_space(self, exp: Any, labels: torch.Tensor) -> int:
        """Classes of the stream: as given, else the benchmark's (an online experience's origin benchmark), else
        one more than the largest label seen so far."""
        origin = getattr(exp, "origin_experience", exp)
        n_classes = self.n_classes or getattr(getattr(origin, "benchmark", None), "n_classes", None)
        seen = max([int(labels.max())] + self.seen_classes()) + 1
        return max(int(n_classes or 0), seen)

    def _rebuild(self) -> None:
        """Concatenate the sets into the AvalancheDataset that the replay loader draws from."""
        if not self.sets:
            self.buffer, self._row_targets = concat_datasets([]), None
            return
        images, labels, tasks = self.memory.tensors()
        self.buffer = memory_dataset(images, labels, tasks, label_as_tensor=self.label_as_tensor)
        targets = self.memory.labelled()[1]
        self._row_targets = targets if targets.ndim == 2 else None


#: Distillation budget on CPU for distillers given by name: iterations of the iterative methods and ConvNet width.
CPU_ITERATIONS, CPU_WIDTH = 150, 32


def default_options(name: str, device: torch.device) -> dict[str, Any]:
    """Device-fitted defaults for a distiller built by name: on CPU, CPU_ITERATIONS iterations (methods that take
    `iterations`) on a ConvNet of width CPU_WIDTH (methods whose network is the ConvNet); elsewhere none, so the
    distiller's own paper-scale defaults apply (DM: 1,000 iterations, width 128)."""
    if device.type != "cpu":
        return {}
    accepted, options = accepted_options(name), {}
    if "iterations" in accepted:
        options["iterations"] = CPU_ITERATIONS
    if "model_cfg" in accepted and default_model(name) == "convnet":
        options["model_cfg"] = {"width": CPU_WIDTH}
    return options


def merge_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`; a `model_cfg` merged key by key, and dropped from the defaults when `given` names
    another network (`model`), whose options may differ."""
    if given.get("model", "convnet") != "convnet":
        defaults = {k: v for k, v in defaults.items() if k != "model_cfg"}
    merged = {**defaults, **given}
    if isinstance(defaults.get("model_cfg"), dict) and isinstance(given.get("model_cfg"), dict):
        merged["model_cfg"] = {**defaults["model_cfg"], **given["model_cfg"]}
    return merged


class MemorySample(list):
    """A memory sample (image, label[, task label]): a list, as Avalanche's datasets make of every sample, that
    also carries its row in the memory (`row`), so that a collate function can find replayed rows in a batch."""

    row: int | None = None


class _MemoryTensors(torch.utils.data.TensorDataset):
    """(image, label) pairs; the label an int or a 0-d tensor, matching the stream's own samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, label_as_tensor: bool) -> None:
        super().__init__(images, labels)
        self.label_as_tensor = label_as_tensor

    def __getitem__(self, index: int) -> MemorySample:
        label = self.tensors[1][index]
        sample = MemorySample([self.tensors[0][index], label if self.label_as_tensor else int(label)])
        sample.row = int(index)
        return sample


def memory_dataset(images: torch.Tensor, labels: torch.Tensor, task_labels: torch.Tensor, *,
                   label_as_tensor: bool = False) -> AvalancheDataset:
    """An Avalanche classification dataset of (image, label, task label) samples with `targets` and
    `targets_task_labels`, the kind Avalanche's benchmarks and buffers hold, built with its public API: the task
    label is a `TaskLabels` attribute, which Avalanche appends to every sample."""
    attributes = [DataAttribute(labels.tolist(), "targets"), TaskLabels(task_labels.tolist())]
    return TaskAwareSupervisedClassificationDataset([_MemoryTensors(images, labels, label_as_tensor)],
                                                    data_attributes=attributes)


def experience_tensors(exp: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (images, labels, task labels) of an experience's training data, read without training augmentation.
    Task labels come from the dataset (`targets_task_labels`, one per sample; 0 when it has none), as Avalanche's
    own buffers read them: online experiences have no `task_labels` attribute."""
    images, labels = dataset_tensors(exp.dataset, batch_size)
    task_labels = getattr(exp.dataset, "targets_task_labels", None)
    tasks = torch.zeros_like(labels) if task_labels is None else torch.as_tensor(list(task_labels), dtype=torch.long)
    return images, labels, tasks


def single_task(tasks: torch.Tensor) -> int:
    """The one task label of an experience's samples; an error naming key="class" when they mix several."""
    found = torch.unique(tasks).tolist()
    if len(found) != 1:
        raise ValueError(f"the experience mixes task labels {found}; key='experience' needs one task label per "
                         "experience (key='class' keeps one set per task label and class)")
    return int(found[0])


def strategy_device(agent_state: Any) -> torch.device | str:
    """The strategy's device when it has a usable one, else "auto" (e.g. a test double without a real device)."""
    device = getattr(agent_state, "device", None)
    if isinstance(device, (str, torch.device)):
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            pass
    return "auto"


def check_layout(sample: Any) -> None:
    """Refuse samples the buffer cannot distil: the supported layout is a sequence (image, label[, task label,
    ...]) whose image is one (C, H, W) tensor and whose label is an int or a 0-d tensor."""
    if isinstance(sample, (tuple, list)) and len(sample) >= 2 and isinstance(sample[0], torch.Tensor) \
            and sample[0].ndim == 3 and (isinstance(sample[1], int) or (
                isinstance(sample[1], torch.Tensor) and sample[1].ndim == 0)):
        return
    if isinstance(sample, dict):
        got = f"a dictionary sample with keys {sorted(map(str, sample))}"
    elif isinstance(sample, (tuple, list)):
        got = f"a {type(sample).__name__} sample of ({', '.join(_describe(v) for v in sample)})"
    else:
        got = f"a {type(sample).__name__} sample"
    raise TypeError(f"DistilledBuffer distils samples laid out as (image, label[, task label, ...]) with one "
                    f"(C, H, W) image tensor and an int or 0-d tensor label; got {got}.  Dictionary and "
                    "multi-input samples are not supported: map them to that layout first.")


def _describe(value: Any) -> str:
    """A short description of one sample entry for `check_layout`'s error."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return type(value).__name__


def dataset_tensors(data: AvalancheDataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of an Avalanche dataset, read without its training augmentation."""
    if len(data) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    check_layout(data[0])
    data = data.eval()
    images, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=getattr(data, "collate_fn", None)):
        images.append(batch[0].float())
        labels.append(torch.as_tensor(batch[1]).long())
    return torch.cat(images), torch.cat(labels)
