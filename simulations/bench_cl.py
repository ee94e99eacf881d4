"""Benchmark: distilled replay against Avalanche's replay baselines at equal memory (issue 4).

Split Fashion-MNIST, class-incremental, 5 experiences x 2 classes; for each memory size (default 100 images =
10 per class, and 10 images = 1 per class) and each seed: naive fine-tuning (lower bound), Avalanche ReplayPlugin
with random class-balanced selection, herding selection, fedcl's DistilledReplayPlugin (DM), and joint training
(upper bound).  Every strategy uses the same ConvNet (width 32 by default: CPU-friendly; the papers use 128),
SGD, epochs and batch composition (`--batch-size` current + `--batch-size-mem` memory samples per step).

Writes OUT/results.csv (one row per run, written as runs finish), OUT/summary.csv, OUT/results.md (the table,
mean +- std over seeds) and OUT/accuracy-mem<M>.png.  The protocol takes hours on a CPU, so each finished run is
also kept as OUT/runs/seed<S>-<strategy>-mem<M>.json and reused by a later invocation with the same benchmark and
run settings: rerunning the same command continues where an interrupted one stopped.  Full run (CPU, 2 cores):

  python simulations/bench_cl.py --benchmark split-fmnist --seeds 3 --mem-sizes 100 10 --epochs 3 \
      --distill-iterations 1000 --out runs/bench_cl

Tiny check:  python simulations/bench_cl.py --benchmark split-digits --seeds 1 --epochs 2 --distill-iterations 20
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from fedcl.avalanche.benchmarks import CLBenchmark, available_benchmarks, make_benchmark
from fedcl.avalanche.experiment import STRATEGIES, RunConfig, RunResult, run
from fedcl.avalanche.report import markdown_table, plot_accuracy, summarise
from fedcl.files import atomic_write, write_csv
from fedcl.runtime import saved_run

_MEMORYLESS = ("naive", "joint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="split-fmnist", choices=available_benchmarks())
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (class order, init, sampling; default 3)")
    p.add_argument("--mem-sizes", type=int, nargs="+", default=[100, 10], help="memory sizes in images")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--distiller", default="dm", help="distiller of the distilled strategy (default dm)")
    p.add_argument("--distill-iterations", type=int, default=1000, help="DM iterations per experience")
    p.add_argument("--batch-real", type=int, default=256, help="DM real images per class per iteration")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per experience")
    p.add_argument("--batch-size", type=int, default=128, help="current samples per step")
    p.add_argument("--batch-size-mem", type=int, default=128, help="memory samples per step (replay strategies)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="every memory strategy: epochs on the memory alone after each experience (default 0: none)")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (default 32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="runs/bench_cl")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """(seed, strategy, memory size) of every run; strategies without memory run once per seed."""
    runs = []
    for seed in range(args.seeds):
        for strategy in args.strategies:
            sizes = [0] if strategy in _MEMORYLESS else args.mem_sizes
            runs += [(seed, strategy, size) for size in sizes]
    return runs


def run_or_reuse(benchmark_name: str, benchmark: Callable[[], CLBenchmark], config: RunConfig,
                 out: Path) -> tuple[RunResult, bool]:
    """Run one (seed, strategy, memory) or read it back from an earlier invocation with the same settings.

    The saved settings are compared after a JSON round trip, so a run is reused only where nothing that shapes
    it (the code version, benchmark, epochs, distiller options, batch sizes, width, device, ...) has changed."""
    path = out / "runs" / f"seed{config.seed}-{config.strategy}-mem{config.mem_size}.json"
    saved, reused = saved_run(path, {"benchmark": benchmark_name, **asdict(config)},
                              lambda: asdict(run(benchmark(), config)))
    return RunResult(**saved), reused


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    distill_options = {"iterations": args.distill_iterations, "batch_real": args.batch_real} \
        if args.distiller == "dm" else {}
    results: list[RunResult] = []
    rows: list[dict] = []
    start = time.perf_counter()

    @functools.lru_cache(maxsize=1)  # one seed's benchmark at a time, built only when a run is not reused
    def benchmark(seed: int) -> CLBenchmark:
        return make_benchmark(args.benchmark, seed=seed, data_root=args.data_root)

    for seed, strategy, mem_size in plan(args):
        config = RunConfig(strategy=strategy, mem_size=mem_size, distiller=args.distiller,
                           distiller_options=distill_options, epochs=args.epochs, train_mb_size=args.batch_size,
                           batch_size_mem=args.batch_size_mem, lr=args.lr, model_cfg={"width": args.width},
                           seed=seed, device=args.device, finetune_epochs=args.finetune_epochs)
        result, reused = run_or_reuse(args.benchmark, functools.partial(benchmark, seed), config, out)
        results.append(result)
        rows.append({"benchmark": args.benchmark, "epochs": args.epochs, "width": args.width, **result.row()})
        write_csv(rows, out / "results.csv")
        print(f"seed {seed} {strategy:9s} memory {mem_size:4d}: final accuracy {100 * result.final_accuracy:6.2f} %"
              f"  forgetting {100 * result.forgetting:6.2f}  ({result.train_seconds:.0f} s, "
              f"{time.perf_counter() - start:.0f} s total){' (from an earlier invocation)' if reused else ''}",
              flush=True)
    summary = summarise(results)
    write_csv(summary, out / "summary.csv")
    table = markdown_table(summary)
    header = (f"{args.benchmark}, 5 experiences, ConvNet width {args.width}, {args.epochs} epochs per experience, "
              f"SGD lr {args.lr} momentum 0.9, batch {args.batch_size} current + {args.batch_size_mem} memory, "
              f"{args.distiller} {distill_options}, memory fine-tuning {args.finetune_epochs} epochs per experience, "
              f"{args.seeds} seed(s); memory 0 = no memory\n\n")
    atomic_write(out / "results.md", lambda f: f.write((header + table + "\n").encode()))
    for size in args.mem_sizes:
        chosen = [r for r in results if r.mem_size in (0, size)]
        plot_accuracy(out / f"accuracy-mem{size}.png", chosen, f"{args.benchmark}, memory {size} images")
    print(header + table)
    print(f"wrote {out}/results.csv, summary.csv, results.md, accuracy-mem*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
