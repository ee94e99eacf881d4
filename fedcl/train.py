"""The one training and evaluation loop, shared by evaluation, the federated server and clients, and replay.

Evaluation follows the distillation papers' protocol: freshly initialised networks are trained from scratch on a
(synthetic or real) set with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half the epochs), optionally
with DSA augmentation, and tested on the real test set; the result is the mean +- std over several networks.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedcl.augment import DEFAULT_STRATEGY, DSA
from fedcl.data.datasets import ImageDataset
from fedcl.models import create_model
from fedcl.runtime import generator as make_generator
from fedcl.runtime import resolve_device, seeded
from fedcl.synthetic import SyntheticSet


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `train_model`; the defaults are the distillation papers' evaluation protocol.

    dsa augments every mini-batch; replay_dsa (when dsa is off) augments only the replay memory's samples in it,
    each with its own draw (off by default: on issue 6's federated protocol it cost both memories accuracy).
    """

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    decay_at: float = 0.5
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    replay_dsa: bool = False


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig = TrainConfig(),
                *, device: str | torch.device = "auto", seed: int = 0, progress: bool = False,
                replay: tuple[torch.Tensor, torch.Tensor] | None = None,
                replay_batch_size: int | None = None) -> list[float]:
    """Train `model` in place on (images, labels) with SGD and the step decay; return the mean loss per epoch.

    Labels are class ids or soft-label distributions.  Batches are reshuffled every epoch from `seed`.
    replay: (images, labels) of a replay memory; every mini-batch then gets `replay_batch_size` (default
    `config.batch_size`) memory samples drawn at random beside its samples of (images, labels), as experience
    replay does (so a tiny memory weighs as much as the new data however small it is).  When either side has
    soft labels, class ids are turned into one-hot rows so the two mix.
    """
    device = resolve_device(device)
    model.to(device).train()
    if replay is not None and len(replay[0]) == 0:
        replay = None
    if replay is not None:
        labels, replay_labels = common_labels(labels, replay[1])
        replay = (replay[0].to(device), replay_labels.to(device))
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    milestone = max(1, int(config.epochs * config.decay_at))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=0.1)
    gen = make_generator(seed)
    augment = DSA(config.dsa_strategy) if config.dsa else None
    augment_replay = DSA(config.dsa_strategy) if config.replay_dsa and not config.dsa else None
    n = images.shape[0]
    history: list[float] = []
    for _ in tqdm(range(config.epochs), desc="train", disable=not progress, leave=False):
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            x, y = images[batch], labels[batch]
            if replay is not None:
                drawn = torch.randint(len(replay[0]), (replay_batch_size or config.batch_size,),
                                      generator=gen).to(device)
                x_mem = replay[0][drawn]
                if augment_replay is not None:
                    x_mem = augment_replay(x_mem, gen)
                x, y = torch.cat([x, x_mem]), torch.cat([y, replay[1][drawn]])
            if augment is not None:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x), y)  # class ids, or soft-label distributions (rows sum to 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        scheduler.step()
        history.append(total / n)
    return history


def common_labels(*labels: torch.Tensor) -> list[torch.Tensor]:
    """The label tensors as class ids when all are, else all as float distributions (class ids become one-hot
    rows; width: the widest soft tensor's), so that they can be concatenated or mixed in one batch."""
    if all(t.ndim == 1 for t in labels):
        return list(labels)
    width = max(t.shape[1] for t in labels if t.ndim == 2)
    return [t.float() if t.ndim == 2 else F.one_hot(t.long(), width).float() for t in labels]


def train_with_learned_lrs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lrs: torch.Tensor, *,
                           device: str | torch.device = "auto") -> list[float]:
    """Train `model` in place the way a Dataset Distillation set was made: one full-batch gradient step on
    (images, labels) per learned step size in `lrs` (no momentum, weight decay or augmentation).

    Returns the loss before each step.
    """
    device = resolve_device(device)
    model.to(device).train()
    images, labels = images.to(device), labels.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[float] = []
    for lr in lrs.tolist():
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
        history.append(float(loss.detach()))
    return history


def _recorded_network(synset: SyntheticSet, dataset: ImageDataset, seed: int) -> nn.Module:
    """A network of the architecture a Dataset Distillation set was distilled for (from its metadata), initialised
    from `seed`: the set's learned step sizes only make sense for that architecture."""
    extra = synset.meta.extra
    model, cfg = extra.get("model"), extra.get("model_cfg", {})
    if isinstance(seed, bool) or not isinstance(seed, int) or not isinstance(model, str) or not isinstance(cfg, dict):
        raise ValueError("a set with learned step sizes needs a model name and a model_cfg dict in meta.extra, and "
                         "a fixed-init one an integer meta.extra['init_seed']")
    with seeded(seed):
        return create_model(model, dataset.image_shape, dataset.n_classes, **cfg)


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   device: str | torch.device = "auto", batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (images, class ids), in [0, 1]."""
    device = resolve_device(device)
    model.to(device).eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train()
    return correct / max(1, images.shape[0])


@torch.no_grad()
def soft_predictions(model: nn.Module, images: torch.Tensor, *, temperature: float = 1.0,
                     classes: list[int] | None = None, device: str | torch.device = "auto",
                     batch_size: int = 1024) -> torch.Tensor:
    """The model's softmax(logits / temperature) on `images`, (N, n_classes) float32 on the CPU.

    classes: when given, only these classes get probability mass (the others' logits are masked out), e.g. the
    classes a continual learner has met so far, whose untrained heads would otherwise leak mass to the future.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = resolve_device(device)
    model.to(device).eval()
    logits = torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, images.shape[0], batch_size)])
    model.train()
    if classes is not None:
        mask = torch.full((logits.shape[1],), float("-inf"))
        mask[torch.tensor(classes, dtype=torch.long)] = 0.0
        logits = logits + mask
    return (logits / temperature).softmax(dim=1)


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies (in [0, 1]) of networks trained from scratch on one set."""

    accuracies: list[float]
    model: str
    epochs: int
    model_cfg: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.std:.2f} % ({len(self.accuracies)} models)"

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std}


def evaluate_synthetic(synset: SyntheticSet, dataset: ImageDataset, *, model: str = "convnet",
                       model_cfg: dict | None = None, n_models: int = 3, config: TrainConfig = TrainConfig(),
                       device: str | torch.device = "auto", seed: int = 0, progress: bool = False) -> EvalResult:
    """Train `n_models` fresh networks on `synset`'s decoded training images and test each on `dataset`'s test split.

    A set with learned step sizes (`synset.lrs`, Dataset Distillation) is trained by replaying them
    (`train_with_learned_lrs`, `config` unused) on the architecture it was distilled for (`model` and `model_cfg`
    unused); one distilled for a fixed initialisation (meta.extra["init_mode"] == "fixed") starts every network
    from that initialisation (meta.extra["init_seed"]), one distilled over random initialisations from fresh ones.
    """
    synset = synset.validate(image_shape=dataset.image_shape, n_classes=dataset.n_classes).decode()
    model_cfg = dict(model_cfg or {})
    fixed_init = synset.lrs is not None and synset.meta.extra.get("init_mode") == "fixed"
    accuracies = []
    for i in tqdm(range(n_models), desc=f"evaluate {synset.meta.method}", disable=not progress, leave=False):
        if synset.lrs is not None:
            net_seed = synset.meta.extra.get("init_seed") if fixed_init else seed * 1000 + i
            net = _recorded_network(synset, dataset, net_seed)
            train_with_learned_lrs(net, synset.images, synset.labels, synset.lrs, device=device)
        else:
            with seeded(seed * 1000 + i):
                net = create_model(model, dataset.image_shape, dataset.n_classes, **model_cfg)
            train_model(net, synset.images, synset.labels, config, device=device, seed=seed * 1000 + i)
        accuracies.append(evaluate_model(net, dataset.test_images, dataset.test_labels, device=device))
    if synset.lrs is not None:
        model, model_cfg = synset.meta.extra["model"], dict(synset.meta.extra.get("model_cfg", {}))
    return EvalResult(accuracies, model, config.epochs, model_cfg)
