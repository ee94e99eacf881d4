"""The round loop every fedcl ServerApp runs: the seeded initial model, scoring after every round, rounds.csv rows,
the server checkpoint and resuming from it.

`fedcl.flower.server_app` (the standard scenario) and `fedcl.flower.continual_server` (the continual one) both
start their strategy here, so neither imports the other's wiring.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedcl.audit import Auditor
from fedcl.data import ImageDataset
from fedcl.flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedcl.flower.protocol import LOCAL_ACCURACY
from fedcl.flower.records import arrays_to_model, model_to_arrays
from fedcl.flower.results import write_rounds_csv
from fedcl.flower.settings import FedSettings
from fedcl.models import create_model
from fedcl.runtime import seeded
from fedcl.synthetic import SyntheticSet
from strategies import Metered, TrafficLog


def sampling(settings: FedSettings, dataset: ImageDataset) -> dict[str, Any]:
    """FedAvg's sampling options and `Metered`'s weight bound, as the settings and the dataset give them (no
    client holds more examples than the training split): once min_nodes are connected, each round samples the
    fractions of them (at least one node), so fraction_train < 1 samples clients."""
    return dict(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                min_train_nodes=1, min_evaluate_nodes=1,
                min_available_nodes=settings.min_nodes, max_examples=len(dataset.train_labels))


def start_strategy(grid: Grid, settings: FedSettings, strategy: Metered, dataset: ImageDataset, num_rounds: int,
                   score: Callable[[nn.Module, int], dict[str, float]], *,
                   checkpoint: bool = False) -> tuple[list[dict[str, Any]], Result]:
    """Run `strategy` for `num_rounds` from the seeded initial model, scoring the global model with
    `score(net, round)` (which must return at least "accuracy") before training and after every round.

    With `checkpoint`, every completed round is checkpointed under out_dir (`fedcl.flower.checkpoint`) and
    rounds.csv rewritten, and `settings.resume` continues from the checkpoint's next round (the rounds before it
    are not scored again: their accuracy comes from the checkpoint).
    Returns the rows of rounds.csv and Flower's Result (whose evaluate_metrics_serverapp hold every score)."""
    model = initial_model(settings, dataset)
    initial, rows, traffic = starting_point(settings, strategy, model_to_arrays(model)) if checkpoint \
        else (model_to_arrays(model), [], None)
    start = time.perf_counter() - (float(rows[-1]["seconds"]) if rows else 0.0)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if rows and server_round <= rows[-1]["round"]:  # resumed: this model was evaluated before the restart
            return MetricRecord({"accuracy": float(rows[server_round]["accuracy"])})
        scores = score(arrays_to_model(model, arrays), server_round)
        rows.append(_row(server_round, scores["accuracy"], strategy, rows, time.perf_counter() - start))
        if checkpoint and server_round > 0:
            save_checkpoint(settings.out_dir, settings=settings.to_config(), server_round=server_round,
                            arrays=arrays, rows=rows, traffic=strategy.traffic,
                            memory=getattr(strategy, "memory", None))
            write_rounds_csv(rows, Path(settings.out_dir) / "rounds.csv")
        return MetricRecord(scores)

    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, timeout=settings.round_timeout,
                            train_config=ConfigRecord(settings.to_config()),
                            evaluate_config=ConfigRecord(settings.to_config()), evaluate_fn=evaluate,
                            first_round=len(rows) or 1, traffic=traffic)  # rows hold rounds 0..k after round k
    return rows, result


def upload_audit(settings: FedSettings, dataset: ImageDataset) -> Callable[[SyntheticSet], int] | None:
    """The near-copy count of an uploaded set against the training split (`fedcl.audit.Auditor`), or None when
    the run's `audit` is off."""
    return Auditor(dataset, device=settings.device).near_copies if settings.audit else None


def initial_model(settings: FedSettings, dataset: ImageDataset) -> torch.nn.Module:
    """The global model at its seeded initialisation."""
    with seeded(settings.seed):
        return create_model(settings.model, dataset.image_shape, dataset.n_classes, **settings.model_cfg)


def starting_point(settings: FedSettings, strategy: Strategy,
                    initial: ArrayRecord) -> tuple[ArrayRecord, list[dict[str, Any]], TrafficLog | None]:
    """(arrays, rows so far, traffic so far) to start from: the initial model, or with `settings.resume` the
    checkpoint under out_dir, whose pooled memory is restored into the strategy's."""
    if not settings.resume:
        return initial, [], None
    checkpoint = load_checkpoint(settings.out_dir, settings=settings.to_config(), reference=initial,
                                 memory=getattr(strategy, "memory", None))
    if checkpoint is None:
        log(INFO, "fedcl: no checkpoint under %s; starting from round 1", settings.out_dir)
        return initial, [], None
    if checkpoint.server_round > settings.num_rounds:
        raise CheckpointError(f"the checkpoint is at round {checkpoint.server_round}, beyond num-rounds "
                              f"{settings.num_rounds}")
    log(INFO, "fedcl: resuming after round %s from %s", checkpoint.server_round, settings.out_dir)
    return checkpoint.arrays, checkpoint.rows, checkpoint.traffic


def _row(server_round: int, accuracy: float, strategy: Metered, rows: list[dict[str, Any]],
         seconds: float) -> dict[str, Any]:
    """The rounds.csv row of a completed round: server-side test accuracy, the clients' mean local accuracy (when
    they evaluated), traffic, failures, the near-copies among the round's uploads (empty: none audited) and the
    largest privacy budget a client has spent so far (empty: DP off)."""
    t = strategy.traffic[server_round]
    cumulative = (rows[-1]["cumulative_uplink_bytes"] if rows else 0) + t.uplink_bytes
    local = strategy.client_evaluation.get(server_round, {}).get(LOCAL_ACCURACY)
    memory = getattr(strategy, "memory", None)
    near_copies = "" if memory is None else memory.near_copies.get(server_round, "")
    epsilon = round(max(memory.epsilon.values()), 6) if memory is not None and memory.epsilon else ""
    return {"round": server_round, "accuracy": round(float(accuracy), 6),
            "client_accuracy": "" if local is None else round(float(local), 6),
            "uplink_bytes": t.uplink_bytes, "downlink_bytes": t.downlink_bytes, "cumulative_uplink_bytes": cumulative,
            "replies_ok": t.messages_sent - len(t.failures), "clients_failed": len(t.failures),
            "near_copies": near_copies, "epsilon": epsilon,
            "seconds": round(seconds, 3), "failure_reasons": "; ".join(f"node {n}: {why}" for n, why in t.failures)}
