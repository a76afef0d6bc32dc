"""Result tables as *settings*, and the budget planner.

A study's summary table has one row per run. A **setting** is one configuration: the values of the
columns that identify it -- ``algorithm``, the algorithm's knobs (``algo_*``), a sweep's parameters
(``param:<dotted.path>``) and the ``scenario`` name -- with the seed left out. Everything simkit
reports per setting is the mean over its seeds, with the spread (std, min, max) next to it.

This module is pure table math (no plotting, no simulation); :mod:`simkit.report` draws from it.
The planner answers the question a user brings to a study: *given my budgets (bytes, client
energy, simulated time, client FLOPs, an accuracy floor), which settings fit, which of them are
Pareto-optimal, and which budget rules out the rest?*
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from simkit.errors import StudyError
from simkit.metrics import pareto_front

#: columns every summary table must have (a run's :data:`simkit.run.SUMMARY_COLUMNS` are a superset).
REQUIRED_COLUMNS = (
    "algorithm", "seed", "accuracy_mean", "accuracy_min", "bytes_up", "bytes_down", "client_flops_fwd",
    "client_flops_bwd", "server_flops", "sim_time_s", "time_to_target_s", "energy_j_clients", "energy_j_total",
    "c3_score",
)
#: energy columns that are totals, not device classes.
ENERGY_TOTALS = ("energy_j_clients", "energy_j_server", "energy_j_total")
#: columns that are per-run bookkeeping, neither part of a setting nor a metric.
RUN_COLUMNS = ("seed", "run_key", "status")
#: ``status`` values (lower case, prefix match) of runs that did not produce results.
FAILED_STATUS = ("fail", "error", "crash", "timeout", "cancel")

#: budget keyword -> (name used in ``binds``, column of the per-setting table, "max" or "min")
BUDGETS = {
    "max_bytes": ("bytes", "bytes_total", "max"),
    "max_client_energy_j": ("energy", "energy_j_clients", "max"),
    "max_time_s": ("time", "sim_time_s", "max"),
    "min_accuracy": ("accuracy", "accuracy_mean", "min"),
    "max_client_flops": ("flops", "client_flops", "max"),
}
#: the planner's Pareto objectives: maximise accuracy, minimise bytes, client energy and time.
PARETO_MAX = ("accuracy_mean",)
PARETO_MIN = ("bytes_total", "energy_j_clients", "sim_time_s")


# ------------------------------------------------------------------------------ loading
def find_summary(results_dir: str | os.PathLike) -> Path:
    """The summary table of a results folder: ``summary.parquet``, else ``summary.csv``.

    Raises:
        StudyError: the folder does not exist, is not a folder, or holds neither file.
    """
    d = Path(results_dir)
    if not d.exists():
        raise StudyError("results folder does not exist", file=str(d))
    if not d.is_dir():
        raise StudyError("not a results folder (expected a folder with summary.parquet or summary.csv)",
                         file=str(d))
    for name in ("summary.parquet", "summary.csv"):
        if (d / name).is_file():
            return d / name
    raise StudyError("no summary.parquet or summary.csv in the results folder", file=str(d))


def load_summary(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and check the summary table of ``results_dir`` (one row per run).

    Runs whose ``status`` says they failed are dropped (they carry no metrics); the number dropped
    is kept in ``df.attrs["dropped_runs"]`` so a report can say so.

    Raises:
        StudyError: naming the file, for a missing/unreadable table or missing required columns.
    """
    path = find_summary(results_dir)
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise StudyError(f"cannot read the summary table: {exc}", file=str(path)) from None
    return check_summary(df, file=str(path))


def check_summary(df: pd.DataFrame, *, file: str | None = None) -> pd.DataFrame:
    """Validate a summary table and drop failed runs (see :func:`load_summary`)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise StudyError(f"summary table lacks required column(s): {', '.join(missing)}", file=file)
    dropped = 0
    if "status" in df.columns:
        status = df["status"].astype(str).str.lower()
        bad = status.str.startswith(FAILED_STATUS)
        dropped = int(bad.sum())
        df = df[~bad]
    if not len(df):
        raise StudyError("summary table has no successful runs", file=file)
    df = df.reset_index(drop=True)
    df.attrs["dropped_runs"] = dropped
    return df


# ------------------------------------------------------------------------------ settings
def setting_columns(df: pd.DataFrame) -> list[str]:
    """The columns that identify a setting: ``scenario``, ``algorithm``, ``algo_*``, ``param:*``."""
    cols = [c for c in ("scenario", "algorithm") if c in df.columns]
    cols += [c for c in df.columns if c.startswith("algo_") or c.startswith("param:")]
    return cols


def _short(col: str) -> str:
    if col.startswith("algo_"):
        return col[len("algo_"):]
    if col.startswith("param:"):
        return col[len("param:"):].rsplit(".", 1)[-1]
    return col


def _fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def _same(a, b) -> bool:
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    return (na and nb) or (not na and not nb and a == b)


def setting_labels(settings: pd.DataFrame, cols: list[str]) -> pd.Series:
    """A short readable label per setting: the algorithm plus the identifying values that differ
    between settings *of the same algorithm* (e.g. ``adasplit kappa=0.5``)."""
    labels = pd.Series("", index=settings.index, dtype=object)
    other = [c for c in cols if c != "algorithm"]
    algos = settings["algorithm"].astype(str)
    for algo, idx in settings.groupby(algos, sort=False).groups.items():
        sub = settings.loc[idx]
        varying = [c for c in other if any(not _same(sub[c].iloc[0], v) for v in sub[c])]
        shorts = [_short(c) for c in varying]
        names = [s if shorts.count(s) == 1 else (c.removeprefix("param:")) for s, c in zip(shorts, varying)]
        for i in idx:
            parts = [f"{n}={_fmt_value(settings.at[i, c])}" for n, c in zip(names, varying)]
            labels.at[i] = " ".join([algo, *parts])
    return labels


def with_derived(summary: pd.DataFrame) -> pd.DataFrame:
    """Add per-run ``bytes_total`` (if absent) and ``client_flops`` (fwd + bwd)."""
    df = summary.copy()
    if "bytes_total" not in df.columns:
        df["bytes_total"] = df["bytes_up"] + df["bytes_down"]
    df["client_flops"] = df["client_flops_fwd"] + df["client_flops_bwd"]
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric per-run columns that are neither part of a setting nor bookkeeping."""
    ids = set(setting_columns(df)) | set(RUN_COLUMNS)
    return [c for c in df.columns if c not in ids and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])]


def group_runs(df: pd.DataFrame):
    """``(setting_table, setting_id_per_run)``: the distinct settings (identity columns, ``setting``
    label, ``n_seeds``) in order of first appearance, and the setting index of every run."""
    cols = setting_columns(df)
    keys = df[cols].astype(object).where(df[cols].notna(), None)
    codes = pd.Series(list(map(tuple, keys.itertuples(index=False))), index=df.index)
    order: dict[tuple, int] = {}
    sid = codes.map(lambda k: order.setdefault(k, len(order)))
    first = ~sid.duplicated()
    settings = df.loc[first, cols].reset_index(drop=True)
    settings.insert(0, "setting", setting_labels(settings, cols))
    settings["n_seeds"] = sid.value_counts().sort_index().to_numpy()
    return settings, sid.to_numpy()


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: identity columns, ``setting`` (label), ``n_seeds``, and for every numeric
    metric ``m`` its mean over seeds as ``m`` plus ``m.std`` (sample std; NaN for one seed),
    ``m.min`` and ``m.max``. Adds ``bytes_total`` and ``client_flops`` (fwd + bwd) first."""
    df = with_derived(summary)
    settings, sid = group_runs(df)
    metrics = metric_columns(df)
    g = df[metrics].groupby(sid, sort=True)
    parts = {"": g.mean(), ".std": g.std(ddof=1), ".min": g.min(), ".max": g.max()}
    out = {}
    for m in metrics:
        for suffix, frame in parts.items():
            out[f"{m}{suffix}"] = frame[m].to_numpy(float)
    return pd.concat([settings, pd.DataFrame(out)], axis=1)


# ------------------------------------------------------------------------------ planner
def plan(summary: pd.DataFrame, *, max_bytes: float | None = None, max_client_energy_j: float | None = None,
         max_time_s: float | None = None, min_accuracy: float | None = None,
         max_client_flops: float | None = None) -> pd.DataFrame:
    """Which settings of a study fit the given budgets.

    Args:
        summary: one row per run (see :data:`REQUIRED_COLUMNS`).
        max_bytes: budget on bytes up + down per run.
        max_client_energy_j: budget on the clients' total energy per run (J).
        max_time_s: budget on the simulated makespan (s).
        min_accuracy: floor on the final mean client accuracy.
        max_client_flops: budget on client FLOPs (fwd + bwd) per run.

    Returns:
        One row per setting with the means over its seeds (``accuracy_mean``, ``bytes_total``,
        ``client_flops``, ``energy_j_clients``, ``sim_time_s``, ... under their summary names),
        ``n_seeds``, and: ``feasible`` (every given budget met by the mean), ``binds`` (the budgets an
        infeasible setting breaks, comma-separated from ``bytes, energy, time, accuracy, flops``;
        empty when feasible) and ``pareto`` (not dominated among the feasible settings: maximise
        accuracy, minimise bytes, client energy and time). Ranked: feasible first, then by
        accuracy (descending) and bytes (ascending).
    """
    summary = check_summary(summary)
    given = {"max_bytes": max_bytes, "max_client_energy_j": max_client_energy_j, "max_time_s": max_time_s,
             "min_accuracy": min_accuracy, "max_client_flops": max_client_flops}
    agg = aggregate(summary)
    keep = [c for c in agg.columns if not c.endswith((".std", ".min", ".max"))]
    table = agg[keep].copy()

    broken = {i: [] for i in table.index}
    for key, budget in given.items():
        if budget is None:
            continue
        name, col, kind = BUDGETS[key]
        vals = table[col].to_numpy(float)
        with np.errstate(invalid="ignore"):
            ok = vals <= budget if kind == "max" else vals >= budget
        for i, good in zip(table.index, ok):  # a NaN mean never meets a budget
            if not good:
                broken[i].append(name)
    table["feasible"] = [not broken[i] for i in table.index]
    table["binds"] = [",".join(broken[i]) for i in table.index]

    table["pareto"] = False
    feas = table[table["feasible"]]
    maximize = [c for c in PARETO_MAX if feas[c].notna().any()]
    candidates = feas.dropna(subset=[*maximize, *PARETO_MIN])
    if len(candidates):
        front = pareto_front(candidates, maximize=maximize, minimize=list(PARETO_MIN))
        table.loc[front[front].index, "pareto"] = True

    table = table.sort_values(["feasible", "accuracy_mean", "bytes_total"], ascending=[False, False, True],
                              na_position="last", kind="stable")
    return table.reset_index(drop=True)


def plan_dir(results_dir: str | os.PathLike, **budgets) -> pd.DataFrame:
    """:func:`plan` over the summary table of a results folder (see :func:`load_summary`)."""
    return plan(load_summary(results_dir), **budgets)
