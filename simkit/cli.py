"""The ``simkit`` command line: a thin layer over the Python API.

Every command turns a :class:`~simkit.errors.SimkitError` into one clear line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from simkit.errors import SimkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Simulate split and federated learning on device fleets.")
profiles_app = typer.Typer(no_args_is_help=True, help="List and show device profiles.")
app.add_typer(profiles_app, name="profiles")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fail(exc: SimkitError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@profiles_app.command("list")
def profiles_list(directory: Optional[Path] = typer.Option(None, "--dir", help="profile folder")) -> None:
    """List the device profiles."""
    from simkit.config import load_profiles

    try:
        profiles = load_profiles(directory)
    except SimkitError as exc:
        _fail(exc)
    table = Table("name", "kind", "peak GFLOP/s", "eff.", "idle W", "compute W", "access", "description")
    for p in profiles.values():
        table.add_row(p.name, p.kind, f"{p.peak_flops / 1e9:,.0f}", f"{p.efficiency:.2f}", f"{p.power.idle_w:g}",
                      f"{p.power.compute_w:g}", p.default_access, p.description)
    console.print(table)


@profiles_app.command("show")
def profiles_show(name: str, directory: Optional[Path] = typer.Option(None, "--dir", help="profile folder")) -> None:
    """Show one device profile with the source of every number."""
    from simkit.config import load_profiles

    try:
        profiles = load_profiles(directory)
    except SimkitError as exc:
        _fail(exc)
    if name not in profiles:
        _fail(SimkitError(f"unknown profile {name!r}; known: {', '.join(profiles)}"))
    p = profiles[name]
    table = Table("field", "value", "source", title=f"{p.name}: {p.description}")
    flat = {
        "peak_flops": p.peak_flops, "efficiency": p.efficiency, "memory_bytes": p.memory_bytes,
        "step_overhead_s": p.step_overhead_s, "idle_w": p.power.idle_w, "compute_w": p.power.compute_w,
        "default_access": p.default_access, "battery_j": p.battery_j, "kind": p.kind,
    }
    for k, v in flat.items():
        src = p.sources.get(k) or p.sources.get(f"power.{k}", "")
        table.add_row(k, f"{v:,.6g}" if isinstance(v, float) else str(v), src)
    console.print(table)


@app.command("run")
def run_cmd(scenario: Path = typer.Argument(..., help="scenario YAML"),
            out: Optional[Path] = typer.Option(None, "--out", help="folder for summary.csv and the tables"),
            seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed")) -> None:
    """Simulate one scenario, print its summary, write its tables."""
    from simkit.config import load_scenario, with_changes
    from simkit.progress import round_progress
    from simkit.run import run

    try:
        sc = load_scenario(scenario)
        if seed is not None:
            sc = with_changes(sc, {"seed": seed})
        with round_progress(sc.algorithm.rounds, f"{sc.name} [{sc.algorithm.name}]") as on_round:
            result = run(sc, on_round=on_round)
        print_summary([result.summary])
        if out is not None:
            result.save(out)
            console.print(f"tables written to {out}/ (summary.csv, clients.csv, rounds.csv, timeline_*.csv)")
    except SimkitError as exc:
        _fail(exc)


def print_summary(rows: list[dict]) -> None:
    """Print summary rows as a table (accuracy, bytes, FLOPs, time, energy)."""
    table = Table("algorithm", "seed", "acc mean", "acc min", "MB up", "MB down", "client GFLOP", "server GFLOP",
                  "sim time s", "t->target s", "client kJ", "C3")
    for r in rows:
        ttt = r.get("time_to_target_s")
        table.add_row(str(r["algorithm"]), str(r["seed"]), f"{r['accuracy_mean']:.3f}", f"{r['accuracy_min']:.3f}",
                      f"{r['bytes_up'] / 1e6:,.2f}", f"{r['bytes_down'] / 1e6:,.2f}",
                      f"{(r['client_flops_fwd'] + r['client_flops_bwd']) / 1e9:,.2f}",
                      f"{r['server_flops'] / 1e9:,.2f}", f"{r['sim_time_s']:,.1f}",
                      "-" if ttt is None or ttt != ttt else f"{ttt:,.1f}", f"{r['energy_j_clients'] / 1e3:,.3f}",
                      f"{r.get('c3_score', float('nan')):.3f}")
    console.print(table)


def main() -> None:
    try:
        app()
    except SimkitError as exc:  # pragma: no cover - commands handle their own
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
