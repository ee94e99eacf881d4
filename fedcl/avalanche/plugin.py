"""DistilledReplayPlugin: Avalanche's replay, with a memory of distilled data instead of stored real samples.

Add it to any strategy (`Naive(model, optimizer, criterion, plugins=[DistilledReplayPlugin(mem_size=100,
distiller="dm")])`).  It is Avalanche's `ReplayPlugin` with a `DistilledBuffer` as storage policy: before each
experience the `ReplayDataLoader` mixes memory samples into every mini-batch (`batch_size_mem` of them, default the
strategy's train_mb_size, exactly as ReplayPlugin); after it, the experience's classes are taken into memory (new
classes distilled, classes already held updated from their current images; see DistilledBuffer).  It runs wherever
ReplayPlugin does: class- and task-incremental streams, online streams (`split_online_stream`), task-aware online
streams, and budgets smaller than the number of classes.  The samples must be (image, label[, task label])
sequences; other layouts are refused before the first experience trains (see `DistilledBuffer`).

Soft labels.  Memory samples travel through the loader with their hard label (the arg-max), so the batch layout,
the metrics and other plugins see ordinary (x, y, t) samples.  When the memory holds soft-labelled sets, the plugin
wraps the strategy's criterion for the experience: replayed rows are recognised by their pixels (memory images
reach the batch unchanged - the buffer has no transforms) and their loss is the cross-entropy against the stored
target distribution (columns cut or zero-padded to the model's outputs, then renormalised), while the other rows
keep the original criterion:  loss = (n_cur * criterion(cur) + sum_replayed soft_ce) / batch_size.
This assumes the original criterion averages over the batch, as `CrossEntropyLoss()` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin
from torch.nn import functional as F

from fedcl.avalanche.buffer import DistilledBuffer, check_layout
from fedcl.distill.base import Distiller, Source


class DistilledReplayPlugin(ReplayPlugin):
    """Replay of distilled data through Avalanche's replay loader.

    mem_size: total images in memory (default 200); or images_per_class, or mem_bytes (total bytes of the stored
        sets, as many images as the distiller's stored form allows; see DistilledBuffer) - then pass mem_size=None.
    distiller: a registered distiller name ("dm", "random", "herding", ...) or a Distiller instance.
    distiller_options: options for a distiller given by name (e.g. {"iterations": 500, "model_cfg": {...}}).
    compress: "redistill" | "herding" | "truncate": how older sets shrink when new classes arrive.
    update_iterations: distillation iterations for a class already in memory that reappears (see DistilledBuffer).
    key: "class" (one set per task label and class) or "experience" (one per experience; see DistilledBuffer).
    batch_size / batch_size_mem / task_balanced_dataloader: as Avalanche's ReplayPlugin.
    source, n_classes, seed, progress: see DistilledBuffer.
    """

    def __init__(self, mem_size: int | None = 200, distiller: str | Distiller = "dm", *,
                 images_per_class: int | None = None, mem_bytes: int | None = None,
                 distiller_options: dict[str, Any] | None = None,
                 compress: str = "redistill", update_iterations: int | None = None,
                 batch_size: int | None = None, batch_size_mem: int | None = None,
                 task_balanced_dataloader: bool = False, source: Source | None = None, n_classes: int | None = None,
                 key: str = "class", seed: int = 0, progress: bool = False) -> None:
        buffer = DistilledBuffer(mem_size, images_per_class=images_per_class, mem_bytes=mem_bytes, distiller=distiller,
                                 distiller_options=distiller_options, compress=compress,
                                 update_iterations=update_iterations, source=source,
                                 n_classes=n_classes, key=key, seed=seed, progress=progress)
        super().__init__(mem_size=mem_size, batch_size=batch_size, batch_size_mem=batch_size_mem,
                         task_balanced_dataloader=task_balanced_dataloader, storage_policy=buffer)
        self._original_criterion = None

    @property
    def buffer(self) -> DistilledBuffer:
        return self.storage_policy  # type: ignore[return-value]

    def before_training_exp(self, strategy: Any, num_workers: int = 0, shuffle: bool = True,
                            drop_last: bool = False, **kwargs: Any) -> None:
        """Refuse an unsupported sample layout before training on it, then replay as ReplayPlugin does."""
        if len(strategy.experience.dataset):
            check_layout(strategy.experience.dataset[0])
        super().before_training_exp(strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last,
                                    **kwargs)
        soft = self.buffer.soft_targets()
        if soft is not None:
            self._original_criterion = strategy._criterion
            strategy._criterion = SoftReplayLoss(strategy, strategy._criterion, *soft)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._original_criterion is not None:
            strategy._criterion, self._original_criterion = self._original_criterion, None
        self.buffer.post_adapt(strategy, strategy.experience)

    def save(self, directory: str | Path) -> Path:
        """Write the memory as SyntheticSet files (see DistilledBuffer.save)."""
        return self.buffer.save(directory)

    def load(self, directory: str | Path) -> None:
        """Restore a memory written by `save`, to resume a run at the next experience."""
        self.buffer.load(directory)


class SoftReplayLoss:
    """The strategy's criterion, with soft-label cross-entropy for the replayed rows of soft-labelled sets."""

    def __init__(self, strategy: Any, criterion: Any, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.strategy, self.criterion = strategy, criterion
        self.images, self.targets = images.flatten(1), targets

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows, memory_rows = self.replayed_rows(self.strategy.mb_x)
        if rows.numel() == 0:
            return self.criterion(output, target)
        soft = fit_columns(self.targets[memory_rows].to(output.device), output.shape[1])
        replay_sum = -(soft * F.log_softmax(output[rows], dim=1)).sum()
        current = torch.ones(len(output), dtype=torch.bool, device=output.device)
        current[rows] = False
        n_current = int(current.sum())
        current_sum = self.criterion(output[current], target[current]) * n_current if n_current else 0.0
        return (current_sum + replay_sum) / len(output)

    @torch.no_grad()
    def replayed_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch rows, memory rows) of the batch samples that are soft-labelled memory images (exact match)."""
        flat = x.flatten(1).float()
        memory = self.images.to(flat.device)
        if flat.shape[1] != memory.shape[1]:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        distance = torch.cdist(flat, memory, compute_mode="donot_use_mm_for_euclid_dist")
        best, index = distance.min(dim=1)
        rows = torch.nonzero(best == 0).flatten()
        return rows, index[rows].cpu()


def fit_columns(distribution: torch.Tensor, width: int) -> torch.Tensor:
    """Target rows cut or zero-padded to `width` classes and renormalised (e.g. for a growing classifier)."""
    if distribution.shape[1] < width:
        distribution = F.pad(distribution, (0, width - distribution.shape[1]))
    distribution = distribution[:, :width]
    return distribution / distribution.sum(dim=1, keepdim=True).clamp_min(1e-12)
