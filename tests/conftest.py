"""Shared test helpers."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from fedcl.data import ImageDataset, load_dataset
from fedcl.flower.results import COLUMNS


@pytest.fixture
def csv_row() -> Callable[[int], dict]:
    """Make the rounds.csv row of a round (zeros in the numeric columns), as a server checkpoint stores it."""
    return lambda server_round: {**dict.fromkeys(COLUMNS, 0), "round": server_round, "client_accuracy": "",
                                 "failure_reasons": ""}


@pytest.fixture
def server_identity(monkeypatch) -> None:
    """What a ServerApp process has set before it creates Flower messages, for tests that create them directly."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    """The embedded digits dataset, loaded once."""
    return load_dataset("digits")


@pytest.fixture
def bench_script() -> Callable[[str], ModuleType]:
    """Load simulations/<name>.py as a fresh module (the scripts are not a package), so a test can call its `main`
    and patch its functions without touching other tests."""
    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "simulations" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
