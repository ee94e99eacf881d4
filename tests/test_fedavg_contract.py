"""Every fedcl strategy that averages weights behaves like Flower's own `FedAvg` wherever a FedAvg can be driven:
by Flower's `Strategy.start`, by fedcl's metered `start`, by a hand-written loop of the four round callbacks, and
wrapped by Flower's `DifferentialPrivacyServerSideFixedClipping` (which calls the inner strategy from its own
`start`).  Each runs next to flwr's FedAvg on the same in-process clients, whose replies depend only on what they
receive, and must end at the same global model with the same number of rounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedcl.flower.local_grid import LocalGrid
from fedcl.flower.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from strategies import ContinualFedAvg, FedAvgDistill, MeteredFedAvg, TaskSchedule

ROUNDS, NODES = 3, 4
SHAPE = {"image_shape": (1, 8, 8), "n_classes": 10}
COMMON = {"min_available_nodes": NODES, "min_train_nodes": NODES, "fraction_evaluate": 0.0}


def clients(message: Message, context: Context) -> Message:
    """A client whose update moves every weight towards its own target and weighs its partition id + 1."""
    pid = int(context.node_config["partition-id"])
    weights = message.content[ARRAYS]["w"].numpy()
    update = weights + 0.5 * (np.float32(pid + 1) - weights)  # never a zero update (Flower's clipping divides)
    return Message(content=RecordDict({ARRAYS: ArrayRecord({"w": Array(update.astype(np.float32))}),
                                       METRICS: MetricRecord({NUM_EXAMPLES: pid + 1})}), reply_to=message)


def start_arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})


#: fedcl's weight-averaging strategies, made to average weights every round (no distillation round).
FEDCL = {
    "metered-fedavg": lambda: MeteredFedAvg(**COMMON),
    "continual": lambda: ContinualFedAvg(**SHAPE, **COMMON, schedule=TaskSchedule(ROUNDS, 1, False)),
    "hybrid": lambda: FedAvgDistill(**SHAPE, **COMMON, distill_rounds=()),
}


def flowers_start(strategy: Strategy) -> ArrayRecord:
    return Strategy.start(strategy, grid=LocalGrid(clients, NODES), initial_arrays=start_arrays(),
                          num_rounds=ROUNDS).arrays


def own_start(strategy: Strategy) -> ArrayRecord:
    return strategy.start(grid=LocalGrid(clients, NODES), initial_arrays=start_arrays(), num_rounds=ROUNDS).arrays


def hand_loop(strategy: Strategy) -> ArrayRecord:
    grid, arrays = LocalGrid(clients, NODES), start_arrays()
    for server_round in range(1, ROUNDS + 1):
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
    return arrays


def dp_wrapped(strategy: Strategy) -> ArrayRecord:
    wrapper = DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=0.0, clipping_norm=1e6,
                                                         num_sampled_clients=NODES)
    return wrapper.start(grid=LocalGrid(clients, NODES), initial_arrays=start_arrays(), num_rounds=ROUNDS).arrays


DRIVERS = {"flower-start": flowers_start, "hand-loop": hand_loop, "dp-wrapper": dp_wrapped}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("name", sorted(FEDCL))
def test_each_strategy_ends_where_flowers_fedavg_ends(name, driver):
    expected = DRIVERS[driver](FedAvg(**COMMON))["w"].numpy()
    got = DRIVERS[driver](FEDCL[name]())["w"].numpy()
    assert not np.allclose(expected, 0.0)  # the clients moved the model
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(FEDCL))
def test_fedcls_own_start_is_flowers_loop_with_metering(name):
    strategy = FEDCL[name]()
    expected = flowers_start(FedAvg(**COMMON))["w"].numpy()
    np.testing.assert_allclose(own_start(strategy)["w"].numpy(), expected, rtol=1e-6)
    assert [strategy.traffic[r].replies for r in range(1, ROUNDS + 1)] == [NODES] * ROUNDS
    assert all(strategy.traffic[r].uplink_bytes > 0 and not strategy.traffic[r].failures
               for r in range(1, ROUNDS + 1))
