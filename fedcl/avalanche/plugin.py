"""DistilledReplayPlugin: Avalanche's replay, with a memory of distilled data instead of stored real samples.

Add it to any strategy (`Naive(model, optimizer, criterion, plugins=[DistilledReplayPlugin(mem_size=100,
distiller="dm")])`).  It is Avalanche's `ReplayPlugin` with a `DistilledBuffer` as storage policy: before each
experience the `ReplayDataLoader` mixes memory samples into every mini-batch (`batch_size_mem` of them, default the
strategy's train_mb_size, exactly as ReplayPlugin); after it, the experience's classes are taken into memory (new
classes distilled, classes already held updated from their current images; see DistilledBuffer).  It runs wherever
ReplayPlugin does: class- and task-incremental streams, online streams (`split_online_stream`), task-aware online
streams, and budgets smaller than the number of classes.  The samples must be (image, label[, task label])
sequences; other layouts are refused before the first experience trains (see `DistilledBuffer`).

Storage policy.  As with ReplayPlugin, an already-built storage policy can be given instead:
`DistilledReplayPlugin(storage_policy=DistilledBuffer(100, distiller="dm", ...))`, or any Avalanche
`ExemplarsBuffer` (then the plugin is ReplayPlugin with the layout check).  The buffer-building arguments
(mem_size, distiller, distiller_options, ...) are the shorthand for `DistilledBuffer(...)`; giving them together
with a storage_policy is a ValueError.

Distillation budget.  A distiller given by name gets defaults fitted to the strategy's device: on CPU 150
iterations on a width-32 ConvNet (`fedcl.avalanche.buffer.CPU_ITERATIONS`, `CPU_WIDTH`), on CUDA the distiller's
paper-scale defaults (DM: 1,000 iterations, width 128); `distiller_options` override them.  One progress line per
experience (what was distilled, iterations, seconds) goes to stderr unless progress=False.

Soft labels.  Memory samples travel through the loader with their hard label (the arg-max), so the batch layout,
the metrics and other plugins see ordinary (x, y, t) samples.  Each memory sample is a `MemorySample` carrying its
row in the memory; when the memory holds soft-labelled sets, the plugin gives the ReplayDataLoader a collate
function that records, for every mini-batch, which batch rows came from memory and from which memory rows
(`ReplayCollate`; the batch is a `ReplayBatch`, a list with `memory_positions` and `memory_rows`).  In
`before_backward` - the public hook where plugins such as LwF and EWC adjust `strategy.loss` - the hard-label
cross-entropy of the replayed rows R is replaced by the cross-entropy against their stored distribution q (columns
cut or zero-padded to the model's outputs, then renormalised):

    loss += (1 / B) * sum_{r in R} [ -sum_c q_rc log softmax(z_r)_c  -  CE(z_r, y_r) ]

with B the mini-batch size and z the model's outputs.  This assumes the strategy's criterion is the batch mean of
the hard-label cross-entropy (`CrossEntropyLoss()`, Avalanche's default); the loss then becomes
(sum_{i not in R} CE(z_i, y_i) + sum_{r in R} soft CE(z_r, q_r)) / B.  Memory rows of hard-labelled sets have
one-hot distributions, so their loss stays the hard-label cross-entropy.  If the batches lose their memory rows (a
collate function set by a later plugin, pin_memory), the plugin warns once and the loss stays the criterion's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.nn import functional as F

from fedcl.avalanche.buffer import DistilledBuffer, MemorySample, check_layout
from fedcl.distill.base import Distiller, Source

#: The total memory, in images, when no budget is given.
DEFAULT_MEM_SIZE = 200


class DistilledReplayPlugin(ReplayPlugin):
    """Replay of distilled data through Avalanche's replay loader.

    storage_policy: an already-built memory - a DistilledBuffer, or any Avalanche ExemplarsBuffer - used as
        ReplayPlugin uses its storage_policy; then none of the buffer-building arguments below may be given.
    Buffer-building arguments (the shorthand for `DistilledBuffer(...)`):
    mem_size: total images in memory (default 200); or images_per_class, or mem_bytes (total bytes of the stored
        sets, as many images as the distiller's stored form allows; see DistilledBuffer).
    distiller: a registered distiller name (default "dm"; also "random", "herding", ...) or a Distiller instance.
    distiller_options: options for a distiller given by name (e.g. {"iterations": 500, "model_cfg": {...}});
        they override the device's defaults (CPU: 150 iterations, ConvNet width 32; CUDA: the distiller's own).
    compress: "redistill" | "herding" | "truncate": how older sets shrink when new classes arrive.
    update_iterations: distillation iterations for a class already in memory that reappears (see DistilledBuffer).
    key: "class" (one set per task label and class) or "experience" (one per experience; see DistilledBuffer).
    source, n_classes, seed: see DistilledBuffer.  progress: one line per experience on stderr (default on).
    Replay arguments: batch_size / batch_size_mem / task_balanced_dataloader, as Avalanche's ReplayPlugin.
    """

    def __init__(self, mem_size: int | None = None, distiller: str | Distiller | None = None, *,
                 storage_policy: ExemplarsBuffer | None = None,
                 images_per_class: int | None = None, mem_bytes: int | None = None,
                 distiller_options: dict[str, Any] | None = None,
                 compress: str | None = None, update_iterations: int | None = None,
                 source: Source | None = None, n_classes: int | None = None,
                 key: str | None = None, seed: int | None = None, progress: bool | None = None,
                 batch_size: int | None = None, batch_size_mem: int | None = None,
                 task_balanced_dataloader: bool = False) -> None:
        building = {"mem_size": mem_size, "distiller": distiller, "images_per_class": images_per_class,
                    "mem_bytes": mem_bytes, "distiller_options": distiller_options, "compress": compress,
                    "update_iterations": update_iterations, "source": source, "n_classes": n_classes, "key": key,
                    "seed": seed, "progress": progress}
        given = {name: value for name, value in building.items() if value is not None}
        if storage_policy is None:
            storage_policy = build_buffer(**given)
        elif given:
            raise ValueError(f"storage_policy is an already-built memory; {sorted(given)} only build a "
                             "DistilledBuffer when no storage_policy is given: pass them to DistilledBuffer(...) "
                             "and give that as storage_policy, or drop storage_policy")
        elif not isinstance(storage_policy, ExemplarsBuffer):
            raise TypeError(f"storage_policy must be an Avalanche ExemplarsBuffer (e.g. a DistilledBuffer), got "
                            f"{type(storage_policy).__name__}")
        super().__init__(mem_size=storage_policy.max_size, batch_size=batch_size, batch_size_mem=batch_size_mem,
                         task_balanced_dataloader=task_balanced_dataloader, storage_policy=storage_policy)
        self._warned = False

    @property
    def buffer(self) -> ExemplarsBuffer:
        """The storage policy (a DistilledBuffer unless another ExemplarsBuffer was given)."""
        return self.storage_policy

    def before_training_exp(self, strategy: Any, num_workers: int = 0, shuffle: bool = True,
                            drop_last: bool = False, **kwargs: Any) -> None:
        """Refuse an unsupported sample layout before training on it, then replay as ReplayPlugin does; with
        soft-labelled sets in memory, the replay loader's batches record their memory rows (`ReplayCollate`)."""
        if len(strategy.experience.dataset):
            check_layout(strategy.experience.dataset[0])
        super().before_training_exp(strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last,
                                    **kwargs)
        loader = getattr(strategy, "dataloader", None)
        if self._row_targets() is not None and isinstance(loader, ReplayDataLoader):
            collate = loader.loader_kwargs.get("collate_fn")
            if not isinstance(collate, ReplayCollate):
                loader.loader_kwargs["collate_fn"] = ReplayCollate(collate)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Replace the hard-label loss of the replayed soft-labelled rows by their soft-label cross-entropy."""
        targets = self._row_targets()
        if targets is None:
            return
        rows = getattr(strategy.mbatch, "memory_rows", None)
        if rows is None:
            if isinstance(getattr(strategy, "dataloader", None), ReplayDataLoader) and not self._warned:
                self._warned = True
                warnings.warn("the replay mini-batches do not name their memory rows (the loader's collate_fn was "
                              "replaced after DistilledReplayPlugin set it, or pin_memory rebuilt the batch): the "
                              "soft-labelled memory is trained on its hard labels", stacklevel=2)
            return
        if len(rows) == 0:
            return
        positions = torch.as_tensor(strategy.mbatch.memory_positions, dtype=torch.long)
        memory_rows = torch.as_tensor(rows, dtype=torch.long)
        output = strategy.mb_output
        strategy.loss = strategy.loss + soft_replay_correction(output, strategy.mb_y, positions.to(output.device),
                                                               targets[memory_rows].to(output.device))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.storage_policy.post_adapt(strategy, strategy.experience)

    def save(self, directory: str | Path) -> Path:
        """Write the memory as SyntheticSet files (see DistilledBuffer.save)."""
        return self._distilled("save").save(directory)

    def load(self, directory: str | Path) -> None:
        """Restore a memory written by `save`, to resume a run at the next experience."""
        self._distilled("load").load(directory)

    def _row_targets(self) -> torch.Tensor | None:
        row_targets = getattr(self.storage_policy, "row_targets", None)
        return row_targets() if callable(row_targets) else None

    def _distilled(self, action: str) -> DistilledBuffer:
        if not isinstance(self.storage_policy, DistilledBuffer):
            raise TypeError(f"{action} needs a DistilledBuffer storage policy, this plugin has a "
                            f"{type(self.storage_policy).__name__}")
        return self.storage_policy


def build_buffer(mem_size: int | None = None, *, images_per_class: int | None = None, mem_bytes: int | None = None,
                 distiller: str | Distiller = "dm", **options: Any) -> DistilledBuffer:
    """The DistilledBuffer of the plugin's shorthand: mem_size 200 unless some budget is given."""
    if mem_size is None and images_per_class is None and mem_bytes is None:
        mem_size = DEFAULT_MEM_SIZE
    return DistilledBuffer(mem_size, images_per_class=images_per_class, mem_bytes=mem_bytes, distiller=distiller,
                           **options)


class ReplayBatch(list):
    """A collated mini-batch (x, y, t, ...) that also records its replayed rows: `memory_positions` (rows of
    the batch) and `memory_rows` (their rows in the memory, `MemorySample.row`)."""

    memory_positions: list[int]
    memory_rows: list[int]


class ReplayCollate:
    """Wraps a loader's collate function: the batch it makes, as a ReplayBatch naming its memory samples."""

    def __init__(self, collate: Callable[[list], Any] | None) -> None:
        self.collate = collate or torch.utils.data.default_collate

    def __call__(self, samples: list) -> Any:
        batch = self.collate(samples)
        if not isinstance(batch, (list, tuple)):
            return batch
        batch = ReplayBatch(batch)
        found = [(i, s.row) for i, s in enumerate(samples) if isinstance(s, MemorySample) and s.row is not None]
        batch.memory_positions = [i for i, _ in found]
        batch.memory_rows = [row for _, row in found]
        return batch


def soft_replay_correction(output: torch.Tensor, target: torch.Tensor, positions: torch.Tensor,
                           distributions: torch.Tensor) -> torch.Tensor:
    """What turns a batch-mean hard-label cross-entropy over `output` into one whose rows `positions` use the
    target `distributions` instead: (1 / B) sum_r [soft CE(z_r, q_r) - CE(z_r, y_r)], B = len(output)."""
    logits = output[positions]
    soft = fit_columns(distributions.float(), output.shape[1])
    soft_sum = -(soft * F.log_softmax(logits, dim=1)).sum()
    hard_sum = F.cross_entropy(logits, target[positions], reduction="sum")
    return (soft_sum - hard_sum) / len(output)


def fit_columns(distribution: torch.Tensor, width: int) -> torch.Tensor:
    """Target rows cut or zero-padded to `width` classes and renormalised (e.g. for a growing classifier)."""
    if distribution.shape[1] < width:
        distribution = F.pad(distribution, (0, width - distribution.shape[1]))
    distribution = distribution[:, :width]
    return distribution / distribution.sum(dim=1, keepdim=True).clamp_min(1e-12)
