"""The Distiller contract and the registry of distillers by name.

A distiller is configured once (hyper-parameters, model, device, seed) and called many times:
`distiller.distill(images, labels, ipc=10, n_classes=10, source=Source.of(dataset)) -> SyntheticSet`.
Subclasses implement `_distill` and return a `DistillResult`; the base class checks the input, times the run and
wraps the result in a validated `SyntheticSet` with its metadata.

Iterative methods keep their loop state in a `LoopState` (`loop_state`), iterate over `progress_bar(state)` and
call `record` after every iteration; with `checkpoint_dir` set, `record` writes a checkpoint every
`checkpoint_every` iterations and `resume=True` continues from it to the same result as an uninterrupted run.
With `budget_seconds` set, the loop also stops cleanly once that much wall time has passed since `distill` began
(checkpointing where it stopped, so `resume` can continue it); the set's metadata records the iterations run.

Every distiller also takes the stored form of its output: `storage` (float32, float16, uint8: quantised once at
the end) and, for methods that support it (`supports_factor`), the multi-formation `factor`.
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
from fedcl.synthetic import STORAGES, SyntheticMeta, SyntheticSet

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

    @property
    def known(self) -> bool:
        """Whether this names a dataset, and so a normalisation to trust: an unnamed source (the default, for data
        of unknown normalisation, such as a user's Avalanche stream) says nothing about the pixels' range."""
        return self.dataset != "unknown"

    def clamp(self, images: torch.Tensor) -> torch.Tensor:
        """`images` (N, C, H, W, normalised by this source) projected into the range of real pixels, per channel
        (0 - mean) / std .. (1 - mean) / std: a synthetic image is an image (a start from noise, or a long run,
        drifts beyond it)."""
        if len(self.mean) != images.shape[1] or len(self.std) != images.shape[1]:
            raise ValueError(f"source {self.dataset!r} has {len(self.mean)} channels, the images {images.shape[1]}")
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return torch.minimum(torch.maximum(images, -mean / std), (1 - mean) / std)


@dataclass
class DistillResult:
    """What a method produces; the base class turns it into a SyntheticSet."""

    images: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Multi-formation factor of `images` (each holds factor x factor tiles).
    factor: int = 1


class Distiller(ABC):
    """Base of all distillers: model factory, device, seed and the common `distill` entry point.

    model / model_cfg: the network family used inside the method (`create_model` name and options).
    device: "auto" (CUDA when present), "cpu" or "cuda[:i]".  seed: makes every run reproducible.
    progress: show a progress bar over iterations.
    checkpoint_dir: directory for `checkpoint.safetensors` (None: no checkpoints).  checkpoint_every: iterations
    between checkpoints (and one after the last).  resume: continue from the checkpoint in checkpoint_dir.
    budget_seconds: stop iterating once this much wall time has passed (None: run every iteration); at least
    one iteration always runs.
    factor: multi-formation factor of the stored images (methods with `supports_factor` only).
    storage: float32, float16 or uint8 (`SyntheticSet.quantised`), applied to the finished set.
    """

    name: ClassVar[str]
    #: Whether the method optimises multi-formation images (factor > 1).
    supports_factor: ClassVar[bool] = False
    #: Length of the method's loop; iterative methods set it (the checkpoint hooks read it).
    iterations: int
    #: Attributes that do not change the result, left out of a checkpoint's identity.
    _RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"device", "progress", "checkpoint_dir", "checkpoint_every",
                                                     "resume", "budget_seconds", "storage"})

    def __init__(self, *, model: str = "convnet", model_cfg: dict[str, Any] | None = None,
                 device: str | torch.device = "auto", seed: int = 0, progress: bool = False,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50, resume: bool = False,
                 budget_seconds: float | None = None, factor: int = 1, storage: str = "float32") -> None:
        self.model = model
        self.model_cfg = dict(model_cfg or {})
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.progress = progress
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: never), got {checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir, the directory holding the checkpoint")
        if budget_seconds is not None and not budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0 (or None: no limit), got {budget_seconds}")
        if factor < 1 or (factor > 1 and not self.supports_factor):
            raise ValueError(f"factor={factor}: {self.name} supports only factor 1" if factor > 1 else
                             f"factor must be >= 1, got {factor}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.budget_seconds, self.factor, self.storage = budget_seconds, int(factor), storage
        #: (start time of the running `distill`, iterations run, whether the budget stopped it).
        self._clock: dict[str, Any] = {}

    def new_model(self, in_shape: tuple[int, int, int], n_classes: int, seed: int) -> nn.Module:
        """A freshly initialised network on the distiller's device, channels_last when it is convolutional."""
        with seeded(seed):
            net = create_model(self.model, in_shape, n_classes, **self.model_cfg)
        return net.to(self.device, memory_format=torch.channels_last)

    def distill(self, images: torch.Tensor, labels: torch.Tensor, *, ipc: int, n_classes: int | None = None,
                source: Source | None = None, callback: ProgressCallback | None = None) -> SyntheticSet:
        """Compress (images, labels) into `ipc` synthetic images for every class present in `labels`; with a
        known `source` (one that names its dataset), the images end projected into its range of real pixels
        (`Source.clamp`); with none or an unnamed one they are left as made, as the data's range is unknown."""
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"expected images (N, C, H, W) and labels (N,) with N > 0, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        if ipc < 1:
            raise ValueError(f"ipc (images per class) must be >= 1, got {ipc}")
        labels = labels.long()
        n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(f"labels must lie in 0..{n_classes - 1}")
        start = time.perf_counter()
        self._clock = {"start": start, "run": None, "stopped_by_budget": False}
        result = self._distill(images.float(), labels, ipc, n_classes, callback)
        if source is not None and source.known:
            result.images = source.clamp(result.images)
        source = source or Source()
        seconds = time.perf_counter() - start
        run = {} if self._clock["run"] is None else {"iterations_run": self._clock["run"],
                                                     "stopped_by_budget": self._clock["stopped_by_budget"]}
        meta = SyntheticMeta(method=self.name, n_classes=n_classes, ipc=ipc, dataset=source.dataset,
                             mean=tuple(source.mean), std=tuple(source.std), seed=self.seed, factor=result.factor,
                             extra={"seconds": round(seconds, 3), "device": str(self.device), "model": self.model,
                                    "model_cfg": self.model_cfg, **run, **result.extra})
        synset = SyntheticSet(result.images, result.labels, meta, result.lrs).detach().validate()
        return synset if self.storage == "float32" else synset.quantised(self.storage).validate()

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
        """The iterations still to run, from `state.start`, with a progress bar when asked for; under
        `budget_seconds` it ends early once the budget is spent."""
        total = self.iterations
        return tqdm(self._iterations(state), initial=state.start, total=total, desc=self.name,
                    disable=not self.progress)

    def _iterations(self, state: LoopState) -> Any:
        """Iteration numbers from `state.start`; stops at the wall-time budget (checkpointing there)."""
        done = state.start
        for it in range(state.start, self.iterations):
            if it > state.start and self._over_budget():
                self._clock["stopped_by_budget"] = True
                if self.checkpoint_path is not None and self.checkpoint_every > 0:
                    state.save(self.checkpoint_path, it)
                break
            yield it
            done = it + 1
            self._clock["run"] = done
        self._clock["run"] = done

    def _over_budget(self) -> bool:
        started = self._clock.get("start")
        return (self.budget_seconds is not None and started is not None
                and time.perf_counter() - started >= self.budget_seconds)

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
        options = {k: _plain(v) for k, v in sorted(vars(self).items())
                   if k not in self._RUN_ONLY and not k.startswith("_")}
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
    if isinstance(value, torch.Tensor):  # e.g. a guide model's weights: identified by their content
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
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


def supports_guide(name: str) -> bool:
    """Whether a registered distiller can match in a guide model's perturbed embedding (DM's `guide`)."""
    return bool(getattr(distiller_class(name), "supports_guide", False))


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
