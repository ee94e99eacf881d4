"""`fedcl simulate` (the federated app in-process on Flower's simulation engine) and `fedcl demo` (the main job:
the federated continual comparison on digits).

Kept light at import time (argparse only); Flower, Ray and torch are imported inside the handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcl.flower.settings import FedSettings

_EXAMPLES = """examples:
  fedcl simulate --dataset digits --clients 3 --strategy fed-distill --rounds 1 --seed 0 --out runs/sim
  fedcl simulate --dataset digits --clients 3 --strategy fedavg --rounds 5 --out runs/sim-fedavg
  fedcl simulate --dataset fashion-mnist --clients 10 --alpha 0.1 --strategy hybrid --rounds 20 --out runs/hybrid
  fedcl simulate --scenario continual --dataset digits --clients 3 --tasks 2 --strategy fed-distill --seed 0 \
      --out runs/fcl      # federated continual learning: OUT/tasks.csv (task, avg_accuracy, forgetting, ...)
  fedcl simulate --dataset digits --clients 10 --screen embedding --out runs/screened
  fedcl simulate ... --rounds 5 --out runs/sim --resume      # after a crash: continue from the last round done
"""


def register(subparsers: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from fedcl.flower.settings import add_arguments

    p = subparsers.add_parser(
        "simulate", help="run a federated simulation (FedAvg, FedDistill, the hybrid or a continual task stream)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Run the fedcl Flower app in this process (--engine local) or on Flower's Ray simulation "
                    "engine: OUT/rounds.csv (round, accuracy, uplink_bytes, downlink_bytes, ...), OUT/accuracy.png, "
                    "OUT/summary.md|json and OUT/partitions.txt|png; continual: OUT/tasks.csv too.  Every option "
                    "but the last four is a FedSettings field (a key of the run config).")
    add_arguments(p, defaults={"out_dir": "runs/simulate"})
    p.add_argument("--clients", type=int, default=3, help="number of simulated clients (default 3)")
    p.add_argument("--gpu-fraction", type=float, default=None,
                   help="GPU share per client when CUDA is present (default max(0.25, 1/clients))")
    p.add_argument("--engine", default="ray", choices=("ray", "local"),
                   help="Flower's simulation engine (ray, default) or the clients in this process one after another")
    p.add_argument("--verbose", action="store_true", help="Flower debug logging")
    _register_demo(subparsers)
    return {"simulate": cmd_simulate, "demo": cmd_demo}


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job: federated continual learning on digits, five strategies compared",
        description="Federated continual learning on the embedded digits dataset: every client learns a "
                    "class-incremental stream of tasks (its Dirichlet share of each task's classes), FedAvg over "
                    "clients, and five strategies compared at the same client memory (images per class): naive "
                    "federated fine-tuning, random and herding real-image replay, distilled replay (DM) and "
                    "distilled replay + server memory, over three seeds.  Prints the table (with the uplink and the "
                    "uploaded near-copies of each strategy) and which distilled strategy wins; writes OUT/tasks.csv, "
                    "OUT/accuracy.png, OUT/summary.md and one folder per run.")
    p.add_argument("--dataset", default="digits", help="digits (default), fashion-mnist, mnist")
    p.add_argument("--data-root", default="", help="directory with the dataset files")
    p.add_argument("--clients", type=int, default=3, help="clients (default 3)")
    p.add_argument("--tasks", type=int, default=5, help="tasks (default 5 of 2 classes)")
    p.add_argument("--rounds", type=int, default=2, help="FedAvg rounds per task (default 2)")
    p.add_argument("--local-epochs", type=int, default=5, help="local epochs per round (default 5)")
    p.add_argument("--local-lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="local mini-batch: new samples, plus as many memory samples (default 16)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration within each task (0.5)")
    p.add_argument("--ipc", type=int, default=10, help="memory: images per class per client (default 10)")
    p.add_argument("--distill-iterations", type=int, default=100, help="client DM iterations (default 100)")
    p.add_argument("--distiller-opt", default="lr_img=10",
                   help="client DM options, KEY=VALUE[,KEY=VALUE] (default lr_img=10: 100 iterations from noise "
                        "need larger pixel steps than the paper's 1.0, which suits 1,000 and more)")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (default 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--strategies", nargs="+", default=None, help="subset of the five (default all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:i]")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="clients in this process one after another (local, default) or Flower's Ray engine")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--verbose", action="store_true", help="show Flower's per-round log")


def cmd_demo(args: argparse.Namespace) -> int:
    from fedcl.flower.comparison import LABELS, print_comparison, run_comparison
    from fedcl.flower.settings import FedSettings

    settings = FedSettings(dataset=args.dataset, data_root=args.data_root, scenario="continual", tasks=args.tasks,
                           rounds_per_task=args.rounds, local_epochs=args.local_epochs, local_lr=args.local_lr,
                           local_batch_size=args.batch_size, replay_batch_size=args.batch_size, alpha=args.alpha,
                           ipc=args.ipc, distill_iterations=args.distill_iterations,
                           distiller_opt=args.distiller_opt, width=args.width, device=args.device)
    table = run_comparison(settings, args.clients, args.strategies or list(LABELS), args.seeds, args.out,
                           engine=args.engine, verbose=args.verbose)
    print_comparison(table)
    print(f"wrote {args.out}/tasks.csv, accuracy.png, summary.md")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedcl.flower.results import markdown_table, read_csv, summarise, task_summary, task_table
    from fedcl.flower.simulation import simulate, write_partitions

    settings = simulate_settings(args)
    if args.resume:
        from fedcl.flower.server_app import resume_round

        done = resume_round(settings)
        print(f"resuming after round {done}" if done else f"no checkpoint under {args.out_dir}: starting from round 1")
    print(write_partitions(settings, args.clients))
    rows = simulate(settings, args.clients, gpu_fraction=args.gpu_fraction, verbose=args.verbose,
                    engine=args.engine)
    if settings.scenario == "continual":
        print(task_table([task_summary(read_csv(Path(args.out_dir) / "tasks.csv"), args.strategy)]))
        print(f"wrote {args.out_dir}/tasks.csv, tasks.png, rounds.csv, summary.md, partitions.png")
        return 0
    print(markdown_table([summarise(rows, args.strategy)]))
    print(f"wrote {args.out_dir}/rounds.csv, accuracy.png, summary.md, partitions.png")
    return 0


def simulate_settings(args: argparse.Namespace) -> FedSettings:
    """The FedSettings of a `fedcl simulate` command line (ValueError on a bad value, before anything runs)."""
    from fedcl.flower.settings import from_args

    if args.clients < 1:
        raise ValueError(f"--clients must be >= 1, got {args.clients}")
    return from_args(args, min_nodes=args.clients)
