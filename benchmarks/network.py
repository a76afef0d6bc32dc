"""Benchmark of the flow-level network (not a test): ``python -m benchmarks.network [--quick] [--json FILE]``.

Two-tier topology built inline: N devices, each with its own access link (10 Mb/s up, 50 Mb/s
down, 2 ms) to one of ceil(N/100) gateways; each gateway has 1 Gb/s both ways (5 ms) to one cloud
server. Every device uploads 1 MB, either all at t=0 ("burst") or at start times spread uniformly
over 10 s ("staggered", seeded). Host time is measured around ``env.run()`` only (building the
graph and the Network is excluded), under :func:`simkit.run.simulation_gc` (the garbage-collector
settings every simkit run uses); the simulated results never depend on it.

Devices are named by the graph's own node objects, as simkit's devices do (``Device.node`` is the
topology graph's node): a dict lookup by an equal copy of the string also compares the two
strings' bytes, touching one more object per lookup (``run_case(..., graph_names=False)``; paired
at 10,000 devices, warm: the graph's own names took 0.81x the host time per flow staggered, 0.98x
burst, on 2026-12-02, a very noisy hour).

Two harnesses start the flows:

- ``driver`` (the headline): one SimPy process walks the start times in order and calls
  ``Network.transfer`` for each flow, collecting completions with a callback on the flow's event,
  so what is measured is the network model plus one event per flow (its completion) and one
  timeout per distinct start time;
- ``process``: one SimPy process per flow (wait for the start, transfer, wait for the event), as a
  simkit client does: adds a process start, a generator and two more events per flow, which is
  SimPy's cost, not the network's (the stub floor of this harness alone is ~0.05-0.1).

Host time is this process's CPU time (``time.process_time``), not wall time: on a shared machine
other processes stretch wall time but not the CPU time the simulation itself uses, and the run is
single-threaded, so on an idle machine the two are the same.

Reported per case, min/median/max over the repetitions:
    events/s    simulated events (everything SimPy scheduled) per host second
    us/flow     host microseconds per simulated flow
    ratio       (flows per host second) / (bare SimPy timeouts per host second), the latter
                measured right before each repetition by a loop of 3e5 ``yield env.timeout(1)``
                (paired: the VM's speed drifts by 10-20 % over minutes): how many bare timeouts
                one simulated flow costs, inverted; min/median/max over the repetitions
    floor       the same ratio with the network replaced by a stub that answers each transfer
                with one timeout of the flow's duration (same harness, events per transfer and
                garbage): what SimPy and the harness cost, an upper bound no network can reach

"isolated transfers": 2 devices on a star, one process sending 20,000 transfers of 32 KB one
after the other (each waits for the previous), so every flow is alone on its path: host
microseconds per transfer (latency phase + data phase), next to host microseconds per bare
``env.timeout`` of the same run.

``--working-set`` runs, instead, the staggered case at 10,000 devices against variants that change
only the fleet's size or the number of flows in flight at once (:func:`working_set`): what the
headline figure depends on, with the algorithm fixed.

``--json FILE`` writes ``{"network_flow_rate_ratio": <the smaller of the burst and staggered
ratios at the largest N, driver harness>, "isolated_transfer_us": <median us per isolated
transfer>}`` (plus the context figures).
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time

import networkx as nx
import simpy

from benchmarks import parser, write_json
from simkit.run import simulation_gc
from simkit.world.network import Network

UP_BPS, DOWN_BPS, ACCESS_LAT = 10e6, 50e6, 0.002
BACKHAUL_BPS, BACKHAUL_LAT = 1e9, 0.005
FLOW_BYTES = 1e6
PER_GATEWAY = 100
ISO_TRANSFERS, ISO_BYTES = 20_000, 32 * 1024
PAIRED_TIMEOUTS = 300_000   # bare timeouts measured right before each repetition of a case
SPREAD_S = 10.0             # staggered starts: uniform over this many seconds
SOLO_S = BACKHAUL_LAT + ACCESS_LAT + FLOW_BYTES * 8 / UP_BPS   # an upload alone on its path: 0.807 s

clock = time.process_time


def two_tier(n: int) -> nx.DiGraph:
    g = nx.DiGraph()
    for k in range(math.ceil(n / PER_GATEWAY)):
        gw = f"gw{k}"
        g.add_edge(gw, "cloud", bandwidth_bps=BACKHAUL_BPS, latency_s=BACKHAUL_LAT)
        g.add_edge("cloud", gw, bandwidth_bps=BACKHAUL_BPS, latency_s=BACKHAUL_LAT)
    for i in range(n):
        d, gw = f"d{i}", f"gw{i // PER_GATEWAY}"
        g.add_edge(d, gw, bandwidth_bps=UP_BPS, latency_s=ACCESS_LAT)
        g.add_edge(gw, d, bandwidth_bps=DOWN_BPS, latency_s=ACCESS_LAT)
    return g


def upload(env: simpy.Environment, net: Network, device: str, at: float, done: list):
    if at > 0:
        yield env.timeout(at)
    flow = yield net.transfer(device, "cloud", FLOW_BYTES, tag="upload")
    done.append(flow.end)


class _StubFlow:
    __slots__ = ("end",)

    def __init__(self, end: float):
        self.end = end


class StubNetwork:
    """The floor: each transfer is an event that one timeout of the flow's alone-on-its-path
    duration succeeds (no sharing, no routing). Same processes and events per transfer as the
    real network's latency timeout and transfer event."""

    def __init__(self, env: simpy.Environment, graph: nx.DiGraph):
        self.env = env
        self.duration = SOLO_S

    def transfer(self, src, dst, nbytes, *, tag=""):
        env = self.env
        ev = env.event()
        env.timeout(self.duration).callbacks.append(lambda _t: ev.succeed(_StubFlow(env.now)))
        return ev


def run_case(n: int, staggered: bool, seed: int = 0, network=Network, harness: str = "driver",
             warm: bool = False, graph_names: bool = True, spread: float = SPREAD_S,
             senders: int | None = None) -> tuple[float, int, float]:
    """One run: (host seconds, events scheduled, simulated makespan) of the timed pass.

    ``warm``: the same uploads run once before, untimed, on the same network, so the timed pass
    finds every route in the cache (a later round of a many-round run; routes are computed on a
    device's first transfer, ~2-3 us each here). ``spread``: staggered starts are uniform over
    ``[0, spread)`` seconds. ``senders``: only that many of the ``n`` devices (a seeded sample)
    upload; default all. Host seconds are for the uploads made, so divide by ``senders``."""
    g = two_tier(n)
    env = simpy.Environment()
    net = network(env, g)
    rng = random.Random(seed)
    used = range(n) if senders is None else sorted(random.Random(seed + 1).sample(range(n), senders))
    names = [f"d{i}" for i in used]
    n = len(names)
    starts = [rng.uniform(0.0, spread) if staggered else 0.0 for _ in range(n)]
    if graph_names:   # the graph's own node objects, as simkit's devices pass them (Device.node)
        own = {v: v for v in g}
        names = [own[v] for v in names]
    done: list[float] = []

    def start_pass(t0: float):
        if harness == "process":
            for i in range(n):
                env.process(upload(env, net, names[i], t0 - env.now + starts[i], done))
            return
        order = sorted(range(n), key=starts.__getitem__)

        def finished(ev):
            done.append(ev._value.end)

        def driver():
            for i in order:
                at = t0 + starts[i]
                if at > env.now:
                    yield env.timeout(at - env.now)
                net.transfer(names[i], "cloud", FLOW_BYTES, tag="upload").callbacks.append(finished)

        env.process(driver())

    if warm:
        start_pass(0.0)
        env.run()
        done.clear()
    t_begin = env.now
    e_begin = next(env._eid)
    with simulation_gc():   # as every simkit run: frozen start heap, generation 0 every 100k allocations
        t0 = clock()
        start_pass(t_begin)
        env.run()
        host = clock() - t0
    assert len(done) == n
    events = next(env._eid) - e_begin - 1  # SimPy's insertion counter: how many events were scheduled
    return host, events, max(done) - t_begin


def raw_timeouts(n: int = 1_000_000, clock=clock) -> float:
    """Bare SimPy throughput: timeouts per host second for one process yielding ``n`` timeouts
    (host time read with ``clock``: CPU time by default, ``time.perf_counter`` for wall time)."""
    env = simpy.Environment()

    def loop():
        for _ in range(n):
            yield env.timeout(1)

    env.process(loop())
    t0 = clock()
    env.run()
    return n / (clock() - t0)


def isolated_transfers(n: int = ISO_TRANSFERS, network=Network) -> float:
    """Host microseconds per transfer for ``n`` sequential 32 KB transfers between two devices of a star."""
    g = nx.DiGraph()
    for d in ("a", "b"):
        g.add_edge(d, "hub", bandwidth_bps=UP_BPS, latency_s=ACCESS_LAT)
        g.add_edge("hub", d, bandwidth_bps=DOWN_BPS, latency_s=ACCESS_LAT)
    env = simpy.Environment()
    net = network(env, g)
    done = []

    def sender():
        for _ in range(n):
            flow = yield net.transfer("a", "b", ISO_BYTES, tag="act")
        done.append(flow.end)

    env.process(sender())
    gc.collect()
    t0 = clock()
    env.run()
    host = clock() - t0
    # each transfer alone: 2 x 2 ms latency + 32 KB at 10 Mb/s (the a -> hub edge is the bottleneck)
    assert math.isclose(done[0], n * (2 * ACCESS_LAT + ISO_BYTES * 8 / UP_BPS), rel_tol=1e-9)
    return host / n * 1e6


WORKING_SET_CASES = (   # (devices in the graph, devices that upload, spread of the starts in s)
    (1_000, 1_000, SPREAD_S),
    (10_000, 10_000, 10 * SPREAD_S),
    (10_000, 1_000, SPREAD_S),
    (10_000, 10_000, SPREAD_S),
)


def working_set(reps: int) -> dict:
    """What the staggered figure depends on, with the algorithm fixed (``--working-set``).

    The staggered case at 10,000 devices (driver harness, warm), against variants that change one
    thing: fewer devices in the graph, a ten times longer spread of the starts (a tenth of the
    flows in flight at once: each is alone on its path for ``SOLO_S`` = 0.807 s, so about
    ``senders x SOLO_S / spread`` are in flight), or only 1,000 of the 10,000 devices uploading.
    Each case runs the real network and the stub, in alternation over ``reps`` rounds (order
    reversed every other round); ``network`` is the median host microseconds per flow of the real
    one minus the stub's: the network model's own cost per flow."""
    res: dict[tuple, tuple[list, list]] = {c: ([], []) for c in WORKING_SET_CASES}   # real, stub us/flow
    for rep in range(reps):
        cases = WORKING_SET_CASES if rep % 2 == 0 else WORKING_SET_CASES[::-1]
        for case in cases:
            n, senders, spread = case
            for net, out in zip((Network, StubNetwork), res[case]):
                h = run_case(n, True, network=net, warm=True, spread=spread, senders=senders)[0]
                out.append(h / senders * 1e6)
    print(f"{'devices':>8} {'senders':>8} {'spread s':>9} {'in flight':>10} {'us/flow':>8} {'stub':>6} {'network':>8}")
    out = {}
    for (n, senders, spread), (real, stub) in res.items():
        r, st = statistics.median(real), statistics.median(stub)
        in_flight = senders * SOLO_S / spread
        print(f"{n:>8,} {senders:>8,} {spread:>9g} {in_flight:>10,.0f} {r:>8.2f} {st:>6.2f} {r - st:>8.2f}")
        out[f"working_set_network_us_{n}_{senders}_{spread:g}s"] = r - st
    return out


def fmt3(values: list[float], spec: str) -> str:
    return "/".join(format(v, spec) for v in (min(values), statistics.median(values), max(values)))


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, reps=3, quick="N = 100 and 1,000 only (well under a minute)")
    ap.add_argument("--working-set", action="store_true",
                    help="instead: the staggered case's cost against fleet size and flows in flight (see working_set)")
    args = ap.parse_args(argv)
    if args.working_set:
        run_case(1_000, True)   # warm up
        return write_json(args.json, working_set(args.reps))
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]

    run_case(100, False)  # warm up (imports, numpy's first calls) outside the measurements
    run_case(100, True)
    isolated_transfers(1000)
    raw = [raw_timeouts() for _ in range(args.reps)]
    iso = [isolated_transfers() for _ in range(args.reps)]
    raw_us = [1e6 / r for r in raw]
    print(f"raw SimPy: {fmt3(raw, ',.0f')} timeouts/s (min/median/max of {args.reps}, 1e6 bare timeouts each)")
    print(f"isolated transfers ({ISO_TRANSFERS:,} x {ISO_BYTES // 1024} KB, one at a time): "
          f"{fmt3(iso, '.2f')} us/transfer (min/median/max of {args.reps}); "
          f"bare env.timeout: {fmt3(raw_us, '.3f')} us "
          f"(= {statistics.median(iso) / statistics.median(raw_us):.1f} bare timeouts per transfer)")
    print()
    head = (f"{'harness':<12} {'case':<10} {'N':>6} {'events':>7} {'makespan s':>10} {'events/s (min/med/max)':>26} "
            f"{'us/flow (min/med/max)':>24} {'flows/s / raw (min/med/max)':>22} {'floor':>7}")
    print(head)
    print("-" * len(head))
    ratios: dict[tuple[str, bool, int], float] = {}
    for harness, warm in (("driver", True), ("driver", False), ("process", False)):
        label = f"{harness}{'/warm' if warm else ''}"
        for staggered in (False, True):
            for n in sizes:
                hosts, reps_ratio, reps_floor, events, makespan = [], [], [], None, None
                for rep in range(args.reps):
                    # each repetition pairs its own bare-SimPy rate with the case (the VM's speed drifts
                    # by 10-20 % over minutes; a rate measured once at the start would not match)
                    raw_now = raw_timeouts(PAIRED_TIMEOUTS)
                    h, ev, ms = run_case(n, staggered, harness=harness, warm=warm)
                    stub_h = run_case(n, staggered, network=StubNetwork, harness=harness, warm=warm)[0]
                    hosts.append(h)
                    reps_ratio.append(n / h / raw_now)
                    reps_floor.append(n / stub_h / raw_now)
                    events, makespan = ev, ms
                eps = [events / h for h in hosts]
                us = [h / n * 1e6 for h in hosts]
                ratio = statistics.median(reps_ratio)
                floor = statistics.median(reps_floor)
                ratios[(label, staggered, n)] = ratio
                print(f"{label:<12} {'staggered' if staggered else 'burst':<10} {n:>6,} {events:>7,} "
                      f"{makespan:>10.4f} {fmt3(eps, ',.0f'):>26} {fmt3(us, ',.1f'):>24} "
                      f"{fmt3(reps_ratio, '.4f'):>22} {floor:>7.4f}")
    big = sizes[-1]
    return write_json(args.json, {
        # the target: both cases must reach it, so the worse of the two; a round of uploads with the
        # routes known (every round but a device's first)
        "network_flow_rate_ratio": min(ratios[("driver/warm", False, big)], ratios[("driver/warm", True, big)]),
        "burst_flow_rate_ratio": ratios[("driver/warm", False, big)],
        "staggered_flow_rate_ratio": ratios[("driver/warm", True, big)],
        "cold_burst_flow_rate_ratio": ratios[("driver", False, big)],
        "cold_staggered_flow_rate_ratio": ratios[("driver", True, big)],
        "process_burst_flow_rate_ratio": ratios[("process", False, big)],
        "process_staggered_flow_rate_ratio": ratios[("process", True, big)],
        "isolated_transfer_us": statistics.median(iso),
        "n": big,
        "raw_timeout_us": statistics.median(raw_us),
        "clock": "process_time",
    })


if __name__ == "__main__":
    main()
