"""Federated benchmark: FedAvg vs one-shot FedDistill vs multi-round FedDistill vs the hybrid, under label skew.

The issue's protocol (defaults): Fashion-MNIST, 10 clients, Dirichlet alpha 0.1 and 0.5, ConvNet-3 at width 32
(CPU-sized; the papers' width is 128: pass --width 128 on a GPU), seeds 0 1 2.
- fedavg:       20 rounds, 1 local epoch (SGD lr 0.01, momentum 0.9, batch 64).
- one-shot:     FedDistill, 1 round: every client distils 10 images per class (DM, 200 iterations) of every class
                it holds at least 10 real images of (--min-class-images) and uploads them once (float16 pixels); the
                server trains the model on the pool (300 epochs, DSA).
- multi-round:  FedDistill, 5 rounds: from round 2 clients distil against the current global model; the server
                keeps all sets and continues training (100 epochs per round).
- hybrid:       FedAvg for 20 rounds + the sets uploaded once in round 1; the aggregate is fine-tuned on them for
                10 epochs each round.
Every run goes through the same ServerApp/ClientApp as `fedcl simulate` and `flwr run` (by default with the
clients in this process, `--engine local`; `--engine ray` uses Flower's Ray simulation engine).  The protocol takes
hours on a CPU, so it can be completed over several invocations of the same command: a finished run's
result.json is reused, and an interrupted run continues from its server checkpoint (the last completed round).

Writes OUT/results.csv (one row per run), OUT/results.md (mean +- std over seeds), OUT/accuracy_alpha<a>.png
(accuracy vs rounds and vs uplink MB, seed 0) and each run's folder with its rounds.csv; prints the table and
the target check (a FedDistill variant within 2 points of FedAvg at >= 20x less uplink), seed by seed: "met" only
when every seed meets it, otherwise the seeds that miss and by how much.

    python simulations/bench_federated.py --out runs/bench_federated             # the full protocol
    python simulations/bench_federated.py --dataset digits --clients 3 --alphas 0.5 --seeds 0 \\
        --fedavg-rounds 2 --multi-rounds 2 --distill-iterations 10 --out /tmp/bench_fed   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from fedcl.files import atomic_write, write_csv, write_json
from fedcl.flower.checkpoint import CHECKPOINT_DIR, CheckpointError
from fedcl.flower.results import plot_accuracy, summarise
from fedcl.flower.server_app import resume_round
from fedcl.flower.settings import FedSettings, changed_settings
from fedcl.flower.simulation import simulate
from fedcl.verdict import Criterion, seed_verdict

VARIANTS = ("fedavg", "one-shot", "multi-round", "hybrid")


def variant_settings(variant: str, base: FedSettings, args: argparse.Namespace) -> FedSettings:
    """The settings of one benchmark variant on top of the shared base."""
    if variant == "fedavg":
        return replace(base, strategy="fedavg", num_rounds=args.fedavg_rounds)
    distilling = replace(base, min_class_images=args.min_class_images)
    if variant == "one-shot":
        return replace(distilling, strategy="fed-distill", num_rounds=1, server_epochs=args.oneshot_server_epochs)
    if variant == "multi-round":
        return replace(distilling, strategy="fed-distill", num_rounds=args.multi_rounds, memory="all",
                       server_epochs=args.multi_server_epochs)
    return replace(distilling, strategy="hybrid", num_rounds=args.fedavg_rounds, finetune_epochs=args.finetune_epochs)


def run_variant(settings: FedSettings, args: argparse.Namespace, alpha: float, seed: int,
                variant: str) -> tuple[dict, list[dict]]:
    """Run one (alpha, seed, variant), or reuse it: a finished run's result.json (same settings) is read back, and a
    run interrupted after some rounds continues from its server checkpoint.  So the protocol, hours on a CPU, can
    be completed over several invocations of the same command."""
    run_dir, config = Path(settings.out_dir), settings.to_config()
    done = run_dir / "result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if not changed_settings(saved.get("settings", {}), config):
            rows = read_rounds(run_dir / "rounds.csv")
            return {**saved["result"], "wall_seconds": float(rows[-1]["seconds"]), "reused": True}, rows
    try:  # resume_round loads the data and builds the strategy: only worth it when a checkpoint was written
        if (run_dir / CHECKPOINT_DIR).is_dir() and resume_round(replace(settings, resume=True)) > 0:
            settings = replace(settings, resume=True)
    except CheckpointError as error:  # a checkpoint of other settings: this run starts over
        print(f"alpha={alpha} seed={seed} {variant}: starting over ({error})", flush=True)
    rows = simulate(settings, args.clients, engine=args.engine)
    summary = summarise(rows, variant)
    result = {"alpha": alpha, "seed": seed, "variant": variant, "rounds": summary["rounds"],
              "final_accuracy": summary["final_accuracy"], "uplink_bytes": summary["uplink_bytes"],
              "downlink_bytes": summary["downlink_bytes"], "wall_seconds": summary["seconds"],
              "resumed": settings.resume}
    write_json(done, {"settings": config, "result": result})
    return result, rows


def read_rounds(path: Path) -> list[dict]:
    """The rows of a finished run's rounds.csv, as text (`plot_accuracy` parses the columns it draws)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_all(args: argparse.Namespace) -> list[dict]:
    results, out = [], Path(args.out)
    for alpha in args.alphas:
        curves = {}
        for seed in args.seeds:
            base = FedSettings(dataset=args.dataset, data_root=args.data_root, partitioner="dirichlet", alpha=alpha,
                               seed=seed, width=args.width, ipc=args.ipc, distill_iterations=args.distill_iterations,
                               batch_real=args.batch_real, upload_dtype=args.upload_dtype, local_epochs=1,
                               min_nodes=args.clients,
                               device=args.device)
            for variant in args.variants:
                run_dir = out / f"alpha{alpha}" / f"seed{seed}" / variant
                settings = replace(variant_settings(variant, base, args), out_dir=str(run_dir))
                result, rows = run_variant(settings, args, alpha, seed, variant)
                results.append(result)
                print(f"alpha={alpha} seed={seed} {variant}: accuracy {100 * result['final_accuracy']:.2f} %, "
                      f"uplink {result['uplink_bytes'] / 1e6:.3f} MB, {result['wall_seconds']} s"
                      f"{' (from an earlier invocation)' if result.get('reused') else ''}", flush=True)
                if seed == args.seeds[0]:
                    curves[variant] = rows
        plot_accuracy(curves, out / f"accuracy_alpha{alpha}.png")
    return results


def table(results: list[dict], args: argparse.Namespace) -> str:
    """Mean +- std over seeds per (alpha, variant), in markdown."""
    lines = [f"{args.dataset}, {args.clients} clients, Dirichlet label skew, ConvNet-3 width {args.width}, "
             f"{len(args.seeds)} seed(s); uplink = bytes of all client replies; "
             "wall s = the server's run time, summed over the invocations that resumed it", "",
             "| alpha | variant | rounds | test accuracy % | uplink MB | downlink MB | wall s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for alpha in args.alphas:
        for variant in args.variants:
            runs = [r for r in results if r["alpha"] == alpha and r["variant"] == variant]
            acc = [100 * r["final_accuracy"] for r in runs]
            std = statistics.pstdev(acc) if len(acc) > 1 else 0.0
            lines.append(f"| {alpha} | {variant} | {runs[0]['rounds']} | {statistics.fmean(acc):.2f} +- {std:.2f} "
                         f"| {statistics.fmean(r['uplink_bytes'] for r in runs) / 1e6:.3f} "
                         f"| {statistics.fmean(r['downlink_bytes'] for r in runs) / 1e6:.3f} "
                         f"| {statistics.fmean(r['wall_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


#: The target: a FedDistill variant within 2 points of FedAvg's accuracy with at least 20x less uplink.
TARGET = (Criterion("accuracy vs FedAvg", -2.0, " points", "+.2f"), Criterion("uplink saving", 20.0, "x", ".1f"))


def target_check(results: list[dict], alpha: float) -> str:
    """Does a FedDistill variant reach FedAvg's accuracy within 2 points with >= 20x less uplink at `alpha`?

    Judged per seed against FedAvg's run of the same seed (same partition); "met" only when every seed meets it."""
    def runs(variant: str) -> dict[int, dict]:
        return {r["seed"]: r for r in results if r["alpha"] == alpha and r["variant"] == variant}

    fedavg = runs("fedavg")
    if not fedavg:
        return "target check skipped: no fedavg runs"
    checks = []
    for variant in ("one-shot", "multi-round"):
        per_seed = {seed: {"accuracy vs FedAvg": 100 * (r["final_accuracy"] - fedavg[seed]["final_accuracy"]),
                           "uplink saving": fedavg[seed]["uplink_bytes"] / max(r["uplink_bytes"], 1)}
                    for seed, r in runs(variant).items() if seed in fedavg}
        if per_seed:
            checks.append(seed_verdict(f"alpha={alpha} {variant}", per_seed, TARGET))
    return "\n".join(checks) or "target check skipped: no FedDistill runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--width", type=int, default=32, help="ConvNet-3 width (default 32, CPU-sized)")
    parser.add_argument("--ipc", type=int, default=10, help="images per class per client (default 10)")
    parser.add_argument("--distill-iterations", type=int, default=200)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--upload-dtype", default="float16", choices=("float32", "float16"),
                        help="wire format of the synthetic images (default float16: half the uplink)")
    parser.add_argument("--min-class-images", type=int, default=10,
                        help="FedDistill variants: clients distil only the classes they hold at least this many real "
                             "images of (default 10 = ipc: fewer real images than synthetic ones compress nothing)")
    parser.add_argument("--fedavg-rounds", type=int, default=20)
    parser.add_argument("--multi-rounds", type=int, default=5)
    parser.add_argument("--oneshot-server-epochs", type=int, default=300)
    parser.add_argument("--multi-server-epochs", type=int, default=100)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="clients in this process one after another (local, default) or Flower's Ray engine")
    parser.add_argument("--out", default="runs/bench_federated")
    args = parser.parse_args()

    start = time.perf_counter()
    results = run_all(args)
    out = Path(args.out)
    write_csv([{k: v for k, v in r.items() if k != "reused"} for r in results], out / "results.csv")
    report = table(results, args) + "\n\n" + "\n".join(target_check(results, a) for a in args.alphas)
    atomic_write(out / "results.md", lambda f: f.write(report.encode() + b"\n"))
    print(report)
    print(f"total wall time {time.perf_counter() - start:.0f} s; wrote {out}/results.csv, results.md, "
          f"accuracy_alpha*.png")


if __name__ == "__main__":
    main()
