"""Private-by-default federations: clients distil from noise with the run's distiller, every upload is audited
(`near_copies` in rounds.csv), differential privacy is charged per client over all its releases (`epsilon`), and
the continual example of the README learns.  In-process federations (`engine="local"`) of the real apps."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedcl.audit import Auditor
from fedcl.data import load_dataset
from fedcl.distill import create_distiller
from fedcl.flower.node import PrivacyLedger, client_distiller
from fedcl.flower.settings import FedSettings, add_arguments, from_args
from fedcl.flower.simulation import QUIET_ENV, simulate
from fedcl.models import create_model
from fedcl.synthetic import SyntheticSet

#: CPU-sized standard runs on digits: 3 clients, few iterations and server epochs.
SMALL = dict(dataset="digits", width=16, distill_iterations=30, batch_real=32, server_epochs=30, min_nodes=3)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _uploaded_sets(out: Path) -> list[SyntheticSet]:
    return [SyntheticSet.load(p) for p in sorted((out / "checkpoint").glob("memory-*/*.safetensors"))]


@pytest.mark.parametrize("init, private", [("noise", True), ("real", False)])
def test_default_uploads_are_no_near_copies_and_real_starts_are(tmp_path, init, private):
    settings = FedSettings(**SMALL, strategy="fed-distill", init=init, out_dir=str(tmp_path))
    rows = simulate(settings, 3, engine="local")
    sets = _uploaded_sets(tmp_path)
    assert len(sets) == 3 and all(s.images.shape[1:] == (1, 8, 8) for s in sets)
    auditor = Auditor(load_dataset("digits"))
    flagged = sum(auditor.near_copies(s) for s in sets)
    assert int(rows[1]["near_copies"]) == flagged
    assert (flagged == 0) if private else (flagged > len(sets) * 10)
    assert _csv(tmp_path / "rounds.csv")[1]["epsilon"] == ""  # DP is off


def test_default_private_federation_still_learns(tmp_path):
    rows = simulate(FedSettings(**SMALL, strategy="fed-distill", out_dir=str(tmp_path)), 3, engine="local")
    assert float(rows[1]["accuracy"]) > 0.4


@pytest.mark.parametrize("distiller", ["herding", "random"])
def test_clients_run_the_named_distiller(tmp_path, distiller):
    settings = FedSettings(**SMALL, strategy="fed-distill", distiller=distiller, out_dir=str(tmp_path))
    rows = simulate(settings, 3, engine="local")
    assert int(rows[1]["clients_failed"]) == 0
    assert {s.meta.method for s in _uploaded_sets(tmp_path)} == {distiller}
    assert int(rows[1]["near_copies"]) > 0  # coresets keep real images, and the audit says so


def test_dp_federation_composes_each_clients_epsilon_over_its_rounds(tmp_path):
    settings = FedSettings(**SMALL, strategy="fed-distill", num_rounds=2, dp_epsilon=6.0, out_dir=str(tmp_path))
    simulate(settings, 3, engine="local")
    rows = _csv(tmp_path / "rounds.csv")
    assert [float(r["epsilon"]) for r in rows[1:]] == [3.0, 6.0]
    assert all(int(r["clients_failed"]) == 0 for r in rows)
    assert all(s.meta.extra["dp"]["epsilon"] <= 3.0 + 1e-9 for s in _uploaded_sets(tmp_path))


def test_privacy_ledger_stops_a_client_at_its_budget():
    settings = FedSettings(strategy="fed-distill", num_rounds=2, dp_epsilon=4.0)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    spent = []
    for _ in range(2):
        ledger = PrivacyLedger(settings, context)  # read back from Context.state each time, as a handler does
        ledger.check()
        spent.append(ledger.charge())
    assert spent == [2.0, 4.0]
    with pytest.raises(ValueError, match="privacy budget spent"):
        PrivacyLedger(settings, context).check()


def test_continual_dp_is_charged_per_task():
    settings = FedSettings(scenario="continual", strategy="fed-distill", tasks=4, dp_epsilon=8.0, dp_delta=1e-5)
    assert PrivacyLedger.share(settings) == (2.0, 2.5e-6)
    distiller = client_distiller(settings, pid=0, step=1)
    assert distiller.privacy.epsilon == 2.0 and distiller.init == "noise"


def test_settings_refuse_dp_where_nothing_is_private():
    with pytest.raises(ValueError, match="distils nothing"):
        FedSettings(strategy="fedavg", dp_epsilon=1.0)
    with pytest.raises(ValueError, match="DM family"):
        FedSettings(strategy="fed-distill", distiller="herding", dp_epsilon=1.0)
    with pytest.raises(ValueError, match="init noise"):
        FedSettings(strategy="fed-distill", init="real", dp_epsilon=1.0)
    with pytest.raises(ValueError, match="unknown distiller"):
        FedSettings(strategy="fed-distill", distiller="nope")
    with pytest.raises(ValueError, match="does not take"):
        FedSettings(strategy="fed-distill", distiller_opt="no_such_option=1")


def test_distiller_options_come_from_repeatable_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--distiller", "idm", "--distiller-opt", "factor=2", "--distiller-opt",
                              "storage=uint8", "--init", "noise"])
    settings = from_args(args)
    assert settings.distiller_options() == {"factor": 2, "storage": "uint8"}
    distiller = client_distiller(settings, pid=1, step=1)
    assert (distiller.name, distiller.factor, distiller.storage, distiller.init) == ("idm", 2, "uint8", "noise")
    assert from_args(parser.parse_args([])).distiller_opt == ""


def test_guided_dm_matches_in_the_perturbed_guide_model():
    guide = create_model("convnet", (1, 8, 8), 10, width=8).state_dict()
    guided = create_distiller("dm", model_cfg={"width": 8}, iterations=1, guide=guide, guide_noise=0.0)
    net = guided.match_networks((1, 8, 8), 10, net_seed=99, gen=torch.Generator())[0]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in guide.items())
    noisy = create_distiller("dm", model_cfg={"width": 8}, iterations=1, guide=guide, guide_noise=0.1)
    moved = noisy.match_networks((1, 8, 8), 10, net_seed=99, gen=torch.Generator())[0]
    assert not torch.equal(moved.classifier.weight, guide["classifier.weight"])
    with pytest.raises(ValueError, match="takes no guide"):
        create_distiller("idm", guide=guide)


def test_readme_continual_example_learns(tmp_path):
    settings = FedSettings(dataset="digits", scenario="continual", tasks=2, strategy="fed-distill", seed=0,
                           min_nodes=3, out_dir=str(tmp_path))
    simulate(settings, 3, engine="local")
    assert float(_csv(tmp_path / "tasks.csv")[-1]["avg_accuracy"]) > 0.5
