"""Crash recovery: a distillation killed mid-way and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from fedcl.cli import main
from fedcl.data import load_dataset
from fedcl.distill import create_distiller
from fedcl.distill.checkpoint import CheckpointError
from fedcl.synthetic import SyntheticSet

#: Small settings for every iterative distiller (all randomness on: DSA, soft labels, random inits).
METHODS = {
    "dm": {"iterations": 8, "batch_real": 16},
    "dsa": {"iterations": 4, "batch_real": 8, "outer_loop": 2, "inner_loop": 1},
    "dd": {"iterations": 6, "steps": 2, "batch_real": 8, "init_mode": "random", "learn_labels": True},
    "mtt": {"iterations": 6, "syn_steps": 2, "n_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 1,
            "expert_epochs": 1, "learn_labels": True},
}


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _checkpoint_iteration(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["fedcl_checkpoint"])["iteration"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resumed_run_equals_uninterrupted_run(method, digits, tmp_path):
    options = {"model_cfg": {"width": 8, "depth": 2}, "device": "cpu", "seed": 3, **METHODS[method]}
    data = (digits.train_images, digits.train_labels)
    reference = create_distiller(method, **options).distill(*data, ipc=2, n_classes=10)
    stop = options["iterations"] // 2 + 1

    def crash(iteration, loss):
        if iteration == stop:
            raise Crash

    with pytest.raises(Crash):
        create_distiller(method, checkpoint_dir=tmp_path, checkpoint_every=2, **options).distill(
            *data, ipc=2, n_classes=10, callback=crash)
    assert 0 < _checkpoint_iteration(tmp_path / "checkpoint.safetensors") < options["iterations"]
    resumed = create_distiller(method, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **options).distill(
        *data, ipc=2, n_classes=10)
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.labels, reference.labels)
    assert resumed.meta.extra["first_loss"] == reference.meta.extra["first_loss"]
    assert resumed.meta.extra["final_loss"] == reference.meta.extra["final_loss"]


def test_checkpoint_of_another_run_or_corrupt_is_refused(digits, tmp_path):
    options = {"iterations": 2, "batch_real": 8, "model_cfg": {"width": 8, "depth": 2}, "device": "cpu"}
    data = (digits.train_images, digits.train_labels)
    create_distiller("dm", checkpoint_dir=tmp_path, seed=0, **options).distill(*data, ipc=1, n_classes=10)
    with pytest.raises(CheckpointError, match="options.seed"):
        create_distiller("dm", checkpoint_dir=tmp_path, resume=True, seed=1, **options).distill(*data, ipc=1)
    with pytest.raises(CheckpointError, match="data_sha256"):
        create_distiller("dm", checkpoint_dir=tmp_path, resume=True, seed=0, **options).distill(
            data[0] + 1, data[1], ipc=1, n_classes=10)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        create_distiller("dm", checkpoint_dir=tmp_path, resume=True, seed=0, **options).distill(*data, ipc=1)


def test_resume_without_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["distill", "--dataset", "digits", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _distill_command(out) -> list[str]:
    return [sys.executable, "-m", "fedcl.cli", "distill", "--dataset", "digits", "--method", "dm", "--ipc", "2",
            "--iterations", "40", "--width", "16", "--depth", "2", "--batch-real", "64", "--seed", "5",
            "--device", "cpu", "--checkpoint-every", "4", "--out", str(out)]


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_set(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(_distill_command(killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 0 < _checkpoint_iteration(checkpoint) < 40 and not (killed / "synthetic.safetensors").exists()
    resumed = subprocess.run(_distill_command(killed) + ["--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(_distill_command(tmp_path / "straight"), env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = SyntheticSet.load(killed / "synthetic.safetensors")
    b = SyntheticSet.load(tmp_path / "straight" / "synthetic.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    reports = [json.loads((d / "report.json").read_text()) for d in (killed, tmp_path / "straight")]
    assert reports[0]["final_loss"] == reports[1]["final_loss"]
