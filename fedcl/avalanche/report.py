"""Tables, CSV files and plots of continual-learning runs (shared by `fedcl cl` and simulations/bench_cl.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcl.avalanche.experiment import RunResult
from fedcl.files import save_figure


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Mean and std over seeds for each (memory size, strategy), in first-seen order; accuracies in %."""
    groups: dict[tuple[int, int, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.mem_size, r.mem_bytes, r.strategy), []).append(r)
    rows = []
    for (mem_size, mem_bytes, strategy), runs in groups.items():
        row: dict[str, Any] = {"mem_size": mem_size, "mem_bytes": mem_bytes, "strategy": strategy,
                               "seeds": len(runs)}
        for name, values in (("final_accuracy", [100 * r.final_accuracy for r in runs]),
                             ("forgetting", [100 * r.forgetting for r in runs]),
                             ("bwt", [100 * r.bwt for r in runs]),
                             ("distill_seconds_per_exp", [r.row()["distill_seconds_per_exp"] for r in runs]),
                             ("train_seconds", [r.train_seconds for r in runs]),
                             ("memory_bytes", [r.memory_bytes for r in runs])):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table: final average accuracy, forgetting, BWT (%, mean +- std), overhead and the
    bytes each memory holds at the end (mean over seeds)."""
    lines = ["| memory | strategy | final avg. accuracy (%) | forgetting (%) | BWT (%) | distillation s / exp. "
             "| run time (s) | bytes held |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary:
        cells = [_pm(row, "final_accuracy"), _pm(row, "forgetting"), _pm(row, "bwt"),
                 _pm(row, "distill_seconds_per_exp", 1), _pm(row, "train_seconds", 0),
                 f"{row['memory_bytes_mean']:,.0f}" if row["memory_bytes_mean"] else "-"]
        memory = f"{row['mem_bytes']:,} B" if row.get("mem_bytes") else row["mem_size"] or "-"
        lines.append(f"| {memory} | {row['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(row: dict[str, Any], name: str, digits: int = 1) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}"


def plot_accuracy(path: str | Path, results: Sequence[RunResult], title: str) -> Path:
    """Average test accuracy over the whole stream after each training experience, one line per strategy and
    memory size (mean over seeds; joint training is drawn as a horizontal upper bound)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves: dict[str, list[list[float]]] = {}
    for r in results:
        label = r.strategy if r.strategy in ("naive", "joint") else \
            f"{r.strategy} ({r.mem_bytes:,} bytes)" if r.mem_bytes else f"{r.strategy} (memory {r.mem_size})"
        curves.setdefault(label, []).append(r.accuracy_after)
    n_exp = max(len(r.accuracy_after) for r in results)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, runs in curves.items():
        mean = [100 * statistics.fmean(values) for values in zip(*runs)]
        if len(mean) == 1:
            ax.axhline(mean[0], linestyle="--", color="grey", label=label)
        else:
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=label)
    ax.set(xlabel="experiences trained", ylabel="average accuracy on all test classes (%)", title=title,
           xticks=range(1, n_exp + 1), ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
