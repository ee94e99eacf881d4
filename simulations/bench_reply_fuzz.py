"""Hostile-reply fuzzing at scale: thousands of Hypothesis-generated rounds against every strategy's
`aggregate_train` (`tests/test_reply_fuzz.py`, run here with many cases and fresh random inputs).

Each round has 1-4 clients, at least one hostile (random metric names, types and values, arrays of the wrong
shape, dtype or values, synthetic sets with wild pixels, labels or metadata, missing and extra records, error
replies).  A round passes when the strategy does not raise, returns a finite model or none, and counts at most one
failure per reply.  Prints, per strategy: rounds run, replies, hostile replies, failures counted, rounds that
produced a model, and whether every round passed.

    python simulations/bench_reply_fuzz.py --cases 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="fuzzed rounds per strategy (default 2000)")
    parser.add_argument("--derandomize", action="store_true", help="the same inputs on every run (CI's mode)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "FEDCL_FUZZ_CASES": str(args.cases), "FEDCL_FUZZ_REPORT": str(report),
               "FEDCL_FUZZ_RANDOM": "0" if args.derandomize else "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                               "tests/test_reply_fuzz.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        counts = json.loads(report.read_text()) if report.exists() else {}
    print(f"{'strategy':18s} {'rounds':>7s} {'replies':>8s} {'hostile':>8s} {'failures':>9s} {'models':>7s}  verdict")
    for name, c in sorted(counts.items()):
        print(f"{name:18s} {c['cases']:7d} {c['replies']:8d} {c['hostile']:8d} {c['failures']:9d} {c['models']:7d}  "
              f"{'no crash, every model finite' if c['cases'] >= args.cases else 'stopped early'}")
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
