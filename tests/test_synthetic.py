"""SyntheticSet: validation, safe (de)serialisation, atomic writes, the grid picture."""

import hashlib
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedcl import synthetic
from fedcl.files import atomic_write
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError


def make_set(n_classes=3, ipc=2, soft=False, lrs=False) -> SyntheticSet:
    images = torch.randn(n_classes * ipc, 1, 8, 8)
    labels = torch.arange(n_classes).repeat_interleave(ipc)
    if soft:
        labels = torch.softmax(torch.randn(n_classes * ipc, n_classes), dim=1)
    meta = SyntheticMeta(method="dm", n_classes=n_classes, ipc=ipc, dataset="digits", mean=(0.3,), std=(0.4,), seed=7)
    return SyntheticSet(images, labels, meta, torch.tensor([0.1, 0.2]) if lrs else None)


@pytest.mark.parametrize("soft,lrs", [(False, False), (True, False), (False, True)])
def test_save_load_round_trip(tmp_path, soft, lrs):
    synset = make_set(soft=soft, lrs=lrs)
    path = synset.save(tmp_path / "synthetic.safetensors")
    loaded = SyntheticSet.load(path)
    assert torch.equal(loaded.images, synset.images)
    assert torch.equal(loaded.labels, synset.labels)
    assert loaded.meta == synset.meta
    assert (loaded.lrs is None) == (not lrs)
    sidecar = json.loads((tmp_path / "synthetic.json").read_text())
    assert sidecar["meta"]["method"] == "dm" and sidecar["n_images"] == 6


def test_bytes_round_trip_and_properties():
    synset = make_set(soft=True)
    again = SyntheticSet.from_bytes(synset.to_bytes())
    assert again.soft_labels and torch.equal(again.hard_labels, synset.labels.argmax(1))
    assert synset.nbytes == 6 * 64 * 4 + 6 * 3 * 4
    assert synset.classes() == sorted(set(synset.hard_labels.tolist()))


@pytest.mark.parametrize("mutate,message", [
    (lambda s: setattr(s, "images", s.images[0]), "4-D"),
    (lambda s: setattr(s, "images", s.images.double()), "float32"),
    (lambda s: s.images.__setitem__((0, 0, 0, 0), float("nan")), "NaN"),
    (lambda s: s.images.__setitem__((1, 0, 2, 2), float("inf")), "NaN or Inf"),
    (lambda s: s.labels.__setitem__(0, 3), "out of range"),
    (lambda s: s.labels.__setitem__(0, -1), "out of range"),
    (lambda s: setattr(s, "labels", s.labels[:-1]), "labels must have shape"),
    (lambda s: setattr(s, "labels", s.labels.int()), "int64"),
    (lambda s: setattr(s, "images", s.images[:0]), "empty"),
    (lambda s: setattr(s, "lrs", torch.tensor([[1.0]])), "lrs"),
])
def test_validate_rejects_bad_sets(mutate, message):
    synset = make_set()
    mutate(synset)
    with pytest.raises(SyntheticSetError, match=message):
        synset.validate()


def test_validate_limits_and_expectations():
    synset = make_set()
    with pytest.raises(SyntheticSetError, match="oversize"):
        synset.validate(max_images=5)
    with pytest.raises(SyntheticSetError, match="oversize"):
        synset.validate(max_bytes=100)
    with pytest.raises(SyntheticSetError, match="expected"):
        synset.validate(image_shape=(1, 28, 28))
    with pytest.raises(SyntheticSetError, match="expected 10"):
        synset.validate(n_classes=10)
    soft = make_set(soft=True)
    soft.labels = soft.labels[:, :2].contiguous()
    with pytest.raises(SyntheticSetError, match="columns"):
        soft.validate()


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    good = make_set().save(tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\x01not a safetensors file at all" * 3,
        "tiny": b"abc",
        "huge-header": struct.pack("<Q", 2**40) + b"{}",
        "pickle": b"\x80\x04\x95" + b"\x00" * 40,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(SyntheticSetError, match="corrupt|truncated|not a fedcl"):
            SyntheticSet.load(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"images": torch.zeros(2, 1, 4, 4)}, str(foreign))
    with pytest.raises(SyntheticSetError, match="not a fedcl"):
        SyntheticSet.load(foreign)
    with pytest.raises(SyntheticSetError, match="does not exist"):
        SyntheticSet.load(tmp_path / "missing.safetensors")


def test_load_rejects_bad_metadata_and_tensors(tmp_path):
    tensors = {"images": torch.zeros(2, 1, 4, 4), "labels": torch.tensor([0, 1])}
    bad_meta = [json.dumps({"method": "dm", "n_classes": "two", "ipc": 1}), "[1, 2]", "{not json",
                json.dumps({"method": "dm", "n_classes": 2, "ipc": 1, "evil": 1}),
                json.dumps({"method": "dm", "ipc": 1})]
    for i, meta in enumerate(bad_meta):
        path = tmp_path / f"m{i}.safetensors"
        save_file(tensors, str(path), metadata={"fedcl": meta})
        with pytest.raises(SyntheticSetError):
            SyntheticSet.load(path)
    path = tmp_path / "extra.safetensors"
    meta = SyntheticMeta("dm", 2, 1).to_json()
    save_file({**tensors, "payload": torch.zeros(1)}, str(path), metadata={"fedcl": meta})
    with pytest.raises(SyntheticSetError, match="unexpected tensors"):
        SyntheticSet.load(path)


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path):
    path = make_set().save(tmp_path / "s.safetensors")
    before = path.read_bytes()

    def explode(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, explode)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    bad = make_set()
    bad.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(SyntheticSetError):
        bad.save(path)
    assert path.read_bytes() == before
    with pytest.raises(SyntheticSetError, match=".safetensors"):
        make_set().save(tmp_path / "s.pt")


def crash_on_sidecar(monkeypatch):
    """Make `save` die between its two writes: the .safetensors write goes through, the sidecar write raises."""
    real = synthetic.atomic_write

    def write(path, payload):
        if Path(path).suffix == ".json":
            raise OSError("power lost before the sidecar was written")
        return real(path, payload)

    monkeypatch.setattr(synthetic, "atomic_write", write)


def test_sidecar_records_the_digest_of_the_file_it_describes(tmp_path):
    path = make_set().save(tmp_path / "s.safetensors")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SyntheticSet.load(path)


def test_crash_between_the_two_writes_of_a_first_save_leaves_a_whole_set(tmp_path, monkeypatch):
    synset = make_set(soft=True)
    crash_on_sidecar(monkeypatch)
    with pytest.raises(OSError, match="power lost"):
        synset.save(tmp_path / "s.safetensors")
    loaded = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.images, synset.images) and loaded.meta == synset.meta
    assert not (tmp_path / "s.json").exists()


def test_crash_between_the_two_writes_of_a_resave_loads_the_new_set_and_names_the_stale_sidecar(tmp_path, monkeypatch):
    path = make_set().save(tmp_path / "s.safetensors")
    new = make_set(n_classes=4, ipc=1)
    crash_on_sidecar(monkeypatch)
    with pytest.raises(OSError, match="power lost"):
        new.save(path)
    with pytest.warns(UserWarning, match=r"s\.json is stale.*read from s\.safetensors alone"):
        loaded = SyntheticSet.load(path)
    assert loaded.meta == new.meta and torch.equal(loaded.images, new.images)
    assert json.loads(path.with_suffix(".json").read_text())["meta"]["n_classes"] == 3


def test_unreadable_sidecar_is_named_and_ignored_and_an_old_sidecar_without_digest_is_not_checked(tmp_path):
    synset = make_set()
    path = synset.save(tmp_path / "s.safetensors")
    sidecar = path.with_suffix(".json")
    sidecar.write_text("{truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert SyntheticSet.load(path).meta == synset.meta
    sidecar.write_text(json.dumps({"meta": json.loads(synset.meta.to_json()), "n_images": len(synset)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SyntheticSet.load(path).meta == synset.meta


def test_grid_png(tmp_path):
    from PIL import Image

    path = make_set(n_classes=3, ipc=2).to_grid_png(tmp_path / "grid.png")
    with Image.open(path) as image:
        width, height = image.size
    assert image.format == "PNG"
    assert height > width / 2 and width >= 2 * 32 and height >= 3 * 32  # 3 rows (classes) x 2 columns
    rgb = SyntheticSet(torch.randn(4, 3, 8, 8), torch.tensor([0, 0, 1, 1]),
                       SyntheticMeta("x", 2, 2, mean=(0.5,) * 3, std=(0.2,) * 3))
    rgb.to_grid_png(tmp_path / "rgb.png")
    assert (tmp_path / "rgb.png").stat().st_size > 0


def test_pixels_undo_normalisation():
    synset = make_set()
    synset.images[:] = 0.0
    assert torch.allclose(synset.pixels(), torch.full_like(synset.images, 0.3))
