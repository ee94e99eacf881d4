"""Per-round communication and failure accounting shared by every fedcl strategy.

`Metered` wraps the Grid a strategy's `start` loop talks through, so every message is counted in one place:
downlink = bytes of every instruction sent, uplink = bytes of every reply received (Flower's `count_bytes` of
the array, config and metric records: the payload, not the transport framing).  Error replies and nodes that never
answered are failures with a reason; strategies add their own (e.g. a malformed synthetic set) with `fail`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedcl.flower.records import record_nbytes


@dataclass
class RoundTraffic:
    """What one round moved and who failed in it (`screened`: how many of the failures were valid sets that the
    poisoning screen refused)."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    messages_sent: int = 0
    replies: int = 0
    screened: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)


class TrafficLog:
    """Traffic and failures by round number (round 0 = before training)."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = {}

    def __getitem__(self, server_round: int) -> RoundTraffic:
        return self.rounds.setdefault(server_round, RoundTraffic())

    def fail(self, server_round: int, node_id: int, reason: str) -> None:
        """Count node `node_id` as failed in `server_round` and log why."""
        self[server_round].failures.append((int(node_id), reason))
        log(WARNING, "round %s: client node %s failed: %s", server_round, node_id, reason)

    def total_uplink(self) -> int:
        return sum(r.uplink_bytes for r in self.rounds.values())


class MeteredGrid:
    """A Grid proxy that counts the bytes of everything sent and received, by the `server-round` in the messages."""

    def __init__(self, grid: Grid, traffic: TrafficLog) -> None:
        self._grid, self._traffic, self._round = grid, traffic, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
            self._round = int(config.get("server-round", self._round))
        traffic = self._traffic[self._round]
        traffic.messages_sent += len(messages)
        traffic.downlink_bytes += sum(record_nbytes(m.content) for m in messages if m.has_content())
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        traffic.replies += len(replies)
        for reply in replies:
            if reply.has_error():
                self._traffic.fail(self._round, reply.metadata.src_node_id, f"client error: {reply.error.reason}")
            else:
                traffic.uplink_bytes += record_nbytes(reply.content)
        missing = Counter(m.metadata.dst_node_id for m in messages)
        missing.subtract(Counter(r.metadata.src_node_id for r in replies))
        for node_id, count in missing.items():
            for _ in range(max(0, count)):
                self._traffic.fail(self._round, node_id, f"no reply within the round timeout ({timeout} s)")
        return replies


class Metered:
    """Mixin for strategies: `self.traffic` holds bytes and failures per round; `start` meters its Grid."""

    traffic: TrafficLog

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Any = None) -> Result:
        self.traffic = TrafficLog()
        return super().start(MeteredGrid(grid, self.traffic), initial_arrays, num_rounds,  # type: ignore[misc]
                             timeout, train_config, evaluate_config, evaluate_fn)

    def failure_metrics(self, server_round: int) -> MetricRecord:
        """Failures so far in this round, as metrics for the round's MetricRecord."""
        traffic = self.traffic[server_round]
        return MetricRecord({"clients-failed": len(traffic.failures), "clients-screened": traffic.screened})
