"""The long benchmarks complete over several invocations: a finished run is read back when its settings are
unchanged, and run again when any setting that shapes it changed."""

import shutil

import pytest


class Ran(Exception):
    """Raised by a patched runner: the benchmark tried to run instead of reusing."""


def _refuse(*args, **kwargs):
    raise Ran


CL_TINY = ["--benchmark", "split-digits", "--seeds", "1", "--strategies", "naive", "--epochs", "1", "--width", "8",
           "--device", "cpu"]


def test_bench_cl_reuses_a_finished_run_and_reruns_a_changed_one(tmp_path, bench_script, capsys):
    out = ["--out", str(tmp_path)]
    assert bench_script("bench_cl").main([*CL_TINY, *out]) == 0
    first = (tmp_path / "results.csv").read_text()
    assert (tmp_path / "runs" / "seed0-naive-mem0.json").exists()

    again = bench_script("bench_cl")
    again.run = _refuse
    capsys.readouterr()
    assert again.main([*CL_TINY, *out]) == 0
    assert "(from an earlier invocation)" in capsys.readouterr().out
    assert (tmp_path / "results.csv").read_text() == first

    with pytest.raises(Ran):
        again.main([*CL_TINY, "--lr", "0.02", *out])


FED_TINY = ["--dataset", "digits", "--clients", "3", "--alphas", "0.5", "--seeds", "0", "--variants", "fedavg",
            "--fedavg-rounds", "1", "--width", "8", "--device", "cpu"]


def test_bench_federated_reuses_a_finished_run_and_reruns_a_changed_one(tmp_path, bench_script, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_federated", *FED_TINY, "--out", str(tmp_path)])
    bench_script("bench_federated").main()
    result = tmp_path / "alpha0.5" / "seed0" / "fedavg" / "result.json"
    assert result.exists()

    again = bench_script("bench_federated")
    again.simulate = _refuse
    capsys.readouterr()
    again.main()
    printed = capsys.readouterr().out
    assert "(from an earlier invocation)" in printed and "| 0.5 | fedavg | 1 |" in printed

    monkeypatch.setattr("sys.argv", ["bench_federated", *FED_TINY, "--width", "16", "--out", str(tmp_path)])
    with pytest.raises(Ran):
        again.main()


FCL_TINY = ["--dataset", "digits", "--clients", "2", "--tasks", "2", "--seeds", "0", "--strategies", "fedavg",
            "--rounds", "1", "--local-epochs", "1", "--width", "8", "--device", "cpu"]


def test_bench_fcl_reuses_a_finished_run_and_reruns_a_changed_one(tmp_path, bench_script, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_fcl", *FCL_TINY, "--out", str(tmp_path)])
    bench_script("bench_fcl").main()
    assert (tmp_path / "fedavg-seed0" / "finished.json").exists()
    first = (tmp_path / "tasks.csv").read_text()

    monkeypatch.setattr("fedcl.flower.comparison.simulate", _refuse)
    capsys.readouterr()
    bench_script("bench_fcl").main()
    printed = capsys.readouterr()
    assert "(from an earlier invocation)" in printed.out + printed.err and "| fedavg: " in printed.out
    assert (tmp_path / "tasks.csv").read_text() == first

    # a finished run copied into another OUT counts there, and DM's options do not touch a run without a distilled
    # memory, so the naive run is still reused
    shutil.copytree(tmp_path / "fedavg-seed0", tmp_path / "other" / "fedavg-seed0")
    monkeypatch.setattr("sys.argv", ["bench_fcl", *FCL_TINY, "--distill-iterations", "7",
                                     "--out", str(tmp_path / "other")])
    bench_script("bench_fcl").main()
    printed = capsys.readouterr()
    assert "(from an earlier invocation)" in printed.out + printed.err

    monkeypatch.setattr("sys.argv", ["bench_fcl", *FCL_TINY, "--width", "16", "--out", str(tmp_path)])
    with pytest.raises(Ran):
        bench_script("bench_fcl").main()
