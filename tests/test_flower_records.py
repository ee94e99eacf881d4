"""SyntheticSet <-> Flower records: round trip, byte counting and rejection of malformed payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fedcl.flower.records import record_nbytes, synset_from_record, synset_to_record
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError

SHAPE = (1, 8, 8)


def _synset(n_per_class: int = 2, n_classes: int = 3, soft: bool = False) -> SyntheticSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_per_class * n_classes, *SHAPE, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    if soft:
        labels = torch.softmax(torch.randn(len(labels), n_classes, generator=gen), dim=1)
    meta = SyntheticMeta(method="dm", n_classes=n_classes, ipc=n_per_class, dataset="digits", mean=(0.5,), std=(0.2,))
    return SyntheticSet(images, labels, meta, lrs=torch.tensor([0.01, 0.02]) if soft else None)


def _decode(content: RecordDict, **limits) -> SyntheticSet:
    return synset_from_record(content, image_shape=SHAPE, n_classes=3, **limits)


@pytest.mark.parametrize("soft", [False, True])
def test_round_trip_keeps_tensors_and_metadata(soft):
    synset = _synset(soft=soft)
    back = _decode(synset_to_record(synset))
    assert torch.equal(back.images, synset.images) and torch.equal(back.labels, synset.labels)
    assert back.meta == synset.meta
    assert (back.lrs is None) == (synset.lrs is None)


def test_float16_upload_halves_the_image_bytes_and_arrives_as_float32():
    synset = _synset(n_per_class=20)
    full, half = synset_to_record(synset), synset_to_record(synset, "float16")
    assert record_nbytes(half) < 0.6 * record_nbytes(full)
    back = _decode(half)
    assert back.images.dtype == torch.float32
    assert torch.allclose(back.images, synset.images, atol=1e-2)
    overflow = synset_to_record(SyntheticSet(synset.images * 1e6, synset.labels, synset.meta), "float16")
    with pytest.raises(SyntheticSetError, match="Inf"):
        _decode(overflow)


def test_byte_count_covers_the_tensor_payload():
    synset = _synset()
    content = synset_to_record(synset)
    content["metrics"] = MetricRecord({"num-examples": 10})
    assert synset.nbytes < record_nbytes(content) < synset.nbytes + 2048


def _replace(content: RecordDict, name: str, value: np.ndarray) -> RecordDict:
    content["synthetic"][name] = Array(value)
    return content


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: _replace(c, "images", np.zeros((6, 1, 7, 7), np.float32)), r"expected \(1, 8, 8\)"),
    (lambda c: _replace(c, "images", np.full((6, *SHAPE), np.nan, np.float32)), "NaN"),
    (lambda c: _replace(c, "labels", np.array([0, 1, 2, 3, 0, 1], np.int64)), "out of range"),
    (lambda c: _replace(c, "labels", np.array([0, 1, 2, -1, 0, 1], np.int64)), "out of range"),
    (lambda c: _replace(c, "images", np.zeros((6, *SHAPE), np.float64)), "dtype float64"),
    (lambda c: _replace(c, "labels", np.zeros((5,), np.int64)), "labels must have shape"),
    (lambda c: _replace(c, "weights", np.zeros((2,), np.float32)), "unexpected array"),
    (lambda c: RecordDict({"synthetic": c["synthetic"]}), "no synthetic-set metadata"),
    (lambda c: RecordDict({"synthetic-meta": c["synthetic-meta"]}), "no synthetic set"),
    (lambda c: RecordDict({**c, "synthetic-meta": ConfigRecord({"meta": "{not json"})}), "not valid JSON"),
])
def test_malformed_payloads_are_rejected_with_a_reason(corrupt, message):
    with pytest.raises(SyntheticSetError, match=message):
        _decode(corrupt(synset_to_record(_synset())))


def test_declared_dtype_or_shape_must_match_the_data():
    content = synset_to_record(_synset())
    real = content["synthetic"]["labels"]
    content["synthetic"]["labels"] = Array(dtype="int64", shape=(99,), stype=real.stype, data=real.data)
    with pytest.raises(SyntheticSetError, match="declares"):
        _decode(content)
    content["synthetic"]["labels"] = Array(dtype="int64", shape=(6,), stype=real.stype, data=b"garbage")
    with pytest.raises(SyntheticSetError, match="corrupt"):
        _decode(content)


def test_oversize_sets_are_rejected_by_images_and_by_bytes():
    content = synset_to_record(_synset(n_per_class=4))
    with pytest.raises(SyntheticSetError, match="oversize"):
        _decode(content, max_images=6)
    with pytest.raises(SyntheticSetError, match="oversize"):
        _decode(content, max_bytes=1000)
    assert len(_decode(content, max_images=12)) == 12
