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

The memory replays through Avalanche's loaders as an AvalancheDataset of (image, label, task label) samples in the
same layout as the experience's own samples.  Soft labels (from learned-label distillers) are kept beside it in
`soft_targets()`; `DistilledReplayPlugin` uses them in the loss.  `save(dir)` / `load(dir)` write and read the
memory as SyntheticSet files, to resume a run.

The memory logic (budget, per-class compression, incremental updates, persistence) is
`fedcl.memory.DistilledMemory`, the one implementation shared with the federated continual client; this class
adapts it to Avalanche's storage-policy contract and loaders.
"""

from __future__ import annotations

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

from fedcl.distill.base import Distiller, Source, create_distiller
from fedcl.memory import COMPRESSIONS, DistilledMemory, truncate

#: How the memory is keyed: one set per (task label, class), or one per experience.
KEYS = ("class", "experience")
__all__ = ["COMPRESSIONS", "KEYS", "DistilledBuffer", "check_layout", "dataset_tensors", "experience_tensors",
           "memory_dataset", "strategy_device", "truncate"]


class DistilledBuffer(ExemplarsBuffer):
    """Replay memory of distilled experiences.

    max_size: total images in memory (the usual Avalanche budget); or
    images_per_class: a fixed number of images per class (then the memory grows with the classes; max_size None);
    mem_bytes: total bytes of the stored sets (`SyntheticSet.nbytes`; max_size None): as many images as the
        distiller's stored form allows - a uint8 image costs one byte per pixel, a float32 one four.
    distiller: a registered distiller name (built on the strategy's device at the first experience, with
        `distiller_options`, `seed` and `progress`) or a ready Distiller instance (used as configured).
    compress: how existing sets shrink when new classes arrive under `max_size`: "redistill" (the distiller
        again, from the stored synthetic images), "herding" (herding within them, pixel features) or "truncate"
        (the first images of each class).
    update_iterations: distillation iterations when a class already in memory reappears, warm-started from its
        images (default: a tenth of the distiller's iterations, at least 1).
    key: "class" (default: one set per task label and class, updated as classes reappear) or "experience" (one
        set per experience, replaced when the experience comes again; one task label per experience).
    source: name and normalisation of the real data, copied into the sets' metadata (what `to_grid_png` needs).
    n_classes: label space of the stream (default: the scenario's, else the largest label seen + 1).
    """

    def __init__(self, max_size: int | None = None, *, images_per_class: int | None = None,
                 mem_bytes: int | None = None, distiller: str | Distiller = "dm",
                 distiller_options: dict[str, Any] | None = None, compress: str = "redistill",
                 update_iterations: int | None = None, source: Source | None = None,
                 n_classes: int | None = None, key: str = "class", seed: int = 0, progress: bool = False) -> None:
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

    # ------------------------------------------------------------------ Avalanche contract
    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Take the classes of the experience just trained on into memory: new ones distilled, held ones updated,
        older sets compressed to make room."""
        images, labels, tasks = experience_tensors(exp)
        if len(labels) == 0:
            return
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
            self._distiller = create_distiller(str(self._distiller_spec), device=strategy_device(agent_state),
                                               seed=self.seed, progress=self.progress, **self._options)
        return self._distiller

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
            self.buffer = concat_datasets([])
            return
        images, labels, tasks = self.memory.tensors()
        self.buffer = memory_dataset(images, labels, tasks, label_as_tensor=self.label_as_tensor)


class _MemoryTensors(torch.utils.data.TensorDataset):
    """(image, label) pairs; the label an int or a 0-d tensor, matching the stream's own samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, label_as_tensor: bool) -> None:
        super().__init__(images, labels)
        self.label_as_tensor = label_as_tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        label = self.tensors[1][index]
        return self.tensors[0][index], label if self.label_as_tensor else int(label)


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
