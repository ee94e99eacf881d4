"""Load benchmark: how round time, peak memory and bytes of a federated simulation grow with the number of clients.

Each client count runs as its own `fedcl simulate` process, started in a new process group; every 0.2 s the script
sums the resident memory (RSS) of that process and all its descendants (with Ray: its GCS, raylet, workers): the
peak of that sum is the "peak RSS" column (shared pages count once per process, so it over-states the machine's use
a little).  "round s" is the mean time of a round from rounds.csv (sampled clients work, the server receives,
aggregates or trains, and scores the global model); "wall s" is the whole process (start-up, partitioning and the
partition histogram included).

Defaults (the first protocol): digits (1,257 training images, IID shares), one-shot FedDistill (1 round) on
Flower's Ray engine, every client distils 1 image per class with a small DM (ConvNet width 16, 20 iterations), the
server trains on the pool for 30 epochs, 10 to 100 clients, all of them in the round.

Cross-device runs: thousands of clients holding a few samples each, a sample of them per round, on the in-process
engine (`--engine local`, `fedcl.flower.local_grid`; "auto" picks it above 100 clients).  `--partitioner
dirichlet-sized --client-samples 6` gives every client 6 training images with Dirichlet(alpha) label skew
(`fedcl.data.partition.partition_dirichlet_sized`); `--per-round K` samples K clients a round (fraction K / clients,
at most 1; `--fraction F` fixes the fraction instead).  `--strategy fedavg` sends weights instead of distilled sets;
`--scenario continual` runs the class-incremental task stream (`--tasks`, `--rounds-per-task`; its strategies keep
the clients' memories).  For FedDistill the script reads the server's pooled memory from the run's checkpoint
(OUT/clientsN/checkpoint): "pool bytes" are the stored sets' bytes and "pool bound" the most the pool may hold, the
per-reply cap (`fedcl.flower.records.max_set_bytes` of ipc x classes images) times the sets held.

    python simulations/bench_load.py --out runs/bench_load                     # 10, 25, 50, 100 clients on Ray
    python simulations/bench_load.py --dataset fashion-mnist --partitioner dirichlet-sized --client-samples 6 \\
        --clients 10 100 1000 10000 --per-round 100 --engine local --out runs/bench_load_fd
    python simulations/bench_load.py --plot docs/bench-load.png --plot-from runs/bench_load_fd runs/other
    python simulations/bench_load.py --node-cost 100 10000 --dataset fashion-mnist --partitioner dirichlet-sized \
        --client-samples 6

Prints a markdown table and writes it to OUT/results.md (and the rows to OUT/results.json); `--plot PNG
--plot-from DIR...` draws round time and peak RSS against clients from the results.json of earlier runs (one line
per run) and prints their rows as one table.  `--node-cost N...` measures what the local engine's nodes cost before
any round: in a fresh process per count, the growth of RSS and of Python's traced allocations while it builds the
`LocalGrid` of N nodes (one `Context` each) and the clients' cached partition of N shares.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedcl.files import atomic_write, write_json
from fedcl.flower.simulation import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("auto", "ray", "local")
#: Above this many clients engine "auto" runs the clients in-process (Ray starts a worker per CPU either way, but
#: its per-node bookkeeping and start-up are what a cross-device count does not need).
RAY_MAX_CLIENTS = 100


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of `process` and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def child_env() -> dict[str, str]:
    """The environment of a child process: quiet Flower and Ray, and this checkout's fedcl first on the path."""
    return {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def engine_for(n_clients: int, engine: str) -> str:
    return engine if engine != "auto" else ("ray" if n_clients <= RAY_MAX_CLIENTS else "local")


def fraction_for(n_clients: int, args: argparse.Namespace) -> float:
    """The fraction of clients sampled a round: `--fraction`, or `--per-round` clients out of `n_clients`."""
    if args.per_round is not None:
        return min(1.0, args.per_round / n_clients)
    return args.fraction


def command(n_clients: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The `fedcl simulate` command line of one client count."""
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--dataset", args.dataset, "--clients", str(n_clients),
           "--partitioner", args.partitioner, "--alpha", str(args.alpha), "--scenario", args.scenario,
           "--strategy", args.strategy, "--seed", "0", "--out", str(out),
           "--engine", engine_for(n_clients, args.engine),
           "--fraction-train", repr(fraction_for(n_clients, args)), "--width", str(args.width), "--ipc", str(args.ipc),
           "--distill-iterations", str(args.distill_iterations), "--server-epochs", str(args.server_epochs),
           "--local-epochs", str(args.local_epochs), "--device", "cpu"]
    if args.client_samples:
        cmd += ["--client-samples", str(args.client_samples)]
    if args.scenario == "continual":
        return cmd + ["--tasks", str(args.tasks), "--rounds-per-task", str(args.rounds_per_task)]
    return cmd + ["--rounds", str(args.rounds)]


def pool(out: Path) -> dict:
    """The server's pooled memory in the run's last checkpoint: its bytes, sets, images and byte bound (the
    per-reply cap times the sets held); {} when the run kept none (fedavg, continual)."""
    state_file = out / "checkpoint" / "state.json"
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    if state["memory"] is None:
        return {}
    from fedcl.data import load_dataset
    from fedcl.flower.records import max_set_bytes
    from fedcl.flower.settings import FedSettings
    from fedcl.memory import DistilledMemory

    settings = FedSettings.from_config(state["settings"])
    data = load_dataset(settings.dataset, settings.data_root or None)
    cap = max_set_bytes(data.image_shape, data.n_classes, settings.ipc * data.n_classes)
    memory = DistilledMemory.pool()
    memory.load(out / "checkpoint" / state["memory"], image_shape=data.image_shape, n_classes=data.n_classes,
                max_images=settings.ipc * data.n_classes, max_bytes=cap)
    return {"pool_bytes": memory.nbytes, "pool_sets": len(memory.sets), "pool_images": len(memory),
            "pool_bound": cap * len(memory.sets)}


def run_one(n_clients: int, args: argparse.Namespace) -> dict:
    """One `fedcl simulate` process with `n_clients`; returns its wall time, round time, peak tree RSS, bytes and
    outcome."""
    out = Path(args.out) / f"clients{n_clients}"
    env = child_env()
    out.mkdir(parents=True, exist_ok=True)
    start, peak = time.perf_counter(), 0
    with open(out / "log.txt", "w") as log:  # a file, not a pipe: 100 clients' logs would fill a pipe and block
        process = subprocess.Popen(command(n_clients, args, out), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    row = {"label": args.label, "clients": n_clients, "engine": engine_for(n_clients, args.engine),
           "fraction": fraction_for(n_clients, args), "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20),
           "ok": False}
    if process.returncode != 0 or not (out / "rounds.csv").is_file():
        print(f"clients={n_clients}: exit {process.returncode}, see {out / 'log.txt'}", file=sys.stderr)
        return row
    with open(out / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    done = rows[1:]
    replies = sum(int(r["replies_ok"]) for r in done)
    failed = sum(int(r["clients_failed"]) for r in done)
    uplink = sum(int(r["uplink_bytes"]) for r in done)
    return {**row, "rounds": len(done), "round_s": round((float(rows[-1]["seconds"]) - float(rows[0]["seconds"]))
                                                          / len(done), 1),
            "sampled": round((replies + failed) / len(done), 1), "replies_ok": replies, "failed": failed,
            "uplink_bytes": uplink, "uplink_per_reply": round(uplink / max(1, replies)),
            "downlink_bytes": sum(int(r["downlink_bytes"]) for r in done),
            "accuracy": float(rows[-1]["accuracy"]), **pool(out), "ok": True}


def node_cost(n_clients: int, args: argparse.Namespace) -> dict:
    """In this process: RSS and traced Python bytes that building the local engine's `n_clients` nodes and the
    clients' cached partition (`fedcl.flower.node._partition`, what every client looks its share up in) add."""
    import gc
    import tracemalloc

    from fedcl.flower.client_app import app
    from fedcl.flower.local_grid import LocalGrid
    from fedcl.flower.node import _dataset, _partition

    _dataset(args.dataset, "")  # the dataset is loaded once per process, whatever the number of nodes
    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    tracemalloc.start()
    grid = LocalGrid(app, n_clients)
    parts = _partition(args.dataset, "", n_clients, args.partitioner, args.alpha, 2, 0, args.client_samples)
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    grown = me.memory_info().rss - before
    assert len(grid.contexts) == len(parts) == n_clients
    return {"clients": n_clients, "rss_growth_mib": round(grown / 2**20, 1), "traced_mib": round(traced / 2**20, 1),
            "bytes_per_node": round(max(grown, traced) / n_clients)}


def markdown(results: list[dict]) -> str:
    """The results as a markdown table: per run label and client count, time, memory and bytes."""
    lines = ["| run | clients | engine | sampled / round | rounds | round s | wall s | peak RSS MiB | replies ok | "
             "failed | uplink B / reply | uplink MB | downlink MB | pool bytes | pool bound | final acc. % |",
             "| --- | ---: | --- |" + " ---: |" * 13]
    for r in results:
        head = f"| {r.get('label', '')} | {r['clients']} | {r.get('engine', 'ray')} |"
        if not r["ok"]:
            lines.append(f"{head} | | failed | {r['wall_s']} | {r['peak_rss_mib']} |" + " |" * 8)
            continue
        pooled = (f"{r['pool_bytes']:,} | {r['pool_bound']:,}" if "pool_bytes" in r else "- | -")
        lines.append(f"{head} {r['sampled']:g} | {r['rounds']} | {r['round_s']} | {r['wall_s']} | "
                     f"{r['peak_rss_mib']} | {r['replies_ok']} | {r['failed']} | {r['uplink_per_reply']:,} | "
                     f"{r['uplink_bytes'] / 1e6:.3f} | {r['downlink_bytes'] / 1e6:.3f} | {pooled} | "
                     f"{100 * r['accuracy']:.2f} |")
    return "\n".join(lines)


def plot(series: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Round time and peak RSS against clients (log scale), one line per run label, under `title`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcl.files import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in series.items():
        ok = [r for r in rows if r["ok"]]
        clients = [r["clients"] for r in ok]
        left.plot(clients, [r["round_s"] for r in ok], marker="o", label=label)
        right.plot(clients, [r["peak_rss_mib"] for r in ok], marker="o", label=label)
    for ax, what in ((left, "mean round time (s)"), (right, "peak RSS of the process tree (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("clients in the federation")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    left.set_title("round time")
    right.set_title("peak memory")
    fig.suptitle(title or "fedcl simulate: load against the number of clients")
    fig.tight_layout()
    return save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help=f"ray, local, or auto: ray up to {RAY_MAX_CLIENTS} clients, local above (default auto)")
    p.add_argument("--strategy", default="fed-distill", choices=("fed-distill", "fedavg"))
    p.add_argument("--scenario", default="standard", choices=("standard", "continual"))
    p.add_argument("--partitioner", default="iid", choices=("iid", "dirichlet", "dirichlet-sized", "classes"))
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--client-samples", type=int, default=0,
                   help="dirichlet-sized: training samples per client (default 0: the split shared out)")
    sampled = p.add_mutually_exclusive_group()
    sampled.add_argument("--fraction", type=float, default=1.0, help="fraction of clients sampled a round (1.0)")
    sampled.add_argument("--per-round", type=int, default=None,
                         help="clients sampled a round (fraction per-round / clients, at most 1)")
    p.add_argument("--rounds", type=int, default=1, help="standard scenario: rounds (default 1)")
    p.add_argument("--tasks", type=int, default=2, help="continual: tasks (default 2)")
    p.add_argument("--rounds-per-task", type=int, default=1, help="continual: FedAvg rounds per task (default 1)")
    p.add_argument("--local-epochs", type=int, default=5, help="client training epochs (fedavg, continual)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--distill-iterations", type=int, default=20)
    p.add_argument("--server-epochs", type=int, default=30)
    p.add_argument("--label", default=None, help="name of this run in tables and plots (default: strategy, "
                                                 "scenario)")
    p.add_argument("--out", default="runs/bench_load")
    p.add_argument("--plot", default=None, help="write this PNG from the results.json under --plot-from")
    p.add_argument("--title", default="", help="title of the --plot figure")
    p.add_argument("--plot-from", nargs="+", default=[], help="output folders of earlier runs (with --plot)")
    p.add_argument("--node-cost", type=int, nargs="+", default=None,
                   help="measure the memory the local engine's nodes and partition cost for these client counts")
    p.add_argument("--node-cost-here", type=int, default=None, help=argparse.SUPPRESS)  # one count, this process
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plot:
        series = {}
        for folder in args.plot_from:
            rows = json.loads((Path(folder) / "results.json").read_text())
            series[rows[0]["label"]] = rows
        print(markdown([r for rows in series.values() for r in rows]))
        print(f"wrote {plot(series, Path(args.plot), args.title)}")
        return 0
    if args.node_cost_here is not None:
        print(json.dumps(node_cost(args.node_cost_here, args)))
        return 0
    if args.node_cost:
        lines = ["| clients | RSS growth MiB | traced Python MiB | bytes / node |", "| ---: | ---: | ---: | ---: |"]
        for n in args.node_cost:  # a fresh process per count: freed memory of a larger count would hide a smaller
            forwarded = ["--dataset", args.dataset, "--partitioner", args.partitioner, "--alpha", str(args.alpha),
                         "--client-samples", str(args.client_samples), "--node-cost-here", str(n)]
            done = subprocess.run([sys.executable, __file__, *forwarded], check=True, capture_output=True, text=True,
                                  env=child_env())
            r = json.loads(done.stdout.strip().splitlines()[-1])
            lines.append(f"| {r['clients']} | {r['rss_growth_mib']} | {r['traced_mib']} | {r['bytes_per_node']:,} |")
        print("\n".join(lines))
        return 0
    if args.fraction <= 0 or args.fraction > 1 or (args.per_round is not None and args.per_round < 1):
        raise SystemExit("--fraction must lie in (0, 1] and --per-round be >= 1")
    args.label = args.label or (args.strategy if args.scenario == "standard" else f"{args.strategy} (continual)")
    results = []
    for n in args.clients:
        results.append(run_one(n, args))
        print(results[-1], flush=True)
    table = markdown(results)
    atomic_write(Path(args.out) / "results.md", lambda f: f.write(table.encode() + b"\n"))
    write_json(Path(args.out) / "results.json", results)
    print(table)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
