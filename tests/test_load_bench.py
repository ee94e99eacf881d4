"""simulations/bench_load.py: its cross-device options reach `fedcl simulate`, and a tiny sampled run on the local
engine completes with the server's pool within its bound."""

import json


def test_options_parse_into_the_simulate_command(bench_script, tmp_path):
    bench = bench_script("bench_load")
    args = bench.parser().parse_args(["--clients", "10000", "--per-round", "100", "--strategy", "fedavg",
                                      "--partitioner", "dirichlet-sized", "--alpha", "1.0", "--client-samples", "6",
                                      "--dataset", "fashion-mnist"])
    cmd = bench.command(10_000, args, tmp_path)
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--engine"] == "local" and float(flags["--fraction-train"]) == 0.01
    assert flags["--partitioner"] == "dirichlet-sized" and flags["--client-samples"] == "6"
    assert flags["--strategy"] == "fedavg" and flags["--alpha"] == "1.0" and flags["--rounds"] == "1"
    assert bench.fraction_for(50, args) == 1.0  # never more than all clients
    old = bench.parser().parse_args([])  # the first protocol: digits, iid, one-shot FedDistill on Ray
    cmd = bench.command(100, old, tmp_path)
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert old.clients == [10, 25, 50, 100] and flags["--engine"] == "ray" and flags["--partitioner"] == "iid"
    assert float(flags["--fraction-train"]) == 1.0 and "--client-samples" not in flags
    continual = bench.parser().parse_args(["--scenario", "continual", "--tasks", "3"])
    cmd = bench.command(10, continual, tmp_path)
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--scenario"] == "continual" and flags["--tasks"] == "3" and "--rounds" not in flags


def test_a_tiny_sampled_local_run_completes(bench_script, tmp_path):
    bench = bench_script("bench_load")
    assert bench.main(["--clients", "20", "--fraction", "0.25", "--engine", "local", "--partitioner",
                       "dirichlet-sized", "--client-samples", "6", "--distill-iterations", "2", "--server-epochs",
                       "1", "--width", "8", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "results.json").read_text())
    assert row["ok"] and row["engine"] == "local" and row["rounds"] == 1 and row["sampled"] == 5
    assert row["replies_ok"] == 5 and row["failed"] == 0 and row["uplink_bytes"] > 0
    assert row["pool_sets"] == 5 and 0 < row["pool_bytes"] <= row["pool_bound"]
    partitions = (tmp_path / "clients20" / "partitions.txt").read_text().splitlines()
    assert len(partitions) == 21 and {line.split()[-1] for line in partitions[1:]} == {"6"}
    assert "| fed-distill | 20 | local | 5 | 1 |" in (tmp_path / "results.md").read_text()
    assert bench.main(["--plot", str(tmp_path / "load.png"), "--plot-from", str(tmp_path)]) == 0
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_node_cost_builds_the_nodes_and_the_partition(bench_script):
    bench = bench_script("bench_load")
    args = bench.parser().parse_args(["--partitioner", "dirichlet-sized", "--client-samples", "6"])
    cost = bench.node_cost(50, args)
    assert cost["clients"] == 50 and cost["bytes_per_node"] > 0
