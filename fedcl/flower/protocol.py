"""The fedcl message protocol: every message type, record name, config key and metric key that the ClientApp and
the strategies exchange, and the range each reply metric must lie in.

Both sides import their names from here, so a name is spelt once.  A message is a Flower `RecordDict`:

- instructions (server -> client) carry the run settings in the ConfigRecord `CONFIG` (see `FedSettings`) plus
  `SERVER_ROUND` and, in the continual scenario, `TASK`; weight rounds and guided distillation also carry the
  global model in the ArrayRecord `ARRAYS`; a replay slice travels as a synthetic set;
- replies (client -> server) carry their numbers in the MetricRecord `METRICS` (keys below), weights in `ARRAYS`
  and a synthetic set as the ArrayRecord `SYNTHETIC_KEY` with its metadata JSON in the ConfigRecord `META_KEY`.

Plain data only (no torch): the server checks every reply against `METRIC_BOUNDS` before it reads a number.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import MessageType

#: Action of the distillation instruction, and its full message type (`<category>.<action>` routing).
DISTILL_ACTION = "distill"
DISTILL_MESSAGE = f"{MessageType.TRAIN}.{DISTILL_ACTION}"

#: Record names.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SYNTHETIC_KEY = "synthetic"
META_KEY = "synthetic-meta"
#: Key of the metadata JSON inside the `META_KEY` ConfigRecord.
META_JSON = "meta"

#: Config keys the server adds to the run settings.
SERVER_ROUND = "server-round"
TASK = "task"

#: Reply metric keys.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
SYNTHETIC_IMAGES = "synthetic-images"
DISTILL_SECONDS = "distill-seconds"
MEMORY_IMAGES = "memory-images"
REHEARSAL_EXAMPLES = "rehearsal-examples"
LOCAL_ACCURACY = "local-accuracy"
#: The privacy budget a client has spent so far over all its releases (differentially private runs only).
EPSILON_SPENT = "epsilon-spent"

#: Largest count any reply may claim (examples, images): far above any partition, far below float trouble.
MAX_COUNT = 10**9
#: Longest failure reason kept in logs, rounds.csv and the checkpoint (a client's error text is untrusted).
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Bound:
    """The values a reply metric may take: a finite number in [low, high]; with `count`, an int."""

    low: float
    high: float
    count: bool = False

    def problem(self, value: object) -> str | None:
        """Why `value` is out of bounds, or None when it is fine."""
        kinds = (int,) if self.count else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"is {type(value).__name__}, expected {'an int' if self.count else 'a number'}"
        if not self.low <= value <= self.high:  # False for NaN
            return f"= {value!r} is outside [{self.low}, {self.high}]"
        return None


#: A count: a non-negative int up to MAX_COUNT (also what a FedAvg weight must be, whatever its key).
COUNT = Bound(0, MAX_COUNT, count=True)
#: Every metric a fedcl client reports, with its range.
METRIC_BOUNDS: dict[str, Bound] = {
    NUM_EXAMPLES: COUNT,
    SYNTHETIC_IMAGES: COUNT,
    MEMORY_IMAGES: COUNT,
    REHEARSAL_EXAMPLES: COUNT,
    TASK: Bound(0, 10_000, count=True),
    TRAIN_LOSS: Bound(0.0, 1e6),
    DISTILL_SECONDS: Bound(0.0, 1e7),
    LOCAL_ACCURACY: Bound(0.0, 1.0),
    EPSILON_SPENT: Bound(0.0, 1e6),
}
#: Range of a metric the protocol does not name (a strategy driven by other clients): any finite number of a
#: sane size.
OTHER_METRIC = Bound(-1e12, 1e12)
