"""Quickstart: FedAvg, vanilla split learning and SplitFed on one mixed fleet.

8 clients on a two-tier topology (devices -> 2 edge gateways -> cloud server with a T4): three
mid-range phones on LTE, two Raspberry Pi 4 and two Raspberry Pi 5 on Wi-Fi, one laptop on
Wi-Fi. Each trains a small split CNN on scikit-learn's 8x8 digits (embedded, nothing is
downloaded). Prints a table of accuracy, bytes, client FLOPs, simulated time and energy, and
writes it to ``results/quickstart/summary.csv`` (or ``--out``).

Run:  python studies/quickstart.py [--out DIR] [--rounds N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simkit import scenario_from_dict
from simkit.cli import print_summary
from simkit.run import run

BASE = {
    "name": "quickstart",
    "fleet": {
        "counts": {"phone-midrange": 3, "rpi4": 2, "rpi5": 2, "laptop": 1},
        "access": {"phone-midrange": "lte", "rpi4": "wifi", "rpi5": "wifi", "laptop": "wifi"},
        "speed_jitter": 0.1,
        "bandwidth_jitter": 0.1,
    },
    "server": {"profile": "server-t4", "slots": 1},
    "topology": {"kind": "two_tier", "gateways": 2},
    "workload": {"dataset": "digits", "partition": {"kind": "iid"}, "model": {"family": "cnn", "cut": 1},
                 "batch_size": 32},
    "budgets": {"max_bytes": 50e6, "max_client_flops": 50e9},
}
ALGORITHMS = [
    {"name": "fedavg", "lr": 0.1, "momentum": 0.9, "local_epochs": 2},
    {"name": "sl", "lr": 0.05, "momentum": 0.9},
    {"name": "splitfed", "lr": 0.1, "momentum": 0.9},
]


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/quickstart"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 160)
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        runs = progress.add_task("runs", total=len(ALGORITHMS))
        for algo in ALGORITHMS:
            sc = scenario_from_dict({**BASE, "seed": args.seed, "algorithm": {**algo, "rounds": args.rounds}})
            rounds = progress.add_task(f"  {algo['name']} rounds", total=args.rounds)
            result = run(sc, on_round=lambda done, total, t=rounds: progress.update(t, completed=done))
            progress.remove_task(rounds)
            rows.append(result.summary)
            progress.advance(runs)
    print_summary(rows)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "summary.csv", index=False)
    energy_cols = [c for c in df.columns if c.startswith("energy_j_") and c not in
                   ("energy_j_clients", "energy_j_server", "energy_j_total")]
    console.print("client energy by device class (J):")
    console.print(df[["algorithm", *energy_cols]].to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    console.print(f"summary written to {args.out / 'summary.csv'}")
    return df


if __name__ == "__main__":
    main()
