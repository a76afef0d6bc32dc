"""Fast what-if mode at scale: FedAvg with ``train: false`` on a 10,000-device two-tier fleet.

Reports host seconds and peak memory (max RSS of a fresh child process per repetition), and the
ratio of host time to the *engine-bound limit* measured in the same run:

    limit = (SimPy events the run scheduled) / (raw SimPy timeouts per host second)

i.e. how many times more host time the run takes than SimPy itself would need for the same number
of events. Target: <= 3 (issue "Performance", item 4), peak memory <= 2 GiB.

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


def one_run(devices: int, rounds: int) -> dict:
    """Run in this process (called in a fresh child): host seconds, events, peak RSS."""
    from benchmarks.network import raw_timeouts
    from simkit.run import prepare, simulate

    p = prepare({
        "name": "whatif", "train": False, "record_timeline": False,
        "fleet": {"size": devices, "shares": {"phone-midrange": 0.5, "rpi4": 0.3, "laptop": 0.2}},
        "topology": {"kind": "two_tier", "gateways": max(2, devices // 100)},
        "workload": {"dataset": "digits", "samples_per_client": 64, "batch_size": 32},
        "algorithm": {"name": "fedavg", "rounds": rounds, "eval_every": rounds},
    })
    run_s = simulate(p)
    events = next(p.env._eid)
    return {"setup_s": p.setup_s, "run_s": run_s, "events": events, "sim_time_s": p.env.now,
            "raw_rate": raw_timeouts(clock=time.perf_counter), "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 100)
    devices = args.devices if not args.quick else min(args.devices, 2000)
    if args.child:
        print(json.dumps(one_run(devices, rounds)))
        return {}
    reps = args.reps or (1 if args.quick else 3)
    rows = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-m", "benchmarks.whatif", "--child", "--devices", str(devices),
                              "--rounds", str(rounds)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["limit_s"] = r["events"] / r["raw_rate"]
        r["ratio"] = r["run_s"] / r["limit_s"]
        rows.append(r)

    def mmm(key):
        xs = [r[key] for r in rows]
        return min(xs), statistics.median(xs), max(xs)

    print(f"fast what-if: FedAvg, train=false, {devices:,} devices x {rounds} rounds, {reps} fresh process(es)")
    for key, label, fmt in [("setup_s", "setup host s", "{:.2f}"), ("run_s", "simulation host s", "{:.2f}"),
                            ("events", "SimPy events", "{:,.0f}"), ("raw_rate", "raw SimPy timeouts/s", "{:,.0f}"),
                            ("limit_s", "engine-bound limit s", "{:.2f}"), ("ratio", "host / limit", "{:.2f}"),
                            ("maxrss_mib", "peak RSS MiB", "{:,.0f}")]:
        lo, med, hi = mmm(key)
        print(f"  {label:24} {fmt.format(med):>12}   (min {fmt.format(lo)}, max {fmt.format(hi)})")
    result = {"whatif_peak_mem_gib": mmm("maxrss_mib")[1] / 1024, "whatif_time_ratio": mmm("ratio")[1],
              "whatif_host_s": mmm("run_s")[1] + mmm("setup_s")[1], "whatif_devices": devices, "whatif_rounds": rounds}
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
