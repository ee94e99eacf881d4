"""DM speed at the reference settings, and side by side with the public reference DM loop in the same process.

Settings: Fashion-MNIST, ConvNet-3 width 128 with instance norm and average pooling, 10 images per class, 256 real
images per class per iteration, DSA on (color_crop_cutout_flip_scale_rotate).  Each fedcl iteration is the full DM
step: a fresh network, sampling, augmentation, real and synthetic forward passes, backward and the SGD update.

    python simulations/bench_dm_speed.py                          # fedcl's DM alone (CPU, or CUDA when present)
    python simulations/bench_dm_speed.py --reference DIR          # + the reference loop, interleaved, and the ratio
    python simulations/bench_dm_speed.py --methods dm idm dance   # iteration cost of the DM family side by side
    python simulations/bench_dm_speed.py --device cuda --amp

DIR is a checkout of VICO-UoE/DatasetCondensation (public; nothing of it is copied here).  Its loop is driven
through its own `get_network` and `DiffAugment` on the same normalised images fedcl uses, one forward per class as
it is published; the one change it needs on current torch (its `embed` calls `view` on the non-contiguous output
of augmented inputs) is made at run time by replacing `ConvNet.embed` with the same function using `reshape`.
fedcl and the reference run in alternating blocks (`--rounds`), so a slower or busier moment hits both alike.

Prints per-iteration medians, GFLOP/s (convolution and linear FLOPs of one iteration, counted from the network),
and ends with `ratio=<reference / fedcl>` when --reference is given, else `seconds_per_iteration=<median>`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.models import create_model
from fedcl.runtime import amp_enabled, tune_cpu_allocator

STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODEL_CFG = {"width": 128, "depth": 3, "norm": "instancenorm"}


def forward_flops(in_shape: tuple[int, int, int], n_classes: int) -> int:
    """Multiply-add FLOPs (x2) of one image through ConvNet-3's convolutions and classifier."""
    net = create_model("convnet", in_shape, n_classes, **MODEL_CFG)
    total = 0

    def count(module: torch.nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += 2 * output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, *in_shape))
    for hook in hooks:
        hook.remove()
    return total


def fedcl_block(method: str, dataset, args, seed: int, options: dict) -> tuple[list[float], float]:
    """Per-iteration seconds of `args.iterations` measured iterations of a fedcl distiller (after warm-up), and the
    seconds it spent before its first iteration (a DANCE expert pool, say)."""
    distiller = create_distiller(method, iterations=args.warmup + args.iterations, batch_real=args.batch_real,
                                 dsa=True, amp=True if args.amp else None, device=args.device, seed=seed,
                                 model_cfg=MODEL_CFG, **options)
    stamps: list[float] = []

    def tick(iteration: int, loss: float) -> None:
        if distiller.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    distiller.distill(dataset.train_images, dataset.train_labels, ipc=args.ipc, n_classes=dataset.n_classes,
                               source=Source.of(dataset), callback=tick)
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])][max(0, args.warmup - 1):]
    return times, max(0.0, stamps[0] - start - statistics.median(times))


def reference_loop(directory: Path, dataset, args) -> Callable[[int], list[float]]:
    """A function running n iterations of the reference DM loop and returning their seconds each."""
    sys.path.insert(0, str(directory))
    utils = importlib.import_module("utils")
    networks = importlib.import_module("networks")
    networks.ConvNet.embed = lambda self, x: self.features(x).reshape(x.shape[0], -1)
    images, labels = dataset.train_images, dataset.train_labels.numpy()
    by_class = [np.where(labels == c)[0] for c in range(dataset.n_classes)]

    def pick(c: int, n: int) -> torch.Tensor:
        return images[np.random.permutation(by_class[c])[:n]]

    channel, size = dataset.image_shape[0], tuple(dataset.image_shape[1:])
    syn = torch.cat([pick(c, args.ipc) for c in range(dataset.n_classes)]).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    param = utils.ParamDiffAug()

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            net = utils.get_network("ConvNet", channel, dataset.n_classes, size)
            net.train()
            for p in net.parameters():
                p.requires_grad = False
            loss = torch.tensor(0.0)
            for c in range(dataset.n_classes):
                seed = int(time.time() * 1000) % 100000
                real = utils.DiffAugment(pick(c, args.batch_real), STRATEGY, seed=seed, param=param)
                fake = utils.DiffAugment(syn[c * args.ipc:(c + 1) * args.ipc], STRATEGY, seed=seed, param=param)
                loss = loss + ((net.embed(real).detach().mean(0) - net.embed(fake).mean(0)) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6, help="measured iterations per block (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first iterations per block (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating fedcl/reference blocks (default 3)")
    parser.add_argument("--reference", type=Path, default=None, help="checkout of VICO-UoE/DatasetCondensation")
    parser.add_argument("--methods", nargs="+", default=["dm"], help="fedcl distillers to time (default dm)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA too")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args()
    if args.reference is not None and not (args.reference / "utils.py").is_file():
        parser.error(f"--reference {args.reference}: no utils.py there; pass a checkout of "
                     "VICO-UoE/DatasetCondensation")

    tune_cpu_allocator()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    dataset = load_dataset(args.dataset, args.data_root)
    reference = None if args.reference is None else reference_loop(args.reference, dataset, args)
    per_image = forward_flops(dataset.image_shape, dataset.n_classes)
    flops = per_image * dataset.n_classes * (args.batch_real + 3 * args.ipc)  # real forward + synthetic fwd/bwd
    times: dict[str, list[float]] = {name: [] for name in [*args.methods, *(["reference"] if reference else [])]}
    setup: dict[str, float] = {}
    for r in range(args.rounds):
        for method in args.methods:
            block, before = fedcl_block(method, dataset, args, seed=r, options={})
            times[method] += block
            setup[method] = before
        if reference is not None:
            times["reference"] += reference(args.warmup + args.iterations)[args.warmup:]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    label = "GPU" if device.type == "cuda" else "CPU"
    print(f"{label} figures: device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"dataset={dataset.name} ipc={args.ipc} batch_real={args.batch_real} dsa=on "
          f"bf16={amp_enabled(device, True if args.amp else None)} rounds={args.rounds}")
    print(f"one iteration: {flops / 1e9:.1f} GFLOP of convolutions and linear layers (DM's loss)")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        extra = f", {setup[name]:.1f} s before the first iteration" if setup.get(name, 0) > 0.5 else ""
        print(f"{name:>9}: median {medians[name]:.3f} s/iteration (min {min(values):.3f}, max {max(values):.3f}, "
              f"{len(values)} iterations){extra}; {flops / medians[name] / 1e9:.1f} GFLOP/s at DM's count")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "times": times, "medians": medians, "gflop": flops / 1e9}, f, indent=2)
    first = args.methods[0]
    if reference is not None:
        print(f"{label} ratio: reference {medians['reference']:.3f} s / fedcl {first} {medians[first]:.3f} s")
        print(f"ratio={medians['reference'] / medians[first]:.3f}")
    else:
        print(f"seconds_per_iteration={medians[first]:.4f}")


if __name__ == "__main__":
    main()
