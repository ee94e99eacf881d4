"""MemoryFinetunePlugin: after each experience, train the model on the replay memory alone.

Replay mixes a small memory into batches of the new experience's data, so the classifier still leans to the newest
classes and, with a distilled memory, can also learn to tell synthetic images (old classes) from real ones (new
classes).  A short phase on the memory alone - every class seen so far, in the same kind of image, balanced by the
buffer - corrects both (balanced fine-tuning, as in EEIL and GDumb).  It works with any replay plugin whose storage
policy is an Avalanche `ExemplarsBuffer` (ReplayPlugin with ClassBalancedBuffer or ParametricBuffer, or fedcl's
DistilledReplayPlugin), so a comparison can give every memory the same phase.

    replay = ReplayPlugin(mem_size=100)
    strategy = Naive(..., plugins=[replay, MemoryFinetunePlugin(replay, epochs=30)])

It must come after its replay plugin in `plugins`: the replay plugin updates the memory in its own
`after_training_exp`, and Avalanche calls plugins in list order.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin

from fedcl.avalanche.buffer import DistilledBuffer, dataset_tensors
from fedcl.train import TrainConfig, train_model


class MemoryFinetunePlugin(SupervisedPlugin):
    """Train the strategy's model on the memory of `replay` for `epochs` after each training experience.

    replay: the replay plugin whose `storage_policy` holds the memory (it must precede this plugin in `plugins`).
    epochs / lr / batch_size: SGD (momentum 0.9, weight decay 5e-4) on the memory alone; soft-labelled distilled
        sets are trained on their distributions.
    seed: shuffling seed (offset by the experience counter).
    """

    def __init__(self, replay: Any, epochs: int = 30, lr: float = 0.01, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__()
        if epochs < 1 or lr <= 0 or batch_size < 1:
            raise ValueError(f"need epochs >= 1, lr > 0 and batch_size >= 1; got {epochs}, {lr}, {batch_size}")
        if not hasattr(replay, "storage_policy"):
            raise TypeError(f"{type(replay).__name__} has no storage_policy; pass the replay plugin itself")
        self.replay, self.seed = replay, int(seed)
        self.config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, decay_at=1.0, dsa=False)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        plugins = list(strategy.plugins)
        if self.replay not in plugins or plugins.index(self.replay) > plugins.index(self):
            raise ValueError("MemoryFinetunePlugin must come after its replay plugin in the strategy's plugins")

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        images, labels = memory_tensors(self.replay.storage_policy)
        if len(images):
            train_model(strategy.model, images, labels, self.config, device=strategy.device,
                        seed=self.seed * 1009 + int(strategy.clock.train_exp_counter))


def memory_tensors(policy: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) held by a storage policy; a DistilledBuffer's soft labels as distributions."""
    if isinstance(policy, DistilledBuffer):
        images, labels, _ = policy.memory.tensors()
        return images, labels
    return dataset_tensors(policy.buffer)
