"""Server crash recovery: the checkpoint written after every round round-trips, refuses other settings and corrupt
parts, and a real `fedcl simulate` process killed (SIGKILL) after round 1 resumes with `--resume` and ends with
rounds.csv covering every round and the pooled memory of round 1 intact."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedcl.flower.records import model_to_arrays
from fedcl.flower.settings import FedSettings
from fedcl.flower.simulation import QUIET_ENV
from fedcl.models import create_model
from strategies import SyntheticMemory, TrafficLog

ROOT = Path(__file__).resolve().parents[1]


def _memory() -> SyntheticMemory:
    return SyntheticMemory(image_shape=(1, 8, 8), n_classes=10, max_images=100, max_bytes=2**20)


def _saved(tmp_path: Path, csv_row) -> tuple[dict, SyntheticMemory, object]:
    """A checkpoint of round 2 with two clients' sets, some traffic and rows; returns (settings, memory, arrays)."""
    data = load_dataset("digits")
    memory = _memory()
    for node, seed in ((11, 0), (12, 1), (11, 2)):
        memory.add(node, create_distiller("random", seed=seed).distill(
            data.train_images, data.train_labels, ipc=2, n_classes=10, source=Source.of(data)))
    traffic = TrafficLog()
    traffic[1].uplink_bytes, traffic[2].screened = 1234, 1
    traffic.fail(2, 12, "screened out as an outlier")
    arrays = model_to_arrays(create_model("convnet", (1, 8, 8), 10, width=8))
    settings = FedSettings(out_dir=str(tmp_path)).to_config()
    rows = [{**csv_row(r), "accuracy": 0.1 * r} for r in range(3)]
    save_checkpoint(tmp_path, settings=settings, server_round=2, arrays=arrays, rows=rows, traffic=traffic,
                    memory=memory)
    return settings, memory, arrays


def test_checkpoint_round_trips_model_memory_rows_and_traffic(tmp_path, csv_row):
    settings, memory, arrays = _saved(tmp_path, csv_row)
    restored = _memory()
    checkpoint = load_checkpoint(tmp_path, settings={**settings, "num-rounds": 9, "resume": True},
                                 reference=arrays, memory=restored)
    assert checkpoint.server_round == 2 and [r["round"] for r in checkpoint.rows] == [0, 1, 2]
    assert checkpoint.traffic.to_json() == TrafficLog.from_json(json.loads(json.dumps(checkpoint.traffic.to_json()))
                                                                ).to_json()
    assert checkpoint.traffic[1].uplink_bytes == 1234 and checkpoint.traffic[2].failures[0][0] == 12
    assert sorted(restored.sets) == [11, 12] and [len(restored.sets[n]) for n in (11, 12)] == [2, 1]
    for node in (11, 12):
        for before, after in zip(memory.sets[node], restored.sets[node], strict=True):
            assert torch.equal(before.images, after.images) and torch.equal(before.labels, after.labels)
    for name in arrays:
        assert (checkpoint.arrays[name].numpy() == arrays[name].numpy()).all()


def test_no_checkpoint_is_none_and_other_settings_are_refused(tmp_path, csv_row):
    assert load_checkpoint(tmp_path, settings={}, reference=model_to_arrays(torch.nn.Linear(2, 2)),
                           memory=None) is None
    settings, _, arrays = _saved(tmp_path, csv_row)
    with pytest.raises(CheckpointError, match="other settings .*strategy: 'fed-distill' -> 'hybrid'"):
        load_checkpoint(tmp_path, settings={**settings, "strategy": "hybrid"}, reference=arrays, memory=_memory())
    other = model_to_arrays(create_model("convnet", (1, 8, 8), 10, width=16))
    with pytest.raises(CheckpointError, match="array .* the model needs"):
        load_checkpoint(tmp_path, settings=settings, reference=other, memory=_memory())


def test_a_later_checkpoint_removes_files_it_no_longer_names(tmp_path, csv_row):
    settings, memory, arrays = _saved(tmp_path, csv_row)
    del memory.store.sets[memory.store.keys_of(12)[0]]
    save_checkpoint(tmp_path, settings=settings, server_round=3, arrays=arrays,
                    rows=[csv_row(r) for r in range(4)], traffic=TrafficLog(), memory=memory)
    directory = tmp_path / "checkpoint"
    assert [p.name for p in directory.glob("model-*")] == ["model-0003.safetensors"]
    assert [p.name for p in directory.glob("memory-*")] == ["memory-0003"]
    assert len(list((directory / "memory-0003").glob("*.safetensors"))) == 2


def _memory_files(out: Path) -> dict[str, str]:
    """{set file name: SHA-256} of the memory folder the committed checkpoint names."""
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "checkpoint" / state["memory"]).glob("*.safetensors"))}


def _simulate(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **QUIET_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--dataset", "digits", "--clients", "3", "--strategy",
           "fed-distill", "--rounds", "3", "--seed", "0", "--out", str(out), "--width", "8",
           "--distill-iterations", "3", "--server-epochs", "3", "--ipc", "2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: Ray's processes die with it


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.mark.slow
def test_killed_server_resumes_from_its_last_round(tmp_path):
    out = tmp_path / "run"
    state = out / "checkpoint" / "state.json"
    first = _simulate(out)
    try:
        deadline = time.monotonic() + 240
        while not (state.is_file() and json.loads(state.read_text())["round"] >= 1):
            assert first.poll() is None, f"the run ended before its round-1 checkpoint: {first.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no round-1 checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        _kill_group(first)
    killed_at = json.loads(state.read_text())["round"]
    assert killed_at < 3, "the run finished before it could be killed"
    memory_then = _memory_files(out)
    assert memory_then, "the round-1 checkpoint holds no synthetic sets"

    second = _simulate(out, "--resume")
    try:
        _, stderr = second.communicate(timeout=300)
    finally:
        _kill_group(second)
    assert second.returncode == 0, stderr[-3000:]
    with open(out / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert all(int(r["uplink_bytes"]) > 0 for r in rows[1:])
    cumulative = [int(r["cumulative_uplink_bytes"]) for r in rows]
    assert cumulative == sorted(cumulative) and cumulative[-1] == sum(int(r["uplink_bytes"]) for r in rows)
    memory_now = _memory_files(out)
    assert memory_then.items() <= memory_now.items()  # round 1's set files: still there, byte for byte
    failures = [r["failure_reasons"] for r in rows if r["failure_reasons"]]
    assert all(int(r["replies_ok"]) >= 2 for r in rows[1:]), failures
    # memory "all": every set that arrived (3 clients x 3 rounds unless a client failed, which `failures` says)
    assert len(memory_now) == sum(int(r["replies_ok"]) for r in rows), failures
    assert json.loads(state.read_text())["round"] == 3


def test_simulate_resume_refuses_a_mismatched_checkpoint_before_starting(tmp_path, csv_row, capsys):
    from fedcl.cli import main

    _saved(tmp_path, csv_row)
    assert main(["simulate", "--out", str(tmp_path), "--resume", "--strategy", "fedavg"]) == 2
    assert "cannot resume" in capsys.readouterr().err
