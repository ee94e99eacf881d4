"""Poisoning benchmark: does the server's embedding screen keep one-shot FedDistill accurate when 2 of 10 clients
send poisoned synthetic sets?

Protocol (defaults; CPU-sized):
1. `--clients` 10 clients hold Dirichlet(`--alpha` 0.5) shares of the training split (or IID shares with
   `--partitioner iid`); each distils its share once
   into 10 images per class with DM (ConvNet-3 width 32, `--distill-iterations` 100, 64 real images per class),
   exactly as `fedcl.flower.client_app` does (sets cached under OUT/sets/).
2. Attacked copies: clients 0 and 1 (`--attackers` 2) replace their set by
   - "flip": every label c -> n_classes - 1 - c (the images unchanged), or
   - "noise": the images by standard Gaussian noise (the labels unchanged);
   the "absent" rows leave the attackers' sets out altogether: the pool of the honest clients alone, the most a
   screen can recover (dropping a client also drops the classes only it held).
3. The server logic of `strategies.FedDistill`, called directly (no Flower messages; the same `SyntheticMemory`,
   screen and `train_on_memory`): the round's sets are admitted to the memory (with `--screen` embedding: screened
   first, outliers refused), then a ConvNet-3 width 32 is trained on the pool (`--server-epochs` 100, SGD lr 0.01,
   batch 64, DSA) and tested on the test split; `--models` 3 server seeds per variant.

Prints one row per (attack, screen): sets kept, test accuracy mean +- std, the difference to the clean
unscreened run and, on screened rows, the highest honest and the lowest attacker screen score (`--screen-threshold`
2.5 must lie between them); every client's score is in the per-row progress line and in OUT/results.json.  The
server models are trained once per distinct pool (a screened row that keeps the honest sets reuses the "absent"
row's models).  Writes OUT/results.md and OUT/results.json.

    python simulations/bench_poison.py --dataset digits --out runs/bench_poison_digits
    python simulations/bench_poison.py --dataset fashion-mnist --out runs/bench_poison_fmnist
    python simulations/bench_poison.py --dataset digits --screen-threshold 3 --out runs/bench_poison_digits
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedcl.data import ImageDataset, load_dataset, partition
from fedcl.distill import Source, create_distiller
from fedcl.files import atomic_write, write_json
from fedcl.flower.node import client_seed
from fedcl.flower.records import arrays_to_model, model_to_arrays
from fedcl.models import create_model
from fedcl.runtime import generator, seeded, tune_cpu_allocator
from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import SyntheticSet
from fedcl.train import TrainConfig, evaluate_model
from strategies import SyntheticMemory, TrafficLog, train_on_memory

#: "none": every client honest; "absent": the attackers send nothing (the best any screen can do); then the attacks.
ATTACKS = ("none", "absent", "flip", "noise")


def client_sets(data: ImageDataset, args: argparse.Namespace) -> list[SyntheticSet]:
    """Every client's distilled set (DM, as the ClientApp makes it), read from OUT/sets/ when already there."""
    parts = partition(data.train_labels, args.clients, args.partitioner, alpha=args.alpha, seed=args.seed)
    sets = []
    for pid, index in enumerate(parts):
        path = Path(args.out) / "sets" / f"client{pid:03d}.safetensors"
        if not path.is_file():
            dm = create_distiller("dm", model="convnet", model_cfg={"width": args.width}, device=args.device,
                                  seed=client_seed(args.seed, pid, 1), iterations=args.distill_iterations,
                                  batch_real=args.batch_real)
            start = time.perf_counter()
            dm.distill(data.train_images[index], data.train_labels[index], ipc=args.ipc, n_classes=data.n_classes,
                       source=Source.of(data)).save(path)
            print(f"client {pid}: {index.numel()} images distilled in {time.perf_counter() - start:.1f} s",
                  flush=True)
        sets.append(SyntheticSet.load(path))
    return sets


def attacked(synset: SyntheticSet, attack: str, seed: int) -> SyntheticSet:
    """The poisoned copy of `synset` an attacking client would send."""
    if attack == "flip":
        return replace(synset, labels=synset.meta.n_classes - 1 - synset.labels)
    if attack == "noise":
        return replace(synset, images=torch.randn(synset.images.shape, generator=generator(seed)))
    return synset


def round_sets(honest: list[SyntheticSet], attack: str, attackers: int) -> list[tuple[int, SyntheticSet]]:
    """The (client, set) pairs the server receives under `attack`: clients below `attackers` send attacked copies
    ("absent": nothing at all)."""
    if attack == "absent":
        return list(enumerate(honest))[attackers:]
    return [(i, attacked(s, attack, seed=i) if i < attackers else s) for i, s in enumerate(honest)]


def admitted(arrived: list[tuple[int, SyntheticSet]], screen: str, data: ImageDataset,
             args: argparse.Namespace) -> SyntheticMemory:
    """A FedDistill memory after one round's sets were admitted (screened first with `screen` "embedding")."""
    memory = SyntheticMemory(image_shape=data.image_shape, n_classes=data.n_classes, max_images=10_000,
                             max_bytes=2**29, screen=create_screen(screen, seed=args.seed,
                                                                   threshold=args.screen_threshold))
    memory.admit(1, arrived, TrafficLog())
    return memory


def pool_accuracies(memory: SyntheticMemory, data: ImageDataset, args: argparse.Namespace) -> list[float]:
    """Test accuracy of `args.models` server models (one per seed) trained on the memory's pool."""
    config = TrainConfig(epochs=args.server_epochs, lr=0.01, batch_size=64, dsa=True)
    accuracies = []
    for model_seed in range(args.models):
        with seeded(model_seed):
            net = create_model("convnet", data.image_shape, data.n_classes, width=args.width)
        arrays = train_on_memory(model_to_arrays(net), memory, model="convnet", model_cfg={"width": args.width},
                                 config=config, device=args.device, seed=model_seed)
        accuracies.append(evaluate_model(arrays_to_model(net, arrays), data.test_images, data.test_labels,
                                         device=args.device))
    return accuracies


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (attack, screen).  The server models are trained once per distinct pool: a screened row that
    keeps the same sets as another row (e.g. the attackers refused = "absent") reuses its accuracies, which are
    the same seeds on the same data."""
    data = load_dataset(args.dataset, args.data_root)
    honest = client_sets(data, args)
    screen = create_screen("embedding", seed=args.seed, threshold=args.screen_threshold)
    trained: dict[tuple, list[float]] = {}
    results = []
    for attack in ATTACKS:
        arrived = round_sets(honest, attack, args.attackers)
        scores = {} if attack == "absent" else dict(zip([i for i, _ in arrived],
                                                        screen([s for _, s in arrived]).scores, strict=True))
        for screen_name in ("none",) if attack == "absent" else ("none", "embedding"):
            start = time.perf_counter()
            memory = admitted(arrived, screen_name, data, args)
            pool = tuple((i, attack if i < args.attackers else "honest") for i in memory.sets)
            if pool not in trained:
                trained[pool] = pool_accuracies(memory, data, args)
            accuracies = trained[pool]
            results.append({"attack": attack, "screen": screen_name, "kept": len(memory.sets),
                            "kept_clients": list(memory.sets), "scores": scores, "accuracies": accuracies,
                            "mean": statistics.mean(accuracies),
                            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(results[-1], flush=True)
    return results


def score_margin(row: dict, attackers: int) -> tuple[str, str]:
    """(highest honest score, lowest attacker score) of a screened row, formatted; "-" for unscreened rows."""
    if row["screen"] == "none":
        return "-", "-"
    attacking = [s for i, s in row["scores"].items() if i < attackers and row["attack"] != "none"]
    honest = [s for i, s in row["scores"].items() if i >= attackers or row["attack"] == "none"]
    return f"{max(honest):.2f}", f"{min(attacking):.2f}" if attacking else "-"


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    clean = next(r["mean"] for r in results if r["attack"] == "none" and r["screen"] == "none")
    split = f"Dirichlet {args.alpha}" if args.partitioner == "dirichlet" else args.partitioner
    lines = [f"{args.dataset}: {args.clients} clients ({split}), {args.attackers} attackers, "
             f"{args.models} server models per row, screen threshold {args.screen_threshold}",
             "| attack | screen | sets kept | test accuracy % (mean +- std) | vs clean, points | max honest score | "
             "min attacker score |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        honest_max, attacker_min = score_margin(r, args.attackers)
        lines.append(f"| {r['attack']} | {r['screen']} | {r['kept']}/{args.clients} | {100 * r['mean']:.2f} +- "
                     f"{100 * r['std']:.2f} | {100 * (r['mean'] - clean):+.2f} | {honest_max} | {attacker_min} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--attackers", type=int, default=2)
    p.add_argument("--partitioner", default="dirichlet", choices=("dirichlet", "iid"))
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--distill-iterations", type=int, default=100)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--server-epochs", type=int, default=100)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--screen-threshold", type=float, default=EmbeddingScreen.threshold,
                   help="embedding screen: score above which a set is refused (default 2.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench_poison")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    results = run(args)
    table = markdown(results, args)
    write_json(Path(args.out) / "results.json", {"settings": vars(args), "results": results})
    atomic_write(Path(args.out) / "results.md", lambda f: f.write(table.encode() + b"\n"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
