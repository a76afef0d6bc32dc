"""Crash-safe studies: SIGKILL at random points never leaves a corrupt or half-read result, the
study resumes to the same tables; a full disk or a read-only folder is a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from simkit.errors import StudyError
from simkit.study import Study, load_results

DATA = Path(__file__).parent / "data"
BASE = yaml.safe_load((DATA / "good" / "tiny.yaml").read_text())
GRID = {"algorithm.lr": [0.01, 0.02, 0.05, 0.1], "algorithm.rounds": [1, 2, 3]}


def check_folder_is_consistent(out: Path) -> int:
    """Every result folder a reader may take is complete and readable; returns how many."""
    runs = out / "runs"
    if not runs.exists():
        return 0
    n = 0
    for d in runs.iterdir():
        if d.name.startswith("."):
            continue  # temp folders are never read
        assert (d / "DONE").exists(), f"{d} is visible without DONE"
        if (d / "summary.parquet").exists():
            assert len(pd.read_parquet(d / "summary.parquet")) == 1
            pd.read_parquet(d / "clients.parquet")
            n += 1
    res = load_results(out)
    assert len(res.summary) == n
    return n


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_tables(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"name": "kill", "base": BASE, "grid": GRID}))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simkit.cli", "sweep", str(study_file), "--out", str(out), "--executor", "serial",
           "--quiet"]
    rng = np.random.default_rng(1234)
    kills = 0
    for attempt in range(3):  # a bounded number of kills, each at a random point of the study
        before = check_folder_is_consistent(out)
        target = before + int(rng.integers(1, 4))  # after 1-3 more finished runs ...
        extra = float(rng.uniform(0.0, 0.4))       # ... plus a random fraction of the next run
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = sum(1 for d in (out / "runs").glob("*") if not d.name.startswith(".") and (d / "DONE").exists()) \
                if (out / "runs").exists() else 0
            if done >= target:
                time.sleep(extra)
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        check_folder_is_consistent(out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert check_folder_is_consistent(out) == 12
    ref = Study("kill", BASE, grid=GRID, out=tmp_path / "ref").run("serial", progress=False)
    got = load_results(out)
    assert kills >= 1
    pd.testing.assert_frame_equal(got.without_host_columns().reset_index(drop=True),
                                  ref.without_host_columns().reset_index(drop=True), check_dtype=False)


@contextmanager
def tiny_mount(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_is_a_clear_error_and_finished_runs_stay_intact(tmp_path):
    with tiny_mount(tmp_path / "full", "size=160k") as mnt:
        out = mnt / "study"
        with pytest.raises(StudyError) as info:
            Study("full", BASE, grid=GRID, out=out).run("serial", progress=False)
        assert "No space left on device" in str(info.value) and str(mnt) in str(info.value)
        # whatever finished before the disk filled is complete and readable; nothing half-written is visible
        check_folder_is_consistent(out)


def test_read_only_result_folder_is_a_clear_error(tmp_path):
    with tiny_mount(tmp_path / "ro", "ro,size=64k") as mnt:
        with pytest.raises(StudyError) as info:
            Study("ro", BASE, grid=GRID, out=mnt / "study").run("serial", progress=False)
        assert "Read-only file system" in str(info.value) and str(mnt) in str(info.value)
