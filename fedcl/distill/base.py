"""The Distiller contract and the registry of distillers by name.

A distiller is configured once (hyper-parameters, model, device, seed) and called many times:
`distiller.distill(images, labels, ipc=10, n_classes=10, source=Source.of(dataset)) -> SyntheticSet`.
Subclasses implement `_distill` and return a `DistillResult`; the base class checks the input, times the run and
wraps the result in a validated `SyntheticSet` with its metadata.

Iterative methods keep their loop state in a `LoopState` (`loop_state`), iterate over `progress_bar(state)` and
call `record` after every iteration; with `checkpoint_dir` set, `record` writes a checkpoint every
`checkpoint_every` iterations and `resume=True` continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from fedcl.data.datasets import ImageDataset
from fedcl.distill.checkpoint import LoopState
from fedcl.models import create_model
from fedcl.runtime import resolve_device, seeded
from fedcl.synthetic import SyntheticMeta, SyntheticSet

#: Called as callback(iteration, loss) after every distillation iteration.
ProgressCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class Source:
    """What the real data is: its name and per-channel normalisation, copied into the set's metadata."""

    dataset: str = "unknown"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, dataset: ImageDataset) -> Source:
        return cls(dataset.name, dataset.mean, dataset.std)


@dataclass
class DistillResult:
    """What a method produces; the base class turns it into a SyntheticSet."""

    images: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Distiller(ABC):
    """Base of all distillers: model factory, device, seed and the common `distill` entry point.

    model / model_cfg: the network family used inside the method (`create_model` name and options).
    device: "auto" (CUDA when present), "cpu" or "cuda[:i]".  seed: makes every run reproducible.
    progress: show a progress bar over iterations.
    checkpoint_dir: directory for `checkpoint.safetensors` (None: no checkpoints).  checkpoint_every: iterations
    between checkpoints (and one after the last).  resume: continue from the checkpoint in checkpoint_dir.
    """

    name: ClassVar[str]
    #: Length of the method's loop; iterative methods set it (the checkpoint hooks read it).
    iterations: int
    #: Attributes that do not change the result, left out of a checkpoint's identity.
    _RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"device", "progress", "checkpoint_dir", "checkpoint_every",
                                                     "resume"})

    def __init__(self, *, model: str = "convnet", model_cfg: dict[str, Any] | None = None,
                 device: str | torch.device = "auto", seed: int = 0, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50, resume: bool = False) -> None:
        self.model = model
        self.model_cfg = dict(model_cfg or {})
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.progress = progress
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: never), got {checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir, the directory holding the checkpoint")
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.resume = checkpoint_every, resume

    def new_model(self, in_shape: tuple[int, int, int], n_classes: int, seed: int) -> nn.Module:
        """A freshly initialised network on the distiller's device, channels_last when it is convolutional."""
        with seeded(seed):
            net = create_model(self.model, in_shape, n_classes, **self.model_cfg)
        return net.to(self.device, memory_format=torch.channels_last)

    def distill(self, images: torch.Tensor, labels: torch.Tensor, *, ipc: int, n_classes: int | None = None,
                source: Source | None = None, callback: ProgressCallback | None = None) -> SyntheticSet:
        """Compress (images, labels) into `ipc` synthetic images for every class present in `labels`."""
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"expected images (N, C, H, W) and labels (N,) with N > 0, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        if ipc < 1:
            raise ValueError(f"ipc (images per class) must be >= 1, got {ipc}")
        labels = labels.long()
        n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(f"labels must lie in 0..{n_classes - 1}")
        source = source or Source()
        start = time.perf_counter()
        result = self._distill(images.float(), labels, ipc, n_classes, callback)
        seconds = time.perf_counter() - start
        meta = SyntheticMeta(method=self.name, n_classes=n_classes, ipc=ipc, dataset=source.dataset,
                             mean=tuple(source.mean), std=tuple(source.std), seed=self.seed,
                             extra={"seconds": round(seconds, 3), "device": str(self.device), "model": self.model,
                                    "model_cfg": self.model_cfg, **result.extra})
        synset = SyntheticSet(result.images, result.labels, meta, result.lrs).detach()
        return synset.validate()

    @property
    def checkpoint_path(self) -> Path | None:
        """Where this distiller's checkpoint lives (None without checkpoint_dir)."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "checkpoint.safetensors"

    def loop_state(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, n_classes: int,
                   generator: torch.Generator, tensors: dict[str, torch.Tensor],
                   optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any] | None = None) -> LoopState:
        """The loop's state, restored from the checkpoint when resuming (then `state.start` > 0).

        The identity (which hashes the data) is only computed when checkpoints are on."""
        identity = {} if self.checkpoint_path is None else self.identity(images, labels, ipc, n_classes)
        state = LoopState(generator, tensors, optimizers, identity, dict(schedulers or {}))
        if self.resume:
            state.load(self.checkpoint_path, self.iterations)
        return state

    def progress_bar(self, state: LoopState) -> Any:
        """The iterations still to run, from `state.start`, with a progress bar when asked for."""
        total = self.iterations
        return tqdm(range(state.start, total), initial=state.start, total=total, desc=self.name,
                    disable=not self.progress)

    def record(self, state: LoopState, loss: float, iteration: int, bar: Any,
               callback: ProgressCallback | None) -> None:
        """Per-iteration bookkeeping shared by the iterative methods: keep the loss, show it, call back, and
        checkpoint every `checkpoint_every` iterations and after the last."""
        state.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if callback is not None:
            callback(iteration, loss)
        done = iteration + 1
        if self.checkpoint_path is not None and self.checkpoint_every > 0 and (
                done % self.checkpoint_every == 0 or done == self.iterations):
            state.save(self.checkpoint_path, done)

    def identity(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, n_classes: int) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed: method, options, sizes and the data's hash."""
        digest = hashlib.sha256()
        for t in (images, labels):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        options = {k: _plain(v) for k, v in sorted(vars(self).items()) if k not in self._RUN_ONLY}
        return {"method": self.name, "ipc": ipc, "n_classes": n_classes, "data_shape": list(images.shape),
                "data_sha256": digest.hexdigest(), "options": options}

    @abstractmethod
    def _distill(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, n_classes: int,
                 callback: ProgressCallback | None) -> DistillResult:
        """Method-specific work on validated inputs (images float, labels int64 in range)."""


def _plain(value: Any) -> Any:
    """A JSON-ready description of an option value (dataclasses as dicts, other objects by their repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return repr(value) if type(value).__repr__ is not object.__repr__ else type(value).__name__


_REGISTRY: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: make a distiller available by its `name` to the CLI, the plugin and the clients."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a distiller named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_distillers() -> list[str]:
    return sorted(_REGISTRY)


def distiller_class(name: str) -> type[Distiller]:
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown distiller {name!r}; choose one of {available_distillers()}")
    return _REGISTRY[key]


def accepted_options(name: str) -> set[str]:
    """Keyword options a registered distiller's constructor takes (its own and the base class's)."""
    cls = distiller_class(name)
    return {p for klass in cls.__mro__ if klass is not object and "__init__" in vars(klass)
            for p in inspect.signature(klass.__init__).parameters if p not in ("self", "base")}


def default_model(name: str) -> str:
    """The network a registered distiller builds when none is given (DD: an MLP; the others: the ConvNet)."""
    for klass in distiller_class(name).__mro__:
        param = inspect.signature(klass.__init__).parameters.get("model") if "__init__" in vars(klass) else None
        if param is not None:
            return param.default
    return "convnet"


def create_distiller(name: str, **options: Any) -> Distiller:
    """Build a registered distiller by name; unknown options raise ValueError listing the accepted ones."""
    cls = distiller_class(name)
    accepted = accepted_options(name)
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"distiller {name!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    return cls(**options)
