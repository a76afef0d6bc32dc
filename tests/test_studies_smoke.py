"""Golden smoke runs: every script in studies/ runs its --quick mode and writes its tables."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SCRIPTS = {
    "quickstart.py": {"algorithm": {"fedavg", "sl", "splitfed"}},
    "adasplit_vs_baselines.py": {"algorithm": {"adasplit", "fedavg", "fedprox", "sl", "splitfed"}},
    "adasplit_sensitivity.py": {"algorithm": {"adasplit"}},
    "fleet_whatif.py": {"scenario": {"all-wifi", "half-lte", "phones-5g", "only-pis", "only-phones-lte"}},
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_study_script_quick_mode_writes_summary_markdown_and_report(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.syspath_prepend(str(STUDIES))
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--executor", "serial", "--quiet", "--out", str(out)])
    runpy.run_path(str(STUDIES / script), run_name="__main__")
    df = pd.read_csv(out / "summary.csv")
    for col in ["algorithm", "seed", "accuracy_mean", "accuracy_min", "bytes_up", "bytes_down", "client_flops_fwd",
                "client_flops_bwd", "server_flops", "sim_time_s", "time_to_target_s", "energy_j_clients",
                "energy_j_total", "host_wall_s", "c3_score"]:
        assert col in df.columns, col
    for col, values in SCRIPTS[script].items():
        assert set(df[col]) == values
    md = (out / "summary.md").read_text()
    assert "| " in md and "C3-Score" in md
    assert (out / "report" / "report.html").exists()
    printed = capsys.readouterr().out
    assert "C3-Score" in printed


def test_sensitivity_quick_has_one_table_per_knob_with_knob_columns(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sens"
    monkeypatch.syspath_prepend(str(STUDIES))
    monkeypatch.setattr(sys, "argv", ["s", "--quick", "--executor", "serial", "--quiet", "--out", str(out)])
    runpy.run_path(str(STUDIES / "adasplit_sensitivity.py"), run_name="__main__")
    df = pd.read_csv(out / "summary.csv")
    for knob in ["algo_kappa", "algo_eta", "algo_lambda", "algo_return_gradients"]:
        assert knob in df.columns
    md = (out / "summary.md").read_text()
    for knob in ["kappa", "eta", "lambda", "return_gradients"]:
        assert f"## {knob} (the others at their defaults)" in md
    # traffic follows the knob: without returned gradients, fewer bytes at the same other settings
    no_grad = df[df.algo_return_gradients == False].bytes_total.iloc[0]  # noqa: E712
    base = df[(df.algo_return_gradients == True) & (df.algo_kappa == 0.5) & (df.algo_eta == 0.3)  # noqa: E712
              & (df.algo_lambda == 1e-6)].bytes_total.iloc[0]
    assert no_grad < base
