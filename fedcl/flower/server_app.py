"""The fedcl ServerApp: build the strategy named in the run config, run it, write per-round results.

`flwr run` loads `app` (settings from `[tool.flwr.app.config]` and `--run-config`); `fedcl simulate` and the
benchmark build an app with fixed settings through `make_server_app`.  The global model is evaluated on the
server's copy of the test split before training and after every round (the `accuracy` column); after every
round the server also writes its checkpoint, from which `resume` continues a run that was interrupted.  Runs with
`scenario="continual"` go to `fedcl.flower.continual_server` (task schedule, per-task scores, tasks.csv).
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedcl.data import ImageDataset, load_dataset
from fedcl.distill import supports_guide
from fedcl.flower.continual_server import run_continual
from fedcl.flower.loop import initial_model, sampling, start_strategy, starting_point, upload_audit
from fedcl.flower.records import model_to_arrays, pixel_window
from fedcl.flower.results import write_results
from fedcl.flower.settings import FedSettings
from fedcl.runtime import resolve_device
from fedcl.train import TrainConfig, evaluate_model
from strategies import AGGREGATORS, FedAvgDistill, FedDistill


def build_strategy(settings: FedSettings, dataset: ImageDataset) -> Strategy:
    """The strategy `settings.behaviour` names, configured from the settings."""
    if settings.behaviour.server == "fedavg":
        robust = {"krum": {"num_malicious_nodes": max(0, (settings.min_nodes - 3) // 2)}}
        return AGGREGATORS[settings.aggregation](**sampling(settings, dataset),
                                                 **robust.get(settings.aggregation, {}))
    common = dict(image_shape=dataset.image_shape, n_classes=dataset.n_classes, model=settings.model,
                  model_cfg=settings.model_cfg, max_images_per_client=settings.ipc * dataset.n_classes,
                  pixel_range=pixel_window(dataset.mean, dataset.std), memory=settings.memory,
                  screen=settings.screen, screen_threshold=settings.screen_threshold, device=settings.device,
                  seed=settings.seed, audit=upload_audit(settings, dataset), **sampling(settings, dataset))
    server_training = dict(lr=settings.server_lr, batch_size=settings.server_batch_size, dsa=True)
    if settings.behaviour.server == "fed-distill":
        return FedDistill(train_config=TrainConfig(epochs=settings.server_epochs, **server_training),
                          guide_with_global=supports_guide(settings.client_distiller), **common)
    return FedAvgDistill(finetune_config=TrainConfig(epochs=settings.finetune_epochs, decay_at=1.0, **server_training),
                         **common)


def run_federation(grid: Grid, settings: FedSettings) -> list[dict[str, Any]]:
    """Run `settings.num_rounds` rounds of the configured strategy; write and return the per-round rows.

    After every completed round the server checkpoints itself under out_dir (`fedcl.flower.checkpoint`) and
    rewrites rounds.csv; with `settings.resume` it continues from that checkpoint's next round.  The continual
    scenario is run by `fedcl.flower.continual_server.run_continual`.
    """
    if settings.scenario == "continual":
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


def resume_round(settings: FedSettings) -> int:
    """The last completed round a run with `settings` would resume after (0: none, it starts afresh); raises
    CheckpointError if the checkpoint cannot be resumed.  `fedcl simulate --resume` checks this before it starts
    the simulation, so a bad checkpoint is a clear error instead of a failed ServerApp inside Ray."""
    dataset = load_dataset(settings.dataset, settings.data_root or None)
    _, rows, _ = starting_point(settings, build_strategy(settings, dataset),
                                model_to_arrays(initial_model(settings, dataset)))
    return max(0, len(rows) - 1)


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    """A ServerApp that runs with `settings` (None: read them from the run config, as under `flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings or FedSettings.from_config(context.run_config))

    return server


app = make_server_app()
