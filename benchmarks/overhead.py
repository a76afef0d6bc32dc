"""Co-simulation overhead: the same training steps as a bare PyTorch loop and inside simkit.

Both sides use the same clients, data tensors, model, batch order and number of steps (they are
built by the same simkit code, untimed); only the timed part differs:

- **bare**: plain Python loops doing the steps (FedAvg: per client local epochs then a weighted
  average; SL: clients in turn, split forward/backward through the server part, weight relay).
  Each round's batch orders are drawn before its torch work, as simkit does: Python code run
  between two pieces of torch work runs cache-cold (drawing a client's order costs ~25 us warm,
  ~100 us there), and a loop that drew each client's order at its turn ran ~6 % slower (N = 100)
  -- a difference of loop order, not of simulation, which the ratio should not count;
- **simkit**: ``env.run()`` of the algorithm's SimPy processes (compute and transfer events,
  max-min network, energy integration, records, FLOP lookups).

Each repetition times bare and simkit back to back (order alternating), so the ratio is paired.
Both end with the same evaluation (each client's test loss and accuracy). FLOP counts are cached
per process by architecture (:func:`simkit.learning.flops.architecture_key`): the first run in a
process pays ~3 ms per model part and batch size to count them, later runs (the other
repetitions, a study's other runs) look them up; the warm-up run pays it here.

Wall-clock noise here is about +-10%, so a second, precise figure is measured too: simkit's
*additive* cost per client step, with the torch work replaced by a no-op -- exactly the fast mode
(``train: false``: the same protocol, events, records and energy accounting, no tensors) -- giving
the predicted ratio ``1 + added cost per step / bare step time``.

Split steps are simulated without their per-phase events when nothing else can happen meanwhile
(chains, :mod:`simkit.world.chain`; vanilla SL chains a client's relay and whole turn of steps
into one event). The SL rows also print the added cost
with chains off (``Chain.enabled = False``, the phase-by-phase events; same results to the bit),
measured in the same run, and their ratio.

The wall-clock ratio is the noisiest figure here (each pair drifts with the VM's load), so it
takes the median of 7 pairs by default (``--reps``); the fast-mode figures take as many.

Run:  python -m benchmarks.overhead [--quick] [--clients 10 100] [--reps 7] [--json FILE]
"""

from __future__ import annotations

import copy
import gc
import statistics
import time

import simpy
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import parser, write_json
from simkit import scenario_from_dict
from simkit.algorithms import REGISTRY
from simkit.algorithms.base import Context, average_states
from simkit.records import Recorder
from simkit.rng import SeedTree
from simkit.run import simulation_gc
from simkit.world.chain import Chain
from simkit.world.fleet import build_world


def scenario(algo: str, n: int, rounds: int) -> dict:
    return {
        "name": f"overhead-{algo}-{n}",
        "fleet": {"counts": {"rpi4": n // 2, "phone-midrange": n - n // 2}},
        "topology": {"kind": "two_tier", "gateways": 2},
        "workload": {"dataset": "digits", "batch_size": 32 if n <= 20 else 8,
                     "max_samples": max(40, 1700 // n)},
        "algorithm": {"name": algo, "rounds": rounds, "lr": 0.05, "eval_every": rounds},
    }


def build(sc_dict, train: bool = True):
    sc = scenario_from_dict({**sc_dict, "train": train})
    seeds = SeedTree(sc.seed)
    env = simpy.Environment()
    rec = Recorder(timeline=True)
    world = build_world(sc, env=env, recorder=rec, seeds=seeds)
    ctx = Context(sc, world, rec, seeds)
    return sc, env, ctx


def bare_fedavg(ctx: Context, rounds: int) -> None:
    key = ctx.clients[0].key
    glob = nn.Sequential(copy.deepcopy(ctx.client_templates[key]), copy.deepcopy(ctx.server_template))
    m = copy.deepcopy(glob)   # one working copy: each client's round loads the global weights into it
    gstate = {k: v.clone() for k, v in glob.state_dict().items()}
    for rnd in range(rounds):
        states, weights = [], []
        orders = [ctx.epoch_order(c, rnd) for c in ctx.clients]   # (see the module's docstring)
        for c, order in zip(ctx.clients, orders):
            m.load_state_dict(gstate)
            opt = ctx.optimizer(m.parameters())
            for idx in order:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(c.x_train[idx]), c.y_train[idx]).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
            weights.append(c.n_train)
        gstate = average_states(states, weights)
    glob.load_state_dict(gstate)
    evaluate(ctx, glob)


def bare_sl(ctx: Context, rounds: int) -> None:
    key = ctx.clients[0].key
    cstate = copy.deepcopy(ctx.client_templates[key].state_dict())
    cm = copy.deepcopy(ctx.client_templates[key])
    server = copy.deepcopy(ctx.server_template)
    sopt = ctx.optimizer(server.parameters())
    for rnd in range(rounds):
        orders = [ctx.epoch_order(c, rnd) for c in ctx.clients]
        for c, order in zip(ctx.clients, orders):
            cm.load_state_dict(cstate)
            copt = ctx.optimizer(cm.parameters())
            for idx in order:
                copt.zero_grad(set_to_none=True)
                a = cm(c.x_train[idx])
                s = a.detach().clone().requires_grad_(True)
                sopt.zero_grad(set_to_none=True)
                F.cross_entropy(server(s), c.y_train[idx]).backward()
                sopt.step()
                a.backward(s.grad)
                copt.step()
            cstate = copy.deepcopy(cm.state_dict())
    cm.load_state_dict(cstate)
    evaluate(ctx, lambda x: server(cm(x)))


@torch.no_grad()
def evaluate(ctx: Context, predict) -> list[tuple[float, float]]:
    """What simkit's evaluation computes at the end: each client's test loss and accuracy."""
    return [(float(F.cross_entropy(logits := predict(c.x_test), c.y_test)),
             float((logits.argmax(1) == c.y_test).float().mean())) for c in ctx.clients]


BARE = {"fedavg": bare_fedavg, "sl": bare_sl}


def time_bare(algo, n, rounds) -> float:
    sc, env, ctx = build(scenario(algo, n, rounds))
    gc.collect()
    t = time.perf_counter()
    BARE[algo](ctx, rounds)
    return time.perf_counter() - t


def run_simkit(algo, n, rounds, *, train: bool) -> tuple[float, int]:
    """Host seconds of ``env.run()`` of the algorithm (under the GC settings of every simkit run)
    and the number of client steps it made."""
    sc, env, ctx = build(scenario(algo, n, rounds), train=train)
    alg = REGISTRY[algo](ctx)
    with simulation_gc():   # as simkit.run.simulate does
        t = time.perf_counter()
        env.run(until=env.process(alg.run()))
        dt = time.perf_counter() - t
    steps = sum(1 for r in ctx.recorder.lists["compute"] if r.tag in ("train", "client_fwd"))
    return dt, steps


def time_noop(algo, n, rounds) -> float:
    """Host seconds per client step of simkit alone (fast mode: no torch work)."""
    dt, steps = run_simkit(algo, n, rounds, train=False)
    return dt / steps


def time_noop_unchained(algo, n, rounds) -> float:
    """:func:`time_noop` with chains off: every phase of a split step its own events."""
    Chain.enabled = False
    try:
        return time_noop(algo, n, rounds)
    finally:
        Chain.enabled = True


def time_simkit(algo, n, rounds) -> tuple[float, int]:
    return run_simkit(algo, n, rounds, train=True)


def stats(xs):
    return min(xs), statistics.median(xs), max(xs)


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--clients", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.reps = args.reps or (1 if args.quick else 7)
    clients = args.clients or [10, 100]
    rounds = 1 if args.quick else 2
    out = {}
    print(f"{'algo':8} {'N':>4} {'steps':>6} {'bare s (min/med/max)':>24} {'simkit s (min/med/max)':>24} "
          f"{'ratio simkit/bare (min/med/max)':>32} {'added us/step':>14} {'bare us/step':>13} {'predicted':>10}")
    for algo in ["fedavg", "sl"]:
        for n in clients:
            time_bare(algo, n, 1)  # warm-up: dataset cache, allocator
            time_simkit(algo, n, 1)  # warm-up: FLOP counts
            bare, sim, ratios, steps = [], [], [], 0
            for rep in range(args.reps):
                if rep % 2 == 0:
                    b = time_bare(algo, n, rounds)
                    s, steps = time_simkit(algo, n, rounds)
                else:
                    s, steps = time_simkit(algo, n, rounds)
                    b = time_bare(algo, n, rounds)
                bare.append(b)
                sim.append(s)
                ratios.append(s / b)
            fb, fs, fr = stats(bare), stats(sim), stats(ratios)
            noop, unchained = [], []
            for _ in range(args.reps):   # chains on and off alternating (paired)
                noop.append(time_noop(algo, n, rounds))
                if algo == "sl":
                    unchained.append(time_noop_unchained(algo, n, rounds))
            added = statistics.median(noop)
            bare_step = fb[1] / steps
            predicted = 1 + added / bare_step
            print(f"{algo:8} {n:>4} {steps:>6} {fb[0]:7.3f}/{fb[1]:7.3f}/{fb[2]:7.3f} "
                  f"{fs[0]:7.3f}/{fs[1]:7.3f}/{fs[2]:7.3f}   {fr[0]:9.3f}/{fr[1]:9.3f}/{fr[2]:9.3f} "
                  f"{added * 1e6:14.1f} {bare_step * 1e6:13.1f} {predicted:10.4f}")
            out[f"{algo}_ratio_n{n}"] = fr[1]
            out[f"{algo}_predicted_n{n}"] = predicted
            out[f"{algo}_added_us_n{n}"] = added * 1e6
            if unchained:
                off = statistics.median(unchained)
                print(f"{'':8} {'':>4} chains off: added {off * 1e6:.1f} us/step, predicted "
                      f"{1 + off / bare_step:.4f}; chains save {off / added:.2f}x of the added cost")
                out[f"{algo}_added_us_unchained_n{n}"] = off * 1e6
    # the figures are the split-learning step (the protocol with the most events per step)
    for n in clients:
        out[f"overhead_ratio_n{n}"] = out[f"sl_ratio_n{n}"]
    if f"sl_predicted_n{clients[-1]}" in out:
        out[f"overhead_predicted_n{clients[-1]}"] = out[f"sl_predicted_n{clients[-1]}"]
    return write_json(args.json, out)


if __name__ == "__main__":
    main()
