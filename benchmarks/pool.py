"""Process-pool hygiene: a study on the local pool uses both cores without oversubscription.

The same small study (8 short real-training runs) on the pool executor with 1 and with 2
workers, alternating; each worker runs torch with one thread (the executor sets it), so 2 workers
on 2 cores should give close to 2x the runs per host minute, not the 2.4-6x *slow-down* measured
here when two processes each use 2 torch threads (shared research perf-baselines.md, 5d).

Run:  python -m benchmarks.pool [--quick] [--reps 3] [--json FILE]
"""

from __future__ import annotations

import statistics
import tempfile
import time

from benchmarks import parser, write_json


def study_time(workers: int, runs: int, rounds: int) -> float:
    from simkit.study import Study

    base = {"name": "pool", "fleet": {"counts": {"rpi4": 3, "laptop": 1}}, "topology": {"kind": "star"},
            "workload": {"dataset": "digits", "max_samples": 300, "batch_size": 16},
            "algorithm": {"name": "splitfed", "rounds": rounds}}
    with tempfile.TemporaryDirectory() as tmp:
        st = Study("pool", base, grid={"algorithm.lr": [0.01 * (i + 1) for i in range(runs)]}, out=tmp)
        t = time.perf_counter()
        st.run("pool", workers=workers, progress=False)
        return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    runs, rounds = (4, 1) if args.quick else (8, 3)
    one, two = [], []
    for rep in range(reps):
        order = (1, 2) if rep % 2 == 0 else (2, 1)
        for w in order:
            (one if w == 1 else two).append(runs / study_time(w, runs, rounds) * 60)
    ratios = [b / a for a, b in zip(one, two)]
    fmt = lambda xs: f"{min(xs):7.1f} / {statistics.median(xs):7.1f} / {max(xs):7.1f}"  # noqa: E731
    print(f"pool executor, {runs} runs per study, {reps} paired repetition(s); runs per host minute (min/med/max)")
    print(f"  1 worker : {fmt(one)}")
    print(f"  2 workers: {fmt(two)}")
    print(f"  speed-up 2 vs 1 workers: {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}")
    out = {"pool_runs_per_min_1": statistics.median(one), "pool_runs_per_min_2": statistics.median(two),
           "pool_speedup_2_vs_1": statistics.median(ratios)}
    return write_json(args.json, out)


if __name__ == "__main__":
    main()
