"""Load benchmark: how wall time and peak memory of a FedDistill simulation grow from 10 to 100 clients.

Protocol (defaults): digits (1,257 training images, IID shares of ~13 to ~126 images per client), one-shot
FedDistill (1 round), every client distils 1 image per class with a small DM (ConvNet width 16, 20 iterations),
the server trains on the pool for 30 epochs.  Each client count runs as its own `fedcl simulate` process (Flower's
simulation engine on Ray, one CPU per client actor), started in a new process group; every 0.2 s the script sums
the resident memory (RSS) of that process and all its descendants (Ray's GCS, raylet, workers): the peak of that
sum is the "peak RSS" column (shared pages count once per process, so it over-states the machine's use a little).
"round s" is the round's own time from rounds.csv (clients distil, server receives and trains); "wall s" is the
whole process (Ray start-up included).

    python simulations/bench_load.py --out runs/bench_load                     # 10, 25, 50, 100 clients
    python simulations/bench_load.py --clients 10 --out /tmp/bench_load        # a smoke run

Prints a markdown table and writes it to OUT/results.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedcl.files import atomic_write
from fedcl.flower.simulation import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of `process` and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_one(n_clients: int, args: argparse.Namespace) -> dict:
    """One `fedcl simulate` process with `n_clients`; returns its wall time, round time, peak tree RSS, outcome."""
    out = Path(args.out) / f"clients{n_clients}"
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--dataset", args.dataset, "--clients", str(n_clients),
           "--partitioner", "iid", "--strategy", "fed-distill", "--rounds", "1", "--seed", "0", "--out", str(out),
           "--width", str(args.width), "--ipc", str(args.ipc), "--distill-iterations", str(args.distill_iterations),
           "--server-epochs", str(args.server_epochs), "--device", "cpu"]
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out.mkdir(parents=True, exist_ok=True)
    start, peak = time.perf_counter(), 0
    with open(out / "log.txt", "w") as log:  # a file, not a pipe: 100 clients' logs would fill a pipe and block
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    row = {"clients": n_clients, "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20), "ok": False}
    if process.returncode != 0 or not (out / "rounds.csv").is_file():
        print(f"clients={n_clients}: exit {process.returncode}, see {out / 'log.txt'}", file=sys.stderr)
        return row
    with open(out / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {**row, "round_s": round(float(last["seconds"]) - float(rows[0]["seconds"]), 1),
            "accuracy": float(last["accuracy"]), "replies_ok": int(last["replies_ok"]),
            "failed": int(last["clients_failed"]), "uplink_mb": int(last["uplink_bytes"]) / 1e6, "ok": True}


def markdown(results: list[dict]) -> str:
    """The results as a markdown table, with growth relative to the first (smallest) run."""
    first = results[0]
    lines = [f"| clients | round s | wall s | peak RSS MiB | round s / {first['clients']} clients | "
             f"RSS / {first['clients']} clients | replies ok | "
             "failed | uplink MB | accuracy % |", "|" + " ---: |" * 10]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['clients']} | failed | {r['wall_s']} | {r['peak_rss_mib']} | | | | | | |")
            continue
        lines.append(f"| {r['clients']} | {r['round_s']} | {r['wall_s']} | {r['peak_rss_mib']} | "
                     f"{r['round_s'] / first.get('round_s', r['round_s']):.2f} | "
                     f"{r['peak_rss_mib'] / first['peak_rss_mib']:.2f} | {r['replies_ok']} | {r['failed']} | "
                     f"{r['uplink_mb']:.2f} | {100 * r['accuracy']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--distill-iterations", type=int, default=20)
    p.add_argument("--server-epochs", type=int, default=30)
    p.add_argument("--out", default="runs/bench_load")
    args = p.parse_args(argv)
    results = []
    for n in args.clients:
        results.append(run_one(n, args))
        print(results[-1], flush=True)
    table = markdown(results)
    atomic_write(Path(args.out) / "results.md", lambda f: f.write(table.encode() + b"\n"))
    print(table)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
