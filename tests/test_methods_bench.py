"""simulations/bench_methods.py end to end on digits, tiny: it writes its table and JSON into the --out directory."""

import json

import pytest


def test_bench_writes_table_and_json_into_out_dir(tmp_path, bench_script):
    out = tmp_path / "bench"
    bench_script("bench_methods").main(["--dataset", "digits", "--methods", "random", "dd", "--ipcs", "1",
                                        "--iterations", "2", "--method-iterations", "dd=3", "--eval-epochs", "2",
                                        "--eval-models", "1", "--width", "8", "--device", "cpu", "--quiet",
                                        "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "| random | 1 |" in table and "| dd | 1 |" in table and "Protocol:" in table
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["options"].get("iterations")) for r in rows] == [("random", None), ("dd", 3)]


def test_bench_rejects_a_bad_method_iterations_pair(tmp_path, bench_script):
    with pytest.raises(SystemExit):
        bench_script("bench_methods").main(["--method-iterations", "nope=3", "--out", str(tmp_path)])
