"""Studies: keys, resume after a kill, failed runs, identical results on every executor, atomic folders, CLI."""

from __future__ import annotations

import functools
import json
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import importlib

run_module = importlib.import_module("simkit.run")  # the module (simkit.run is the function)
from simkit.errors import StudyError
from simkit.executors import PoolExecutor, WorkerLost, get_executor
from simkit.study import HOST_COLUMNS, Study, load_results, load_study

BASE = {
    "name": "tiny",
    "fleet": {"counts": {"rpi4": 1, "laptop": 1}},
    "server": {"profile": "server-t4", "slots": 1},
    "topology": {"kind": "star"},
    "workload": {"dataset": "digits", "partition": {"kind": "iid"}, "model": {"family": "cnn", "cut": 1},
                 "batch_size": 8, "max_samples": 48},
    "algorithm": {"name": "fedavg", "rounds": 1, "lr": 0.05},
}
GRID = {"algorithm.lr": [0.05, 0.1], "algorithm.local_epochs": [1, 2]}


@pytest.fixture
def counted(monkeypatch):
    """Count the simulations this process runs (serial executor) by wrapping simkit.run.run."""
    calls = []
    real = run_module.run

    def counting(scenario, **kwargs):
        calls.append(scenario.seed)
        return real(scenario, **kwargs)

    monkeypatch.setattr(run_module, "run", counting)
    return calls


@pytest.fixture(scope="module")
def ray_local():
    """ONE local Ray instance for the whole module (start-up costs seconds)."""
    import ray  # the dev extra installs it; a missing Ray should fail here, loudly

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def comparable(result) -> pd.DataFrame:
    return result.summary.drop(columns=[c for c in HOST_COLUMNS if c in result.summary.columns])


def done_keys(out: Path) -> set[str]:
    runs = out / "runs"
    return {p.name for p in runs.iterdir() if not p.name.startswith(".") and (p / "DONE").exists()} \
        if runs.is_dir() else set()


# ------------------------------------------------------------------------------ planning
def test_grid_times_seeds_resolves_to_distinct_keyed_runs_with_budgets_applied(tmp_path):
    study = Study("g", BASE, grid=GRID, seeds=[0, 1], budgets={"max_bytes": 1e6}, out=tmp_path)
    assert len(study) == 8 and len(set(study.keys)) == 8
    assert study.params == ["algorithm.lr", "algorithm.local_epochs"]
    combos = {(r.params["algorithm.lr"], r.params["algorithm.local_epochs"], r.seed) for r in study.runs}
    assert len(combos) == 8
    assert all(r.scenario.budgets.max_bytes == 1e6 for r in study.runs)
    # budgets are part of the resolved scenario, hence of the key
    other = Study("g", BASE, grid=GRID, seeds=[0, 1], budgets={"max_bytes": 2e6}, out=tmp_path)
    assert not set(study.keys) & set(other.keys)
    # list x grid, and the key does not depend on the study's name
    both = Study("h", BASE, changes=[{"algorithm.momentum": 0.0}, {"algorithm.momentum": 0.5}],
                 grid={"algorithm.lr": [0.05]}, out=tmp_path)
    assert len(both) == 2 and both.params == ["algorithm.momentum", "algorithm.lr"]
    assert both.keys[0] == Study("x", BASE, out=tmp_path).keys[0]  # momentum 0, lr 0.05 = the base


def test_invalid_points_name_the_dotted_field(tmp_path):
    with pytest.raises(StudyError) as err:
        Study("bad", BASE, grid={"algorithm.lr": [0.1, -1.0]}, out=tmp_path)
    assert err.value.field == "algorithm.lr"
    with pytest.raises(StudyError) as err:
        Study("bad", BASE, grid={"algorithm.kappa": [0.5]}, out=tmp_path)  # not a FedAvg option
    assert err.value.field == "algorithm.kappa"
    with pytest.raises(StudyError) as err:
        Study("bad", BASE, budgets={"max_bytez": 1.0}, out=tmp_path)
    assert err.value.field == "budgets.max_bytez"
    with pytest.raises(StudyError):
        Study("bad", BASE, grid={"algorithm.lr": []}, out=tmp_path)


# ------------------------------------------------------------------------------ resume after a kill
KILLED_SCRIPT = """
import sys, time
import importlib

run_module = importlib.import_module("simkit.run")  # the module (simkit.run is the function)
from simkit.study import Study

real = run_module.run
def slow(scenario, **kwargs):  # make each run last long enough to be killed in the middle
    time.sleep(0.25)
    return real(scenario, **kwargs)
run_module.run = slow

if __name__ == "__main__":
    base, grid, out = sys.argv[1:4]
    import json
    Study("k", json.loads(base), grid=json.loads(grid), seeds=[0, 1], out=out).run("serial", progress=False)
"""


def test_killed_study_resumes_only_the_rest_and_matches_an_uninterrupted_run(tmp_path, counted):
    out = tmp_path / "killed"
    script = tmp_path / "killed_study.py"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(BASE), json.dumps(GRID), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(done_keys(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = done_keys(out)
    assert 3 <= len(before) < 8, f"the study was not killed in the middle ({len(before)} runs done)"
    provenance = {k: (out / "runs" / k / "provenance.json").read_bytes() for k in before}

    study = Study("k", BASE, grid=GRID, seeds=[0, 1], out=out)
    assert len(study.pending()) == 8 - len(before)
    resumed = study.run("serial", progress=False)
    assert len(counted) == 8 - len(before)  # only the rest ran
    assert {k: (out / "runs" / k / "provenance.json").read_bytes() for k in before} == provenance
    assert len(resumed.summary) == 8 and resumed.errors.empty
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]  # stale .tmp swept

    whole = Study("k", BASE, grid=GRID, seeds=[0, 1], out=tmp_path / "whole").run("serial", progress=False)
    pd.testing.assert_frame_equal(comparable(resumed), comparable(whole))
    # nothing left to do: a third invocation runs nothing and gives the same table
    counted.clear()
    again = study.run("serial", progress=False)
    assert counted == []
    pd.testing.assert_frame_equal(again.summary, resumed.summary)
    # the study-level tables are the same as what run() returned and what load_results rebuilds
    pd.testing.assert_frame_equal(pd.read_parquet(out / "summary.parquet"), again.summary)
    pd.testing.assert_frame_equal(load_results(out).summary, again.summary)
    assert list(pd.read_csv(out / "summary.csv")["run_key"]) == list(again.summary["run_key"])


# ------------------------------------------------------------------------------ failed runs
def test_a_run_that_raises_is_recorded_the_others_complete_and_it_is_retried(tmp_path, counted):
    grid = {"workload.batch_size": [8, 1000], "algorithm.lr": [0.05, 0.1]}  # 1000 > the clients' data
    study = Study("e", BASE, grid=grid, out=tmp_path)
    result = study.run("serial", progress=False)
    assert len(counted) == 4
    assert len(result.summary) == 2 and set(result.summary["param:workload.batch_size"]) == {8}
    assert len(result.errors) == 2
    err = result.errors.iloc[0]
    assert err["error_type"] == "WorkloadError" and err["error_field"] == "workload.batch_size"
    assert "larger than" in err["error_message"] and err["param:workload.batch_size"] == 1000
    folder = tmp_path / "runs" / err["run_key"]
    assert json.loads((folder / "DONE").read_text())["status"] == "error"
    info = json.loads((folder / "error.json").read_text())
    assert info["type"] == "WorkloadError" and "Traceback" in info["traceback"]
    assert not (folder / "summary.parquet").exists()

    counted.clear()
    again = study.run("serial", progress=False)
    assert len(counted) == 2  # the failed runs are retried, the finished ones skipped
    pd.testing.assert_frame_equal(again.errors, result.errors)


# ------------------------------------------------------------------------------ executors
def test_serial_pool_and_ray_give_identical_tables(tmp_path, ray_local):
    # switching algorithms replaces the whole 'algorithm' mapping (FedAvg's options are not SplitFed's)
    algos = [{"name": "fedavg", "rounds": 1}, {"name": "splitfed", "rounds": 1}]
    kw = dict(grid={"algorithm.lr": [0.1]}, seeds=[0, 1], changes=[{"algorithm": a} for a in algos])
    results = {}
    for name in ("serial", "pool", "ray"):
        study = Study("x", BASE, out=tmp_path / name, **kw)
        results[name] = study.run(name, workers=2, progress=False)
        prov = json.loads((tmp_path / name / "runs" / study.keys[0] / "provenance.json").read_text())
        assert prov["executor"] == name and prov["torch_threads"] == 1
    ref = results["serial"]
    assert len(ref.summary) == 4 and ref.errors.empty
    assert list(ref.summary["algorithm"]) == ["fedavg"] * 2 + ["splitfed"] * 2
    assert list(ref.summary["seed"]) == [0, 1, 0, 1]
    assert ref.summary["accuracy_mean"].notna().all()
    for name in ("pool", "ray"):
        pd.testing.assert_frame_equal(comparable(results[name]), comparable(ref), obj=name)
        for table in ("clients", "rounds", "timeline_compute", "timeline_transfer"):
            pd.testing.assert_frame_equal(results[name].table(table), ref.table(table), obj=f"{name} {table}")


def test_a_killed_pool_worker_costs_only_its_own_task():
    tasks = [functools.partial(time.sleep, 0.2), functools.partial(os._exit, 3),
             functools.partial(pow, 2, 5), functools.partial(time.sleep, 0.1)]
    with PoolExecutor(workers=2) as ex:
        got = dict((id(t), r) for t, r in ex.map_runs(operator.call, tasks))
    assert isinstance(got[id(tasks[1])], WorkerLost)
    assert got[id(tasks[0])] is None and got[id(tasks[2])] == 32 and got[id(tasks[3])] is None


@pytest.mark.slow  # Ray retries the crash twice: three worker start-ups
def test_a_crashed_ray_worker_is_reported_as_lost(ray_local):
    tasks = [functools.partial(os._exit, 3), functools.partial(pow, 3, 2)]
    ex = get_executor("ray")
    got = dict((id(t), r) for t, r in ex.map_runs(operator.call, tasks))
    ex.close()
    assert ray_local.is_initialized()  # an instance it did not start is left running
    assert isinstance(got[id(tasks[0])], WorkerLost) and got[id(tasks[1])] == 9


# ------------------------------------------------------------------------------ atomic folders
def test_partial_run_folders_are_ignored_and_redone(tmp_path, counted):
    study = Study("p", BASE, grid={"algorithm.lr": [0.05, 0.1]}, out=tmp_path)
    first = study.run("serial", progress=False)
    runs = tmp_path / "runs"
    key = study.keys[0]
    # a half-written temp folder of a dead process, and a finished-looking folder without DONE
    dead_pid = 2 ** 22 + 17
    tmp = runs / f".tmp-{key}-{dead_pid}-abcd@{socket.gethostname()}"
    shutil.copytree(runs / key, tmp)
    (runs / key / "DONE").unlink()
    foreign = runs / f".tmp-{study.keys[1]}-1-abcd@some-other-host"  # another host's: not ours to delete
    shutil.copytree(runs / study.keys[1], foreign)
    for all_runs in (False, True):
        res = load_results(tmp_path, all_runs=all_runs)
        assert list(res.summary["run_key"]) == [study.keys[1]]
    assert [r.key for r in study.pending()] == [key]
    counted.clear()
    again = study.run("serial", progress=False)
    assert len(counted) == 1
    pd.testing.assert_frame_equal(comparable(again), comparable(first))
    assert not tmp.exists() and foreign.exists()
    with pytest.raises(StudyError):
        load_results(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------ CLI
def test_cli_sweep_runs_a_study_file_and_reports_bad_ones(tmp_path):
    from simkit.cli import app

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    study = {"name": "cli", "base": "base.yaml", "grid": {"algorithm.lr": [0.05, 0.1]}, "seeds": [0],
             "budgets": {"max_bytes": 1e6}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--executor", "serial", "--quiet"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "summary.csv")
    assert list(table["param:algorithm.lr"]) == [0.05, 0.1]
    assert (table["c3_score"].notna()).all()
    assert load_study(path, out=out).pending() == []

    bad = dict(study, grid={"algorithm.lr": [0.05, "fast"]})
    path.write_text(yaml.safe_dump(bad))
    res = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--executor", "serial", "--quiet"])
    assert res.exit_code == 2
    assert "study.yaml" in res.output and "algorithm.lr" in res.output and "Traceback" not in res.output

    path.write_text(yaml.safe_dump(dict(study, seeds=[0], grdi={})))
    res = runner.invoke(app, ["sweep", str(path), "--out", str(out)])
    assert res.exit_code == 2 and "study.yaml" in res.output and "grdi" in res.output

    res = runner.invoke(app, ["sweep", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "missing.yaml" in res.output
