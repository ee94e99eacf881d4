"""simulations/bench_poison.py end to end on digits, tiny: the screen refuses the attacker and reports every
client's score, the server models are trained once per distinct pool, and --screen-threshold reaches the screen."""

import json

TINY = ["--dataset", "digits", "--clients", "5", "--attackers", "1", "--distill-iterations", "2", "--server-epochs",
        "1", "--models", "1", "--width", "8", "--device", "cpu"]


def _counting(bench) -> list[tuple[int, ...]]:
    """Record the clients of every pool the bench trains server models on."""
    pools, train = [], bench.pool_accuracies

    def counted(memory, data, args):
        pools.append(tuple(memory.sets))
        return train(memory, data, args)

    bench.pool_accuracies = counted
    return pools


def test_bench_screens_the_attacker_reports_scores_and_trains_each_pool_once(tmp_path, bench_script):
    bench = bench_script("bench_poison")
    pools = _counting(bench)
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 0
    rows = {(r["attack"], r["screen"]): r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert len(rows) == 7
    for attack in ("flip", "noise"):
        screened = rows[(attack, "embedding")]
        assert screened["kept_clients"] == [1, 2, 3, 4] and rows[(attack, "none")]["kept"] == 5
        scores = {int(i): s for i, s in screened["scores"].items()}
        assert scores[0] > 2.5 > max(scores[i] for i in range(1, 5))
        assert screened["accuracies"] == rows[("absent", "none")]["accuracies"]
    assert rows[("none", "embedding")]["kept"] == 5
    assert pools == [(0, 1, 2, 3, 4), (1, 2, 3, 4), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4)]  # clean, honest, flip, noise
    table = (tmp_path / "results.md").read_text()
    assert "| max honest score | min attacker score |" in table and "screen threshold 2.5" in table
    flip = {int(i): s for i, s in rows[("flip", "embedding")]["scores"].items()}
    assert f"| {max(flip[i] for i in range(1, 5)):.2f} | {flip[0]:.2f} |" in table  # honest max, attacker min
    assert "| none | none | 5/5 |" in table and "| - | - |" in table


def test_bench_threshold_option_reaches_the_screen(tmp_path, bench_script):
    bench = bench_script("bench_poison")
    assert bench.main([*TINY, "--screen-threshold", "1000", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert all(r["kept"] == 5 for r in results if r["attack"] != "absent")
    assert "screen threshold 1000.0" in (tmp_path / "results.md").read_text()
