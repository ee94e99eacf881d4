"""The `fedcl` command end to end: distil, evaluate, show, errors (real console script, small settings)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedcl.cli import main
from fedcl.synthetic import SyntheticMeta, SyntheticSet

FEDCL = str(Path(sys.executable).with_name("fedcl"))


def run(*args):
    return subprocess.run([FEDCL, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_distill_then_evaluate_then_show(tmp_path):
    out = tmp_path / "dm"
    done = run("distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "10",
               "--width", "16", "--seed", "0", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("synthetic.safetensors", "synthetic.json", "grid.png", "report.json"):
        assert (out / name).is_file(), name
    synset = SyntheticSet.load(out / "synthetic.safetensors")
    assert len(synset) == 20 and synset.meta.method == "dm" and synset.meta.dataset == "digits"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "dm" and report["iterations"] == 10 and report["n_images"] == 20

    done = run("evaluate", str(out / "synthetic.safetensors"), "--dataset", "digits", "--eval-models", "1",
               "--eval-epochs", "100", "--width", "16", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.strip().splitlines()[-1].split("=")[1])
    assert 0.2 < accuracy <= 1.0  # chance is 0.1

    done = run("show", str(out / "synthetic.safetensors"), "--out", str(tmp_path / "g.png"))
    assert done.returncode == 0 and (tmp_path / "g.png").stat().st_size > 0


def test_distill_with_evaluation_in_process(tmp_path, capsys):
    assert main(["distill", "--dataset", "digits", "--method", "random", "--ipc", "1", "--out", str(tmp_path),
                 "--eval-models", "1", "--eval-epochs", "5", "--width", "8", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["evaluation"]["accuracies"] and "test accuracy" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["evaluate", str(corrupt), "--dataset", "digits"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["distill", "--dataset", "cifar10", "--out", str(tmp_path / "x")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["distill", "--method", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown distiller" in capsys.readouterr().err
    assert main(["distill", "--list"]) == 0
    assert "dm" in capsys.readouterr().out.split()


@pytest.mark.parametrize("ipc", ["0", "123", "100000"])  # digits' smallest class has 122 training images
def test_an_impossible_ipc_is_one_clear_line(tmp_path, capsys, ipc):
    out = tmp_path / "x"
    assert main(["distill", "--dataset", "digits", "--method", "dm", "--ipc", ipc, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"fedcl distill: error: --ipc {ipc} is impossible") and "choose 1 to 122" in err
    assert not out.exists()  # refused before anything ran


def test_the_largest_possible_ipc_is_accepted(tmp_path):
    assert main(["distill", "--dataset", "digits", "--method", "random", "--ipc", "122", "--out", str(tmp_path)]) == 0
    assert len(SyntheticSet.load(tmp_path / "synthetic.safetensors")) == 1220


def test_show_labels_each_class_row_of_the_grid(tmp_path, capsys):
    labels = torch.tensor([0, 0, 0, 2, 5, 5])  # uneven classes: each still starts its own row
    SyntheticSet(torch.zeros(6, 1, 8, 8), labels, SyntheticMeta(method="x", n_classes=10, ipc=3, dataset="digits")
                 ).save(tmp_path / "s.safetensors")
    assert main(["show", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "g.png")]) == 0
    assert "6 images, 3 classes" in capsys.readouterr().out
    with Image.open(tmp_path / "g.png") as picture:
        grid = torch.tensor(list(picture.convert("L").getdata()), dtype=torch.uint8).view(picture.height, -1)
    tile = 32 + 2
    assert grid.shape == (2 + 3 * tile, 8 + 7 + 2 + 3 * tile)  # a label margin, three rows of three tiles
    margin = grid[:, :15]
    for row in range(3):  # each row's label is drawn in the margin, beside its row
        assert int((margin[2 + row * tile: 2 + (row + 1) * tile] < 128).sum()) > 5, row


def test_help_explains_every_command():
    done = run("--help")
    assert done.returncode == 0
    for command in ("distill", "evaluate", "show", "demo"):
        assert command in done.stdout
    assert "--iterations" in run("distill", "--help").stdout
    assert "one row per class" in run("show", "--help").stdout  # a description, not just the usage line


@pytest.mark.slow
def test_demo_runs_the_federated_continual_comparison(tmp_path):
    out = tmp_path / "demo"
    done = run("demo", "--clients", "2", "--tasks", "2", "--rounds", "1", "--local-epochs", "2", "--width", "8",
               "--distill-iterations", "5", "--strategies", "fedavg", "fedavg-replay", "fedavg-herding",
               "fed-distill", "--seeds", "0", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for strategy in ("fedavg", "fedavg-replay", "fedavg-herding", "fed-distill"):
        assert f"| {strategy}: " in done.stdout
    assert "| near-copies |" in done.stdout
    for baseline in ("fedavg-replay", "fedavg-herding"):
        assert re.search(rf"fed-distill - {baseline}: [+-][0-9.]+ points .*; fed-distill (wins|loses) on every seed",
                         done.stdout)
    assert "fraction_evaluate" not in done.stdout + done.stderr  # no library warning inside the progress bar
    rows = (out / "tasks.csv").read_text().splitlines()
    assert rows[0].startswith("strategy,seed,task,round,avg_accuracy,forgetting") and len(rows) == 1 + 4 * 2
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "fed-distill-seed0" / "tasks.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [row["run"] for row in summary["table"]] == ["fedavg", "fedavg-replay", "fedavg-herding", "fed-distill"]
