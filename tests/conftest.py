"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedcl.flower.results import COLUMNS


@pytest.fixture
def csv_row() -> Callable[[int], dict]:
    """Make the rounds.csv row of a round (zeros in the numeric columns), as a server checkpoint stores it."""
    return lambda server_round: {**dict.fromkeys(COLUMNS, 0), "round": server_round, "client_accuracy": "",
                                 "failure_reasons": ""}
