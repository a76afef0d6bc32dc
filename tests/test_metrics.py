"""Pure metric functions: C3-Score properties, the pluggable score, Pareto fronts, time to target."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simkit.metrics import c3_score, pareto_front, score_row, time_to_target

acc = st.floats(0, 1)
frac = st.floats(0, 1)


@given(acc)
def test_c3_equals_accuracy_when_costs_are_zero(a):
    assert c3_score(a, bytes_total=0, client_flops=0, max_bytes=1e6, max_client_flops=1e9) == a
    assert c3_score(a, bytes_total=0, client_flops=0, max_bytes=1e6, max_client_flops=1e9,
                    energy_j=0, max_energy_j=5, time_s=0, max_time_s=7) == a


@given(st.floats(0.01, 1), frac, frac, st.floats(0.001, 0.5))
def test_c3_strictly_decreases_in_bytes_and_in_compute(a, b, c, step):
    kw = dict(max_bytes=100.0, max_client_flops=100.0)
    b, c = b * 50, c * 50  # stay inside the budgets
    base = c3_score(a, bytes_total=b, client_flops=c, **kw)
    assert c3_score(a, bytes_total=b + step * 40, client_flops=c, **kw) < base
    assert c3_score(a, bytes_total=b, client_flops=c + step * 40, **kw) < base


def test_c3_hand_values_and_scale_free():
    assert c3_score(0.9, bytes_total=25, client_flops=50, max_bytes=100, max_client_flops=200) == \
        pytest.approx(0.9 * 0.75 * 0.75)
    # scale-free: the same fractions of the budgets give the same score
    assert c3_score(0.9, bytes_total=25e9, client_flops=50e12, max_bytes=100e9, max_client_flops=200e12) == \
        pytest.approx(0.9 * 0.75 * 0.75)
    # the energy- and time-aware extension multiplies in the same form
    assert c3_score(0.8, bytes_total=0, client_flops=0, max_bytes=1, max_client_flops=1, energy_j=10,
                    max_energy_j=40, time_s=3, max_time_s=4) == pytest.approx(0.8 * 0.75 * 0.25)


@given(acc, st.floats(1.0001, 10))
def test_c3_is_zero_over_any_budget(a, over):
    assert c3_score(a, bytes_total=100 * over, client_flops=1, max_bytes=100, max_client_flops=10) == 0
    assert c3_score(a, bytes_total=1, client_flops=10 * over, max_bytes=100, max_client_flops=10) == 0
    assert c3_score(a, bytes_total=1, client_flops=1, max_bytes=100, max_client_flops=10,
                    energy_j=5 * over, max_energy_j=5) == 0


def test_costs_without_a_budget_are_ignored():
    assert c3_score(0.7, bytes_total=1e30, client_flops=1e30, max_bytes=None, max_client_flops=None) == 0.7


ROW = {"accuracy_mean": 0.9, "bytes_up": 10.0, "bytes_down": 30.0, "client_flops_fwd": 5.0, "client_flops_bwd": 15.0,
       "energy_j_clients": 2.0, "sim_time_s": 1.0}


def test_user_supplied_score_function_is_used():
    seen = {}

    def mine(a, **kw):
        seen.update(kw)
        return a * 2

    assert score_row(ROW, {"max_bytes": 100}, mine) == pytest.approx(1.8)
    assert seen["bytes_total"] == 40 and seen["client_flops"] == 20 and seen["max_bytes"] == 100
    assert score_row(ROW, {"max_bytes": 100, "max_client_flops": 40}) == pytest.approx(0.9 * 0.6 * 0.5)


def test_run_carries_c3_and_its_inputs_and_uses_a_user_function():
    from simkit.run import run

    sc = {"fleet": {"counts": {"rpi4": 2}}, "topology": {"kind": "star"},
          "workload": {"max_samples": 40, "batch_size": 16}, "algorithm": {"name": "fedavg", "rounds": 1},
          "budgets": {"max_bytes": 1e9, "max_client_flops": 1e12}}
    res = run(sc)
    s = res.summary
    expect = c3_score(s["accuracy_mean"], bytes_total=s["bytes_up"] + s["bytes_down"],
                      client_flops=s["client_flops_fwd"] + s["client_flops_bwd"], max_bytes=1e9,
                      max_client_flops=1e12)
    assert s["c3_score"] == pytest.approx(expect) and 0 < s["c3_score"] < s["accuracy_mean"]
    res2 = run(sc, score_fn=lambda a, **kw: 42.0)
    assert res2.summary["c3_score"] == 42.0


def test_pareto_front_on_a_hand_made_table():
    df = pd.DataFrame({"acc": [0.9, 0.8, 0.85, 0.7, 0.9], "cost": [10, 5, 5, 1, 12]})
    # row 1 is dominated by row 2 (same cost, more accuracy); row 4 by row 0
    assert pareto_front(df, maximize=["acc"], minimize=["cost"]).tolist() == [True, False, True, True, False]


def test_time_to_target():
    assert time_to_target([1, 2, 3], [0.2, 0.85, 0.9], 0.8) == 2.0
    assert time_to_target([1, 2], [0.2, 0.3], 0.8) is None
