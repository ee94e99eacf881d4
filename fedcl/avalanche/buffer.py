"""DistilledBuffer: an Avalanche storage policy whose memory is distilled data (one SyntheticSet per experience).

After each training experience the experience's data is distilled (DM by default, any registered distiller or a
Distiller instance) into `ipc` synthetic images per class.  With a total budget (`max_size` images) the
images-per-class shrink as classes arrive: ipc = max_size // (classes seen so far, counted per experience), and the
sets already in memory are compressed to the new ipc - re-distilled from their own synthetic images (default),
herded or truncated within them - never dropped, so every class seen stays represented.  With
`images_per_class` the memory grows by that many images per new class instead.

The memory replays through Avalanche's loaders as an AvalancheDataset of (image, label, task label) samples in the
same layout as the experience's own samples.  Soft labels (from learned-label distillers) are kept beside it in
`soft_targets()`; `DistilledReplayPlugin` uses them in the loss.  `save(dir)` / `load(dir)` write and read the
memory as SyntheticSet files, to resume a run.

The memory logic (budget, per-class compression, persistence) is `fedcl.memory.DistilledMemory`, the one
implementation shared with the federated continual client; this class adapts it to Avalanche's storage-policy
contract and loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader

from fedcl.distill.base import Distiller, Source, create_distiller
from fedcl.memory import COMPRESSIONS, DistilledMemory, truncate

__all__ = ["COMPRESSIONS", "DistilledBuffer", "dataset_tensors", "experience_tensors", "memory_dataset", "truncate"]


class DistilledBuffer(ExemplarsBuffer):
    """Replay memory of distilled experiences.

    max_size: total images in memory (the usual Avalanche budget); or
    images_per_class: a fixed number of images per class (then the memory grows with the classes; max_size None).
    distiller: a registered distiller name (built on the strategy's device at the first experience, with
        `distiller_options`, `seed` and `progress`) or a ready Distiller instance (used as configured).
    compress: how existing sets shrink when new classes arrive under `max_size`: "redistill" (the distiller
        again, from the stored synthetic images), "herding" (herding within them, pixel features) or "truncate"
        (the first images of each class).
    source: name and normalisation of the real data, copied into the sets' metadata (what `to_grid_png` needs).
    n_classes: label space of the stream (default: the scenario's, else the largest label seen + 1).
    """

    def __init__(self, max_size: int | None = None, *, images_per_class: int | None = None,
                 distiller: str | Distiller = "dm", distiller_options: dict[str, Any] | None = None,
                 compress: str = "redistill", source: Source | None = None, n_classes: int | None = None,
                 seed: int = 0, progress: bool = False) -> None:
        self.memory = DistilledMemory(max_size, images_per_class=images_per_class, compress=compress, seed=seed)
        if isinstance(distiller, Distiller) and distiller_options:
            raise ValueError("distiller_options only apply to a distiller given by name")
        super().__init__(max_size)  # type: ignore[arg-type]
        self.source, self.n_classes = source or Source(), n_classes
        self.seed, self.progress = int(seed), progress
        self._distiller_spec, self._options = distiller, dict(distiller_options or {})
        self._distiller: Distiller | None = distiller if isinstance(distiller, Distiller) else None
        self.label_as_tensor = False

    # ------------------------------------------------------------------ what is in memory
    @property
    def sets(self) -> dict[int, Any]:
        """Experience id -> its distilled SyntheticSet."""
        return self.memory.sets

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per experience (`key` = its id): its ipc, the memory size, seconds distilling it and
        compressing older sets."""
        return self.memory.history

    @property
    def images_per_class(self) -> int | None:
        return self.memory.images_per_class

    @property
    def compress(self) -> str:
        return self.memory.compress

    @property
    def n_groups(self) -> int:
        """Classes held, counted once per experience (permuted streams repeat classes across experiences)."""
        return self.memory.n_groups

    def seen_classes(self) -> list[int]:
        return self.memory.seen_classes()

    def ipc_for(self, n_groups: int) -> int:
        """Images per class for `n_groups` classes under the budget; an error if the budget cannot hold them."""
        return self.memory.ipc_for(n_groups)

    def soft_targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, target distributions) of the soft-labelled sets in memory, or None when all labels are hard."""
        return self.memory.soft_targets()

    # ------------------------------------------------------------------ Avalanche contract
    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Distil the experience just trained on into memory, compressing older sets to make room."""
        images, labels, task = experience_tensors(exp)
        n_classes = self.n_classes or getattr(getattr(exp, "benchmark", None), "n_classes", None) \
            or int(labels.max()) + 1
        self.memory.add(int(exp.current_experience), images, labels, self._distiller_for(agent_state),
                        n_classes=n_classes, source=self.source, task=task)
        self.label_as_tensor = isinstance(exp.dataset[0][1], torch.Tensor)
        self._rebuild()

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change the total budget; existing sets are compressed (never dropped) to fit."""
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
        if self._distiller is None:
            self._distiller = create_distiller(str(self._distiller_spec), device=getattr(agent_state, "device", "auto"),
                                               seed=self.seed, progress=self.progress, **self._options)
        return self._distiller

    def _rebuild(self) -> None:
        """Concatenate the sets into the AvalancheDataset that the replay loader draws from."""
        if not self.sets:
            return
        images, labels, tasks = self.memory.tensors()
        self.buffer = memory_dataset(images, labels, tasks, label_as_tensor=self.label_as_tensor)


class _MemoryTensors(torch.utils.data.TensorDataset):
    """(image, label) pairs; the label an int or a 0-d tensor, matching the stream's own samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, label_as_tensor: bool) -> None:
        super().__init__(images, labels)
        self.targets, self.label_as_tensor = labels.tolist(), label_as_tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        label = self.tensors[1][index]
        return self.tensors[0][index], label if self.label_as_tensor else int(label)


def memory_dataset(images: torch.Tensor, labels: torch.Tensor, task_labels: torch.Tensor, *,
                   label_as_tensor: bool = False) -> AvalancheDataset:
    """An Avalanche classification dataset of (image, label, task label) samples with `targets` and task labels."""
    return _make_taskaware_classification_dataset(_MemoryTensors(images, labels, label_as_tensor),
                                                  task_labels=task_labels.tolist(), targets=labels.tolist())


def experience_tensors(exp: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All (images, labels) of an experience's training data, read without training augmentation, and its task
    label (an experience with several task labels is refused: distil each task as its own experience)."""
    task_labels = list(getattr(exp, "task_labels", [0]))
    if len(task_labels) != 1:
        raise ValueError(f"experience {exp.current_experience} mixes task labels {task_labels}; DistilledBuffer "
                         "needs one task label per experience")
    images, labels = dataset_tensors(exp.dataset, batch_size)
    return images, labels, int(task_labels[0])


def dataset_tensors(data: AvalancheDataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of an Avalanche dataset, read without its training augmentation."""
    if len(data) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    data = data.eval()
    images, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=getattr(data, "collate_fn", None)):
        images.append(batch[0].float())
        labels.append(torch.as_tensor(batch[1]).long())
    return torch.cat(images), torch.cat(labels)
