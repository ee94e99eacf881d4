"""SyntheticSet: the one data type that flows through fedcl.

A distiller makes it, a file or a Flower message carries it, an Avalanche buffer replays it and the training loop
consumes it.  It holds images (normalised, NCHW), hard (int64 class ids) or soft (float32 class distributions)
labels, optional learned per-step learning rates (the original Dataset Distillation), and metadata that says how
it was made and how to undo its normalisation.

A set may hold its images in a *stored form* that `decode()` turns into training images:
- `storage`: float32 (as trained), float16, or uint8 codes with a per-channel `scale` and `offset`
  (image = code * scale + offset), quantised once after distillation (`quantised`);
- `factor` f (multi-formation, also called partition-and-expansion): every stored image is an f x f grid of tiles,
  and each tile, upsampled bilinearly to the full size, is one training image - f**2 training images per stored
  image, with the stored image's label.
Bytes (`nbytes`) always count the stored form; every consumer trains, screens and audits decoded images.

Synthetic sets arrive from untrusted places (other clients, files), so they are only ever (de)serialised with
safetensors plus JSON, never pickle, and `validate()` checks every tensor before anything uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.nn import functional as F

from fedcl import __version__
from fedcl.files import atomic_write

#: Default ceilings for `validate()`: far above any sensible synthetic set, far below a memory-exhausting one.
MAX_IMAGES = 100_000
MAX_BYTES = 512 * 2**20
MAX_CLASSES = 10_000
_TENSOR_KEYS = ("images", "labels", "lrs", "scale", "offset")
#: Stored forms of the images and their dtypes.
STORAGES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


class SyntheticSetError(ValueError):
    """A synthetic set (in memory, in a file or in a message) is malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class SyntheticMeta:
    """How a synthetic set was made and how to read its pixels.

    `mean`/`std` are the per-channel normalisation of the source dataset: pixels = images * std + mean.
    `extra` holds method-specific facts (iterations, loss, wall time, ...) as JSON-serialisable values.
    `factor` and `storage` describe the stored form of the images (see the module docstring); `ipc` counts stored
    images per class.
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
    factor: int = 1
    storage: str = "float32"

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
            factor=_expect_int(raw.get("factor", 1), "factor"),
            storage=_expect(raw.get("storage", "float32"), str, "storage"),
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

    images: (N, C, H, W) stored images, normalised like the source dataset: float32 or float16, or uint8 codes
            (`meta.storage`); with `meta.factor` f > 1 each holds f x f tiles.
    labels: (N,) int64 class ids, or (N, n_classes) float32 soft labels (rows are distributions or logits).
    lrs:    optional (S,) float32 per-step learning rates learned with the images (Dataset Distillation).
    scale / offset: (C,) float32 dequantisation of uint8 codes (image = code * scale + offset); None otherwise.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: SyntheticMeta
    lrs: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

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
        """Bytes of the stored tensor payload (what crosses the network or fills a replay memory)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def encoded(self) -> bool:
        """Whether the images are in a stored form other than plain float32 training images."""
        return self.meta.factor != 1 or self.meta.storage != "float32"

    def float_images(self) -> torch.Tensor:
        """The stored images as float32 (uint8 codes dequantised), tiles not yet expanded."""
        if self.meta.storage == "uint8":
            channels = (1, -1, 1, 1)
            return self.images.float() * self.scale.view(channels) + self.offset.view(channels)
        return self.images.float()

    def decode(self) -> SyntheticSet:
        """The training images: float32, each stored image expanded into its factor**2 tiles (labels repeated).

        A plain set is returned as it is.  The decoded set's metadata says what it was decoded from."""
        if not self.encoded:
            return self
        f = self.meta.factor
        images = expand_tiles(self.float_images(), f)
        labels = self.labels.repeat_interleave(f * f, dim=0)
        stored = {"factor": f, "storage": self.meta.storage, "nbytes": self.nbytes, "n_stored": len(self)}
        meta = replace(self.meta, ipc=self.meta.ipc * f * f, factor=1, storage="float32",
                       extra={**self.meta.extra, "decoded_from": stored})
        return SyntheticSet(images.contiguous(), labels.contiguous(), meta, self.lrs)

    def quantised(self, storage: str) -> SyntheticSet:
        """The set with its (float) images stored as `storage`: float32, float16, or uint8 codes with a
        per-channel scale and offset spanning each channel's range (error at most half a step per pixel)."""
        if storage not in STORAGES:
            raise SyntheticSetError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        images = self.float_images()
        scale = offset = None
        if storage == "uint8":
            low = images.amin(dim=(0, 2, 3))
            high = images.amax(dim=(0, 2, 3))
            scale = torch.where(high > low, (high - low) / 255, torch.ones_like(low))
            codes = ((images - low.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)).round().clamp(0, 255)
            images, scale, offset = codes.to(torch.uint8), scale.float().contiguous(), low.float().contiguous()
        else:
            images = images.to(STORAGES[storage])
        return replace(self, images=images.contiguous(), scale=scale, offset=offset,
                       meta=replace(self.meta, storage=storage))

    def classes(self) -> list[int]:
        """Sorted class ids present in the set."""
        return sorted(int(c) for c in torch.unique(self.hard_labels))

    def to(self, device: torch.device | str) -> SyntheticSet:
        moved = {k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in _TENSOR_KEYS}
        return replace(self, **moved)

    def detach(self) -> SyntheticSet:
        """A copy on the CPU, cut from any autograd graph (what a distiller returns); images keep their stored
        dtype, float tensors become float32."""
        def plain(t: torch.Tensor | None, keep_dtype: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.detach().cpu()
            return (t if keep_dtype or not t.is_floating_point() else t.float()).contiguous()

        return replace(self, images=plain(self.images, keep_dtype=self.meta.storage != "float32"),
                       labels=plain(self.labels), lrs=plain(self.lrs), scale=plain(self.scale),
                       offset=plain(self.offset))

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
        if meta.storage not in STORAGES:
            raise SyntheticSetError(f"metadata storage {meta.storage!r} is not one of {sorted(STORAGES)}")
        if images.dtype != STORAGES[meta.storage]:
            raise SyntheticSetError(f"images stored as {meta.storage} must be {STORAGES[meta.storage]}, "
                                    f"got {images.dtype}")
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
        if images.is_floating_point() and not torch.isfinite(images).all():
            raise SyntheticSetError("images contain NaN or Inf values")
        self._validate_form(images)
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

    def _validate_form(self, images: torch.Tensor) -> None:
        """The stored form: a factor that tiles the images, and scale/offset exactly when stored as uint8."""
        factor, quantised = self.meta.factor, self.meta.storage == "uint8"
        if not 1 <= factor <= min(images.shape[2:]):
            raise SyntheticSetError(f"metadata factor={factor} must lie in 1..{min(images.shape[2:])} "
                                    f"for {tuple(images.shape[2:])} images")
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if not quantised:
                if value is not None:
                    raise SyntheticSetError(f"{name} belongs only to uint8 storage, not {self.meta.storage}")
                continue
            if (not isinstance(value, torch.Tensor) or value.dtype != torch.float32
                    or tuple(value.shape) != (images.shape[1],) or not torch.isfinite(value).all()):
                raise SyntheticSetError(f"uint8 storage needs a finite float32 {name} of shape "
                                        f"({images.shape[1]},), got {_shape(value)}")
        if quantised and not bool((self.scale > 0).all()):
            raise SyntheticSetError("uint8 storage needs a positive scale")

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
        for name in ("lrs", "scale", "offset"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
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
        synset = cls(images=tensors["images"], labels=tensors["labels"], meta=meta, lrs=tensors.get("lrs"),
                     scale=tensors.get("scale"), offset=tensors.get("offset"))
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
        """Write `path` (.safetensors, metadata in its header) atomically, then a readable sidecar `.json`.

        The .safetensors file alone is the commit point: it holds everything `load` reads, so a crash at any moment
        leaves either the earlier set or the new one, whole.  The sidecar, written after it, is for people and
        tools; it records the SHA-256 of the file it describes, so a sidecar left behind by a crash between the
        two writes is recognisable as stale (`load` warns and ignores it).
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise SyntheticSetError(f"synthetic sets are saved as .safetensors, got {path.name!r}")
        payload = self.to_bytes()
        atomic_write(path, lambda f: f.write(payload))
        sidecar = {"meta": json.loads(self.meta.to_json()), "n_images": len(self),
                   "n_training_images": len(self) * self.meta.factor ** 2,
                   "image_shape": list(self.image_shape), "soft_labels": self.soft_labels,
                   "has_lrs": self.lrs is not None, "nbytes": self.nbytes,
                   "sha256": hashlib.sha256(payload).hexdigest()}
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], **limits: Any) -> SyntheticSet:
        """Read a set written by `save`; raise SyntheticSetError (naming the path) if missing, corrupt or invalid.

        Only the .safetensors file is trusted (its header holds the metadata); a sidecar .json that does not
        describe this file is reported with a warning and otherwise ignored.
        """
        path = Path(path)
        if not path.is_file():
            raise SyntheticSetError(f"no synthetic set at {path}: the file does not exist")
        size = path.stat().st_size
        max_bytes = limits.get("max_bytes", MAX_BYTES)
        if size > max_bytes + 2**20:
            raise SyntheticSetError(f"{path} is oversize: {size} bytes > limit {max_bytes}")
        data = path.read_bytes()
        try:
            synset = cls.from_bytes(data, **limits)
        except SyntheticSetError as err:
            raise SyntheticSetError(f"{path}: {err}") from None
        _warn_if_stale_sidecar(path, data)
        return synset

    # ------------------------------------------------------------------ pictures
    def pixels(self) -> torch.Tensor:
        """Stored images (tiles not expanded) mapped back to pixel space [0, 1] with the source normalisation."""
        mean = torch.tensor(self.meta.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.meta.std).view(1, -1, 1, 1)
        return (self.float_images().detach().cpu() * std + mean).clamp(0, 1)

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


def tile_bounds(size: int, factor: int) -> list[tuple[int, int]]:
    """[start, stop) of the `factor` tiles along one side of `size` pixels (sizes differ by at most one)."""
    edges = [round(i * size / factor) for i in range(factor + 1)]
    return list(zip(edges[:-1], edges[1:]))


def expand_tiles(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Multi-formation decoding, differentiable: (N, C, H, W) stored images -> (N * factor**2, C, H, W), image i's
    tiles (row-major) at rows i * factor**2 ..., each upsampled bilinearly to H x W."""
    if factor == 1:
        return images
    n, c, height, width = images.shape
    tiles = [F.interpolate(images[:, :, r0:r1, c0:c1], size=(height, width), mode="bilinear", align_corners=False)
             for r0, r1 in tile_bounds(height, factor) for c0, c1 in tile_bounds(width, factor)]
    return torch.stack(tiles, dim=1).reshape(n * factor * factor, c, height, width)


def pack_tiles(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse layout of `expand_tiles` for real images: groups of factor**2 consecutive images, each
    downscaled (area averaging) into one tile of a stored image; (N * factor**2, C, H, W) -> (N, C, H, W)."""
    if factor == 1:
        return images
    total, c, height, width = images.shape
    if total % (factor * factor):
        raise ValueError(f"need a multiple of {factor * factor} images to pack, got {total}")
    groups = images.reshape(total // (factor * factor), factor * factor, c, height, width)
    stored = images.new_empty(total // (factor * factor), c, height, width)
    positions = [(r, q) for r in tile_bounds(height, factor) for q in tile_bounds(width, factor)]
    for k, ((r0, r1), (c0, c1)) in enumerate(positions):
        stored[:, :, r0:r1, c0:c1] = F.interpolate(groups[:, k], size=(r1 - r0, c1 - c0), mode="area")
    return stored


def _warn_if_stale_sidecar(path: Path, data: bytes) -> None:
    """Warn when `path`'s sidecar .json is unreadable or records another file's SHA-256 (a crash between the two
    writes of `save`); a sidecar without a digest (older fedcl) is not checked."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return
    ignored = f"ignored, the set was read from {path.name} alone"
    try:
        recorded = json.loads(sidecar.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError, RecursionError):
        warnings.warn(f"{sidecar} is unreadable; {ignored}", stacklevel=3)
        return
    if recorded is not None and recorded != hashlib.sha256(data).hexdigest():
        warnings.warn(f"{sidecar} is stale: it describes another write of {path.name} (sha256 {recorded}); "
                      f"{ignored}", stacklevel=3)


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
