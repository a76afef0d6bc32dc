"""One run: scenario -> world + workload + algorithm -> :class:`RunResult`.

Simulated time is the only clock that affects results; the host wall time of the run is measured
separately (``host_wall_s``) as profiling data and never feeds back into the simulation.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import simpy

from simkit.config import Scenario, as_scenario
from simkit.errors import SimkitError, naming_file
from simkit.metrics import score_row, time_to_target
from simkit.records import Recorder
from simkit.rng import SeedTree

SUMMARY_COLUMNS = [
    "scenario", "algorithm", "seed", "n_clients", "rounds", "accuracy_mean", "accuracy_min", "bytes_up",
    "bytes_down", "bytes_total", "client_flops_fwd", "client_flops_bwd", "server_flops", "sim_time_s",
    "time_to_target_s", "target_accuracy", "energy_j_clients", "energy_j_server", "energy_j_total",
    "c3_score", "clients_finished", "clients_lost", "host_wall_s",
]


def versions() -> dict[str, str]:
    """Versions that a run's learned values may depend on (saved as provenance)."""
    import platform

    import numpy
    import torch

    from simkit import __version__

    return {"simkit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


@dataclass
class RunResult:
    """What one run produced.

    Attributes:
        summary: one flat row (see :data:`SUMMARY_COLUMNS`, plus ``energy_j_<class>`` per device
            class and the algorithm's knob values as ``algo_<name>``).
        clients: one row per client (accuracy, bytes, FLOPs, energy by state, what it finished).
        rounds: one row per round (simulated start/end, participants, accuracy mean/min).
        records: the timeline, one DataFrame per record kind (compute, transfer, state, ...).
        scenario: the resolved scenario.
        models: the trained weights (``"server"``, ``"client/<dataset>"`` state dicts; empty
            in the fast what-if mode).
    """

    summary: dict[str, Any]
    clients: pd.DataFrame
    rounds: pd.DataFrame
    records: dict[str, pd.DataFrame]
    scenario: Scenario
    models: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary])

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``summary.csv``, ``clients.csv``, ``rounds.csv``, ``timeline_<kind>.csv``,
        ``scenario.yaml`` (resolved, with the seed) and ``provenance.json`` (versions) into ``out``
        (created if needed). ``simkit replay OUT`` re-runs it and checks the summary."""
        import yaml

        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.summary_frame().to_csv(out / "summary.csv", index=False)
            self.clients.to_csv(out / "clients.csv", index=False)
            self.rounds.to_csv(out / "rounds.csv", index=False)
            for kind, df in self.records.items():
                if len(df):
                    df.to_csv(out / f"timeline_{kind}.csv", index=False)
            (out / "scenario.yaml").write_text(
                yaml.safe_dump(self.scenario.model_dump(mode="json", by_alias=True), sort_keys=False))
            (out / "provenance.json").write_text(json.dumps(
                {**versions(), "seed": self.scenario.seed, "scenario": self.scenario.name,
                 "host_wall_s": self.summary.get("host_wall_s")}, indent=2))
        except OSError as exc:
            from simkit.errors import StudyError

            raise StudyError(f"cannot write results: {exc.strerror or exc}", file=str(out)) from None
        return out


@dataclass
class Prepared:
    """A run built and ready to simulate (see :func:`prepare`)."""

    scenario: Scenario
    env: simpy.Environment
    world: Any
    ctx: Any
    algorithm: Any
    recorder: Recorder
    setup_s: float


def prepare(scenario: Scenario | Mapping | str | os.PathLike) -> Prepared:
    """Build the world, the workload and the algorithm of a scenario, without simulating yet."""
    import torch

    from simkit.algorithms import REGISTRY
    from simkit.algorithms.base import Context
    from simkit.world.fleet import build_world

    t = time.perf_counter()
    sc = as_scenario(scenario)
    if sc.torch_threads:
        torch.set_num_threads(sc.torch_threads)
    if sc.workload.torch_device.startswith("cuda") and not torch.cuda.is_available():
        raise SimkitError("the scenario asks for a CUDA device but none is available", file=sc.source,
                          field="workload.torch_device")
    seeds = SeedTree(sc.seed)
    env = simpy.Environment()
    recorder = Recorder(timeline=sc.record_timeline)
    world = build_world(sc, env=env, recorder=recorder, seeds=seeds)
    with naming_file(sc.source):
        ctx = Context(sc, world, recorder, seeds)
    algo = REGISTRY[sc.algorithm.name](ctx)
    return Prepared(sc, env, world, ctx, algo, recorder, time.perf_counter() - t)


#: generation-0 threshold of the cyclic garbage collector while a simulation runs (Python's default: 700)
SIMULATION_GC_THRESHOLD = 300_000


#: nesting depth of :func:`run_gc` in this process (its outermost scope freezes and collects)
_RUN_GC_DEPTH = 0
_RUN_GC_LOCK = threading.Lock()


@contextmanager
def run_gc():
    """The garbage-collector scope of one whole run (prepare, simulate, result; host cost only).

    A run's world is full of reference cycles (the environment holds the processes, whose
    generators hold the algorithm, which holds the environment; devices and their meters; models
    and their hooks), so everything a run built -- models, tensors, events, records -- is freed
    only by a *full* collection. Those hardly ever happen in a process holding torch: CPython skips
    them until the objects waiting in the oldest generation reach 25 % of it (~400,000 objects),
    so a process that runs many scenarios (a study worker, a test session) grew by every run's
    whole world (measured: ~700 objects and ~0.5 MiB per small SplitFed run, linear over 200 runs,
    no full collection). Here what exists before the run is frozen (``gc.freeze()``), and at the
    end a full collection walks only what the run created -- cheap -- frees the run's world, and
    unfreezes the rest. Nested scopes (a run inside a run) leave it to the outermost one.
    """
    global _RUN_GC_DEPTH
    with _RUN_GC_LOCK:   # (runs in threads of one process share the freeze: the first in is the outer one)
        outer = _RUN_GC_DEPTH == 0
        _RUN_GC_DEPTH += 1
        if outer:
            gc.collect(1)
            gc.freeze()
    try:
        yield
    finally:
        with _RUN_GC_LOCK:
            _RUN_GC_DEPTH -= 1
            if outer:
                gc.collect()
                gc.unfreeze()


@contextmanager
def simulation_gc():
    """The garbage-collector settings a simulation runs under (host cost only; results never change).

    The objects that exist before (torch, the models, the data: a large graph) are moved out of the
    collector's view with ``gc.freeze()`` and given back after with ``gc.unfreeze()``; otherwise
    every full collection triggered by the simulation's many small objects (events, flows,
    records) would traverse that whole graph again -- the largest single host cost of large
    fast-mode runs. And generation 0 is collected every ``SIMULATION_GC_THRESHOLD`` allocations
    instead of every 700: a run keeps many live processes and events (a FedAvg round on 10,000
    devices: ~100,000 objects), which the default rescans far more often than garbage cycles
    accumulate (10,000 staggered flows: about 30 % of host time). The simulation itself leaves
    no cycles behind (a fired transfer event and its flow let go of each other), so the
    threshold sits above one round of a 10,000-device fleet: such a run collects nothing. Objects
    created during the run are still collected (at most ~300,000 wait for it); the previous
    thresholds are restored after.

    Only the young generations are collected before freezing: a full collection here cost
    ~190 ms per run in a process with torch loaded (~400,000 objects) -- 30-40 % of a short run
    such as a study point or a test. The run's world, which is garbage once the run is over, is
    freed by :func:`run_gc` around the whole run. Inside a :func:`run_gc` scope nothing more is
    frozen (a freeze here could only be undone together with that scope's): the young objects
    (the just-built world) are moved to the oldest generation, which the raised thresholds
    leave alone during the simulation.
    """
    gc.collect(1)
    nested = _RUN_GC_DEPTH > 0
    if not nested:
        gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(SIMULATION_GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if not nested:
            gc.unfreeze()


def simulate(p: Prepared) -> float:
    """Run a prepared scenario's simulation to the end under :func:`simulation_gc`; returns the
    host seconds it took."""
    with simulation_gc():
        t = time.perf_counter()
        p.env.run(until=p.env.process(p.algorithm.run()))
        return time.perf_counter() - t


def run(scenario: Scenario | Mapping | str | os.PathLike, *, on_round: Callable[[int, int], None] | None = None,
        score_fn=None) -> RunResult:
    """Simulate one scenario and return its :class:`RunResult`.

    Args:
        scenario: a Scenario, a mapping, or a path to a scenario YAML.
        on_round: called as ``on_round(done_rounds, total_rounds)`` after each round (progress).
        score_fn: optional user C3-Score function (see :func:`simkit.metrics.c3_score`).
    """
    with run_gc():
        return _run(scenario, on_round, score_fn)   # its locals (the world) are gone when run_gc collects


def _run(scenario, on_round, score_fn) -> RunResult:
    p = prepare(scenario)
    sc, algo = p.scenario, p.algorithm
    if on_round is not None:
        orig = algo.maybe_evaluate

        def progress(rnd: int, _orig=orig) -> None:
            _orig(rnd)
            on_round(rnd + 1, sc.algorithm.rounds)

        algo.maybe_evaluate = progress
    run_s = simulate(p)
    result = _build_result(sc, p.ctx, p.world, p.recorder, p.setup_s + run_s, score_fn)
    result.models = algo.final_states() if sc.train else {}
    return result


def _build_result(sc: Scenario, ctx, world, recorder: Recorder, host_wall: float, score_fn) -> RunResult:
    records = recorder.frames()
    ev = records["eval"]
    last_round = int(ev["round"].max()) if len(ev) else -1
    final = ev[ev["round"] == last_round]
    per_round_acc = ev.groupby("round").agg(time=("time", "max"), accuracy_mean=("accuracy", "mean"),
                                            accuracy_min=("accuracy", "min")).reset_index() if len(ev) else None

    client_nodes = {world.clients[n].node for n in world.clients}
    bytes_up = sum(recorder.bytes_sent.get(n, 0.0) for n in client_nodes)
    bytes_down = recorder.bytes_sent.get(world.server.node, 0.0)

    energy = {name: dev.meter.snapshot() for name, dev in world.devices.items()}
    client_energy = sum(sum(e.values()) for n, e in energy.items() if n in world.clients)
    server_energy = sum(energy["server"].values())

    lost = sorted(n for n, d in world.clients.items() if d.dead)
    spec = sc.algorithm
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "algorithm": spec.name,
        "seed": sc.seed,
        "n_clients": len(world.clients),
        "rounds": spec.rounds,
        "accuracy_mean": float(final["accuracy"].mean()) if len(final) else float("nan"),
        "accuracy_min": float(final["accuracy"].min()) if len(final) else float("nan"),
        "bytes_up": float(bytes_up),
        "bytes_down": float(bytes_down),
        "bytes_total": float(bytes_up + bytes_down),
        "client_flops_fwd": float(ctx.flops_client_fwd),
        "client_flops_bwd": float(ctx.flops_client_bwd),
        "server_flops": float(ctx.flops_server),
        "sim_time_s": float(world.env.now),
        "time_to_target_s": (time_to_target(per_round_acc["time"], per_round_acc["accuracy_mean"],
                                            spec.target_accuracy) if per_round_acc is not None else None),
        "target_accuracy": spec.target_accuracy,
        "energy_j_clients": float(client_energy),
        "energy_j_server": float(server_energy),
        "energy_j_total": float(client_energy + server_energy),
        "accuracy_source": ctx.accuracy_source,
        "accuracy_over": (f"{len(world.clients) - len(lost)} of {len(world.clients)} clients"
                          + (f" ({len(lost)} lost: accuracy over the clients that remain)" if lost else "")),
        "clients_finished": int(sum(1 for n in world.clients if ctx.finished.get(n, 0) > 0)),
        "clients_lost": len(lost),
        "host_wall_s": float(host_wall),
    }
    by_class: dict[str, float] = {}
    for name, dev in world.clients.items():
        by_class[dev.profile.name] = by_class.get(dev.profile.name, 0.0) + sum(energy[name].values())
    for cls_name, j in sorted(by_class.items()):
        summary[f"energy_j_{cls_name}"] = float(j)
    summary["c3_score"] = score_row(summary, sc.budgets, score_fn)
    for k, v in spec.model_dump(by_alias=True).items():
        if k != "name" and isinstance(v, (int, float, bool, str)):
            summary[f"algo_{k}"] = v

    rows = []
    final_by = final.set_index("client") if len(final) else None
    for c in ctx.clients:
        dev = c.device
        e = energy[c.name]
        row = {
            "client": c.name, "profile": dev.profile.name, "tech": dev.tech, "dataset": c.key,
            "n_train": c.n_train, "n_test": c.n_test,
            "accuracy": (float(final_by.loc[c.name, "accuracy"]) if final_by is not None and c.name in final_by.index
                         else float("nan")),
            "flops": float(recorder.flops_by_device.get(c.name, 0.0)),
            "bytes_sent": float(recorder.bytes_sent.get(dev.node, 0.0)),
            "bytes_received": float(recorder.bytes_received.get(dev.node, 0.0)),
            "energy_j": float(sum(e.values())),
            **{f"energy_j_{k}": float(v) for k, v in e.items()},
            "rounds_finished": int(ctx.finished.get(c.name, 0)),
            "lost": bool(dev.dead),
        }
        rows.append(row)
    clients = pd.DataFrame(rows)
    rounds = records["round"].copy()
    if per_round_acc is not None and len(rounds):
        rounds = rounds.merge(per_round_acc[["round", "accuracy_mean", "accuracy_min"]], on="round", how="left")
    return RunResult(summary=summary, clients=clients, rounds=rounds, records=records, scenario=sc)
