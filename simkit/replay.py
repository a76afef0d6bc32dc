"""Replay a recorded run from its saved provenance and check the summary is identical.

A run folder (``simkit run --out DIR`` or a study's ``runs/<key>/``) holds the resolved
``scenario.yaml`` (which includes the seed), the ``summary`` table and ``provenance.json``
(versions of simkit, torch, numpy, Python). Replaying loads the scenario, simulates it again and
compares every summary column except host timings. Simulated time, bytes, FLOPs and energy depend
only on the scenario, so they must match anywhere; learned values (accuracy, and what the protocol
derives from it) match bit for bit on the same machine and software versions (docs/model.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from simkit.errors import StudyError

#: columns that measure the host, not the simulation
HOST_COLUMNS = ("host_wall_s",)


@dataclass
class ReplayReport:
    identical: bool
    compared: list[str]
    ignored: list[str]
    differences: dict[str, tuple] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _recorded_summary(run_dir: Path) -> dict:
    for name in ("summary.parquet", "summary.csv"):
        p = run_dir / name
        if p.exists():
            df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            if len(df) != 1:
                raise StudyError(f"expected one summary row, found {len(df)}", file=str(p))
            return df.iloc[0].to_dict()
    raise StudyError("no summary.parquet or summary.csv in the run folder", file=str(run_dir))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a, b) -> bool:
    if _missing(a) or _missing(b):  # CSV reads an empty cell back as NaN
        return _missing(a) and _missing(b)
    if isinstance(a, float) or isinstance(b, float):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return fa == fb
    return a == b or str(a) == str(b)


def replay(run_dir: str | Path) -> ReplayReport:
    """Simulate ``run_dir``'s scenario again and compare with its recorded summary."""
    from simkit.config import load_scenario
    from simkit.run import run, versions

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StudyError("not a run folder", file=str(run_dir))
    scenario_file = run_dir / "scenario.yaml"
    if not scenario_file.exists():
        raise StudyError("no scenario.yaml in the run folder (nothing to replay)", file=str(run_dir))
    recorded = _recorded_summary(run_dir)
    notes = []
    prov = run_dir / "provenance.json"
    if prov.exists():
        saved = json.loads(prov.read_text())
        now = versions()
        for k, v in now.items():
            if k in saved and str(saved[k]) != str(v):
                notes.append(f"{k} was {saved[k]} when recorded, is {v} now: learned values may differ")
    else:
        notes.append("no provenance.json: versions of the recording unknown")
    result = run(load_scenario(scenario_file))
    replayed = result.summary
    compared, diffs = [], {}
    for col, value in replayed.items():
        if col in HOST_COLUMNS or col not in recorded:
            continue
        compared.append(col)
        if not _same(recorded[col], value):
            diffs[col] = (recorded[col], value)
    return ReplayReport(identical=not diffs, compared=compared, ignored=list(HOST_COLUMNS), differences=diffs,
                        notes=notes)
