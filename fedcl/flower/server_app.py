"""The fedcl ServerApp: build the strategy named in the run config, run it, write per-round results.

`flwr run` loads `app` (settings from `[tool.flwr.app.config]` and `--run-config`); `fedcl simulate` and the
benchmark build an app with fixed settings through `make_server_app`.  The global model is evaluated on the
server's copy of the test split before training and after every round (the `accuracy` column); after every
round the server also writes its checkpoint, from which `resume` continues a run that was interrupted.  Runs with
`scenario="continual"` go to `fedcl.flower.continual_server` (task schedule, per-task scores, tasks.csv).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedcl.data import ImageDataset, load_dataset
from fedcl.flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedcl.flower.records import arrays_to_model, model_to_arrays
from fedcl.flower.results import write_results, write_rounds_csv
from fedcl.flower.settings import FedSettings
from fedcl.models import create_model
from fedcl.runtime import resolve_device, seeded
from fedcl.train import TrainConfig, evaluate_model
from strategies import FedAvgDistill, FedDistill, Metered, MeteredFedAvg, TrafficLog


def build_strategy(settings: FedSettings, dataset: ImageDataset) -> Strategy:
    """The strategy named by `settings.strategy`, configured from the settings."""
    sampling = dict(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                    min_train_nodes=settings.min_nodes, min_evaluate_nodes=settings.min_nodes,
                    min_available_nodes=settings.min_nodes)
    if settings.strategy == "fedavg":
        return MeteredFedAvg(**sampling)
    common = dict(image_shape=dataset.image_shape, n_classes=dataset.n_classes, model=settings.model,
                  model_cfg=settings.model_cfg, max_images_per_client=settings.ipc * dataset.n_classes,
                  memory=settings.memory, screen=settings.screen, screen_threshold=settings.screen_threshold,
                  device=settings.device, seed=settings.seed, **sampling)
    server_training = dict(lr=settings.server_lr, batch_size=settings.server_batch_size, dsa=True)
    if settings.strategy == "fed-distill":
        return FedDistill(train_config=TrainConfig(epochs=settings.server_epochs, **server_training), **common)
    return FedAvgDistill(finetune_config=TrainConfig(epochs=settings.finetune_epochs, decay_at=1.0, **server_training),
                         **common)


def run_federation(grid: Grid, settings: FedSettings) -> list[dict[str, Any]]:
    """Run `settings.num_rounds` rounds of the configured strategy; write and return the per-round rows.

    After every completed round the server checkpoints itself under out_dir (`fedcl.flower.checkpoint`) and
    rewrites rounds.csv; with `settings.resume` it continues from that checkpoint's next round.  The continual
    scenario is run by `fedcl.flower.continual_server.run_continual`.
    """
    if settings.scenario == "continual":
        from fedcl.flower.continual_server import run_continual

        return run_continual(grid, settings)
    dataset = load_dataset(settings.dataset, settings.data_root or None)
    device = resolve_device(settings.device)

    def score(net: nn.Module, server_round: int) -> dict[str, float]:
        return {"accuracy": evaluate_model(net, dataset.test_images, dataset.test_labels, device=device)}

    rows, _ = start_strategy(grid, settings, build_strategy(settings, dataset), dataset, settings.num_rounds, score,
                             checkpoint=True)
    summary = write_results(rows, settings.out_dir, settings.strategy)
    log(INFO, "fedcl: %s -> final accuracy %.4f, uplink %d bytes; results in %s", settings.strategy,
        summary["final_accuracy"], summary["uplink_bytes"], settings.out_dir)
    return rows


def start_strategy(grid: Grid, settings: FedSettings, strategy: Metered, dataset: ImageDataset, num_rounds: int,
                   score: Callable[[nn.Module, int], dict[str, float]], *,
                   checkpoint: bool = False) -> tuple[list[dict[str, Any]], Result]:
    """Run `strategy` for `num_rounds` from the seeded initial model, scoring the global model with
    `score(net, round)` (which must return at least "accuracy") before training and after every round.

    With `checkpoint`, every completed round is checkpointed under out_dir (`fedcl.flower.checkpoint`) and
    rounds.csv rewritten, and `settings.resume` continues from the checkpoint's next round (the rounds before it
    are not scored again: their accuracy comes from the checkpoint).
    Returns the rows of rounds.csv and Flower's Result (whose evaluate_metrics_serverapp hold every score)."""
    model = _global_model(settings, dataset)
    initial, rows, traffic = _starting_point(settings, strategy, model_to_arrays(model)) if checkpoint \
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


def resume_round(settings: FedSettings) -> int:
    """The last completed round a run with `settings` would resume after (0: none, it starts afresh); raises
    CheckpointError if the checkpoint cannot be resumed.  `fedcl simulate --resume` checks this before it starts
    the simulation, so a bad checkpoint is a clear error instead of a failed ServerApp inside Ray."""
    dataset = load_dataset(settings.dataset, settings.data_root or None)
    _, rows, _ = _starting_point(settings, build_strategy(settings, dataset),
                                 model_to_arrays(_global_model(settings, dataset)))
    return max(0, len(rows) - 1)


def _global_model(settings: FedSettings, dataset: ImageDataset) -> torch.nn.Module:
    """The global model at its seeded initialisation."""
    with seeded(settings.seed):
        return create_model(settings.model, dataset.image_shape, dataset.n_classes, **settings.model_cfg)


def _starting_point(settings: FedSettings, strategy: Strategy,
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
    they evaluated), traffic and failures."""
    t = strategy.traffic[server_round]
    cumulative = (rows[-1]["cumulative_uplink_bytes"] if rows else 0) + t.uplink_bytes
    local = strategy.client_evaluation.get(server_round, {}).get("local-accuracy")
    return {"round": server_round, "accuracy": round(float(accuracy), 6),
            "client_accuracy": "" if local is None else round(float(local), 6),
            "uplink_bytes": t.uplink_bytes, "downlink_bytes": t.downlink_bytes, "cumulative_uplink_bytes": cumulative,
            "replies_ok": t.messages_sent - len(t.failures), "clients_failed": len(t.failures),
            "seconds": round(seconds, 3), "failure_reasons": "; ".join(f"node {n}: {why}" for n, why in t.failures)}


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    """A ServerApp that runs with `settings` (None: read them from the run config, as under `flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings or FedSettings.from_config(context.run_config))

    return server


app = make_server_app()
