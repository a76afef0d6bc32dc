"""Batched local training vs the sequential loop vs plain ``torch.func.vmap``.

The model is FedAvg's workload model on the digits dataset (``ctx.client_templates[key]`` +
``ctx.server_template`` as one ``nn.Sequential``, built by simkit's Context from a scenario),
batch 32, SGD (FedAvg's defaults). Each of N clients trains a few local steps on its own samples
of digits, from the same start weights:

- **seq**: :func:`simkit.learning.batched.train_local_sequential`, the loop FedAvg runs per client
  (load_state_dict, fresh optimiser, zero_grad / cross_entropy / backward / step);
- **vmap**: plain ``torch.func``: ``stack_module_state`` + ``vmap(grad(loss))`` over
  ``functional_call`` and one ``torch._foreach_add_`` SGD update per step;
- **batched**: :func:`simkit.learning.batched.train_local_batched` (what ``batched: on`` runs).

Timing: every repetition runs the three back to back in a shuffled order (paired), each timed
run lasting >= ~0.3 s; rates are client-steps per second (N x steps / wall time), speed-ups are
the ratios within a repetition; min/median/max over the repetitions. Process CPU time is
recorded too, and the CPU time other processes used during each timed run ("foreign load", in
cores, from /proc/stat); a repetition with foreign load above ``--max-foreign`` is re-run (at
most twice). ``seq`` also runs on clients of *uneven* sizes (last batches partial, some clients
one step more) next to ``batched``.

**Whole runs** (:func:`whole_runs`): ``simkit.run`` of FedAvg, SplitFed V1 and AdaSplit (its
batched local phase) on 50 digits clients, ``batched: off`` against ``auto``, paired, alternating order -- the speed-up a user sees,
simulation, evaluation and set-up included, and a check that both give the same accuracy.

Run:  python -m benchmarks.batched [--quick] [--json FILE] [--threads 1] [--reps 5]

``--json`` writes ``{"batched_speedup_n50": <median speed-up of batched vs seq at N=50>}``. With a
CUDA device present, N=100 is also measured there (``cuda_n100``; reported, never required);
``--device-only cuda`` measures only that (a lent GPU machine's short check; ``--device-only cpu``
is a dry run of the same code here).
"""

from __future__ import annotations

import os
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import parser, write_json
from simkit.learning.batched import (
    ClientJob,
    compile_program,
    prefer_batched,
    train_local_batched,
    train_local_sequential,
)
from simkit.learning.data import load_dataset
from simkit.learning.flops import count_flops

BATCH = 32
LR = 0.05


def workload_model(dataset: str = "digits", width: int = 16):
    """FedAvg's model of a digits scenario, built by simkit itself; and its start weights."""
    import simpy

    from simkit import scenario_from_dict
    from simkit.algorithms.base import Context
    from simkit.records import Recorder
    from simkit.rng import SeedTree
    from simkit.world.fleet import build_world

    sc = scenario_from_dict({"name": "bench-batched", "fleet": {"counts": {"rpi4": 2}},
                             "workload": {"dataset": dataset, "batch_size": BATCH, "model": {"width": width}},
                             "algorithm": {"name": "fedavg", "rounds": 1, "lr": LR}})
    seeds = SeedTree(sc.seed)
    rec = Recorder(timeline=False)
    world = build_world(sc, env=simpy.Environment(), recorder=rec, seeds=seeds)
    ctx = Context(sc, world, rec, seeds)
    key = ctx.clients[0].key
    model = nn.Sequential(ctx.client_templates[key], ctx.server_template)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}, ctx.input_shapes[key]


def make_jobs(n_clients: int, sizes, seed: int = 0, device="cpu"):
    """Clients with their own samples of digits (drawn with a seeded generator) and one local
    epoch of shuffled batches of 32."""
    data = load_dataset("digits")
    x = torch.tensor(np.array(data.x, dtype=np.float32), device=device)
    y = torch.tensor(np.array(data.y, dtype=np.int64), device=device)
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n_clients):
        n = sizes[i % len(sizes)]
        idx = torch.randint(0, len(x), (n,), generator=g).to(device)
        perm = torch.randperm(n, generator=g).to(device)
        jobs.append(ClientJob(x[idx], y[idx], [perm[j:j + BATCH] for j in range(0, n, BATCH)]))
    return jobs


def train_vmap(model: nn.Module, start: dict, jobs) -> list:
    """Plain torch.func batching (needs equal batch shapes): one vmap(grad) per step, SGD update."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    n = len(jobs)
    params, buffers = stack_module_state([model] * n)
    params = {k: start[k].unsqueeze(0).repeat(n, *[1] * start[k].dim()).clone() for k in params}
    base = model  # functional_call only uses its structure

    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    g_fn = vmap(grad(loss))
    keys = list(params)
    plist = [params[k] for k in keys]
    with torch.no_grad():
        for t in range(len(jobs[0].batches)):
            xb = torch.stack([j.x[j.batches[t]] for j in jobs])
            yb = torch.stack([j.y[j.batches[t]] for j in jobs])
            gr = g_fn(params, buffers, xb, yb)
            torch._foreach_add_(plist, [gr[k] for k in keys], alpha=-LR)
    return [{k: params[k][i] for k in keys} for i in range(n)]


def methods_for(model, start, jobs, vmap: bool = True) -> dict:
    """The timed callables: FedAvg's sequential loop, plain vmap (equal sizes only), batched."""
    out = {"seq": lambda: train_local_sequential(model, start, jobs, optimizer="sgd", lr=LR)}
    if vmap:
        out["vmap"] = lambda: train_vmap(model, start, jobs)
    out["batched"] = lambda: train_local_batched(model, start, jobs, optimizer="sgd", lr=LR)
    return out


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait
    except OSError:
        return None


def timed(fn, min_s: float, sync=None):
    """Run ``fn`` until >= min_s: (wall s per call, cpu s per call, foreign load in cores)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    b0, c0, t0 = _busy_jiffies(), time.process_time(), time.perf_counter()
    calls = 0
    while True:
        fn()
        if sync:
            sync()
        calls += 1
        wall = time.perf_counter() - t0
        if wall >= min_s:
            break
    cpu = time.process_time() - c0
    b1 = _busy_jiffies()
    foreign = max(0.0, ((b1 - b0) / hz - cpu) / wall) if b0 is not None and b1 is not None else float("nan")
    return wall / calls, cpu / calls, foreign


def fmt(xs, spec=".0f"):
    return f"{statistics.median(xs):{spec}} ({min(xs):{spec}}-{max(xs):{spec}})"


def compare(methods: dict, steps: int, reps: int, min_s: float, max_foreign: float, sync=None) -> dict:
    """Paired repetitions in shuffled order; per method: rates (wall, cpu) and foreign load."""
    for f in methods.values():  # warm-up (allocator, oneDNN primitives, dataset cache)
        f()
    out = {k: {"rate": [], "cpu_rate": [], "foreign": []} for k in methods}
    for _ in range(reps):
        for attempt in range(3):
            order = list(methods)
            random.shuffle(order)
            got = {k: timed(methods[k], min_s, sync) for k in order}
            if max(g[2] for g in got.values()) <= max_foreign or attempt == 2:
                break
        for k, (w, c, fl) in got.items():
            out[k]["rate"].append(steps / w)
            out[k]["cpu_rate"].append(steps / c)
            out[k]["foreign"].append(fl)
    return out


def report(title: str, res: dict, max_foreign: float, base: str = "seq") -> dict:
    """Print a table; return per method the paired speed-ups vs ``base``: from wall time, or from
    process CPU time when other processes loaded the machine (median foreign load above
    ``max_foreign``) and torch runs one thread (then CPU time is what the run would take alone)."""
    loaded = statistics.median(f for r in res.values() for f in r["foreign"]) > max_foreign
    use_cpu = loaded and torch.get_num_threads() == 1
    print(f"\n{title}")
    print(f"  {'method':8} {'client-steps/s wall':>24} {'client-steps/s cpu':>24} {'speed-up wall':>20} "
          f"{'speed-up cpu':>20} {'foreign load':>13}")
    speed = {}
    for k, r in res.items():
        wall = [a / b for a, b in zip(r["rate"], res[base]["rate"])]
        cpu = [a / b for a, b in zip(r["cpu_rate"], res[base]["cpu_rate"])]
        speed[k] = cpu if use_cpu else wall
        print(f"  {k:8} {fmt(r['rate']):>24} {fmt(r['cpu_rate']):>24} {fmt(wall, '.2f'):>20} {fmt(cpu, '.2f'):>20} "
              f"{statistics.median(r['foreign']):13.2f}")
    if use_cpu:
        print("  (machine loaded by other processes: speed-ups below use CPU time)")
    return speed


def auto_check(args, reps: int, min_s: float) -> None:
    """``auto``'s choice against the measurement for other model sizes (random inputs, N = 10)."""
    from simkit.learning.models import build_split_model

    cases = [("cnn", (1, 8, 8), 16), ("cnn", (1, 28, 28), 16)]
    if not args.quick:
        cases += [("mlp", (1, 8, 8), 16), ("cnn1d", (1, 40), 16), ("cnn", (3, 32, 32), 16)]
    print("\nauto check (N = 10, 3 steps, random inputs): is batched faster where auto batches?")
    g = torch.Generator().manual_seed(0)
    for fam, shape, width in cases:
        sm = build_split_model(fam, shape, 10, cut=1, width=width, generator=torch.Generator().manual_seed(0))
        model = nn.Sequential(sm.client, sm.server)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fc = count_flops(model, (BATCH, *shape), backward=True)
        jobs = []
        for _ in range(10):
            n = 3 * BATCH
            perm = torch.randperm(n, generator=g)
            jobs.append(ClientJob(torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g),
                                  [perm[j:j + BATCH] for j in range(0, n, BATCH)]))
        res = compare(methods_for(model, start, jobs, vmap=False), 30, reps, min_s, args.max_foreign)
        speed = report(f"{fam} {shape} width {width}: {(fc.fwd + fc.bwd) / 1e6:.1f} MFLOP per client step, "
                       f"auto batches: {prefer_batched(fc.fwd + fc.bwd, 10, 'cpu')}", res, args.max_foreign)
        print(f"  -> auto's pick is {'batched' if prefer_batched(fc.fwd + fc.bwd, 10, 'cpu') else 'seq'}; "
              f"measured batched/seq {fmt(speed['batched'], '.2f')}")


def whole_runs(reps: int, clients: int = 50, rounds: int = 3) -> dict:
    """Host seconds of whole ``simkit.run`` calls, ``batched: off`` vs ``auto`` (paired, alternating
    order); returns per algorithm the median speed-up. Also prints both runs' accuracy (equal up to
    float32 rounding). AdaSplit runs ``rounds + 1`` epochs, the last in its global phase (where only
    the non-selected clients' local steps are batched; the split steps stay sequential)."""
    from simkit.run import run

    algos = {"fedavg": {"lr": 0.1, "momentum": 0.9}, "splitfed": {"lr": 0.1, "momentum": 0.9},
             "adasplit": {"kappa": rounds / (rounds + 1), "rounds": rounds + 1}}

    def scenario(algo: str, batched: str) -> dict:
        return {"name": f"bench-{algo}-{batched}", "seed": 1,
                "fleet": {"counts": {"rpi4": clients // 2, "phone-midrange": clients - clients // 2}},
                "topology": {"kind": "two_tier", "gateways": 2},
                "workload": {"dataset": "digits", "batch_size": 8},
                "algorithm": {"name": algo, "rounds": rounds, "batched": batched, "eval_every": rounds,
                              **algos[algo]}}

    print(f"\nwhole runs: simkit.run, {clients} digits clients, {rounds} rounds (AdaSplit: {rounds} local "
          f"epochs + 1 global), batch 8 (host s, paired)")
    out = {}
    for algo in algos:
        acc = {}
        for b in ("off", "auto"):   # warm-up
            acc[b] = run(scenario(algo, b)).summary["accuracy_mean"]
        times: dict[str, list[float]] = {"off": [], "auto": []}
        for r in range(reps):
            for b in (("off", "auto") if r % 2 == 0 else ("auto", "off")):
                t = time.perf_counter()
                run(scenario(algo, b))
                times[b].append(time.perf_counter() - t)
        speed = [o / a for o, a in zip(times["off"], times["auto"])]
        out[algo] = statistics.median(speed)
        print(f"  {algo:9} off {fmt(times['off'], '.2f')} s, auto {fmt(times['auto'], '.2f')} s, speed-up "
              f"{fmt(speed, '.2f')}; accuracy off {acc['off']:.4f}, auto {acc['auto']:.4f}")
    return out


def on_device(model: nn.Module, start: dict, device: str, reps: int, min_s: float, steps_per_client: int,
              n: int = 100) -> float:
    """Batched vs sequential local training of ``n`` clients on ``device`` (a GPU: the issue's
    N = 100 figure); prints the table, returns the median speed-up."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    gmodel = nn.Sequential(*[m for m in model]).to(dev)
    gstart = {k: v.to(dev) for k, v in start.items()}
    jobs = make_jobs(n, [BATCH * steps_per_client], device=dev)
    res = compare(methods_for(gmodel, gstart, jobs, vmap=False), n * steps_per_client, reps, min_s,
                  float("inf"), sync=torch.cuda.synchronize if cuda else None)
    name = torch.cuda.get_device_name(dev) if cuda else device
    speed = report(f"{dev.type.upper()} ({name}): N = {n}", res, float("inf"))
    return statistics.median(speed["batched"])


def main(argv=None) -> dict:
    ap = parser(__doc__, quick="N = 10, 50; 3 repetitions; shorter runs")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as the tests)")
    ap.add_argument("--clients", type=int, nargs="*", default=None)
    ap.add_argument("--max-foreign", type=float, default=0.5, help="re-run a repetition above this foreign load")
    ap.add_argument("--device-only", metavar="DEVICE", default=None,
                    help="only N = 100 on this torch device (cuda: the GPU figure, e.g. on a lent GPU machine; "
                         "cpu: a dry run of the same code); --json writes {DEVICE_n100: speed-up}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    clients = args.clients or ([10, 50] if args.quick else [10, 50, 100])
    min_s = 0.25 if args.quick else 0.4
    steps_per_client = 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    model, start, shape = workload_model()
    if args.device_only:
        dev = args.device_only
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device-only {dev}: this torch ({torch.__version__}) sees no CUDA device")
        figure = on_device(model, start, dev, reps, min_s, steps_per_client)
        return write_json(args.json, {f"{torch.device(dev).type}_n100": figure})
    fc = count_flops(model, (BATCH, *shape), backward=True)
    step_flops = fc.fwd + fc.bwd
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, {step_flops / 1e6:.1f} MFLOP per "
          f"client step at batch {BATCH}; {steps_per_client} local steps per client")
    out: dict = {}
    summary = []
    for n in clients:
        jobs = make_jobs(n, [BATCH * steps_per_client])
        res = compare(methods_for(model, start, jobs), n * steps_per_client, reps, min_s, args.max_foreign)
        speed = report(f"N = {n} clients, equal sizes ({BATCH * steps_per_client} samples each)", res,
                       args.max_foreign)
        out[f"n{n}"] = {k: statistics.median(v) for k, v in speed.items()}
        summary.append((n, "equal", speed))
        # uneven sizes: partial last batches, one step more or less (vmap cannot do these)
        sizes = [100, 113, 128, 97, 140, 121, 105]
        ujobs = make_jobs(n, sizes, seed=1)
        usteps = sum(len(j.batches) for j in ujobs)
        ures = compare(methods_for(model, start, ujobs, vmap=False), usteps, reps, min_s, args.max_foreign)
        uspeed = report(f"N = {n} clients, uneven sizes ({min(sizes)}-{max(sizes)} samples, 4-5 steps)", ures,
                        args.max_foreign)
        summary.append((n, "uneven", uspeed))
        print(f"  auto batches this round: {prefer_batched(step_flops, n, 'cpu')}")
    print("\nsummary: median speed-up vs seq (min-max)")
    for n, kind, speed in summary:
        print(f"  N={n:<4} {kind:7} " + "  ".join(f"{k} {fmt(v, '.2f')}" for k, v in speed.items() if k != "seq"))
    auto_check(args, reps, min_s)
    out["whole_runs"] = whole_runs(reps, rounds=1 if args.quick else 3)
    if torch.cuda.is_available():
        out["cuda_n100"] = on_device(model, start, "cuda", reps, min_s, steps_per_client)
    compile_program(model, shape)  # the model is supported (raises otherwise)
    result = {"batched_speedup_n50": out["n50"]["batched"]} if "n50" in out else {}
    if "cuda_n100" in out:
        result["cuda_n100"] = out["cuda_n100"]
    write_json(args.json, result)
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return out


if __name__ == "__main__":
    main()
