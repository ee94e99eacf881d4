"""simulations/bench_pipeline.py end to end on digits: both memories train the whole stream, the verdict names
each seed's gap, and a finished run is reused on a second invocation."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("avalanche")


@pytest.mark.slow
def test_bench_pipeline_compares_both_memories_and_reuses_its_runs(tmp_path, bench_script, capsys):
    bench = bench_script("bench_pipeline")
    args = ["--seeds", "0", "--mem-sizes", "10", "--benchmark", "split-digits", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    first = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["method"], r["mem_size"]) for r in rows] == [("replay", 10), ("distilled", 10)]
    assert all(0.0 < r["accuracy"] <= 1.0 and r["seconds"] > 0 for r in rows)
    assert "seed 0 mem   10: distilled" in first and "(target +5)" in first

    def refuse(*args):
        raise AssertionError("a finished run was made again")

    bench.run_one = refuse
    assert bench.main(args) == 0
    assert capsys.readouterr().out.count("(from an earlier invocation)") == 2
