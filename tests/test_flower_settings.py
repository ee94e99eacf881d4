"""FedSettings: one table of run settings read from run configs / ConfigRecords, with clear errors."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedcl.flower.settings import FedSettings

APP_PYPROJECT = Path(__file__).resolve().parents[1] / "simulations" / "flower_app" / "pyproject.toml"


def test_round_trip_through_a_config_with_type_conversion_and_foreign_keys():
    settings = FedSettings(strategy="hybrid", alpha=0.1, num_rounds=7, out_dir="x", upload_dtype="float16")
    config = {**settings.to_config(), "server-round": 3}
    assert FedSettings.from_config(config) == settings
    assert FedSettings.from_config({"num-rounds": "4", "alpha": 1}).num_rounds == 4
    assert FedSettings.from_config({"alpha": 1}).alpha == 1.0
    assert FedSettings.from_config({"ipc": 3}, ipc=5).ipc == 5


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        FedSettings(strategy="fedprox")
    with pytest.raises(ValueError, match="'num-rounds' must be of type int"):
        FedSettings.from_config({"num-rounds": "many"})
    with pytest.raises(ValueError, match="upload-dtype"):
        FedSettings(upload_dtype="int8")


def test_the_flwr_app_config_names_only_known_settings():
    config = tomllib.loads(APP_PYPROJECT.read_text())["tool"]["flwr"]["app"]
    known = {f.name.replace("_", "-") for f in fields(FedSettings)}
    assert set(config["config"]) <= known
    assert FedSettings.from_config(config["config"]).strategy == "fed-distill"
    assert config["components"] == {"serverapp": "fedcl.flower.server_app:app",
                                    "clientapp": "fedcl.flower.client_app:app"}
