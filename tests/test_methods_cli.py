"""`fedcl distill --method M --dataset digits --ipc 1 --iterations 20` for every method, in-process."""

import json

import pytest

from fedcl.cli import main

METHODS = ["random", "herding", "dm", "dc", "dsa", "mtt", "dd"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_distill_command_writes_the_set_grid_and_report(method, tmp_path):
    out = tmp_path / method
    assert main(["distill", "--method", method, "--dataset", "digits", "--ipc", "1", "--iterations", "20",
                 "--out", str(out)]) == 0
    for name in ("synthetic.safetensors", "grid.png", "report.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["n_images"] == 10
    assert report["model"] == ("mlp" if method == "dd" else "convnet")  # each method's own network by default


def test_opt_passes_method_options(tmp_path):
    out = tmp_path / "dd"
    assert main(["distill", "--method", "dd", "--iterations", "2", "--width", "8", "--opt", "steps=3",
                 "--opt", "learn_labels=true", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["steps"] == 3 and report["learn_labels"] is True
    assert report["model"] == "mlp" and report["model_cfg"] == {"width": 8, "depth": 3}
    assert main(["distill", "--method", "dd", "--opt", "nonsense", "--out", str(out)]) == 2
