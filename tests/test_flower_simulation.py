"""Real Flower simulations (Ray) of the fedcl apps: FedDistill improves the model; crashing and malformed
clients are counted as failures with reasons while the round completes; `fedcl simulate` writes rounds.csv."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedcl.flower.settings import FedSettings
from fedcl.flower.simulation import QUIET_ENV, simulate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

#: CPU-sized settings: digits, 3 clients, few distillation iterations (from real images, so that so few iterations
#: make a useful set: the private default is tested in test_federated_privacy.py) and server epochs.
TINY = dict(dataset="digits", width=16, distill_iterations=10, batch_real=32, server_epochs=30, min_nodes=3,
            init="real")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "rounds.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fed_distill_two_rounds_improve_over_the_initial_model(tmp_path):
    settings = FedSettings(**TINY, strategy="fed-distill", num_rounds=2, out_dir=str(tmp_path))
    rows = simulate(settings, 3)
    accuracy = [float(r["accuracy"]) for r in rows]
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert accuracy[1] > accuracy[0] + 0.15 and accuracy[2] > accuracy[0] + 0.15
    assert all(int(r["uplink_bytes"]) > 0 for r in rows[1:]) and int(rows[0]["uplink_bytes"]) == 0
    # round 1 sends only the config; round 2 also sends the global model down (guided distillation)
    assert int(rows[2]["downlink_bytes"]) > 10 * int(rows[1]["downlink_bytes"])
    assert all(int(r["clients_failed"]) == 0 for r in rows)
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "summary.md").is_file()


def _faulty_client_app() -> ClientApp:
    """The real ClientApp's distill handler, except partition 1 crashes and partitions 2-5 send malformed sets."""
    from fedcl.flower import client_app

    app = ClientApp()

    @app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 1:
            raise RuntimeError("simulated client crash")
        reply = client_app.distill(msg, context)
        arrays = reply.content["synthetic"]
        images, labels = arrays["images"].numpy(), arrays["labels"].numpy()
        if pid == 2:
            arrays["images"] = Array(np.full_like(images, np.nan))
        elif pid == 3:
            arrays["images"] = Array(np.ascontiguousarray(images[:, :, :4, :4]))
        elif pid == 4:
            arrays["labels"] = Array(labels + 10)
        elif pid == 5:
            arrays["images"] = Array(np.concatenate([images] * 3))
            arrays["labels"] = Array(np.concatenate([labels] * 3))
        return reply

    return app


def test_a_client_error_is_logged_by_its_root_cause():
    from strategies.traffic import client_error_summary

    wrapped = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
               + "  File \"app.py\", line 9, in distill\n" * 40 + "KeyError: 'partition-id'\n\n"
               "The above exception was the direct cause of the following exception:\n"
               "flwr.clientapp.client_app.ClientAppException: \nException occurred. Message: 'partition-id''>")
    assert client_error_summary(wrapped) == "KeyError: 'partition-id'"
    assert client_error_summary("<class 'ValueError'>:<'no data'>") == "<class 'ValueError'>:<'no data'>"


def test_crashing_and_malformed_clients_are_failures_with_reasons(tmp_path, monkeypatch):
    from fedcl.flower import client_app

    monkeypatch.setattr(client_app, "app", _faulty_client_app())
    settings = FedSettings(**{**TINY, "min_nodes": 6}, strategy="fed-distill", num_rounds=1, out_dir=str(tmp_path))
    rows = simulate(settings, 6)
    last = rows[-1]
    reasons = last["failure_reasons"]
    assert int(last["clients_failed"]) == 5 and int(last["replies_ok"]) == 1
    assert "simulated client crash" in reasons
    for reason in ("NaN", "expected (1, 8, 8)", "out of range", "oversize"):
        assert reason in reasons, reasons
    assert float(last["accuracy"]) > float(rows[0]["accuracy"])  # trained on the one good client's set


@pytest.mark.parametrize("strategy", ["fedavg", "hybrid"])
def test_fedcl_simulate_writes_rounds_csv(tmp_path, strategy):
    out = tmp_path / strategy
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--dataset", "digits", "--clients", "3", "--strategy",
           strategy, "--rounds", "2", "--seed", "0", "--out", str(out), "--width", "16", "--distill-iterations",
           "5", "--finetune-epochs", "3", "--local-epochs", "5", "--fraction-evaluate", "1.0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert {"round", "accuracy", "uplink_bytes", "downlink_bytes"} <= set(rows[0])
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"])
    model_bytes = int(rows[2]["uplink_bytes"]) // 3
    if strategy == "hybrid":  # round 1 carries the synthetic sets on top of the weights
        assert int(rows[1]["uplink_bytes"]) > int(rows[2]["uplink_bytes"])
    else:
        assert int(rows[1]["uplink_bytes"]) == int(rows[2]["uplink_bytes"])
    assert int(rows[1]["downlink_bytes"]) >= 3 * model_bytes
    assert (out / "partitions.txt").is_file() and (out / "accuracy.png").is_file()
    assert rows[0]["client_accuracy"] == "" and 0 < float(rows[2]["client_accuracy"]) <= 1  # clients evaluated
