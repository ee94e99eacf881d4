"""DP distribution matching: clipping, Poisson sampling, noise calibration, metadata and the CLI flags."""

import dataclasses
import json
import math

import pytest
import torch

from fedcl.cli import main
from fedcl.data import ClassIndex, load_dataset
from fedcl.distill import create_distiller
from fedcl.privacy import PrivacyBudget, calibrate_noise, clip_rows, poisson_sample, spent_epsilon
from fedcl.synthetic import SyntheticSet

SMALL = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_clip_rows_bounds_norms_and_keeps_short_rows():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows(rows, 1.0)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped[1:], rows[1:])


def test_poisson_sample_takes_each_class_at_its_rate():
    labels = torch.tensor([0] * 1000 + [1] * 200 + [2] * 50)
    index = ClassIndex(labels, 4)
    rates = torch.tensor([0.1, 0.5, 1.0, 0.0], dtype=torch.float64)
    counts = torch.zeros(4)
    for seed in range(20):
        picks, classes = poisson_sample(index, rates, torch.Generator().manual_seed(seed))
        assert torch.equal(labels[picks], classes)
        counts += torch.bincount(classes, minlength=4)
    assert counts[2] == 20 * 50 and counts[3] == 0
    assert abs(counts[0] / 20 - 100) < 10 and abs(counts[1] / 20 - 100) < 10


def test_calibrated_noise_spends_at_most_the_budget():
    sigmas = []
    for epsilon in (1.0, 4.0, 10.0):
        sigma = calibrate_noise(epsilon, 1e-5, 0.02, 300)
        spent = spent_epsilon(sigma, 0.02, 300, 1e-5)
        assert 0.97 * epsilon <= spent <= epsilon, (epsilon, spent)
        sigmas.append(sigma)
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    # More steps or a higher sampling rate cost more privacy at the same noise.
    assert spent_epsilon(1.0, 0.02, 600, 1e-5) > spent_epsilon(1.0, 0.02, 300, 1e-5)
    assert spent_epsilon(1.0, 0.05, 300, 1e-5) > spent_epsilon(1.0, 0.02, 300, 1e-5)


def test_budget_validation_and_noisy_means_scale():
    for bad in ({"epsilon": 0.0}, {"epsilon": math.inf}, {"epsilon": 1.0, "delta": 1.0},
                {"epsilon": 1.0, "clip": -1.0}):
        with pytest.raises(ValueError):
            PrivacyBudget(**bad)
    counts = torch.tensor([400, 200])
    mechanism = PrivacyBudget(2.0, 1e-5, clip=3.0).mechanism(counts, 100, 50, dim=20000)
    assert mechanism.sample_rate == 0.5 and mechanism.epsilon <= 2.0
    means = mechanism.noisy_means(torch.zeros(2, 20000), torch.tensor([0, 1]))
    # Noise sigma * C on the sums, divided by the expected count q_c n_c = 100 for both classes.
    expected_std = mechanism.noise_multiplier * 3.0 / 100
    assert abs(float(means.std()) / expected_std - 1) < 0.03


def test_dp_dm_records_budget_and_its_noise_is_not_reproducible_from_the_seed(digits):
    options = {"iterations": 4, "batch_real": 16, "model_cfg": SMALL, "device": "cpu", "seed": 1, "dp_epsilon": 3.0}
    a = create_distiller("dm", **options).distill(digits.train_images, digits.train_labels, ipc=2, n_classes=10)
    b = create_distiller("dm", **options).distill(digits.train_images, digits.train_labels, ipc=2, n_classes=10)
    plain = create_distiller("dm", **{**options, "dp_epsilon": None, "init": "noise"}).distill(
        digits.train_images, digits.train_labels, ipc=2, n_classes=10)
    # Same seed, same data: the noise and sampling come from the OS, so the released images differ ...
    assert not torch.equal(a.images, b.images) and not torch.equal(a.images, plain.images)
    # ... while everything seeded (the starting noise, the networks) is shared: the runs start identically.
    start = create_distiller("dm", **{**options, "iterations": 0, "dp_epsilon": None, "init": "noise"}).distill(
        digits.train_images, digits.train_labels, ipc=2, n_classes=10)
    assert float((a.images - start.images).abs().max()) > 0 and a.meta.seed == b.meta.seed == 1
    assert a.meta.extra["dp"]["randomness"].startswith("os.urandom")
    dp = a.meta.extra["dp"]
    assert 2.9 <= dp["epsilon"] <= 3.0 and dp["delta"] == 1e-5 and dp["noise_multiplier"] > 0
    assert dp["clip"] == pytest.approx(math.sqrt(16 * 2 * 2) / 2)  # embedding of width 16 at 2x2: D = 64
    assert dp["sample_rate"] == pytest.approx(16 / int(torch.bincount(digits.train_labels).min()))
    assert a.meta.extra["init"] == "noise" and "dp" not in plain.meta.extra
    with pytest.raises(ValueError, match="start from noise"):
        create_distiller("dm", init="real", dp_epsilon=1.0)


def test_cli_dp_flags(tmp_path, capsys):
    out = tmp_path / "dp"
    assert main(["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "3", "--width", "8", "--depth", "2",
                 "--batch-real", "8", "--device", "cpu", "--dp-epsilon", "4", "--dp-delta", "1e-4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dp"]["epsilon"] <= 4 and report["dp"]["delta"] == 1e-4
    # No checkpoint (a hash of the private data and resumable state) is left beside a DP set ...
    assert not (out / "checkpoint.safetensors").exists()
    # ... unless asked for, with a warning; and nothing in the folder replays the noise: a second run differs.
    again = tmp_path / "dp-again"
    with pytest.warns(UserWarning, match="hash of the private"):
        assert main(["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "3", "--width", "8", "--depth",
                     "2", "--batch-real", "8", "--device", "cpu", "--dp-epsilon", "4", "--dp-delta", "1e-4",
                     "--opt", "dp_keep_checkpoint=true", "--out", str(again)]) == 0
    assert (again / "checkpoint.safetensors").exists()
    first = SyntheticSet.load(out / "synthetic.safetensors").images
    assert not torch.equal(first, SyntheticSet.load(again / "synthetic.safetensors").images)
    assert report["options"]["dp_epsilon"] == 4
    assert main(["distill", "--method", "dc", "--dp-epsilon", "1", "--out", str(tmp_path / "dc")]) == 2
    assert "--method dm only" in capsys.readouterr().err
    assert main(["distill", "--dp-clip", "1", "--out", str(tmp_path / "x")]) == 2
    assert "need --dp-epsilon" in capsys.readouterr().err


def test_dp_step_survives_an_empty_poisson_sample(digits):
    dm = create_distiller("dm", batch_real=1, model_cfg=SMALL, device="cpu", dp_epsilon=1.0)
    index = ClassIndex(digits.train_labels, 10)
    mechanism = PrivacyBudget(1.0).mechanism(index.counts, 1, 2, dim=64)
    mechanism = dataclasses.replace(mechanism, rates=torch.full((10,), 1e-9, dtype=torch.float64))
    syn, syn_labels = dm.initial_images(digits.train_images, index, 1, torch.Generator().manual_seed(0))
    loss = dm.step(digits.train_images, index, syn, syn_labels, torch.arange(10), torch.Generator().manual_seed(0),
                   net_seed=1, mechanism=mechanism)
    assert bool(torch.isfinite(loss))
