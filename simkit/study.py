"""Studies: a base scenario x a grid (or list) of changes x seeds, run anywhere, resumable.

A :class:`Study` resolves every point x seed into a concrete, validated
:class:`~simkit.config.Scenario` (``with_changes``; errors name the dotted field) and keys it by
:func:`run_key`, a hash of the resolved scenario (seed and budgets included) and the simkit
version. ``Study.run`` executes the runs that are not finished yet on an executor
(:mod:`simkit.executors`: ``serial``, ``pool`` or ``ray``) and returns a :class:`StudyResult`
with one flat row per run (STYLE.md #17). :func:`load_results` rebuilds the same tables from the
result folder alone (for reports and the planner).

Result folder (``OUT``)::

    OUT/study.json                  what the study is (name, parameters, seeds, budgets, run keys)
    OUT/summary.csv, summary.parquet  the study's table (rewritten at the end of every run())
    OUT/runs/<key>/summary.parquet  one row: run_key, status, study, param:<dotted.path>..., the
                                    RunResult summary (seed, accuracy, bytes, energy, c3_score, ...)
    OUT/runs/<key>/clients.parquet, rounds.parquet, timeline_<kind>.parquet
    OUT/runs/<key>/scenario.yaml    the resolved scenario (re-runnable with ``simkit run``)
    OUT/runs/<key>/provenance.json  versions, seed, argv, host, pid, host wall time, wall-clock
                                    start/end (host clock only here, never in the simulation)
    OUT/runs/<key>/error.json       instead of the tables when the run raised (type, message,
                                    traceback); such runs are retried by the next run()
    OUT/runs/<key>/DONE             written last: {"run_key", "status": "ok" | "error"}

Atomicity: a run folder is written in full under ``OUT/runs/.tmp-<key>-<pid>-<rand>@<host>/``
(every file fsynced, ``DONE`` last), then renamed to ``OUT/runs/<key>`` with one
:func:`os.replace`. Readers take only folders whose name does not start with a dot and that hold
``DONE``; so a killed worker leaves at most a ``.tmp-*`` folder, which readers ignore and the
next ``run()`` on the same host deletes. Study-level files are written to a temporary name,
fsynced and ``os.replace``-d.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import itertools
import json
import math
import numbers
import os
import platform
import secrets
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from simkit.config import BudgetSpec, Scenario, as_scenario, load_scenario, scenario_from_dict, with_changes
from simkit.errors import ConfigError, SimkitError, StudyError

__all__ = ["Study", "StudyResult", "load_results", "load_study", "run_key", "execute_task", "write_run_folder",
           "RunTask", "RunOutcome", "PlannedRun", "HOST_COLUMNS", "DEFAULT_TIMELINE", "PARAM_PREFIX"]

#: columns measured on the host (they differ between executors and repeats; drop them to compare)
HOST_COLUMNS = ("host_wall_s",)
#: timeline record kinds kept per run by default (the reports' Gantt charts need these two)
DEFAULT_TIMELINE = ("compute", "transfer")
#: parameter columns are named ``param:<dotted.path>``
PARAM_PREFIX = "param:"
_LEAD = ["run_key", "status", "study"]


def _version() -> str:
    from simkit import __version__

    return __version__


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_key(scenario: Scenario) -> str:
    """16 hex digits of sha256 over the resolved scenario (canonical JSON, seed included) and the
    simkit version: the same run gets the same key on every machine and executor."""
    payload = {"scenario": scenario.model_dump(mode="json", by_alias=True), "simkit": _version()}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def _dotted_get(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        part = "lambda" if part == "lambda_" else part
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _param_value(value: Any) -> Any:
    """A table-friendly parameter value: scalars as they are, anything else as canonical JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


# =============================================================================== one run
@dataclass(frozen=True)
class PlannedRun:
    """One point x seed of a study, resolved."""

    key: str
    seed: int
    params: dict[str, Any]
    scenario: Scenario


@dataclass(frozen=True)
class RunTask:
    """What an executor ships to a worker: plain data only (picklable, no live objects).

    ``write``: the worker writes its run folder itself (it shares the driver's disk); otherwise it
    returns the files in :class:`RunOutcome` and the driver writes them.
    """

    key: str
    study: str
    seed: int
    params: dict[str, Any]
    scenario: dict[str, Any]  # resolved, JSON mode
    runs_dir: str
    timeline: tuple[str, ...] | str = DEFAULT_TIMELINE
    executor: str = "serial"
    write: bool = True

    @property
    def gpu(self) -> bool:
        """Whether the run asks for a CUDA device (the Ray executor then reserves one GPU)."""
        return str(_dotted_get(self.scenario, "workload.torch_device") or "cpu").startswith("cuda")


@dataclass
class RunOutcome:
    """What a worker returns: the status, the error if any, and the files when it did not write them."""

    key: str
    status: str  # "ok" | "error"
    error: dict[str, Any] | None = None
    files: dict[str, bytes] | None = None
    host_wall_s: float = 0.0


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _provenance(task: RunTask, started: str, finished: str, host_wall: float, status: str,
                threads: int | None = None) -> dict[str, Any]:
    import numpy
    import torch

    return {
        "run_key": task.key, "study": task.study, "status": status, "seed": task.seed, "params": task.params,
        "simkit": _version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "pandas": pd.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "host": socket.gethostname(), "pid": os.getpid(), "argv": list(sys.argv), "executor": task.executor,
        "torch_threads": threads, "started_at": started, "finished_at": finished,
        "host_wall_s": host_wall,
    }


def _error_info(exc: BaseException) -> dict[str, Any]:
    info = {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    if isinstance(exc, SimkitError):
        info.update(file=exc.file, field=exc.field, reason=exc.reason)
    return info


def _error_files(task: RunTask, info: dict[str, Any]) -> dict[str, bytes]:
    return {"error.json": _json_bytes({"run_key": task.key, "study": task.study, "seed": task.seed,
                                       "params": task.params, **info})}


def _result_files(task: RunTask, result) -> dict[str, bytes]:
    row = {"run_key": task.key, "status": "ok", "study": task.study,
           **{PARAM_PREFIX + k: v for k, v in task.params.items()}, **result.summary}
    files = {"summary.parquet": _parquet(pd.DataFrame([row])),
             "clients.parquet": _parquet(result.clients),
             "rounds.parquet": _parquet(result.rounds)}
    kinds = result.records if task.timeline == "all" else {k: result.records[k] for k in task.timeline
                                                          if k in result.records}
    for kind, df in kinds.items():
        if len(df):
            files[f"timeline_{kind}.parquet"] = _parquet(df)
    return files


def execute_task(task: RunTask, on_round: Callable[[int, int], None] | None = None) -> RunOutcome:
    """Run one task (in whatever process the executor chose) and write or return its files.

    Exceptions of the run become an ``error`` outcome with ``error.json``; ``KeyboardInterrupt``
    and ``SystemExit`` pass through. Torch runs with one thread unless the scenario sets
    ``torch_threads`` (the thread count must not change results between executors).
    """
    import torch
    import yaml

    started = _now_iso()
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    threads = None
    try:
        sc = scenario_from_dict(task.scenario)
        threads = sc.torch_threads or 1
        torch.set_num_threads(threads)
        # looked up at call time (tests and profilers may wrap simkit.run.run)
        result = importlib.import_module("simkit.run").run(sc, on_round=on_round)
        files = _result_files(task, result)
        status, error = "ok", None
    except Exception as exc:
        status, error = "error", _error_info(exc)
        files = _error_files(task, error)
    finally:
        torch.set_num_threads(prev_threads)
    host_wall = time.perf_counter() - t0
    files["scenario.yaml"] = yaml.safe_dump(task.scenario, sort_keys=False).encode()
    files["provenance.json"] = _json_bytes(_provenance(task, started, _now_iso(), host_wall, status, threads))
    if task.write:
        write_run_folder(task.runs_dir, task.key, files, status=status)
        files = None
    return RunOutcome(task.key, status, error=error, files=files, host_wall_s=host_wall)


# =============================================================================== atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _temp_name(kind: str, key: str) -> str:
    return f".{kind}-{key}-{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"


def _done_status(folder: Path) -> str | None:
    """``"ok"``/``"error"`` if ``folder`` is a finished run folder, else ``None``."""
    try:
        info = json.loads((folder / "DONE").read_text())
        return info.get("status") if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def write_run_folder(runs_dir: str | os.PathLike, key: str, files: Mapping[str, bytes], *, status: str = "ok"
                     ) -> Path:
    """Write one run folder atomically (see the module docstring) and return its path.

    A finished ``ok`` folder is never replaced (the same key gives the same result); an ``error``
    folder is replaced by the new attempt.
    """
    runs_dir = Path(runs_dir)
    final = runs_dir / key
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        tmp = runs_dir / _temp_name("tmp", key)
        tmp.mkdir()
    except OSError as exc:
        raise StudyError(f"cannot write results: {exc.strerror or exc}", file=str(runs_dir)) from None
    trash = None
    try:
        for name, data in files.items():
            if name == "DONE" or "/" in name or name.startswith("."):
                raise ValueError(f"invalid result file name {name!r}")
            _write_synced(tmp / name, data)
        _write_synced(tmp / "DONE", _json_bytes({"run_key": key, "status": status}))
        _fsync_dir(tmp)
        if _done_status(final) == "ok":
            shutil.rmtree(tmp, ignore_errors=True)  # someone finished it first: keep theirs
            return final
        if final.exists():
            trash = runs_dir / _temp_name("trash", key)
            try:
                os.replace(final, trash)
            except FileNotFoundError:
                trash = None
        try:
            os.replace(tmp, final)
        except OSError:
            if _done_status(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer won the race
        _fsync_dir(runs_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StudyError(f"cannot write results: {exc.strerror or exc}", file=str(final)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _sweep_stale(runs_dir: Path) -> None:
    """Delete ``.tmp-*``/``.trash-*`` folders left by dead processes of this host."""
    host = socket.gethostname()
    if not runs_dir.is_dir():
        return
    for entry in runs_dir.iterdir():
        name = entry.name
        if not (name.startswith(".tmp-") or name.startswith(".trash-")) or "@" not in name:
            continue
        stem, _, where = name.rpartition("@")
        parts = stem.split("-")
        if where != host or len(parts) < 4 or not parts[2].isdigit():
            continue
        if not _pid_alive(int(parts[2])):
            shutil.rmtree(entry, ignore_errors=True)


# =============================================================================== results
def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _sortable(value: Any) -> tuple:
    """A sort key that orders numbers numerically, then strings, then missing values."""
    if _is_missing(value):
        return (2, 0.0, "")
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _tidy(df: pd.DataFrame, *, numeric_missing: bool) -> pd.DataFrame:
    """Object columns that hold only numbers (and missing values) become float64; so do columns
    with no value at all when ``numeric_missing`` (summary metrics such as ``time_to_target_s``)."""
    for col in df.columns:
        if df[col].dtype == object:
            vals = [v for v in df[col] if not _is_missing(v)]
            if not vals and numeric_missing and col not in _LEAD:
                df[col] = pd.Series(float("nan"), index=df.index, dtype="float64")
            elif vals and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals):
                df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
            elif vals and len({type(v) for v in vals}) > 1:  # mixed types: one text column
                df[col] = [None if _is_missing(v) else (v if isinstance(v, str) else json.dumps(v, default=str))
                           for v in df[col]]
    return df


def _table(rows: list[dict[str, Any]], params: Sequence[str], lead: Sequence[str], *, numeric_missing: bool = True
           ) -> pd.DataFrame:
    """Rows -> one DataFrame, columns ``lead + param:* + rest``, rows sorted by params, seed, key."""
    if not rows:
        return pd.DataFrame(columns=[*lead, *(PARAM_PREFIX + p for p in params), "seed"])
    param_cols = [PARAM_PREFIX + p for p in params]
    rows = sorted(rows, key=lambda r: (*(_sortable(r.get(c)) for c in param_cols), _sortable(r.get("seed")),
                                       str(r.get("run_key"))))
    columns: dict[str, None] = dict.fromkeys([c for c in lead] + param_cols)
    for r in rows:
        columns.update(dict.fromkeys(r))
    df = pd.DataFrame.from_records(rows, columns=list(columns))
    return _tidy(df, numeric_missing=numeric_missing).reset_index(drop=True)


@dataclass
class StudyResult:
    """The tables of a study, built from its result folder.

    Attributes:
        summary: one row per finished run: ``run_key``, ``status``, ``study``,
            ``param:<dotted.path>`` (the resolved value of every varied field), then the
            :class:`~simkit.run.RunResult` summary (``seed``, accuracy, bytes, FLOPs, energy,
            ``c3_score``, ``host_wall_s``, ...). Sorted by the parameters in study order, then
            seed, then key, so it does not depend on which executor ran what, or when.
        errors: one row per failed run: ``run_key``, ``status``, ``study``, ``param:*``, ``seed``,
            ``error_type``, ``error_message``, ``error_field`` (full traceback in the run's
            ``error.json``).
        params: the varied dotted paths, in study order.
    """

    out: Path
    name: str | None
    summary: pd.DataFrame
    errors: pd.DataFrame
    params: list[str] = field(default_factory=list)

    def run_dir(self, key: str) -> Path:
        return self.out / "runs" / key

    def table(self, name: str) -> pd.DataFrame:
        """One per-run table (``clients``, ``rounds``, ``timeline_compute``, ...) of every finished
        run, concatenated, with ``run_key``, the ``param:*`` columns and ``seed`` in front."""
        frames = []
        front = ["run_key", *(PARAM_PREFIX + p for p in self.params), "seed"]
        for row in self.summary[front].to_dict("records"):
            path = self.run_dir(row["run_key"]) / f"{name}.parquet"
            if not path.exists():
                continue
            df = pd.read_parquet(path)
            for i, col in enumerate(front):
                df.insert(i, col if col not in df.columns else f"run_{col}", row[col])
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=front)
        return pd.concat(frames, ignore_index=True)

    def scenario(self, key: str) -> Scenario:
        """The resolved scenario of run ``key``."""
        return load_scenario(self.run_dir(key) / "scenario.yaml")

    def without_host_columns(self) -> pd.DataFrame:
        """``summary`` minus the host-timing columns (what must match across executors)."""
        return self.summary.drop(columns=[c for c in HOST_COLUMNS if c in self.summary.columns])


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_results(out: str | os.PathLike, *, all_runs: bool = False) -> StudyResult:
    """Rebuild a study's tables from its result folder only.

    Only finished run folders count (name without a leading dot, ``DONE`` present). By default only
    the runs listed in ``OUT/study.json`` (the last study run into ``OUT``) are included;
    ``all_runs=True`` takes every finished run folder.
    """
    out = Path(out)
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        raise StudyError("no study results here (no runs/ folder)", file=str(out))
    manifest = _read_manifest(out)
    keys = None if all_runs or manifest is None else set(manifest.get("keys", []))
    ok_rows: list[dict] = []
    err_rows: list[dict] = []
    param_seen: dict[str, None] = {}
    for folder in sorted(runs_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir() or (keys is not None and folder.name not in keys):
            continue
        status = _done_status(folder)
        try:
            if status == "ok":
                row = pd.read_parquet(folder / "summary.parquet").to_dict("records")[0]
                ok_rows.append(row)
                param_seen.update(dict.fromkeys(c[len(PARAM_PREFIX):] for c in row if c.startswith(PARAM_PREFIX)))
            elif status == "error":
                err = json.loads((folder / "error.json").read_text())
                params = err.get("params") or {}
                param_seen.update(dict.fromkeys(params))
                err_rows.append({"run_key": folder.name, "status": "error", "study": err.get("study"),
                                 **{PARAM_PREFIX + k: v for k, v in params.items()}, "seed": err.get("seed"),
                                 "error_type": err.get("type"),
                                 "error_message": err.get("reason") or err.get("message"),
                                 "error_field": err.get("field")})
        except (OSError, ValueError, IndexError):  # being replaced right now: not a result
            continue
    if manifest is not None and not all_runs:
        params = list(manifest.get("params", []))
    else:
        params = sorted(param_seen)
    return StudyResult(out=out, name=manifest.get("name") if manifest else None,
                       summary=_table(ok_rows, params, _LEAD),
                       errors=_table(err_rows, params, _LEAD, numeric_missing=False), params=params)


# =============================================================================== progress
class _Progress:
    """A live bar over runs (done / running / failed, time left) and, for the serial executor,
    the rounds of the run in progress. Disabled entirely when ``enabled`` is false."""

    def __init__(self, name: str, total: int, skipped: int, enabled: bool):
        self.enabled = enabled and total > 0
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.skipped = skipped
        self._rounds: dict[str, Any] = {}
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task(f"{name} runs", total=total, counts=self._counts())

    def _counts(self) -> str:
        text = f"done {self.done} · running {len(self.running)} · failed {self.failed}"
        return text + (f" · skipped {self.skipped}" if self.skipped else "")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def on_event(self, kind: str, task: RunTask, *info) -> None:
        if kind == "start":
            self.running.add(task.key)
        if not self.enabled:
            return
        if kind == "start":
            self.progress.update(self.task, counts=self._counts())
        elif kind == "round":
            done, total = info
            bar = self._rounds.get(task.key)
            if bar is None:
                label = ", ".join(f"{k}={v}" for k, v in task.params.items())
                bar = self._rounds[task.key] = self.progress.add_task(
                    f"  rounds {label} seed={task.seed}".rstrip(), total=total, counts="")
            self.progress.update(bar, completed=done, total=total)

    def finished(self, task: RunTask, status: str) -> None:
        self.running.discard(task.key)
        if status == "ok":
            self.done += 1
        else:
            self.failed += 1
        if self.enabled:
            bar = self._rounds.pop(task.key, None)
            if bar is not None:
                self.progress.remove_task(bar)
            self.progress.update(self.task, advance=1, counts=self._counts())


# =============================================================================== the study
class Study:
    """A base scenario, the changes to try, seeds and budgets; runs into ``out``.

    Args:
        name: the study's name (also the default folder, ``results/<name>``).
        base: a Scenario, a scenario mapping or a scenario YAML path.
        grid: dotted path -> list of values; the cartesian product of all lists is taken
            (``{"algorithm.kappa": [0.5, 0.75], "fleet.shares.phone-midrange": [0.2, 0.8]}``).
        changes: an explicit list of change dicts (``[{"algorithm.name": "sl"}, ...]``); combined
            with ``grid`` as list x grid. A path may not be in both.
        seeds: every point runs once per seed.
        budgets: :class:`~simkit.config.BudgetSpec` fields applied to every run before it is keyed
            (so its C3-Score uses them); a grid may still vary ``budgets.*``.
        out: result folder (default ``results/<name>``).
        timeline: timeline record kinds kept per run (``"all"``, or ``()`` for none).
        source: the study file, for error messages.

    Two points that resolve to the same scenario are one run (same key). Raises
    :class:`~simkit.errors.StudyError` naming the field if a point does not validate.
    """

    def __init__(self, name: str, base: Scenario | Mapping | str | os.PathLike, *,
                 grid: Mapping[str, Sequence[Any]] | None = None, changes: Sequence[Mapping[str, Any]] | None = None,
                 seeds: Iterable[int] = (0,), budgets: Mapping[str, Any] | BudgetSpec | None = None,
                 out: str | os.PathLike | None = None, timeline: Iterable[str] | str = DEFAULT_TIMELINE,
                 source: str | os.PathLike | None = None):
        self.source = None if source is None else str(source)
        if not isinstance(name, str) or not name.strip():
            raise StudyError("the study needs a non-empty name", file=self.source, field="name")
        self.name = name
        self.base = as_scenario(base)
        self.grid = {str(k): list(v) for k, v in (grid or {}).items()}
        for k, v in self.grid.items():
            if not v:
                raise StudyError("a grid entry needs at least one value", file=self.source, field=f"grid.{k}")
        self.changes = [dict(c) for c in (changes or [])]
        self.seeds = [int(s) for s in seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise StudyError(f"seeds must be distinct non-negative integers, got {self.seeds}", file=self.source,
                             field="seeds")
        if isinstance(budgets, BudgetSpec):
            budgets = budgets.model_dump(exclude_none=True)
        self.budgets = dict(budgets or {})
        self.out = Path(out) if out is not None else Path("results") / name
        self.timeline = timeline if isinstance(timeline, str) else tuple(timeline)
        if isinstance(self.timeline, str) and self.timeline != "all":
            raise StudyError(f"timeline must be 'all' or a list of record kinds, got {timeline!r}",
                             file=self.source, field="timeline")
        params: dict[str, None] = {}
        for i, c in enumerate(self.changes):
            for k in c:
                if k == "seed":
                    raise StudyError("vary seeds with 'seeds', not with a change", file=self.source,
                                     field=f"changes.{i}.seed")
                if k in self.grid:
                    raise StudyError(f"{k!r} is both in 'changes' and in 'grid'", file=self.source, field=f"grid.{k}")
                params[k] = None
        if "seed" in self.grid:
            raise StudyError("vary seeds with 'seeds', not with the grid", file=self.source, field="grid.seed")
        params.update(dict.fromkeys(self.grid))
        self.params: list[str] = list(params)
        self.runs: list[PlannedRun] = self._resolve()

    # ---------------------------------------------------------------- resolution
    def points(self) -> list[dict[str, Any]]:
        """Every change dict of the study (list x grid), before seeds."""
        grid_points = [dict(zip(self.grid, values, strict=True)) for values in itertools.product(*self.grid.values())]
        return [{**c, **g} for c in (self.changes or [{}]) for g in grid_points]

    def _fail(self, exc: SimkitError, what: str) -> StudyError:
        return StudyError(f"{what}: {exc.reason}", file=self.source or exc.file, field=exc.field)

    def _resolve(self) -> list[PlannedRun]:
        base = self.base
        if self.budgets:
            from pydantic import ValidationError

            from simkit.config import _from_validation

            try:
                BudgetSpec.model_validate(self.budgets)
            except ValidationError as exc:
                raise _from_validation(exc, file=self.source, prefix="budgets", cls=StudyError) from None
            try:
                base = with_changes(base, {f"budgets.{k}": v for k, v in self.budgets.items()})
            except SimkitError as exc:
                raise self._fail(exc, "budgets") from None
        runs: list[PlannedRun] = []
        seen: set[str] = set()
        for point in self.points():
            try:  # a deep copy: with_changes writes nested changes into mapping values it is given
                sc = with_changes(base, copy.deepcopy(point))
            except SimkitError as exc:
                raise self._fail(exc, f"point {point}") from None
            dump = sc.model_dump(mode="json", by_alias=True)
            params = {p: self._param(p, point, dump) for p in self.params}
            for seed in self.seeds:
                seeded = sc.model_copy(update={"seed": seed})
                key = run_key(seeded)
                if key not in seen:
                    seen.add(key)
                    runs.append(PlannedRun(key=key, seed=seed, params=params, scenario=seeded))
        return runs

    @staticmethod
    def _param(path: str, point: Mapping[str, Any], resolved: Mapping[str, Any]) -> Any:
        """The value of a varied field for the tables: the resolved (validated) value if it is a
        scalar; for a mapping or list, the change as written (the resolved one repeats defaults)."""
        value = _dotted_get(resolved, path)
        if isinstance(value, (Mapping, list)) and path in point:
            value = point[path]
        return _param_value(value)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.runs]

    def __len__(self) -> int:
        return len(self.runs)

    def pending(self) -> list[PlannedRun]:
        """The runs without a finished ``ok`` folder in ``out`` (failed runs are retried)."""
        runs_dir = self.out / "runs"
        return [r for r in self.runs if _done_status(runs_dir / r.key) != "ok"]

    # ---------------------------------------------------------------- running
    def _manifest(self) -> dict[str, Any]:
        return {"name": self.name, "simkit": _version(), "params": self.params, "seeds": self.seeds,
                "budgets": self.budgets, "grid": self.grid, "changes": self.changes,
                "base": self.base.model_dump(mode="json", by_alias=True), "keys": self.keys}

    def run(self, executor: str | Any = "pool", *, workers: int | None = None, address: str | None = None,
            progress: bool = True) -> StudyResult:
        """Run what is not finished yet and return the study's tables.

        Args:
            executor: ``"pool"`` (local processes, default), ``"serial"`` (this process) or ``"ray"``
                (a local Ray instance, or the cluster at ``address``), or an
                :class:`~simkit.executors.Executor` instance.
            workers: parallel runs (pool: processes, default ``os.cpu_count()``; local Ray: CPUs).
            address: Ray cluster address (``"auto"`` or ``"HOST:PORT"``); only for ``ray``.
            progress: show a live progress bar (stderr).

        Finished runs are skipped; failed runs are retried. Also writes ``OUT/summary.csv`` and
        ``OUT/summary.parquet``. ``KeyboardInterrupt`` stops the study; finished runs are kept.
        """
        from simkit.executors import EXECUTORS, Executor, WorkerLost, get_executor

        if isinstance(executor, str) and executor not in EXECUTORS:
            raise StudyError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}",
                             field="executor")
        runs_dir = self.out / "runs"
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.out / "study.json", _json_bytes(self._manifest()))
        except OSError as exc:
            raise StudyError(f"cannot write results: {exc.strerror or exc}", file=str(self.out)) from None
        _sweep_stale(runs_dir)
        todo = self.pending()
        if todo:
            ex = executor if isinstance(executor, Executor) else get_executor(executor, workers=workers,
                                                                              address=address)
            tasks = [RunTask(key=r.key, study=self.name, seed=r.seed, params=r.params,
                             scenario=r.scenario.model_dump(mode="json", by_alias=True), runs_dir=str(runs_dir),
                             timeline=self.timeline, executor=ex.name, write=ex.shared_disk) for r in todo]
            with ex, _Progress(self.name, len(tasks), len(self.runs) - len(tasks), progress) as bar:
                outcomes = ex.map_runs(execute_task, tasks, bar.on_event)
                try:
                    for task, outcome in outcomes:
                        bar.finished(task, self._settle(task, outcome, WorkerLost))
                finally:
                    outcomes.close()
        result = load_results(self.out)
        _atomic_write(self.out / "summary.parquet", _parquet(result.summary))
        _atomic_write(self.out / "summary.csv", result.summary.to_csv(index=False).encode())
        return result

    @staticmethod
    def _settle(task: RunTask, outcome: Any, worker_lost: type) -> str:
        """Write what the worker did not write; return the run's status."""
        if isinstance(outcome, RunOutcome):
            if outcome.files is not None:
                write_run_folder(task.runs_dir, task.key, outcome.files, status=outcome.status)
            return outcome.status
        if isinstance(outcome, BaseException):
            info = _error_info(outcome)
            if isinstance(outcome, worker_lost):
                info["traceback"] = ""
            now = _now_iso()
            files = _error_files(task, info)
            files["provenance.json"] = _json_bytes({**_provenance(task, now, now, 0.0, "error"),
                                                    "pid": None, "note": "recorded by the driver"})
            write_run_folder(task.runs_dir, task.key, files, status="error")
            return "error"
        raise StudyError(f"executor returned {type(outcome).__name__} for run {task.key}")


# =============================================================================== study files
def load_study(path: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Study:
    """Load a study YAML: ``name``, ``base`` (a scenario mapping, or a scenario YAML path relative
    to the study file), ``grid``, ``changes``, ``seeds``, ``budgets``, ``timeline``.

    Every problem is one :class:`~simkit.errors.SimkitError` naming the file and the field.
    """
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from simkit.config import _from_validation, _resolve_relative, read_yaml

    class StudyFile(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(min_length=1)
        base: dict[str, Any] | str
        grid: dict[str, list[Any]] = Field(default_factory=dict)
        changes: list[dict[str, Any]] = Field(default_factory=list)
        seeds: list[int] = Field(default_factory=lambda: [0])
        budgets: BudgetSpec = Field(default_factory=BudgetSpec)
        timeline: list[str] | str = list(DEFAULT_TIMELINE)

    path = Path(path)
    data = read_yaml(path, cls=StudyError)
    try:
        spec = StudyFile.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, file=str(path), cls=StudyError) from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        base = load_scenario(base_path)
    else:
        try:
            base = Scenario.model_validate(_resolve_relative(spec.base, path.parent))
        except ValidationError as exc:
            raise _from_validation(exc, file=str(path), prefix="base", cls=ConfigError) from None
    return Study(spec.name, base, grid=spec.grid, changes=spec.changes, seeds=spec.seeds,
                 budgets=spec.budgets.model_dump(exclude_none=True), out=out, timeline=spec.timeline,
                 source=path)



# --------------------------------------------------------------------------- study scripts
def script_arguments(description: str, *, default_out: str):
    """The options every script in ``studies/`` takes: ``--out``, ``--executor``, ``--address``,
    ``--workers``, ``--quick``, ``--quiet`` (an :class:`argparse.ArgumentParser` to extend)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=Path(default_out), help="result folder")
    ap.add_argument("--executor", choices=["serial", "pool", "ray"], default="pool",
                    help="where runs execute (results are identical whichever)")
    ap.add_argument("--address", default=None, help="Ray cluster to join: auto or HOST:PORT (with --executor ray)")
    ap.add_argument("--workers", type=int, default=None, help="runs at once (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="a small version that finishes in a few minutes")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def finish_script(study: "Study", args, *, title: str, tables: Sequence[tuple], note: str = "") -> StudyResult:
    """Run ``study`` as the script's options say, then write ``OUT/summary.csv`` (one row per run),
    the report (``OUT/report/``) and ``OUT/summary.md``: a Markdown table per ``(heading, group-by
    columns)`` of ``tables`` (mean ± std over seeds of accuracy, bytes, client FLOPs, simulated
    time, client energy and C3-Score); a third element ``{column: value}`` keeps only matching
    rows. Prints the Markdown. Exits non-zero if a run failed."""
    from simkit.report import build_report

    result = study.run(args.executor, workers=args.workers, address=args.address, progress=not args.quiet)
    df = result.summary.copy()
    df["client_flops"] = df["client_flops_fwd"] + df["client_flops_bwd"]
    metrics = {"accuracy_mean": ("accuracy", 3, 1), "accuracy_min": ("worst client acc.", 3, 1),
               "bytes_total": ("MB moved", 2, 1e6), "client_flops": ("client GFLOP", 2, 1e9),
               "sim_time_s": ("sim. time s", 1, 1), "energy_j_clients": ("client energy J", 1, 1),
               "c3_score": ("C3-Score", 3, 1)}
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines += [f"{len(df)} runs ({len(result.errors)} failed); seeds {sorted(df['seed'].unique().tolist())}. "
              "Each cell: mean ± std over seeds.", ""]
    for heading, by, *where in tables:
        sub = df
        for col, value in (where[0] if where else {}).items():
            sub = sub[sub[col] == value]
        by = [c if c in df.columns else PARAM_PREFIX + c for c in by]
        g = sub.groupby(by, sort=True, dropna=False)
        lines += [f"## {heading}", "", "| " + " | ".join([b.replace(PARAM_PREFIX, "") for b in by]
                                                      + [m[0] for m in metrics.values()]) + " |",
                  "|" + "---|" * (len(by) + len(metrics))]
        for key, grp in g:
            key = key if isinstance(key, tuple) else (key,)
            cells = []
            for col, (_, digits, scale) in metrics.items():
                vals = grp[col].astype(float) / scale
                std = vals.std(ddof=0) if len(vals) > 1 else 0.0
                cells.append(f"{vals.mean():,.{digits}f}" + (f" ± {std:,.{digits}f}" if len(vals) > 1 else ""))
            lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    out = Path(args.out)
    _atomic_write(out / "summary.md", text.encode())
    try:
        build_report(out, out / "report", budgets=study.budgets or None)
    except SimkitError as exc:  # a report problem must not lose the study's tables
        print(f"report not written: {exc}", file=sys.stderr)
    print(text)
    print(f"tables: {out / 'summary.csv'}, {out / 'summary.md'}; report: {out / 'report' / 'report.html'}")
    if len(result.errors):
        print(f"{len(result.errors)} run(s) failed; see {out}/runs/*/error.json", file=sys.stderr)
        raise SystemExit(1)
    return result
