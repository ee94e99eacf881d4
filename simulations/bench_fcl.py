"""Federated continual learning benchmark: naive FedAvg, random real-image replay, distilled replay and distilled
replay + server memory, at the same memory budget.

The issue's protocol (defaults): split Fashion-MNIST into 5 tasks of 2 classes (seeded class order), 10 clients,
each task's data shared out by Dirichlet(0.5) label skew, a memory of 10 images per class per client, seeds 0 1 2.
Per task: `--rounds` FedAvg rounds (every client trains `--local-epochs` on its share of the task, each mini-batch
mixed with `--replay-batch-size` memory samples), then one distillation round (the clients distil the task into
their memory: DM for the distilled strategies, a random real subset for random replay; fed-distill-server also
uploads the new synthetic sets, fine-tunes the global model on the server's memory and sends each client a
class-balanced slice of the classes it never had).  ConvNet-3 at width 32 (CPU-sized).  Every run goes through
Flower's simulation engine (the same apps as `fedcl simulate --scenario continual` and `flwr run`).

Prints a markdown table (final average accuracy, forgetting and backward transfer, mean +- std over seeds; bytes up
and down per run) and the distilled - random gap; writes OUT/tasks.csv, OUT/accuracy.png, OUT/summary.md|json
and one folder per run.  A run that finished in an earlier invocation with the same settings is reused, so the
protocol (hours on a CPU) can be completed over several invocations, or split across processes by seed or strategy
with the same --out.

    python simulations/bench_fcl.py --out runs/bench_fcl                                   # the full protocol
    python simulations/bench_fcl.py --seeds 0 --rounds 1 --out runs/bench_fcl_small       # a CPU-sized run
    python simulations/bench_fcl.py --label-temperature 2 --out runs/bench_fcl_soft       # soft-labelled memories
    python simulations/bench_fcl.py --replay-dsa --out runs/bench_fcl_dsa                 # augmented replay
    python simulations/bench_fcl.py --rehearsal-epochs 5 --out runs/bench_fcl_rehearse    # + a memory-only round
"""

from __future__ import annotations

import argparse
import time

from fedcl.flower.comparison import LABELS, print_comparison, run_comparison
from fedcl.flower.settings import FedSettings
from fedcl.runtime import tune_cpu_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration within each task")
    parser.add_argument("--ipc", type=int, default=10, help="memory: images per class per client (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds per task (default 3)")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs per round (default 2)")
    parser.add_argument("--local-lr", type=float, default=0.05, help="local SGD learning rate (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="local mini-batch: new samples, plus as many memory samples (default 64)")
    parser.add_argument("--replay-dsa", action="store_true",
                        help="DSA-augment the memory samples of every mini-batch (every memory strategy alike)")
    parser.add_argument("--rehearsal-epochs", type=int, default=0,
                        help="at each task's end every client also trains the model this many epochs on its memory "
                             "alone and the server averages them (every memory strategy alike; default 0: off)")
    parser.add_argument("--width", type=int, default=32, help="ConvNet-3 width (default 32, CPU-sized)")
    parser.add_argument("--distill-iterations", type=int, default=200, help="client DM iterations (default 200)")
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--init", default="noise", choices=("noise", "real"),
                        help="where client distillation starts (default noise: no memory image starts as a real one)")
    parser.add_argument("--distiller-opt", default="", help="client DM options, KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--dp-epsilon", type=float, default=0.0,
                        help="differentially private client distillation: each client's budget over all its "
                             "uploads (default 0: off)")
    parser.add_argument("--finetune-epochs", type=int, default=10,
                        help="fed-distill-server: server epochs on its memory at each task's end (default 10)")
    parser.add_argument("--label-temperature", type=float, default=0.0,
                        help="memory strategies: soft labels from the global model at temperature T (0 = hard)")
    parser.add_argument("--upload-dtype", default="float16", choices=("float32", "float16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="clients in this process one after another (local, default) or Flower's Ray engine")
    parser.add_argument("--out", default="runs/bench_fcl")
    args = parser.parse_args()

    tune_cpu_allocator()
    settings = FedSettings(dataset=args.dataset, data_root=args.data_root, scenario="continual", tasks=args.tasks,
                           alpha=args.alpha, ipc=args.ipc, rounds_per_task=args.rounds, local_epochs=args.local_epochs,
                           local_lr=args.local_lr, local_batch_size=args.batch_size,
                           replay_batch_size=args.batch_size, replay_dsa=args.replay_dsa,
                           rehearsal_epochs=args.rehearsal_epochs, width=args.width,
                           distill_iterations=args.distill_iterations, batch_real=args.batch_real,
                           init=args.init, distiller_opt=args.distiller_opt, dp_epsilon=args.dp_epsilon,
                           finetune_epochs=args.finetune_epochs, upload_dtype=args.upload_dtype,
                           label_temperature=args.label_temperature, device=args.device)
    start = time.perf_counter()
    table = run_comparison(settings, args.clients, args.strategies, args.seeds, args.out, engine=args.engine)
    print(f"{args.dataset}: {args.clients} clients, {args.tasks} tasks, Dirichlet {args.alpha}, memory {args.ipc} "
          f"images per class per client, seeds {args.seeds}, {args.rounds} rounds x {args.local_epochs} local "
          f"epochs per task, DM {args.distill_iterations} iterations from {args.init} {args.distiller_opt}"
          f"{f' DP epsilon {args.dp_epsilon}' if args.dp_epsilon else ''}, width "
          f"{args.width}, label temperature "
          f"{args.label_temperature}, replay DSA {'on' if args.replay_dsa else 'off'}, rehearsal epochs "
          f"{args.rehearsal_epochs}")
    print_comparison(table)
    print(f"total wall time {time.perf_counter() - start:.0f} s; wrote {args.out}/tasks.csv, accuracy.png, "
          "summary.md")


if __name__ == "__main__":
    main()
