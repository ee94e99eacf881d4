"""DANCE: Dual-view distribution alignment for dataset condensation (Zhang et al. IJCAI 2024), on fedcl's DM step.

DANCE keeps DM's cheap objective and fixes what its random networks miss, with networks trained beforehand:

1. **Expert pool** (`experts` networks, each trained `expert_epochs` epochs' worth of SGD steps on the real data
   before distillation;
   its initial and trained parameters are kept, as rows of a `NetworkPool`, so checkpoints carry them).
2. **Pseudo long-term distribution alignment (inner-class view)**: every iteration draws an expert e and
   lambda ~ U(0, 1) and matches class-mean embeddings (DM's distance, DSA on both sides) through the network with
   parameters lambda * init_e + (1 - lambda) * trained_e: a network somewhere along a training path, without
   storing trajectories.
3. **Distribution calibration (inter-class view)**: a cross-entropy term on the augmented synthetic images through
   the *trained* expert e (weight `calib_weight`), which pulls each class's images inside its decision region.
4. **Multi-formation** (`factor`, default 2), and the synthetic images are clamped to the real data's per-channel
   value range after every step (the reference clamps to [0, 1] pixels), which also suits uint8 storage.

Deviations from the reference code:
- experts are trained on uniformly drawn batches without augmentation (the reference trains 20 networks for 60
  epochs with its data augmentation); defaults fit CPU budgets (`experts=4`, `expert_epochs=2`);
- the calibration term joins the matching loss in one SGD step per iteration (the reference takes a separate step
  per class for each of `iter_calib` calibration rounds); all classes form one loss, as in fedcl's DM;
- the cross-entropy is summed over classes (each class's mean), matching the scale of the per-class DM distance.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fedcl.distill.base import register
from fedcl.distill.dm import DistributionMatching
from fedcl.distill.pool import NetworkPool, sgd_steps
from fedcl.runtime import autocast


@register
class DualViewDistributionAlignment(DistributionMatching):
    """DANCE: DM through interpolated pre-trained experts, with a trained-expert cross-entropy calibration and
    multi-formation.  Options beyond DM's are described in the module docstring; expert training uses SGD with
    `expert_lr`, momentum 0.9 and weight decay 5e-4 on batches of `expert_batch` real images."""

    name = "dance"
    supports_guide = False

    def __init__(self, *, factor: int = 2, experts: int = 4, expert_epochs: float = 2.0, expert_batch: int = 256,
                 expert_lr: float = 0.01, calib_weight: float = 1.0, clamp: bool = True, **options) -> None:
        super().__init__(factor=factor, **options)
        if experts < 1 or expert_epochs < 0 or expert_batch < 1:
            raise ValueError("DANCE needs experts >= 1, expert_epochs >= 0 and expert_batch >= 1")
        self.experts, self.expert_epochs, self.expert_batch = experts, expert_epochs, expert_batch
        self.expert_lr, self.calib_weight, self.clamp = expert_lr, calib_weight, clamp

    def pool_tensors(self, in_shape: tuple[int, int, int], n_classes: int) -> dict[str, torch.Tensor]:
        self._shape = (in_shape, n_classes)
        template = self.new_model(in_shape, n_classes, self.seed)
        self._starts = NetworkPool(template, self.experts, self.device, self.amp)
        self._trained = NetworkPool(template, self.experts, self.device, self.amp)
        self._matcher = self.new_model(in_shape, n_classes, self.seed)
        self._judge = self.new_model(in_shape, n_classes, self.seed)
        return {**self._starts.tensors("expert_start"), **self._trained.tensors("expert_trained")}

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, state) -> None:
        self._range = (images.amin(dim=(0, 2, 3)).view(1, -1, 1, 1), images.amax(dim=(0, 2, 3)).view(1, -1, 1, 1))
        if state.start > 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 7919 + 17)
        self._steps = math.ceil(self.expert_epochs * len(images) / self.expert_batch)
        for e in range(self.experts):
            net = self.new_model(*self._shape, self.seed * 7919 + e)
            self._starts.push(net)
            accuracy = sgd_steps(net, images, labels, self._steps, self.expert_batch, gen, lr=self.expert_lr,
                                 momentum=0.9, weight_decay=5e-4, amp=self.amp)
            self._trained.set(e, self._trained.flat.flatten(net), self._steps)
            self._trained.accuracy[e] = accuracy
        self._trained.pushed.fill_(self.experts)

    def match_networks(self, in_shape, n_classes, net_seed, gen):
        expert = int(torch.randint(self.experts, (1,), generator=gen))
        mix = float(torch.rand((), generator=gen))
        flat = mix * self._starts.params[expert] + (1 - mix) * self._trained.params[expert]
        self._expert = expert
        return [self._starts.network(flat, self._matcher)]

    def regulariser(self, net, emb, x, train_labels):
        if self.calib_weight == 0:
            return None
        judge = self._trained.network(self._trained.params[self._expert], self._judge)
        judge.requires_grad_(False)
        with autocast(self.device, self.amp):
            logits = judge(x.contiguous(memory_format=torch.channels_last)).float()
        per_class = max(1, len(train_labels) // len(torch.unique(train_labels)))
        return self.calib_weight * F.cross_entropy(logits, train_labels.to(logits.device), reduction="sum") / per_class

    def after_step(self, it, syn, images, labels, gen):
        if self.clamp:
            with torch.no_grad():
                syn.copy_(torch.maximum(torch.minimum(syn, self._range[1]), self._range[0]))

    def describe(self) -> dict:
        return {**super().describe(), "experts": self.experts, "expert_steps": int(self._trained.steps.max()),
                "expert_accuracy": [round(float(a), 4) for a in self._trained.accuracy]}
