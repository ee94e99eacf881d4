"""`Metered`: the mixin every fedcl strategy derives from, in front of Flower's `FedAvg` (or a FedAvg subclass).

It adds, through the strategy hooks Flower defines (each calling `super()`):
- `traffic` (bytes and failures per round) and `client_evaluation`, from `__init__`, so the strategy works
  whoever drives it: `Metered.start`, Flower's own `Strategy.start`, a hand-written loop, or a wrapper such as
  Flower's `DifferentialPrivacyServerSideFixedClipping`;
- the reply boundary (`strategies.boundary`) in front of FedAvg's aggregation: a weight update or an evaluation
  that breaks the protocol is a counted failure and is left out; the claimed weight is clipped to `max_examples`;
  an aggregate that is not finite leaves the global model unchanged;
- `start`: Flower's round loop on a metered Grid, able to resume from a checkpoint's round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedcl.flower.protocol import COUNT, MAX_COUNT
from strategies.boundary import (
    Layout,
    admit,
    agreeing,
    array_problem,
    clip_count,
    finite,
    layout,
    metric_problem,
    most_common,
)
from strategies.traffic import MeteredGrid, TrafficLog

#: The type of Flower's `FedAvg` options `train_metrics_aggr_fn` and `evaluate_metrics_aggr_fn`.
MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class Metered:
    """Mixin for FedAvg-family strategies: metering, the reply boundary and a resumable `start`.

    Parameters
    ----------
    max_examples : int (default: `fedcl.flower.protocol.MAX_COUNT`)
        The most examples one client's reply may weigh in an average: a larger claim is clipped to it (a server
        that knows its data sets it to, e.g., the training split's size).
    *args, **kwargs :
        The base strategy's (Flower's `FedAvg` options).
    """

    def __init__(self, *args: Any, max_examples: int = MAX_COUNT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if COUNT.problem(max_examples) is not None:
            raise ValueError(f"max_examples must be an int in 0..{MAX_COUNT}, got {max_examples!r}")
        self.max_examples = max_examples
        self.traffic = TrafficLog()
        self.client_evaluation: dict[int, MetricRecord] = {}
        self.sent_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global model sent (replies are checked against its layout), then the base's messages."""
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base's aggregation of the weight updates that pass the boundary and carry weight (an update that
        claims no examples is left out, not failed: it has no say in an average, nor a vote in a robust
        aggregator's choice); None (model unchanged) when none is left or the aggregate is not finite."""
        updates = [r for r in self.admit_updates(server_round, replies)
                   if r.content.metric_records[_only(r.content.metric_records)][self.weighted_by_key] > 0]
        if not updates:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, updates)  # type: ignore[misc]
        if arrays is not None and not finite(arrays):
            log(WARNING, "round %s: the aggregate is not finite; the global model is unchanged", server_round)
            return None, metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The base's aggregation of the evaluation replies that pass the boundary."""
        passed = self.admit_evaluations(server_round, replies)
        return super().aggregate_evaluate(server_round, passed) if passed else None  # type: ignore[misc]

    def admit_updates(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The weight updates that pass the boundary (one ArrayRecord shaped like the model sent, or like most
        replies when none was sent; one MetricRecord of in-range numbers agreeing with the others' names; the
        weight clipped to `max_examples`); every other reply is a counted failure."""
        shaped = admit(server_round, replies, self.traffic, lambda r: self._metrics_problem(r, arrays=1))
        expected: Layout | None = layout(self.sent_arrays) if self.sent_arrays is not None else None
        if expected is None and shaped:
            expected = most_common([layout(_array_record(r)) for r in shaped])
        finite = admit(server_round, shaped, self.traffic, lambda r: array_problem(_array_record(r), expected))
        return self._clipped(agreeing(server_round, finite, self.traffic))

    def admit_evaluations(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The evaluation replies that pass the boundary (one MetricRecord, in range, agreeing names, weight
        clipped); every other reply is a counted failure."""
        checked = admit(server_round, replies, self.traffic, lambda r: self._metrics_problem(r, arrays=0))
        return self._clipped(agreeing(server_round, checked, self.traffic))

    def _metrics_problem(self, reply: Message, *, arrays: int) -> str | None:
        """Why a weight (`arrays=1`) or evaluation (`arrays=0`) reply's records or metrics are unacceptable."""
        content = reply.content
        if (len(content.array_records), len(content.metric_records), len(content.config_records)) != (arrays, 1, 0):
            return (f"reply carries {len(content.array_records)} ArrayRecords, {len(content.metric_records)} "
                    f"MetricRecords and {len(content.config_records)} ConfigRecords; expected {arrays}, 1 and 0")
        metrics = content.metric_records[_only(content.metric_records)]
        problem = metric_problem(metrics, required=[self.weighted_by_key])
        weight = COUNT.problem(metrics.get(self.weighted_by_key))
        return problem or (f"weight {self.weighted_by_key!r} {weight}" if weight else None)

    def _clipped(self, replies: list[Message]) -> list[Message]:
        """`replies` with each claimed weight cut to `max_examples`."""
        for reply in replies:
            clip_count(reply.content.metric_records[_only(reply.content.metric_records)], self.weighted_by_key,
                       self.max_examples)
        return replies

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Any = None, *, first_round: int = 1, traffic: TrafficLog | None = None) -> Result:
        """Flower's round loop for rounds `first_round`..`num_rounds`, metered.

        A fresh run starts at round 1.  A resumed one passes the round after its checkpoint, the checkpoint's
        arrays as `initial_arrays` and its `traffic`; every round then carries its real number (in the messages'
        `server-round`, the strategy's seeds, the result's keys and the `evaluate_fn` calls, whose first call is
        for round `first_round - 1`).
        """
        if not 1 <= first_round <= num_rounds + 1:
            raise ValueError(f"first_round must lie in 1..{num_rounds + 1}, got {first_round}")
        if traffic is not None:
            self.traffic = traffic
        offset = first_round - 1
        shifted_evaluate = None if evaluate_fn is None else (lambda r, arrays: evaluate_fn(r + offset, arrays))
        metered = MeteredGrid(grid, self.traffic, self.configrecord_key)  # type: ignore[attr-defined]
        result = _RoundsFrom(self, offset).start(metered, initial_arrays, num_rounds - offset, timeout,
                                                 train_config, evaluate_config, shifted_evaluate)
        for history in (result.train_metrics_clientapp, result.evaluate_metrics_clientapp,
                        result.evaluate_metrics_serverapp):
            shifted = {r + offset: metrics for r, metrics in history.items()}
            history.clear()
            history.update(shifted)
        return result

    def failure_metrics(self, server_round: int) -> MetricRecord:
        """Failures so far in this round, as metrics for the round's MetricRecord."""
        traffic = self.traffic[server_round]
        return MetricRecord({"clients-failed": len(traffic.failures), "clients-screened": traffic.screened})


def _only(records: Any) -> str:
    """The name of the one record in a reply's records of one kind."""
    return next(iter(records))


def _array_record(reply: Message) -> ArrayRecord:
    """The one ArrayRecord of a weight reply."""
    return reply.content.array_records[_only(reply.content.array_records)]


class _RoundsFrom(Strategy):
    """The strategy as Flower's round loop sees it: loop round r is the strategy's round r + offset.

    Flower's `Strategy.start` always counts rounds from 1.  Like Flower's own strategy wrappers (its DP
    strategies), this is a `Strategy` around the real one: its five callbacks forward to it with the real round
    number (and the clients' evaluation metrics are recorded), so a resumed run's rounds carry their real numbers.
    """

    def __init__(self, strategy: Metered, offset: int) -> None:
        self._strategy, self._offset = strategy, offset

    def summary(self) -> None:
        self._strategy.summary()  # type: ignore[attr-defined]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._strategy.configure_train(server_round + self._offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._strategy.aggregate_train(server_round + self._offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._strategy.configure_evaluate(server_round + self._offset, arrays, config,  # type: ignore
                                                 grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self._strategy.aggregate_evaluate(server_round + self._offset, replies)
        if metrics is not None:
            self._strategy.client_evaluation[server_round + self._offset] = metrics
        return metrics
