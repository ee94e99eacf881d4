"""The `fedcl cl` command: compare continual-learning strategies, distilled replay among them, with Avalanche.

Top-level imports stay light (argparse only); Avalanche and torch load inside the handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

_BENCHMARKS = ("split-digits", "split-fmnist", "permuted-fmnist")
_STRATEGIES = ("naive", "replay", "herding", "distilled", "joint")

_EPILOG = """examples:
  fedcl cl --benchmark split-digits --strategy distilled --mem-size 20 --epochs 1 --seed 0 --out runs/cl
  fedcl cl --benchmark split-fmnist --strategy naive replay herding distilled joint --mem-size 100 --epochs 3
  fedcl cl --benchmark split-digits --strategy replay distilled --mem-bytes 7200 --storage uint8
"""


def register(subparsers: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `fedcl cl` to the `fedcl` command."""
    p = subparsers.add_parser(
        "cl", help="continual learning with Avalanche: distilled replay against naive, replay, herding, joint",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Train a ConvNet over a continual-learning benchmark with each strategy; print Avalanche's "
                    "final average accuracy, forgetting and backward transfer; write OUT/results.csv and "
                    "OUT/accuracy.png (average accuracy after each experience).")
    p.add_argument("--benchmark", default="split-digits", choices=_BENCHMARKS,
                   help="split-digits (embedded, default), split-fmnist or permuted-fmnist (5 experiences)")
    p.add_argument("--strategy", nargs="+", default=["distilled"], choices=_STRATEGIES,
                   help="one or more strategies (default distilled)")
    p.add_argument("--distiller", default="dm", help="distiller for the distilled strategy (default dm)")
    p.add_argument("--distill-iterations", type=int, default=200,
                   help="iterations of an iterative distiller such as dm (default 200)")
    p.add_argument("--mem-size", type=int, default=100, help="memory size in images, total (default 100)")
    p.add_argument("--mem-bytes", type=int, default=None,
                   help="memory size in bytes instead, the same for every memory: real-image buffers hold as many "
                        "uint8 images (one byte per pixel plus an int64 label) as fit, the distilled memory as "
                        "many synthetic images as its sets, in --storage, fit")
    p.add_argument("--storage", default="float32", choices=("float32", "float16", "uint8"),
                   help="stored form of the distilled sets (default float32; uint8 costs what a real image costs)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per experience (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="current-data samples per mini-batch (default 64)")
    p.add_argument("--batch-size-mem", type=int, default=None,
                   help="memory samples added to each mini-batch by replay strategies (default: --batch-size)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9; default 0.01)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="memory strategies: epochs on the memory alone after each experience (default 0: none)")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (default 32, CPU-friendly)")
    p.add_argument("--seed", type=int, default=0, help="seed for class order, initialisation, sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    p.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST files")
    p.add_argument("--out", default="runs/cl", help="output directory (default runs/cl)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log every run to TensorBoard under DIR (Avalanche's TensorboardLogger)")
    return {"cl": cmd_cl}


def cmd_cl(args: argparse.Namespace) -> int:
    """Run each requested strategy once and report its metrics."""
    from fedcl.avalanche.benchmarks import make_benchmark
    from fedcl.avalanche.experiment import RunConfig, run
    from fedcl.avalanche.report import markdown_table, plot_accuracy, summarise
    from fedcl.distill.base import accepted_options
    from fedcl.files import write_csv

    if args.mem_bytes is not None and args.mem_bytes < 1:
        raise SystemExit(f"fedcl cl: --mem-bytes must be >= 1, got {args.mem_bytes}")
    options = {"iterations": args.distill_iterations} if "iterations" in accepted_options(args.distiller) else {}
    benchmark = make_benchmark(args.benchmark, seed=args.seed, data_root=args.data_root)
    out = Path(args.out)
    results = []
    for name in args.strategy:
        config = RunConfig(strategy=name, mem_size=args.mem_size, mem_bytes=args.mem_bytes, storage=args.storage,
                           distiller=args.distiller,
                           distiller_options=options, epochs=args.epochs, train_mb_size=args.batch_size,
                           batch_size_mem=args.batch_size_mem or args.batch_size, lr=args.lr,
                           model_cfg={"width": args.width}, seed=args.seed, device=args.device,
                           tensorboard=args.tensorboard, finetune_epochs=args.finetune_epochs)
        print(f"{args.benchmark}: training {name} ...", flush=True)
        result = run(benchmark, config)
        results.append(result)
        print(f"  {name}: final average accuracy {100 * result.final_accuracy:.2f} %, forgetting "
              f"{100 * result.forgetting:.2f} %, BWT {100 * result.bwt:.2f} %, memory {result.memory_bytes:,} bytes "
              f"({result.train_seconds:.0f} s)")
    rows = [{"benchmark": args.benchmark, "distiller": args.distiller if r.strategy == "distilled" else "",
             "epochs": args.epochs, "width": args.width, **r.row()} for r in results]
    write_csv(rows, out / "results.csv")
    budget = f"{args.mem_size} images" if args.mem_bytes is None else f"{args.mem_bytes:,} bytes ({args.storage})"
    plot_accuracy(out / "accuracy.png", results, f"{args.benchmark}, memory {budget}")
    print(markdown_table(summarise(results)))
    print(f"wrote {out / 'results.csv'} and {out / 'accuracy.png'}")
    return 0
