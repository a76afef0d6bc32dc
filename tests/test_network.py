"""Flow-level network: hand-computed timelines (STYLE.md #22) and property tests of the sharing.

Units in the timelines: a bandwidth of 8e6 bit/s moves 1e6 bytes (1 MB) per second.
"""

from __future__ import annotations

import math

import networkx as nx
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit.errors import TopologyError
from simkit.records import Recorder
from simkit.world.energy import EnergyMeter
from simkit.world.network import Network, TransferAborted, maxmin_fast, maxmin_reference

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
