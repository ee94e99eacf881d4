"""DM speed at the reference settings: seconds per distillation iteration.

Settings (those at which the public reference DM loop takes 7.2 s/iteration on the project's 2-core CPU):
Fashion-MNIST, ConvNet-3 width 128 with instance norm and average pooling, 10 images per class, 256 real images per
class per iteration, DSA on (color_crop_cutout_flip_scale_rotate).  Each iteration is fedcl's full DM step:
a fresh network, sampling, augmentation, real and synthetic forward passes, backward and the SGD update.

    python simulations/bench_dm_speed.py                 # CPU (or CUDA when present)
    python simulations/bench_dm_speed.py --device cuda --amp

Prints the per-iteration times and ends with `seconds_per_iteration=<median over measured iterations>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.runtime import tune_cpu_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10, help="measured iterations (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first iterations (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args()

    tune_cpu_allocator()
    dataset = load_dataset(args.dataset, args.data_root)
    distiller = create_distiller("dm", iterations=args.warmup + args.iterations, batch_real=args.batch_real,
                                 dsa=True, amp=args.amp, device=args.device, seed=0,
                                 model_cfg={"width": 128, "depth": 3, "norm": "instancenorm"})
    stamps: list[float] = []

    def tick(iteration: int, loss: float) -> None:
        if distiller.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    distiller.distill(dataset.train_images, dataset.train_labels, ipc=args.ipc, n_classes=dataset.n_classes,
                      source=Source.of(dataset), callback=tick)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)][args.warmup:]
    median = statistics.median(times)
    print(f"device={distiller.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"dataset={dataset.name} ipc={args.ipc} batch_real={args.batch_real} dsa=on amp={args.amp}")
    print("iteration seconds: " + " ".join(f"{t:.3f}" for t in times))
    print(f"min={min(times):.3f} median={median:.3f} max={max(times):.3f} over {len(times)} iterations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(distiller.device), "times": times, "median": median}, f, indent=2)
    print(f"seconds_per_iteration={median:.4f}")


if __name__ == "__main__":
    main()
