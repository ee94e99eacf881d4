"""Every distillation method against the published numbers: accuracy, wall time and peak memory.

For each method and images-per-class (IPC) setting, distil the training split, train `--eval-models` fresh
networks on the set (the papers' protocol: SGD lr 0.01, momentum 0.9, wd 5e-4, lr x0.1 at half, DSA
augmentation; sets with learned step sizes (DD) replay them instead) and report mean +- std test accuracy,
distillation wall time and peak memory, with the published Fashion-MNIST / MNIST numbers from
../shared/ANCHORS.md beside them.  The protocol is printed with the table and written with it.

    # the README's CPU-sized protocol at 1 image per class (about 30 minutes on one core):
    python simulations/bench_methods.py --dataset fashion-mnist --ipcs 1 --width 32 --batch-real 64 \\
        --iterations 100 --method-iterations dd=300 --eval-epochs 300 --eval-models 3 --mtt-experts runs/experts \\
        --out runs/bench_methods
    # smoke test (minutes):
    python simulations/bench_methods.py --dataset digits --ipcs 1 --iterations 2 --eval-epochs 20 \\
        --eval-models 2 --width 16 --out /tmp/bench_methods

Peak memory: on CUDA `torch.cuda.max_memory_allocated` during the distillation; on CPU the growth of the
process's resident set over its value before the run, sampled every 20 ms (so includes allocator caching).
DD runs in its fixed-initialisation mode by default (its accuracy is then that of its one known initialisation),
on its own default network (an MLP, see fedcl.distill.dd) rather than the ConvNet of `--width`; its set is
evaluated on that network.  `--method-iterations dd=300` gives one method its own iteration count.
Outputs: OUT/table.md (protocol and table, as printed) and OUT/results.json (every row, every accuracy).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.distill.base import accepted_options
from fedcl.files import atomic_write, write_json
from fedcl.runtime import resolve_device, tune_cpu_allocator
from fedcl.train import TrainConfig, evaluate_synthetic

METHODS = ("random", "herding", "dm", "dc", "dsa", "mtt", "dd")

#: Published ConvNet-3 test accuracy (%) by dataset, method and IPC, with sources, copied from ../shared/ANCHORS.md.
PUBLISHED: dict[str, dict[str, tuple[dict[int, str], str]]] = {
    "fashion-mnist": {
        "random": ({1: "51.4", 10: "73.8", 50: "82.5"}, "DC/DM-era coreset tables (unverified)"),
        "herding": ({1: "67.0", 10: "71.1", 50: "71.9"}, "DC/DM-era coreset tables (unverified)"),
        "dm": ({1: "70.7", 10: "83.5", 50: "88.1"}, "DM paper, WACV 2023 (unverified)"),
        "dc": ({1: "70.5", 10: "82.3", 50: "83.6"}, "VICO-UoE/DatasetCondensation README"),
        "dsa": ({1: "70.6", 10: "84.6", 50: "88.7"}, "VICO-UoE/DatasetCondensation README"),
        "mtt": ({1: "75.1", 10: "87.2", 50: "88.3"}, "MTT paper, CVPR 2022 (unverified)"),
        "dd": ({}, "no Fashion-MNIST number; MNIST: 93.8 with 10 images, fixed init (arXiv 1811.10959)"),
    },
    "mnist": {
        "random": ({1: "64.9", 10: "95.1", 50: "97.9"}, "DC/DM-era coreset tables (unverified)"),
        "herding": ({1: "89.2", 10: "93.7", 50: "94.8"}, "DC/DM-era coreset tables (unverified)"),
        "dm": ({1: "89.7", 10: "97.5", 50: "98.6"}, "DM paper, WACV 2023 (unverified)"),
        "dc": ({1: "91.7", 10: "97.4", 50: "98.8"}, "VICO-UoE/DatasetCondensation README"),
        "dsa": ({1: "88.7", 10: "97.8", 50: "99.2"}, "VICO-UoE/DatasetCondensation README"),
        "mtt": ({1: "91.4", 10: "97.3", 50: "98.5"}, "MTT paper, CVPR 2022 (unverified)"),
        "dd": ({1: "93.8 (fixed init)"}, "Dataset Distillation, arXiv 1811.10959"),
    },
}


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure the peak memory (MB) of the block: CUDA allocations, or the growth of resident memory on CPU."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    baseline = _rss_mb()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(peak[0], _rss_mb()) - baseline


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's command-line options that `method` takes."""
    iterations = args.method_iterations.get(method, args.iterations)
    wanted = {"iterations": iterations, "batch_real": args.batch_real, "experts": args.mtt_experts,
              "init_mode": args.dd_init_mode}
    if method == "mtt":
        wanted["lr_img"] = args.mtt_lr_img
    accepted = accepted_options(method)
    return {k: v for k, v in wanted.items() if v is not None and k in accepted}


def run_one(method: str, ipc: int, data, args: argparse.Namespace, config: TrainConfig) -> dict[str, Any]:
    """Distil one set, evaluate it, and return the row's measurements."""
    model_cfg = {} if method == "dd" else {"width": args.width}  # DD: its own default network
    options = method_options(method, args)
    distiller = create_distiller(method, model_cfg=model_cfg, device=args.device, seed=args.seed,
                                 progress=not args.quiet, **options)
    with peak_memory(distiller.device) as memory:
        synset = distiller.distill(data.train_images, data.train_labels, ipc=ipc, n_classes=data.n_classes,
                                   source=Source.of(data))
    result = evaluate_synthetic(synset, data, model_cfg=model_cfg, n_models=args.eval_models, config=config,
                                device=args.device, seed=args.seed, progress=not args.quiet)
    if args.save_sets:
        synset.save(Path(args.save_sets) / f"{method}-ipc{ipc}.safetensors")
    return {"method": method, "ipc": ipc, "options": options, "accuracy_mean": 100 * result.mean,
            "accuracy_std": 100 * result.std, "accuracies": result.accuracies,
            "seconds": synset.meta.extra["seconds"], "peak_mb": memory["peak_mb"]}


def markdown_table(rows: list[dict[str, Any]], dataset: str) -> str:
    published = PUBLISHED.get(dataset, {})
    lines = ["| method | IPC | ours: test acc. % (mean +- std) | distill time (s) | peak memory (MB) | "
             "published % | source |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        numbers, source = published.get(row["method"], ({}, "-"))
        lines.append(f"| {row['method']} | {row['ipc']} | {row['accuracy_mean']:.2f} +- {row['accuracy_std']:.2f} | "
                     f"{row['seconds']:.1f} | {row['peak_mb']:.0f} | {numbers.get(row['ipc'], '-')} | {source} |")
    return "\n".join(lines)


def protocol_text(args: argparse.Namespace, data, device: torch.device, config: TrainConfig) -> str:
    iterations = args.iterations if args.iterations is not None else "each method's default"
    return (f"Protocol: {data!r}; ConvNet-3 width {args.width}, instance norm (DD: its default MLP); distillation "
            f"iterations {iterations}, per method {args.method_iterations or 'none'}; batch_real "
            f"{args.batch_real or 'default'}; DD init mode {args.dd_init_mode}; "
            f"evaluation: {args.eval_models} fresh networks x {config.epochs} epochs (SGD lr {config.lr}, "
            f"momentum {config.momentum}, wd {config.weight_decay}, DSA {config.dsa}; DD sets replay their "
            f"learned step sizes); seed {args.seed}; device {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.  Published numbers: ../shared/ANCHORS.md (paper protocols: "
            f"1000-20000 iterations, width 128, 1000 evaluation epochs with DSA, many models).")


def parse_method_iterations(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, int]:
    """`METHOD=N` pairs as {method: iterations}; a malformed pair or an unknown method is a usage error."""
    result = {}
    for pair in pairs:
        method, _, count = pair.partition("=")
        if method not in METHODS or not count.isdigit():
            parser.error(f"--method-iterations expects METHOD=N with METHOD in {METHODS}, got {pair!r}")
        result[method] = int(count)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ipcs", nargs="+", type=int, default=[1, 10], help="images per class (default 1 10)")
    parser.add_argument("--iterations", type=int, default=None, help="distillation iterations for every learned "
                        "method (default: each method's own)")
    parser.add_argument("--method-iterations", nargs="+", default=[], metavar="METHOD=N",
                        help="iterations for one method, overriding --iterations (e.g. dd=300)")
    parser.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration")
    parser.add_argument("--width", type=int, default=128, help="ConvNet width for distillation and evaluation")
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-models", type=int, default=3)
    parser.add_argument("--no-eval-dsa", action="store_true")
    parser.add_argument("--dd-init-mode", default="fixed", choices=["fixed", "random"])
    parser.add_argument("--mtt-experts", default=None, help="directory of saved MTT experts (trained and saved "
                        "there if empty; default: trained on the fly)")
    parser.add_argument("--mtt-lr-img", type=float, default=None,
                        help="MTT's image lr (default: the distiller's, 10; 100 did better at width 32 on FMNIST)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-sets", default=None, help="also save every synthetic set into this directory")
    parser.add_argument("--out", default="runs/bench_methods", help="output directory: table.md, results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.method_iterations = parse_method_iterations(parser, args.method_iterations)

    tune_cpu_allocator()
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_root)
    config = TrainConfig(epochs=args.eval_epochs, dsa=not args.no_eval_dsa)
    protocol = protocol_text(args, data, device, config)
    print(protocol, flush=True)
    rows = []
    start = time.perf_counter()
    for ipc in args.ipcs:
        for method in args.methods:
            rows.append(run_one(method, ipc, data, args, config))
            row = rows[-1]
            print(f"{method} ipc={ipc}: {row['accuracy_mean']:.2f} +- {row['accuracy_std']:.2f} % "
                  f"({row['seconds']:.1f} s, {row['peak_mb']:.0f} MB)", flush=True)
    table = markdown_table(rows, data.name)
    text = f"{protocol}\n\n{table}\n\nTotal wall time {time.perf_counter() - start:.0f} s.\n"
    print("\n" + text)
    out = Path(args.out)
    atomic_write(out / "table.md", lambda f: f.write(text.encode()))
    write_json(out / "results.json", {"protocol": protocol, "args": vars(args), "rows": rows})
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
