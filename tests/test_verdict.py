"""Benchmark verdicts are judged per seed: "met" only when every seed meets the target."""

import pytest

from fedcl.verdict import Criterion, misses, seed_verdict

TARGET = (Criterion("accuracy vs FedAvg", -2.0, " points", "+.2f"), Criterion("uplink saving", 20.0, "x", ".1f"))


def test_every_seed_meeting_the_target_is_met():
    text = seed_verdict("alpha=0.1 one-shot", {0: {"accuracy vs FedAvg": -1.5, "uplink saving": 24.0},
                                               1: {"accuracy vs FedAvg": 0.3, "uplink saving": 20.0}}, TARGET)
    assert text.splitlines() == [
        "alpha=0.1 one-shot seed 0: accuracy vs FedAvg -1.50 points, uplink saving 24.0x -> meets",
        "alpha=0.1 one-shot seed 1: accuracy vs FedAvg +0.30 points, uplink saving 20.0x -> meets",
        "alpha=0.1 one-shot: target met by every seed (0, 1)",
    ]


def test_a_mean_that_meets_the_target_is_not_met_when_one_seed_misses():
    per_seed = {0: {"accuracy vs FedAvg": 3.0, "uplink saving": 24.0},
                1: {"accuracy vs FedAvg": -3.5, "uplink saving": 18.0},
                2: {"accuracy vs FedAvg": -1.0, "uplink saving": 30.0}}  # mean accuracy -0.5, mean saving 24x
    verdict = seed_verdict("v", per_seed, TARGET).splitlines()[-1]
    assert verdict == ("v: target NOT met, missed by seed 1 (accuracy vs FedAvg 1.50 points below the minimum -2 "
                       "points; uplink saving 2.00x below the minimum 20x)")
    assert "met by every seed" not in verdict


def test_misses_names_only_the_failed_criteria_and_no_seeds_is_an_error():
    assert misses({"accuracy vs FedAvg": -2.0, "uplink saving": 19.5}, TARGET) == [
        "uplink saving 0.50x below the minimum 20x"]
    with pytest.raises(ValueError, match="no seeds"):
        seed_verdict("v", {}, TARGET)


def test_bench_federated_pairs_each_seed_with_fedavg_of_the_same_seed(bench_script):
    def run(seed, variant, accuracy, uplink):
        return {"alpha": 0.1, "seed": seed, "variant": variant, "final_accuracy": accuracy, "uplink_bytes": uplink}

    results = [run(0, "fedavg", 0.80, 2000), run(1, "fedavg", 0.87, 2000),
               run(0, "one-shot", 0.83, 80), run(1, "one-shot", 0.84, 80)]  # mean gap -0.0 points, seed 1 -3
    text = bench_script("bench_federated").target_check(results, 0.1)
    assert "alpha=0.1 one-shot seed 0: accuracy vs FedAvg +3.00 points, uplink saving 25.0x -> meets" in text
    assert text.splitlines()[-1] == ("alpha=0.1 one-shot: target NOT met, missed by seed 1 (accuracy vs FedAvg "
                                     "1.00 points below the minimum -2 points)")
