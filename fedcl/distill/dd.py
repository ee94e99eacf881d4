"""Dataset Distillation (DD, Wang, Zhu, Torralba & Efros 2018): the original method, the project's seed paper.

The synthetic images and one learning rate per gradient-descent step are learned together so that a network which
takes `steps` full-batch GD steps on the synthetic set, from its initialisation, reaches a low loss on real data:
    p_{k+1} = p_k - lr_k * grad CE(f(p_k; x_syn), y_syn),   minimise CE(f(p_steps; x_real), y_real)
by back-propagating through the unrolled steps (`unrolled_sgd`, memory of one parameter vector per step).

Two modes, as in the paper:
- init_mode="fixed": one known initialisation (the network built from `init_seed`); the set is only meant for that
  network, travels with it (meta.extra["init_seed"], "model", "model_cfg") and `evaluate_synthetic` rebuilds it.
- init_mode="random": a fresh initialisation every iteration, so the set works for unseen initialisations (they
  are drawn from seeds >= RANDOM_INIT_SEEDS, which evaluation's seeds never reach).
Training on such a set means replaying its learned step sizes (`fedcl.train.train_with_learned_lrs`).

Differences from the reference code: every step uses the whole synthetic set (the reference splits the images
into per-step batches); learned step sizes are softplus-parameterised like the reference's.
With learn_labels=True the labels are learned too (soft labels, as in label distillation, Bohdal et al. 2020).

Model: an MLP (2 hidden layers of 128) by default, not the ConvNet with instance norm of the later papers.  The
method lives or dies by plain full-batch gradient steps staying stable and informative: measured on Fashion-MNIST
(1 image per class, fixed init, 300 iterations) the MLP reaches 76.5 % where LeNet (the paper's MNIST network,
step sizes from 0.3) reached 51 %; ConvNet-3 with instance norm was not measured there.  Step sizes start at 0.1:
with 1.0 the unrolled steps diverge within a few iterations (outer loss 1e29, or a spike followed by dead ReLUs,
after which the network outputs a constant and the loss sits at ln 10 = 2.30 with zero gradient).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fedcl.data.sampling import ClassIndex
from fedcl.distill.base import Distiller, DistillResult, ProgressCallback, register
from fedcl.distill.functional import FlatParams, class_batches, initial_images, label_logits, unfused, unrolled_sgd
from fedcl.runtime import generator as make_generator

#: First seed of the initialisations a random-init run draws (evaluation builds its networks from small seeds).
RANDOM_INIT_SEEDS = 2**32


@register
class DatasetDistillation(Distiller):
    """The original Dataset Distillation.

    iterations: optimisation iterations (each: one unroll and one real batch).
    steps: unrolled GD steps, one learned step size each (reference: 10 steps x 3 epochs = 30).
    init_mode: "fixed" (one known initialisation, built from `seed`) or "random" (a new one every iteration).
    lr: Adam learning rate of images, step sizes and labels (reference 0.01 for 400 epochs, betas 0.5/0.999;
    0.05 here for a few hundred iterations).  lr_init: the starting step size (reference 0.02 for 30 steps; 0.1
    here for 10; 1.0 diverges).  decay_every: halve the Adam learning rate every this many iterations (default a
    third of them).  batch_real: real images per class per iteration.
    init: "real" images (default: converges in fewer iterations) or "noise" (as in the paper).
    learn_labels: learn soft labels together with the images.
    model: the network family (default "mlp", see the module docstring).
    """

    name = "dd"

    def __init__(self, *, iterations: int = 300, steps: int = 10, init_mode: str = "fixed", lr: float = 0.05,
                 lr_init: float = 0.1, decay_every: int | None = None, batch_real: int = 64, init: str = "real",
                 learn_labels: bool = False, model: str = "mlp", **base) -> None:
        super().__init__(model=model, **base)
        if init_mode not in ("fixed", "random"):
            raise ValueError(f"init_mode must be 'fixed' or 'random', got {init_mode!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.iterations, self.steps, self.init_mode, self.lr, self.lr_init = iterations, steps, init_mode, lr, lr_init
        self.decay_every = decay_every or max(1, iterations // 3)
        self.batch_real, self.init, self.learn_labels = batch_real, init, learn_labels

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        gen = make_generator(self.seed)
        index = ClassIndex(labels, n_classes)
        in_shape = tuple(images.shape[1:])
        flat = FlatParams(unfused(self.new_model(in_shape, n_classes, self.seed)))
        fixed_p0 = flat.flatten()
        syn, syn_labels = initial_images(images, index, ipc, gen, self.init, self.device)
        syn.requires_grad_(True)
        raw_lrs = torch.full((self.steps,), math.log(math.expm1(self.lr_init)), device=self.device,
                             requires_grad=True)
        logits = label_logits(syn_labels, n_classes).to(self.device).requires_grad_(True)
        learned = [syn, raw_lrs] + ([logits] if self.learn_labels else [])
        optimizer = torch.optim.Adam(learned, lr=self.lr, betas=(0.5, 0.999))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.decay_every, gamma=0.5)
        hard = syn_labels.to(self.device)
        batches = [torch.arange(len(syn), device=self.device)] * self.steps

        def step_loss(k: int, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(flat(p, x), y)

        state = self.loop_state(images, labels, ipc, n_classes, gen, {"images": syn, "raw_lrs": raw_lrs,
                                                                       "label_logits": logits},
                                {"adam": optimizer}, {"decay": scheduler})
        bar = self.progress_bar(state)
        for it in bar:
            p0 = fixed_p0 if self.init_mode == "fixed" else flat.flatten(
                self.new_model(in_shape, n_classes, RANDOM_INIT_SEEDS + self.seed * 1_000_003 + it))
            targets = logits.softmax(dim=1) if self.learn_labels else hard
            p = unrolled_sgd(step_loss, batches, p0, syn, targets, F.softplus(raw_lrs))
            real, real_labels = class_batches(images, index, self.batch_real, gen, self.device)
            loss = F.cross_entropy(flat(p, real), real_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            self.record(state, float(loss.detach()), it, bar, callback)
        losses = state.losses
        out_labels = logits.detach().softmax(dim=1).float() if self.learn_labels else syn_labels
        return DistillResult(syn.detach(), out_labels, lrs=F.softplus(raw_lrs).detach(), extra={
            "iterations": self.iterations, "steps": self.steps, "init_mode": self.init_mode,
            "init_seed": self.seed if self.init_mode == "fixed" else None, "learn_labels": self.learn_labels,
            "init": self.init, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None})
