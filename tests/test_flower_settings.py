"""FedSettings: one table of run settings read from run configs / ConfigRecords, with clear errors."""

from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest

from fedcl.flower.settings import FedSettings, changed_settings

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
    with pytest.raises(ValueError, match="min-class-images"):
        FedSettings(min_class_images=0)
    with pytest.raises(ValueError, match="client-samples"):
        FedSettings(client_samples=6)  # the default partitioner is the class-wise dirichlet
    assert FedSettings(partitioner="dirichlet-sized", client_samples=6).client_samples == 6


def test_a_setting_missing_from_an_older_record_counts_as_its_default():
    current = FedSettings(ipc=5).to_config()
    older = {k: v for k, v in current.items() if k != "min-class-images"}
    assert changed_settings(older, current) == []
    assert changed_settings(older, {**current, "min-class-images": 10}) == ["min-class-images"]
    assert changed_settings(current, {**current, "ipc": 6, "out-dir": "y"}, ignore=frozenset({"out-dir"})) == ["ipc"]


def test_the_flwr_app_config_names_only_known_settings():
    config = tomllib.loads(APP_PYPROJECT.read_text())["tool"]["flwr"]["app"]
    known = {f.name.replace("_", "-") for f in fields(FedSettings)}
    assert set(config["config"]) <= known
    assert FedSettings.from_config(config["config"]).strategy == "fed-distill"
    assert FedSettings.from_config(config["config"]).screen_threshold == FedSettings().screen_threshold
    assert config["components"] == {"serverapp": "fedcl.flower.server_app:app",
                                    "clientapp": "fedcl.flower.client_app:app"}


def test_the_screen_threshold_travels_from_the_command_line_to_both_strategies():
    from fedcl.cli import build_parser
    from fedcl.data import load_dataset
    from fedcl.flower.cli import simulate_settings
    from fedcl.flower.server_app import build_strategy
    from fedcl.screen import EmbeddingScreen

    settings = simulate_settings(build_parser().parse_args(["simulate", "--screen", "embedding",
                                                             "--screen-threshold", "4", "--seed", "3"]))
    assert settings.screen == "embedding" and settings.screen_threshold == 4.0
    assert FedSettings.from_config(settings.to_config()) == settings
    assert FedSettings.from_config({"screen-threshold": "3"}).screen_threshold == 3.0
    digits = load_dataset("digits")
    for strategy in ("fed-distill", "hybrid"):
        built = build_strategy(replace(settings, strategy=strategy), digits)
        screen = built.memory.screen
        assert screen.threshold == 4.0 and screen.seed != 3, strategy  # networks seeded in secret, not by --seed
    default = simulate_settings(build_parser().parse_args(["simulate"]))
    assert default.screen_threshold == FedSettings().screen_threshold == EmbeddingScreen().threshold


def test_a_screen_threshold_that_is_not_positive_is_refused(tmp_path, capsys):
    from fedcl.cli import main

    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="screen-threshold must be > 0"):
            FedSettings(screen_threshold=bad)
    with pytest.raises(ValueError, match="screen-threshold must be > 0"):
        FedSettings.from_config({"screen-threshold": "-1"})
    assert main(["simulate", "--screen", "embedding", "--screen-threshold", "0", "--out", str(tmp_path)]) == 2
    assert "screen-threshold must be > 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_the_simulate_command_line_is_built_from_the_settings_fields():
    from fedcl.cli import build_parser
    from fedcl.flower.cli import simulate_settings

    parser = build_parser()
    default = simulate_settings(parser.parse_args(["simulate"]))
    assert default == FedSettings(out_dir="runs/simulate", min_nodes=3)  # same defaults, but the output folder
    args = parser.parse_args(["simulate", "--rounds", "4", "--out", "o", "--replay-dsa", "--server-lr", "0.2",
                              "--aggregation", "median", "--strategy", "fedavg", "--clients", "5"])
    assert simulate_settings(args) == FedSettings(num_rounds=4, out_dir="o", replay_dsa=True, server_lr=0.2,
                                                  aggregation="median", strategy="fedavg", min_nodes=5)
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--partitioner", "shards"])


def test_the_settings_table_in_the_docs_is_the_generated_one():
    from fedcl.flower.settings import settings_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "flower.md").read_text()
    assert text.split("<!-- settings-table -->\n")[1].split("\n<!-- /settings-table -->")[0] == settings_table()
