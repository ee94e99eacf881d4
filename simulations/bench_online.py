"""Benchmark: online continual learning on split Fashion-MNIST, distilled replay against Avalanche's replay.

Split Fashion-MNIST (5 experiences x 2 classes, seeded class order), cut by Avalanche's `split_online_stream` into
experiences of `--experience-size` samples (default 100), each trained on once (one pass, mini-batches of
`--batch-size` current + `--batch-size-mem` memory samples).  For every memory size (default 10 and 100 images -
the same bytes for every method: real and synthetic images are both float32 images of the same shape, each with an
int64 label) and seed:
- replay:     Avalanche's ReplayPlugin with a class-balanced buffer (random samples per class);
- reservoir:  Avalanche's ReplayPlugin with a reservoir-sampling buffer (the usual online baseline);
- distilled:  fedcl's DistilledReplayPlugin (DM): a class is distilled with `--dm-iterations` the first time it
              is seen, then updated in `--update-iterations` warm-started iterations whenever it reappears.
Reports the final test accuracy over all 10 classes and the wall time per experience (training plus the memory
update), as its mean and the means over the first and last tenth of the stream (equal when the cost per experience
does not grow with the stream), and the bytes each memory holds at the end.  Prints one table row per seed and
memory size.  `--out DIR` writes DIR/results.csv as runs finish and keeps every finished run as
DIR/runs/seed<S>-<method>-mem<M>.json, which a later invocation with the same settings reads back instead of
running it again: an interrupted run resumes at the first unfinished (seed, memory, method).

Full run (hours on 2 CPU cores; minutes on a GPU):
  python simulations/bench_online.py --out runs/bench_online
Quick check (small subsets of the data, a few DM iterations):
  python simulations/bench_online.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedcl.data import load_dataset
from fedcl.data.datasets import ImageDataset
from fedcl.distill.base import Source
from fedcl.files import write_csv
from fedcl.models import create_model
from fedcl.runtime import generator, resolve_device, saved_run, seeded

METHODS = ("replay", "reservoir", "distilled")
QUICK = {"train_per_class": 100, "test_per_class": 100, "dm_iterations": 20, "update_iterations": 2,
         "batch_real": 32, "width": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small sizes for a check: {QUICK}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mem-sizes", type=int, nargs="+", default=[10, 100], help="memory sizes in images")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--experience-size", type=int, default=100, help="samples per online experience")
    p.add_argument("--train-per-class", type=int, default=None, help="training samples per class (default all)")
    p.add_argument("--test-per-class", type=int, default=None, help="test samples per class (default all)")
    p.add_argument("--dm-iterations", type=int, default=200, help="DM iterations for a class seen the first time")
    p.add_argument("--update-iterations", type=int, default=10, help="DM iterations when a class reappears")
    p.add_argument("--batch-real", type=int, default=64, help="DM real images per class per iteration")
    p.add_argument("--batch-size", type=int, default=10, help="current samples per step")
    p.add_argument("--batch-size-mem", type=int, default=10, help="memory samples per step")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--width", type=int, default=32, help="ConvNet width of the learner and of DM")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="write OUT/results.csv and OUT/runs/*.json (reused when rerun)")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def subset(images: torch.Tensor, labels: torch.Tensor, per_class: int | None,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` random samples of every class (all of them for None), to size the run."""
    if per_class is None:
        return images, labels
    gen = generator(seed)
    picks = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=gen)]
                       [:per_class] for c in torch.unique(labels).tolist()])
    return images[picks], labels[picks]


def online_stream(dataset: ImageDataset, args: argparse.Namespace, seed: int) -> list[Any]:
    """The seeded 5 x 2 class split of the (sub-sampled) training data, cut into online experiences."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.scenarios.online import split_online_stream

    from fedcl.avalanche.benchmarks import LabelledTensors

    train = LabelledTensors(*subset(dataset.train_images, dataset.train_labels, args.train_per_class, seed))
    test = LabelledTensors(*subset(dataset.test_images, dataset.test_labels, args.test_per_class, seed))
    bench = nc_benchmark(train, test, n_experiences=5, task_labels=False, shuffle=True, seed=seed)
    return list(split_online_stream(bench.train_stream, experience_size=args.experience_size, seed=seed))


def replay_plugin(method: str, mem_size: int, dataset: ImageDataset, args: argparse.Namespace, seed: int) -> Any:
    """The memory of `method` at `mem_size` images, with the run's batch composition."""
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer

    from fedcl.avalanche import DistilledReplayPlugin

    batches = {"batch_size": args.batch_size, "batch_size_mem": args.batch_size_mem}
    if method == "replay":
        return ReplayPlugin(mem_size, storage_policy=ClassBalancedBuffer(mem_size, adaptive_size=True), **batches)
    if method == "reservoir":
        return ReplayPlugin(mem_size, storage_policy=ReservoirSamplingBuffer(mem_size), **batches)
    options = {"iterations": args.dm_iterations, "batch_real": args.batch_real, "model_cfg": {"width": args.width}}
    return DistilledReplayPlugin(mem_size, "dm", distiller_options=options, update_iterations=args.update_iterations,
                                 source=Source.of(dataset), n_classes=dataset.n_classes, seed=seed, **batches)


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: ImageDataset, args: argparse.Namespace, seed: int,
             device: torch.device) -> float:
    """Test accuracy over all classes (of the same test subset the stream was built with)."""
    images, labels = subset(dataset.test_images, dataset.test_labels, args.test_per_class, seed)
    model.eval()
    correct = sum(int((model(images[i:i + 512].to(device)).argmax(dim=1).cpu() == labels[i:i + 512]).sum())
                  for i in range(0, len(labels), 512))
    return correct / len(labels)


def run_one(method: str, mem_size: int, seed: int, dataset: ImageDataset, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """Train one pass over the online stream with `method`'s memory; its accuracy, time per experience and the
    bytes its memory holds at the end."""
    from avalanche.training import Naive

    from fedcl.avalanche.experiment import memory_bytes

    stream = online_stream(dataset, args, seed)
    with seeded(seed):
        model = create_model("convnet", dataset.image_shape, dataset.n_classes, width=args.width)
    plugin = replay_plugin(method, mem_size, dataset, args, seed)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=args.batch_size, train_epochs=1,
                     eval_mb_size=512, device=device, plugins=[plugin], evaluator=None)
    seconds = []
    for exp in stream:
        start = time.perf_counter()
        strategy.train(exp)
        seconds.append(time.perf_counter() - start)
    tenth = max(1, len(seconds) // 10)
    return {"seed": seed, "mem_size": mem_size, "method": method, "experiences": len(stream),
            "accuracy": round(accuracy(model, dataset, args, seed, device), 4),
            "memory_bytes": memory_bytes(plugin, dataset.image_shape, "float32"),
            "ms_per_exp": round(1000 * sum(seconds) / len(seconds), 1),
            "ms_first_tenth": round(1000 * sum(seconds[:tenth]) / tenth, 1),
            "ms_last_tenth": round(1000 * sum(seconds[-tenth:]) / tenth, 1)}


#: Options that do not shape a run's result: which runs to make, where to write them.
_PLAN_OPTIONS = ("quick", "seeds", "mem_sizes", "methods", "out", "data_root")


def run_or_reuse(method: str, mem_size: int, seed: int, dataset: ImageDataset, args: argparse.Namespace,
                 device: torch.device) -> tuple[dict[str, Any], bool]:
    """`run_one`, or its row read back from OUT/runs when an earlier invocation made it with the same settings
    and code version (compared after a JSON round trip); a finished run is saved there at once, so an interrupted
    benchmark loses at most the run in progress.  Without --out every run is made."""
    if not args.out:
        return run_one(method, mem_size, seed, dataset, args, device), False
    settings = {k: v for k, v in vars(args).items() if k not in _PLAN_OPTIONS}
    return saved_run(Path(args.out) / "runs" / f"seed{seed}-{method}-mem{mem_size}.json",
                     {**settings, "method": method, "mem_size": mem_size, "seed": seed},
                     lambda: run_one(method, mem_size, seed, dataset, args, device))


def table(rows: list[dict[str, Any]]) -> str:
    """One line per seed and memory size: each method's accuracy, mean time per experience and memory bytes."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = "seed  mem  " + "  ".join(f"{m + ' acc':>14} {'ms/exp':>8} {'bytes':>7}" for m in methods)
    lines = [header]
    for seed, mem in dict.fromkeys((r["seed"], r["mem_size"]) for r in rows):
        cells = {r["method"]: r for r in rows if r["seed"] == seed and r["mem_size"] == mem}
        lines.append(f"{seed:>4} {mem:>4}  " + "  ".join(
            f"{cells[m]['accuracy']:>14.4f} {cells[m]['ms_per_exp']:>8.1f} {cells[m]['memory_bytes']:>7}"
            if m in cells else " " * 31
            for m in methods))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset, device = load_dataset("fashion-mnist", args.data_root), resolve_device(args.device)
    rows = []
    for seed in args.seeds:
        for mem_size in args.mem_sizes:
            for method in args.methods:
                row, reused = run_or_reuse(method, mem_size, seed, dataset, args, device)
                rows.append(row)
                print(f"{row}{' (from an earlier invocation)' if reused else ''}", flush=True)
                if args.out:
                    write_csv(rows, f"{args.out}/results.csv")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
