"""A real deployment on loopback: one `flower-superlink`, two `flower-supernode`s (insecure mode), and
`flwr run` of the fedcl app for one FedDistill round; the run must finish as completed (`flwr ls`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "simulations" / "flower_app"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


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


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI not installed")
def test_superlink_and_two_supernodes_run_a_fed_distill_round(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "results"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = _env(home)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")}
    processes: list[subprocess.Popen] = []
    try:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link_port)],
            env=env, cwd=tmp_path, stdout=logs["superlink"], stderr=subprocess.STDOUT)
        processes.append(link)
        _wait_for_port(link_port, link)
        for pid in range(2):
            processes.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--port", str(_free_port()), "--node-config", f"partition-id={pid} num-partitions=2"],
                env=env, cwd=tmp_path, stdout=logs[f"node{pid}"], stderr=subprocess.STDOUT))
        run_config = (f'strategy="fed-distill" num-rounds=1 width=16 distill-iterations=5 server-epochs=20 '
                      f'upload-dtype="float16" min-nodes=2 out-dir="{out}"')
        started = subprocess.run([str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config", run_config],
                                 env=env, cwd=APP, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        runs = _runs(env)
        assert runs and all(r["status"] == "finished:completed" for r in runs), (runs, started.stdout[-3000:])
        with open(out / "rounds.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["round"]) for r in rows] == [0, 1]
        assert int(rows[1]["replies_ok"]) == 2 and int(rows[1]["uplink_bytes"]) > 0
        assert float(rows[1]["accuracy"]) > float(rows[0]["accuracy"])
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs.values():
            log.close()
