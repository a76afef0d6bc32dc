"""Benchmark of the flow-level network (not a test): ``python -m benchmarks.network [--quick]``.

Two-tier topology built inline: N devices, each with its own access link (10 Mb/s up, 50 Mb/s
down, 2 ms) to one of ceil(N/100) gateways; each gateway has 1 Gb/s both ways (5 ms) to one cloud
server. Every device uploads 1 MB, either all at t=0 ("burst") or at start times spread uniformly
over 10 s ("staggered", seeded). Host time is measured around ``env.run()`` only (building the
graph and the Network is excluded); the simulated results never depend on it. Python's cyclic
garbage collector stays on: at 10,000 simultaneous flows (10,000 live processes, events and
flows) it accounts for roughly half of the host time.

Reported per case, min/median/max over the repetitions:
    events/s    simulated events (everything SimPy scheduled) per host second
    us/flow     host microseconds per simulated flow
    ratio       (flows per host second) / (bare SimPy timeouts per host second), the latter
                measured in the same run by a loop of 1e6 ``yield env.timeout(1)``: how many
                bare timeouts one simulated flow costs, inverted
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import time

import networkx as nx
import simpy

from simkit.world.network import Network

UP_BPS, DOWN_BPS, ACCESS_LAT = 10e6, 50e6, 0.002
BACKHAUL_BPS, BACKHAUL_LAT = 1e9, 0.005
FLOW_BYTES = 1e6
PER_GATEWAY = 100


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
    if at:
        yield env.timeout(at)
    flow = yield net.transfer(device, "cloud", FLOW_BYTES, tag="upload")
    done.append(flow.end)


def run_case(n: int, staggered: bool, seed: int = 0) -> tuple[float, int, float]:
    """One run: (host seconds, events scheduled, simulated makespan)."""
    g = two_tier(n)
    env = simpy.Environment()
    net = Network(env, g)
    rng = random.Random(seed)
    starts = [rng.uniform(0.0, 10.0) if staggered else 0.0 for _ in range(n)]
    done: list[float] = []
    gc.collect()  # start every measurement from the same heap; the cyclic GC stays on while timing
    t0 = time.perf_counter()
    for i in range(n):
        env.process(upload(env, net, f"d{i}", starts[i], done))
    env.run()
    host = time.perf_counter() - t0
    assert len(done) == n
    events = next(env._eid)  # SimPy's insertion counter: how many events were scheduled
    return host, events, max(done)


def raw_timeouts(n: int = 1_000_000) -> float:
    """Bare SimPy throughput: timeouts per host second for one process yielding ``n`` timeouts."""
    env = simpy.Environment()

    def loop():
        for _ in range(n):
            yield env.timeout(1)

    env.process(loop())
    t0 = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - t0)


def fmt3(values: list[float], spec: str) -> str:
    return "/".join(format(v, spec) for v in (min(values), statistics.median(values), max(values)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]

    run_case(100, False)  # warm up (imports, numpy's first calls) outside the measurements
    run_case(100, True)
    raw = [raw_timeouts() for _ in range(args.reps)]
    raw_med = statistics.median(raw)
    print(f"raw SimPy: {fmt3(raw, ',.0f')} timeouts/s (min/median/max of {args.reps}, 1e6 bare timeouts each)")
    print()
    head = (f"{'case':<10} {'N':>6} {'events':>7} {'makespan s':>10} {'events/s (min/med/max)':>26} "
            f"{'us/flow (min/med/max)':>24} {'flows/s / raw':>14}")
    print(head)
    print("-" * len(head))
    for staggered in (False, True):
        for n in sizes:
            hosts, events, makespan = [], None, None
            for rep in range(args.reps):
                h, ev, ms = run_case(n, staggered)
                hosts.append(h)
                events, makespan = ev, ms
            eps = [events / h for h in hosts]
            us = [h / n * 1e6 for h in hosts]
            ratio = (n / statistics.median(hosts)) / raw_med
            print(f"{'staggered' if staggered else 'burst':<10} {n:>6,} {events:>7,} {makespan:>10.4f} "
                  f"{fmt3(eps, ',.0f'):>26} {fmt3(us, ',.1f'):>24} {ratio:>14.4f}")


if __name__ == "__main__":
    main()
