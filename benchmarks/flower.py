"""Peer comparison: the same FedAvg workload as a bare PyTorch loop, in simkit, and in Flower.

The workload is the peer anchor's (shared/research/peer-anchors.md §2): scikit-learn digits,
10 clients (IID), 5 rounds, the CNN Conv(1,16,3)+ReLU+MaxPool -> Conv(16,32,3)+ReLU+MaxPool ->
Linear(128,10), plain SGD lr 0.05, batch 32, 1 local epoch, 1 torch thread. Three variants:

1. **bare**: a plain PyTorch FedAvg loop (``benchmarks/flower_app/bare.py``);
2. **simkit**: ``simkit.run.run`` of the equivalent scenario (10 rpi4 on a star, cnn width 16),
   which also produces simulated time, bytes and energy (``benchmarks/flower_app/simkit_run.py``);
3. **flower**: ``flwr.simulation.run_simulation`` with the Message API (``ServerApp``,
   ``ClientApp``, ``flwr.serverapp.strategy.FedAvg``), 10 supernodes, client_resources
   num_cpus 1 (``benchmarks/flower_app/flower_sim.py``).

Each variant runs as its own fresh process, so start-up, imports and (for Flower) Ray are
counted. From spawn to exit the driver samples, every ``--interval`` s, the process tree's
PSS and RSS from ``/proc/<pid>/smaps_rollup``: every descendant of the variant's process, plus
every process carrying this run's tag in its environment (Ray daemons inherit it, even if they
are re-parented), so other users' Ray instances are not counted. Ray gets a private temp
directory per run, removed afterwards. It also records the machine's busy CPU outside the
measured tree ("foreign load"), since other processes may share the machine.

The order of the variants changes per repetition, and ratios are taken within a repetition
(paired). Noise on this machine kind is +-10-15 %, so quote the ratios.

Flower is an optional dependency: ``pip install -e ".[flower]"``. Its ``ray==2.55.1`` pin
downgrades a newer Ray, so it can live in a separate environment: ``--flower-python PATH``
(or ``SIMKIT_FLOWER_PYTHON``) names the interpreter that runs the Flower variant. If flwr is
not importable there, the Flower variant is skipped with a note.

Run:  python -m benchmarks.flower [--quick] [--reps 3] [--json FILE] [--flower-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bare", "simkit", "flower")
MODULES = {"bare": "benchmarks.flower_app.bare", "simkit": "benchmarks.flower_app.simkit_run",
           "flower": "benchmarks.flower_app.flower_sim"}
#: run orders, cycled per repetition: every variant goes first, middle and last, and each
#: pair swaps its order between consecutive repetitions
ORDERS = (("bare", "simkit", "flower"), ("flower", "simkit", "bare"), ("simkit", "flower", "bare"),
          ("bare", "flower", "simkit"), ("flower", "bare", "simkit"), ("simkit", "bare", "flower"))
TAG_VAR = "SIMKIT_BENCH_TAG"
TICKS = os.sysconf("SC_CLK_TCK")
#: the issue's targets (simkit / Flower)
TARGET_TIME, TARGET_MEM = 0.4, 0.4


# ----------------------------------------------------------------------------- /proc helpers
def _stat(pid: int):
    """``(ppid, utime+stime ticks, starttime)`` of ``pid`` or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] = state (field 3); ppid = field 4, utime 14, stime 15, starttime 22
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def _has_tag(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return tag in f.read()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _mem(pid: int):
    """``(pss kB, rss kB)`` from smaps_rollup, or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = rss = None
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
            return (pss, rss) if pss is not None else None
    except OSError:
        return None


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal -> busy = all but idle and iowait
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


class TreeSampler:
    """Samples PSS/RSS of a process tree (descendants of ``root`` or carrying ``tag``)."""

    def __init__(self, root: int, tag: str) -> None:
        self.root, self.tag = root, f"{TAG_VAR}={tag}".encode()
        self.tagged: dict[tuple[int, int], bool] = {}  # (pid, starttime) -> carries the tag
        self.cpu: dict[tuple[int, int], int] = {}  # last seen utime+stime per process
        self.names: dict[tuple[int, int], str] = {}
        self.peak_pss = self.peak_rss_at_peak = self.peak_rss_sum = 0
        self.procs_at_peak = self.max_procs = 0
        self.samples = 0

    def members(self) -> list[tuple[int, int]]:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                st = _stat(int(d))
                if st is not None:
                    stats[int(d)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root]
        while todo:
            p = todo.pop()
            if p in stats and p not in tree:
                tree.add(p)
                todo.extend(children.get(p, ()))
        me = os.getpid()
        for pid, (_, _, start) in stats.items():
            if pid in tree or pid == me:
                continue
            key = (pid, start)
            if key not in self.tagged:
                self.tagged[key] = _has_tag(pid, self.tag)
            if self.tagged[key]:
                tree.add(pid)
        out = []
        for pid in tree:
            _, cpu, start = stats[pid]
            self.cpu[(pid, start)] = cpu
            out.append((pid, start))
        return out

    def sample(self) -> None:
        pss = rss = n = 0
        for pid, start in self.members():
            m = _mem(pid)
            if m is None:
                continue
            pss += m[0]
            rss += m[1]
            n += 1
            if (pid, start) not in self.names:
                self.names[(pid, start)] = _cmdline(pid)[:160]
        self.samples += 1
        self.max_procs = max(self.max_procs, n)
        self.peak_rss_sum = max(self.peak_rss_sum, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_rss_at_peak, self.procs_at_peak = pss, rss, n

    def leftovers(self) -> list[int]:
        """Processes of this run still alive (Ray daemons that outlived the driver)."""
        return [pid for pid, _ in self.members() if pid != self.root]

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values()) / TICKS


# ----------------------------------------------------------------------------- one run
def run_variant(variant: str, python: str, interval: float, workdir: Path, *, verbose: bool = False) -> dict:
    """Run one variant as a fresh process; whole-process wall time, peak PSS, its own result."""
    tag = uuid.uuid4().hex[:12]
    ray_tmp = Path(tempfile.mkdtemp(prefix=f"skray{tag[:6]}", dir="/tmp"))
    result_file = workdir / f"{variant}-{tag}.json"
    log_file = workdir / f"{variant}-{tag}.log"
    env = dict(os.environ)
    env.update({
        TAG_VAR: tag, "SIMKIT_BENCH_RESULT": str(result_file), "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    })
    busy0, self0 = _busy_ticks(), time.process_time()
    done = threading.Event()
    box: dict = {}
    with open(log_file, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, "-m", MODULES[variant]], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)

        def wait() -> None:
            _, status, ru = os.wait4(proc.pid, 0)
            box["wall"] = time.perf_counter() - t0
            box["rc"] = os.waitstatus_to_exitcode(status)
            box["cpu_reaped"] = ru.ru_utime + ru.ru_stime
            proc.returncode = box["rc"]
            done.set()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        sampler = TreeSampler(proc.pid, tag)
        while not done.is_set():
            sampler.sample()
            done.wait(interval)
        waiter.join()
    wall = box["wall"]
    busy = (_busy_ticks() - busy0) / TICKS
    self_cpu = time.process_time() - self0
    # Ray daemons normally stop with the driver; give them a moment, then end them (ours: tagged)
    left, deadline = sampler.leftovers(), time.perf_counter() + 5
    while left and time.perf_counter() < deadline:
        time.sleep(0.25)
        left = sampler.leftovers()
    killed = []
    if left:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                    killed.append(pid)
                except OSError:
                    pass
            time.sleep(2)
            left = sampler.leftovers()
            if not left:
                break
    shutil.rmtree(ray_tmp, ignore_errors=True)
    tree_cpu = max(sampler.cpu_s, box["cpu_reaped"])
    out = {"variant": variant, "wall_s": wall, "rc": box["rc"], "peak_pss_mib": sampler.peak_pss / 1024,
           "rss_sum_at_peak_mib": sampler.peak_rss_at_peak / 1024, "procs_at_peak": sampler.procs_at_peak,
           "max_procs": sampler.max_procs, "samples": sampler.samples, "tree_cpu_s": tree_cpu,
           "foreign_cores": max(0.0, busy - tree_cpu - self_cpu) / wall, "driver_cpu_s": self_cpu,
           "leftover_killed": sorted(set(killed))}
    if result_file.exists():
        out["result"] = json.loads(result_file.read_text())
    else:
        out["result"] = None
    out["log"] = str(log_file)
    if box["rc"] != 0 or out["result"] is None:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"variant {variant} failed (rc {box['rc']}); log tail:\n{tail}")
    if verbose:
        out["processes"] = sorted(set(sampler.names.values()))
    return out


# ----------------------------------------------------------------------------- helpers
def flower_info(python: str) -> dict | None:
    """flwr/ray versions importable by ``python``, or None."""
    code = "import json, flwr, ray; print(json.dumps({'flwr': flwr.__version__, 'ray': ray.__version__}))"
    try:
        r = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        a, b, c = os.getloadavg()
        return f"load average: {a:.2f}, {b:.2f}, {c:.2f}"


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop to ``max_load``."""
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    if load <= max_load or max_wait <= 0:
        return load
    print(f"load {load:.2f} > {max_load}: waiting up to {max_wait:.0f} s for it to drop ...", flush=True)
    while load > max_load and time.perf_counter() - t0 < max_wait:
        time.sleep(10)
        load = os.getloadavg()[0]
    waited = time.perf_counter() - t0
    print(f"  load {load:.2f} after {waited:.0f} s" + ("" if load <= max_load else " (still high: measuring anyway)"),
          flush=True)
    return load


def mmm(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def fmt_mmm(xs: list[float], nd: int = 2) -> str:
    lo, med, hi = mmm(xs)
    return f"{med:.{nd}f} ({lo:.{nd}f}-{hi:.{nd}f})" if len(xs) > 1 else f"{med:.{nd}f}"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s (0.2-0.5)")
    ap.add_argument("--pause", type=float, default=3.0, help="pause between runs, s")
    ap.add_argument("--flower-python", default=os.environ.get("SIMKIT_FLOWER_PYTHON", sys.executable),
                    help="interpreter for the Flower variant (default: this one, or $SIMKIT_FLOWER_PYTHON)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load to drop to this")
    ap.add_argument("--max-wait", type=float, default=180.0, help="longest wait for the load, s")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args(argv)
    reps = 1 if args.quick else max(1, args.reps)

    variants = list(args.variants)
    finfo = None
    if "flower" in variants:
        finfo = flower_info(args.flower_python)
        if finfo is None:
            print(f"NOTE: flwr (with Ray) is not importable by {args.flower_python}: skipping the Flower variant.\n"
                  "      Install it with  pip install -e \".[flower]\"  (or point --flower-python / "
                  "SIMKIT_FLOWER_PYTHON at an environment that has it).", flush=True)
            variants.remove("flower")
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, **(finfo or {}),
                "flower_python": args.flower_python if finfo else None}
    print(f"versions: {versions}")
    print(f"machine: {os.cpu_count()} CPUs; uptime at start: {uptime()}", flush=True)
    load_start = wait_for_quiet(args.max_load, args.max_wait)
    uptime_start = uptime()
    if load_start > args.max_load:
        print(f"uptime when measuring starts: {uptime_start}", flush=True)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="simkit-flower-bench-") as tmp:
        for r in range(reps):
            order = [v for v in ORDERS[r % len(ORDERS)] if v in variants]
            for v in order:
                res = run_variant(v, args.flower_python if v == "flower" else sys.executable, args.interval,
                                  Path(tmp), verbose=(r == 0))
                res["rep"] = r
                runs[v].append(res)
                print(f"rep {r + 1}/{reps} {v:>6}: {res['wall_s']:6.2f} s, peak PSS {res['peak_pss_mib']:7.1f} MiB "
                      f"over {res['procs_at_peak']} processes, accuracy {res['result']['final_accuracy']:.4f}, "
                      f"foreign load {res['foreign_cores']:.2f} cores", flush=True)
                time.sleep(args.pause)
    uptime_end = uptime()

    # ---------------------------------------------------------------- table
    print()
    print(f"FedAvg, digits, 10 clients x 5 rounds, whole process (fresh interpreter each), {reps} rep(s); "
          "median (min-max)")
    hdr = f"{'variant':<8} {'wall s':>22} {'peak PSS MiB':>24} {'RSS sum MiB':>10} {'procs':>5} " \
          f"{'inside s':>8} {'tree CPU s':>10} {'foreign':>7} {'final acc':>9}"
    print(hdr)
    print("-" * len(hdr))
    for v in variants:
        rs = runs[v]
        print(f"{v:<8} {fmt_mmm([x['wall_s'] for x in rs]):>22} {fmt_mmm([x['peak_pss_mib'] for x in rs], 0):>24} "
              f"{statistics.median(x['rss_sum_at_peak_mib'] for x in rs):>10.0f} "
              f"{statistics.median(x['procs_at_peak'] for x in rs):>5.0f} "
              f"{statistics.median(x['result']['inside_s'] for x in rs):>8.2f} "
              f"{statistics.median(x['tree_cpu_s'] for x in rs):>10.1f} "
              f"{statistics.median(x['foreign_cores'] for x in rs):>7.2f} "
              f"{statistics.median(x['result']['final_accuracy'] for x in rs):>9.4f}")

    print()
    print("where the time goes (median s): whole process = start-up and imports + the part timed inside")
    for v in variants:
        rs = runs[v]
        whole = statistics.median(x["wall_s"] for x in rs)
        inside = statistics.median(x["result"]["inside_s"] for x in rs)
        extra = ""
        if v == "simkit":
            extra = (f"; of it simkit.run.run() {statistics.median(x['result']['run_s'] for x in rs):.2f}, "
                     f"its host_wall_s (setup + simulate) {statistics.median(x['result']['host_wall_s'] for x in rs):.2f}")
        elif all(x["result"].get("rounds_s") is not None for x in rs):
            extra = f"; of it the FL rounds {statistics.median(x['result']['rounds_s'] for x in rs):.2f}"
        print(f"  {v:<7} whole {whole:6.2f} = outside {whole - inside:5.2f} + inside {inside:6.2f}{extra}")

    def paired(a: str, b: str, key: str) -> list[float]:
        if a not in runs or b not in runs:
            return []
        return [x[key] / y[key] for x, y in zip(runs[a], runs[b])]

    ratios: dict[str, list[float]] = {
        "flower_time_ratio": paired("simkit", "flower", "wall_s"),
        "flower_mem_ratio": paired("simkit", "flower", "peak_pss_mib"),
        "simkit_bare_time_ratio": paired("simkit", "bare", "wall_s"),
        "simkit_bare_mem_ratio": paired("simkit", "bare", "peak_pss_mib"),
        "flower_bare_time_ratio": paired("flower", "bare", "wall_s"),
        "flower_bare_mem_ratio": paired("flower", "bare", "peak_pss_mib"),
    }
    labels = {"flower_time_ratio": "simkit / Flower, wall", "flower_mem_ratio": "simkit / Flower, peak PSS",
              "simkit_bare_time_ratio": "simkit / bare, wall", "simkit_bare_mem_ratio": "simkit / bare, peak PSS",
              "flower_bare_time_ratio": "Flower / bare, wall (anchor: 3.2x)",
              "flower_bare_mem_ratio": "Flower / bare, peak PSS (anchor: 1469/389 = 3.8x)"}
    print()
    print("paired ratios (per repetition), median (min-max):")
    for k, xs in ratios.items():
        if xs:
            print(f"  {labels[k]:<52} {fmt_mmm(xs, 3)}")
    med = {k: (statistics.median(xs) if xs else None) for k, xs in ratios.items()}
    if med["flower_time_ratio"] is not None:
        ok_t = med["flower_time_ratio"] <= TARGET_TIME
        ok_m = med["flower_mem_ratio"] <= TARGET_MEM
        print(f"  targets (issue): simkit/Flower time <= {TARGET_TIME} -> {'MET' if ok_t else 'NOT MET'}; "
              f"peak memory <= {TARGET_MEM} -> {'MET' if ok_m else 'NOT MET'}")

    # ---------------------------------------------------------------- accuracy and what only simkit gives
    print()
    print("final accuracy over the 360 test samples (median over reps; per round of rep 1):")
    for v in variants:
        res = runs[v][0]["result"]
        per = res.get("accuracy_per_round") or []
        print(f"  {v:<7} {statistics.median(x['result']['final_accuracy'] for x in runs[v]):.4f}  rounds: "
              + ", ".join(f"{a:.3f}" for a in per)
              + (f"  ({res['test_samples']} test samples)" if res.get("test_samples") else ""))
    print("  bare and Flower share one data split and batch order (benchmarks/flower_app/task.py), so they agree;\n"
          "  simkit uses its own split of digits, batch order and initial weights, so its accuracy differs by\n"
          "  chance, not by method (the same model, optimiser and schedule). simkit's per-round figure is the\n"
          "  unweighted mean of per-client accuracies; the final figure above is sample-weighted like the others.")
    sim = runs["simkit"][0]["result"] if "simkit" in runs else None
    if sim:
        layers = sim.get("model_layers") or []
        print()
        print("what Flower cannot produce -- simkit's simulated outputs (10 rpi4, star, 5 rounds):")
        print(f"  simulated time      {sim['sim_time_s']:.4f} s")
        print(f"  bytes up / down     {sim['bytes_up']:,.0f} / {sim['bytes_down']:,.0f} B "
              f"(total {sim['bytes_total']:,.0f} B)")
        print(f"  energy              clients {sim['energy_j_clients']:.3f} J, server {sim['energy_j_server']:.3f} J, "
              f"total {sim['energy_j_total']:.3f} J")
        print(f"  client FLOPs        {sim['client_flops']:.3e}")
        print("  simkit's model (cnn, width 16, digits): " + " | ".join(x.replace("\n", " ") for x in layers))
        same = (any("Conv2d(1, 16" in x for x in layers) and any("Conv2d(16, 32" in x for x in layers)
                and any("in_features=128, out_features=10" in x for x in layers))
        print("  -> " + ("same layers as the anchor's model" if same else
                         "DIFFERS from the anchor's Conv(1,16,3)->Conv(16,32,3)->Linear(128,10)"))
    if reps and "flower" in runs:
        procs = runs["flower"][0].get("processes") or []
        print()
        print(f"Flower process tree (rep 1, {len(procs)} distinct processes seen):")
        for p in procs:
            print(f"  {p[:140]}")
    print()
    print(f"uptime at start: {uptime_start}")
    print(f"uptime at end:   {uptime_end}")
    foreign = [x["foreign_cores"] for v in variants for x in runs[v]]
    if foreign and max(foreign) > 0.1:
        print(f"NOTE: other processes used up to {max(foreign):.2f} cores during the runs "
              f"(median {statistics.median(foreign):.2f}) on this {os.cpu_count()}-CPU machine: absolute times are "
              "inflated and noisy; the paired ratios are the figures to quote.")

    out = {
        **med,
        **{k + "_all": xs for k, xs in ratios.items() if xs},
        "targets": {"flower_time_ratio_max": TARGET_TIME, "flower_mem_ratio_max": TARGET_MEM,
                    "time_met": (med["flower_time_ratio"] <= TARGET_TIME) if med["flower_time_ratio"] is not None else None,
                    "mem_met": (med["flower_mem_ratio"] <= TARGET_MEM) if med["flower_mem_ratio"] is not None else None},
        "reps": reps,
        "variants": {v: {"wall_s": [x["wall_s"] for x in runs[v]], "peak_pss_mib": [x["peak_pss_mib"] for x in runs[v]],
                         "rss_sum_at_peak_mib": [x["rss_sum_at_peak_mib"] for x in runs[v]],
                         "procs_at_peak": [x["procs_at_peak"] for x in runs[v]],
                         "inside_s": [x["result"]["inside_s"] for x in runs[v]],
                         "tree_cpu_s": [x["tree_cpu_s"] for x in runs[v]],
                         "foreign_cores": [x["foreign_cores"] for x in runs[v]],
                         "final_accuracy": [x["result"]["final_accuracy"] for x in runs[v]],
                         "order_rep": [x["rep"] for x in runs[v]]} for v in variants},
        "simkit_outputs": ({k: sim[k] for k in ("sim_time_s", "bytes_up", "bytes_down", "bytes_total",
                                                "energy_j_clients", "energy_j_server", "energy_j_total")}
                           if sim else None),
        "flower_skipped": "flower" not in variants and "flower" in args.variants,
        "versions": versions,
        "uptime_start": uptime_start, "uptime_end": uptime_end, "cpus": os.cpu_count(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
