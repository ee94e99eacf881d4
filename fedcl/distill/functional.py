"""Functional views of a network, shared by the gradient- and trajectory-based distillers (DC/DSA, MTT, DD).

- `FlatParams`: a module's parameters as one flat vector and back, and the module's forward pass evaluated at any
  flat vector (`torch.func.functional_call`), so a trajectory is one tensor and an unrolled step one vector update.
- `per_class_gradients`: the gradient of every class's loss in one vectorised call (`vmap` over classes of
  `torch.func.grad`) instead of one backward pass per class.
- `unrolled_sgd`: p_{k+1} = p_k - lr_k * grad L_k(p_k), differentiable with respect to the images, targets, step
  sizes and p_0.  It stores only the parameter vectors of the unrolled steps and rebuilds one step's graph at a time
  in the backward pass (gradient checkpointing per step), so memory grows by one parameter vector per step
  (4 bytes x parameters) instead of a whole step's activations and double-backward graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedcl.data.sampling import ClassIndex
from fedcl.models import ConvInstanceNorm

#: step_loss(k, params, images, targets) -> scalar training loss of unrolled step k.
StepLoss = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unfused(module: nn.Module) -> nn.Module:
    """Switch a model's fused conv + instance-norm layers (`ConvInstanceNorm`) to the plain conv-then-norm path.

    Same function and parameter names, but second-order gradients (gradient matching, unrolled steps) avoid
    the fused path's `unfold`, whose double backward is ~100x slower on CPU.
    """
    for layer in module.modules():
        if isinstance(layer, ConvInstanceNorm):
            layer.fused = False
    return module


class FlatParams:
    """Pack a module's parameters into one flat vector, unpack vectors into named views, run the module at one."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        """The parameters of `module` (default: the template module) as one detached flat vector."""
        params = (module or self.module).parameters()
        return torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of a flat vector, shaped like the module's parameters (differentiable)."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected a flat parameter vector of {self.size} values, got shape {tuple(flat.shape)}")
        return {name: chunk.view(shape) for name, chunk, shape in
                zip(self.names, flat.split(self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output for input `x` with its parameters replaced by `flat`."""
        return functional_call(self.module, self.unflatten(flat), (x,))

    def load(self, flat: torch.Tensor, module: nn.Module | None = None) -> nn.Module:
        """Copy a flat vector into the parameters of `module` (default: the template) and return it."""
        target = module or self.module
        with torch.no_grad():
            for p, chunk in zip(target.parameters(), flat.split(self.numels)):
                p.copy_(chunk.view_as(p))
        return target


def per_class_gradients(module: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
                        labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy of each class's batch, stacked over classes.

    images: (G, B, C, H, W), one equally sized batch per class group; labels: (G, B).  Returns, per parameter
    name, a (G, *shape) tensor whose row g is d loss(images[g], labels[g]) / d params.  The gradients are
    differentiable with respect to `images` (for the synthetic side of gradient matching); call under
    `torch.no_grad()` for the real side.
    """

    def class_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, p, (x,)), y)

    return vmap(grad(class_loss), in_dims=(None, 0, 0))(params, images, labels)


def class_batches(images: torch.Tensor, index: ClassIndex, per_class: int, generator: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` real images of every present class (repeating a small class's images): images and labels,
    grouped by class, flat (G * per_class, ...) on `device`."""
    picks, classes = index.sample(per_class, generator, exact=True)
    return images[picks.to(images.device)].to(device), classes.to(device)


def initial_images(images: torch.Tensor, index: ClassIndex, ipc: int, generator: torch.Generator, init: str,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` starting images per present class, grouped by class: random real images (`init="real"`) or
    standard-normal noise (`"noise"`); channels_last on `device`, with their class ids."""
    if init not in ("real", "noise"):
        raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
    picks, classes = index.sample(ipc, generator, exact=True)
    if init == "real":
        syn = images[picks.to(images.device)].clone().to(device)
    else:
        syn = torch.randn((len(picks), *images.shape[1:]), generator=generator).to(device)
    return syn.contiguous(memory_format=torch.channels_last), classes


class _UnrolledSGD(torch.autograd.Function):
    """Plain SGD steps as one autograd node: forward keeps the parameter vectors, backward replays each step."""

    @staticmethod
    def forward(ctx, step_loss: StepLoss, batches: Sequence[torch.Tensor], p0: torch.Tensor, images: torch.Tensor,
                targets: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
        trajectory = [p0.detach()]
        with torch.enable_grad():
            for k, batch in enumerate(batches):
                p = trajectory[-1].detach().requires_grad_(True)
                loss = step_loss(k, p, images[batch], targets[batch])
                (g,) = torch.autograd.grad(loss, p)
                trajectory.append((p - lrs[k] * g).detach())
        ctx.step_loss, ctx.batches, ctx.trajectory = step_loss, batches, trajectory
        ctx.save_for_backward(images, targets, lrs)
        return trajectory[-1].clone()

    @staticmethod
    def backward(ctx, adjoint: torch.Tensor):
        images, targets, lrs = ctx.saved_tensors
        want_images, want_targets = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grads = {"images": torch.zeros_like(images) if want_images else None,
                 "targets": torch.zeros_like(targets) if want_targets and targets.is_floating_point() else None,
                 "lrs": torch.zeros_like(lrs)}
        for k in reversed(range(len(ctx.batches))):
            batch = ctx.batches[k]
            with torch.enable_grad():
                p = ctx.trajectory[k].detach().requires_grad_(True)
                x = images[batch].detach().requires_grad_(want_images)
                y = targets[batch].detach()
                y.requires_grad_(grads["targets"] is not None)
                lr = lrs[k].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(ctx.step_loss(k, p, x, y), p, create_graph=True)
                inputs = [p, lr] + [t for t in (x, y) if t.requires_grad]
                result = torch.autograd.grad(p - lr * g, inputs, grad_outputs=adjoint, allow_unused=True)
            adjoint = result[0]
            grads["lrs"][k] += result[1]
            rest = iter(result[2:])
            if x.requires_grad:
                _accumulate(grads["images"], batch, next(rest))
            if y.requires_grad:
                _accumulate(grads["targets"], batch, next(rest))
        ctx.trajectory = None
        return None, None, adjoint, grads["images"], grads["targets"], grads["lrs"]


def _accumulate(total: torch.Tensor, batch: torch.Tensor, value: torch.Tensor | None) -> None:
    if value is not None:
        total.index_put_((batch,), value, accumulate=True)


def unrolled_sgd(step_loss: StepLoss, batches: Sequence[torch.Tensor], p0: torch.Tensor, images: torch.Tensor,
                 targets: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
    """Run len(batches) SGD steps from flat parameters p0 and return the final flat parameters.

    Step k uses images[batches[k]], targets[batches[k]] (class ids or distributions) and step size lrs[k]; its
    loss is step_loss(k, p, x, y).  The result is differentiable with respect to p0, images, targets (when
    floating point) and lrs, with memory for len(batches) + 1 parameter vectors plus one step's graph.
    """
    if lrs.ndim != 1 or lrs.shape[0] < len(batches):
        raise ValueError(f"need one step size per step: {len(batches)} steps, lrs of shape {tuple(lrs.shape)}")
    return _UnrolledSGD.apply(step_loss, list(batches), p0, images, targets, lrs)


def label_logits(labels: torch.Tensor, n_classes: int, confidence: float = 0.9) -> torch.Tensor:
    """Learnable label logits whose softmax starts as smoothed one-hot (`confidence` on the class): the starting
    point of learned soft labels."""
    rest = (1 - confidence) / max(1, n_classes - 1)
    probs = torch.full((len(labels), n_classes), rest)
    probs[torch.arange(len(labels)), labels.cpu()] = confidence
    return probs.log()
