"""Faults inside the simulation: crashes mid-step and mid-transfer, server downtime, stragglers,
link outages, batteries; every algorithm survives 30% of its clients crashing."""

from __future__ import annotations

import pytest

from simkit.run import run

ALGOS = [{"name": "fedavg"}, {"name": "fedprox", "mu": 0.1}, {"name": "sl"}, {"name": "splitfed"}]


def sc(algo: dict, faults=(), clients=None, rounds=2, **kw) -> dict:
    out = {"fleet": {"counts": clients or {"rpi4": 2, "phone-midrange": 2}}, "topology": {"kind": "two_tier"},
           "workload": {"max_samples": 64, "batch_size": 16}, "algorithm": {"rounds": rounds, **algo},
           "faults": list(faults)}
    out.update(kw)
    return out


def test_crash_mid_step_interrupts_the_compute_counts_energy_to_the_crash_and_others_continue():
    clean = run(sc({"name": "splitfed"}))
    comp = clean.records["compute"]
    victim = "rpi4-0"
    step = comp[(comp.device == victim) & (comp.tag == "client_fwd")].iloc[3]
    t = (step.start + step.end) / 2
    res = run(sc({"name": "splitfed"}, faults=[{"kind": "crash", "device": victim, "at_s": t}]))
    c = res.records["compute"]
    cut = c[(c.device == victim) & (c.status == "interrupted")]
    assert len(cut) == 1 and cut.iloc[0].end == pytest.approx(t)
    assert c[(c.device == victim)].end.max() == pytest.approx(t)  # nothing after the crash
    row = res.clients.set_index("client").loc[victim]
    assert row.lost and row.rounds_finished == 0
    # energy of the victim: exactly what its meter integrated up to t (idle alone would be > t*idle_w)
    assert row.energy_j > 0 and res.summary["clients_lost"] == 1
    others = res.clients[res.clients.client != victim]
    assert (others.rounds_finished == 2).all()
    assert res.summary["accuracy_over"].startswith("3 of 4 clients")
    drops = res.records["dropout"]
    assert ((drops.device == victim) & (drops.reason == "crash")).any()
    # once crashed, the victim is no longer evaluated
    ev = res.records["eval"]
    assert (ev[ev.client == victim].time <= t).all()


def test_crash_mid_transfer_drops_the_partial_transfer():
    clean = run(sc({"name": "sl"}))
    tr = clean.records["transfer"]
    victim = "phone-midrange-0"
    up = tr[(tr.src == victim) & (tr.tag == "act_up")].iloc[2]
    t = (up.data_start + up.end) / 2
    res = run(sc({"name": "sl"}, faults=[{"kind": "crash", "device": victim, "at_s": t}]))
    r = res.records["transfer"]
    dropped = r[r.status == "dropped"]
    assert len(dropped) == 1 and dropped.iloc[0].src == victim and dropped.iloc[0].end == pytest.approx(t)
    # the dropped bytes are not counted as delivered
    delivered = r[r.status == "delivered"].nbytes.sum()
    assert res.summary["bytes_up"] + res.summary["bytes_down"] == pytest.approx(delivered)


def test_sl_relay_skips_a_crashed_client():
    clean = run(sc({"name": "sl"}, clients={"rpi4": 3}, rounds=1))
    comp = clean.records["compute"]
    mid = comp[comp.device == "rpi4-1"]
    t = (mid.start.min() + mid.end.max()) / 2
    res = run(sc({"name": "sl"}, clients={"rpi4": 3}, rounds=1,
                 faults=[{"kind": "crash", "device": "rpi4-1", "at_s": t}]))
    relays = res.records["transfer"].query("tag == 'relay' and status == 'delivered'")
    # rpi4-1 never finished its turn, so rpi4-2 receives the weights from rpi4-0
    assert list(zip(relays.src, relays.dst)) == [("rpi4-0", "rpi4-1"), ("rpi4-0", "rpi4-2")]


def test_server_down_interval_starts_no_server_work_inside_it():
    clean = run(sc({"name": "sl"}))
    frm, to = clean.summary["sim_time_s"] * 0.3, clean.summary["sim_time_s"] * 0.3 + 5.0
    res = run(sc({"name": "sl"}, faults=[{"kind": "server_down", "from_s": frm, "to_s": to}]))
    srv = res.records["compute"].query("device == 'server'")
    inside = srv[(srv.start > frm + 1e-9) & (srv.start < to - 1e-9)]
    assert inside.empty
    assert (srv.start >= to - 1e-9).any() and (srv.start <= frm).any()
    assert res.summary["sim_time_s"] == pytest.approx(clean.summary["sim_time_s"] + 5.0, abs=0.5)
    states = res.records["state"].query("device == 'server'")
    assert list(states.state) == ["down", "up"] and states.time.iloc[1] == pytest.approx(to)
    assert res.summary["clients_lost"] == 0 and (res.clients.rounds_finished == 2).all()


def test_straggler_slows_computes_in_its_interval_by_the_factor():
    res = run(sc({"name": "fedavg"}, faults=[{"kind": "straggler", "device": "rpi4-1", "factor": 3.0,
                                              "from_s": 0.0, "to_s": 1e9}]))
    from simkit.world.fleet import get_profiles

    p = get_profiles()["rpi4"]
    c = res.records["compute"].query("device == 'rpi4-1'")
    expect = c.flops / (p.peak_flops * p.efficiency) * 3.0 + p.step_overhead_s
    assert (c.end - c.start).to_numpy() == pytest.approx(expect.to_numpy(), rel=1e-9)


def test_link_down_interval_stalls_and_resumes_flows():
    clean = run(sc({"name": "splitfed"}))
    res = run(sc({"name": "splitfed"}, faults=[{"kind": "link_down", "link": ["gw-0", "server"],
                                                "from_s": 0.05, "to_s": 3.0}]))
    assert res.summary["bytes_total"] == clean.summary["bytes_total"]
    assert res.summary["sim_time_s"] > clean.summary["sim_time_s"] + 2.0
    tr = res.records["transfer"]
    assert ((tr.start < 0.05) & (tr.end > 3.0)).any()  # a flow straddled the outage and finished after it


def test_battery_fault_takes_the_device_out_when_empty():
    res = run(sc({"name": "splitfed"}, faults=[{"kind": "battery", "device": "phone-midrange-1", "capacity_j": 0.5}]))
    row = res.clients.set_index("client").loc["phone-midrange-1"]
    assert row.lost and row.energy_j == pytest.approx(0.5, rel=1e-6)
    assert (res.records["dropout"].reason == "battery_empty").any()


@pytest.mark.parametrize("algo", ALGOS, ids=[a["name"] for a in ALGOS])
def test_every_algorithm_survives_30_percent_random_crashes(algo):
    clean = run(sc(algo, clients={"rpi4": 5, "phone-midrange": 5}))
    faults = [{"kind": "crash", "fraction": 0.3, "between_s": [0.0, 0.5 * clean.summary["sim_time_s"]]}]
    res = run(sc(algo, clients={"rpi4": 5, "phone-midrange": 5}, faults=faults))
    assert res.summary["clients_lost"] == 3
    lost = set(res.clients[res.clients.lost].client)
    assert len(lost) == 3
    assert res.summary["accuracy_over"].startswith("7 of 10 clients (3 lost")
    ev = res.records["eval"]
    final = ev[ev["round"] == ev["round"].max()]
    assert set(final.client).isdisjoint(lost) and len(final) == 7
    assert res.summary["accuracy_mean"] == pytest.approx(final.accuracy.mean())
    assert (res.records["dropout"].reason == "crash").sum() == 3
    # same seed, same victims and times
    again = run(sc(algo, clients={"rpi4": 5, "phone-midrange": 5}, faults=faults))
    assert set(again.clients[again.clients.lost].client) == lost


def test_bad_fault_gives_a_clear_error():
    from simkit import SimkitError

    with pytest.raises(SimkitError, match="unknown device 'ghost'"):
        run(sc({"name": "fedavg"}, faults=[{"kind": "crash", "device": "ghost", "at_s": 1.0}]))
    with pytest.raises(SimkitError, match="faults"):
        run(sc({"name": "fedavg"}, faults=[{"kind": "meteor"}]))
