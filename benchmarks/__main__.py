"""Run every benchmark and collect the issue's target figures.

    python -m benchmarks [--quick] [--json FILE] [--only NAME ...]

Each benchmark prints its own table (min/median/max over repetitions, measured side by side in
one run); this driver then prints the targets with their medians and writes them to ``--json``.
Speed is never asserted: CI runs ``--quick`` only to check that the benchmarks run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

#: benchmark module -> extra arguments for --quick
BENCHMARKS = ["overhead", "batched", "network", "whatif", "memory", "pool", "calibration", "flower"]

TARGETS = {
    "overhead_ratio_n10": ("<= 1.05", "paired wall ratio simkit/bare, SL, N=10"),
    "overhead_ratio_n100": ("<= 1.05", "paired wall ratio simkit/bare, SL, N=100"),
    "overhead_predicted_n100": ("<= 1.02", "1 + simkit's added cost per step / bare step, SL, N=100"),
    "batched_speedup_n50": (">= 3", "batched vs sequential client training, digits, N=50"),
    "network_flow_rate_ratio": (">= 0.05", "flow completions/s over raw SimPy timeouts/s, 10k devices"),
    "whatif_peak_mem_gib": ("<= 2", "peak RSS, fast mode, FedAvg, 10k devices"),
    "whatif_time_ratio": ("<= 3", "host time over the engine-bound limit (SimPy's rate on the same protocol, same scale)"),
    "flower_time_ratio": ("<= 0.4", "whole-process time simkit/Flower, same FedAvg workload"),
    "flower_mem_ratio": ("<= 0.4", "peak PSS simkit/Flower"),
    "calibration_error_max": ("<= 1.25", "largest |log(simulated/measured step time)| as a factor"),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI smoke run)")
    ap.add_argument("--json", default=None, help="write {target: median} to this file")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {BENCHMARKS}")
    args = ap.parse_args(argv)
    figures: dict = {}
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", path] + (["--quick"] if args.quick else [])
        # each benchmark in its own process: none inherits another's warm caches or memory
        r = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if r.returncode != 0:
            print(f"benchmark {name} failed (exit {r.returncode})", file=sys.stderr)
            raise SystemExit(r.returncode)
        try:
            with open(path) as f:
                figures.update(json.load(f))
        except (OSError, json.JSONDecodeError):
            pass
        finally:
            os.unlink(path)
        print(f"({name}: {time.perf_counter() - t:.0f} s)")
    print("\n=== targets (median figures) ===")
    for key, (goal, what) in TARGETS.items():
        v = figures.get(key)
        shown = "not measured" if v is None else f"{v:.4g}"
        print(f"  {key:26} {shown:>14}   target {goal:8}  {what}")
    out = {k: figures[k] for k in TARGETS if k in figures}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "_all": figures}, f, indent=2)
    return out


if __name__ == "__main__":
    main()
