"""Per-round communication and failure accounting shared by every fedcl strategy.

`MeteredGrid` wraps the Grid a strategy's `start` loop talks through (`strategies.metered.Metered.start`), so
every message is counted in one place:
downlink = bytes of every instruction sent, uplink = bytes of every reply received (Flower's `count_bytes` of
the array, config and metric records: the payload, not the transport framing).  Error replies and nodes that never
answered are failures with a reason; strategies add their own (e.g. a malformed synthetic set) with `fail`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from logging import WARNING
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcl.flower.protocol import CONFIG, MAX_REASON_CHARS, SERVER_ROUND
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


def bounded(reason: str) -> str:
    """`reason` cut to at most `MAX_REASON_CHARS` characters (marked with an ellipsis when cut)."""
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)\b[^:]*: \S.*$")


def client_error_summary(reason: str) -> str:
    """The line of a client's error reply that names the exception and its message.

    Flower wraps a simulated client's exception in Ray's chained tracebacks (colour codes, frames, wrappers), which
    would bury the cause past the logged length; the first `Type: message` line is the root cause. A reason with
    no such line (a deployed client's short reason) is kept as it is."""
    lines = [line.strip() for line in _ANSI.sub("", reason).splitlines()]
    raised = [line for line in lines if _RAISED.match(line)]
    return raised[0].removesuffix("'>") if raised else reason


class TrafficLog:
    """Traffic and failures by round number (round 0 = before training)."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = {}

    def __getitem__(self, server_round: int) -> RoundTraffic:
        return self.rounds.setdefault(server_round, RoundTraffic())

    def fail(self, server_round: int, node_id: int, reason: str) -> None:
        """Count node `node_id` as failed in `server_round` and log why (the reason cut to `MAX_REASON_CHARS`:
        it may quote a client's own error text, which must not fill the logs and the checkpoint)."""
        reason = bounded(reason)
        self[server_round].failures.append((int(node_id), reason))
        log(WARNING, "round %s: client node %s failed: %s", server_round, node_id, reason)

    def total_uplink(self) -> int:
        return sum(r.uplink_bytes for r in self.rounds.values())

    def to_json(self) -> dict[str, Any]:
        """The log as JSON-ready data: {"round": {counter: int, "failures": [[node, reason], ...]}}."""
        return {str(r): asdict(t) for r, t in sorted(self.rounds.items())}

    @classmethod
    def from_json(cls, data: Any) -> TrafficLog:
        """Rebuild a log written by `to_json`; raise ValueError naming the first malformed entry."""
        if not isinstance(data, dict):
            raise ValueError(f"traffic log must be a JSON object, got {type(data).__name__}")
        log_ = cls()
        for key, entry in data.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and isinstance(entry, dict)
                    and set(entry) == {f.name for f in fields(RoundTraffic)}):
                raise ValueError(f"traffic log entry {key!r} is malformed")
            counters = {k: v for k, v in entry.items() if k != "failures"}
            if not all(type(v) is int and v >= 0 for v in counters.values()):
                raise ValueError(f"traffic log round {key}: counters must be non-negative integers")
            failures = entry["failures"]
            if not isinstance(failures, list) or not all(
                    isinstance(f, list) and len(f) == 2 and type(f[0]) is int and isinstance(f[1], str)
                    for f in failures):
                raise ValueError(f"traffic log round {key}: failures must be [node, reason] pairs")
            log_.rounds[int(key)] = RoundTraffic(**counters, failures=[(n, why) for n, why in failures])
        return log_


class MeteredGrid(Grid):
    """A Grid around another that counts the bytes of everything sent and received, by the `server-round` in the
    messages' ConfigRecord `configrecord_key` (the strategy's); every other call goes to the inner Grid."""

    def __init__(self, grid: Grid, traffic: TrafficLog, configrecord_key: str = CONFIG) -> None:
        self._grid, self._traffic, self._round, self._config_key = grid, traffic, 0, configrecord_key

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get(self._config_key, {}) if msg.has_content() else {}
            self._round = int(config.get(SERVER_ROUND, self._round))
        traffic = self._traffic[self._round]
        traffic.messages_sent += len(messages)
        traffic.downlink_bytes += sum(record_nbytes(m.content) for m in messages if m.has_content())
        # In node order: Flower samples nodes in random order, and the float sums of an aggregation depend on it.
        replies = sorted(self._grid.send_and_receive(messages, timeout=timeout), key=lambda r: r.metadata.src_node_id)
        traffic.replies += len(replies)
        for reply in replies:
            if reply.has_error():
                why = client_error_summary(reply.error.reason)
                self._traffic.fail(self._round, reply.metadata.src_node_id, f"client error: {why}")
            else:
                traffic.uplink_bytes += record_nbytes(reply.content)
        missing = Counter(m.metadata.dst_node_id for m in messages)
        missing.subtract(Counter(r.metadata.src_node_id for r in replies))
        for node_id, count in missing.items():
            for _ in range(max(0, count)):
                self._traffic.fail(self._round, node_id, f"no reply within the round timeout ({timeout} s)")
        return replies
