"""Results of a federated run: per-round rows (rounds.csv, accuracy vs rounds and vs uplink MB), per-task rows of a
continual run (tasks.csv, average accuracy vs tasks), summaries and markdown tables."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from fedcl.files import atomic_write, save_figure, write_csv, write_json

#: Columns of rounds.csv (outside checks rely on round, accuracy, uplink_bytes, downlink_bytes, near_copies and
#: epsilon).  accuracy is the global model's on the server's test split; client_accuracy the clients' weighted mean
#: on their own partitions; near_copies the uploaded images the audit flags (empty: nothing audited); epsilon the
#: largest privacy budget a client has spent so far (empty: DP off).
COLUMNS = ("round", "accuracy", "client_accuracy", "uplink_bytes", "downlink_bytes", "cumulative_uplink_bytes",
           "replies_ok", "clients_failed", "near_copies", "epsilon", "seconds", "failure_reasons")
#: Columns of rounds.csv that may be empty.
OPTIONAL_COLUMNS = ("client_accuracy", "near_copies", "epsilon")


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV file written here (rounds.csv, tasks.csv), as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rounds_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def summarise(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Final and best accuracy, total traffic, failures and wall time of one run."""
    last = rows[-1]
    return {"run": label, "rounds": int(last["round"]), "final_accuracy": float(last["accuracy"]),
            "best_accuracy": max(float(r["accuracy"]) for r in rows),
            "uplink_bytes": sum(int(r["uplink_bytes"]) for r in rows),
            "downlink_bytes": sum(int(r["downlink_bytes"]) for r in rows),
            "clients_failed": sum(int(r["clients_failed"]) for r in rows), "seconds": float(last["seconds"]),
            "near_copies": total(r.get("near_copies", "") for r in rows), "epsilon": last.get("epsilon", "")}


def total(values: Any) -> int | str:
    """The sum of the numbers among `values` ("" when there are none: nothing was audited)."""
    numbers = [int(v) for v in values if v != ""]
    return sum(numbers) if numbers else ""


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table of run summaries (accuracy in %, traffic in MB)."""
    lines = ["| run | rounds | final acc. % | best acc. % | uplink MB | downlink MB | failed | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        lines.append(f"| {s['run']} | {s['rounds']} | {100 * s['final_accuracy']:.2f} | {100 * s['best_accuracy']:.2f} "
                     f"| {s['uplink_bytes'] / 1e6:.3f} | {s['downlink_bytes'] / 1e6:.3f} | {s['clients_failed']} "
                     f"| {s['seconds']:.1f} |")
    return "\n".join(lines)


def plot_accuracy(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike[str]) -> Path:
    """Two panels: test accuracy against rounds and against cumulative uplink megabytes, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in runs.items():
        acc = [100 * float(r["accuracy"]) for r in rows]
        by_round.plot([int(r["round"]) for r in rows], acc, marker="o", label=label)
        by_bytes.plot([int(r["cumulative_uplink_bytes"]) / 1e6 for r in rows], acc, marker="o", label=label)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy vs rounds")
    by_bytes.set(xlabel="cumulative uplink (MB)", ylabel="test accuracy (%)", title="accuracy vs uplink")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_bytes.set_xscale("symlog", linthresh=0.1)
    by_round.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def write_results(rows: list[dict[str, Any]], out_dir: str | os.PathLike[str], label: str) -> dict[str, Any]:
    """rounds.csv, accuracy.png, summary.json and summary.md under `out_dir`; returns the summary."""
    out = Path(out_dir)
    write_rounds_csv(rows, out / "rounds.csv")
    plot_accuracy({label: rows}, out / "accuracy.png")
    summary = summarise(rows, label)
    write_json(out / "summary.json", summary)
    atomic_write(out / "summary.md", lambda f: f.write(markdown_table([summary]).encode() + b"\n"))
    return summary


#: Leading columns of tasks.csv (continual scenario; outside checks rely on task, avg_accuracy, forgetting and
#: uplink_bytes); per-group accuracies `acc_task<g>` follow.  Accuracies in [0, 1], traffic per task in bytes.
TASK_COLUMNS = ("task", "round", "avg_accuracy", "forgetting", "bwt", "uplink_bytes", "downlink_bytes",
                "cumulative_uplink_bytes", "clients_failed", "near_copies", "epsilon")



def task_summary(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """A continual run in one row: metrics after the last task, total traffic."""
    last = rows[-1]
    return {"run": label, "tasks": len(rows), "avg_accuracy": float(last["avg_accuracy"]),
            "forgetting": float(last["forgetting"]), "bwt": float(last["bwt"]),
            "uplink_bytes": sum(int(r["uplink_bytes"]) for r in rows),
            "downlink_bytes": sum(int(r["downlink_bytes"]) for r in rows),
            "clients_failed": sum(int(r["clients_failed"]) for r in rows),
            "near_copies": total(r.get("near_copies", "") for r in rows), "epsilon": last.get("epsilon", "")}


def plot_tasks(runs: dict[str, list[list[dict[str, Any]]]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Average accuracy on the tasks seen so far after each task, one line per run label (mean over its seeds,
    with a band of +- one standard deviation when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, seeds in runs.items():
        curves = np.array([[100 * float(r["avg_accuracy"]) for r in rows] for rows in seeds])
        steps = np.arange(1, curves.shape[1] + 1)
        ax.plot(steps, curves.mean(axis=0), marker="o", label=label)
        if len(curves) > 1:
            ax.fill_between(steps, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0), alpha=0.2)
    ax.set(xlabel="tasks trained", ylabel="average accuracy on tasks seen (%)", ylim=(0, 100),
           title=title or "federated continual learning")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def write_task_results(rows: list[dict[str, Any]], round_rows: list[dict[str, Any]], out_dir: str | os.PathLike[str],
                       label: str) -> dict[str, Any]:
    """rounds.csv, tasks.csv, tasks.png, summary.json and summary.md of a continual run; returns the summary."""
    out = Path(out_dir)
    write_rounds_csv(round_rows, out / "rounds.csv")
    write_csv(rows, out / "tasks.csv", TASK_COLUMNS)
    plot_tasks({label: [rows]}, out / "tasks.png")
    summary = task_summary(rows, label)
    write_json(out / "summary.json", summary)
    atomic_write(out / "summary.md", lambda f: f.write(task_table([summary]).encode() + b"\n"))
    return summary


def task_table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table of continual runs: final average accuracy, forgetting, BWT (%), traffic (MB) and the
    uploaded images the audit flags as near-copies of a client's data ("-": nothing uploaded or audited).  Values
    given as (mean, std) pairs print as mean +- std."""
    def cell(value: Any, scale: float, digits: int) -> str:
        if isinstance(value, tuple):
            return f"{scale * value[0]:.{digits}f} +- {scale * value[1]:.{digits}f}"
        return f"{scale * value:.{digits}f}"

    lines = ["| strategy | final avg. accuracy % | forgetting % | BWT % | uplink MB | downlink MB | near-copies |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        copies = s.get("near_copies", "")
        lines.append(f"| {s['run']} | {cell(s['avg_accuracy'], 100, 2)} | {cell(s['forgetting'], 100, 2)} "
                     f"| {cell(s['bwt'], 100, 2)} | {cell(s['uplink_bytes'], 1e-6, 3)} "
                     f"| {cell(s['downlink_bytes'], 1e-6, 3)} | {'-' if copies == '' else copies} |")
    return "\n".join(lines)
