"""SyntheticSet: the one data type that flows through fedcl.

A distiller makes it, a file or a Flower message carries it, an Avalanche buffer replays it and the training loop
consumes it.  It holds images (normalised, NCHW float32), hard (int64 class ids) or soft (float32 class
distributions) labels, optional learned per-step learning rates (the original Dataset Distillation), and metadata
that says how it was made and how to undo its normalisation.

Synthetic sets arrive from untrusted places (other clients, files), so they are only ever (de)serialised with
safetensors plus JSON, never pickle, and `validate()` checks every tensor before anything uses it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcl import __version__
from fedcl.files import atomic_write

#: Default ceilings for `validate()`: far above any sensible synthetic set, far below a memory-exhausting one.
MAX_IMAGES = 100_000
MAX_BYTES = 512 * 2**20
MAX_CLASSES = 10_000
_TENSOR_KEYS = ("images", "labels", "lrs")


class SyntheticSetError(ValueError):
    """A synthetic set (in memory, in a file or in a message) is malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class SyntheticMeta:
    """How a synthetic set was made and how to read its pixels.

    `mean`/`std` are the per-channel normalisation of the source dataset: pixels = images * std + mean.
    `extra` holds method-specific facts (iterations, loss, wall time, ...) as JSON-serialisable values.
    """

    method: str
    n_classes: int
    ipc: int
    dataset: str = "unknown"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    seed: int | None = None
    created_by: str = f"fedcl {__version__}"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SyntheticMeta:
        """Parse and type-check metadata from JSON; raise SyntheticSetError on anything unexpected."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError, RecursionError) as err:
            raise SyntheticSetError(f"synthetic-set metadata is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise SyntheticSetError("synthetic-set metadata must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise SyntheticSetError(f"synthetic-set metadata has unknown keys {sorted(unknown)}")
        for key in ("method", "n_classes", "ipc"):
            if key not in raw:
                raise SyntheticSetError(f"synthetic-set metadata lacks required key {key!r}")
        return cls(
            method=_expect(raw["method"], str, "method"),
            n_classes=_expect_int(raw["n_classes"], "n_classes"),
            ipc=_expect_int(raw["ipc"], "ipc"),
            dataset=_expect(raw.get("dataset", "unknown"), str, "dataset"),
            mean=tuple(_expect_float(v, "mean") for v in _expect(raw.get("mean", [0.0]), list, "mean")),
            std=tuple(_expect_float(v, "std") for v in _expect(raw.get("std", [1.0]), list, "std")),
            seed=None if raw.get("seed") is None else _expect_int(raw["seed"], "seed"),
            created_by=_expect(raw.get("created_by", "unknown"), str, "created_by"),
            extra=_expect(raw.get("extra", {}), dict, "extra"),
        )


def _expect(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise SyntheticSetError(f"metadata field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _expect_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SyntheticSetError(f"metadata field {name!r} must be an integer, got {value!r}")
    return value


def _expect_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SyntheticSetError(f"metadata field {name!r} must hold finite numbers, got {value!r}")
    return float(value)


@dataclass
class SyntheticSet:
    """Distilled images with their labels, optional learned step sizes and metadata.

    images: (N, C, H, W) float32, normalised like the source dataset.
    labels: (N,) int64 class ids, or (N, n_classes) float32 soft labels (rows are distributions or logits).
    lrs:    optional (S,) float32 per-step learning rates learned with the images (Dataset Distillation).
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: SyntheticMeta
    lrs: torch.Tensor | None = None

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def soft_labels(self) -> bool:
        return self.labels.ndim == 2

    @property
    def hard_labels(self) -> torch.Tensor:
        """Class ids, taking the arg-max of soft labels."""
        return self.labels.argmax(dim=1) if self.soft_labels else self.labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (what crosses the network or fills a replay memory)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def classes(self) -> list[int]:
        """Sorted class ids present in the set."""
        return sorted(int(c) for c in torch.unique(self.hard_labels))

    def to(self, device: torch.device | str) -> SyntheticSet:
        lrs = None if self.lrs is None else self.lrs.to(device)
        return replace(self, images=self.images.to(device), labels=self.labels.to(device), lrs=lrs)

    def detach(self) -> SyntheticSet:
        """A copy on the CPU, cut from any autograd graph (what a distiller returns)."""
        lrs = None if self.lrs is None else self.lrs.detach().float().cpu().contiguous()
        return replace(
            self,
            images=self.images.detach().float().cpu().contiguous(),
            labels=self.labels.detach().cpu().contiguous(),
            lrs=lrs,
        )

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        *,
        max_images: int = MAX_IMAGES,
        max_bytes: int = MAX_BYTES,
        image_shape: tuple[int, ...] | None = None,
        n_classes: int | None = None,
    ) -> SyntheticSet:
        """Check shapes, dtypes, finiteness, label range and size; raise SyntheticSetError naming the problem.

        `image_shape` and `n_classes`, when given, are what the receiver expects (e.g. the server's dataset).
        Returns self so calls can be chained.
        """
        images, labels, lrs, meta = self.images, self.labels, self.lrs, self.meta
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise SyntheticSetError(f"images must be a 4-D (N, C, H, W) tensor, got shape {_shape(images)}")
        if images.dtype != torch.float32:
            raise SyntheticSetError(f"images must be float32, got {images.dtype}")
        n = images.shape[0]
        if n == 0:
            raise SyntheticSetError("synthetic set is empty: it holds no images")
        if n > max_images:
            raise SyntheticSetError(f"synthetic set is oversize: {n} images > limit {max_images}")
        if self.nbytes > max_bytes:
            raise SyntheticSetError(f"synthetic set is oversize: {self.nbytes} bytes > limit {max_bytes}")
        if not 1 <= images.shape[1] <= 4 or min(images.shape[2:]) < 1:
            raise SyntheticSetError(
                f"images must have 1-4 channels and non-empty H, W; got shape {tuple(images.shape)}")
        if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
            raise SyntheticSetError(
                f"images have shape {tuple(images.shape[1:])} per image, expected {tuple(image_shape)}"
            )
        if not torch.isfinite(images).all():
            raise SyntheticSetError("images contain NaN or Inf values")
        if not 1 <= meta.n_classes <= MAX_CLASSES:
            raise SyntheticSetError(f"metadata n_classes={meta.n_classes} is outside 1..{MAX_CLASSES}")
        if n_classes is not None and meta.n_classes != n_classes:
            raise SyntheticSetError(f"set is for {meta.n_classes} classes, expected {n_classes}")
        if len(meta.mean) != images.shape[1] or len(meta.std) != images.shape[1]:
            raise SyntheticSetError(
                f"metadata mean/std have {len(meta.mean)}/{len(meta.std)} entries for {images.shape[1]} channels"
            )
        if any(s <= 0 for s in meta.std):
            raise SyntheticSetError(f"metadata std must be positive, got {meta.std}")
        self._validate_labels(labels, n, meta.n_classes)
        if lrs is not None:
            if not isinstance(lrs, torch.Tensor) or lrs.ndim != 1 or lrs.dtype != torch.float32 or lrs.numel() == 0:
                raise SyntheticSetError(f"lrs must be a non-empty 1-D float32 tensor, got {_shape(lrs)}")
            if lrs.numel() > 10_000 or not torch.isfinite(lrs).all():
                raise SyntheticSetError("lrs must hold at most 10000 finite values")
        return self

    @staticmethod
    def _validate_labels(labels: torch.Tensor, n: int, n_classes: int) -> None:
        if not isinstance(labels, torch.Tensor) or labels.ndim not in (1, 2) or labels.shape[0] != n:
            raise SyntheticSetError(f"labels must have shape ({n},) or ({n}, n_classes), got {_shape(labels)}")
        if labels.ndim == 1:
            if labels.dtype != torch.int64:
                raise SyntheticSetError(f"hard labels must be int64, got {labels.dtype}")
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= n_classes:
                raise SyntheticSetError(f"labels out of range: found {lo}..{hi}, classes are 0..{n_classes - 1}")
        else:
            if labels.dtype != torch.float32:
                raise SyntheticSetError(f"soft labels must be float32, got {labels.dtype}")
            if labels.shape[1] != n_classes:
                raise SyntheticSetError(f"soft labels have {labels.shape[1]} columns, expected {n_classes}")
            if not torch.isfinite(labels).all():
                raise SyntheticSetError("soft labels contain NaN or Inf values")

    # ------------------------------------------------------------------ (de)serialisation
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensor payload by name (what a file or a Flower ArrayRecord stores)."""
        tensors = {"images": self.images, "labels": self.labels}
        if self.lrs is not None:
            tensors["lrs"] = self.lrs
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: SyntheticMeta | str,
                     **limits: Any) -> SyntheticSet:
        """Rebuild and validate a set from its payload and metadata (JSON text or SyntheticMeta).

        `limits` are passed to `validate()` (max_images, max_bytes, image_shape, n_classes).
        """
        unknown = set(tensors) - set(_TENSOR_KEYS)
        if unknown:
            raise SyntheticSetError(f"unexpected tensors {sorted(unknown)}; allowed are {list(_TENSOR_KEYS)}")
        missing = {"images", "labels"} - set(tensors)
        if missing:
            raise SyntheticSetError(f"synthetic set lacks tensors {sorted(missing)}")
        if isinstance(meta, str):
            meta = SyntheticMeta.from_json(meta)
        synset = cls(images=tensors["images"], labels=tensors["labels"], meta=meta, lrs=tensors.get("lrs"))
        return synset.validate(**limits)

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes, with the metadata JSON in the header."""
        self.validate()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.to_tensors().items()}
        return st_save(tensors, metadata={"fedcl": self.meta.to_json()})

    @classmethod
    def from_bytes(cls, data: bytes, **limits: Any) -> SyntheticSet:
        """Parse safetensors bytes made by `to_bytes`; raise SyntheticSetError if they are corrupt or invalid."""
        max_bytes = limits.get("max_bytes", MAX_BYTES)
        if len(data) > max_bytes + 2**20:
            raise SyntheticSetError(f"synthetic-set data is oversize: {len(data)} bytes")
        if len(data) < 8:
            raise SyntheticSetError("synthetic-set data is truncated (fewer than 8 bytes)")
        header_len = int.from_bytes(data[:8], "little")
        if header_len > len(data) - 8:
            raise SyntheticSetError("synthetic-set data is corrupt: header length exceeds the data")
        try:
            header = json.loads(data[8 : 8 + header_len])
            meta_json = header["__metadata__"]["fedcl"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise SyntheticSetError("synthetic-set data is corrupt or not a fedcl safetensors file") from None
        try:
            tensors = st_load(bytes(data))
        except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
            raise SyntheticSetError(f"synthetic-set data is corrupt: {err}") from None
        return cls.from_tensors(tensors, meta_json, **limits)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `path` (.safetensors) and a sidecar `.json` with the metadata, each atomically.

        A crash mid-write leaves any earlier file at `path` intact.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise SyntheticSetError(f"synthetic sets are saved as .safetensors, got {path.name!r}")
        payload = self.to_bytes()
        atomic_write(path, lambda f: f.write(payload))
        sidecar = {"meta": json.loads(self.meta.to_json()), "n_images": len(self),
                   "image_shape": list(self.image_shape), "soft_labels": self.soft_labels,
                   "has_lrs": self.lrs is not None, "nbytes": self.nbytes}
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], **limits: Any) -> SyntheticSet:
        """Read a set written by `save`; raise SyntheticSetError (naming the path) if missing, corrupt or invalid."""
        path = Path(path)
        if not path.is_file():
            raise SyntheticSetError(f"no synthetic set at {path}: the file does not exist")
        size = path.stat().st_size
        max_bytes = limits.get("max_bytes", MAX_BYTES)
        if size > max_bytes + 2**20:
            raise SyntheticSetError(f"{path} is oversize: {size} bytes > limit {max_bytes}")
        try:
            return cls.from_bytes(path.read_bytes(), **limits)
        except SyntheticSetError as err:
            raise SyntheticSetError(f"{path}: {err}") from None

    # ------------------------------------------------------------------ pictures
    def pixels(self) -> torch.Tensor:
        """Images mapped back to pixel space [0, 1] with the source normalisation."""
        mean = torch.tensor(self.meta.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.meta.std).view(1, -1, 1, 1)
        return (self.images.detach().cpu() * std + mean).clamp(0, 1)

    def to_grid_png(self, path: str | os.PathLike[str], *, min_side: int = 32) -> Path:
        """Write a PNG grid of the images, one row per class (sorted by label; a class of more than 50 images
        wraps), upscaled to `min_side` pixels, each class's first row labelled with the class on the left."""
        from PIL import Image, ImageDraw
        from torchvision.utils import make_grid

        order = torch.argsort(self.hard_labels.cpu(), stable=True)
        pixels = self.pixels()[order]
        scale = max(1, math.ceil(min_side / min(pixels.shape[2:])))
        if scale > 1:
            pixels = torch.nn.functional.interpolate(pixels, scale_factor=scale, mode="nearest")
        counts = torch.bincount(self.hard_labels.cpu())
        nrow = max(1, min(int(counts.max()), 50))
        blocks, rows = [], {}  # each class padded with blank tiles to whole rows, so every class starts a row
        for label, block in zip(counts.nonzero().flatten().tolist(), pixels.split(counts[counts > 0].tolist())):
            rows[label] = sum(len(b) for b in blocks) // nrow
            blocks.append(torch.cat([block, block.new_ones(-len(block) % nrow, *block.shape[1:])]))
        grid = make_grid(torch.cat(blocks), nrow=nrow, padding=2, pad_value=1.0)
        array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        tile, margin = pixels.shape[2] + 2, 8 + 7 * len(str(max(rows)))
        image = Image.new("L" if array.shape[2] == 1 else "RGB", (array.shape[1] + margin, array.shape[0]), "white")
        image.paste(Image.fromarray(array[..., 0] if array.shape[2] == 1 else array[..., :3]), (margin, 0))
        draw = ImageDraw.Draw(image)
        for label, row in rows.items():
            draw.text((3, 2 + row * tile + tile // 2 - 6), str(label), fill="black")
        path = Path(path)
        atomic_write(path, lambda f: image.save(f, format="PNG"))
        return path


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
