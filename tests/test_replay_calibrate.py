"""Reproducibility through the CLI (replay a recorded run to the identical summary), the
calibrate command, and planning straight from a study YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from simkit.cli import app

DATA = Path(__file__).parent / "data"


def test_replay_of_a_recorded_run_is_identical_and_tampering_is_caught(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(DATA / "good" / "tiny.yaml"), "--out", str(out)]).exit_code == 0
    assert (out / "provenance.json").exists() and (out / "scenario.yaml").exists()
    res = runner.invoke(app, ["replay", str(out)])
    assert res.exit_code == 0, res.output
    assert "identical" in res.output
    df = pd.read_csv(out / "summary.csv")
    df.loc[0, "bytes_up"] += 1
    df.to_csv(out / "summary.csv", index=False)
    res = runner.invoke(app, ["replay", str(out)])
    assert res.exit_code == 1 and "bytes_up" in res.output


def test_replay_of_a_study_run_folder(tmp_path):
    from simkit.study import Study

    st = Study("r", yaml.safe_load((DATA / "good" / "tiny.yaml").read_text()), grid={"algorithm.lr": [0.05, 0.1]},
               out=tmp_path / "study")
    st.run("serial", progress=False)
    runs = sorted(p for p in (tmp_path / "study" / "runs").iterdir() if not p.name.startswith("."))
    assert len(runs) == 2
    res = CliRunner().invoke(app, ["replay", str(runs[1])])
    assert res.exit_code == 0, res.output


def test_replay_errors_are_clear(tmp_path):
    res = CliRunner().invoke(app, ["replay", str(tmp_path)])
    assert res.exit_code == 2 and "no scenario.yaml" in res.output


def test_calibrate_fits_the_compute_model_and_writes_a_loadable_profile(tmp_path):
    from simkit import scenario_from_dict
    from simkit.calibrate import calibrate, fit, write_profile
    from simkit.config import load_profile
    from simkit.world.devices import Device

    cal = calibrate(scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}}), min_time=0.02, reps=3)
    # digits CNN (2 conv blocks + linear): the three computes of a split step at cuts 1 and 2 and a
    # whole-model step, at batch 16, 32 and 64
    assert [(p.part, p.cut, p.batch) for p in cal.parts[:7]] == [
        ("client_fwd", 1, 16), ("server", 1, 16), ("client_bwd", 1, 16), ("client_fwd", 2, 16), ("server", 2, 16),
        ("client_bwd", 2, 16), ("whole", 0, 16)]
    assert sorted({p.batch for p in cal.parts}) == [16, 32, 64] and len(cal.parts) == 21
    at = {p.part: p for p in cal.fidelity_points()}
    assert sorted(at) == ["client_bwd", "client_fwd", "server", "whole"] and {p.batch for p in at.values()} == {32}
    assert sorted(cal.ratios()) == ["client", "server", "whole"]
    assert cal.ratios()["client"] == pytest.approx(
        (cal.predicted(at["client_fwd"].flops, at["client_fwd"].nbytes, at["client_fwd"].kernels)
         + cal.predicted(at["client_bwd"].flops, at["client_bwd"].nbytes, at["client_bwd"].kernels))
        / (at["client_fwd"].seconds + at["client_bwd"].seconds), rel=1e-12)
    for field in ("flops", "kernels"):   # the split step's computes add up to the whole model's step
        assert getattr(at["whole"], field) == sum(getattr(at[k], field) for k in ("client_fwd", "server", "client_bwd"))
    assert cal.effective_flops > 1e6 and cal.overhead_s >= 0 and cal.kernel_overhead_s >= 0
    # how close the fit comes depends on this host's timing noise (a benchmark figure,
    # calibration_error_max, not a test): here only that it is the fit of what was measured
    refit = fit(cal.parts, batch=32, cut=1)
    assert (refit.effective_flops, refit.overhead_s, refit.kernel_overhead_s, refit.traffic_bytes_per_s) == \
        (cal.effective_flops, cal.overhead_s, cal.kernel_overhead_s, cal.traffic_bytes_per_s)
    assert all(math.isfinite(r) and r > 0 for r in cal.ratios().values())
    prof = load_profile(write_profile(cal, tmp_path / "host.yaml"))
    assert prof.peak_flops == cal.effective_flops and prof.efficiency == 1.0
    assert (prof.traffic_bytes_per_s, prof.kernel_overhead_s) == (cal.traffic_bytes_per_s, cal.kernel_overhead_s)
    # a device of that profile times each measured step as the calibration predicts it
    dev = Device(None, "host", prof, node="host", meter=None, recorder=None)
    for p in cal.parts:
        assert dev.compute_time(p.flops, p.nbytes, p.kernels) == pytest.approx(cal.predicted(p.flops, p.nbytes, p.kernels),
                                                                              rel=1e-12)
    res = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "lab-pc.yaml"), "--min-time", "0.01"])
    assert res.exit_code == 0 and "calibration_error_max" in res.output
    assert load_profile(tmp_path / "lab-pc.yaml").name == "lab-pc"   # the name follows the file
    # a name the file cannot carry is refused before anything is measured or written
    res = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "a.yaml"), "--name", "b"])
    assert res.exit_code == 2 and "does not match" in res.output and "b.yaml" in res.output
    assert not (tmp_path / "a.yaml").exists() and not (tmp_path / "b.yaml").exists()


def test_calibration_fit_recovers_a_known_compute_model_exactly():
    from simkit.calibrate import PartTiming, fit

    rate, traffic, over, per_kernel = 2.5e9, 4e8, 1e-4, 3e-5
    work = [("client", 1e6, 6e5, 6), ("server", 3e6, 2e5, 10), ("whole", 4e6, 8e5, 16), ("client", 2e6, 1.2e6, 6),
            ("server", 6e6, 4e5, 10), ("whole", 8e6, 1.6e6, 16), ("server", 2e5, 1e4, 4)]
    parts = [PartTiming(n, f, f / rate + b / traffic + over + k * per_kernel, b, k) for n, f, b, k in work]
    cal = fit(parts)
    assert math.isclose(cal.effective_flops, rate, rel_tol=1e-6) and math.isclose(cal.traffic_bytes_per_s, traffic,
                                                                                 rel_tol=1e-6)
    assert math.isclose(cal.overhead_s, over, rel_tol=1e-6) and math.isclose(cal.kernel_overhead_s, per_kernel,
                                                                             rel_tol=1e-6)
    assert all(math.isclose(r, 1.0, rel_tol=1e-9) for r in cal.ratios().values()) and cal.fit_error_max < 1 + 1e-9
    # noise: one point 20 % slow; the relative least squares spreads the error, none is above 20 %
    noisy = fit(parts[:1] + [PartTiming("server", 3e6, parts[1].seconds * 1.2, 2e5, 10)] + parts[2:])
    assert 1.0 < noisy.fit_error_max < 1.2
    # no bytes counted: the traffic term drops out (no rate, not an infinite or negative one),
    # and the pure FLOP-rate model is fitted exactly
    plain = [PartTiming(n, f, f / rate + over, batch=32) for n, f, _, _ in work]
    cal = fit(plain)
    assert cal.traffic_bytes_per_s is None and cal.kernel_overhead_s == 0.0
    assert math.isclose(cal.effective_flops, rate, rel_tol=1e-9) and math.isclose(cal.overhead_s, over, rel_tol=1e-9)
    # timings that fall as FLOPs grow give no positive rate: a pure rate through the origin
    flat = fit([PartTiming("client", 1e6, 3e-3), PartTiming("server", 3e6, 2e-3), PartTiming("whole", 4e6, 1e-3)])
    assert flat.overhead_s == 0.0 and math.isclose(flat.effective_flops, 8e6 / 6e-3, rel_tol=1e-12)
    assert flat.traffic_bytes_per_s is None and flat.kernel_overhead_s == 0.0


def test_calibration_fit_predicts_exactly_when_terms_cannot_be_told_apart():
    # every point runs the same kernels: the constant and the per-kernel cost are one term to the
    # fit; whichever split NNLS picks, the predictions (what a profile is for) are exact
    from simkit.calibrate import PartTiming, fit

    rate, traffic, fixed = 4e9, 1e9, 2e-4 + 12 * 3e-5
    parts = [PartTiming(f"p{i}", f, f / rate + b / traffic + fixed, b, 12) for i, (f, b) in
             enumerate([(1e6, 5e5), (4e6, 1e5), (2e7, 3e6), (5e5, 2e6)])]
    cal = fit(parts)
    assert cal.overhead_s >= 0 and cal.kernel_overhead_s >= 0
    assert math.isclose(cal.overhead_s + 12 * cal.kernel_overhead_s, fixed, rel_tol=1e-6)
    assert all(math.isclose(cal.ratio(p), 1.0, rel_tol=1e-6) for p in parts)


def test_plan_runs_a_study_yaml_first_then_reuses_it(tmp_path):
    study = {"name": "p", "base": yaml.safe_load((DATA / "good" / "tiny.yaml").read_text()),
             "grid": {"algorithm.lr": [0.0, 0.1]}, "seeds": [0]}
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(study))
    out = tmp_path / "res"
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(f), "--out", str(out), "--executor", "serial", "--max-bytes", "1e12"])
    assert res.exit_code == 0, res.output
    assert "running 2 missing run(s)" in res.output and "2 of 2 settings feasible" in res.output
    res = runner.invoke(app, ["plan", str(f), "--out", str(out), "--executor", "serial", "--max-bytes", "1"])
    assert res.exit_code == 0 and "missing run" not in res.output and "0 of 2 settings feasible" in res.output
