"""Differentially private DM: test accuracy against the privacy budget epsilon.

Default protocol (CPU-sized, stated in the output): Fashion-MNIST, 10 images per class, ConvNet-3 width 32 with
instance norm; DM with 300 iterations x 128 expected real images per class, image lr 1.0, momentum 0.5, DSA,
init from noise for every row (DP forbids starting from real images, so the non-private row starts from noise
too and differs only in the privacy mechanism); DP delta 1e-5, clip norm sqrt(D)/2 (D = embedding size);
evaluation = fresh ConvNet-3 width 32 (SGD lr 0.01 momentum 0.9 wd 5e-4, lr x0.1 at half, DSA) x --models
networks x --epochs epochs, tested on the 10,000 test images.

    python simulations/bench_dp.py                                  # ~30 min on one shared CPU core
    python simulations/bench_dp.py --epsilons 1 4 10 --iterations 2000 --width 128 --models 3 --epochs 300

Prints a markdown table (epsilon spent, noise multiplier, accuracy) and writes OUT/dp_accuracy.png and
OUT/results.json (default OUT runs/bench_dp).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.files import save_figure, write_json
from fedcl.runtime import tune_cpu_allocator
from fedcl.train import TrainConfig, evaluate_synthetic


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 10.0],
                        help="privacy budgets to run (a non-private row is always added)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=None, help="L2 clip norm (default sqrt(D)/2)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-real", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--models", type=int, default=2, help="evaluation networks per set")
    parser.add_argument("--epochs", type=int, default=100, help="evaluation epochs per network")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_dp")
    return parser.parse_args()


def run_one(args: argparse.Namespace, data, epsilon: float | None) -> dict[str, Any]:
    """Distil with budget `epsilon` (None: no DP), evaluate, and return the row."""
    model_cfg = {"width": args.width, "depth": 3, "norm": "instancenorm"}
    distiller = create_distiller("dm", iterations=args.iterations, batch_real=args.batch_real, init="noise",
                                 dp_epsilon=epsilon, dp_delta=args.delta, dp_clip=args.clip, model_cfg=model_cfg,
                                 device=args.device, seed=args.seed, progress=True)
    start = time.perf_counter()
    synset = distiller.distill(data.train_images, data.train_labels, ipc=args.ipc, n_classes=data.n_classes,
                               source=Source.of(data))
    seconds = time.perf_counter() - start
    result = evaluate_synthetic(synset, data, model_cfg=model_cfg, n_models=args.models,
                                config=TrainConfig(epochs=args.epochs, dsa=True), device=args.device,
                                seed=args.seed, progress=True)
    dp = synset.meta.extra.get("dp") or {}
    row = {"target_epsilon": epsilon, "epsilon": dp.get("epsilon"), "delta": dp.get("delta"),
           "noise_multiplier": dp.get("noise_multiplier"), "clip": dp.get("clip"),
           "sample_rate": dp.get("sample_rate"), "seconds": seconds, **result.to_dict()}
    print(f"epsilon={epsilon}: {result} (distilled in {seconds:.0f} s)", flush=True)
    return row


def print_table(args: argparse.Namespace, device: str, rows: list[dict[str, Any]]) -> None:
    print(f"\nprotocol: {args.dataset}, ipc {args.ipc}, ConvNet-3 width {args.width} instance norm; DM "
          f"{args.iterations} iterations x {args.batch_real} expected real/class, DSA, init noise; delta "
          f"{args.delta}; evaluation {args.models} fresh networks x {args.epochs} epochs (DSA), device {device}, "
          f"seed {args.seed}\n")
    print("| target epsilon | epsilon spent | noise multiplier | clip | test accuracy % (mean +- std) | distill s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = "none (no DP)" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
        spent = "-" if row["epsilon"] is None else f"{row['epsilon']:.3f}"
        sigma = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        clip = "-" if row["clip"] is None else f"{row['clip']:.2f}"
        print(f"| {target} | {spent} | {sigma} | {clip} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} "
              f"| {row['seconds']:.0f} |")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against epsilon (log axis), the non-private accuracy as a horizontal line."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["target_epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([r["epsilon"] for r in private], [100 * r["mean"] for r in private],
                yerr=[100 * r["std"] for r in private], marker="o", capsize=3, label="DP DM")
    for r in rows:
        if r["target_epsilon"] is None:
            ax.axhline(100 * r["mean"], color="gray", linestyle="--", label="DM without DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta fixed)")
    ax.set_ylabel("test accuracy %")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    tune_cpu_allocator()
    data = load_dataset(args.dataset, args.data_root)
    rows = [run_one(args, data, eps) for eps in [*sorted(args.epsilons), None]]
    device = create_distiller("dm", device=args.device).device
    print_table(args, str(device), rows)
    out = Path(args.out)
    plot(rows, out / "dp_accuracy.png")
    write_json(out / "results.json", {"args": vars(args), "rows": rows})
    print(f"\nwrote {out / 'dp_accuracy.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
