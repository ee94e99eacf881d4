"""The ordinary Avalanche pipeline with the plugin's defaults: distilled replay against Avalanche's ReplayPlugin.

What a user writes first: split Fashion-MNIST (5 experiences of 2 classes, the seeded class order of
`fedcl.avalanche.make_benchmark`), Avalanche's `SimpleMLP`, `Naive` with SGD (lr 0.01, momentum 0.9), mini-batches
of 128, 1 epoch per experience, and either `ReplayPlugin(mem_size=M)` or `DistilledReplayPlugin(mem_size=M,
distiller="dm")` with nothing else set - so the distiller runs at the plugin's device defaults (on CPU a budget
sized for an ordinary pipeline; see `fedcl.avalanche.buffer`).  Both memories hold M images of the same float32
form (the same bytes).  Prints, per seed and memory size: the final average accuracy over the whole test stream
of both, the gap, and the wall time of the whole run; then the verdict per seed against the targets (gap >= 5
points at M=10 and >= 3 at M=100; a distilled run <= 10 minutes).

    OMP_NUM_THREADS=1 python simulations/bench_pipeline.py --seeds 0 1 2 --mem-sizes 10 100 --out runs/pipeline

With --out, every finished run is saved at once and reused by a later invocation with the same settings and code
version, so the benchmark can be completed over several invocations.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from fedcl.files import write_json
from fedcl.runtime import saved_run, seeded

METHODS = ("replay", "distilled")
TARGETS = {10: 5.0, 100: 3.0}  # points of final average accuracy distilled replay must gain, by memory size
MAX_MINUTES = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mem-sizes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--benchmark", default="split-fmnist", help="split-fmnist (default) or split-digits")
    p.add_argument("--out", default=None, help="keep every finished run under OUT/runs (reused when rerun)")
    return p.parse_args(argv)


def run_one(method: str, mem_size: int, seed: int, benchmark_name: str) -> dict[str, Any]:
    """Train the pipeline once with `method`'s plugin; its final stream accuracy and wall time."""
    from avalanche.models import SimpleMLP
    from avalanche.training import Naive
    from avalanche.training.plugins import ReplayPlugin

    from fedcl.avalanche import DistilledReplayPlugin, make_benchmark

    start = time.perf_counter()
    benchmark = make_benchmark(benchmark_name, seed=seed)
    with seeded(seed):
        model = SimpleMLP(num_classes=benchmark.n_classes, input_size=math.prod(benchmark.dataset.image_shape))
    plugin = ReplayPlugin(mem_size=mem_size) if method == "replay" else \
        DistilledReplayPlugin(mem_size=mem_size, distiller="dm", seed=seed)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=128, train_epochs=1, eval_mb_size=512,
                     device="cpu", plugins=[plugin], evaluator=_quiet_evaluator())
    torch.manual_seed(seed)  # Avalanche's loaders shuffle with the global generator
    for experience in benchmark.scenario.train_stream:
        strategy.train(experience)
    metrics = strategy.eval(benchmark.scenario.test_stream)
    accuracy = next(v for k, v in metrics.items() if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))
    return {"method": method, "mem_size": mem_size, "seed": seed, "accuracy": round(float(accuracy), 4),
            "seconds": round(time.perf_counter() - start, 1)}


def _quiet_evaluator() -> Any:
    """Avalanche's accuracy metrics without its default console logger (the bench prints its own lines)."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])


def run_or_reuse(method: str, mem_size: int, seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """`run_one`, or its row from OUT/runs when an earlier invocation made it with the same settings and code."""
    if not args.out:
        return run_one(method, mem_size, seed, args.benchmark), False
    return saved_run(Path(args.out) / "runs" / f"seed{seed}-{method}-mem{mem_size}.json",
                     {"benchmark": args.benchmark, "method": method, "mem_size": mem_size, "seed": seed},
                     lambda: run_one(method, mem_size, seed, args.benchmark))


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (seed, memory size): the gap and the time, against the targets."""
    by_key = {(r["seed"], r["mem_size"], r["method"]): r for r in rows}
    lines = []
    for seed, mem_size in sorted({(r["seed"], r["mem_size"]) for r in rows}):
        ours, theirs = by_key.get((seed, mem_size, "distilled")), by_key.get((seed, mem_size, "replay"))
        if ours is None or theirs is None:
            continue
        gap = 100 * (ours["accuracy"] - theirs["accuracy"])
        target = TARGETS.get(mem_size)
        minutes = ours["seconds"] / 60
        met = (target is None or gap >= target) and minutes <= MAX_MINUTES
        wanted = f"+{target:.0f}" if target else "-"
        lines.append(f"seed {seed} mem {mem_size:4d}: distilled {100 * ours['accuracy']:6.2f} % vs replay "
                     f"{100 * theirs['accuracy']:6.2f} %: {gap:+.2f} points (target {wanted}), distilled run "
                     f"{minutes:.1f} min (<= {MAX_MINUTES:.0f}): {'met' if met else 'missed'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for seed in args.seeds:
        for mem_size in args.mem_sizes:
            for method in METHODS:
                row, reused = run_or_reuse(method, mem_size, seed, args)
                rows.append(row)
                print(f"{row}{' (from an earlier invocation)' if reused else ''}", flush=True)
    lines = verdicts(rows)
    print("\n".join(lines))
    if args.out:
        write_json(Path(args.out) / "results.json", {"rows": rows, "verdicts": lines})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
