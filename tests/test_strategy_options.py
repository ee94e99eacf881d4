"""The distillation strategies take Flower's `FedAvg` options as explicit keywords, with FedAvg's own defaults, and
hand them to FedAvg; a keyword neither they nor FedAvg know is a TypeError."""

from __future__ import annotations

import inspect

import pytest
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedcl.flower.protocol import MAX_COUNT
from strategies import ContinualFedAvg, FedAvgDistill, FedDistill, TaskSchedule

STRATEGIES = [(FedDistill, {}), (FedAvgDistill, {}), (ContinualFedAvg, {"schedule": TaskSchedule(1, 2, True)})]
SHAPE = {"image_shape": (1, 8, 8), "n_classes": 10}


def _fedavg_parameters() -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(FedAvg.__init__).parameters.items() if name != "self"}


@pytest.mark.parametrize("strategy, required", STRATEGIES)
def test_an_unknown_keyword_is_a_type_error(strategy, required):
    with pytest.raises(TypeError, match="unexpected keyword argument 'fraction_fit'"):
        strategy(**SHAPE, **required, fraction_fit=0.5)  # Flower 1.x's old name of fraction_train


@pytest.mark.parametrize("strategy, required", STRATEGIES)
def test_the_fedavg_keywords_are_flowers_with_its_defaults(strategy, required):
    own = inspect.signature(strategy.__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
    for name, flower in _fedavg_parameters().items():
        assert own[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert own[name].default == flower.default, name
    assert own["max_examples"].default == MAX_COUNT
    defaults = strategy(**SHAPE, **required)
    assert {name: getattr(defaults, name) for name in _fedavg_parameters()} == \
        {name: getattr(FedAvg(), name) for name in _fedavg_parameters()}


@pytest.mark.parametrize("strategy, required", STRATEGIES)
def test_the_fedavg_keywords_reach_fedavg(strategy, required):
    def aggregate(records, key):
        return MetricRecord({})

    options = dict(fraction_train=0.5, fraction_evaluate=0.25, min_train_nodes=3, min_evaluate_nodes=4,
                   min_available_nodes=5, weighted_by_key="weight", arrayrecord_key="model",
                   configrecord_key="settings", train_metrics_aggr_fn=aggregate, evaluate_metrics_aggr_fn=aggregate)
    assert set(options) == set(_fedavg_parameters())
    made = strategy(**SHAPE, **required, **options, max_examples=77)
    assert {name: getattr(made, name) for name in options} == options and made.max_examples == 77
    skipped = strategy(**SHAPE, **required, fraction_train=0.0, min_train_nodes=3)
    assert skipped.min_train_nodes == 0  # FedAvg's own __init__ ran: no training, no minimum
