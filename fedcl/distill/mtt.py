"""Matching Training Trajectories (MTT, Cazenavette et al. CVPR 2022).

1. Experts: networks trained on the real data with plain SGD, one flat parameter snapshot per epoch
   (`ExpertBuffer`, saved as safetensors and reusable across runs).
2. Distillation: every iteration picks an expert and a start epoch e < max_start_epoch, starts a student at the
   expert's parameters of epoch e, takes `syn_steps` SGD steps on synthetic mini-batches with a learnable step
   size, and moves the images (and the step size) so that the student lands near the expert's parameters of
   epoch e + expert_epochs:  loss = ||p_student - p_{e+E}||^2 / ||p_e - p_{e+E}||^2.

Memory: the reference keeps the graph of every unrolled step (activations and double-backward graph of
`syn_steps` forward passes), which needs several GPUs for mid-size settings.  Here the unroll is `unrolled_sgd`:
it keeps one flat parameter vector per step (4 bytes x parameters: 1.3 MB per step for ConvNet-3 width 128 on
28x28) and rebuilds one step's graph at a time in the backward pass, so peak memory is that of a single step on
`batch_syn` images plus syn_steps parameter vectors, at the price of one extra forward/backward per step.
The expert buffer holds n_experts x (epochs + 1) parameter vectors on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedcl.augment import DEFAULT_STRATEGY, DSA
from fedcl.data.sampling import ClassIndex
from fedcl.distill.base import Distiller, DistillResult, ProgressCallback, register
from fedcl.distill.functional import FlatParams, initial_images, label_logits, unfused, unrolled_sgd
from fedcl.files import atomic_write
from fedcl.runtime import generator as make_generator
from fedcl.train import TrainConfig, train_model

_META_KEY = "fedcl_expert"
_MAX_EXPERT_FILES = 10_000


@dataclass
class ExpertBuffer:
    """Expert trajectories: trajectories[i] is an (epochs + 1, n_params) float32 tensor of flat parameters.

    meta says which network they belong to (model, model_cfg, in_shape, n_classes) and how they were trained
    (lr, epochs, dataset); `check` refuses a buffer made for another network.
    """

    trajectories: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return int(self.trajectories[0].shape[0]) - 1

    def save(self, directory: str | Path) -> Path:
        """Write one `expert_XXXX.safetensors` per trajectory (metadata JSON in each header) into `directory`."""
        directory = Path(directory)
        header = {_META_KEY: json.dumps(self.meta, sort_keys=True)}
        for i, trajectory in enumerate(self.trajectories):
            payload = st_save({"trajectory": trajectory.detach().float().cpu().contiguous()}, metadata=header)
            atomic_write(directory / f"expert_{i:04d}.safetensors", lambda f, data=payload: f.write(data))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ExpertBuffer:
        """Read every `expert_*.safetensors` in `directory`; raise ValueError if none, or if they disagree."""
        directory = Path(directory)
        files = sorted(directory.glob("expert_*.safetensors"))[:_MAX_EXPERT_FILES]
        if not files:
            raise ValueError(f"no expert trajectories (expert_*.safetensors) in {directory}; train them with "
                             f"ExpertBuffer.train(...).save(DIR) or omit the experts option to train on the fly")
        trajectories, meta = [], None
        for path in files:
            try:
                data = path.read_bytes()
                header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
                file_meta = json.loads(header["__metadata__"][_META_KEY])
                tensor = st_load(data)["trajectory"]
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
                raise ValueError(f"{path} is not a fedcl expert trajectory: {err}") from None
            if not isinstance(file_meta, dict):
                raise ValueError(f"{path}: expert metadata must be a JSON object, got {type(file_meta).__name__}")
            if meta is not None and file_meta != meta:
                raise ValueError(f"{path} was trained differently from the other experts in {directory}")
            if (tensor.ndim != 2 or tensor.dtype != torch.float32 or tensor.shape[0] < 2 or tensor.shape[1] < 1
                    or not torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: a trajectory must be a finite float32 (epochs + 1, n_params) tensor "
                                 f"with at least one epoch and one parameter")
            if trajectories and tensor.shape != trajectories[0].shape:
                raise ValueError(f"{path}: shape {tuple(tensor.shape)} differs from {tuple(trajectories[0].shape)}")
            meta = file_meta
            trajectories.append(tensor)
        return cls(trajectories, meta)

    def check(self, expected: dict[str, Any], n_params: int, min_epochs: int) -> None:
        """Raise ValueError unless the buffer fits the network described by `expected` and is long enough."""
        for key, value in expected.items():
            if self.meta.get(key) != value:
                raise ValueError(f"expert buffer has {key}={self.meta.get(key)!r}, this run needs {value!r}")
        if self.trajectories[0].shape[1] != n_params:
            raise ValueError(f"expert buffer has {self.trajectories[0].shape[1]} parameters, the network {n_params}")
        if self.epochs < min_epochs:
            raise ValueError(f"expert trajectories have {self.epochs} epochs; max_start_epoch + expert_epochs "
                             f"needs {min_epochs}")

    @classmethod
    def train(cls, distiller: Distiller, images: torch.Tensor, labels: torch.Tensor, n_classes: int, *,
              n_experts: int, epochs: int, lr: float, dsa: bool, batch_size: int = 256,
              dataset: str = "unknown") -> ExpertBuffer:
        """Train `n_experts` networks of `distiller`'s family on the real data with plain SGD (no momentum or
        weight decay, DSA augmentation when `dsa`), snapshotting the flat parameters before and after every epoch."""
        in_shape = tuple(images.shape[1:])
        config = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=batch_size, decay_at=1.0,
                             dsa=dsa)
        trajectories = []
        for i in tqdm(range(n_experts), desc="experts", disable=not distiller.progress):
            seed = distiller.seed * 7919 + i
            net = distiller.new_model(in_shape, n_classes, seed)
            flat = FlatParams(net)
            snapshots = [flat.flatten().cpu()]
            for epoch in range(epochs):
                train_model(net, images, labels, config, device=distiller.device, seed=seed * 1000 + epoch)
                snapshots.append(flat.flatten().cpu())
            trajectories.append(torch.stack(snapshots))
        meta = {**expert_identity(distiller, in_shape, n_classes), "lr": lr, "epochs": epochs, "dsa": dsa,
                "dataset": dataset}
        return cls(trajectories, meta)


def expert_identity(distiller: Distiller, in_shape: tuple[int, ...], n_classes: int) -> dict[str, Any]:
    """What makes trajectories usable by a distiller: the network family, its options and the data's shape."""
    return {"model": distiller.model, "model_cfg": distiller.model_cfg, "in_shape": list(in_shape),
            "n_classes": n_classes}


@register
class TrajectoryMatching(Distiller):
    """Matching training trajectories.

    iterations: distillation iterations (paper: 5000).
    syn_steps: unrolled student steps per iteration (paper: 20-80).  batch_syn: synthetic images per student
    step (None: the whole set).  expert_epochs: expert epochs the student must cover (paper: 2-3).
    max_start_epoch: start epochs are drawn below this (paper: 2-40).
    lr_img / lr_lr / momentum: SGD on the pixels and on the learnable student step size (paper: 100-1000 /
    1e-5-1e-7 / 0.5).  The learned step size is held at or above MIN_LR_FRACTION of its start.  Default lr_img
    10; on Fashion-MNIST at width 32 lr_img 100 gave 66.1 % against 59.0 % with 10 (1 image per class, 100
    iterations), while on digits at width 128 only 0.1 kept the images in range (README).  A run whose loss turns
    non-finite stops with an error naming lr_img.
    lr_teacher: the experts' SGD step size and the student's starting one (0.01).
    experts: directory of a saved ExpertBuffer; if it holds none, experts are trained and saved there; None
    trains them on the fly without saving.  n_experts / expert_train_epochs: how many experts, how long
    (paper: 100 x 50 epochs; the defaults are CPU-sized).
    init: "real" or "noise".  dsa / dsa_strategy: augment the student's batches (and the experts' training).
    learn_labels: learn soft labels together with the images.
    """

    name = "mtt"
    MIN_LR_FRACTION = 0.01  # the learned student step size is held at or above this fraction of its start

    def __init__(self, *, iterations: int = 500, syn_steps: int = 10, batch_syn: int | None = None,
                 expert_epochs: int = 2, max_start_epoch: int = 2, lr_img: float = 10.0, lr_lr: float = 1e-5,
                 momentum: float = 0.5, lr_teacher: float = 0.01, experts: str | None = None, n_experts: int = 2,
                 expert_train_epochs: int = 3, init: str = "real", dsa: bool = True,
                 dsa_strategy: str = DEFAULT_STRATEGY, learn_labels: bool = False, **base) -> None:
        super().__init__(**base)
        if expert_train_epochs < max_start_epoch + expert_epochs - 1:
            raise ValueError("expert_train_epochs must be >= max_start_epoch + expert_epochs - 1")
        self.iterations, self.syn_steps, self.batch_syn = iterations, syn_steps, batch_syn
        self.expert_epochs, self.max_start_epoch = expert_epochs, max_start_epoch
        self.lr_img, self.lr_lr, self.momentum, self.lr_teacher = lr_img, lr_lr, momentum, lr_teacher
        self.experts, self.n_experts, self.expert_train_epochs = experts, n_experts, expert_train_epochs
        self.init, self.dsa_strategy, self.learn_labels = init, dsa_strategy, learn_labels
        self.augment = DSA(dsa_strategy) if dsa else None

    def expert_buffer(self, images: torch.Tensor, labels: torch.Tensor, n_classes: int) -> ExpertBuffer:
        """The saved experts in `self.experts` when there are any, else freshly trained ones (saved there if set)."""
        if self.experts is not None and any(Path(self.experts).glob("expert_*.safetensors")):
            return ExpertBuffer.load(self.experts)
        buffer = ExpertBuffer.train(self, images, labels, n_classes, n_experts=self.n_experts,
                                    epochs=self.expert_train_epochs, lr=self.lr_teacher,
                                    dsa=self.augment is not None)
        if self.experts is not None:
            buffer.save(self.experts)
        return buffer

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        in_shape = tuple(images.shape[1:])
        buffer = self.expert_buffer(images, labels, n_classes)
        flat = FlatParams(unfused(self.new_model(in_shape, n_classes, self.seed)))
        buffer.check(expert_identity(self, in_shape, n_classes), flat.size,
                     self.max_start_epoch - 1 + self.expert_epochs)
        gen = make_generator(self.seed)
        syn, syn_labels = initial_images(images, ClassIndex(labels, n_classes), ipc, gen, self.init, self.device)
        syn.requires_grad_(True)
        syn_lr = torch.tensor(float(buffer.meta.get("lr", self.lr_teacher)), device=self.device, requires_grad=True)
        floor = self.MIN_LR_FRACTION * float(syn_lr.detach())
        logits = label_logits(syn_labels, n_classes).to(self.device).requires_grad_(True)
        optimizer_img = torch.optim.SGD([syn] + ([logits] if self.learn_labels else []), lr=self.lr_img,
                                        momentum=self.momentum)
        optimizer_lr = torch.optim.SGD([syn_lr], lr=self.lr_lr, momentum=self.momentum)
        hard = syn_labels.to(self.device)
        state = self.loop_state(images, labels, ipc, n_classes, gen, {"images": syn, "syn_lr": syn_lr,
                                                                       "label_logits": logits},
                                {"images": optimizer_img, "syn_lr": optimizer_lr})
        bar = self.progress_bar(state)
        for it in bar:
            targets = logits.softmax(dim=1) if self.learn_labels else hard
            loss = self.match_loss(flat, buffer, syn, targets, syn_lr, gen)
            if not torch.isfinite(loss):
                raise RuntimeError(f"MTT diverged at iteration {it} (loss {float(loss.detach())}): lower lr_img "
                                   f"(now {self.lr_img}), e.g. --opt lr_img={self.lr_img / 10:g}")
            optimizer_img.zero_grad(set_to_none=True)
            optimizer_lr.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_img.step()
            optimizer_lr.step()
            with torch.no_grad():  # a non-positive step size would make the student climb its loss
                syn_lr.clamp_(min=floor)
            self.record(state, float(loss.detach()), it, bar, callback)
        losses = state.losses
        out_labels = logits.detach().softmax(dim=1).float() if self.learn_labels else syn_labels
        return DistillResult(syn.detach(), out_labels, extra={
            "iterations": self.iterations, "syn_steps": self.syn_steps, "expert_epochs": self.expert_epochs,
            "max_start_epoch": self.max_start_epoch, "n_experts": len(buffer.trajectories),
            "expert_train_epochs": buffer.epochs, "syn_lr": float(syn_lr.detach()),
            "learn_labels": self.learn_labels, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None})

    def match_loss(self, flat: FlatParams, buffer: ExpertBuffer, syn: torch.Tensor, targets: torch.Tensor,
                   syn_lr: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Normalised distance between the student after `syn_steps` steps and the expert E epochs on."""
        trajectory = buffer.trajectories[int(torch.randint(len(buffer.trajectories), (1,), generator=gen))]
        start = int(torch.randint(self.max_start_epoch, (1,), generator=gen))
        p_start = trajectory[start].to(self.device)
        p_target = trajectory[start + self.expert_epochs].to(self.device)
        batches = self.student_batches(len(syn), gen)
        draws = [self.augment.draw(len(b), gen) if self.augment is not None else None for b in batches]

        def step_loss(k: int, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if draws[k] is not None:
                x = self.augment.apply(x, draws[k])
            return F.cross_entropy(flat(p, x), y)

        p_end = unrolled_sgd(step_loss, batches, p_start, syn, targets, syn_lr.expand(len(batches)))
        return ((p_end - p_target) ** 2).sum() / ((p_start - p_target) ** 2).sum()

    def student_batches(self, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Index batches for the student's steps: consecutive chunks of fresh random permutations of the set."""
        size = min(self.batch_syn or n, n)
        order: list[int] = []
        batches = []
        for _ in range(self.syn_steps):
            if len(order) < size:
                order += torch.randperm(n, generator=gen).tolist()
            batches.append(torch.tensor(order[:size], device=self.device))
            order = order[size:]
        return batches
