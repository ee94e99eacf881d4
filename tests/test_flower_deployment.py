"""Real deployments on loopback: one `flower-superlink`, two `flower-supernode`s (insecure mode), and `flwr run` of
the fedcl app, (i) for one FedDistill round and (ii) for a 2-task continual run whose nodes keep their memories on
disk (node config `memory-dir`); each run must finish as completed (`flwr ls`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedcl.flower import continual_client
from fedcl.flower.settings import FedSettings

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "simulations" / "flower_app"
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                                                    reason="Flower CLI not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _runs(env: dict[str, str]) -> list[dict]:
    done = subprocess.run([str(BIN / "flwr"), "ls", "deploy", "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=60)
    return json.loads(done.stdout).get("runs", [])


@contextmanager
def _federation(tmp_path: Path, node_configs: list[str]) -> Iterator[dict[str, str]]:
    """A SuperLink and one SuperNode per node config on loopback (insecure); yields the environment in which
    `flwr` addresses that SuperLink as "deploy".  Every process is stopped on exit; logs go to tmp_path."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = _env(home)
    logs = [open(tmp_path / f"{name}.log", "w") for name in ["superlink", *(f"node{i}" for i in range(len(node_configs)))]]
    processes: list[subprocess.Popen] = []
    try:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link_port)],
            env=env, cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT)
        processes.append(link)
        _wait_for_port(link_port, link)
        for config, log in zip(node_configs, logs[1:]):
            processes.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--port", str(_free_port()), "--node-config", config],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        yield env
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def _flwr_run(env: dict[str, str], run_config: str) -> list[dict]:
    """`flwr run` the fedcl app with run_config; asserts it started and every run finished as completed."""
    started = subprocess.run([str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config", run_config],
                             env=env, cwd=APP, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    runs = _runs(env)
    assert runs and all(r["status"] == "finished:completed" for r in runs), (runs, started.stdout[-3000:])
    return runs


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_superlink_and_two_supernodes_run_a_fed_distill_round(tmp_path):
    out = tmp_path / "results"
    with _federation(tmp_path, [f"partition-id={pid} num-partitions=2" for pid in range(2)]) as env:
        _flwr_run(env, f'strategy="fed-distill" num-rounds=1 width=16 distill-iterations=30 server-epochs=20 '
                       f'upload-dtype="float16" min-nodes=2 out-dir="{out}"')
    rows = _csv_rows(out / "rounds.csv")
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert int(rows[1]["replies_ok"]) == 2 and int(rows[1]["uplink_bytes"]) > 0
    assert float(rows[1]["accuracy"]) > float(rows[0]["accuracy"])


def test_a_continual_run_on_supernodes_keeps_each_memory_on_disk(tmp_path):
    """Two tasks of fed-distill on two SuperNodes, each with its own memory-dir: the run completes, tasks.csv
    scores both tasks, and what a restarted SuperNode would read from its memory-dir (a fresh Context of the same
    run) is a memory of both tasks' classes within the budget."""
    out, ipc = tmp_path / "results", 3
    memory_dirs = [tmp_path / f"memory{pid}" for pid in range(2)]
    configs = [f'partition-id={pid} num-partitions=2 memory-dir="{memory_dirs[pid]}"' for pid in range(2)]
    with _federation(tmp_path, configs) as env:
        runs = _flwr_run(env, f'scenario="continual" tasks=2 strategy="fed-distill" rounds-per-task=1 width=16 '
                              f'distill-iterations=5 ipc={ipc} local-epochs=2 min-nodes=2 out-dir="{out}"')
    assert [int(r["task"]) for r in _csv_rows(out / "tasks.csv")] == [0, 1]
    settings = FedSettings(scenario="continual", tasks=2, strategy="fed-distill", ipc=ipc)
    for pid, directory in enumerate(memory_dirs):
        context = Context(run_id=int(runs[0]["run-id"]), node_id=pid, node_config={"memory-dir": str(directory)},
                          state=RecordDict(), run_config={})
        memory = continual_client.load_memory(settings, context)
        assert sorted(memory.sets) == [0, 1], f"node {pid} holds groups {sorted(memory.sets)}"
        assert 0 < len(memory) <= ipc * len(memory.seen_classes())
