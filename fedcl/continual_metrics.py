"""Continual-learning metrics from an accuracy matrix: average accuracy, forgetting and backward transfer.

`accuracy[t][g]` is the test accuracy on class group (task) g after training step t, for every group seen by
then.  The definitions are the usual ones (Chaudhry et al. 2018; Lopez-Paz and Ranzato 2017), in [0, 1]:
- average accuracy after step t: the mean of accuracy[t][g] over the groups seen;
- forgetting after step t: over the groups first seen before t, the mean drop from their best accuracy at an
  earlier step to their accuracy now;
- backward transfer after step t: over the same groups, the mean of accuracy now minus accuracy right after the
  step that introduced them (negative = forgetting).
Both are 0 at a step with no earlier group.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def step_metrics(accuracy: Sequence[Mapping[int, float]]) -> list[dict[str, float]]:
    """avg_accuracy, forgetting and bwt after every step of `accuracy` (one dict per step)."""
    first: dict[int, int] = {}
    rows = []
    for step, now in enumerate(accuracy):
        for group in now:
            first.setdefault(group, step)
        old = [g for g in now if first[g] < step]
        drops = [max(accuracy[s][g] for s in range(first[g], step)) - now[g] for g in old]
        transfer = [now[g] - accuracy[first[g]][g] for g in old]
        rows.append({"avg_accuracy": statistics.fmean(now.values()) if now else 0.0,
                     "forgetting": statistics.fmean(drops) if drops else 0.0,
                     "bwt": statistics.fmean(transfer) if transfer else 0.0})
    return rows
