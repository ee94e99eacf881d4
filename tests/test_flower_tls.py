"""The TLS recipe of docs/flower.md on loopback: a throwaway CA made here, a SuperLink with its certificates, two
SuperNodes that trust the CA completing a FedDistill round, a SuperNode that trusts another CA refused, and the
`flwr` connection needing an absolute `root-certificates` path."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_flower_deployment import APP, BIN, _csv_rows, _env, _free_port, _runs, _wait_for_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI absent"),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA certificate and key in `directory` (name.crt, name.key)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)
    return directory / f"{name}.crt"


def _make_server_cert(directory: Path, ca: str) -> None:
    """server.key and server.pem for 127.0.0.1, signed by the CA `ca` in `directory`."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", "server.ext", "-out", "server.pem", cwd=directory)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process (last started first), then SIGKILL what is still alive after 15 s."""
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_tls_superlink_serves_nodes_that_trust_its_ca_and_refuses_others(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = _make_ca(certs, "ca")
    _make_server_cert(certs, "ca")
    other_ca = _make_ca(certs, "other")
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n\n'
        f'[superlink.relative]\naddress = "127.0.0.1:{port}"\nroot-certificates = "certs/ca.crt"\n')
    env, out = _env(home), tmp_path / "results"
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_start([str(BIN / "flower-superlink"), "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(port), "--ssl-ca-certfile", str(ca),
                                 "--ssl-certfile", str(certs / "server.pem"),
                                 "--ssl-keyfile", str(certs / "server.key")], env, tmp_path / "superlink.log"))
        _wait_for_port(port, processes[0])
        for pid, trusted in [(0, ca), (1, ca), (2, other_ca)]:
            processes.append(_start([str(BIN / "flower-supernode"), "--root-certificates", str(trusted),
                                     "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                                     "--node-config", f"partition-id={min(pid, 1)} num-partitions=2"],
                                    env, tmp_path / f"node{pid}.log"))
        relative = subprocess.run([str(BIN / "flwr"), "ls", "relative", "--format", "json"], env=env,
                                  capture_output=True, text=True, timeout=60)
        assert json.loads(relative.stdout)["success"] is False and "absolute" in relative.stdout
        started = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config",
             f'strategy="fed-distill" num-rounds=1 width=16 distill-iterations=5 server-epochs=20 min-nodes=2 '
             f'out-dir="{out}"'], env=env, cwd=APP, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        runs = _runs(env)
        assert runs and all(r["status"] == "finished:completed" for r in runs), runs
    finally:
        _stop(processes)
    rows = _csv_rows(out / "rounds.csv")
    assert int(rows[1]["replies_ok"]) == 2
    registered = ["SuperNode ID" in (tmp_path / f"node{pid}.log").read_text() for pid in range(3)]
    assert registered == [True, True, False]  # the node that trusts another CA never joins
