"""A real in-process federation of 4 clients (`simulate(..., engine="local")`, the real ClientApp) in which
partition 0 is hostile, one attack at a time: the round completes, the hostile client is counted as failed with a
reason, and the final accuracy stays within 3 points of the same federation with every client honest."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedcl.flower.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SYNTHETIC_IMAGES, SYNTHETIC_KEY
from fedcl.flower.settings import FedSettings
from fedcl.flower.simulation import simulate

pytestmark = pytest.mark.slow

SETTINGS = {
    "fedavg": dict(dataset="digits", strategy="fedavg", num_rounds=5, local_epochs=5, local_lr=0.05, partitioner="iid",
                   width=16,
                   min_nodes=4),
    "fed-distill": dict(dataset="digits", strategy="fed-distill", num_rounds=1, partitioner="iid", width=16,
                        distill_iterations=10, batch_real=32, server_epochs=30, init="real", min_nodes=4),
}


def _metrics(reply: Message, **changes) -> None:
    reply.content[METRICS] = MetricRecord({**dict(reply.content[METRICS]), **changes})


def _weights(reply: Message, change) -> None:
    arrays = reply.content[ARRAYS]
    reply.content[ARRAYS] = ArrayRecord({name: Array(change(name, array.numpy())) for name, array in arrays.items()})


def _pixels(reply: Message, value: float) -> None:
    record = reply.content[SYNTHETIC_KEY]
    record["images"] = Array(np.full_like(record["images"].numpy(), value))


#: attack -> (the strategy it targets, how partition 0 alters its real reply).
ATTACKS = {
    "nan-weights": ("fedavg", lambda r: _weights(r, lambda name, a: np.full_like(a, np.nan))),
    "wrong-shape": ("fedavg", lambda r: _weights(r, lambda name, a: np.zeros(1, dtype=a.dtype) if name.endswith(
        "weight") else a)),
    "claimed-weight": ("fedavg", lambda r: _metrics(r, **{NUM_EXAMPLES: 10**12})),
    "other-metric-keys": ("fedavg", lambda r: _metrics(r, **{"backdoor": 1.0})),
    "bad-metric-value": ("fedavg", lambda r: _metrics(r, **{NUM_EXAMPLES: math.inf})),
    "extra-records": ("fedavg", lambda r: r.content.__setitem__("more", ArrayRecord(r.content[ARRAYS]))),
    "huge-pixels": ("fed-distill", lambda r: _pixels(r, 1e30)),
    "nan-pixels": ("fed-distill", lambda r: _pixels(r, math.nan)),
    "unknown-metric": ("fed-distill", lambda r: _metrics(r, **{"backdoor": 1.0})),
    "list-metric": ("fed-distill", lambda r: _metrics(r, **{SYNTHETIC_IMAGES: [1, 2]})),
    "extra-synthetic-record": ("fed-distill",
                               lambda r: r.content.__setitem__("more", ArrayRecord(r.content[SYNTHETIC_KEY]))),
}


def _hostile_app(attack) -> ClientApp:
    """The real ClientApp whose partition 0 alters every reply it sends with `attack`."""
    from fedcl.flower import client_app

    app = ClientApp()

    def hostile(handler):
        def handle(msg: Message, context: Context) -> Message:
            reply = handler(msg, context)
            if int(context.node_config["partition-id"]) == 0:
                attack(reply)
            return reply
        return handle

    app.train("distill")(hostile(client_app.distill))
    app.train()(hostile(client_app.train))
    app.evaluate()(client_app.evaluate)
    return app


def _final(settings: dict, out, monkeypatch, attack=None) -> tuple[float, list[dict]]:
    from fedcl.flower import client_app

    if attack is not None:
        monkeypatch.setattr(client_app, "app", _hostile_app(attack))
    rows = simulate(FedSettings(**settings, out_dir=str(out)), 4, engine="local")
    monkeypatch.undo()
    return float(rows[-1]["accuracy"]), rows


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict[str, float]:
    """The final accuracy of each strategy's federation with every client honest."""
    accuracy = {}
    for strategy, settings in SETTINGS.items():
        rows = simulate(FedSettings(**settings, out_dir=str(tmp_path_factory.mktemp(strategy))), 4, engine="local")
        assert all(int(r["clients_failed"]) == 0 for r in rows)
        accuracy[strategy] = float(rows[-1]["accuracy"])
    return accuracy


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_one_hostile_client_is_a_counted_failure_and_costs_at_most_3_points(name, honest, tmp_path, monkeypatch):
    strategy, attack = ATTACKS[name]
    accuracy, rows = _final(SETTINGS[strategy], tmp_path, monkeypatch, attack)
    trained = rows[1:]
    if name != "claimed-weight":  # a claim is clipped to the training split's size, not failed
        assert all(int(r["clients_failed"]) == 1 and int(r["replies_ok"]) == 3 for r in trained), \
            [r["failure_reasons"] for r in trained]
    assert accuracy >= honest[strategy] - 0.03, (accuracy, honest[strategy])
