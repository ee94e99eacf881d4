"""Compare federated continual strategies under one protocol: every strategy x seed is one Flower simulation.

Shared by `fedcl demo` (digits, one seed) and `simulations/bench_fcl.py` (Fashion-MNIST, several seeds).  Writes
OUT/<strategy>-seed<s>/ (each run's own tasks.csv, rounds.csv, tasks.png), OUT/tasks.csv (every run's task rows
with strategy and seed columns), OUT/accuracy.png (average accuracy after each task, mean over seeds),
OUT/summary.md and OUT/summary.json (the comparison table).  A finished run also writes OUT/<strategy>-seed<s>/
finished.json (its settings); a later invocation with the same settings reuses that run instead of repeating it, so
a protocol of many hour-long runs can be completed over several invocations, or split across processes by seed.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.common.logger import FLOWER_LOGGER
from tqdm.auto import tqdm

from fedcl.files import atomic_write, write_csv, write_json
from fedcl.flower.results import plot_tasks, read_csv, task_summary, task_table, total
from fedcl.flower.settings import FedSettings, changed_settings
from fedcl.flower.simulation import simulate, write_partitions
from fedcl.runtime import code_version

#: The strategies of the comparison, in table order, with their descriptions.
LABELS = {"fedavg": "naive federated fine-tuning (no memory)",
          "fedavg-replay": "random real-image replay",
          "fedavg-herding": "herding real-image replay",
          "fed-distill": "distilled replay (DM)",
          "fed-distill-server": "distilled replay + server memory"}

#: The file a finished run leaves in its folder: its settings, so that a later invocation can reuse the run.
FINISHED = "finished.json"


def run_comparison(base: FedSettings, n_clients: int, strategies: list[str], seeds: list[int],
                   out: str | Path, engine: str = "local", verbose: bool = False) -> list[dict[str, Any]]:
    """Run every strategy with every seed on the simulation `engine` ("local" or "ray", see `simulate`); write the
    per-run and combined results; return the table rows (per strategy: (mean, std) over seeds of final average
    accuracy, forgetting, BWT and bytes).  A progress bar counts the runs; Flower's per-round log is shown only
    with `verbose`."""
    out = Path(out)
    runs: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in strategies}
    combined = []
    bar = tqdm(total=len(seeds) * len(strategies), desc="federated runs", unit="run")
    with bar, _flower_log_level(logging.INFO if verbose else logging.WARNING):
        for seed in seeds:
            for strategy in strategies:
                bar.set_postfix_str(f"{strategy}, seed {seed}")
                settings = replace(base, scenario="continual", strategy=strategy, seed=seed, min_nodes=n_clients,
                                   out_dir=str(out / f"{strategy}-seed{seed}"))
                reused = _finished(settings, n_clients)
                if not reused:
                    write_partitions(settings, n_clients)
                    simulate(settings, n_clients, engine=engine, verbose=verbose)
                    write_json(Path(settings.out_dir) / FINISHED, {"settings": settings.to_config(),
                                                                   "clients": n_clients, "code": code_version()})
                rows = read_csv(Path(settings.out_dir) / "tasks.csv")
                runs[strategy].append(rows)
                combined += [{"strategy": strategy, "seed": seed, **r} for r in rows]
                final = 100 * float(rows[-1]["avg_accuracy"])
                failed = sum(int(r["clients_failed"]) for r in rows)
                bar.write(f"{strategy} seed {seed}: final average accuracy {final:.2f} %"
                          f"{f', {failed} client replies failed (see its rounds.csv)' if failed else ''}"
                          f"{' (from an earlier invocation)' if reused else ''}")
                bar.update()
    write_csv(combined, out / "tasks.csv", ("strategy", "seed"))
    plot_tasks({LABELS.get(s, s): r for s, r in runs.items()}, out / "accuracy.png",
               title=f"{base.dataset}: {n_clients} clients, {base.tasks} tasks, {len(seeds)} seed(s)")
    table = [_mean_std(strategy, [task_summary(r, strategy) for r in rows]) for strategy, rows in runs.items()]
    write_json(out / "summary.json", {"settings": base.to_config(), "clients": n_clients, "seeds": seeds,
                                      "table": table})
    atomic_write(out / "summary.md", lambda f: f.write(task_table(table).encode() + b"\n"))
    return table


def _finished(settings: FedSettings, n_clients: int) -> bool:
    """Whether the run of `settings` already finished in an earlier invocation: its finished.json names the same
    code version (`fedcl.runtime.code_version`), settings (apart from its own folder, and those the strategy never
    reads) and number of clients, so a finished run copied into another OUT counts there too (a run of other code
    or settings in that folder is repeated, and overwritten)."""
    marker = Path(settings.out_dir) / FINISHED
    if not marker.exists():
        return False
    saved = json.loads(marker.read_text())
    same = saved.get("clients") == n_clients and saved.get("code") == code_version()
    return same and not changed_settings(saved.get("settings", {}), settings.to_config(),
                                         ignore=settings.unread_keys | {"out-dir"})


@contextmanager
def _flower_log_level(level: int) -> Iterator[None]:
    """Set the level of Flower's logger for the duration of the block, and drop its warning that federated
    evaluation is skipped: the comparison evaluates the global model on the server, by design."""
    previous = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(level)
    FLOWER_LOGGER.addFilter(_no_skipped_evaluation_warning)
    try:
        yield
    finally:
        FLOWER_LOGGER.setLevel(previous)
        FLOWER_LOGGER.removeFilter(_no_skipped_evaluation_warning)


def _no_skipped_evaluation_warning(record: logging.LogRecord) -> bool:
    return "fraction_evaluate is set to 0.0" not in record.getMessage()


def _mean_std(strategy: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: every metric as (mean, population std) over the seeds' summaries, each seed's final average
    accuracy, and the near-copies the audit flagged in the uploads of all seeds ("" when nothing was audited)."""
    row: dict[str, Any] = {"run": strategy, "seeds": len(summaries),
                           "seed_accuracy": [float(s["avg_accuracy"]) for s in summaries],
                           "near_copies": total(s.get("near_copies", "") for s in summaries)}
    for key in ("avg_accuracy", "forgetting", "bwt", "uplink_bytes", "downlink_bytes"):
        values = [float(s[key]) for s in summaries]
        row[key] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    return row


def print_comparison(table: list[dict[str, Any]]) -> None:
    """Print the table with each strategy's description, then, for each distilled strategy against each
    real-image replay that ran, who wins and by how much on each seed."""
    print(task_table([{**row, "run": f"{row['run']}: {LABELS.get(row['run'], '')}"} for row in table]))
    for line in verdicts(table):
        print(line)


def verdicts(table: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per (distilled strategy, real-image replay) pair in the table: the gap in final average
    accuracy on the mean and on each seed, and whether the distilled memory wins on every seed."""
    by_name = {row["run"]: row for row in table}
    lines = []
    for ours in ("fed-distill", "fed-distill-server"):
        for theirs in ("fedavg-replay", "fedavg-herding"):
            if {ours, theirs} <= set(by_name):
                lines.append(_verdict(by_name[ours], by_name[theirs]))
    return lines


def _verdict(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    gaps = [100 * (a - b) for a, b in zip(ours["seed_accuracy"], theirs["seed_accuracy"])]
    mean = 100 * (ours["avg_accuracy"][0] - theirs["avg_accuracy"][0])
    wins = sum(gap > 0 for gap in gaps)
    outcome = ("wins on every seed" if wins == len(gaps) else "loses on every seed" if wins == 0
               else f"wins on {wins} of {len(gaps)} seeds")
    per_seed = ", ".join(f"{gap:+.2f}" for gap in gaps)
    return (f"{ours['run']} - {theirs['run']}: {mean:+.2f} points of final average accuracy (seeds: {per_seed}); "
            f"{ours['run']} {outcome} (same client memory: ipc images per class)")
