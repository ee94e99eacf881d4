"""Memorisation audit: exact nearest neighbours in chunks, copies flagged, noise and DM-from-noise sets not."""

import json

import pytest
import torch
from PIL import Image

from fedcl.audit import audit_synthetic, nearest_neighbours
from fedcl.cli import main
from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.synthetic import SyntheticMeta, SyntheticSet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _set(images, labels, digits, method):
    meta = SyntheticMeta(method=method, n_classes=10, ipc=2, dataset="digits", mean=digits.mean, std=digits.std)
    return SyntheticSet(images, labels, meta)


def test_chunked_nearest_neighbours_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    queries, refs = torch.randn(7, 5, generator=gen), torch.randn(23, 5, generator=gen)
    dist, idx = nearest_neighbours(queries, refs, chunk=4)
    full = torch.cdist(queries, refs)
    assert torch.equal(idx, full.argmin(1)) and torch.allclose(dist, full.min(1).values)
    # Excluding each query's own row: queries taken from the references find their second-nearest.
    own = torch.tensor([3, 10, 22])
    dist, idx = nearest_neighbours(refs[own], refs, chunk=5, exclude=own)
    masked = torch.cdist(refs[own], refs)
    masked[torch.arange(3), own] = float("inf")
    assert torch.equal(idx, masked.argmin(1)) and bool((dist > 0).all())


def test_copies_are_flagged_and_noise_is_not(digits):
    picks = torch.arange(0, 40, 2)
    copies = _set(digits.train_images[picks], digits.train_labels[picks], digits, "copies")
    report = audit_synthetic(copies, digits, real_sample=200, feature_width=16, device="cpu")
    assert bool(report.flagged.all()) and torch.equal(report.nearest_index, picks)
    assert float(report.pixel_ratio.max()) < 0.05
    noise = _set(torch.randn(20, *digits.image_shape, generator=torch.Generator().manual_seed(1)),
                 torch.arange(10).repeat(2), digits, "noise")
    report = audit_synthetic(noise, digits, real_sample=200, feature_width=16, device="cpu")
    assert int(report.flagged.sum()) == 0 and float(report.pixel_ratio.min()) > 1
    rows = report.summary()
    assert rows[-1]["class"] == "all" and rows[-1]["images"] == 20 and len(rows) == 11


def test_dm_from_noise_is_not_flagged(digits):
    dm = create_distiller("dm", iterations=20, batch_real=32, init="noise", model_cfg={"width": 16, "depth": 2},
                          device="cpu", seed=0)
    synset = dm.distill(digits.train_images, digits.train_labels, ipc=2, n_classes=10, source=Source.of(digits))
    report = audit_synthetic(synset, digits, real_sample=200, feature_width=16, device="cpu")
    assert int(report.flagged.sum()) == 0


def test_cli_audit_prints_summary_and_writes_json(tmp_path, capsys, digits):
    path = tmp_path / "copies.safetensors"
    picks = torch.arange(20)
    _set(digits.train_images[picks], digits.train_labels[picks], digits, "copies").save(path)
    assert main(["audit", str(path), "--dataset", "digits", "--real-sample", "100", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "pixel min" in printed and "flagged=20 of 20" in printed
    audit = json.loads((tmp_path / "copies.audit.json").read_text())  # named after the audited set
    assert audit["n_flagged"] == 20 and audit["threshold"] == 0.5 and len(audit["images"]) == 20
    with Image.open(tmp_path / "copies.audit_pairs.png") as picture:
        assert picture.width >= 400 and picture.height >= 8 * 120  # eight labelled pairs, readable
    assert not (tmp_path / "audit.json").exists()
    assert f"wrote {tmp_path / 'copies.audit.json'}, {tmp_path / 'copies.audit_pairs.png'}" in printed
    other = SyntheticSet(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]),
                         SyntheticMeta(method="x", n_classes=10, ipc=1, dataset="fashion-mnist"))
    other.save(tmp_path / "fm.safetensors")
    assert main(["audit", str(tmp_path / "fm.safetensors"), "--dataset", "digits"]) == 2
    assert "--dataset fashion-mnist" in capsys.readouterr().err


def test_two_sets_audited_into_one_folder_keep_their_own_reports(tmp_path, digits):
    for name, picks in [("first", torch.arange(10)), ("second", torch.arange(10, 30))]:
        _set(digits.train_images[picks], digits.train_labels[picks], digits, name).save(tmp_path / f"{name}.safetensors")
        assert main(["audit", str(tmp_path / f"{name}.safetensors"), "--dataset", "digits", "--real-sample", "50",
                     "--device", "cpu", "--out", str(tmp_path / "audits")]) == 0
    reports = {name: json.loads((tmp_path / "audits" / f"{name}.audit.json").read_text()) for name in ("first", "second")}
    assert [len(r["images"]) for r in reports.values()] == [10, 20]
    assert reports["first"]["synset"].endswith("first.safetensors")
    assert sorted(p.name for p in (tmp_path / "audits").iterdir()) == [
        "first.audit.json", "first.audit_pairs.png", "second.audit.json", "second.audit_pairs.png"]
