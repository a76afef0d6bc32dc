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
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


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
        "step_overhead_s": p.step_overhead_s, "traffic_bytes_per_s": p.traffic_bytes_per_s,
        "kernel_overhead_s": p.kernel_overhead_s, "idle_w": p.power.idle_w, "compute_w": p.power.compute_w,
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


def _budgets(max_bytes, max_client_flops, max_client_energy_j, max_time_s, min_accuracy) -> dict[str, float]:
    given = {"max_bytes": max_bytes, "max_client_flops": max_client_flops, "max_client_energy_j": max_client_energy_j,
             "max_time_s": max_time_s, "min_accuracy": min_accuracy}
    return {k: v for k, v in given.items() if v is not None}


_MAX_BYTES = typer.Option(None, "--max-bytes", help="budget: bytes up + down per run")
_MAX_FLOPS = typer.Option(None, "--max-client-flops", help="budget: client FLOPs (fwd + bwd) per run")
_MAX_ENERGY = typer.Option(None, "--max-client-energy-j", help="budget: the clients' energy per run (J)")
_MAX_TIME = typer.Option(None, "--max-time-s", help="budget: simulated time per run (s)")
_MIN_ACC = typer.Option(None, "--min-accuracy", help="floor on the final mean client accuracy")


@app.command("report")
def report_cmd(results: Path = typer.Argument(..., help="results folder (summary.parquet or summary.csv)"),
               out: Optional[Path] = typer.Option(None, "--out", help="report folder (default RESULTS/report)"),
               max_bytes: Optional[float] = _MAX_BYTES, max_client_flops: Optional[float] = _MAX_FLOPS,
               max_client_energy_j: Optional[float] = _MAX_ENERGY, max_time_s: Optional[float] = _MAX_TIME,
               min_accuracy: Optional[float] = _MIN_ACC) -> None:
    """Build the report of a results folder from its tables: report.html (offline), PNGs, CSVs, summary.md."""
    from simkit.report import build_report

    budgets = _budgets(max_bytes, max_client_flops, max_client_energy_j, max_time_s, min_accuracy)
    try:
        written = build_report(results, out, budgets=budgets or None)
    except SimkitError as exc:
        _fail(exc)
    console.print(f"report written to {written['report.html']} ({len(written)} files, "
                  f"Markdown summary in {written['summary.md'].name})", highlight=False)


@app.command("plan")
def plan_cmd(study: Path = typer.Argument(..., help="a study's results folder, or a study YAML (run first if needed)"),
             max_bytes: Optional[float] = _MAX_BYTES, max_client_flops: Optional[float] = _MAX_FLOPS,
             max_client_energy_j: Optional[float] = _MAX_ENERGY, max_time_s: Optional[float] = _MAX_TIME,
             min_accuracy: Optional[float] = _MIN_ACC,
             csv: Optional[Path] = typer.Option(None, "--csv", help="also write the ranked table to this CSV"),
             out: Optional[Path] = typer.Option(None, "--out", help="result folder when STUDY is a study YAML"),
             executor: str = typer.Option("pool", "--executor", help="serial | pool | ray (when STUDY is a YAML)"),
             address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray only)")) -> None:
    """Rank a study's settings under budgets: feasible ones first (Pareto-optimal starred), then what binds.

    STUDY may be a study YAML: its missing runs are simulated first (finished ones are reused)."""
    from simkit.errors import StudyError
    from simkit.plan import plan_dir
    from simkit.report import budget_text, fmt_num

    budgets = _budgets(max_bytes, max_client_flops, max_client_energy_j, max_time_s, min_accuracy)
    try:
        if study.is_file() and study.suffix in (".yaml", ".yml"):
            from simkit.study import load_study

            st = load_study(study, out=out)
            if st.pending():
                console.print(f"running {len(st.pending())} missing run(s) of study {st.name} first", highlight=False)
            st.run(executor, address=address, progress=True)
            study = st.out
        table = plan_dir(study, **budgets)
        if csv is not None:
            try:
                table.to_csv(csv, index=False)
            except OSError as exc:
                raise StudyError(f"cannot write the CSV: {exc.strerror or exc}", file=str(csv)) from None
    except SimkitError as exc:
        _fail(exc)
    n_ok = int(table["feasible"].sum())
    title = f"{n_ok} of {len(table)} settings feasible" + (f" under {budget_text(budgets)}" if budgets else
                                                             " (no budgets given)")
    out = Table("#", "", "setting", "seeds", "accuracy", "MB", "client GFLOP", "client J", "sim. s", "C3", "binds",
                title=title, caption="means over seeds; ★ Pareto-optimal among the feasible settings")
    for i, r in table.iterrows():
        if not r["feasible"] and (i == 0 or table.at[i - 1, "feasible"]) and n_ok:
            out.add_section()
        out.add_row(str(i + 1) if r["feasible"] else "-", "★" if r["pareto"] else "", str(r["setting"]),
                    str(int(r["n_seeds"])), fmt_num(r["accuracy_mean"], "acc"), fmt_num(r["bytes_total"] / 1e6),
                    fmt_num(r["client_flops"] / 1e9), fmt_num(r["energy_j_clients"]), fmt_num(r["sim_time_s"]),
                    fmt_num(r["c3_score"], "acc"), f"[red]{r['binds']}[/]" if r["binds"] else "",
                    style=None if r["feasible"] else "dim")
    console.print(out)
    if csv is not None:
        console.print(f"plan written to {csv}", highlight=False)


@app.command("sweep")
def sweep_cmd(study_file: Path = typer.Argument(..., help="study YAML: name, base, grid, changes, seeds, budgets"),
              out: Optional[Path] = typer.Option(None, "--out", help="result folder (default results/<study name>)"),
              executor: str = typer.Option("pool", "--executor", help="serial | pool | ray"),
              address: Optional[str] = typer.Option(None, "--address",
                                                    help="Ray cluster to join: auto or HOST:PORT (ray only)"),
              workers: Optional[int] = typer.Option(None, "--workers", help="runs at once (default: all cores)"),
              quiet: bool = typer.Option(False, "--quiet", help="no progress bar")) -> None:
    """Run a study (every point x seed); finished runs are skipped, failed ones retried."""
    from simkit.study import HOST_COLUMNS, PARAM_PREFIX, load_study

    try:
        study = load_study(study_file, out=out)
        result = study.run(executor, workers=workers, address=address, progress=not quiet)
    except SimkitError as exc:
        _fail(exc)
    df = result.summary
    params = [PARAM_PREFIX + p for p in result.params]
    table = Table("run", *(p[len(PARAM_PREFIX):] for p in params), "seed", "acc mean", "MB total", "client kJ",
                  "sim time s", "C3", title=f"study {study.name}")
    shown = df.head(50)
    for r in shown.to_dict("records"):
        table.add_row(r["run_key"][:8], *(str(r[p]) for p in params), str(r["seed"]), f"{r['accuracy_mean']:.3f}",
                      f"{r['bytes_total'] / 1e6:,.2f}", f"{r['energy_j_clients'] / 1e3:,.3f}",
                      f"{r['sim_time_s']:,.1f}", f"{r.get('c3_score', float('nan')):.3f}")
    if len(df):
        console.print(table)
    if len(df) > len(shown):
        console.print(f"... {len(df) - len(shown)} more rows in {study.out / 'summary.csv'}", highlight=False)
    for e in result.errors.to_dict("records"):
        where = ", ".join(f"{p[len(PARAM_PREFIX):]}={e[p]}" for p in params)
        err_console.print(f"[red]failed[/] {e['run_key']} ({where}, seed={e['seed']}): {e['error_type']}: "
                          f"{e['error_message']}", highlight=False)
    console.print(f"{len(df)} of {len(study)} runs finished, {len(result.errors)} failed; tables in {study.out}/ "
                  f"(summary.csv, summary.parquet, runs/<key>/; host timings: {', '.join(HOST_COLUMNS)})",
                  highlight=False)
    if len(result.errors):
        raise typer.Exit(1)


@app.command("histogram")
def histogram_cmd(scenario: Path = typer.Argument(..., help="scenario YAML")) -> None:
    """Print the per-client class histogram of a scenario's partition (training labels)."""
    import simpy

    from simkit.algorithms.base import Context
    from simkit.config import load_scenario
    from simkit.learning.partition import format_histogram
    from simkit.records import Recorder
    from simkit.rng import SeedTree
    from simkit.world.fleet import build_world

    try:
        sc = load_scenario(scenario)
        seeds = SeedTree(sc.seed)
        world = build_world(sc, env=simpy.Environment(), recorder=Recorder(), seeds=seeds)
        ctx = Context(sc.model_copy(update={"train": True}), world, Recorder(), seeds)
    except SimkitError as exc:
        _fail(exc)
    console.print(f"partition {sc.workload.partition.kind} of {sc.workload.dataset!r} over "
                  f"{len(ctx.clients)} clients (seed {sc.seed}); training samples per class:", highlight=False)
    console.print(format_histogram([c.data for c in ctx.clients]), highlight=False)


@app.command("replay")
def replay_cmd(run_dir: Path = typer.Argument(..., help="a run folder: scenario.yaml + summary (from simkit run "
                                                          "--out or a study's runs/<key>/)")) -> None:
    """Re-run a recorded run from its saved scenario and seed; check the summary is identical."""
    from simkit.replay import replay

    try:
        report = replay(run_dir)
    except SimkitError as exc:
        _fail(exc)
    for line in report.notes:
        err_console.print(f"[yellow]note:[/] {line}", highlight=False)
    if report.identical:
        console.print(f"identical: {len(report.compared)} summary columns match the recording "
                      f"(host timing columns ignored: {', '.join(report.ignored)})", highlight=False)
        return
    table = Table("column", "recorded", "replayed", title="replay differs from the recording")
    for col, (a, b) in report.differences.items():
        table.add_row(col, repr(a), repr(b))
    console.print(table)
    raise typer.Exit(1)


@app.command("calibrate")
def calibrate_cmd(scenario: Optional[Path] = typer.Argument(None, help="scenario whose workload model is timed "
                                                                         "(default: digits, CNN, cut 1, batch 32)"),
                  out: Path = typer.Option(Path("host.yaml"), "--out", help="device profile to write"),
                  name: Optional[str] = typer.Option(None, "--name", help="profile name (default: the --out file's "
                                                                          "stem, which a profile's name must match)"),
                  threads: int = typer.Option(1, "--threads", help="torch threads while measuring"),
                  min_time: float = typer.Option(0.3, "--min-time", min=0.001,
                                                 help="seconds per timed run of a step (more: less noise)")) -> None:
    """Measure this host's effective FLOP/s on the workload's model parts and write a device profile."""
    import torch

    from simkit.calibrate import calibrate, write_profile
    from simkit.config import load_scenario, scenario_from_dict

    name = name or out.stem
    if out.stem != name:   # (checked before measuring: load_profile would refuse the file)
        _fail(SimkitError(f"--name {name!r} does not match the file it would be written to, {out.name!r}: a "
                          f"profile's file is NAME.yaml (give --out {out.with_name(name + '.yaml')} or drop --name)"))
    try:
        sc = load_scenario(scenario) if scenario else scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}})
        torch.set_num_threads(threads)
        cal = calibrate(sc, min_time=min_time)
        write_profile(cal, out, name)
    except SimkitError as exc:
        _fail(exc)
    traffic = f"{cal.traffic_bytes_per_s / 1e9:,.2f} GB/s written" if cal.traffic_bytes_per_s else "traffic free"
    table = Table("compute", "cut", "batch", "FLOPs", "bytes written", "kernels", "measured ms", "simulated ms",
                  "simulated / measured",
                  title=f"{cal.effective_flops / 1e9:,.2f} GFLOP/s effective, {traffic}, "
                        f"{cal.overhead_s * 1e6:,.0f} us per compute + {cal.kernel_overhead_s * 1e6:,.1f} us per kernel "
                        f"({threads} thread(s))")
    fidelity = {id(p) for p in cal.fidelity_points()}
    for p in cal.parts:
        table.add_row(p.part, str(p.cut or "-"), str(p.batch), f"{p.flops:,.0f}", f"{p.nbytes:,.0f}", str(p.kernels),
                      f"{p.seconds * 1e3:.3f}", f"{cal.predicted(p.flops, p.nbytes, p.kernels) * 1e3:.3f}",
                      f"{cal.ratio(p):.3f}" + (" *" if id(p) in fidelity else ""))
    console.print(table)
    parts = ", ".join(f"{k} {v:.3f}" for k, v in cal.ratios().items())
    console.print(f"simulated / measured step time at the workload's cut and batch (*): {parts}; "
                  f"calibration_error_max {cal.error_max:.3f} (each compute alone, all rows: {cal.fit_error_max:.3f}); "
                  f"profile written to {out}", highlight=False)


def main() -> None:
    try:
        app()
    except SimkitError as exc:  # pragma: no cover - commands handle their own
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
