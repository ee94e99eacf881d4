"""The in-process engine: LocalGrid honours the round timeout (MeteredGrid counts the nodes it cut off as failures),
and a round samples `fraction_train` of the clients."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcl.flower import local_grid
from fedcl.flower.local_grid import LocalGrid
from fedcl.flower.protocol import CONFIG, SERVER_ROUND
from fedcl.flower.settings import FedSettings
from fedcl.flower.simulation import simulate
from strategies import MeteredGrid, TrafficLog


class SlowClients:
    """A ClientApp stand-in whose every reply takes `seconds` of a fake clock (so the test does not sleep)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.now, self.answered = seconds, 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, message: Message, context: Context) -> Message:
        self.now += self.seconds
        self.answered.append(context.node_id)
        return Message(content=RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=message)


def instructions(grid: LocalGrid, server_round: int) -> list[Message]:
    config = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
    return [Message(content=config, dst_node_id=node, message_type="train") for node in grid.get_node_ids()]


@pytest.fixture
def slow(monkeypatch) -> SlowClients:
    clients = SlowClients(seconds=0.3)
    monkeypatch.setattr(local_grid, "monotonic", clients.clock)
    return clients


def test_messages_after_the_deadline_are_not_delivered_and_a_late_reply_is_dropped(slow):
    grid = LocalGrid(slow, 4)
    replies = grid.send_and_receive(instructions(grid, 1), timeout=0.5)
    assert [r.metadata.src_node_id for r in replies] == [1000]  # done at 0.3 s
    assert slow.answered == [1000, 1001]  # 1001 finished at 0.6 s, past the deadline; 1002 and 1003 never ran


def test_without_a_timeout_every_node_answers(slow):
    grid = LocalGrid(slow, 4)
    assert len(grid.send_and_receive(instructions(grid, 1))) == 4
    assert len(grid.send_and_receive(instructions(grid, 2), timeout=10.0)) == 4


def test_metered_grid_counts_the_cut_off_nodes_as_round_timeout_failures(slow):
    grid, traffic = LocalGrid(slow, 3), TrafficLog()
    replies = MeteredGrid(grid, traffic).send_and_receive(instructions(grid, 7), timeout=0.5)
    assert len(replies) == 1
    round_7 = traffic[7]
    assert (round_7.messages_sent, round_7.replies) == (3, 1)
    assert round_7.failures == [(1001, "no reply within the round timeout (0.5 s)"),
                                (1002, "no reply within the round timeout (0.5 s)")]


def test_each_round_samples_fraction_train_of_the_clients(tmp_path):
    """As `fedcl simulate` does, the round waits for all 10 clients (min_nodes) and samples 3 of them."""
    settings = FedSettings(dataset="digits", strategy="fedavg", num_rounds=2, fraction_train=0.3, min_nodes=10,
                           width=8, local_epochs=1, device="cpu", out_dir=str(tmp_path))
    rows = simulate(settings, 10, engine="local")
    sampled = [(int(r["round"]), int(r["replies_ok"]), int(r["clients_failed"])) for r in rows[1:]]
    assert sampled == [(1, 3, 0), (2, 3, 0)]
