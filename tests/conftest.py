"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable

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
