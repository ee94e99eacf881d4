"""Benchmark verdicts judged seed by seed: a target is "met" only when every seed meets it.

A mean over seeds can meet a target that one seed misses badly (an outlier on the other side pulls the mean
across); a reader of "target met" expects it to hold for each run.  So the benchmarks print every seed's figures
and name the seeds that miss, with how far each falls short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Criterion:
    """One condition of a target: the measured value `name` must be at least `minimum`.

    `style` formats the value for printing (a format spec such as "+.2f"); `unit` follows it.
    """

    name: str
    minimum: float
    unit: str = ""
    style: str = ".2f"

    def show(self, value: float) -> str:
        """"NAME VALUE UNIT", e.g. "accuracy vs FedAvg -3.12 points"."""
        return f"{self.name} {value:{self.style}}{self.unit}"

    def shortfall(self, value: float) -> float:
        """How far `value` falls below the minimum (0 when it meets it)."""
        return max(0.0, self.minimum - value)


def misses(values: Mapping[str, float], criteria: Sequence[Criterion]) -> list[str]:
    """The criteria `values` misses, each as "NAME X UNIT below the minimum M UNIT"; empty when all are met."""
    return [f"{c.name} {c.shortfall(values[c.name]):.2f}{c.unit} below the minimum {c.minimum:g}{c.unit}"
            for c in criteria if c.shortfall(values[c.name]) > 0]


def seed_verdict(label: str, per_seed: Mapping[int, Mapping[str, float]], criteria: Sequence[Criterion]) -> str:
    """One line per seed (its figures, and what it misses), then the verdict: "target met" only when every seed
    meets every criterion, otherwise "target NOT met" naming each missing seed and by how much."""
    if not per_seed:
        raise ValueError(f"{label}: no seeds to judge")
    lines, missing = [], []
    for seed, values in sorted(per_seed.items()):
        figures = ", ".join(c.show(values[c.name]) for c in criteria)
        short = misses(values, criteria)
        lines.append(f"{label} seed {seed}: {figures} -> {'misses: ' + '; '.join(short) if short else 'meets'}")
        if short:
            missing.append(f"seed {seed} ({'; '.join(short)})")
    seeds = ", ".join(str(s) for s in sorted(per_seed))
    lines.append(f"{label}: target NOT met, missed by {', '.join(missing)}" if missing
                 else f"{label}: target met by every seed ({seeds})")
    return "\n".join(lines)
