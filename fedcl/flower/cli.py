"""`fedcl simulate`: run the federated app in-process on Flower's simulation engine and write its results.

Kept light at import time (argparse only); Flower, Ray and torch are imported inside the handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

_EXAMPLES = """examples:
  fedcl simulate --dataset digits --clients 3 --strategy fed-distill --rounds 1 --seed 0 --out runs/sim
  fedcl simulate --dataset digits --clients 3 --strategy fedavg --rounds 5 --out runs/sim-fedavg
  fedcl simulate --dataset fashion-mnist --clients 10 --alpha 0.1 --strategy hybrid --rounds 20 --out runs/hybrid
  fedcl simulate --dataset digits --clients 10 --screen embedding --out runs/screened
  fedcl simulate ... --rounds 5 --out runs/sim --resume      # after a crash: continue from the last round done
"""


def register(subparsers: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from fedcl.flower.settings import STRATEGIES

    p = subparsers.add_parser(
        "simulate", help="run a federated simulation (FedAvg, FedDistill or the hybrid) with Flower",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Run the fedcl Flower app with Flower's simulation engine (Ray): OUT/rounds.csv (round, "
                    "accuracy, uplink_bytes, downlink_bytes, ...), OUT/accuracy.png, OUT/summary.md|json and "
                    "OUT/partitions.txt|png.")
    p.add_argument("--dataset", default="digits", help="digits (embedded, default), fashion-mnist, mnist, cifar10")
    p.add_argument("--data-root", default="", help="directory with the dataset files")
    p.add_argument("--clients", type=int, default=3, help="number of simulated clients (default 3)")
    p.add_argument("--strategy", default="fed-distill", choices=STRATEGIES, help="default fed-distill")
    p.add_argument("--rounds", type=int, default=1, help="federated rounds (default 1: one-shot FedDistill)")
    p.add_argument("--seed", type=int, default=0, help="seed of partitions, models and distillation (default 0)")
    p.add_argument("--out", default="runs/simulate", help="output directory (default runs/simulate)")
    p.add_argument("--partitioner", default="dirichlet", choices=("iid", "dirichlet", "classes"),
                   help="how the training split is shared out (default dirichlet)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--classes-per-client", type=int, default=2, help="k of --partitioner classes (default 2)")
    p.add_argument("--model", default="convnet", help="global model: convnet (default), mlp, lenet")
    p.add_argument("--width", type=int, default=32, help="ConvNet/MLP width (default 32, CPU-sized)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class per client (default 10)")
    p.add_argument("--distill-iterations", type=int, default=100, help="client DM iterations (default 100)")
    p.add_argument("--upload-dtype", default="float32", choices=("float32", "float16"),
                   help="wire format of uploaded synthetic images (float16 halves the uplink; default float32)")
    p.add_argument("--local-epochs", type=int, default=1, help="FedAvg local epochs (default 1)")
    p.add_argument("--server-epochs", type=int, default=100,
                   help="fed-distill: server epochs on the pooled memory per round (default 100)")
    p.add_argument("--finetune-epochs", type=int, default=10,
                   help="hybrid: server fine-tuning epochs per round (default 10)")
    p.add_argument("--memory", default="all", choices=("all", "latest"), help="pooled memory policy (default all)")
    p.add_argument("--screen", default="none",
                   help="poisoning screen of incoming synthetic sets: none (default) or embedding (fedcl.screen)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint of the last completed round under --out (same settings)")
    p.add_argument("--fraction-evaluate", type=float, default=0.0,
                   help="fraction of clients that also evaluate the global model locally (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:i]")
    p.add_argument("--gpu-fraction", type=float, default=None,
                   help="GPU share per client when CUDA is present (default max(0.25, 1/clients))")
    p.add_argument("--verbose", action="store_true", help="Flower debug logging")
    return {"simulate": cmd_simulate}


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedcl.flower.results import markdown_table, summarise
    from fedcl.flower.settings import FedSettings
    from fedcl.flower.simulation import simulate, write_partitions

    if args.clients < 1:
        raise ValueError(f"--clients must be >= 1, got {args.clients}")
    settings = FedSettings(
        dataset=args.dataset, data_root=args.data_root, partitioner=args.partitioner, alpha=args.alpha,
        classes_per_client=args.classes_per_client, seed=args.seed, model=args.model, width=args.width,
        strategy=args.strategy, num_rounds=args.rounds, fraction_evaluate=args.fraction_evaluate,
        min_nodes=args.clients, ipc=args.ipc, distill_iterations=args.distill_iterations,
        upload_dtype=args.upload_dtype, local_epochs=args.local_epochs, server_epochs=args.server_epochs,
        finetune_epochs=args.finetune_epochs, memory=args.memory, screen=args.screen, out_dir=args.out,
        resume=args.resume, device=args.device)
    if args.resume:
        from fedcl.flower.server_app import resume_round

        done = resume_round(settings)
        print(f"resuming after round {done}" if done else f"no checkpoint under {args.out}: starting from round 1")
    print(write_partitions(settings, args.clients))
    rows = simulate(settings, args.clients, gpu_fraction=args.gpu_fraction, verbose=args.verbose)
    print(markdown_table([summarise(rows, args.strategy)]))
    print(f"wrote {args.out}/rounds.csv, accuracy.png, summary.md, partitions.png")
    return 0
