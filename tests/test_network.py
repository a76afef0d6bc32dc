"""Flow-level network: hand-computed timelines (STYLE.md #22) and property tests of the sharing.

Units in the timelines: a bandwidth of 8e6 bit/s moves 1e6 bytes (1 MB) per second.
"""

from __future__ import annotations

import itertools
import math
import os
from fractions import Fraction

import networkx as nx
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit.errors import TopologyError
from simkit.records import Recorder
from simkit.world.energy import EnergyMeter
from simkit.world.network import (
    Flow,
    Network,
    TransferAborted,
    maxmin_fast,
    maxmin_reference,
    maxmin_rounds,
)

MB = 1e6
MBPS = 8e6  # bit/s that carry 1 MB per second


# the ``env`` and ``log`` fixtures come from tests/conftest.py


def duplex(g: nx.DiGraph, u, v, bps: float, latency: float = 0.0, back_bps: float | None = None) -> None:
    """Add the full-duplex link u<->v (one edge per direction)."""
    g.add_edge(u, v, bandwidth_bps=bps, latency_s=latency)
    g.add_edge(v, u, bandwidth_bps=bps if back_bps is None else back_bps, latency_s=latency)


def sender(env, net, log, name, src, dst, nbytes, at=0.0, tag=""):
    """A process: wait until ``at``, send, log (name, 'done', t) or (name, 'aborted', t)."""
    if at:
        yield env.timeout(at)
    try:
        flow = yield net.transfer(src, dst, nbytes, tag=tag)
    except TransferAborted as exc:
        log.append((name, "aborted", env.now))
        assert exc.flow.status == "dropped"
        return
    assert flow.status == "delivered" and flow.remaining == 0
    log.append((name, "done", env.now))


def approx(expected):
    """``expected`` with every float compared at rel 1e-9 (pytest.approx does not nest)."""
    if isinstance(expected, float):
        return pytest.approx(expected, rel=1e-9)
    if isinstance(expected, (list, tuple)):
        return type(expected)(approx(x) for x in expected)
    return expected


# -- single links ---------------------------------------------------------------------------------------

def test_one_flow_takes_latency_plus_bytes_over_bandwidth(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", 8e6, latency=0.01)
    rec = Recorder()
    net = Network(env, g, recorder=rec)
    env.process(sender(env, net, log, "x", "a", "b", 2 * MB, tag="weights"))
    env.run()
    assert log == approx([("x", "done", 0.01 + 2.0)])
    (r,) = rec.lists["transfer"]
    assert (r.flow, r.src, r.dst, r.nbytes, r.tag, r.status) == (0, "a", "b", 2 * MB, "weights", "delivered")
    assert (r.start, r.data_start, r.end) == approx((0.0, 0.01, 2.01))
    assert net.stats.link_bytes == {("a", "b"): 2 * MB, ("b", "a"): 0.0}


@pytest.mark.parametrize("inline", [True, False])
def test_a_lone_delivery_runs_its_callbacks_without_a_trip_through_the_queue(env, inline):
    # one flow, alone: a latency timer and a completion timer; with inline delivery its event's
    # callbacks run from the completion timer's callback (it would be the next event anyway),
    # without: the event is scheduled too. Same instants and values either way.
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.25)
    net = Network(env, g)
    net.inline_delivery = inline
    seen = []
    ev = net.transfer("a", "b", MB)
    ev.callbacks.append(lambda e: seen.append((env.now, e.value.status, e.processed)))
    later = env.timeout(5.0)   # something due later stays queued: the delivery is still "next"
    env.run()
    assert seen == [(1.25, "delivered", True)]   # (SimPy marks it processed before the callbacks)
    assert ev.processed and ev.ok and ev.value.end == 1.25 and later.processed
    # events scheduled: latency timer, completion timer, the later timeout (+ the delivery)
    assert next(env._eid) == (3 if inline else 4)


def _four_senders(batch: bool):
    """s0..s3 -> r, each over a link of its own (1 MB/s, 0.5 s): four 1 MB flows requested together
    end their latency phases together at 0.5 and are delivered together at 1.5, each alone on its path
    (no recomputation is queued between them)."""
    env = simpy.Environment()
    g = nx.DiGraph()
    for k in range(4):
        duplex(g, f"s{k}", "r", MBPS, latency=0.5)
    net = Network(env, g)
    net.batch_events = batch
    return env, net


def _four_latencies_and_a_probe(batch: bool, urgent: bool, probe_after: int):
    """A, B, C, D requested at 0; a probe timeout for 0.5 set after the first ``probe_after`` of them;
    A's latency end may start a process (an urgent event at 0.5)."""
    env, net = _four_senders(batch)
    seen = []

    def started():
        seen.append(("process", env.now, [f.status for f in net.open_flows]))
        yield env.timeout(0)

    plain_done = net._latency_done

    def latency_done(f):   # (called with the flow, or with its timeout)
        plain_done(f)
        seen.append(("latency", getattr(f, "flow", f).id, env.peek()))   # the others' ends: still due
        if urgent and getattr(f, "flow", f).id == 0:
            env.process(started())   # urgent: its start runs before any normal event due now

    net._latency_done = latency_done          # (the batches look it up on the network)
    net._latency_cbs[:] = [latency_done]      # (the per-flow timeouts' callback list)
    evs = []
    for k in range(4):
        if k == probe_after:
            probe = env.timeout(0.5)
            probe.callbacks.append(lambda e: seen.append(("probe", env.now, [f.status for f in net.open_flows])))
        evs.append(net.transfer(f"s{k}", "r", MB))
    env.run()
    assert net._dbatch is None and all(b is None or b.items is None for b in (net._lat_recent or {}).values())
    return seen, [e.value.end for e in evs], next(env._eid), net.stats.events_shared


@pytest.mark.parametrize("urgent", [True, False])
@pytest.mark.parametrize("probe_after", [1, 2, 3])
def test_latency_phases_ending_together_keep_their_place_among_same_instant_events(urgent, probe_after):
    # One timeout per flow runs A's latency end, the process start (urgent) if any, then the probe and
    # B's, C's and D's latency ends in request order. Batched (A's end has its own entry, B, C and D share
    # one), the shared entry must step aside for the urgent event and for the probe -- the head of the
    # queue, or, when B and C went through together, a child of the entry's own stale place -- and leave
    # every event number as it was; and while some are left, something must show as due at 0.5.
    batched = _four_latencies_and_a_probe(True, urgent, probe_after)
    plain = _four_latencies_and_a_probe(False, urgent, probe_after)
    assert batched[0] == plain[0]
    order = [x[:2] if x[0] == "latency" else x for x in plain[0]]
    probe = ("probe", 0.5, ["active"] * probe_after + ["latency"] * (4 - probe_after))
    ends = [("latency", k) for k in range(4)]
    assert order == ends[:1] + [("process", 0.5, ["active"] + ["latency"] * 3)] * urgent + \
        ends[1:probe_after] + [probe] + ends[probe_after:]
    assert [x[2] for x in plain[0] if x[0] == "latency"][:3] == [0.5] * 3
    assert batched[1] == plain[1] == [1.5] * 4
    assert batched[2] == plain[2]
    # each latency end and delivery counts one SimPy event (its own entry or a pop of the batch's)
    # unless it went through with the one before it in the batch. Deliveries: C's and D's go with B's.
    # Latency ends: C's goes with B's unless the probe comes between them (after 2); D's with C's unless
    # the probe comes between (after 3: the entry comes back under C's stale number, sees the probe
    # first and queues again)
    assert plain[3] == 0
    assert batched[3] == 2 + {1: 2, 2: 1, 3: 0}[probe_after]


@pytest.mark.parametrize("spread", [False, True])
def test_latency_instants_interleaved_keep_their_order(spread):
    # three latencies (0.25, 0.5, 0.75 s) over three senders each, requested round-robin at 0 (three
    # batches in play at once), or spread so that the three groups, requested at different instants,
    # end together at 1.0 (a batch per request instant); the ends run in request order per instant,
    # as with a timeout per flow
    def go(batch):
        env = simpy.Environment()
        g = nx.DiGraph()
        for k in range(9):
            duplex(g, f"s{k}", "r", MBPS, latency=0.25 * (1 + k % 3))
        net = Network(env, g)
        net.batch_events = batch
        ends = []
        plain_done = net._latency_done

        def latency_done(f):
            plain_done(f)
            ends.append((env.now, getattr(f, "flow", f).id, env.peek()))

        net._latency_done = latency_done
        net._latency_cbs[:] = [latency_done]
        evs = []

        def send(k):
            yield env.timeout(0.25 * (3 - k % 3) if spread else 0)   # spread: every latency ends at 1.0
            evs.append(net.transfer(f"s{k}", "r", MB))

        for k in range(9):
            env.process(send(k))
        env.run()
        return ends, [e.value.end for e in evs], next(env._eid), net.stats.events_shared

    batched, plain = go(True), go(False)
    assert batched[:3] == plain[:3]
    if spread:
        assert [t for t, _, _ in plain[0]] == [1.0] * 9
        # per group its third latency end goes with its second (3); the nine deliveries at 2.0: the
        # first has its own entry, the other eight share one (7)
        assert batched[3] == 3 + 7
    else:
        assert [i for _, i, _ in plain[0]] == [0, 3, 6, 1, 4, 7, 2, 5, 8]
        assert batched[3] > 0


def _four_deliveries(batch: bool, *, raise_in: str = ""):
    """A..D delivered together at 1.5; A's callback starts a process (an urgent event then), one
    callback may raise."""
    env, net = _four_senders(batch)
    seen = []

    def started():
        seen.append(("process", env.now))
        yield env.timeout(1)

    evs = [net.transfer(f"s{k}", "r", MB) for k in range(4)]

    def on(name):
        def cb(ev):
            seen.append((name, env.now, ev.value.status, env.peek()))   # the later ones: still due
            if name == "A":
                env.process(started())
            if name == raise_in:
                raise KeyError(name)
        return cb

    for name, ev in zip("ABCD", evs):
        ev.callbacks.append(on(name))
    raised = None
    try:
        env.run()
    except KeyError as exc:
        raised = exc.args[0]
        seen.append(("raised", env.now))
        env.run()   # the rest, as SimPy leaves it queued
    assert net._dbatch is None and all(b is None or b.items is None for b in (net._lat_recent or {}).values())
    return seen, raised, next(env._eid)


@pytest.mark.parametrize("raise_in", ["", "B", "C", "D"])
def test_deliveries_at_one_instant_run_their_callbacks_in_simpy_order(raise_in):
    # One event per delivery runs A's callbacks, then the process A started (urgent), then B's, C's and
    # D's; batched (A has its own entry, B..D share one) the shared entry steps aside for nothing here
    # but must leave the later ones due (env.peek()) while it runs each. A callback that raises leaves
    # the deliveries after it queued, as SimPy does.
    batched = _four_deliveries(True, raise_in=raise_in)
    plain = _four_deliveries(False, raise_in=raise_in)
    assert batched == plain
    expected = [("A", 1.5, "delivered", 1.5), ("process", 1.5)]
    for name in "BCD":
        expected.append((name, 1.5, "delivered", 1.5 if name != "D" else 2.5))
        if name == raise_in:
            expected.append(("raised", 1.5))
    assert batched[0] == expected and batched[1] == (raise_in or None)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_equal_flows_through_one_bottleneck_take_n_times_as_long(env, log, n):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.5)
    net = Network(env, g)
    for i in range(n):
        env.process(sender(env, net, log, f"f{i}", "a", "b", MB))
    env.run()
    assert log == approx([(f"f{i}", "done", 0.5 + n * 1.0) for i in range(n)])
    assert net.stats.max_utilisation == pytest.approx(1.0, rel=1e-12)


def test_max_min_gives_the_leftover_to_the_flow_bottlenecked_elsewhere(env, log):
    # A: s1 -> r (10 Mb/s) -> t;  B: s2 -> r (1 Gb/s) -> t;  shared r -> t is 100 Mb/s.
    # Max-min: A is held to 10 Mb/s by its own access link, B gets the other 90 Mb/s.
    g = nx.DiGraph()
    duplex(g, "s1", "r", 10e6)
    duplex(g, "s2", "r", 1e9)
    duplex(g, "r", "t", 100e6)
    net = Network(env, g)
    env.process(sender(env, net, log, "A", "s1", "t", 1.25e6))   # 1e7 bits at 10 Mb/s: ends at 1.0
    env.process(sender(env, net, log, "B", "s2", "t", 1.8e7))    # 1.44e8 bits
    env.run(until=0.5)
    assert [f.rate for f in net.active_flows] == approx([10e6, 90e6])
    env.run()
    # B: 9e7 bits by t=1 at 90 Mb/s, then 5.4e7 bits alone at 100 Mb/s -> 0.54 s more
    assert log == approx([("A", "done", 1.0), ("B", "done", 1.54)])


def test_a_flow_joining_halfway_halves_the_first_flows_rate(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.1)
    net = Network(env, g)
    env.process(sender(env, net, log, "first", "a", "b", 2 * MB))             # data from 0.1 at 1 MB/s
    env.process(sender(env, net, log, "second", "a", "b", 0.5 * MB, at=1.0))  # data from 1.1: first is half done
    env.run()
    # from 1.1 both at 0.5 MB/s: second needs 1 s (ends 2.1); first has 1 MB left, sends 0.5 MB by 2.1,
    # then the last 0.5 MB alone at 1 MB/s (ends 2.6)
    assert log == approx([("second", "done", 2.1), ("first", "done", 2.6)])


def test_full_duplex_directions_do_not_share_capacity(env, log):
    g = nx.DiGraph()
    duplex(g, "u", "v", MBPS, latency=0.25)
    net = Network(env, g)
    env.process(sender(env, net, log, "up", "u", "v", MB))
    env.process(sender(env, net, log, "down", "v", "u", MB))
    env.run()
    assert log == approx([("up", "done", 1.25), ("down", "done", 1.25)])


def test_set_capacity_mid_transfer(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS)
    net = Network(env, g)
    env.process(sender(env, net, log, "x", "a", "b", MB))

    def throttle():
        yield env.timeout(0.5)
        net.set_capacity("a", "b", MBPS / 2)

    env.process(throttle())
    env.run()
    assert log == approx([("x", "done", 0.5 + 0.5 / 0.5)])
    assert net.capacity("a", "b") == MBPS / 2 and net.capacity("b", "a") == MBPS


def test_zero_bytes_take_the_latency_and_loopback_is_immediate(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.3)
    rec = Recorder()
    net = Network(env, g, recorder=rec)
    env.process(sender(env, net, log, "empty", "a", "b", 0))
    env.process(sender(env, net, log, "self", "a", "a", MB))
    env.run()
    assert log == approx([("self", "done", 0.0), ("empty", "done", 0.3)])
    assert [r.status for r in rec.lists["transfer"]] == ["delivered", "delivered"]


def test_same_instant_changes_are_coalesced_into_one_recomputation(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.1)
    net = Network(env, g)
    for i in range(50):
        env.process(sender(env, net, log, f"f{i}", "a", "b", MB / 50))
    env.run()
    assert log == approx([(f"f{i}", "done", 1.1) for i in range(50)])
    assert net.stats.recomputations == 2   # all 50 start at 0.1, all 50 end at 1.1


# -- routing and topology errors -----------------------------------------------------------------------

def test_route_prefers_latency_then_hops_then_node_order(env):
    g = nx.DiGraph()
    for n in ["s", "x", "y", "z", "t"]:
        g.add_node(n)
    duplex(g, "s", "z", MBPS, latency=0.002)   # s-z-t: 4 ms
    duplex(g, "z", "t", MBPS, latency=0.002)
    duplex(g, "s", "y", MBPS, latency=0.001)   # s-y-t: 3 ms, the fastest
    duplex(g, "y", "t", MBPS, latency=0.002)
    duplex(g, "s", "x", MBPS, latency=0.001)   # s-x-t: 3 ms, ties with s-y-t: x comes first in node order
    duplex(g, "x", "t", MBPS, latency=0.002)
    net = Network(env, g)
    assert net.route("s", "t") == ("s", "x", "t")
    assert net.path_latency("s", "t") == pytest.approx(0.003, rel=1e-12)
    # a direct 3 ms link wins the tie on hops
    duplex(g, "s", "t", MBPS, latency=0.003)
    net2 = Network(env, g)
    assert net2.route("s", "t") == ("s", "t")
    # many-to-one and one-to-many queries (cached trees, both directions) agree with a fresh network
    for a in g.nodes:
        for b in g.nodes:
            if a != b:
                assert net2.route(a, b) == Network(env, g).route(a, b)


def test_no_route_and_unknown_nodes_raise_topology_error(env):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS)
    duplex(g, "c", "d", MBPS)
    net = Network(env, g)
    with pytest.raises(TopologyError, match="no path from 'a' to 'c'"):
        net.transfer("a", "c", MB)
    with pytest.raises(TopologyError, match="no path"):
        net.route("d", "b")
    with pytest.raises(TopologyError, match="unknown node 'zz'"):
        net.transfer("a", "zz", MB)
    with pytest.raises(TopologyError, match="no link"):
        net.link_down("a", "c")


@pytest.mark.parametrize("attrs, field", [
    ({"latency_s": 0.0}, "bandwidth_bps"),
    ({"bandwidth_bps": 0, "latency_s": 0.0}, "bandwidth_bps"),
    ({"bandwidth_bps": -5.0, "latency_s": 0.0}, "bandwidth_bps"),
    ({"bandwidth_bps": math.nan, "latency_s": 0.0}, "bandwidth_bps"),
    ({"bandwidth_bps": "fast", "latency_s": 0.0}, "bandwidth_bps"),
    ({"bandwidth_bps": 1e6}, "latency_s"),
    ({"bandwidth_bps": 1e6, "latency_s": -1.0}, "latency_s"),
])
def test_bad_edge_attributes_raise_topology_error_naming_edge_and_field(env, attrs, field):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS)
    g.add_edge("b", "gw", **attrs)
    with pytest.raises(TopologyError) as err:
        Network(env, g)
    assert err.value.field == f"edges['b'->'gw'].{field}"
    assert "'b'->'gw'" in str(err.value) and field in str(err.value)


def test_undirected_graph_is_rejected(env):
    with pytest.raises(TopologyError, match="DiGraph"):
        Network(env, nx.Graph([("a", "b")]))


# -- link failures ---------------------------------------------------------------------------------------

def triangle():
    """a-b direct at 1 MB/s (1 ms); a-c-b at 0.5 MB/s (1 ms per hop)."""
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.001)
    duplex(g, "a", "c", MBPS / 2, latency=0.001)
    duplex(g, "c", "b", MBPS / 2, latency=0.001)
    return g


def test_link_failure_reroutes_an_active_flow(env, log):
    rec = Recorder()
    net = Network(env, triangle(), recorder=rec)
    env.process(sender(env, net, log, "x", "a", "b", MB))
    net.schedule_link_failure("a", "b", down_at=0.501)
    env.run(until=0.6)
    (flow,) = net.active_flows
    assert flow.path == ("a", "c", "b") and flow.rate == MBPS / 2
    env.run()
    # 0.5 MB sent by 0.501, the rest at 0.5 MB/s on a-c-b without new latency
    assert log == approx([("x", "done", 0.501 + 1.0)])
    lb = net.stats.link_bytes
    assert (lb[("a", "b")], lb[("a", "c")], lb[("c", "b")]) == approx((0.5 * MB, 0.5 * MB, 0.5 * MB))
    assert [(s.device, s.state) for s in rec.lists["state"]] == [("a<->b", "link_down")]
    assert net.route("a", "b") == ("a", "c", "b") and net.path_latency("a", "b") == pytest.approx(0.002)


def test_link_failure_without_alternative_stalls_until_link_up(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.001)
    ma, mb = EnergyMeter(env, idle_w=0, compute_w=0, tx_w=2.0), EnergyMeter(env, idle_w=0, compute_w=0, rx_w=3.0)
    net = Network(env, g, meters={"a": ma, "b": mb})
    env.process(sender(env, net, log, "x", "a", "b", MB))
    net.schedule_link_failure("a", "b", down_at=0.501, up_at=2.0)
    env.run(until=1.0)
    assert net.active_flows == [] and [f.status for f in net.open_flows] == ["stalled"]
    assert net.open_flows[0].remaining == pytest.approx(0.5 * MB)
    env.run()
    assert log == approx([("x", "done", 2.0 + 0.5)])
    # radios are on only while data moves: 0.5 s before the failure, 0.5 s after
    assert ma.snapshot()["tx"] == pytest.approx(2.0 * 1.0) and mb.snapshot()["rx"] == pytest.approx(3.0 * 1.0)


def test_flow_in_latency_phase_picks_its_route_when_it_becomes_active(env, log):
    net = Network(env, triangle())
    env.process(sender(env, net, log, "early", "a", "b", MB))        # latency 1 ms (direct route at t=0)
    net.schedule_link_failure("a", "b", down_at=0.0005, up_at=5.0)
    env.process(sender(env, net, log, "late", "a", "b", MB, at=1.0))  # link down: a-c-b, latency 2 ms
    env.run()
    # early: active at 0.001 on a-c-b alone until 1.002 (0.5005 MB sent), then shares a->c with late
    # at 0.25 MB/s each; late: 1 MB from 1.002
    #   early left 0.4995 MB at 0.25 MB/s -> 1.998 s -> ends 3.0; late sent 0.4995 MB by then,
    #   then 0.5005 MB alone at 0.5 MB/s -> 1.001 s -> ends 4.001
    assert log == approx([("early", "done", 3.0), ("late", "done", 4.001)])


def test_stalled_at_request_pays_latency_after_link_up(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.25)
    net = Network(env, g)
    net.link_down("a", "b")
    with pytest.raises(TopologyError, match="down"):
        net.route("a", "b")
    env.process(sender(env, net, log, "x", "a", "b", MB))
    net.schedule_link_failure("a", "b", down_at=0.0, up_at=3.0)   # already down; comes up at 3
    env.run()
    assert log == approx([("x", "done", 3.0 + 0.25 + 1.0)])


# -- abort and energy -------------------------------------------------------------------------------------

def test_abort_flows_drops_the_flow_and_the_other_speeds_up(env, log):
    # a -> m and c -> m are fast; m -> b (1 MB/s) is shared
    g = nx.DiGraph()
    duplex(g, "a", "m", 1e9)
    duplex(g, "c", "m", 1e9)
    duplex(g, "m", "b", MBPS)
    rec = Recorder()
    net = Network(env, g, recorder=rec)
    env.process(sender(env, net, log, "X", "a", "b", MB))
    env.process(sender(env, net, log, "Y", "c", "b", MB))
    env.process(sender(env, net, log, "Z", "c", "a", 1e9, at=0.5))  # c -> m -> a, 8 s: in flight at 1

    def crash():
        yield env.timeout(1.0)
        dropped = net.abort_flows("c")
        log.append(("crash", [f.id for f in dropped], env.now))

    env.process(crash())
    env.run()
    # both at 0.5 MB/s until 1: X has 0.5 MB left, then alone at 1 MB/s
    assert log == approx([("crash", [1, 2], 1.0), ("Y", "aborted", 1.0), ("Z", "aborted", 1.0),
                          ("X", "done", 1.5)])
    recs = {r.flow: r for r in rec.lists["transfer"]}
    assert {k: r.status for k, r in recs.items()} == {0: "delivered", 1: "dropped", 2: "dropped"}
    assert rec.bytes_received == {"b": MB}
    assert net.stats.link_bytes[("m", "b")] == pytest.approx(1.5 * MB)


def test_unwatched_aborted_flow_does_not_crash_the_run(env):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.5)
    net = Network(env, g)
    ev = net.transfer("a", "b", MB)   # nobody waits on it
    env.run(until=0.2)
    (flow,) = net.abort_flows("b")    # still in its latency phase
    env.run()
    assert flow.status == "dropped" and not ev.ok and isinstance(ev.value, TransferAborted)
    assert net.open_flows == [] and net.stats.dropped == 1


def test_energy_tx_joules_equal_tx_power_times_data_duration(env, log):
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS, latency=0.125)
    ma = EnergyMeter(env, idle_w=1.0, compute_w=0.0, tx_w=2.5, rx_w=0.5)
    mb = EnergyMeter(env, idle_w=1.0, compute_w=0.0, tx_w=2.5, rx_w=0.75)
    rec = Recorder()
    net = Network(env, g, recorder=rec, meters={"a": ma, "b": mb})
    env.process(sender(env, net, log, "x", "a", "b", 3 * MB))
    env.run()
    (r,) = rec.lists["transfer"]
    data = r.end - r.data_start
    assert data == pytest.approx(3.0, rel=1e-12)
    assert ma.snapshot()["tx"] == 2.5 * data and ma.snapshot()["rx"] == 0.0
    assert mb.snapshot()["rx"] == 0.75 * data and mb.snapshot()["tx"] == 0.0


def test_runs_are_deterministic():
    """Same inputs, same records to the last bit (no dependence on object ids or set order)."""

    def run():
        env = simpy.Environment()
        g = nx.DiGraph()
        for d in range(12):
            duplex(g, f"d{d}", f"gw{d % 3}", 1e6 * (1 + d % 4), latency=0.001 * (d % 2))
        for k in range(3):
            duplex(g, f"gw{k}", "cloud", 7e6, latency=0.003)
        duplex(g, "gw0", "gw1", 2e6, latency=0.001)
        rec = Recorder()
        net = Network(env, g, recorder=rec)
        log = []
        for d in range(12):
            env.process(sender(env, net, log, f"up{d}", f"d{d}", "cloud", 1e5 * (d + 1), at=0.01 * (d % 5)))
            env.process(sender(env, net, log, f"down{d}", "cloud", f"d{d}", 3e4 * (d + 2), at=0.013 * (d % 3)))
        net.schedule_link_failure("gw0", "cloud", 0.2, 0.9)
        env.process(crash_at(env, net, "d5", 0.3))
        env.run()
        return log, rec.lists["transfer"]

    def crash_at(env, net, node, t):
        yield env.timeout(t)
        net.abort_flows(node)

    first = run()
    assert run() == first
    assert sum(1 for e in first[0] if e[1] == "aborted") == 2


# -- max-min allocation: reference vs fast -------------------------------------------------------------

def assert_max_min(flow_links, capacity, rates, tol=1e-9):
    """The definition: feasible, and every flow has a full link on which no flow gets more."""
    load = {}
    for links, r in zip(flow_links, rates):
        for link in links:
            load[link] = load.get(link, 0.0) + r
    for link, x in load.items():
        assert x <= capacity[link] * (1 + tol)
    for links, r in zip(flow_links, rates):
        assert any(load[l] >= capacity[l] * (1 - tol)
                   and all(r2 <= r * (1 + tol) for l2, r2 in zip(flow_links, rates) if l in l2)
                   for l in links)


def test_maxmin_reference_small_cases():
    cap = {"acc": 10.0, "shared": 100.0, "b": 1000.0}
    assert maxmin_reference([["acc", "shared"], ["b", "shared"]], cap) == [10.0, 90.0]
    assert maxmin_fast([["acc", "shared"], ["b", "shared"]], cap) == [10.0, 90.0]
    assert maxmin_reference([[], ["b"]], cap) == [math.inf, 1000.0]


@st.composite
def incidence(draw):
    n_links = draw(st.integers(1, 8))
    capacity = {l: draw(st.floats(1.0, 1e9)) for l in range(n_links)}
    n_flows = draw(st.integers(1, 30))
    flow_links = [draw(st.lists(st.integers(0, n_links - 1), min_size=1, max_size=4, unique=True))
                  for _ in range(n_flows)]
    return flow_links, capacity


@settings(max_examples=60, deadline=None, database=None)
@given(incidence())
def test_fast_and_reference_maxmin_agree_and_are_max_min(case):
    flow_links, capacity = case
    ref = maxmin_reference(flow_links, capacity)
    fast = maxmin_fast(flow_links, capacity)
    assert fast == pytest.approx(ref, rel=1e-9)
    assert_max_min(flow_links, capacity, ref)


# -- whole-network properties -------------------------------------------------------------------------------

class CheckedNetwork(Network):
    """Uses the numpy allocation for every component and checks it against the reference each time."""

    _NUMPY_MIN_FLOWS = 1

    def _rates(self, flows):
        fast = super()._rates(flows)
        ref = maxmin_reference([f._li for f in flows], self._cap)
        assert fast == pytest.approx(ref, rel=1e-9)
        return fast


@st.composite
def scenario(draw):
    n = draw(st.integers(2, 7))
    links = [(draw(st.integers(0, i - 1)), i) for i in range(1, n)]   # a random spanning tree
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=5))
    links += [(u, v) for u, v in extra if u != v]
    bw = st.sampled_from([1e6, 2e6, 5e6, 8e6, 1e7, 3.3e7]) | st.floats(1e5, 1e8)    # ties and not
    lat = st.sampled_from([0.0, 0.001, 0.005, 0.02]) | st.floats(0.0, 0.05)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for u, v in links:
        g.add_edge(u, v, bandwidth_bps=draw(bw), latency_s=(ls := draw(lat)))
        g.add_edge(v, u, bandwidth_bps=draw(bw), latency_s=ls)
    pair = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
    flows = draw(st.lists(st.tuples(pair, st.floats(0.0, 2e6), st.floats(0.0, 2.0)), min_size=1, max_size=16))
    failure = draw(st.none() | st.tuples(st.sampled_from(sorted(g.edges)), st.floats(0.0, 2.0),
                                         st.floats(0.0, 2.0)))
    checked = draw(st.booleans())
    return g, flows, failure, checked


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_random_networks_respect_capacity_deliver_every_byte_once_and_finish(case):
    g, flows, failure, checked = case
    env = simpy.Environment()
    rec = Recorder()
    net = (CheckedNetwork if checked else Network)(env, g, recorder=rec)
    delivered = []

    def send(i, src, dst, nbytes, at):
        yield env.timeout(at)
        flow = yield net.transfer(src, dst, nbytes, tag=str(i))
        delivered.append((i, flow))

    for i, ((src, dst), nbytes, at) in enumerate(flows):
        env.process(send(i, src, dst, nbytes, at))
    if failure is not None:
        (u, v), down, length = failure
        net.schedule_link_failure(u, v, down, down + length)
    env.run(until=1e6)

    assert sorted(i for i, _ in delivered) == list(range(len(flows)))          # each flow, exactly once
    assert all(f.status == "delivered" and f.remaining == 0 for _, f in delivered)
    assert net.open_flows == [] and net.active_flows == []
    records = rec.lists["transfer"]
    assert sorted(r.flow for r in records) == list(range(len(flows)))
    assert sum(r.nbytes for r in records) == pytest.approx(sum(nb for _, nb, _ in flows), rel=1e-12)
    stats = net.stats
    assert stats.max_utilisation <= 1 + 1e-9
    assert stats.delivered == len(flows) and stats.dropped == 0
    max_cap = max(d["bandwidth_bps"] for _, _, d in g.edges(data=True))
    for _, f in delivered:
        assert f.start <= f.data_start <= f.end
        assert f.end - f.data_start >= f.nbytes * 8 / max_cap * (1 - 1e-9) - 1e-12 * f.end   # time ulps
    if failure is None:
        # no reroutes: every delivered byte crossed each edge of its path exactly once
        expected = {}
        for _, f in delivered:
            for e in f.links:
                expected[e] = expected.get(e, 0.0) + f.nbytes
        for e, b in stats.link_bytes.items():
            assert b == pytest.approx(expected.get(e, 0.0), rel=1e-9, abs=1e-6)


# -- the fast paths are exact: same floats as the reference, same records ---------------------------------

@st.composite
def incidence_with_ties(draw):
    """Like ``incidence``, plus capacities from a small set (ties, levels that coincide), edges listed
    twice by one flow, and flows with no edge."""
    n_links = draw(st.integers(1, 8))
    cap_value = st.sampled_from([1.0, 3.0, 10.0, 1e6, 1e7, 3.3e7, 0.1, 0.7]) | st.floats(1e-3, 1e9)
    capacity = {l: draw(cap_value) for l in range(n_links)}
    n_flows = draw(st.integers(1, 30))
    link = st.integers(0, n_links - 1)
    flow_links = [draw(st.lists(link, min_size=draw(st.sampled_from([0, 1, 1])), max_size=4))
                  for _ in range(n_flows)]
    if all(not links for links in flow_links):
        flow_links[0] = [0]
    return flow_links, capacity


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(incidence(), incidence_with_ties()))
def test_maxmin_rounds_equals_the_reference_to_the_bit(case):
    flow_links, capacity = case
    ref = maxmin_reference(flow_links, capacity)
    assert maxmin_rounds(flow_links, capacity) == ref   # ==, not approx: the same floating-point operations


class PlainNetwork(Network):
    """The network with its shortcuts replaced by their plain statements: every small component shared by
    :func:`maxmin_reference` (utilisation summed as the reference path always did), every flow checked
    for being done at every recomputation, every delivery scheduled as an event (a chained send
    starts from its delivery's callback), and every latency phase its own timeout. Runs must agree with
    :class:`Network` to the bit."""

    inline_delivery = False
    batch_events = False

    def _share_small(self, keep, links, inc, now):
        cap = self._cap
        rates = maxmin_reference([f._li for f in keep], cap)
        load = {}
        for f, r in zip(keep, rates):
            for li in f._li:
                load[li] = load.get(li, 0.0) + r
        self._max_util = max(self._max_util, max(x / cap[li] for li, x in load.items()))
        self._assign(keep, rates, now)

    def _assign(self, keep, rates, now):
        super()._assign(keep, rates, now)
        for f in keep:
            f._due = -math.inf


def run_logged(net_cls, g, flows, failure, extra):
    """Run a scenario on a fresh network of ``net_cls``; everything observable, for exact comparison."""
    env = simpy.Environment()
    rec = Recorder()
    meters = {v: EnergyMeter(env, idle_w=0.5, compute_w=1.0, tx_w=2.0, rx_w=1.5) for v in list(g.nodes)[::2]}
    net = net_cls(env, g, recorder=rec, meters=meters)
    log = []

    def send(i, src, dst, nbytes, at, chain):
        yield env.timeout(at)
        for c in range(chain + 1):
            try:
                flow = yield net.transfer(src, dst, nbytes, tag=f"{i}.{c}")
            except TransferAborted as exc:
                log.append(("aborted", i, c, env.now, exc.flow.remaining))
                return
            log.append(("done", i, c, env.now, flow.data_start, flow.path))
            src, dst = dst, src

    for i, ((src, dst), nbytes, at, chain) in enumerate(flows):
        env.process(send(i, src, dst, nbytes, at, chain))
    if failure is not None:
        (u, v), down, length = failure
        net.schedule_link_failure(u, v, down, down + length)

    def poke(kind, at, arg):
        yield env.timeout(at)
        if kind == "abort":
            log.append(("abort", env.now, [f.id for f in net.abort_flows(arg)]))
        elif kind == "cap":
            u, v, bps = arg
            net.set_capacity(u, v, bps)
        else:
            st_ = net.stats
            log.append(("probe", env.now, [(f.id, f.rate) for f in net.active_flows], st_.max_utilisation,
                        st_.recomputations))

    for kind, at, arg in extra:
        env.process(poke(kind, at, arg))
    env.run(until=1e6)
    st_ = net.stats
    return (log, [tuple(r) for r in rec.lists["transfer"]], sorted(st_.link_bytes.items()), st_.max_utilisation,
            st_.recomputations, {k: sorted(m.snapshot().items()) for k, m in meters.items()})


@st.composite
def exact_scenario(draw):
    g, _, failure, _ = draw(scenario())
    n = g.number_of_nodes()
    if draw(st.booleans()):   # round rates (1 MB/s and multiples): transfers end on round times
        for u, v in sorted(g.edges):
            g.edges[u, v]["bandwidth_bps"] = draw(st.sampled_from([MBPS / 2, MBPS, MBPS, 2 * MBPS]))
            g.edges[u, v]["latency_s"] = draw(st.sampled_from([0.0, 0.0, 0.125]))
    # start times and sizes from small sets: many flows start, and end, at the same instants, or
    # within rounding of each other (where "done up to rounding" decides)
    near = st.sampled_from([0.0, 0.0, 1e-15, -1e-15, 1e-12, -1e-12, 1e-10, -1e-10, 1e-9, -1e-9, 5e-9])
    at = (st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 2.0)
          | st.builds(lambda t, e: max(0.0, t * (1 + e)), st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0]), near))
    size = (st.sampled_from([0.0, 1.25e5, 5e5, 1e6, 2e6]) | st.floats(0.0, 2e6)
            | st.builds(lambda b, e: b * (1 + e), st.sampled_from([5e5, 1e6]), near))
    pair = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
    flows = draw(st.lists(st.tuples(pair, size, at, st.integers(0, 2)), min_size=1, max_size=30))
    edges = sorted(g.edges)
    extra = draw(st.lists(st.one_of(
        st.tuples(st.just("abort"), at, st.integers(0, n - 1)),
        st.tuples(st.just("cap"), at, st.tuples(*[st.just(x) for x in edges[0]], st.sampled_from([1e6, 8e6]))),
        st.tuples(st.just("probe"), at, st.none())), max_size=4))
    return g, flows, failure, extra


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(exact_scenario())
def test_fast_paths_give_the_same_run_as_the_plain_statements_to_the_bit(case):
    g, flows, failure, extra = case
    fast = run_logged(Network, g, flows, failure, extra)
    plain = run_logged(PlainNetwork, g, flows, failure, extra)
    assert fast == plain


def test_a_flow_within_rounding_of_done_ends_when_its_neighbour_does(env, log):
    # two flows share 1 MB/s; the second is 1e-10 bigger: when the first ends at 1.0 the second has
    # 5e-5 B left (< 1e-9 of its size), so it ends then too instead of lingering 5e-11 s
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS)
    rec = Recorder()
    net = Network(env, g, recorder=rec)
    env.process(sender(env, net, log, "A", "a", "b", 0.5 * MB))
    env.process(sender(env, net, log, "B", "a", "b", 0.5 * MB * (1 + 1e-10)))
    env.run()
    assert log == [("A", "done", 1.0), ("B", "done", 1.0)]
    assert [r.end for r in rec.lists["transfer"]] == [1.0, 1.0]
    assert net.stats.link_bytes[("a", "b")] == pytest.approx(MB, rel=1e-9)


def test_a_flow_joining_the_second_hop_of_a_lone_flow_re_shares_it(env, log):
    # a -> r -> b: a->r 2 MB/s, r->b 1 MB/s (the lone flow's bottleneck); c -> r -> b joins r->b at 1.0
    g = nx.DiGraph()
    duplex(g, "a", "r", 2 * MBPS)
    duplex(g, "c", "r", 2 * MBPS)
    duplex(g, "r", "b", MBPS)
    net = Network(env, g)
    env.process(sender(env, net, log, "lone", "a", "b", 2 * MB))           # alone at 1 MB/s from 0
    env.process(sender(env, net, log, "joins", "c", "b", 0.5 * MB, at=1.0))  # 1 MB left of lone at 1.0
    env.run(until=1.5)
    assert [f.rate for f in net.active_flows] == approx([MBPS / 2, MBPS / 2])
    env.run()
    # from 1.0 both at 0.5 MB/s: joins ends at 2.0; lone has 0.5 MB left then, alone again: ends at 2.5
    assert log == approx([("joins", "done", 2.0), ("lone", "done", 2.5)])
    assert net.stats.link_bytes[("r", "b")] == pytest.approx(2.5 * MB)


def test_abort_flows_finds_every_flow_from_or_to_the_node_in_request_order(env):
    g = nx.DiGraph()
    for d in ["x", "y", "z"]:
        duplex(g, d, "hub", MBPS, latency=0.1)
    net = Network(env, g)
    events = [net.transfer(src, dst, MB) for src, dst in
              [("x", "y"), ("y", "x"), ("z", "x"), ("y", "z"), ("x", "z"), ("z", "y"), ("x", "hub")]]
    for ev in events:
        ev.defused = True
    env.run(until=0.05)
    assert [f.id for f in net.abort_flows("x")] == [0, 1, 2, 4, 6]
    assert net.abort_flows("x") == []
    assert [f.id for f in net.abort_flows("y")] == [3, 5]
    assert net.open_flows == [] and net.abort_flows("hub") == [] and net.abort_flows("nowhere") == []


def brute_force_route(g: nx.DiGraph, src, dst, down=()):
    """Every simple path, the smallest key (exact latency, hops, node sequence in node order)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    best = None
    for path in nx.all_simple_paths(g, src, dst):
        edges = list(itertools.pairwise(path))
        if any(e in down for e in edges):
            continue
        key = (sum(Fraction(g.edges[e]["latency_s"]) for e in edges), len(edges), [order[n] for n in path])
        if best is None or key < best[0]:
            best = (key, tuple(path))
    return None if best is None else best[1]


@st.composite
def chain_graph(draw):
    """Random small graphs with chains of nodes that have one edge out or in (forced hops)."""
    n = draw(st.integers(2, 7))
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    lat = st.sampled_from([0.0, 0.001, 0.002, 0.003]) | st.floats(0.0, 0.01)
    for i in range(1, n):
        u = draw(st.integers(0, i - 1))
        g.add_edge(u, i, bandwidth_bps=MBPS, latency_s=draw(lat))
        if draw(st.booleans()):
            g.add_edge(i, u, bandwidth_bps=MBPS, latency_s=draw(lat))
    for _ in range(draw(st.integers(0, 4))):
        u, v = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        if u != v:
            g.add_edge(u, v, bandwidth_bps=MBPS, latency_s=draw(lat))
    down = draw(st.lists(st.sampled_from(sorted(g.edges)), max_size=2)) if draw(st.booleans()) else []
    return g, down


@settings(max_examples=150, deadline=None, database=None)
@given(chain_graph())
def test_routes_are_the_smallest_key_over_all_simple_paths(case):
    g, down = case
    net = Network(simpy.Environment(), g)
    down_set = set()
    for u, v in down:   # the link, both directions
        net.link_down(u, v)
        down_set |= {(u, v), (v, u)}
    for a in g.nodes:
        for b in g.nodes:
            if a == b:
                continue
            expected = brute_force_route(g, a, b, down_set)
            if expected is None:
                with pytest.raises(TopologyError):
                    net.route(a, b)
            else:
                assert net.route(a, b) == expected
                lat = sum(g.edges[e]["latency_s"] for e in itertools.pairwise(expected))
                assert net.path_latency(a, b) == pytest.approx(lat, rel=1e-12, abs=1e-15)


# -- the local join/leave update -------------------------------------------------------------------------

class RecomputingNetwork(Network):
    """Every join and end recomputes its component (the local update switched off)."""

    incremental = False


class ProbedNetwork(Network):
    """After every local update, checks that the rates of *all* active flows are max-min (the
    reference, computed from scratch, to 1e-9): the shortcut never leaves a wrong allocation behind."""

    local_updates = 0

    def _check(self):
        flows = [f for f in self._open.values() if f.status == "active"]
        ref = maxmin_reference([f._li for f in flows], self._cap)
        assert [f.rate for f in flows] == pytest.approx(ref, rel=1e-9)
        load = [0.0] * len(self._cap)   # and the running loads are the sums of the rates
        for f in flows:
            for li in f._li:
                load[li] += f.rate
        for li, (mine, exact) in enumerate(zip(self._lload, load)):
            assert mine == pytest.approx(exact, rel=1e-9, abs=1e-9 * self._cap[li])
        type(self).local_updates += 1

    def _join_local(self, f, route):
        ok = super()._join_local(f, route)
        if ok:
            self._check()
        return ok

    def _on_timer(self, ev):
        before = self._recomputations
        super()._on_timer(ev)
        if not self._pending and not self._dirty and self._recomputations == before:
            self._check()


def test_lone_flows_join_and_end_without_a_recomputation(env, log):
    # two devices on their own 1 MB/s access edges into a 10 MB/s shared edge: nobody is ever
    # bottlenecked on the shared one, so no join or end changes another flow's rate
    g = nx.DiGraph()
    for d in ("a", "b"):
        duplex(g, d, "gw", MBPS)
    duplex(g, "gw", "cloud", 10 * MBPS)
    net = Network(env, g)
    env.process(sender(env, net, log, "a", "a", "cloud", 2 * MB))
    env.process(sender(env, net, log, "b", "b", "cloud", 1 * MB, at=0.5))
    env.run()
    assert log == [("b", "done", 1.5), ("a", "done", 2.0)]
    assert net.stats.recomputations == 0
    assert net.stats.max_utilisation == 1.0


def test_finish_times_made_stale_by_rate_changes_are_dropped_in_bulk(env, log):
    # 300 flows of 1 MB join one 1 MB/s edge 10 ms apart: every join re-rates every active flow,
    # leaving its old finish time behind in the heap (~45,000 such entries by the end). The heap
    # must stay within its bound (4 x active flows + 256, plus the entries pushed since the last
    # clean-up), and the completions must be processor sharing's, computed here exactly.
    n, gap = 300, Fraction(1, 100)
    g = nx.DiGraph()
    duplex(g, "a", "b", MBPS)
    net = Network(env, g)
    for i in range(n):
        env.process(sender(env, net, log, i, "a", "b", 1 * MB, at=float(i * gap)))
    sizes = []

    def probe():
        while net.stats.delivered < n:
            sizes.append((len(net._heap), sum(f.status == "active" for f in net.active_flows)))
            yield env.timeout(0.05)

    env.process(probe())
    env.run(until=400)   # (the last flow ends at ~300 s)
    # exact processor sharing: k flows share 1 MB/s, so each gets 1/k MB/s
    left, t, ends, nxt = {}, Fraction(0), {}, 0
    while len(ends) < n:
        arrive = nxt * gap if nxt < n else None
        k = len(left)
        finish = t + min(left.values()) * k if k else None
        if arrive is not None and (finish is None or arrive < finish):
            for j in left:
                left[j] -= (arrive - t) / k
            t, left[nxt] = arrive, Fraction(1)
            nxt += 1
        else:
            for j in left:
                left[j] -= (finish - t) / k
            t = finish
            for j in [j for j, b in left.items() if b == 0]:
                ends[j] = t
                del left[j]
    assert [(name, ev) for name, ev, _ in log] == [(i, "done") for i in range(n)]
    assert [t for *_, t in log] == [pytest.approx(float(ends[i]), rel=1e-9) for i in range(n)]
    assert max(active for _, active in sizes) > 100
    assert all(h <= 5 * a + 256 for h, a in sizes), max(sizes)


def test_a_join_that_takes_capacity_from_others_still_recomputes(env, log):
    duplex_g = nx.DiGraph()
    duplex(duplex_g, "a", "b", MBPS)
    net = Network(env, duplex_g)
    env.process(sender(env, net, log, "1", "a", "b", 1 * MB))
    env.process(sender(env, net, log, "2", "a", "b", 1 * MB, at=0.5))
    env.run()
    # flow 1 alone for 0.5 s (0.5 MB), then both at 0.5 MB/s: 1 ends at 1.5, 2 has 0.5 MB left, alone: 2.0
    assert log == [("1", "done", 1.5), ("2", "done", 2.0)]
    assert net.stats.recomputations >= 2


@settings(max_examples=int(os.environ.get("SIMKIT_EXAMPLES", 100)), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(exact_scenario())
def test_local_updates_equal_the_full_recomputation_up_to_rounding(case):
    g, flows, failure, extra = case
    ProbedNetwork.local_updates = 0
    local = run_logged(ProbedNetwork, g, flows, failure, extra)
    full = run_logged(RecomputingNetwork, g, flows, failure, extra)

    def by_flow(log):
        return {e[1:3]: e for e in log[0] if e[0] in ("done", "aborted")}

    a, b = by_flow(local), by_flow(full)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        # end time (and data start / path, or bytes left when aborted) within rounding
        assert approx(a[k][3:]) == b[k][3:] if a[k][0] == "done" else a[k][3] == pytest.approx(b[k][3], rel=1e-9)
    # transfer records, by tag: same flows, times within rounding (ids follow request order, which
    # may differ between transfers requested at the same instant)
    ta, tb = sorted(local[1], key=lambda r: r[7]), sorted(full[1], key=lambda r: r[7])
    assert [r[1:4] + r[7:] for r in ta] == [r[1:4] + r[7:] for r in tb]
    assert [r[4:7] for r in ta] == [approx(r[4:7]) for r in tb]   # start (chained), data start, end
    assert [k for k, _ in local[2]] == [k for k, _ in full[2]]
    assert [v for _, v in local[2]] == pytest.approx([v for _, v in full[2]], rel=1e-9, abs=1e-6)
    # peak utilisation: never over capacity; the local update may also count an allocation that
    # lasted no time (a flow that joined and was aborted at the same instant), which the coalesced
    # recomputation never computed
    assert full[3] <= local[3] * (1 + 1e-9) and local[3] <= 1 + 1e-9
    assert local[4] <= full[4]   # never more recomputations
    for node in local[5]:
        assert [k for k, _ in local[5][node]] == [k for k, _ in full[5][node]]
        assert [v for _, v in local[5][node]] == pytest.approx([v for _, v in full[5][node]], rel=1e-9, abs=1e-9)


def test_finished_flows_and_their_events_leave_no_reference_cycles(env, log):
    # a fired transfer event's value is its flow: the flow must let go of the event, or every
    # transfer leaves a cycle that only the garbage collector frees (a large share of host time
    # in big runs). Delivered, instant (same node) and aborted flows alike.
    import gc

    g = nx.DiGraph()
    duplex(g, "a", "hub", MBPS, latency=0.01)
    duplex(g, "b", "hub", MBPS, latency=0.01)
    net = Network(env, g)
    for i in range(20):
        env.process(sender(env, net, log, f"s{i}", "a", "b", 0.1 * MB, at=0.05 * i))
    env.process(sender(env, net, log, "self", "a", "a", MB))
    env.process(sender(env, net, log, "doomed", "b", "a", 10 * MB, at=0.2))

    def crash_b():
        yield env.timeout(0.5)
        net.abort_flows("b")

    env.process(crash_b())
    gc.collect()
    gc.disable()
    try:
        env.run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, (Flow, simpy.Event))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ("doomed", "aborted") in [entry[:2] for entry in log] and len(log) == 22   # all three kinds ran
    assert cyclic == []
