"""Fast what-if mode at scale: FedAvg with ``train: false`` on a 10,000-device two-tier fleet.

Reports host seconds and peak memory (max RSS of a fresh child process per repetition), and the
ratio of host time to the *engine-bound limit*, measured side by side (in a fresh process just
before each run and in another just after it, averaged; under the same GC settings as the run):

    limit = (SimPy events the run scheduled) / (raw SimPy events per host second at this scale)

i.e. how many times more host time the run takes than SimPy itself would need for the same number
of events. Target: <= 3 (issue "Performance", item 4), peak memory <= 2 GiB.

"Raw SimPy events per second" depends on the size of the model: with 10,000 devices in flight the
event heap holds ~10,000 entries and 10,000 generators are live, and a bare event costs 2-3x
what a timeout costs in a one-process loop (heap depth, cache misses, process starts). So the rate is measured on the
same protocol written in bare SimPy at the same scale (:func:`bare_protocol_rate`: per round one
process per device with a download timeout, one timeout per local step, an upload timeout, then
``all_of`` and an aggregation timeout; no network, energy or records). The one-process loop rate
(:func:`benchmarks.network.raw_timeouts`) and 10,000 concurrent timeout loops are reported beside
it, with the ratios they would give. (Until 2026-11-30 the one-process loop rate was the
denominator; RESULTS.md gives both.) The bare protocol's own time for the same rounds, i.e. the
limit counted with its 6 events per device-round instead of simkit's ~8, is printed too.

Run:  python -m benchmarks.whatif [--quick] [--devices 10000] [--rounds 100] [--reps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import parser, write_json


def bare_protocol_rate(devices: int, rounds: int, steps: int, clock=time.perf_counter) -> tuple[float, float]:
    """SimPy events per host second of the FedAvg round skeleton in bare SimPy: ``devices``
    processes per round, each a download timeout, ``steps`` local-step timeouts and an upload
    timeout (seeded per-device durations), then ``all_of`` and an aggregation timeout. Also
    returns its events per round."""
    import random

    import simpy

    env = simpy.Environment()
    rng = random.Random(7)
    speed = [rng.uniform(0.5, 1.5) for _ in range(devices)]

    def client(i):
        yield env.timeout(0.3 * speed[i])
        for _ in range(steps):
            yield env.timeout(speed[i])
        yield env.timeout(0.2 * speed[i])

    def server():
        for _ in range(rounds):
            yield env.all_of([env.process(client(i)) for i in range(devices)])
            yield env.timeout(0.01)

    proc = env.process(server())
    t0 = clock()
    env.run(until=proc)
    events = next(env._eid)
    return events / (clock() - t0), events / rounds


def concurrent_timeouts_rate(loops: int, per_loop: int, clock=time.perf_counter) -> float:
    """SimPy timeouts per host second with ``loops`` processes yielding timeouts at once."""
    import random

    import simpy

    env = simpy.Environment()
    rng = random.Random(7)

    def loop(d):
        for _ in range(per_loop):
            yield env.timeout(d)

    for _ in range(loops):
        env.process(loop(rng.uniform(0.5, 1.5)))
    t0 = clock()
    env.run()
    return next(env._eid) / (clock() - t0)


def _steps() -> int:
    n_test = max(1, round(64 * 0.2))  # workload.test_fraction's default; checked against the run
    return -(-(64 - n_test) // 32)


def raw_rates(devices: int, rounds: int) -> dict:
    """Run in a fresh child: the raw SimPy rates on a clean heap, under the run's GC settings."""
    from benchmarks.network import raw_timeouts
    from simkit.run import simulation_gc

    steps = _steps()
    bare_rounds = max(2, min(rounds, 2_000_000 // (devices * (steps + 4))))   # ~2M events, >= 2 rounds
    raw = {}
    with simulation_gc():
        raw["raw_rate"], raw["bare_events_per_round"] = bare_protocol_rate(devices, bare_rounds, steps)
    with simulation_gc():
        raw["raw_rate_concurrent"] = concurrent_timeouts_rate(devices, max(2, 1_000_000 // devices))
    with simulation_gc():
        raw["raw_rate_loop"] = raw_timeouts(clock=time.perf_counter)
    return raw


def one_run(devices: int, rounds: int) -> dict:
    """Run in a fresh child: host seconds, events and peak RSS of the simkit run."""
    from simkit.run import prepare, simulate

    p = prepare({
        "name": "whatif", "train": False, "record_timeline": False,
        "fleet": {"size": devices, "shares": {"phone-midrange": 0.5, "rpi4": 0.3, "laptop": 0.2}},
        "topology": {"kind": "two_tier", "gateways": max(2, devices // 100)},
        "workload": {"dataset": "digits", "samples_per_client": 64, "batch_size": 32},
        "algorithm": {"name": "fedavg", "rounds": rounds, "eval_every": rounds},
    })
    assert p.ctx.steps_per_epoch(p.ctx.clients[0]) * p.scenario.algorithm.local_epochs == _steps()
    run_s = simulate(p)
    return {"setup_s": p.setup_s, "run_s": run_s, "events": next(p.env._eid), "sim_time_s": p.env.now,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(mode: str, devices: int, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.whatif", mode, "--devices", str(devices),
                          "--rounds", str(rounds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 100)
    devices = args.devices if not args.quick else min(args.devices, 2000)
    if args.child or args.raw_child:
        print(json.dumps(one_run(devices, rounds) if args.child else raw_rates(devices, rounds)))
        return {}
    reps = args.reps or (1 if args.quick else 3)
    rows = []
    for _ in range(reps):
        # the raw rates in fresh processes just before and just after the run (this VM's speed
        # drifts over minutes), averaged; each on a clean heap like the start of the run
        before = _child("--raw-child", devices, rounds)
        r = _child("--child", devices, rounds)
        after = _child("--raw-child", devices, rounds)
        r.update({k: (before[k] + after[k]) / 2 for k in before})
        r["raw_rate_before"], r["raw_rate_after"] = before["raw_rate"], after["raw_rate"]
        r["limit_s"] = r["events"] / r["raw_rate"]
        r["ratio"] = r["run_s"] / r["limit_s"]
        r["ratio_loop"] = r["run_s"] * r["raw_rate_loop"] / r["events"]
        r["ratio_concurrent"] = r["run_s"] * r["raw_rate_concurrent"] / r["events"]
        r["bare_s"] = r["bare_events_per_round"] * rounds / r["raw_rate"]   # the bare protocol, all rounds
        r["ratio_bare"] = r["run_s"] / r["bare_s"]
        rows.append(r)

    def mmm(key):
        xs = [r[key] for r in rows]
        return min(xs), statistics.median(xs), max(xs)

    print(f"fast what-if: FedAvg, train=false, {devices:,} devices x {rounds} rounds, {reps} fresh process(es)")
    for key, label, fmt in [("setup_s", "setup host s", "{:.2f}"), ("run_s", "simulation host s", "{:.2f}"),
                            ("events", "SimPy events", "{:,.0f}"),
                            ("raw_rate", "bare protocol events/s", "{:,.0f}"),
                            ("raw_rate_before", "  before the run", "{:,.0f}"),
                            ("raw_rate_after", "  after the run", "{:,.0f}"),
                            ("limit_s", "engine-bound limit s", "{:.2f}"), ("ratio", "host / limit", "{:.2f}"),
                            ("raw_rate_concurrent", f"{devices:,} timeout loops/s", "{:,.0f}"),
                            ("ratio_concurrent", "  ratio at that rate", "{:.2f}"),
                            ("raw_rate_loop", "1 timeout loop/s", "{:,.0f}"),
                            ("ratio_loop", "  ratio at that rate", "{:.2f}"),
                            ("bare_s", "bare protocol host s", "{:.2f}"),
                            ("ratio_bare", "  host / bare protocol", "{:.2f}"),
                            ("maxrss_mib", "peak RSS MiB", "{:,.0f}")]:
        lo, med, hi = mmm(key)
        print(f"  {label:24} {fmt.format(med):>12}   (min {fmt.format(lo)}, max {fmt.format(hi)})")
    result = {"whatif_peak_mem_gib": mmm("maxrss_mib")[1] / 1024, "whatif_time_ratio": mmm("ratio")[1],
              "whatif_host_s": mmm("run_s")[1] + mmm("setup_s")[1], "whatif_devices": devices, "whatif_rounds": rounds,
              "whatif_time_ratio_concurrent_loops": mmm("ratio_concurrent")[1],
              "whatif_time_ratio_one_loop": mmm("ratio_loop")[1],
              "whatif_time_over_bare_protocol": mmm("ratio_bare")[1]}
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
