"""Memory: a study of many runs must not grow the parent process with the number of runs.

Runs a study of ``--runs`` tiny fast-mode runs (``train: false``, 4 devices, 2 rounds) with the
*serial* executor -- the parent process does every run itself, the hardest case -- and samples
the parent's resident set size (RSS, from /proc/self/statm) every 100 finished runs. Results are
streamed to disk run by run, so RSS should level off: the figure to watch is the growth between
the first and the last sample, per 100 runs.

The 10,000-device fast-mode peak memory is measured by ``benchmarks/whatif.py``.

Run:  python -m benchmarks.memory [--quick] [--runs 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks import write_json


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    n = 100 if args.quick else args.runs
    every = 25 if args.quick else 100

    import simkit.executors as ex
    from simkit.study import Study

    base = {"name": "mem", "train": False, "fleet": {"counts": {"rpi4": 2, "phone-midrange": 2}},
            "topology": {"kind": "star"}, "workload": {"samples_per_client": 40, "batch_size": 16},
            "algorithm": {"name": "fedavg", "rounds": 2}, "record_timeline": True}
    samples = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        study = Study("mem", base, grid={"algorithm.lr": [round(0.001 * (i + 1), 6) for i in range(n)]},
                      out=f"{tmp}/mem")
        # sample RSS as runs finish: wrap the serial executor's per-run hook
        done = [0]
        orig = ex.SerialExecutor.map_runs if hasattr(ex, "SerialExecutor") else None

        def on_outcome(*_a, **_k):
            done[0] += 1
            if done[0] % every == 0:
                samples.append((done[0], rss_mib()))

        if orig is not None:
            def map_runs(self, tasks, *a, **k):
                for outcome in orig(self, tasks, *a, **k):
                    on_outcome()
                    yield outcome

            ex.SerialExecutor.map_runs = map_runs
        try:
            result = study.run("serial", progress=False)
        finally:
            if orig is not None:
                ex.SerialExecutor.map_runs = orig
        final = rss_mib()
    dt = time.perf_counter() - t0
    print(f"study of {n} fast-mode runs, serial executor (the parent does every run), {dt:.1f} s host")
    print(f"  {'runs done':>10} {'parent RSS MiB':>15}")
    for k, m in samples:
        print(f"  {k:>10} {m:>15.1f}")
    print(f"  after loading the {len(result.summary)} summary rows: {final:.1f} MiB")
    growth = ((samples[-1][1] - samples[0][1]) / ((samples[-1][0] - samples[0][0]) / 100)
              if len(samples) > 1 else float("nan"))
    print(f"  growth per 100 runs between run {samples[0][0]} and run {samples[-1][0]}: {growth:.2f} MiB")
    out = {"study_runs": n, "study_rss_growth_mib_per_100_runs": growth, "study_rss_final_mib": final}
    return write_json(args.json, out)


if __name__ == "__main__":
    main()
