"""Reports built from result tables only (the report never reruns a simulation).

:func:`build_report` reads a results folder -- ``summary.parquet`` or ``summary.csv`` (one row per
run) and, if there is one, a run's timeline -- and writes a self-contained ``report.html`` (figures
embedded as base64 PNGs, inline CSS, no network), the PNGs, CSVs of the aggregated tables and a
Markdown ``summary.md``. Every number is per *setting* (see :mod:`simkit.plan`): the mean over its
seeds with the spread (std, min-max) next to it.

Contents: accuracy against bytes, client energy and simulated time with each trade-off's Pareto
front; the C3-Score per setting and a heat map of C3 over a grid of byte and client-FLOP budgets;
energy per device class; a Gantt chart of one run; the aggregated table; and, when budgets are
given, the planner's verdict (:func:`simkit.plan.plan`).

Figures are drawn with matplotlib's object API on Agg canvases (no pyplot, no global backend
switch), so building a report has no side effect on the caller's plotting state.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from simkit.errors import StudyError
from simkit.metrics import pareto_front, score_row
from simkit.plan import ENERGY_TOTALS, aggregate, group_runs, load_summary, plan, with_derived

#: budget keys :func:`build_report` understands (``min_accuracy`` only feeds the plan section).
BUDGET_KEYS = ("max_bytes", "max_client_flops", "max_client_energy_j", "max_time_s", "min_accuracy")
#: trade-off figures: (x column, axis label, scale of the x values, file stem, Pareto flag column)
TRADEOFFS = (
    ("bytes_total", "bytes up + down per run (MB)", 1e-6, "accuracy_vs_bytes", "pareto_bytes"),
    ("energy_j_clients", "client energy per run (J)", 1.0, "accuracy_vs_energy", "pareto_energy"),
    ("sim_time_s", "simulated time per run (s)", 1.0, "accuracy_vs_time", "pareto_time"),
)
#: columns of the aggregated table: (metric, header, scale, number format: "acc" or "num")
TABLE_COLUMNS = (
    ("accuracy_mean", "accuracy", 1.0, "acc"),
    ("accuracy_min", "worst client acc.", 1.0, "acc"),
    ("bytes_total", "MB up+down", 1e-6, "num"),
    ("client_flops", "client GFLOP", 1e-9, "num"),
    ("server_flops", "server GFLOP", 1e-9, "num"),
    ("sim_time_s", "sim. time s", 1.0, "num"),
    ("time_to_target_s", "time to target s", 1.0, "num"),
    ("energy_j_clients", "client energy J", 1.0, "num"),
    ("energy_j_total", "total energy J", 1.0, "num"),
    ("c3_score", "C3 (as run)", 1.0, "acc"),
)
GRID_SIZE = 8
MARKERS = "osD^vPX*<>hp"
DPI = 110


# ------------------------------------------------------------------------------ formatting
def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def fmt_num(v, kind: str = "num") -> str:
    """A number as the report prints it: accuracies with 3 decimals, other values with 3
    significant digits (thousands separators from 100 up), ``n/a`` for missing values."""
    if not _finite(v):
        return "n/a"
    v = float(v)
    if kind == "acc":
        return f"{v:.3f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def fmt_spread(agg: pd.Series, metric: str, scale: float = 1.0, kind: str = "num") -> str:
    """``mean ± std (min–max)`` over seeds; just the mean for a single seed or when every seed gave
    the same value."""
    mean = agg.get(metric)
    if not _finite(mean):
        return "n/a"
    text = fmt_num(mean * scale, kind)
    std, lo, hi = agg.get(f"{metric}.std"), agg.get(f"{metric}.min"), agg.get(f"{metric}.max")
    if _finite(std) and agg.get("n_seeds", 1) > 1 and not (std == 0 and lo == hi):
        text += f" ± {fmt_num(std * scale, kind)} ({fmt_num(lo * scale, kind)}–{fmt_num(hi * scale, kind)})"
    return text


def _html_table(header: list[str], rows: list[list[str]], cls: str, *, row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return (f'<div class="table-wrap"><table class="simkit-table {cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _budget_dict(budgets) -> dict[str, float]:
    if budgets is None:
        return {}
    if isinstance(budgets, Mapping):
        unknown = set(budgets) - set(BUDGET_KEYS)
        if unknown:
            raise ValueError(f"unknown budget(s) {sorted(unknown)}; known: {', '.join(BUDGET_KEYS)}")
        items = dict(budgets)
    else:  # a BudgetSpec or any object with the budget attributes
        items = {k: getattr(budgets, k, None) for k in BUDGET_KEYS}
    return {k: float(v) for k, v in items.items() if v is not None}


# ------------------------------------------------------------------------------ figures
def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():  # crowded figures fall back to the default layout; that is fine
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _styles(algorithms: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {a: (cmap(i % 10), MARKERS[i % len(MARKERS)]) for i, a in enumerate(algorithms)}


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _log_if_wide(ax, values: np.ndarray, axis: str = "x") -> None:
    v = values[np.isfinite(values)]
    if len(v) and (v > 0).all() and v.max() / v.min() > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def tradeoff_figure(agg: pd.DataFrame, xcol: str, xlabel: str, scale: float, styles: dict, path: Path) -> Path:
    """Accuracy (mean ± std over seeds) against one cost, a point per setting, Pareto front marked."""
    fig = _new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    ok = agg[agg["accuracy_mean"].notna() & agg[xcol].notna()]
    if not len(ok):
        _empty(ax, "no accuracy/cost values to plot (what-if runs without training?)")
        return _save(fig, path)
    for algo, sub in ok.groupby("algorithm", sort=False):
        color, marker = styles[str(algo)]
        ax.errorbar(sub[xcol] * scale, sub["accuracy_mean"], xerr=sub[f"{xcol}.std"].fillna(0) * scale,
                    yerr=sub["accuracy_mean.std"].fillna(0), fmt=marker, color=color, ms=7, capsize=3,
                    elinewidth=1, label=str(algo))
    front = ok[pareto_front(ok, maximize=["accuracy_mean"], minimize=[xcol])].sort_values(xcol)
    fx, fy = front[xcol].to_numpy(float) * scale, front["accuracy_mean"].to_numpy(float)
    ax.step(fx, fy, where="post", color="black", lw=1.2, ls="--", zorder=1, label="Pareto front")
    ax.scatter(fx, fy, s=220, facecolors="none", edgecolors="black", linewidths=1.6, zorder=3)
    show = ok if len(ok) <= 10 else front
    for _, r in show.iterrows():
        ax.annotate(r["setting"], (r[xcol] * scale, r["accuracy_mean"]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8, color="0.15")
    _log_if_wide(ax, ok[xcol].to_numpy(float) * scale)
    ax.set_xlabel(xlabel + ("  [log]" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("final mean client accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    ax.set_title(f"accuracy vs {xlabel.split(' per run')[0]}  (mean ± std over seeds; ringed: Pareto-optimal)",
                 fontsize=10)
    return _save(fig, path)


def budget_grid(agg: pd.DataFrame, n: int = GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Log-spaced byte and client-FLOP budgets spanning the observed costs: from 1.5x the cheapest
    setting (a budget equal to a cost scores 0) to 10x the dearest."""
    def span(col: str) -> np.ndarray:
        v = agg[col].to_numpy(float)
        v = v[np.isfinite(v) & (v > 0)]
        if not len(v):
            return np.logspace(0, 1, n)
        return np.geomspace(1.5 * v.min(), 10 * v.max(), n)

    return span("bytes_total"), span("client_flops")


def c3_grid(runs: pd.DataFrame, sid: np.ndarray, settings: pd.DataFrame, fixed: dict[str, float],
            n: int = GRID_SIZE) -> pd.DataFrame:
    """C3 of every setting (mean over its seeds) at every cell of :func:`budget_grid`, computed with
    :func:`simkit.metrics.score_row`; ``fixed`` budgets (energy, time) apply at every cell."""
    agg_costs = pd.DataFrame({"bytes_total": pd.Series(runs["bytes_total"].to_numpy(float)).groupby(sid).mean(),
                              "client_flops": pd.Series(runs["client_flops"].to_numpy(float)).groupby(sid).mean()})
    byte_budgets, flop_budgets = budget_grid(agg_costs, n)
    records = runs.to_dict("records")
    out = []
    for i, mb in enumerate(byte_budgets):
        for j, mf in enumerate(flop_budgets):
            budgets = {**fixed, "max_bytes": float(mb), "max_client_flops": float(mf)}
            scores = np.array([score_row(r, budgets) for r in records])
            means = pd.Series(scores).groupby(sid).mean()
            for s, c3 in means.items():
                out.append({"i": i, "j": j, "max_bytes": mb, "max_client_flops": mf,
                            "setting": settings.at[s, "setting"], "algorithm": str(settings.at[s, "algorithm"]),
                            "c3": float(c3)})
    return pd.DataFrame(out)


def c3_heatmap_figure(grid: pd.DataFrame, algorithms: list[str], path: Path) -> Path:
    """One heat map per algorithm (its best setting per cell) plus, with several algorithms, the best
    overall with the winner's name in each cell."""
    import matplotlib

    n = int(grid["i"].max()) + 1
    byte_b = np.sort(grid["max_bytes"].unique())
    flop_b = np.sort(grid["max_client_flops"].unique())
    panels = [(a, grid[grid["algorithm"] == a]) for a in algorithms]
    if len(algorithms) > 1:
        panels.append(("best overall", grid))
    ncols = 2 if len(panels) in (2, 4) else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.3 * ncols + 0.8, 4.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    c3_vals = grid["c3"].to_numpy(float)
    vmax = max(float(np.nanmax(c3_vals)), 1e-9) if np.isfinite(c3_vals).any() else 1.0  # NaN: what-if runs
    cmap = matplotlib.colormaps["viridis"]
    image = None
    for k, (title, sub) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        best = sub.sort_values("c3", ascending=False, kind="stable").drop_duplicates(["i", "j"])
        mat = np.full((n, n), np.nan)
        who = np.full((n, n), "", dtype=object)
        for _, r in best.iterrows():
            mat[int(r["i"]), int(r["j"])] = r["c3"]
            who[int(r["i"]), int(r["j"])] = r["algorithm"]
        image = ax.imshow(mat, origin="lower", cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                if not np.isfinite(v):
                    continue
                color = "white" if v < 0.6 * vmax else "black"
                # a winner only where someone scores above 0 (at 0 every budget choice is infeasible)
                text = f"{who[i, j][:8]}\n{v:.2f}" if title == "best overall" and v > 0 else f"{v:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5 if title == "best overall" else 7.5,
                        color=color)
        ax.set_xticks(range(n), [fmt_num(f / 1e9) for f in flop_b], rotation=45, fontsize=7)
        ax.set_yticks(range(n), [fmt_num(b / 1e6) for b in byte_b], fontsize=7)
        ax.set_xlabel("client FLOP budget (GFLOP)", fontsize=8)
        ax.set_ylabel("byte budget (MB)", fontsize=8)
        ax.set_title(title if title == "best overall" else f"{title} (best setting)", fontsize=10)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8, label="C3-Score (mean over seeds)")
    fig.suptitle("C3-Score over a grid of budgets (0 = a budget is exceeded)", fontsize=11)
    return _save(fig, path)


def energy_classes(columns) -> list[str]:
    """The ``energy_j_<device class>`` columns (totals excluded)."""
    return [c for c in columns if c.startswith("energy_j_") and c not in ENERGY_TOTALS
            and not c.endswith((".std", ".min", ".max"))]


def energy_figure(agg: pd.DataFrame, path: Path) -> Path:
    """Stacked horizontal bars: client energy per device class (mean over seeds), the server's on
    top (hatched), and the std of the total over seeds as a whisker."""
    import matplotlib

    classes = energy_classes(agg.columns)
    segments = classes + (["energy_j_server"] if "energy_j_server" in agg.columns else [])
    fig = _new_figure(8.5, 1.2 + 0.45 * len(agg))
    ax = fig.add_subplot()
    if not segments:
        _empty(ax, "the summary table has no energy_j_<device class> columns")
        return _save(fig, path)
    cmap = matplotlib.colormaps["tab20"]
    y = np.arange(len(agg))[::-1]
    left = np.zeros(len(agg))
    for k, col in enumerate(segments):
        vals = agg[col].fillna(0).to_numpy(float)
        server = col == "energy_j_server"
        ax.barh(y, vals, left=left, height=0.6, color="0.85" if server else cmap(k % 20),
                hatch="//" if server else None, edgecolor="0.4" if server else "white", linewidth=0.6,
                label="server" if server else col.removeprefix("energy_j_"))
        left += vals
    total_col = "energy_j_total" if "energy_j_server" in agg.columns else "energy_j_clients"
    std = agg.get(f"{total_col}.std")
    if std is not None and std.notna().any():
        ax.errorbar(left, y, xerr=std.fillna(0).to_numpy(float), fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, agg["setting"].astype(str), fontsize=8)
    ax.set_xlabel("energy per run (J, mean over seeds)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="device class", title_fontsize=8)
    ax.set_title("energy by device class", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------ timeline
def find_timeline(results_dir: Path) -> tuple[Path, Path | None] | None:
    """``(compute, transfer or None)`` of the first run with a timeline, or None. Looks at
    ``runs/*/timeline_compute.parquet`` (a study) first, then ``timeline_compute.csv`` (one run)."""
    candidates = sorted(results_dir.glob("runs/*/timeline_compute.parquet"))
    candidates += [p for p in [results_dir / "timeline_compute.csv"] if p.is_file()]
    candidates += sorted(results_dir.glob("runs/*/timeline_compute.csv"))
    for comp in candidates:
        transfer = comp.with_name(comp.name.replace("compute", "transfer"))
        return comp, (transfer if transfer.is_file() else None)
    return None


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise StudyError(f"cannot read the timeline: {exc}", file=str(path)) from None


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def gantt_figure(compute: pd.DataFrame, transfer: pd.DataFrame | None, path: Path, *, title: str,
                 max_devices: int = 12, max_events: int = 1500) -> tuple[Path, list[str]]:
    """Per device a row: compute bars (upper half, by tag), the device's sends (lower half, by tag)
    and idle gaps (grey), over simulated time. Returns the path and notes on what was left out."""
    import matplotlib

    need_c = {"device", "start", "end", "tag"}
    need_t = {"src", "start", "end", "tag"}
    if not need_c <= set(compute.columns):
        raise StudyError(f"timeline lacks column(s): {', '.join(sorted(need_c - set(compute.columns)))}")
    transfer = transfer if transfer is not None and need_t <= set(transfer.columns) else None
    comp = compute[["device", "start", "end", "tag"]].assign(
        kind="compute", status=compute["status"] if "status" in compute.columns else "done")
    parts = [comp]
    if transfer is not None and len(transfer):
        parts.append(transfer[["src", "start", "end", "tag"]].rename(columns={"src": "device"}).assign(
            kind="send", status=transfer["status"] if "status" in transfer.columns else "delivered"))
    ev = pd.concat(parts, ignore_index=True)
    ev["device"] = ev["device"].astype(str)
    ev["tag"] = ev["tag"].astype(str)
    notes = []
    makespan = float(ev["end"].max()) if len(ev) else 0.0

    devices = sorted(ev["device"].unique(), key=lambda d: (d != "server", _natural(d)))
    if len(devices) > max_devices:
        notes.append(f"showing {max_devices} of {len(devices)} devices (the server and the first clients by name)")
        devices = devices[:max_devices]
    ev = ev[ev["device"].isin(devices)].sort_values("start", kind="stable")
    window = makespan
    if len(ev) > max_events:
        window = float(ev["start"].iloc[max_events])
        notes.append(f"showing the first {fmt_num(window)} s of {fmt_num(makespan)} s simulated "
                     f"({max_events} of {len(ev)} events)")
        ev = ev[ev["start"] < window]
    ev = ev.assign(end=ev["end"].clip(upper=window))

    rows = {d: len(devices) - 1 - k for k, d in enumerate(devices)}
    fig = _new_figure(11, 1.6 + 0.55 * len(devices))
    ax = fig.add_subplot()
    if not len(ev):
        _empty(ax, "the timeline is empty")
        return _save(fig, path), notes
    # one distinct colour per (kind, tag); tab10's grey is left to the idle gaps
    tab10, tab20b = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20b"]
    palette = [tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [tab20b(i) for i in range(0, 20, 2)]
    ctags = sorted(ev.loc[ev["kind"] == "compute", "tag"].unique())
    stags = sorted(ev.loc[ev["kind"] == "send", "tag"].unique())
    keys = [("compute", t) for t in ctags] + [("send", t) for t in stags]
    colors = {key: palette[k % len(palette)] for k, key in enumerate(keys)}
    for d in devices:  # idle = neither computing nor sending
        busy = _union(list(zip(ev.loc[ev["device"] == d, "start"], ev.loc[ev["device"] == d, "end"])))
        gaps, t = [], 0.0
        for s, e in busy:
            if s > t:
                gaps.append((t, s - t))
            t = max(t, e)
        if window > t:
            gaps.append((t, window - t))
        ax.broken_barh(gaps, (rows[d] - 0.06, 0.12), facecolors="0.82", label="_idle")
    for (kind, tag, status), sub in ev.groupby(["kind", "tag", "status"], sort=True):
        bad = status in ("interrupted", "dropped")
        y0 = (lambda r: r + 0.02) if kind == "compute" else (lambda r: r - 0.4)
        for d, dsub in sub.groupby("device"):
            ax.broken_barh(list(zip(dsub["start"], dsub["end"] - dsub["start"])), (y0(rows[d]), 0.38),
                           facecolors=colors[(kind, tag)], edgecolors="black" if bad else "none",
                           hatch="xx" if bad else None, linewidth=0.5)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[("compute", t)], label=f"compute: {t}") for t in ctags]
    handles += [Patch(color=colors[("send", t)], label=f"send: {t}") for t in stags]
    handles.append(Patch(color="0.82", label="idle"))
    if (ev["status"].isin(["interrupted", "dropped"])).any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="interrupted / dropped"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_yticks([rows[d] for d in devices], devices, fontsize=8)
    ax.set_ylim(-0.6, len(devices) - 0.4)
    ax.set_xlim(0, window if window > 0 else 1)
    ax.set_xlabel("simulated time (s)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title + "  (upper half: compute, lower half: sends)", fontsize=10)
    return _save(fig, path), notes


# ------------------------------------------------------------------------------ the report
CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.meta { color: #555; font-size: 0.9em; }
figure.fig { margin: 1em 0; } img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
table.simkit-table { border-collapse: collapse; font-size: 0.82em; margin: 0.8em 0; }
table.simkit-table th, table.simkit-table td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
table.simkit-table td { white-space: nowrap; } .table-wrap { overflow-x: auto; }
table.simkit-table th { background: #f3f3f3; }
table.simkit-table td:first-child, table.simkit-table th:first-child { text-align: left; }
table.plan-table td:nth-child(2) { text-align: left; } tr.pareto td:first-child { font-weight: bold; } tr.infeasible { color: #999; }
.note { background: #fff8e1; border-left: 4px solid #f0c000; padding: 0.4em 0.8em; }
#simkit-check { display: none; }
"""
# On load, count the embedded figures that decoded; any script error replaces the verdict. A
# headless browser's DOM dump (the test suite's check) then says "ok N" or "error ...".
CHECK_JS = """
(function () {
  var errors = [];
  window.onerror = function (msg) { errors.push(String(msg)); };
  window.addEventListener("load", function () {
    var imgs = document.querySelectorAll("img.figure"), good = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) good++; }
    var d = document.createElement("div");
    d.id = "simkit-check";
    d.textContent = errors.length ? "error " + errors.join("; ")
                  : (good === imgs.length ? "ok " : "broken ") + good;
    document.body.appendChild(d);
  });
})();
"""


def build_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, budgets=None,
                 max_gantt_devices: int = 12, max_gantt_events: int = 1500) -> dict[str, Path]:
    """Write the report of a results folder.

    Args:
        results_dir: folder with ``summary.parquet`` or ``summary.csv`` (and optionally a timeline:
            ``runs/*/timeline_compute.parquet`` or ``timeline_compute.csv``, with the matching
            ``timeline_transfer`` file).
        out_dir: where to write (default ``results_dir/report``); created if needed.
        budgets: optional ``max_bytes``, ``max_client_flops``, ``max_client_energy_j``,
            ``max_time_s``, ``min_accuracy`` (a mapping or a BudgetSpec). With budgets the report
            adds C3 under them and the planner's table; energy/time budgets also apply to every
            cell of the C3 heat map.
        max_gantt_devices, max_gantt_events: limits that keep the Gantt chart readable.

    Returns:
        ``{file name: path}`` of everything written (``report.html``, ``summary.md``, PNGs, CSVs).

    Raises:
        StudyError: the folder, its summary table or a required column is missing.
    """
    results_dir = Path(results_dir)
    summary = load_summary(results_dir)
    given = _budget_dict(budgets)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the report folder: {exc.strerror or exc}", file=str(out)) from None

    runs = with_derived(summary)
    settings, sid = group_runs(runs)
    agg = aggregate(summary)
    algorithms = list(dict.fromkeys(agg["algorithm"].astype(str)))
    styles = _styles(algorithms)
    written: dict[str, Path] = {}
    figures: dict[str, tuple[Path, str]] = {}

    def figure(stem: str, path: Path, caption: str) -> None:
        written[path.name] = path
        figures[stem] = (path, caption)

    # trade-offs and their Pareto fronts (over the per-setting means)
    fronts: dict[str, list[str]] = {}
    for xcol, xlabel, scale, stem, flag in TRADEOFFS:
        ok = agg["accuracy_mean"].notna() & agg[xcol].notna()
        agg[flag] = False
        if ok.any():
            front = pareto_front(agg[ok], maximize=["accuracy_mean"], minimize=[xcol])
            agg.loc[front[front].index, flag] = True
        fronts[stem] = list(agg.loc[agg[flag], "setting"])
        figure(stem, tradeoff_figure(agg, xcol, xlabel, scale, styles, out / f"{stem}.png"),
               f"Accuracy vs {xlabel}: one point per setting (mean over seeds, bars: std). "
               f"Pareto-optimal (max. accuracy, min. cost): {', '.join(fronts[stem]) or 'none'}.")

    # C3: as run, under the report's budgets, and over a grid of budgets
    c3 = agg[["setting", "algorithm", "n_seeds", "c3_score", "c3_score.std", "c3_score.min", "c3_score.max"]].copy()
    c3_budgets = {k: v for k, v in given.items() if k != "min_accuracy"}
    if c3_budgets:
        scores = pd.Series([score_row(r, c3_budgets) for r in runs.to_dict("records")]).groupby(sid)
        c3["c3_budgets"], c3["c3_budgets.std"] = scores.mean().to_numpy(), scores.std(ddof=1).to_numpy()
        c3["c3_budgets.min"], c3["c3_budgets.max"] = scores.min().to_numpy(), scores.max().to_numpy()
    fixed = {k: v for k, v in c3_budgets.items() if k in ("max_client_energy_j", "max_time_s")}
    grid = c3_grid(runs, sid, settings, fixed)
    figure("c3_heatmap", c3_heatmap_figure(grid, algorithms, out / "c3_heatmap.png"),
           "C3-Score (simkit's definition, simkit.metrics.c3_score) of the best setting of each algorithm over "
           f"a {GRID_SIZE}x{GRID_SIZE} log-spaced grid of byte and client-FLOP budgets, from 1.5x the cheapest to "
           "10x the dearest observed cost" + (f"; fixed budgets: {budget_text(fixed)}" if fixed else "") + ".")

    # energy by device class
    figure("energy_by_class", energy_figure(agg, out / "energy_by_class.png"),
           "Energy per run by device class (mean over seeds; hatched: the server; whisker: std of the total).")

    # one run's timeline
    timeline_note = ""
    found = find_timeline(results_dir)
    if found is None:
        timeline_note = ("No timeline in the results folder (looked for runs/*/timeline_compute.parquet and "
                         "timeline_compute.csv), so there is no Gantt chart.")
    else:
        comp_path, tr_path = found
        compute = _read(comp_path)
        transfer = _read(tr_path) if tr_path is not None else None
        rel = comp_path.parent.relative_to(results_dir).as_posix()
        title = f"timeline of run {rel}" if rel != "." else "timeline of the run"
        path, notes = gantt_figure(compute, transfer, out / "timeline_gantt.png", title=title,
                                   max_devices=max_gantt_devices, max_events=max_gantt_events)
        src = comp_path.relative_to(results_dir).as_posix()
        timeline_note = f"From {src}" + (f" and {tr_path.relative_to(results_dir).as_posix()}" if tr_path else "")
        timeline_note += ". Truncated: " + "; ".join(notes) + "." if notes else "."
        figure("timeline_gantt", path, "Gantt chart of one run: per device, compute (by tag), sends (by tag) "
               "and idle gaps over simulated time. " + timeline_note)

    planned = plan(summary, **given) if given else None

    # CSVs
    def csv(name: str, frame: pd.DataFrame) -> None:
        frame.to_csv(out / name, index=False)
        written[name] = out / name

    csv("settings.csv", agg)
    csv("c3.csv", c3)
    csv("c3_grid.csv", grid.drop(columns=["i", "j"]))
    eclasses = energy_classes(agg.columns) + (["energy_j_server"] if "energy_j_server" in agg.columns else [])
    energy_cols = [f"{c}{s}" for c in eclasses for s in ("", ".std")]
    csv("energy_by_class.csv", agg[["setting", "n_seeds", *energy_cols]])
    if planned is not None:
        csv("plan.csv", planned)

    # tables (the same rows for HTML and Markdown)
    main_header = ["setting", "seeds", *[h for _, h, _, _ in TABLE_COLUMNS], "Pareto (bytes/energy/time)"]
    main_rows, main_classes = [], []
    for k, r in agg.iterrows():
        cells = [r["setting"], str(int(r["n_seeds"]))]
        for m, _header, scale, kind in TABLE_COLUMNS:
            cell = fmt_spread(r, m, scale, kind)
            if m == "time_to_target_s":
                reached = int(runs.loc[sid == k, m].notna().sum())
                cell += f" [{reached}/{int(r['n_seeds'])} reached]"
            cells.append(cell)
        cells.append("/".join("★" if r[f] else "·" for f in ("pareto_bytes", "pareto_energy", "pareto_time")))
        main_rows.append(cells)
        main_classes.append("pareto" if r[["pareto_bytes", "pareto_energy", "pareto_time"]].any() else "")
    c3_header = ["setting", "seeds", "C3 as run (mean ± std (min–max))"] + (
        [f"C3 under {budget_text(c3_budgets)}"] if c3_budgets else [])
    c3_rows = []
    for _, r in c3.sort_values("c3_score", ascending=False, kind="stable").iterrows():
        row = [r["setting"], str(int(r["n_seeds"])), fmt_spread(r, "c3_score", 1.0, "acc")]
        if c3_budgets:
            row.append(fmt_spread(r, "c3_budgets", 1.0, "acc"))
        c3_rows.append(row)
    e_header = ["setting", *[c.removeprefix("energy_j_") + " J" for c in eclasses]]
    e_rows = [[r["setting"], *[fmt_spread(r, c) for c in eclasses]] for _, r in agg.iterrows()]
    plan_header, plan_rows, plan_classes = [], [], []
    if planned is not None:
        plan_header = ["", "setting", "accuracy", "MB", "client GFLOP", "client J", "sim. s", "feasible", "binds"]
        for _, r in planned.iterrows():
            plan_rows.append(["★" if r["pareto"] else "", r["setting"], fmt_num(r["accuracy_mean"], "acc"),
                              fmt_num(r["bytes_total"] / 1e6), fmt_num(r["client_flops"] / 1e9),
                              fmt_num(r["energy_j_clients"]), fmt_num(r["sim_time_s"]),
                              "yes" if r["feasible"] else "no", r["binds"]])
            plan_classes.append("pareto" if r["pareto"] else ("" if r["feasible"] else "infeasible"))

    n_runs, n_settings = len(summary), len(agg)
    seeds = sorted(summary["seed"].dropna().unique().tolist())
    dropped = summary.attrs.get("dropped_runs", 0)
    facts = (f"{n_runs} runs, {n_settings} settings, {len(algorithms)} algorithm(s) ({', '.join(algorithms)}), "
             f"seeds {', '.join(str(s) for s in seeds[:12])}{' ...' if len(seeds) > 12 else ''}"
             + (f"; {dropped} failed run(s) left out" if dropped else ""))
    source = next(p for p in (results_dir / "summary.parquet", results_dir / "summary.csv") if p.is_file())

    # ---- HTML
    def fig_html(stem: str) -> str:
        if stem not in figures:
            return ""
        path, caption = figures[stem]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f'<figure class="fig"><img class="figure" alt="{html.escape(stem)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')

    body = [f"<h1>simkit report: {html.escape(results_dir.resolve().name)}</h1>",
            f'<p class="meta">Source: {html.escape(str(source))}. {html.escape(facts)}. Every number is the mean '
            "over a setting's seeds, with std and (min–max) when there are several seeds.</p>"]
    if given:
        body.append(f'<p class="meta">Budgets: {html.escape(budget_text(given))}.</p>')
    body.append("<h2>Trade-offs</h2>")
    body += [fig_html(stem) for _, _, _, stem, _ in TRADEOFFS]
    body.append("<h2>C3-Score</h2>")
    body.append("<p>C3 = accuracy × Π(1 − cost/budget), 0 when a cost exceeds its budget (simkit's definition, "
                "see simkit.metrics).</p>")
    body.append(_html_table(c3_header, c3_rows, "c3-table"))
    body.append(fig_html("c3_heatmap"))
    body.append("<h2>Energy by device class</h2>")
    body.append(fig_html("energy_by_class"))
    body.append(_html_table(e_header, e_rows, "energy-table"))
    body.append("<h2>Timeline of one run</h2>")
    body.append(fig_html("timeline_gantt") if "timeline_gantt" in figures
                else f'<p class="note">{html.escape(timeline_note)}</p>')
    body.append("<h2>All settings</h2>")
    body.append("<p>Mean ± std over seeds (min–max). Pareto: ★ where the setting is on the front of accuracy "
                "vs bytes / client energy / simulated time.</p>")
    body.append(_html_table(main_header, main_rows, "settings-table", row_classes=main_classes))
    if planned is not None:
        body.append("<h2>Budget plan</h2>")
        body.append(f"<p>{int(planned['feasible'].sum())} of {len(planned)} settings meet "
                    f"{html.escape(budget_text(given))} (by their mean over seeds); ★ Pareto-optimal among them "
                    "(max. accuracy; min. bytes, client energy, time).</p>")
        body.append(_html_table(plan_header, plan_rows, "plan-table", row_classes=plan_classes))
    body.append(f'<p class="meta">Files: {html.escape(", ".join(sorted(written)))}, summary.md.</p>')
    n_fig = len(figures)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"simkit-figures\" content=\"{n_fig}\">"
            f"<title>simkit report: {html.escape(results_dir.resolve().name)}</title>"
            f"<style>{CSS}</style><script>{CHECK_JS}</script></head><body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
    written["report.html"] = out / "report.html"

    # ---- Markdown
    md = [f"# simkit report: {results_dir.resolve().name}", "", f"Source: `{source}`. {facts}.",
          "Every number is the mean over a setting's seeds, with ± std and (min–max) when there are several.", ""]
    if given:
        md += [f"Budgets: {budget_text(given)}.", ""]
    md += ["## All settings", "", _md_table(main_header, main_rows), "", "## Pareto fronts", ""]
    for _, xlabel, _, stem, _ in TRADEOFFS:
        md.append(f"- accuracy vs {xlabel.split(' per run')[0]}: {', '.join(fronts[stem]) or 'none'} "
                  f"([figure]({stem}.png))")
    md += ["", "## C3-Score", "", _md_table(c3_header, c3_rows), "", "Heat map over budgets: [c3_heatmap.png]"
           "(c3_heatmap.png), values in c3_grid.csv.", "", "## Energy by device class (J)", "",
           _md_table(e_header, e_rows), "", "## Timeline", "",
           (f"[timeline_gantt.png](timeline_gantt.png). {timeline_note}" if "timeline_gantt" in figures
            else timeline_note), ""]
    if planned is not None:
        md += ["## Budget plan", "", f"{int(planned['feasible'].sum())} of {len(planned)} settings are feasible "
               "(★ Pareto-optimal).", "", _md_table(plan_header, plan_rows), ""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    written["summary.md"] = out / "summary.md"
    return written


def budget_text(budgets: dict[str, float]) -> str:
    """Budgets in words and readable units, e.g. ``bytes ≤ 2,000 MB, accuracy ≥ 0.8``."""
    names = {"max_bytes": ("bytes ≤", 1e-6, " MB"), "max_client_flops": ("client FLOPs ≤", 1e-9, " GFLOP"),
             "max_client_energy_j": ("client energy ≤", 1.0, " J"), "max_time_s": ("time ≤", 1.0, " s"),
             "min_accuracy": ("accuracy ≥", 1.0, "")}
    return ", ".join(f"{names[k][0]} {fmt_num(v * names[k][1])}{names[k][2]}" for k, v in budgets.items())
