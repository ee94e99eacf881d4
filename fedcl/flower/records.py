"""The one place where synthetic sets and models become Flower records and back.

A synthetic set travels as an ArrayRecord (`images`, `labels`, optional `lrs`, each a numpy array serialised by
Flower with `allow_pickle=False`) plus a ConfigRecord holding its metadata as JSON.  Everything that arrives is
treated as untrusted: the byte size is checked before anything is decoded, every array's declared type and shape
must match its data, and the rebuilt set must pass `SyntheticSet.validate` against what the receiver expects
(image shape, number of classes, image and byte ceilings).  Any problem raises `SyntheticSetError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedcl.flower.protocol import META_JSON, META_KEY, SYNTHETIC_KEY
from fedcl.synthetic import MAX_BYTES, MAX_IMAGES, SyntheticSet, SyntheticSetError

__all__ = ["IMAGE_DTYPES", "META_KEY", "PIXEL_MARGIN", "SET_SLACK", "SYNTHETIC_KEY", "arrays_to_model",
           "max_set_bytes", "model_to_arrays", "pixel_window", "record_nbytes", "synset_from_record",
           "synset_to_record"]
_ALLOWED_DTYPES = {"images": {"float32", "float16"}, "labels": {"int64", "float32"}, "lrs": {"float32"}}
#: Wire formats of the images: float16 halves the upload (synthetic pixels are normalised values of order 1).
IMAGE_DTYPES = ("float32", "float16")
#: Allowance for numpy's .npy headers on top of the tensor bytes.
_HEADER_SLACK = 1024
#: Allowance on top of a set's tensor bytes for its metadata JSON (method facts, normalisation, version).
SET_SLACK = 16 * 1024
#: How far beyond the dataset's normalised range a synthetic pixel may lie, in widths of that range.
PIXEL_MARGIN = 1.0


def synset_to_record(synset: SyntheticSet, image_dtype: str = "float32") -> RecordDict:
    """A RecordDict carrying `synset` (validated first): its tensors and its metadata JSON.

    image_dtype: "float32" (exact) or "float16" (half the bytes; the receiver gets float32 back).
    """
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
    synset.validate()
    tensors = synset.to_tensors()
    tensors["images"] = tensors["images"].to(getattr(torch, image_dtype))
    arrays = ArrayRecord({name: Array(t.detach().cpu().contiguous().numpy()) for name, t in tensors.items()})
    return RecordDict({SYNTHETIC_KEY: arrays, META_KEY: ConfigRecord({META_JSON: synset.meta.to_json()})})


def max_set_bytes(image_shape: tuple[int, ...], n_classes: int, n_images: int) -> int:
    """The most bytes a valid set of `n_images` images may hold (float32 images, soft float32 labels, a learned
    rate per image, and `SET_SLACK` for headers and metadata): the per-reply cap a server derives from what it
    asked for (ipc x classes images) instead of a fixed ceiling."""
    pixels = math.prod(image_shape)
    return n_images * 4 * (pixels + max(n_classes, 2) + 1) + SET_SLACK


def pixel_window(mean: tuple[float, ...], std: tuple[float, ...],
                 margin: float = PIXEL_MARGIN) -> tuple[float, float]:
    """(lowest, highest) pixel value a received synthetic image may hold: the normalised range of a dataset whose
    raw pixels lie in [0, 1] (per channel (0 - mean) / std .. (1 - mean) / std, widest over channels), widened on
    each side by `margin` times its width.  Distilled images drift a little beyond the real range; a set far
    outside it (pixels of 1e30 are finite) would wreck whatever trains on it."""
    low = min(-m / s for m, s in zip(mean, std))
    high = max((1 - m) / s for m, s in zip(mean, std))
    return low - margin * (high - low), high + margin * (high - low)


def synset_from_record(content: RecordDict, *, image_shape: tuple[int, ...] | None = None,
                       n_classes: int | None = None, max_images: int = MAX_IMAGES,
                       max_bytes: int = MAX_BYTES) -> SyntheticSet:
    """Decode and validate the synthetic set in a received RecordDict; raise SyntheticSetError if it is malformed.

    The byte size (arrays plus metadata) and the declared image count are checked before anything is decoded,
    so an oversize reply costs no copy."""
    if SYNTHETIC_KEY not in content.array_records:
        raise SyntheticSetError(f"message carries no synthetic set (no ArrayRecord {SYNTHETIC_KEY!r})")
    arrays = content.array_records[SYNTHETIC_KEY]
    meta = content.config_records.get(META_KEY, {}).get(META_JSON)
    if not isinstance(meta, str):
        raise SyntheticSetError(f"message carries no synthetic-set metadata (ConfigRecord {META_KEY!r}, "
                                f"key {META_JSON!r})")
    size = arrays.count_bytes() + len(meta)
    if size > max_bytes + _HEADER_SLACK * len(arrays):
        raise SyntheticSetError(f"synthetic set is oversize: {size} bytes > limit {max_bytes}")
    declared = arrays["images"].shape if "images" in arrays else ()
    if declared and declared[0] > max_images:
        raise SyntheticSetError(f"synthetic set is oversize: {declared[0]} images > limit {max_images}")
    tensors = {name: _decode(name, array) for name, array in arrays.items()}
    if "images" in tensors:
        tensors["images"] = tensors["images"].float()  # float16 on the wire; overflow shows up as Inf
    return SyntheticSet.from_tensors(tensors, meta, image_shape=image_shape, n_classes=n_classes,
                                     max_images=max_images, max_bytes=max_bytes)


def _decode(name: str, array: Array) -> torch.Tensor:
    """One array as a tensor, after checking its declared dtype and that the data matches the declaration."""
    allowed = _ALLOWED_DTYPES.get(name)
    if allowed is None:
        raise SyntheticSetError(f"unexpected array {name!r}; allowed are {sorted(_ALLOWED_DTYPES)}")
    if array.dtype not in allowed:
        raise SyntheticSetError(f"array {name!r} has dtype {array.dtype}, expected one of {sorted(allowed)}")
    try:
        data = array.numpy()
    except (ValueError, TypeError, OSError, EOFError) as err:
        raise SyntheticSetError(f"array {name!r} is corrupt: {err}") from None
    if str(data.dtype) != array.dtype or tuple(data.shape) != tuple(array.shape):
        raise SyntheticSetError(f"array {name!r} declares {array.dtype}{tuple(array.shape)} but holds "
                                f"{data.dtype}{tuple(data.shape)}")
    return torch.from_numpy(np.array(data, copy=True))


def record_nbytes(content: RecordDict) -> int:
    """Bytes of a message's payload: every array, config and metric record it carries (Flower's `count_bytes`
    for arrays and metrics; configs are counted here because Flower 1.41's count rejects empty strings)."""
    return sum(_config_nbytes(record) if isinstance(record, ConfigRecord) else record.count_bytes()
               for record in content.values())


def _config_nbytes(config: ConfigRecord) -> int:
    """Keys plus values: strings and bytes by length, numbers 8 bytes, booleans 1 (as Flower counts them)."""
    def size(value: object) -> int:
        if isinstance(value, (str, bytes)):
            return len(value)
        return 1 if isinstance(value, bool) else 8

    return sum(len(k) + (sum(size(v) for v in value) if isinstance(value, list) else size(value))
               for k, value in config.items())


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """A model's state_dict as an ArrayRecord (what FedAvg averages and the server broadcasts)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in model.state_dict().items()})


def arrays_to_model(model: nn.Module, arrays: ArrayRecord | Mapping[str, Array]) -> nn.Module:
    """Load an ArrayRecord into `model` in place (strict: names and shapes must match); return the model."""
    state = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model
