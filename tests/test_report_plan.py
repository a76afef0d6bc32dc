"""The budget planner on a hand-made table, and the report built from a small real results folder."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from simkit.cli import app
from simkit.errors import StudyError
from simkit.metrics import c3_score
from simkit.plan import aggregate, load_summary, plan
from simkit.report import build_report, c3_grid, gantt_figure
from simkit.run import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ------------------------------------------------------------------------------ a hand-made study
# label -> (algorithm, kappa, accuracy, bytes, client energy J, sim time s, client FLOPs); each
# setting gets two seeds placed symmetrically around these means.
SETTINGS = {
    "fedavg": ("fedavg", np.nan, 0.90, 1.0e9, 30.0, 100.0, 4e12),
    "sl": ("sl", np.nan, 0.85, 3.0e9, 50.0, 300.0, 1e12),
    "splitfed": ("splitfed", np.nan, 0.80, 0.5e9, 40.0, 50.0, 1e12),
    "adasplit kappa=0.5": ("adasplit", 0.5, 0.88, 1.5e9, 25.0, 120.0, 2e12),
    "adasplit kappa=0.9": ("adasplit", 0.9, 0.70, 0.4e9, 10.0, 80.0, 2e12),
    "fedprox": ("fedprox", np.nan, 0.86, 1.2e9, 35.0, 110.0, 4e12),  # dominated by fedavg
}


def hand_summary() -> pd.DataFrame:
    rows = []
    for algo, kappa, acc, nbytes, energy, time_s, flops in SETTINGS.values():
        for seed, sign in ((0, -1), (1, +1)):
            rows.append({
                "run_key": f"{algo}-{kappa}-{seed}", "status": "ok", "algorithm": algo, "seed": seed,
                "algo_kappa": kappa, "param:fleet.counts.rpi4": 4,
                "accuracy_mean": acc + sign * 0.01, "accuracy_min": acc - 0.1,
                "bytes_up": 0.5 * nbytes * (1 + sign * 0.1), "bytes_down": 0.5 * nbytes * (1 + sign * 0.1),
                "client_flops_fwd": flops / 3, "client_flops_bwd": 2 * flops / 3, "server_flops": 1e12,
                "sim_time_s": time_s + sign * 10, "time_to_target_s": np.nan,
                "energy_j_clients": energy + sign * 1.0, "energy_j_total": energy + 20,
                "energy_j_rpi4": energy / 2 + sign, "energy_j_laptop": energy / 2, "energy_j_server": 20.0,
                "c3_score": acc / 2,
            })
    # a run that crashed carries no metrics and must not count
    rows.append({**rows[0], "run_key": "crashed", "seed": 2, "status": "failed", "accuracy_mean": np.nan})
    return pd.DataFrame(rows)


BUDGETS = {"max_bytes": 2e9, "max_client_energy_j": 38.0, "min_accuracy": 0.75}


def test_planner_marks_exactly_the_feasible_and_pareto_settings():
    table = plan(hand_summary(), **BUDGETS)

    by = table.set_index("setting")
    assert set(by.index) == set(SETTINGS)
    assert (by["n_seeds"] == 2).all()  # the crashed run is left out
    assert by.loc["fedavg", "accuracy_mean"] == pytest.approx(0.90)
    assert by.loc["sl", "bytes_total"] == pytest.approx(3.0e9)
    assert set(by.index[by["feasible"]]) == {"fedavg", "adasplit kappa=0.5", "fedprox"}
    assert set(by.index[by["pareto"]]) == {"fedavg", "adasplit kappa=0.5"}
    assert by["binds"].to_dict() == {"fedavg": "", "adasplit kappa=0.5": "", "fedprox": "", "sl": "bytes,energy",
                                     "splitfed": "energy", "adasplit kappa=0.9": "accuracy"}
    # ranked: feasible by accuracy, then the rest by accuracy
    assert list(table["setting"]) == ["fedavg", "adasplit kappa=0.5", "fedprox", "sl", "splitfed",
                                      "adasplit kappa=0.9"]


def test_planner_time_and_flops_budgets_and_no_budgets():
    table = plan(hand_summary(), max_time_s=100.0, max_client_flops=3e12).set_index("setting")
    # a budget met exactly (fedavg's mean time is 100 s) is met
    assert table["binds"].to_dict() == {"fedavg": "flops", "sl": "time", "splitfed": "",
                                        "adasplit kappa=0.5": "time", "adasplit kappa=0.9": "", "fedprox": "time,flops"}
    free = plan(hand_summary()).set_index("setting")
    assert free["feasible"].all() and (free["binds"] == "").all()
    # without budgets the front is over all settings: adasplit kappa=0.9 (least bytes and energy) and
    # splitfed (least time) join it
    assert set(free.index[free["pareto"]]) == {"fedavg", "adasplit kappa=0.5", "splitfed", "adasplit kappa=0.9"}


def test_aggregate_gives_mean_and_spread_per_setting():
    agg = aggregate(hand_summary()).set_index("setting")
    row = agg.loc["adasplit kappa=0.5"]
    assert row["accuracy_mean"] == pytest.approx(0.88)
    assert row["accuracy_mean.std"] == pytest.approx(0.02 / np.sqrt(2))
    assert (row["accuracy_mean.min"], row["accuracy_mean.max"]) == pytest.approx((0.87, 0.89))
    assert row["client_flops"] == pytest.approx(2e12)


def test_c3_grid_uses_the_c3_score_of_each_run():
    df = hand_summary()
    from simkit.plan import group_runs, with_derived

    runs = with_derived(df[df["status"] == "ok"])
    settings, sid = group_runs(runs)
    grid = c3_grid(runs, sid, settings, {})
    assert len(grid) == 8 * 8 * len(SETTINGS)
    cell = grid[(grid["i"] == 7) & (grid["j"] == 7) & (grid["setting"] == "sl")].iloc[0]
    expected = np.mean([c3_score(r.accuracy_mean, bytes_total=r.bytes_total, client_flops=r.client_flops,
                                 max_bytes=cell.max_bytes, max_client_flops=cell.max_client_flops)
                        for r in runs[runs.algorithm == "sl"].itertuples()])
    assert cell["c3"] == pytest.approx(expected)
    # the cheapest cell is below sl's costs: sl scores 0 there
    assert grid[(grid["i"] == 0) & (grid["j"] == 0) & (grid["setting"] == "sl")]["c3"].iloc[0] == 0.0


def test_bad_inputs_name_the_file_and_the_columns(tmp_path):
    with pytest.raises(StudyError, match="does not exist"):
        load_summary(tmp_path / "nope")
    with pytest.raises(StudyError, match="no summary.parquet or summary.csv"):
        load_summary(tmp_path)
    hand_summary().drop(columns=["sim_time_s", "c3_score"]).to_csv(tmp_path / "summary.csv", index=False)
    with pytest.raises(StudyError) as err:
        build_report(tmp_path)
    msg = str(err.value)
    assert "summary.csv" in msg and "sim_time_s" in msg and "c3_score" in msg


# ------------------------------------------------------------------------------ a small real results folder
def tiny(algo: dict, seed: int) -> dict:
    return {
        "name": "tiny", "seed": seed,
        "fleet": {"counts": {"rpi4": 1, "phone-midrange": 1}},
        "server": {"profile": "server-t4", "slots": 1},
        "topology": {"kind": "star"},
        "workload": {"dataset": "digits", "partition": {"kind": "iid"}, "model": {"family": "cnn", "cut": 1},
                     "batch_size": 32, "max_samples": 50},
        "algorithm": {"rounds": 2, **algo},
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Five real runs (fedavg and splitfed with two seeds, sl with one) in one results folder, with the
    timeline of the first run (as a single run's ``save`` writes it)."""
    root = tmp_path_factory.mktemp("results")
    rows = []
    for algo, seeds in (({"name": "fedavg", "lr": 0.1}, (0, 1)), ({"name": "splitfed", "lr": 0.1}, (0, 1)),
                        ({"name": "sl", "lr": 0.05}, (0,))):
        for seed in seeds:
            res = run(tiny(algo, seed))
            if not rows:
                res.save(root)  # timeline_*.csv (and a one-row summary.csv, overwritten below)
                first = res
            rows.append(res.summary)
    pd.DataFrame(rows).to_csv(root / "summary.csv", index=False)
    return root, first


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    root, _ = results
    out = tmp_path_factory.mktemp("report")
    return build_report(root, out, budgets={"max_bytes": 5e6, "min_accuracy": 0.1}), root


def test_report_writes_markdown_pngs_csvs_and_an_offline_html(report):
    written, root = report
    for name in ("report.html", "summary.md", "settings.csv", "c3.csv", "c3_grid.csv", "energy_by_class.csv",
                 "plan.csv", "accuracy_vs_bytes.png", "accuracy_vs_energy.png", "accuracy_vs_time.png",
                 "c3_heatmap.png", "energy_by_class.png", "timeline_gantt.png"):
        assert written[name].is_file(), name
    for name, path in written.items():
        if name.endswith(".png"):
            data = path.read_bytes()
            assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
            width, height = struct.unpack(">II", data[16:24])
            assert width > 300 and height > 200

    md = written["summary.md"].read_text()
    summary = pd.read_csv(root / "summary.csv")
    fedavg = summary[summary.algorithm == "fedavg"].accuracy_mean
    assert "| splitfed |" in md and "| sl |" in md
    # two seeds: mean ± std (min–max), three decimals for accuracies
    spread = f"{fedavg.mean():.3f} ± {fedavg.std():.3f} ({fedavg.min():.3f}–{fedavg.max():.3f})"
    if fedavg.min() == fedavg.max():  # both seeds alike: the mean alone
        spread = f"{fedavg.mean():.3f}"
    assert f"| fedavg | 2 | {spread} |" in md
    sl_acc = summary[summary.algorithm == "sl"].accuracy_mean.iloc[0]
    assert f"| sl | 1 | {sl_acc:.3f} |" in md

    page = written["report.html"].read_text()
    assert not re.search(r"https?://", page)  # nothing from the web: no CDN, no remote img/script/css
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+:""", page)
    assert '<meta name="simkit-figures" content="6">' in page
    assert page.count('<img class="figure"') == 6
    assert page.count('src="data:image/png;base64,') == 6
    for cls in ("settings-table", "c3-table", "energy-table", "plan-table"):
        assert page.count(f'class="simkit-table {cls}"') == 1


def test_report_reads_parquet_and_a_study_timeline(results, tmp_path):
    root, first = results
    pd.read_csv(root / "summary.csv").to_parquet(tmp_path / "summary.parquet")
    (tmp_path / "runs" / "abc").mkdir(parents=True)
    first.records["compute"].to_parquet(tmp_path / "runs" / "abc" / "timeline_compute.parquet")
    first.records["transfer"].to_parquet(tmp_path / "runs" / "abc" / "timeline_transfer.parquet")
    written = build_report(tmp_path)
    assert written["report.html"].parent == tmp_path / "report"
    assert "timeline_gantt.png" in written
    assert "runs/abc/timeline_compute.parquet" in written["summary.md"].read_text()


def test_report_without_timeline_says_so(results, tmp_path):
    root, _ = results
    shutil.copy(root / "summary.csv", tmp_path / "summary.csv")
    written = build_report(tmp_path)
    assert "timeline_gantt.png" not in written
    page = written["report.html"].read_text()
    assert "No timeline in the results folder" in page
    assert '<meta name="simkit-figures" content="5">' in page and page.count('<img class="figure"') == 5


def test_gantt_says_what_it_left_out(results, tmp_path):
    _, first = results
    _, notes = gantt_figure(first.records["compute"], first.records["transfer"], tmp_path / "g.png", title="t",
                            max_devices=2, max_events=10)
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    assert any("showing 2 of 3 devices" in n for n in notes)
    assert any("(10 of" in n and "events)" in n for n in notes)


def _dump_dom(html_path, tmp_path) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium) -- cannot render the HTML")
def test_report_renders_in_headless_chromium(report, tmp_path):
    written, _ = report
    dom = _dump_dom(written["report.html"], tmp_path)
    assert dom.count('<img class="figure"') == 6
    assert '<div id="simkit-check">ok 6</div>' in dom
    assert "simkit-check\">error" not in dom

    # the check can fail: a figure that does not decode is reported
    page = written["report.html"].read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    assert '<div id="simkit-check">broken 5</div>' in _dump_dom(broken, tmp_path)


# ------------------------------------------------------------------------------ the CLI
def test_cli_report_and_plan(results, tmp_path):
    root, _ = results
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "rep"), "--max-bytes", "5e6"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "plan.csv").is_file()

    hand = tmp_path / "hand"
    hand.mkdir()
    hand_summary().to_csv(hand / "summary.csv", index=False)
    res = runner.invoke(app, ["plan", str(hand), "--max-bytes", "2e9", "--max-client-energy-j", "38",
                              "--min-accuracy", "0.75", "--csv", str(tmp_path / "plan.csv")])
    assert res.exit_code == 0, res.output
    assert "3 of 6 settings feasible" in res.output
    assert "bytes,energy" in res.output and "★" in res.output
    lines = [ln for ln in res.output.splitlines() if "fedavg" in ln or "fedprox" in ln]
    assert "★" in lines[0] and "fedavg" in lines[0] and "★" not in lines[1]
    saved = pd.read_csv(tmp_path / "plan.csv", keep_default_na=False)
    assert list(saved["setting"]) == list(plan(hand_summary(), **BUDGETS)["setting"])


@pytest.mark.parametrize("command", ["report", "plan"])
def test_cli_missing_folder_is_a_clear_error(command, tmp_path):
    res = CliRunner().invoke(app, [command, str(tmp_path / "nope")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # the error console wraps long lines
    assert "nope:" in text and "results folder does not exist" in text
    assert "Traceback" not in res.output


def test_cli_plan_rejects_a_file(tmp_path):
    (tmp_path / "study.yaml").write_text("name: x\n")
    (tmp_path / "table.csv").write_text("a\n1\n")
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "study.yaml")])
    # a study YAML is loaded (and run); this one lacks its base scenario
    assert res.exit_code == 2 and "study.yaml" in res.output and "base" in res.output
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "table.csv")])
    assert res.exit_code == 2 and "not a results folder" in " ".join(res.output.split())
