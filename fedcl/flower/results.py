"""Per-round results of a federated run: rows, CSV, plots (accuracy vs rounds and vs uplink MB), summary table."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from fedcl.files import atomic_write, write_json

#: Columns of rounds.csv (outside checks rely on round, accuracy, uplink_bytes, downlink_bytes).  accuracy is the
#: global model's on the server's test split; client_accuracy the clients' weighted mean on their own partitions.
COLUMNS = ("round", "accuracy", "client_accuracy", "uplink_bytes", "downlink_bytes", "cumulative_uplink_bytes",
           "replies_ok", "clients_failed", "seconds", "failure_reasons")


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
            "clients_failed": sum(int(r["clients_failed"]) for r in rows), "seconds": float(last["seconds"])}


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
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def write_results(rows: list[dict[str, Any]], out_dir: str | os.PathLike[str], label: str) -> dict[str, Any]:
    """rounds.csv, accuracy.png, summary.json and summary.md under `out_dir`; returns the summary."""
    out = Path(out_dir)
    write_rounds_csv(rows, out / "rounds.csv")
    plot_accuracy({label: rows}, out / "accuracy.png")
    summary = summarise(rows, label)
    write_json(out / "summary.json", summary)
    atomic_write(out / "summary.md", lambda f: f.write(markdown_table([summary]).encode() + b"\n"))
    return summary
