"""The server side of federated continual learning: schedule the tasks, score the global model, write tasks.csv.

After every round the global model is tested on the server's test images of every class group (task) the
federation has met so far (`fedcl.data.streams.groups_seen`); the round's `accuracy` is their mean.  The scores
after the last round of each task form the accuracy matrix from which `fedcl.continual_metrics` computes average
accuracy, forgetting and backward transfer per task; bytes up and down are summed over each task's rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fedcl.continual_metrics import step_metrics
from fedcl.data import ImageDataset, load_dataset
from fedcl.data.streams import class_groups, groups_seen
from fedcl.flower.loop import sampling, start_strategy, upload_audit
from fedcl.flower.records import pixel_window
from fedcl.flower.results import total, write_task_results
from fedcl.flower.settings import FedSettings
from fedcl.runtime import resolve_device
from fedcl.train import TrainConfig, evaluate_model
from strategies import ContinualFedAvg, TaskSchedule


def build_continual_strategy(settings: FedSettings, dataset: ImageDataset) -> ContinualFedAvg:
    """The continual strategy the settings name (memory and server memory follow from `settings.strategy`)."""
    schedule = TaskSchedule(settings.rounds_per_task, settings.tasks,
                            distill_round=settings.memory_distiller is not None)
    finetune = TrainConfig(epochs=settings.finetune_epochs, lr=settings.server_lr,
                           batch_size=settings.server_batch_size, decay_at=1.0, dsa=True)
    return ContinualFedAvg(schedule=schedule, image_shape=dataset.image_shape, n_classes=dataset.n_classes,
                           server_memory=settings.server_memory, model=settings.model, model_cfg=settings.model_cfg,
                           distill_with_model=settings.label_temperature > 0, rehearse=settings.rehearses,
                           finetune_config=finetune, slice_ipc=settings.ipc,
                           max_images_per_client=settings.ipc * dataset.n_classes,
                           pixel_range=pixel_window(dataset.mean, dataset.std), device=settings.device,
                           seed=settings.seed, audit=upload_audit(settings, dataset) if settings.server_memory
                           else None, **sampling(settings, dataset))


def group_scorer(settings: FedSettings, dataset: ImageDataset,
                 schedule: TaskSchedule) -> Callable[[nn.Module, int], dict[str, float]]:
    """score(net, round): accuracy on each class group met by the round's task ("group-<g>") and their mean."""
    device = resolve_device(settings.device)
    groups = class_groups(dataset.n_classes, settings.tasks, settings.seed)
    test = [torch.isin(dataset.test_labels, torch.tensor(classes)) for classes in groups]

    def score(net: nn.Module, server_round: int) -> dict[str, float]:
        seen = groups_seen(settings.tasks, settings.min_nodes, schedule.task_of(server_round), settings.task_order,
                           settings.seed)
        scores = {f"group-{g}": evaluate_model(net, dataset.test_images[test[g]], dataset.test_labels[test[g]],
                                               device=device) for g in seen}
        return {"accuracy": sum(scores.values()) / len(scores), **scores}

    return score


def task_rows(round_rows: list[dict[str, Any]], scores: dict[int, Any], schedule: TaskSchedule,
              n_tasks: int) -> list[dict[str, Any]]:
    """One row per task: its metrics after its last round, its traffic, and the per-group accuracies."""
    matrix, rows, cumulative = [], [], 0
    for task in range(n_tasks):
        last = schedule.last_round(task)
        matrix.append({int(k.split("-")[1]): float(v) for k, v in scores[last].items() if k.startswith("group-")})
        in_task = [r for r in round_rows if schedule.task_of(int(r["round"])) == task and int(r["round"]) >= 1]
        uplink = sum(int(r["uplink_bytes"]) for r in in_task)
        cumulative += uplink
        rows.append({"task": task, "round": last, "uplink_bytes": uplink,
                     "near_copies": total(r["near_copies"] for r in in_task),
                     "epsilon": next((r["epsilon"] for r in reversed(in_task) if r["epsilon"] != ""), ""),
                     "downlink_bytes": sum(int(r["downlink_bytes"]) for r in in_task),
                     "cumulative_uplink_bytes": cumulative,
                     "clients_failed": sum(int(r["clients_failed"]) for r in in_task),
                     **{f"acc_task{g}": round(a, 6) for g, a in sorted(matrix[-1].items())}})
    for row, metrics in zip(rows, step_metrics(matrix)):
        row.update({k: round(v, 6) for k, v in metrics.items()})
    return rows


def run_continual(grid: Grid, settings: FedSettings) -> list[dict[str, Any]]:
    """Run the continual scenario; write rounds.csv, tasks.csv, tasks.png and the summary; return the task rows."""
    dataset = load_dataset(settings.dataset, settings.data_root or None)
    strategy = build_continual_strategy(settings, dataset)
    schedule = strategy.schedule
    round_rows, result = start_strategy(grid, settings, strategy, dataset, schedule.num_rounds,
                                        group_scorer(settings, dataset, schedule))
    rows = task_rows(round_rows, result.evaluate_metrics_serverapp, schedule, settings.tasks)
    summary = write_task_results(rows, round_rows, settings.out_dir, settings.strategy)
    log(INFO, "fedcl: %s -> final average accuracy %.4f, forgetting %.4f, uplink %d bytes; results in %s",
        settings.strategy, summary["avg_accuracy"], summary["forgetting"], summary["uplink_bytes"], settings.out_dir)
    return rows
