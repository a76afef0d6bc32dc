"""Scenario files end to end: every kind of bad input gives one clear error; the CLI; determinism
across processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from simkit import SimkitError, load_scenario
from simkit.cli import app
from simkit.errors import ConfigError, ProfileError, TopologyError, TraceError
from simkit.run import run

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"


def build(path):
    """Load a scenario and build its world (where profile/topology/trace errors surface)."""
    import simpy

    from simkit.records import Recorder
    from simkit.rng import SeedTree
    from simkit.world.fleet import build_world

    sc = load_scenario(path)
    return build_world(sc, env=simpy.Environment(), recorder=Recorder(), seeds=SeedTree(sc.seed))


@pytest.mark.parametrize("name,cls,field,words", [
    ("scenario-unknown-profile.yaml", ProfileError, "fleet.counts.toaster", "unknown profile"),
    ("scenario-duplicate-device.yaml", ConfigError, None, "duplicate key 'rpi4'"),
    ("scenario-empty-fleet.yaml", ConfigError, "fleet", "empty"),
    ("scenario-missing-fleet.yaml", ConfigError, "fleet", "missing"),
    ("scenario-unknown-field.yaml", ConfigError, "algorithm.learning_rate", "unknown field"),
    ("scenario-nan.yaml", ConfigError, "algorithm.lr", "finite"),
    ("scenario-zero-bandwidth.yaml", ConfigError, "topology.backhaul_bps", "greater than 0"),
    ("scenario-negative-access.yaml", ConfigError, "topology", "access.lte.uplink_bps"),
    ("scenario-not-yaml.yaml", ConfigError, None, "not valid YAML"),
    ("scenario-unknown-tech.yaml", ConfigError, "fleet.access.rpi4", "carrier-pigeon"),
    ("scenario-bad-trace.yaml", TraceError, "line 3", "numbers"),
    ("scenario-no-route.yaml", TopologyError, "topology", "rpi4-1"),
    ("scenario-topology-not-graphml.yaml", TopologyError, None, "GraphML"),
])
def test_bad_scenario_gives_one_clear_error_naming_file_field_and_reason(name, cls, field, words):
    with pytest.raises(cls) as info:
        build(BAD / name)
    msg = str(info.value)
    assert isinstance(info.value, SimkitError)
    assert words in msg, msg
    if field is not None:
        assert info.value.field is not None and field in info.value.field, msg
    # the file named is the scenario or the file it points to
    assert info.value.file is not None and Path(info.value.file).name.split(".")[0] in {
        name.split(".")[0], "trace-malformed", "topo-isolated-device", "topo-not-graphml"}, msg


def test_cli_run_writes_summary_and_tables(tmp_path):
    res = CliRunner().invoke(app, ["run", str(DATA / "good" / "tiny.yaml"), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "summary.csv")
    for col in ["algorithm", "seed", "accuracy_mean", "accuracy_min", "bytes_up", "bytes_down", "client_flops_fwd",
                "client_flops_bwd", "server_flops", "sim_time_s", "time_to_target_s", "energy_j_clients",
                "energy_j_total", "host_wall_s"]:
        assert col in df.columns
    assert df.algorithm.tolist() == ["splitfed"] and df.seed.tolist() == [3]
    assert (tmp_path / "clients.csv").exists() and (tmp_path / "timeline_transfer.csv").exists()
    assert "splitfed" in res.output


def test_cli_bad_scenario_exits_2_with_file_and_field():
    res = CliRunner().invoke(app, ["run", str(BAD / "scenario-unknown-field.yaml")])
    assert res.exit_code == 2
    assert "scenario-unknown-field.yaml" in res.output and "algorithm.learning_rate" in res.output
    assert "Traceback" not in res.output


def test_cli_profiles_list_and_show():
    runner = CliRunner()
    res = runner.invoke(app, ["profiles", "list"])
    assert res.exit_code == 0
    for name in ["rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "phone-midrange", "phone-flagship", "laptop",
                 "server-t4", "server-a100"]:
        assert name in res.output
    res = runner.invoke(app, ["profiles", "show", "rpi4"])
    assert res.exit_code == 0 and "geerlingguy" in res.output
    res = runner.invoke(app, ["profiles", "show", "toaster"])
    assert res.exit_code == 2 and "unknown profile" in res.output


def _digest(result) -> str:
    h = hashlib.sha256()
    for kind in ["compute", "transfer", "eval", "round"]:
        h.update(result.records[kind].to_csv(index=False).encode())
    return h.hexdigest()


def test_identical_records_twice_in_one_process_and_in_another_process():
    path = DATA / "good" / "tiny.yaml"
    here = _digest(run(path))
    assert _digest(run(path)) == here
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"from test_scenarios_cli import _digest; from simkit.run import run; print(_digest(run({str(path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == here


def test_cli_histogram_prints_per_client_class_counts(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("fleet: {counts: {rpi4: 3}}\nworkload: {dataset: digits, partition: {kind: label_groups, "
                 "classes_per_client: 2}}\n")
    res = CliRunner().invoke(app, ["histogram", str(p)])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if line[:1].isdigit()]
    assert len(rows) == 3
    for r in rows:  # client, dataset, 10 class counts, total: exactly 2 classes non-zero
        counts = list(map(int, r[2:12]))
        assert sum(1 for c in counts if c) == 2 and sum(counts) == int(r[12])
