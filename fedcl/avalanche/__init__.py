"""Avalanche adapters: replay memories of distilled data and continual-learning benchmarks from local files.

Thin layers over fedcl's core (SyntheticSet, distillers); the core never imports Avalanche, this package does.
`from fedcl.avalanche import DistilledReplayPlugin` and add it to any Avalanche strategy's `plugins=[...]`.
Names load on first use, so `fedcl --help` (which imports fedcl.avalanche.cli) does not pay Avalanche's import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLBenchmark": "fedcl.avalanche.benchmarks",
    "available_benchmarks": "fedcl.avalanche.benchmarks",
    "make_benchmark": "fedcl.avalanche.benchmarks",
    "DistilledBuffer": "fedcl.avalanche.buffer",
    "DistilledReplayPlugin": "fedcl.avalanche.plugin",
    "MemoryFinetunePlugin": "fedcl.avalanche.finetune",
    "ReplayCollate": "fedcl.avalanche.plugin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedcl.avalanche' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
