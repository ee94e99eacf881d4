"""The one boundary every client reply crosses before a strategy reads it.

A reply is untrusted: any field may be missing, extra, of another type, NaN, huge or of the wrong shape.  Each
check here returns None when the reply is fine or a short reason when it is not; `admit` turns the reasons into
counted failures (`TrafficLog.fail`, whose reasons are bounded) and returns the replies that passed, so a hostile
reply never raises inside the server and is never averaged in.

- `record_problem`: exactly the records expected, by kind and name;
- `metric_problem`: every metric a finite number in the range `fedcl.flower.protocol.METRIC_BOUNDS` states
  (counts: non-negative ints below a bound), no lists;
- `array_problem`: the array names, shapes and dtypes of the global model (or, when the strategy did not send
  one, the layout most replies agree on), finite values;
- `agreeing`: the replies whose record and metric names are the ones most replies carry (Flower's aggregation
  needs one set);
- `clip_count`: a claimed count (the FedAvg weight) cut to a server-side bound;
- `finite`: whether a model about to become the global one is finite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcl.flower.protocol import METRIC_BOUNDS, OTHER_METRIC
from strategies.traffic import TrafficLog

#: An ArrayRecord's layout: (name, shape, dtype) of every array, in order.
Layout = tuple[tuple[str, tuple[int, ...], str], ...]
T = TypeVar("T", bound=Hashable)


def layout(arrays: ArrayRecord) -> Layout:
    """The names, shapes and dtypes of the arrays in `arrays` (read from their headers: nothing is decoded)."""
    return tuple((name, tuple(int(d) for d in array.shape), str(array.dtype)) for name, array in arrays.items())


def record_problem(content: RecordDict, *, arrays: Collection[str] = (), configs: Collection[str] = (),
                   metrics: Collection[str] = ()) -> str | None:
    """Why `content` does not hold exactly the ArrayRecords, ConfigRecords and MetricRecords named, or None."""
    for kind, held, expected in (("ArrayRecords", content.array_records, arrays),
                                 ("ConfigRecords", content.config_records, configs),
                                 ("MetricRecords", content.metric_records, metrics)):
        if set(held) != set(expected):
            return f"reply carries {kind} {sorted(held)[:4]}, expected {sorted(expected)}"
    return None


def metric_problem(metrics: MetricRecord, *, required: Collection[str] = (),
                   known_only: bool = False) -> str | None:
    """Why `metrics` is unacceptable, or None: a required key missing, a key outside the protocol (with
    `known_only`), or a value outside its stated range."""
    missing = [key for key in required if key not in metrics]
    if missing:
        return f"metrics lack {missing}"
    for key, value in metrics.items():
        if known_only and key not in METRIC_BOUNDS:
            return f"metric {key[:40]!r} is not part of the protocol"
        problem = METRIC_BOUNDS.get(key, OTHER_METRIC).problem(value)
        if problem is not None:
            return f"metric {key[:40]!r} {problem}"
    return None


def array_problem(arrays: ArrayRecord, expected: Layout) -> str | None:
    """Why `arrays` is not a finite copy of the `expected` layout, or None."""
    got = layout(arrays)
    if got != expected:
        wrong = next(((g, e) for g, e in zip(got, expected) if g != e), None)
        detail = f"{wrong[0]} where the model has {wrong[1]}" if wrong else f"{len(got)} arrays, not {len(expected)}"
        return f"model arrays do not match the global model: {detail}"
    for name, array in arrays.items():
        try:
            values = array.numpy()
        except (ValueError, TypeError, OSError, EOFError) as err:
            return f"array {name!r} is corrupt: {type(err).__name__}"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"array {name!r} holds NaN or Inf"
    return None


def finite(arrays: ArrayRecord) -> bool:
    """Whether every floating-point array in `arrays` is finite (an aggregate or a server-trained model that is
    not must never become the global model)."""
    return all(np.isfinite(a).all() for a in (array.numpy() for array in arrays.values()) if a.dtype.kind in "fc")


def most_common(items: Sequence[T]) -> T:
    """The item that occurs most often (the earliest among equals)."""
    counts = Counter(items)
    return max(items, key=lambda item: (counts[item], -items.index(item)))


def admit(server_round: int, replies: Iterable[Message], traffic: TrafficLog,
          problem: Callable[[Message], str | None]) -> list[Message]:
    """The replies without an error for which `problem` finds nothing; every other non-error reply is a failure
    with the reason (error replies are the Grid's to count: `MeteredGrid` does)."""
    passed = []
    for reply in replies:
        if reply.has_error():
            continue
        reason = problem(reply)
        if reason is None:
            passed.append(reply)
        else:
            traffic.fail(server_round, reply.metadata.src_node_id, f"rejected reply: {reason}")
    return passed


def agreeing(server_round: int, replies: list[Message], traffic: TrafficLog) -> list[Message]:
    """The replies whose record names and metric names equal those most replies carry; the others are failures
    (Flower's aggregation needs one ArrayRecord name and one set of metric names)."""
    if not replies:
        return replies
    names = {id(r): (tuple(sorted(r.content.array_records)),
                     tuple(sorted((name, key) for name, record in r.content.metric_records.items() for key in record)))
             for r in replies}
    agreed = most_common(list(names.values()))
    return admit(server_round, replies, traffic,
                 lambda r: None if names[id(r)] == agreed else
                 f"record and metric names {_shown(names[id(r)])} differ from the other replies' {_shown(agreed)}")


def _shown(names: tuple[tuple[str, ...], tuple[tuple[str, str], ...]]) -> str:
    """A short rendering of a reply's (ArrayRecord names, (MetricRecord name, metric name) pairs)."""
    arrays, metrics = names
    return f"{list(arrays)[:2]} {[f'{record}.{key}' for record, key in metrics][:6]}"


def clip_count(metrics: MetricRecord, key: str, bound: int) -> None:
    """Cut the count `metrics[key]` to `bound` in place (a claim above what the server allows one client)."""
    if key in metrics and metrics[key] > bound:
        metrics[key] = bound
