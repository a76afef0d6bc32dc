"""The fast what-if mode (train: false): same protocol and costs without tensors; surrogate accuracy."""

from __future__ import annotations

import math

import pytest

from simkit import SimkitError
from simkit.run import run
from simkit.surrogate import Curve, curve_points, fit_curve, load_curve, save_curves

COSTS = ["bytes_up", "bytes_down", "client_flops_fwd", "client_flops_bwd", "server_flops", "sim_time_s",
         "energy_j_clients", "energy_j_server", "energy_j_total"]


def base(algo: dict, **kw) -> dict:
    sc = {"fleet": {"counts": {"rpi4": 2, "phone-midrange": 2}, "speed_jitter": 0.2, "bandwidth_jitter": 0.2},
          "topology": {"kind": "two_tier"}, "workload": {"max_samples": 80, "batch_size": 16},
          "algorithm": {"rounds": 2, **algo}}
    sc.update(kw)
    return sc


@pytest.mark.parametrize("algo", [{"name": "fedavg", "fraction": 0.5}, {"name": "fedprox", "mu": 0.1},
                                  {"name": "sl"}, {"name": "splitfed"}, {"name": "splitfed", "variant": "v2"}])
def test_fast_mode_costs_equal_real_mode(algo):
    real = run(base(algo))
    fast = run({**base(algo), "train": False})
    for k in COSTS:
        assert fast.summary[k] == real.summary[k], k
    assert fast.records["transfer"].equals(real.records["transfer"])
    assert fast.records["compute"].equals(real.records["compute"])
    assert real.summary["accuracy_source"] == "measured"
    assert math.isnan(fast.summary["accuracy_mean"]) and fast.summary["accuracy_source"].startswith("none")
    assert fast.models == {}


def test_surrogate_fitted_from_real_runs_predicts_accuracy_and_says_where_it_came_from(tmp_path):
    algo = {"name": "fedavg", "lr": 0.1, "momentum": 0.9, "rounds": 4}
    reals = [run(base(algo, seed=s)) for s in (0, 1)]
    path = save_curves(reals, tmp_path / "curves.csv")
    pts = curve_points(reals)
    assert len(pts) == 8 and set(pts.source) == {"scenario/fedavg/seed0", "scenario/fedavg/seed1"}
    fast = run({**base(algo), "train": False, "surrogate": str(path)})
    assert "2 real run(s)" in fast.summary["accuracy_source"] and "seed1" in fast.summary["accuracy_source"]
    measured = sum(r.summary["accuracy_mean"] for r in reals) / 2
    assert fast.summary["accuracy_mean"] == pytest.approx(measured, abs=0.12)
    # the fast run's per-round accuracy follows the curve: rising
    acc = fast.rounds.accuracy_mean.tolist()
    assert acc == sorted(acc) and acc[0] < acc[-1]


def test_fit_curve_recovers_a_known_curve():
    import pandas as pd

    truth = Curve(0.1, 0.9, 0.7, "t")
    pts = pd.DataFrame({"epochs": range(1, 12), "accuracy": [truth.predict(e) for e in range(1, 12)]})
    c = fit_curve(pts, "fit")
    assert (c.a0, c.a_inf, c.k) == pytest.approx((0.1, 0.9, 0.7), rel=1e-4)


def test_surrogate_errors_are_clear(tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text("algorithm,epochs\nfedavg,1\n")
    from simkit.config import scenario_from_dict

    sc = scenario_from_dict(base({"name": "sl"}))
    with pytest.raises(SimkitError, match="missing column"):
        load_curve(str(bad), sc)
    bad.write_text("algorithm,epochs,accuracy,source\nfedavg,1,0.5,x\n")
    with pytest.raises(SimkitError, match="no real-run points for algorithm 'sl'"):
        load_curve(str(bad), sc)


def test_samples_per_client_plans_a_fleet_larger_than_the_dataset():
    sc = {"fleet": {"size": 3000, "shares": {"rpi4": 0.5, "phone-midrange": 0.5}}, "train": False,
          "record_timeline": False, "topology": {"kind": "two_tier", "gateways": 30},
          "workload": {"samples_per_client": 40, "batch_size": 16}, "algorithm": {"name": "fedavg", "rounds": 1}}
    res = run(sc)
    assert res.summary["n_clients"] == 3000 and res.summary["clients_finished"] == 3000
    # every client: 32 training samples (40 minus 8 test) -> 2 steps of 16
    assert (res.clients.n_train == 32).all()
    assert res.summary["bytes_up"] == res.summary["bytes_down"] > 0
    with pytest.raises(SimkitError, match="fast what-if mode"):
        run({**sc, "train": True})


def test_simulation_gc_settings_hold_during_the_run_and_are_restored_after():
    import gc
    import importlib

    runmod = importlib.import_module("simkit.run")   # (``simkit.run`` the attribute is the function)
    seen = []
    before = gc.get_threshold()
    p = runmod.prepare({**base({"name": "fedavg"}), "train": False})
    p.env.process(iter_probe(p.env, seen))
    runmod.simulate(p)
    assert seen == [(runmod.SIMULATION_GC_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    # and a failing run restores them too
    p = runmod.prepare({**base({"name": "fedavg"}), "train": False})

    def boom():
        yield p.env.timeout(0.0)
        raise RuntimeError("boom")

    p.env.process(boom())
    with pytest.raises(RuntimeError, match="boom"):
        runmod.simulate(p)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_finished_run_frees_its_world_and_a_run_inside_a_run_keeps_the_freeze(monkeypatch):
    """A run's world is one big reference cycle (environment <-> processes <-> algorithm); with torch
    loaded CPython's full collections hardly ever run, so without run_gc every run of a study worker
    stayed in memory. After run() returns, its environment, world and models are already gone."""
    import gc
    import importlib
    import weakref

    runmod = importlib.import_module("simkit.run")
    refs = []
    prepare = runmod.prepare

    def spy(scenario):
        p = prepare(scenario)
        refs.extend(weakref.ref(o) for o in (p.env, p.world, p.ctx, p.algorithm))
        return p

    monkeypatch.setattr(runmod, "prepare", spy)
    rounds = []
    res = run(base({"name": "splitfed"}), on_round=lambda *a: rounds.append(a))   # real training; progress hook
    assert rounds == [(1, 2), (2, 2)] and res.summary["accuracy_mean"] >= 0 and len(refs) == 4
    assert [r() for r in refs] == [None] * 4
    assert gc.get_freeze_count() == 0
    # nested: an inner simulation must not unfreeze what the outer scope froze
    with runmod.run_gc():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        p = prepare({**base({"name": "fedavg"}), "train": False})
        runmod.simulate(p)
        assert gc.get_freeze_count() > frozen // 2   # (frozen objects freed by refcount leave the count)
        run({**base({"name": "fedavg"}), "train": False})
        assert gc.get_freeze_count() > frozen // 2
    assert gc.get_freeze_count() == 0 and runmod._RUN_GC_DEPTH == 0
    # a failing run unfreezes and leaves the scope too
    with pytest.raises(SimkitError):
        run({**base({"name": "fedavg"}), "workload": {"dataset": "nope"}})
    assert gc.get_freeze_count() == 0 and runmod._RUN_GC_DEPTH == 0


def iter_probe(env, seen):
    import gc

    yield env.timeout(0.0)
    seen.append(gc.get_threshold())
    assert gc.get_freeze_count() > 0
