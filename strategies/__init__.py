"""Flower server strategies that aggregate synthetic sets (FedDistill and friends).

- `FedDistill`: clients upload distilled synthetic sets; the server trains on their pool (one-shot or multi-round).
- `FedAvgDistill`: FedAvg whose aggregate is fine-tuned on a pooled synthetic memory (the hybrid).
- `ContinualFedAvg`: FedAvg over a stream of tasks with client replay memories and an optional global distilled
  memory on the server (federated continual learning; `TaskSchedule` says which task each round belongs to).
- `MeteredFedAvg`: Flower's FedAvg with the same byte and failure accounting (the baseline), and
  `MeteredFedMedian`, `MeteredFedTrimmedAvg`, `MeteredKrum`: Flower's robust aggregators likewise.
Every reply crosses one boundary (`strategies.boundary`) before a strategy reads it: a reply that breaks the
protocol is a counted failure, never an exception and never part of an aggregate.
Every strategy keeps `traffic`: uplink/downlink bytes and failures (with reasons) per round.

This package depends on `fedcl` and on Flower; `fedcl`'s core never imports it.
"""

from fedcl.flower.protocol import DISTILL_MESSAGE
from strategies.continual import ContinualFedAvg, TaskSchedule
from strategies.fed_distill import FedDistill
from strategies.fedavg import AGGREGATORS, MeteredFedAvg, MeteredFedMedian, MeteredFedTrimmedAvg, MeteredKrum
from strategies.hybrid import FedAvgDistill
from strategies.memory import MemoryTraining, ServerTraining, SyntheticMemory, train_on_memory
from strategies.metered import Metered
from strategies.traffic import MeteredGrid, RoundTraffic, TrafficLog

__all__ = ["AGGREGATORS", "DISTILL_MESSAGE", "ContinualFedAvg", "FedAvgDistill", "FedDistill", "MemoryTraining",
           "Metered",
           "MeteredFedAvg", "MeteredFedMedian", "MeteredFedTrimmedAvg", "MeteredGrid", "MeteredKrum", "RoundTraffic",
           "ServerTraining", "SyntheticMemory", "TaskSchedule", "TrafficLog", "train_on_memory"]
