"""Hostile-reply fuzzing of every strategy's `aggregate_train`: Hypothesis builds a round of replies in which some
clients are honest and others send random metric names, types and values, arrays of the wrong shape, dtype or
values, synthetic sets with wild pixels, labels or metadata, and missing or extra records.  Whatever arrives, the
strategy never raises, never returns a non-finite model, and counts every reply it leaves out as a failure.

Each strategy is driven both after its own `configure_train` (replies are checked against the model it sent) and
without it, as Flower's tests and wrappers may do (replies are checked against each other).  CI runs a small
derandomised set; `simulations/bench_reply_fuzz.py` runs thousands of cases per strategy (environment:
`FEDCL_FUZZ_CASES` cases, fresh random inputs with `FEDCL_FUZZ_RANDOM=1`, and with `FEDCL_FUZZ_REPORT=FILE` the
cases, replies and failures counted per strategy are written to FILE as JSON).
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcl.flower.protocol import (
    ARRAYS,
    DISTILL_MESSAGE,
    MAX_REASON_CHARS,
    MEMORY_IMAGES,
    METRICS,
    NUM_EXAMPLES,
    SYNTHETIC_IMAGES,
    SYNTHETIC_KEY,
    TASK,
)
from fedcl.flower.records import model_to_arrays, synset_to_record
from fedcl.models import create_model
from fedcl.synthetic import SyntheticMeta, SyntheticSet
from fedcl.train import TrainConfig
from strategies import (
    ContinualFedAvg,
    FedAvgDistill,
    FedDistill,
    MeteredFedAvg,
    MeteredFedMedian,
    MeteredFedTrimmedAvg,
    MeteredKrum,
    TaskSchedule,
)

CASES = int(os.environ.get("FEDCL_FUZZ_CASES", "40"))
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=os.environ.get("FEDCL_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck), database=None)
SHAPE, CLASSES = (1, 8, 8), 4
MODEL_CFG = {"width": 4, "depth": 1}
TINY_TRAINING = TrainConfig(epochs=1, batch_size=32, dsa=False)
GLOBAL = model_to_arrays(create_model("convnet", SHAPE, CLASSES, **MODEL_CFG))

#: Values a hostile client may put in a metric (MetricRecord holds ints, floats and lists of them).
METRIC_VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([math.nan, math.inf, -math.inf, 1e12, 10**12, -1, 0]),
                          st.lists(st.integers(-10, 10), max_size=3), st.lists(st.floats(), max_size=3))
METRIC_NAMES = st.one_of(st.sampled_from([NUM_EXAMPLES, SYNTHETIC_IMAGES, MEMORY_IMAGES, TASK, "train-loss",
                                          "rehearsal-examples", "epsilon-spent"]), st.text(min_size=1, max_size=12))
FILLS = st.sampled_from([0.0, 1.0, 1e30, -1e30, math.nan, math.inf])
DTYPES = st.sampled_from(["float32", "float16", "float64", "int64", "uint8", "bool"])


def _weights(scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord({name: Array((array.numpy() * scale).astype(array.numpy().dtype))
                        for name, array in GLOBAL.items()})


def _synset(n_per_class: int = 2) -> SyntheticSet:
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    meta = SyntheticMeta(method="dm", n_classes=CLASSES, ipc=n_per_class, mean=(0.5,), std=(0.25,))
    return SyntheticSet(torch.randn(len(labels), *SHAPE).clamp(-2, 2), labels, meta)


def _reply(content: RecordDict, node: int, message_type: str, error: bool = False) -> SimpleNamespace:
    """What a strategy reads of a Flower reply: content, error flag, source node and message type."""
    return SimpleNamespace(content=content, has_error=lambda: error, has_content=lambda: not error,
                           error=SimpleNamespace(code=0, reason="client crashed") if error else None,
                           metadata=SimpleNamespace(src_node_id=node, message_type=message_type))


def honest_update(node: int) -> SimpleNamespace:
    metrics = MetricRecord({NUM_EXAMPLES: 10 + node, "train-loss": 0.5})
    return _reply(RecordDict({ARRAYS: _weights(1.0 + 0.01 * node), METRICS: metrics}), node, "train")


def honest_upload(node: int, *, continual: bool = False) -> SimpleNamespace:
    content = synset_to_record(_synset())
    metrics = {NUM_EXAMPLES: 20, SYNTHETIC_IMAGES: 2 * CLASSES}
    if continual:
        metrics.update({MEMORY_IMAGES: 2 * CLASSES, TASK: 0})
    content[METRICS] = MetricRecord(metrics)
    return _reply(content, node, DISTILL_MESSAGE)


@st.composite
def hostile(draw: st.DrawFn, honest: SimpleNamespace) -> SimpleNamespace:
    """`honest` (copied) with one to three random mutations of its records, metrics, arrays or synthetic set."""
    content = RecordDict({key: value for key, value in honest.content.items()})
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["metric", "drop-metric", "array", "drop-array", "extra-record",
                                     "drop-record", "pixels", "labels", "meta", "error"]))
        if kind == "error":
            return _reply(content, honest.metadata.src_node_id, honest.metadata.message_type, error=True)
        _mutate(draw, content, kind)
    return _reply(content, honest.metadata.src_node_id, honest.metadata.message_type)


def _mutate(draw: st.DrawFn, content: RecordDict, kind: str) -> None:
    arrays_key = draw(st.sampled_from(sorted(content.array_records) or [ARRAYS]))
    if kind == "metric" and METRICS in content.metric_records:
        metrics = dict(content.metric_records[METRICS])
        metrics[draw(METRIC_NAMES)] = draw(METRIC_VALUES)
        content[METRICS] = _metric_record(metrics)
    elif kind == "drop-metric" and METRICS in content.metric_records and content.metric_records[METRICS]:
        metrics = dict(content.metric_records[METRICS])
        metrics.pop(draw(st.sampled_from(sorted(metrics))))
        content[METRICS] = MetricRecord(metrics)
    elif kind == "array" and arrays_key in content.array_records:
        record = dict(content.array_records[arrays_key])
        name = draw(st.sampled_from(sorted(record) + ["extra"]))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        with np.errstate(invalid="ignore"):  # NaN and Inf cast to an integer dtype: whatever the cast gives
            record[name] = Array(np.full(shape, draw(FILLS)).astype(draw(DTYPES)))
        content[arrays_key] = ArrayRecord(record)
    elif kind == "drop-array" and arrays_key in content.array_records:
        content.pop(arrays_key)
    elif kind == "extra-record":
        extra = draw(st.sampled_from([ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))}),
                                      ConfigRecord({"x": 1}), MetricRecord({"x": 1})]))
        content[draw(st.sampled_from(["extra", ARRAYS, SYNTHETIC_KEY, "config"]))] = extra
    elif kind == "drop-record" and len(content):
        content.pop(draw(st.sampled_from(sorted(content.keys()))))
    elif kind in ("pixels", "labels", "meta") and SYNTHETIC_KEY in content.array_records:
        content.update(_bad_synset(draw, kind))


def _metric_record(metrics: dict) -> MetricRecord | ConfigRecord:
    """The metrics as a MetricRecord, or as a ConfigRecord when a value is one a MetricRecord refuses."""
    try:
        return MetricRecord(metrics)
    except (TypeError, ValueError):
        return ConfigRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float, list))})


def _bad_synset(draw: st.DrawFn, kind: str) -> RecordDict:
    """A synthetic-set record whose pixels, labels or metadata are hostile (built past the sender's checks)."""
    honest = synset_to_record(_synset())
    record = dict(honest.array_records[SYNTHETIC_KEY])
    if kind == "pixels":
        record["images"] = Array(np.full((2 * CLASSES, *SHAPE), draw(FILLS), dtype=np.float32))
    elif kind == "labels":
        record["labels"] = Array(np.full(2 * CLASSES, draw(st.integers(-2**40, 2**40)), dtype=np.int64))
    else:
        meta = draw(st.text(max_size=40) | st.just('{"n_classes": 1e30}') | st.just("[]"))
        return RecordDict({SYNTHETIC_KEY: ArrayRecord(record), next(iter(honest.config_records)):
                           ConfigRecord({"meta": meta})})
    return RecordDict({SYNTHETIC_KEY: ArrayRecord(record)})


def _weight_strategy(cls: type) -> object:
    return cls(min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)


def _distill_options() -> dict:
    return {"image_shape": SHAPE, "n_classes": CLASSES, "model_cfg": MODEL_CFG, "device": "cpu",
            "min_available_nodes": 1, "min_train_nodes": 1, "fraction_evaluate": 0.0}


#: name -> (make the strategy, the round to aggregate, an honest reply of that round by node).
STRATEGIES = {
    "fedavg": (lambda: _weight_strategy(MeteredFedAvg), 1, honest_update),
    "fedmedian": (lambda: _weight_strategy(MeteredFedMedian), 1, honest_update),
    "fedtrimmedavg": (lambda: _weight_strategy(MeteredFedTrimmedAvg), 1, honest_update),
    "krum": (lambda: _weight_strategy(MeteredKrum), 1, honest_update),
    "fed-distill": (lambda: FedDistill(**_distill_options(), train_config=TINY_TRAINING), 1, honest_upload),
    "hybrid-weights": (lambda: FedAvgDistill(**_distill_options(), finetune_config=TINY_TRAINING), 1,
                       honest_update),
    "hybrid-uploads": (lambda: FedAvgDistill(**_distill_options(), finetune_config=TINY_TRAINING), 1,
                       honest_upload),
    "continual-weights": (lambda: ContinualFedAvg(**_distill_options(), schedule=TaskSchedule(1, 2, True)), 1,
                          honest_update),
    "continual-uploads": (lambda: ContinualFedAvg(**_distill_options(), schedule=TaskSchedule(1, 2, True),
                                                  server_memory=True, finetune_config=TINY_TRAINING), 2,
                          lambda node: honest_upload(node, continual=True)),
}


@st.composite
def rounds(draw: st.DrawFn, honest_reply) -> tuple[list[SimpleNamespace], int, bool]:
    """(replies, how many were mutated, whether the strategy sent the model first): 1-4 clients, at least one
    of them hostile."""
    n = draw(st.integers(1, 4))
    hostile_nodes = set(draw(st.lists(st.integers(1, n), min_size=1, max_size=n, unique=True)))
    replies = [draw(hostile(honest_reply(node))) if node in hostile_nodes else honest_reply(node)
               for node in range(1, n + 1)]
    return replies, len(hostile_nodes), draw(st.booleans())


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_hostile_replies_never_crash_a_strategy_or_poison_its_model(name):
    make, server_round, honest_reply = STRATEGIES[name]
    counts = {"cases": 0, "replies": 0, "hostile": 0, "failures": 0, "models": 0}

    @FUZZ
    @given(rounds(honest_reply))
    def one_round(case):
        replies, n_hostile, sent_model = case
        strategy = make()
        if sent_model:
            grid = SimpleNamespace(get_node_ids=lambda: [r.metadata.src_node_id for r in replies])
            list(strategy.configure_train(server_round, _weights(), ConfigRecord({TASK: 0}), grid))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            for key, array in arrays.items():
                values = array.numpy()
                assert np.isfinite(values).all(), key
        failures = strategy.traffic[server_round].failures
        assert len(failures) <= sum(not r.has_error() for r in replies)  # at most one failure per reply
        assert all(len(reason) <= MAX_REASON_CHARS for _, reason in failures)
        for key, value in (("cases", 1), ("replies", len(replies)), ("hostile", n_hostile),
                           ("failures", len(failures)), ("models", int(arrays is not None))):
            counts[key] += value

    one_round()
    _report(name, counts)


def _report(name: str, counts: dict[str, int]) -> None:
    """Add this strategy's counts to the JSON file `FEDCL_FUZZ_REPORT` names (nothing when unset)."""
    path = os.environ.get("FEDCL_FUZZ_REPORT")
    if path:
        report = json.loads(open(path).read()) if os.path.exists(path) else {}
        report[name] = counts
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


@pytest.mark.parametrize("cls", [MeteredFedAvg, MeteredKrum])
def test_a_weight_reply_under_other_record_names_is_a_failure(cls):
    """Found by the fuzzer: Flower aggregates only replies whose ArrayRecord and MetricRecord names agree."""
    strategy = _weight_strategy(cls)
    renamed = honest_update(3)
    renamed.content = RecordDict({"weights": renamed.content[ARRAYS], METRICS: renamed.content[METRICS]})
    arrays, _ = strategy.aggregate_train(1, [honest_update(1), honest_update(2), renamed])
    assert arrays is not None and [node for node, _ in strategy.traffic[1].failures] == [3]
    assert "differ from the other replies'" in strategy.traffic[1].failures[0][1]
