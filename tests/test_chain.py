"""Chains (simkit.world.chain): a split step simulated with one event when nothing else can happen
meanwhile must be the phase-by-phase run to the bit -- records, energy, summaries, weights --
and must step aside whenever anything could interleave."""

from __future__ import annotations

import networkx as nx
import pandas as pd
import pytest
import simpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit.config import DeviceProfile
from simkit.records import Recorder
from simkit.run import run
from simkit.world.chain import Chain
from simkit.world.devices import Device
from simkit.world.energy import EnergyMeter
from simkit.world.network import Network


# -- whole runs, chains on and off ------------------------------------------------------------------
def scenario(algo: dict, *, train: bool = True, faults=(), rounds: int = 2, workload=None, **fleet) -> dict:
    return {"fleet": {"counts": {"rpi4": 2, "phone-midrange": 2}, **fleet}, "topology": {"kind": "two_tier"},
            "workload": {"max_samples": 64, "batch_size": 16, **(workload or {})}, "train": train,
            "algorithm": {"rounds": rounds, **algo}, "faults": list(faults)}


@pytest.fixture
def chains(monkeypatch):
    """Counts of chains committed, and of chains begun but not committed (a phase that cannot be
    timed ahead, or something due before the end), while chains are enabled."""
    seen = {"commit": 0, "refused": 0}
    init, commit = Chain.__init__, Chain.commit

    def counting_init(self, *a, **kw):
        init(self, *a, **kw)
        seen["refused"] += Chain.enabled   # until committed

    def counting_commit(self):
        seen["commit"] += 1
        seen["refused"] -= 1
        return commit(self)

    monkeypatch.setattr(Chain, "__init__", counting_init)
    monkeypatch.setattr(Chain, "commit", counting_commit)
    return seen


def both(sc: dict, monkeypatch):
    on = run(sc)
    monkeypatch.setattr(Chain, "enabled", False)
    off = run(sc)
    monkeypatch.setattr(Chain, "enabled", True)
    return on, off


def assert_identical(a, b) -> None:
    """Every record, summary figure, per-client and per-round row and trained tensor bit for bit."""
    assert a.records.keys() == b.records.keys()
    for kind in a.records:
        pd.testing.assert_frame_equal(a.records[kind], b.records[kind], check_exact=True)
    pd.testing.assert_frame_equal(a.summary_frame().drop(columns="host_wall_s"),
                                  b.summary_frame().drop(columns="host_wall_s"), check_exact=True)
    pd.testing.assert_frame_equal(a.clients, b.clients, check_exact=True)
    pd.testing.assert_frame_equal(a.rounds, b.rounds, check_exact=True)
    assert a.models.keys() == b.models.keys()
    for part in a.models:
        for k, v in a.models[part].items():
            assert torch.equal(v, b.models[part][k]), (part, k)


@pytest.mark.parametrize("workload", [
    pytest.param(None, id="digits-float32"),
    # two model groups (each relays its own client part) and 8-byte activations
    pytest.param({"dtype": "float64", "partition": {"kind": "mixed", "datasets": ["digits", "mnist1d"]}},
                 id="mixed-float64"),
])
def test_sl_run_with_chains_is_the_phase_by_phase_run(workload, chains, monkeypatch):
    # real training; phones on LTE (radio tails), Wi-Fi boards, two local epochs; every step and
    # relay of vanilla SL is alone in the world, so each round (every client's whole turn: its
    # relay and all its steps) is one chain
    on, off = both(scenario({"name": "sl", "local_epochs": 2, "lr": 0.05}, workload=workload), monkeypatch)
    assert chains["refused"] == 0
    fwd = on.records["compute"].query("tag == 'client_fwd'")
    turns = fwd.groupby(["device", "round"]).ngroups
    assert turns == 4 * 2 and len(fwd) > 4 * turns   # several steps per turn
    groups = 2 if workload else 1   # each model group relays its own client part
    assert (on.records["transfer"].tag == "relay").sum() == turns - groups
    assert chains["commit"] == 2   # rounds
    assert_identical(on, off)
    assert on.records["transfer"].shape[0] > 0 and on.summary["energy_j_clients"] > 0


def test_a_turn_chains_up_to_the_next_event_and_after_it(chains, monkeypatch):
    # an unrelated event (another device starts straggling) in the middle of the third step of
    # rpi4-1's turn: rpi4-0's turn is one chain (rpi4-1's does not fit whole after it); rpi4-1's
    # relay and first two steps are one chain, the third runs phase by phase, the rest are one
    # more chain; the phones' two whole turns are one chain
    sc = scenario({"name": "sl", "local_epochs": 2, "lr": 0.05}, rounds=1)
    fwd = run(sc).records["compute"].query("tag == 'client_fwd' and device == 'rpi4-1'")
    assert len(fwd) >= 5
    at = (fwd.iloc[2].start + fwd.iloc[2].end) / 2
    sc["faults"] = [{"kind": "straggler", "device": "phone-midrange-1", "factor": 2.0, "from_s": at, "to_s": 1e6}]
    chains.update(commit=0, refused=0)
    on, off = both(sc, monkeypatch)
    # refused: rpi4-1's turn as a whole, and its third step
    assert chains["commit"] == 4 and chains["refused"] == 2
    assert_identical(on, off)
    # the straggling started where asked: phone-midrange-1's computes take longer (twice the
    # FLOP time, plus the same per-step overhead, which dominates here)
    comp = on.records["compute"]
    base = run({**sc, "faults": []}).records["compute"]
    pm1 = (comp.device == "phone-midrange-1") & (comp.tag == "client_fwd")
    assert ((comp[pm1].end - comp[pm1].start).to_numpy() > (base[pm1].end - base[pm1].start).to_numpy()).all()


def test_a_round_chain_stops_at_a_client_that_sits_out(chains, monkeypatch):
    # phone-midrange-0 (third in turn order) crashes at 0: each round, the turns before it are one
    # chain, its dropout is recorded at the instant its turn comes (rpi4-1's turn ends), and the
    # turn after it is one more chain. (In round 0 the crash itself is due at 0: rpi4-0's first
    # step runs phase by phase -- two chains refused, its turn whole and split_steps' -- and the
    # rest of its turn is a chain of its own, so rpi4-1's turn is one too.)
    sc = scenario({"name": "sl", "lr": 0.05}, faults=[{"kind": "crash", "device": "phone-midrange-0", "at_s": 0.0}])
    on, off = both(sc, monkeypatch)
    assert chains["commit"] == 3 + 2 and chains["refused"] == 2
    assert_identical(on, off)
    drops = on.records["dropout"].query("device == 'phone-midrange-0' and reason == 'dead'")
    comp = on.records["compute"]
    ends = comp[comp.device == "rpi4-1"].groupby("round").end.max()
    assert drops["round"].tolist() == [0, 1]
    assert drops.time.tolist() == ends.tolist()
    # the relay skips the dead client: phone-midrange-1 receives the weights from rpi4-1
    relays = on.records["transfer"].query("tag == 'relay' and dst == 'phone-midrange-1'")
    assert len(relays) == 2 and (relays.src == "rpi4-1").all()


def test_a_round_chain_stops_at_a_round_dropout(chains, monkeypatch):
    # per-round dropouts and nothing else: a client dropped from a round ends the chain of the
    # turns before it (it is on: only the round's draw says it sits out), its dropout is recorded
    # when its turn comes, and the turns after it chain again
    sc = scenario({"name": "sl", "lr": 0.05}, rounds=4, availability={"kind": "dropout", "dropout_p": 0.3})
    on, off = both(sc, monkeypatch)
    assert_identical(on, off)
    drops = on.records["dropout"]
    order = ["rpi4-0", "rpi4-1", "phone-midrange-0", "phone-midrange-1"]
    # (the seed gives a dropout between two clients that train in the same round)
    inner = [(r.round, r.device) for r in drops.itertuples() if 0 < order.index(r.device) < 3]
    assert inner and (drops.reason == "round_dropout").all()
    trained = on.records["compute"].query("tag == 'client_fwd'").groupby("round").device.unique()
    for rnd, dev in inner:
        assert dev not in trained[rnd]
    assert chains["refused"] == 0 and chains["commit"] > 4   # more than one chain in some round


FAULTS = [
    {"kind": "straggler", "device": "rpi4-1", "factor": 3.0, "from_s": 0.5, "to_s": 2.0},
    {"kind": "link_down", "link": ["gw-0", "server"], "from_s": 1.0, "to_s": 1.6},
    {"kind": "server_down", "from_s": 2.5, "to_s": 3.0},
    {"kind": "battery", "device": "phone-midrange-0", "capacity_j": 6.0},
]


def test_sl_with_faults_battery_and_dropouts_chains_only_where_nothing_interleaves(chains, monkeypatch):
    sc = scenario({"name": "sl", "lr": 0.05}, faults=FAULTS, rounds=4,
                  availability={"kind": "dropout", "dropout_p": 0.2})
    clean = run(sc)
    # crash rpi4-0 in the middle of the server step of its third split step (a step that chains
    # without the crash): the chain must step aside and the crash cut the step
    srv = clean.records["compute"].query("tag == 'server_step'")
    fwd = clean.records["compute"].query("tag == 'client_fwd' and device == 'rpi4-0'").iloc[2]
    mid = srv[srv.start >= fwd.end].iloc[0]
    sc["faults"] = FAULTS + [{"kind": "crash", "device": "rpi4-0", "at_s": (mid.start + mid.end) / 2}]
    chains.update(commit=0, refused=0)
    on, off = both(sc, monkeypatch)
    assert chains["commit"] > 0 and chains["refused"] > 0   # both paths taken
    states = on.records["state"].set_index("device")
    assert states.loc["rpi4-0", "detail"] == "crash" and states.loc["phone-midrange-0", "detail"] == "battery_empty"
    drops = on.records["dropout"]   # the step in flight was cut: its client backward found rpi4-0 off
    assert ((drops.device == "rpi4-0") & (drops.reason == "mid_round")).any()
    assert_identical(on, off)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_splitfed_runs_are_unchanged(variant, chains, monkeypatch):
    # concurrent clients: chains are refused whenever another client's event comes first
    on, off = both(scenario({"name": "splitfed", "variant": variant, "lr": 0.05}), monkeypatch)
    assert chains["refused"] > 0
    assert_identical(on, off)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crash=st.floats(0.0, 6.0), battery=st.floats(2.0, 60.0), down=st.floats(0.0, 5.0),
       length=st.floats(0.01, 2.0), factor=st.floats(0.2, 5.0), lte=st.booleans())
def test_random_fault_timelines_are_identical_with_and_without_chains(crash, battery, down, length, factor, lte,
                                                                       monkeypatch):
    faults = [{"kind": "crash", "device": "rpi4-1", "at_s": crash},
              {"kind": "battery", "device": "phone-midrange-1", "capacity_j": battery},
              {"kind": "link_down", "link": ["gw-1", "server"], "from_s": down, "to_s": down + length},
              {"kind": "straggler", "device": "rpi4-0", "factor": factor, "from_s": down / 2, "to_s": down + 1}]
    sc = scenario({"name": "sl", "local_epochs": 2}, train=False, faults=faults, rounds=3,
                  access={"rpi4": "lte" if lte else "wifi"})
    on, off = both(sc, monkeypatch)
    assert_identical(on, off)


# -- whole runs, same-instant latency ends and deliveries batched, and one entry each ---------------------
@pytest.mark.parametrize("algo, train", [("fedavg", True), ("splitfed", True), ("fedavg", False)])
def test_batched_events_give_the_run_with_an_entry_each(algo, train, monkeypatch):
    # a round's downloads start together, so their latency phases (and many deliveries) end together
    # and share one queued entry (Network.batch_events); with crashes, a link failure, a battery and dropouts in the mix
    # the run must be the one with a timeout per flow, to the bit
    sc = scenario({"name": algo, "lr": 0.05}, train=train, faults=FAULTS, rounds=4,
                  availability={"kind": "dropout", "dropout_p": 0.2}, counts={"rpi4": 3, "phone-midrange": 3})
    sizes = []
    fire = Network._latency_batch_done

    def counting(self, b):
        if b.next == 0:
            sizes.append(len(b.items) // 2)   # items sharing the entry (the first of the instant has its own)
        fire(self, b)

    monkeypatch.setattr(Network, "_latency_batch_done", counting)
    batched = run(sc)
    assert max(sizes) > 1   # some flows did share an entry
    monkeypatch.setattr(Network, "batch_events", False)
    plain = run(sc)
    assert_identical(batched, plain)


# -- one chain, by hand --------------------------------------------------------------------------------
PROFILE = DeviceProfile(name="dev", peak_flops=2e9, efficiency=0.5, memory_bytes=1e9, step_overhead_s=0.001,
                        power={"idle_w": 1.0, "compute_w": 3.0})


def small_world(env, *, battery_j=None, bps=8e6, latency=0.01):
    """Two devices a and s joined by one link each way (default 8 Mb/s, 10 ms)."""
    g = nx.DiGraph()
    g.add_edge("a", "s", bandwidth_bps=bps, latency_s=latency)
    g.add_edge("s", "a", bandwidth_bps=bps, latency_s=latency)
    rec = Recorder()
    meters = {n: EnergyMeter(env, idle_w=1.0, compute_w=3.0, tx_w=2.0, rx_w=1.0, tail_w=0.5, tail_s=0.2,
                             battery_j=battery_j if n == "a" else None) for n in "as"}
    net = Network(env, g, recorder=rec, meters=meters)
    devs = {n: Device(env, n, PROFILE, node=n, meter=meters[n], recorder=rec) for n in "as"}
    return rec, net, devs, meters


def step(env, net, devs, use_chain: bool):
    """compute 1 GFLOP on a, send 10 kB a->s, compute 1 GFLOP on s (phase by phase or as a chain)."""
    a, s = devs["a"], devs["s"]
    if use_chain:
        chain = Chain(env, net)
        ok = (chain.compute(a, 1e9, "fwd") and chain.send(a, s, 10_000, "up")
              and chain.compute(s, 1e9, "srv") and chain.clear())
        assert ok
        yield chain.commit()
    else:
        yield from a.computing(1e9, "fwd")
        yield net.transfer("a", "s", 10_000, tag="up")
        yield from s.computing(1e9, "srv")


@pytest.mark.parametrize("use_chain", [True, False])
def test_a_chain_ends_when_its_phases_would(use_chain):
    env = simpy.Environment()
    rec, net, devs, meters = small_world(env)
    env.run(until=env.process(step(env, net, devs, use_chain)))
    # 1e9 / (2e9 * 0.5) + 1 ms = 1.001 s per compute; 10 ms latency + 80,000 bits at 8 Mb/s = 10 ms
    assert env.now == pytest.approx(1.001 + 0.01 + 0.01 + 1.001, abs=1e-12)
    t = rec.lists["transfer"][0]
    assert (t.start, t.data_start, t.end) == pytest.approx((1.001, 1.011, 1.021), abs=1e-12)
    # a: idle 2.022 s, compute 3 W for 1.001 s, tx 2 W for 10 ms, tail 0.5 W for 0.2 s after it
    snap = meters["a"].snapshot()
    assert snap["compute"] == pytest.approx(3.003) and snap["tx"] == pytest.approx(0.02)
    assert snap["tail"] == pytest.approx(0.1) and snap["idle"] == pytest.approx(2.022)


def test_chain_and_phases_agree_bit_for_bit():
    out = []
    for use_chain in (True, False):
        env = simpy.Environment()
        rec, net, devs, meters = small_world(env)

        def twice():
            yield from step(env, net, devs, use_chain)
            net.set_capacity("a", "s", 2e6)   # a chain sees the new capacity (nothing cached stale)
            yield env.timeout(0.05)
            yield from step(env, net, devs, use_chain)

        env.run(until=env.process(twice()))
        out.append((env.now, rec.lists["compute"], rec.lists["transfer"],
                    {n: m.snapshot() for n, m in meters.items()}, net.stats))
    assert out[0] == out[1]


@settings(max_examples=200, deadline=None)
@given(wait=st.floats(0.0, 5.0), flops=st.floats(0.0, 1e10), nbytes=st.integers(1, 10**7),
       latency=st.sampled_from([0.0, 1e-4, 0.003, 0.01, 0.05]), bps=st.floats(1e5, 1e9))
def test_random_chains_equal_their_phases_to_the_bit(wait, flops, nbytes, latency, bps):
    # rounding included: a delivery lands at data_start + (finish - data_start), not at finish
    out = []
    for use_chain in (True, False):
        env = simpy.Environment()
        rec, net, devs, meters = small_world(env, bps=bps, latency=latency)
        a, s = devs["a"], devs["s"]

        def proc():
            yield env.timeout(wait)
            if use_chain:
                chain = Chain(env, net)
                assert (chain.send(s, a, nbytes, "relay") and chain.compute(a, flops, "fwd")
                        and chain.send(a, s, nbytes, "up") and chain.compute(s, flops / 3, "srv")
                        and chain.send(s, a, nbytes // 2 + 1, "down") and chain.clear())
                yield chain.commit()
            else:
                yield net.transfer("s", "a", nbytes, tag="relay")
                yield from a.computing(flops, "fwd")
                yield net.transfer("a", "s", nbytes, tag="up")
                yield from s.computing(flops / 3, "srv")
                yield net.transfer("s", "a", nbytes // 2 + 1, tag="down")
            yield env.timeout(0.5)   # into the radio tails

        env.run(until=env.process(proc()))
        out.append((env.now, rec.lists["compute"], rec.lists["transfer"],
                    {n: m.snapshot() for n, m in meters.items()}, net.stats))
    assert out[0] == out[1]


def test_a_chain_steps_aside_for_anything_that_could_interleave(monkeypatch):
    env = simpy.Environment()
    rec, net, devs, meters = small_world(env)
    a, s = devs["a"], devs["s"]

    def plan():
        chain = Chain(env, net)
        return (chain.compute(a, 1e9, "fwd") and chain.send(a, s, 10_000, "up")
                and chain.compute(s, 1e9, "srv") and chain.clear())

    assert plan()
    env.timeout(2.022)          # an event due exactly at the chain's end: not strictly after it
    assert not plan()
    env2 = simpy.Environment()
    _, net2, devs2, _ = small_world(env2)
    net2.transfer("s", "a", 1_000)   # another flow open: the send cannot be timed alone
    assert not Chain(env2, net2).send(devs2["a"], devs2["s"], 10_000, "up")
    a.busy = a.slots                 # no free slot
    assert not Chain(env, net).compute(a, 1e9, "fwd")
    a.busy = 0
    env3 = simpy.Environment()
    _, net3, devs3, meters3 = small_world(env3, battery_j=1.0)   # 1 J at 1 W idle: empty at t = 1
    env3.run(until=0.97)   # 3 % left: the battery check follows the current power
    assert meters3["a"]._near and devs3["a"].on
    assert not Chain(env3, net3).compute(devs3["a"], 1e9, "fwd")
    assert not Chain(env3, net3).send(devs3["a"], devs3["s"], 10_000, "up")
    monkeypatch.setattr(Chain, "enabled", False)
    env4 = simpy.Environment()
    _, net4, devs4, _ = small_world(env4)
    chain = Chain(env4, net4)
    assert chain.compute(devs4["a"], 1e9, "fwd") and not chain.clear()
