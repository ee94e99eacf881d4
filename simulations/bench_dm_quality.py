"""DM quality: distilled images versus a random real subset of the same size, under the same evaluation.

Default protocol (CPU-sized, stated in the output): Fashion-MNIST, 10 images per class, ConvNet-3 width 128 with
instance norm; DM with 400 iterations x 128 real images per class (paper: 20,000 x 256), image lr 1.0, momentum
0.5, DSA, init from real images; evaluation = the papers' protocol (fresh ConvNet-3, SGD lr 0.01 momentum 0.9
wd 5e-4, lr x0.1 at half, 300 epochs with DSA) over --models networks, tested on the 10,000 test images.

    python simulations/bench_dm_quality.py                  # ~25 min on 2 CPU cores
    python simulations/bench_dm_quality.py --iterations 20000 --batch-real 256 --models 5   # paper protocol, GPU

`--source-per-class N` distils from N random real images per class instead of the whole training set: the share
of a class that one client of a federation holds, which is what a client's memory is distilled from (and what the
random subset is drawn from).  `--eval-width` trains the evaluation networks at another width than the one DM
embeds with (the reduced federated continual runs train width 16).

Prints a markdown table and ends with `dm_minus_random_points=<float>`; --json writes the raw results.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedcl.data import ImageDataset, load_dataset
from fedcl.data.sampling import ClassIndex
from fedcl.distill import Source, create_distiller
from fedcl.runtime import tune_cpu_allocator
from fedcl.train import TrainConfig, evaluate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch-real", type=int, default=128)
    parser.add_argument("--width", type=int, default=128, help="ConvNet-3 width DM embeds with (default 128)")
    parser.add_argument("--eval-width", type=int, default=None, help="evaluation networks' width (default --width)")
    parser.add_argument("--source-per-class", type=int, default=0,
                        help="distil from this many random real images per class (default 0: all of them)")
    parser.add_argument("--models", type=int, default=3, help="evaluation networks per set")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs per network")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tune_cpu_allocator()
    data = load_dataset(args.dataset, args.data_root)
    images, labels = source_share(data, args.source_per_class, args.seed)
    model_cfg = {"width": args.width, "depth": 3, "norm": "instancenorm"}
    eval_cfg = {**model_cfg, "width": args.eval_width or args.width}
    config = TrainConfig(epochs=args.epochs, dsa=True)
    rows = {}
    for method, options in (("dm", {"iterations": args.iterations, "batch_real": args.batch_real}), ("random", {})):
        distiller = create_distiller(method, model_cfg=model_cfg, device=args.device, seed=args.seed,
                                     progress=True, **options)
        start = time.perf_counter()
        synset = distiller.distill(images, labels, ipc=args.ipc, n_classes=data.n_classes, source=Source.of(data))
        seconds = time.perf_counter() - start
        result = evaluate_synthetic(synset, data, model_cfg=eval_cfg, n_models=args.models, config=config,
                                    device=args.device, seed=args.seed, progress=True)
        rows[method] = {"result": result, "seconds": seconds, "images": len(synset)}
        print(f"{method}: {result} (distilled in {seconds:.0f} s)", flush=True)

    share = f"{args.source_per_class} real images per class" if args.source_per_class else "the whole training set"
    print(f"\nprotocol: {data.name}, ipc {args.ipc} from {share}, ConvNet-3 width {args.width} instance norm; DM "
          f"{args.iterations} iterations x {args.batch_real} real/class, DSA, init real; evaluation "
          f"{args.models} fresh width-{eval_cfg['width']} networks x {args.epochs} epochs (SGD 0.01, momentum 0.9, "
          f"wd 5e-4, DSA), device {distiller.device}, seed {args.seed}\n")
    print("| set | images | test accuracy % (mean +- std) | models | distill time s |")
    print("| --- | --- | --- | --- | --- |")
    for method, row in rows.items():
        r = row["result"]
        print(f"| {method} | {row['images']} | {100 * r.mean:.2f} +- {100 * r.std:.2f} | {len(r.accuracies)} "
              f"| {row['seconds']:.0f} |")
    gain = 100 * (rows["dm"]["result"].mean - rows["random"]["result"].mean)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": {m: {**r["result"].to_dict(), "seconds": r["seconds"]}
                                                       for m, r in rows.items()}, "gain_points": gain}, f, indent=2)
    print(f"\ndm_minus_random_points={gain:.2f}")


def source_share(data: ImageDataset, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels to distil from: all of them, or `per_class` random ones of every class (all
    of a class that has fewer)."""
    if per_class <= 0:
        return data.train_images, data.train_labels
    index, _ = ClassIndex(data.train_labels, data.n_classes).sample(per_class, torch.Generator().manual_seed(seed))
    return data.train_images[index], data.train_labels[index]


if __name__ == "__main__":
    main()
