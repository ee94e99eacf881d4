"""simulations/bench_online.py completes over several invocations: every finished run is kept and read back when
its settings are unchanged, run again when any setting that shapes it changed; every memory's bytes are reported."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("avalanche")

TINY = ["--seeds", "0", "--mem-sizes", "10", "--methods", "replay", "distilled", "--experience-size", "50",
        "--train-per-class", "20", "--test-per-class", "5", "--dm-iterations", "1", "--update-iterations", "1",
        "--batch-real", "4", "--width", "4", "--device", "cpu"]


class Ran(Exception):
    """Raised by a patched runner: the benchmark tried to run instead of reusing."""


def _refuse(*args, **kwargs):
    raise Ran


def test_bench_online_reuses_finished_runs_and_reruns_a_changed_one(tmp_path, bench_script, digits, capsys):
    bench = bench_script("bench_online")
    bench.load_dataset = lambda *args: digits  # 10 classes of small images stand in for Fashion-MNIST
    out = ["--out", str(tmp_path)]
    assert bench.main([*TINY, *out]) == 0
    first = capsys.readouterr().out
    saved = json.loads((tmp_path / "runs" / "seed0-distilled-mem10.json").read_text())["result"]
    assert saved["memory_bytes"] == 10 * (64 * 4 + 8)  # ten float32 8x8 images with their int64 labels
    assert (tmp_path / "runs" / "seed0-replay-mem10.json").exists()
    assert str(saved["memory_bytes"]) in first.splitlines()[-1]  # the table reports the bytes

    bench.run_one = _refuse
    assert bench.main([*TINY, *out]) == 0
    assert capsys.readouterr().out.count("(from an earlier invocation)") == 2
    with pytest.raises(Ran):
        bench.main([*TINY, "--update-iterations", "2", *out])
