"""Gradient matching: Dataset Condensation (DC, Zhao et al. ICLR 2021) and its siamese-augmented form (DSA,
Zhao & Bilen ICML 2021).

Every iteration draws a fresh network and alternates `outer_loop` times between
  1. moving the synthetic images so that, class by class, the gradient of the loss on a synthetic batch matches
     the gradient on a real batch (layer-wise, output-channel-wise cosine distance; biases and norm parameters
     are ignored, as in the paper), and
  2. training the network for `inner_loop` epochs on the current synthetic set.
(outer_loop, inner_loop) follow the paper by images per class: 1 -> (1, 1), 10 -> (10, 50), 50 -> (50, 10).

The reference computes the per-class gradients with one forward/backward pass per class; here all classes go
through one vectorised call (`vmap` over classes of `torch.func.grad`, see `per_class_gradients`).  DSA draws one
augmentation per class and applies it to that class's real and synthetic batch alike.

Network depth matters on tiny inputs: on 8x8 digits a ConvNet-3 instance-normalises 2x2 maps in its last block,
and the matching loss is then so rough that image steps of lr 0.01 or 0.1 raised it on fresh networks (DSA's
even at 1e-3); at depth 2 the paper's lr 0.1 lowers it at every iteration (tests/test_methods_distillers.py).
On 28x28 inputs the last block normalises 8x8 maps, as in the papers.
"""

from __future__ import annotations

import torch
from torch.func import replace_all_batch_norm_modules_

from fedcl.augment import DEFAULT_STRATEGY, DSA
from fedcl.data.sampling import ClassIndex
from fedcl.distill.base import Distiller, DistillResult, ProgressCallback, register
from fedcl.distill.functional import class_batches, initial_images, per_class_gradients, unfused
from fedcl.runtime import generator as make_generator
from fedcl.train import TrainConfig, train_model

#: The papers' (outer_loop, inner_loop) by images per class; other sizes take the nearest entry.
LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for `ipc` images per class: the paper's schedule, nearest entry otherwise."""
    return LOOPS_BY_IPC[min(LOOPS_BY_IPC, key=lambda k: (abs(k - ipc), k))]


def gradient_distance(real: dict[str, torch.Tensor], syn: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over classes, layers and output channels of 1 - cos(real, syn) gradient rows.

    Tensors are (G, *param_shape), one row per class group.  Weights (2-D and up: linear, conv) compare each output
    unit's incoming gradient; 1-D parameters (biases, norm scales) are skipped, as in the DC paper.
    """
    total = None
    for name, g_real in real.items():
        if g_real.ndim < 3:
            continue
        a = g_real.reshape(g_real.shape[0], g_real.shape[1], -1)
        b = syn[name].reshape(a.shape)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
        term = (1 - cos).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the network has no weight matrices to match gradients on")
    return total


@register
class GradientMatching(Distiller):
    """Dataset Condensation by gradient matching (DC).

    iterations: outer iterations, each with a fresh network (paper: 1000).
    lr_img / momentum: SGD on the synthetic pixels (paper: 0.1 / 0.5).
    lr_net: SGD step size of the network trained on the synthetic set between matches (paper: 0.01).
    batch_real: real images per class per match (paper: 256).  batch_train: batch size of the inner training.
    outer_loop / inner_loop: override the paper's schedule by images per class (`loops_for`).
    init: "real" (random real images of the class) or "noise".
    dsa / dsa_strategy: differentiable siamese augmentation (what makes DC into DSA).
    """

    name = "dc"

    def __init__(self, *, iterations: int = 1000, lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 batch_real: int = 256, batch_train: int = 256, outer_loop: int | None = None,
                 inner_loop: int | None = None, init: str = "real", dsa: bool = False,
                 dsa_strategy: str = DEFAULT_STRATEGY, **base) -> None:
        super().__init__(**base)
        if init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
        self.iterations, self.lr_img, self.momentum, self.lr_net = iterations, lr_img, momentum, lr_net
        self.batch_real, self.batch_train, self.init = batch_real, batch_train, init
        self.outer_loop, self.inner_loop = outer_loop, inner_loop
        self.dsa_strategy = dsa_strategy
        self.augment = DSA(dsa_strategy) if dsa else None

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        gen = make_generator(self.seed)
        index = ClassIndex(labels, n_classes)
        default_outer, default_inner = loops_for(ipc)
        outer, inner = self.outer_loop or default_outer, self.inner_loop or default_inner
        syn, syn_labels = initial_images(images, index, ipc, gen, self.init, self.device)
        syn.requires_grad_(True)
        optimizer = torch.optim.SGD([syn], lr=self.lr_img, momentum=self.momentum)
        inner_config = TrainConfig(epochs=inner, lr=self.lr_net, momentum=0.0, weight_decay=0.0,
                                   batch_size=self.batch_train, decay_at=1.0, dsa=self.augment is not None,
                                   dsa_strategy=self.dsa_strategy)
        state = self.loop_state(images, labels, ipc, n_classes, gen, {"images": syn}, {"images": optimizer})
        bar = self.progress_bar(state)
        for it in bar:
            net = self.new_model(tuple(images.shape[1:]), n_classes, self.seed * 1_000_003 + it)
            unfused(net)
            replace_all_batch_norm_modules_(net)  # batch statistics only: vmap cannot update running buffers
            total = 0.0
            for ol in range(outer):
                loss = self.match_loss(net, images, index, syn, syn_labels, ipc, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                if ol < outer - 1:
                    train_model(net, syn.detach(), syn_labels, inner_config, device=self.device,
                                seed=self.seed + it * outer + ol)
            self.record(state, total / (outer * len(index.present)), it, bar, callback)
        losses = state.losses
        return DistillResult(syn.detach(), syn_labels, extra={
            "iterations": self.iterations, "outer_loop": outer, "inner_loop": inner, "batch_real": self.batch_real,
            "init": self.init, "dsa": self.augment is not None,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None})

    def match_loss(self, net: torch.nn.Module, images: torch.Tensor, index: ClassIndex, syn: torch.Tensor,
                   syn_labels: torch.Tensor, ipc: int, gen: torch.Generator) -> torch.Tensor:
        """Gradient-matching loss of `net` for all classes: real and synthetic per-class gradients, one call each."""
        groups = len(index.present)
        real, real_labels = class_batches(images, index, self.batch_real, gen, self.device)
        syn_x, syn_y = syn, syn_labels.to(self.device)
        if self.augment is not None:
            draw = self.augment.draw(groups, gen)
            real_groups = torch.arange(groups).repeat_interleave(self.batch_real)
            syn_groups = torch.arange(groups).repeat_interleave(ipc)
            real = self.augment.apply(real, draw, real_groups)
            syn_x = self.augment.apply(syn, draw, syn_groups)
        params = {name: p.detach() for name, p in net.named_parameters()}
        with torch.no_grad():
            g_real = per_class_gradients(net, params, real.reshape(groups, self.batch_real, *real.shape[1:]),
                                         real_labels.view(groups, self.batch_real))
        g_syn = per_class_gradients(net, params, syn_x.reshape(groups, ipc, *syn.shape[1:]),
                                    syn_y.view(groups, ipc))
        return gradient_distance(g_real, g_syn)


@register
class SiameseGradientMatching(GradientMatching):
    """DSA: gradient matching with differentiable siamese augmentation (same options as `dc`, DSA on)."""

    name = "dsa"

    def __init__(self, *, dsa: bool = True, **base) -> None:
        super().__init__(dsa=dsa, **base)
