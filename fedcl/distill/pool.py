"""A pool of networks of one architecture, kept as rows of one flat-parameter tensor.

The DM family after plain DM (IDM, DANCE) matches embeddings of *partially trained* networks instead of only
freshly initialised ones.  Holding the pool as a fixed-size (capacity, n_params) tensor makes it part of the
distillation loop's checkpoint (`LoopState.tensors` are saved and restored in place), so a resumed run continues
with exactly the networks it had; one template module evaluates or trains whichever row is asked for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedcl.distill.functional import FlatParams
from fedcl.runtime import autocast


class NetworkPool:
    """`capacity` networks shaped like `template`: their flat parameters (`params`, (capacity, P) float32), how
    many SGD steps each has had (`steps`, -1 = empty slot) and each one's accuracy on its last training batches
    (`accuracy`).  `tensors()` is what a checkpoint carries."""

    def __init__(self, template: nn.Module, capacity: int, device: torch.device, amp: bool | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a network pool needs capacity >= 1, got {capacity}")
        self.template, self.flat, self.device, self.amp = template, FlatParams(template), device, amp
        self.params = torch.zeros(capacity, self.flat.size, device=device)
        self.steps = torch.full((capacity,), -1, dtype=torch.long)
        self.accuracy = torch.zeros(capacity)
        self.pushed = torch.zeros(1, dtype=torch.long)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}/params": self.params, f"{prefix}/steps": self.steps,
                f"{prefix}/accuracy": self.accuracy, f"{prefix}/pushed": self.pushed}

    @property
    def filled(self) -> torch.Tensor:
        """Slot numbers that hold a network."""
        return torch.nonzero(self.steps >= 0).flatten()

    def push(self, network: nn.Module) -> int:
        """Put a new network's parameters in the next slot (ring order: the oldest goes when full)."""
        slot = int(self.pushed) % self.params.shape[0]
        self.params[slot] = self.flat.flatten(network).to(self.device)
        self.steps[slot], self.accuracy[slot] = 0, 0.0
        self.pushed += 1
        return slot

    def set(self, slot: int, flat: torch.Tensor, steps: int) -> None:
        """Store a flat parameter vector in `slot` directly (e.g. a network trained elsewhere)."""
        self.params[slot] = flat.to(self.device)
        self.steps[slot] = steps

    def network(self, flat: torch.Tensor, module: nn.Module | None = None) -> nn.Module:
        """`module` (default: the template) holding the parameters `flat` (a pool row or a mix of rows)."""
        return self.flat.load(flat, module)

    def train(self, slot: int, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
              generator: torch.Generator, lr: float = 0.01, momentum: float = 0.0,
              weight_decay: float = 0.0) -> float:
        """Train the network in `slot` for `steps` SGD steps on random batches of (images, labels), in place;
        record and return its accuracy on those batches."""
        net = self.network(self.params[slot])
        accuracy = sgd_steps(net, images, labels, steps, batch_size, generator, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, amp=self.amp)
        self.params[slot] = self.flat.flatten(net)
        self.steps[slot] += steps
        self.accuracy[slot] = accuracy
        return accuracy


def sgd_steps(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
              generator: torch.Generator, *, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
              amp: bool | None = None) -> float:
    """`steps` SGD steps on uniformly drawn batches (cross-entropy, forward under bf16 autocast where
    `amp_enabled`); returns the accuracy on the batches trained on (0 when steps == 0)."""
    net.requires_grad_(True).train()
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    correct = seen = 0
    for _ in range(steps):
        picks = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x = images[picks.to(images.device)].contiguous(memory_format=torch.channels_last)
        y = labels[picks.to(labels.device)].to(device)
        with autocast(device, amp):
            logits = net(x).float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += int((logits.detach().argmax(dim=1) == y).sum())
        seen += len(y)
    net.requires_grad_(False)
    return correct / max(1, seen)
