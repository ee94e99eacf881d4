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
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader

from fedcl.distill.base import Distiller, Source, create_distiller
from fedcl.files import write_json
from fedcl.synthetic import SyntheticSet, SyntheticSetError

COMPRESSIONS = ("redistill", "herding", "truncate")
_INDEX_FILE = "memory.json"


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
        if (max_size is None) == (images_per_class is None):
            raise ValueError("give exactly one memory budget: max_size (total images) or images_per_class")
        if (max_size is not None and max_size < 1) or (images_per_class is not None and images_per_class < 1):
            raise ValueError(f"memory budget must be >= 1, got max_size={max_size}, "
                             f"images_per_class={images_per_class}")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
        if isinstance(distiller, Distiller) and distiller_options:
            raise ValueError("distiller_options only apply to a distiller given by name")
        super().__init__(max_size)  # type: ignore[arg-type]
        self.images_per_class = images_per_class
        self.compress, self.source, self.n_classes = compress, source or Source(), n_classes
        self.seed, self.progress = int(seed), progress
        self._distiller_spec, self._options = distiller, dict(distiller_options or {})
        self._distiller: Distiller | None = distiller if isinstance(distiller, Distiller) else None
        self.sets: dict[int, SyntheticSet] = {}  # experience id -> its distilled set
        self.label_as_tensor = False
        #: One record per experience: seconds spent distilling it and compressing the older sets.
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ what is in memory
    @property
    def n_groups(self) -> int:
        """Classes held, counted once per experience (permuted streams repeat classes across experiences)."""
        return sum(len(s.classes()) for s in self.sets.values())

    def seen_classes(self) -> list[int]:
        return sorted({c for s in self.sets.values() for c in s.classes()})

    def ipc_for(self, n_groups: int) -> int:
        """Images per class for `n_groups` classes under the budget; an error if the budget cannot hold them."""
        if self.images_per_class is not None:
            return self.images_per_class
        ipc = self.max_size // n_groups
        if ipc < 1:
            raise ValueError(f"a memory of {self.max_size} images cannot keep one image for each of {n_groups} "
                             "classes seen; raise mem_size or give images_per_class")
        return ipc

    def soft_targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, target distributions) of the soft-labelled sets in memory, or None when all labels are hard."""
        soft = [s for s in self.sets.values() if s.soft_labels]
        if not soft:
            return None
        return torch.cat([s.images for s in soft]), torch.cat([_as_distribution(s.labels) for s in soft])

    # ------------------------------------------------------------------ Avalanche contract
    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Distil the experience just trained on into memory, compressing older sets to make room."""
        images, labels, task_label = experience_tensors(exp)
        n_classes = self.n_classes or getattr(getattr(exp, "benchmark", None), "n_classes", None) \
            or int(labels.max()) + 1
        ipc = self.ipc_for(self.n_groups + len(torch.unique(labels)))
        distiller = self._distiller_for(agent_state)
        start = time.perf_counter()
        self._shrink_to(ipc)
        compress_seconds = time.perf_counter() - start
        start = time.perf_counter()
        synset = distiller.distill(images, labels, ipc=ipc, n_classes=n_classes, source=self.source)
        distill_seconds = time.perf_counter() - start
        self.sets[int(exp.current_experience)] = _tagged(synset, task_label)
        self.label_as_tensor = isinstance(exp.dataset[0][1], torch.Tensor)
        self._rebuild()
        self.history.append({"experience": int(exp.current_experience), "ipc": ipc, "n_images": len(self.buffer),
                             "distill_seconds": round(distill_seconds, 3),
                             "compress_seconds": round(compress_seconds, 3)})

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change the total budget; existing sets are compressed (never dropped) to fit."""
        if new_size < 1:
            raise ValueError(f"memory budget must be >= 1, got {new_size}")
        self.max_size, self.images_per_class = new_size, None
        if self.sets:
            self._distiller_for(strategy)
            self._shrink_to(self.ipc_for(self.n_groups))
            self._rebuild()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write every experience's set as DIR/experience-<id>.safetensors and an index DIR/memory.json."""
        directory = Path(directory)
        files = {}
        for exp_id, synset in sorted(self.sets.items()):
            name = f"experience-{exp_id:03d}.safetensors"
            synset.save(directory / name)
            files[str(exp_id)] = name
        write_json(directory / _INDEX_FILE, {"max_size": self.max_size, "images_per_class": self.images_per_class,
                                             "label_as_tensor": self.label_as_tensor, "files": files})
        return directory

    def load(self, directory: str | Path) -> None:
        """Replace the memory with the sets saved in `directory` (validated, never unpickled)."""
        directory = Path(directory)
        try:
            index = json.loads((directory / _INDEX_FILE).read_text())
            files = {int(k): str(v) for k, v in index["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SyntheticSetError(f"{directory / _INDEX_FILE} is missing or malformed: {err}") from None
        sets = {}
        for exp_id, name in files.items():
            if Path(name).name != name:
                raise SyntheticSetError(f"{directory / _INDEX_FILE} names a file outside the directory: {name!r}")
            sets[exp_id] = SyntheticSet.load(directory / name)
            _task_label(sets[exp_id])  # fail early on a set without a usable task label
        self.sets = sets
        self.label_as_tensor = bool(index.get("label_as_tensor", False))
        self._rebuild()

    # ------------------------------------------------------------------ internals
    def _distiller_for(self, agent_state: Any) -> Distiller:
        if self._distiller is None:
            self._distiller = create_distiller(str(self._distiller_spec), device=getattr(agent_state, "device", "auto"),
                                               seed=self.seed, progress=self.progress, **self._options)
        return self._distiller

    def _shrink_to(self, ipc: int) -> None:
        for exp_id, synset in self.sets.items():
            if synset.meta.ipc > ipc:
                self.sets[exp_id] = _tagged(self._compressed(synset, ipc), _task_label(synset))

    def _compressed(self, synset: SyntheticSet, ipc: int) -> SyntheticSet:
        """`synset` reduced to `ipc` images per class with the configured compression."""
        if self.compress == "truncate":
            return truncate(synset, ipc)
        distiller = self._distiller
        if self.compress == "herding":
            distiller = create_distiller("herding", features="pixels", seed=self.seed)
        source = Source(synset.meta.dataset, synset.meta.mean, synset.meta.std)
        return distiller.distill(synset.images, synset.hard_labels, ipc=ipc, n_classes=synset.meta.n_classes,
                                 source=source)

    def _rebuild(self) -> None:
        """Concatenate the sets into the AvalancheDataset that the replay loader draws from."""
        if not self.sets:
            return
        ordered = [self.sets[k] for k in sorted(self.sets)]
        images = torch.cat([s.images for s in ordered])
        labels = torch.cat([s.hard_labels for s in ordered])
        tasks = torch.cat([torch.full((len(s),), _task_label(s), dtype=torch.long) for s in ordered])
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
    data = exp.dataset.eval()
    images, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=getattr(data, "collate_fn", None)):
        images.append(batch[0].float())
        labels.append(torch.as_tensor(batch[1]).long())
    return torch.cat(images), torch.cat(labels), int(task_labels[0])


def truncate(synset: SyntheticSet, ipc: int) -> SyntheticSet:
    """The first `ipc` images of every class (stable order), labels and metadata kept."""
    hard = synset.hard_labels
    rank = torch.zeros_like(hard)
    for c in synset.classes():
        members = torch.nonzero(hard == c).flatten()
        rank[members] = torch.arange(len(members))
    keep = rank < ipc
    return replace(synset, images=synset.images[keep].clone(), labels=synset.labels[keep].clone(),
                   meta=replace(synset.meta, ipc=min(ipc, synset.meta.ipc)))


def _tagged(synset: SyntheticSet, task_label: int) -> SyntheticSet:
    """The set with its task label recorded in the metadata (so a saved memory restores it)."""
    return replace(synset, meta=replace(synset.meta, extra={**synset.meta.extra, "task_label": int(task_label)}))


def _task_label(synset: SyntheticSet) -> int:
    value = synset.meta.extra.get("task_label", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SyntheticSetError(f"metadata extra.task_label must be a non-negative integer, got {value!r}")
    return value


def _as_distribution(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels as probability rows: kept when they already are distributions, else read as logits."""
    labels = labels.float()
    if bool((labels >= 0).all()) and torch.allclose(labels.sum(dim=1), torch.ones(len(labels)), atol=1e-3):
        return labels
    return labels.softmax(dim=1)
