"""Fast what-if mode at scale: FedAvg with ``train: false`` on a 10,000-device two-tier fleet.

Reports host seconds and peak memory (max RSS of a fresh child process per repetition), and the
ratio of host time to the *engine-bound limit*, measured side by side:

    limit = (SimPy events the run scheduled) / (raw SimPy events per host second at this scale)

i.e. how many times more host time the run takes than SimPy itself would need for the same number
of events. Target: <= 3 (issue "Performance", item 4), peak memory <= 2 GiB.

"Events the run scheduled" are the simulation model's events, counted by SimPy's event numbers
(``env._eid``): ~8 per device-round (the client process's start and end, two local steps, and per
transfer its latency end and its delivery). Since 2026-12-05 the latency ends and the deliveries
that fall due at one instant share one entry of SimPy's queue
(:attr:`simkit.world.network.Network.batch_events`), which runs them in their own numbers' order:
the numbers, and so this count, are unchanged, but SimPy *processes* only ~4 entries per
device-round (the numbers minus :attr:`~simkit.world.network.Network.events_shared`, printed as
"processed", with the ratio they would give: a limit counted on them would make every event
simkit saves raise the ratio). The bare protocol's own time for the same rounds (6 events per
device-round: a transfer is one timeout there) is printed too, with its ratio.

"Raw SimPy events per second" depends on the size of the model: with 10,000 devices in flight the
event heap holds ~10,000 entries and 10,000 generators are live, and a bare event costs 2-3x
what a timeout costs in a one-process loop (heap depth, cache misses, process starts). So the rate is measured on the
same protocol written in bare SimPy at the same scale (:func:`bare_protocol_rate`: per round one
process per device with a download timeout, one timeout per local step, an upload timeout, then
``all_of`` and an aggregation timeout; no network, energy or records). The one-process loop rate
(:func:`benchmarks.network.raw_timeouts`) and 10,000 concurrent timeout loops are reported beside
it, with the ratios they would give. (Until 2026-11-30 the one-process loop rate was the
denominator; RESULTS.md gives both.)

**Interleaved.** This VM's speed drifts by 10-20 % over minutes, so a rate measured before or
after a one-minute run can be off by that much against the run itself (one pair of reps gave
430k and 575k events/s). Each repetition therefore keeps two fresh child processes side by side:
the simulation runs in ``slices`` (a tenth of the rounds each; its host time is the sum of the
slices), and between every two slices, and before the first and after the last, the other child
runs a burst of the bare protocol (~1M events, a fresh environment each, clean heap, the run's
GC settings). Each slice's limit uses the mean rate of the bursts either side of it. The two
children never run at once (each waits for the parent), so neither slows the other.

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


def _bare_rounds(devices: int) -> int:
    return max(2, 1_000_000 // (devices * (_steps() + 4)))   # a burst of ~1M events, >= 2 rounds


def bare_child(devices: int) -> None:
    """A fresh child: for each ``go`` on stdin, one burst of the bare protocol (its rate on stdout,
    as JSON); on ``others``, the one-process loop and the concurrent-loops rates."""
    from benchmarks.network import raw_timeouts
    from simkit.run import simulation_gc

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            with simulation_gc():
                rate, per_round = bare_protocol_rate(devices, _bare_rounds(devices), _steps())
            out = {"rate": rate, "per_round": per_round}
        elif cmd == "others":
            with simulation_gc():
                concurrent = concurrent_timeouts_rate(devices, max(2, 1_000_000 // devices))
            with simulation_gc():
                loop = raw_timeouts(clock=time.perf_counter)
            out = {"raw_rate_concurrent": concurrent, "raw_rate_loop": loop}
        else:
            return
        print(json.dumps(out), flush=True)


def _eid(env) -> int:
    """How many events ``env`` has scheduled so far (without taking an id from it)."""
    return int(repr(env._eid)[len("count("):-1])


def sim_child(devices: int, rounds: int, slices: int) -> None:
    """A fresh child: set the run up, then for each ``go`` on stdin simulate the next slice of
    rounds (host seconds and events on stdout, as JSON); after the last, the run's totals."""
    from simkit.run import prepare, simulation_gc

    p = prepare({
        "name": "whatif", "train": False, "record_timeline": False,
        "fleet": {"size": devices, "shares": {"phone-midrange": 0.5, "rpi4": 0.3, "laptop": 0.2}},
        "topology": {"kind": "two_tier", "gateways": max(2, devices // 100)},
        "workload": {"dataset": "digits", "samples_per_client": 64, "batch_size": 32},
        "algorithm": {"name": "fedavg", "rounds": rounds, "eval_every": rounds},
    })
    assert p.ctx.steps_per_epoch(p.ctx.clients[0]) * p.scenario.algorithm.local_epochs == _steps()
    env, algo = p.env, p.algorithm
    net = p.ctx.world.network
    per_slice = -(-rounds // slices)
    stop = {"ev": None}
    orig = algo.maybe_evaluate

    def end_of_round(rnd: int, _orig=orig) -> None:   # ends a slice every `per_slice` rounds
        _orig(rnd)
        if (rnd + 1) % per_slice == 0 and rnd + 1 < rounds and stop["ev"] is not None:
            stop["ev"].succeed()

    algo.maybe_evaluate = end_of_round
    print(json.dumps({"setup_s": p.setup_s}), flush=True)
    with simulation_gc():
        main = env.process(algo.run())
        while not main.processed:
            if sys.stdin.readline().strip() != "go":
                return
            stop["ev"] = env.event()
            e0, s0 = _eid(env), net.events_shared
            t0 = time.perf_counter()
            env.run(until=env.any_of([stop["ev"], main]))
            run_s = time.perf_counter() - t0
            events = _eid(env) - e0
            print(json.dumps({"run_s": run_s, "events": events, "processed": events - (net.events_shared - s0),
                              "done": main.processed}), flush=True)
    print(json.dumps({"events": _eid(env), "processed": _eid(env) - net.events_shared, "sim_time_s": env.now,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


class _Child:
    def __init__(self, *args: str):
        self.p = subprocess.Popen([sys.executable, "-m", "benchmarks.whatif", *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: str | None = None) -> dict:
        if cmd is not None:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark child {self.p.args[3:]} exited with {self.p.wait()}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        self.p.wait()


def one_rep(devices: int, rounds: int) -> dict:
    """One repetition: the simulation in slices, bursts of the bare protocol between them."""
    slices = min(10, rounds)
    sim = _Child("--sim-child", "--devices", str(devices), "--rounds", str(rounds), "--slices", str(slices))
    bare = _Child("--bare-child", "--devices", str(devices))
    try:
        r = sim.ask()
        rates = [bare.ask("go")]
        run_s = limit_s = processed_s = 0.0
        parts = []
        while True:
            part = sim.ask("go")
            rates.append(bare.ask("go"))
            rate = (rates[-2]["rate"] + rates[-1]["rate"]) / 2
            run_s += part["run_s"]
            limit_s += part["events"] / rate
            processed_s += part["processed"] / rate
            parts.append(part["run_s"] / (part["events"] / rate))
            if part["done"]:
                break
        r.update(sim.ask())   # its totals, printed after the last slice
        r.update(bare.ask("others"))
    finally:
        sim.close()
        bare.close()
    r["run_s"], r["limit_s"] = run_s, limit_s
    r["raw_rate"] = r["events"] / limit_s   # the slice-weighted rate
    r["raw_rate_min"] = min(x["rate"] for x in rates)
    r["raw_rate_max"] = max(x["rate"] for x in rates)
    r["bare_events_per_round"] = rates[0]["per_round"]
    r["ratio"] = run_s / limit_s
    r["ratio_processed"] = run_s / processed_s
    r["ratio_slice_min"], r["ratio_slice_max"] = min(parts), max(parts)
    return r


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sim-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slices", type=int, default=10, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 100)
    devices = args.devices if not args.quick else min(args.devices, 2000)
    if args.sim_child:
        sim_child(devices, rounds, args.slices)
        return {}
    if args.bare_child:
        bare_child(devices)
        return {}
    reps = args.reps or (1 if args.quick else 3)
    rows = []
    for _ in range(reps):
        r = one_rep(devices, rounds)
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
                            ("events", "SimPy events (numbered)", "{:,.0f}"),
                            ("processed", "  processed (entries)", "{:,.0f}"),
                            ("raw_rate", "bare protocol events/s", "{:,.0f}"),
                            ("raw_rate_min", "  slowest burst", "{:,.0f}"),
                            ("raw_rate_max", "  fastest burst", "{:,.0f}"),
                            ("limit_s", "engine-bound limit s", "{:.2f}"), ("ratio", "host / limit", "{:.2f}"),
                            ("ratio_slice_min", "  lowest slice", "{:.2f}"),
                            ("ratio_slice_max", "  highest slice", "{:.2f}"),
                            ("ratio_processed", "  on the processed ones", "{:.2f}"),
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
              "whatif_time_over_bare_protocol": mmm("ratio_bare")[1],
              "whatif_time_ratio_processed_events": mmm("ratio_processed")[1]}
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
