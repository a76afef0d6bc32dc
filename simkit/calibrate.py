"""Calibrate a device profile on this host, and check the compute model's fidelity.

``simkit calibrate`` times real training steps (forward + backward + SGD step) of the workload's
model parts -- the client part, the server part and the whole model -- on this machine, at the
workload's batch size, and counts their FLOPs the same way the simulator does
(``torch.utils.flop_counter``). It then fits the compute model the simulator uses,

    step time = flops / R + overhead,

by least squares over the measured (flops, seconds) points (R = effective FLOP/s, overhead = fixed
per-step cost), and writes a device profile with ``peak_flops = R``, ``efficiency = 1`` and
``step_overhead_s = overhead``. Fidelity is reported per model part as the ratio of the simulated
step time on that profile to the measured host step time (1.0 is perfect); ``calibration_error_max``
is the largest ``exp(|log ratio|)``.

This module reads the host clock -- it measures the host on purpose; nothing here feeds simulated
time except through the profile it writes.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from simkit.config import Scenario
from simkit.learning.data import load_dataset
from simkit.learning.flops import count_flops
from simkit.learning.models import build_split_model


@dataclass
class PartTiming:
    part: str
    flops: float
    seconds: float  # median measured seconds per step


@dataclass
class Calibration:
    effective_flops: float
    overhead_s: float
    parts: list[PartTiming]

    def predicted(self, flops: float) -> float:
        return flops / self.effective_flops + self.overhead_s

    def ratios(self) -> dict[str, float]:
        """Simulated / measured step time per part."""
        return {p.part: self.predicted(p.flops) / p.seconds for p in self.parts}

    @property
    def error_max(self) -> float:
        """Largest |log ratio| as a factor (1.12 means 12% off in the worse direction)."""
        return max(math.exp(abs(math.log(r))) for r in self.ratios().values())

    def profile(self, name: str = "host") -> dict:
        cores = torch.get_num_threads()
        return {
            "name": name,
            "description": f"this host, calibrated by simkit calibrate ({cores} torch thread(s))",
            "peak_flops": float(self.effective_flops),
            "efficiency": 1.0,
            "memory_bytes": 8.0e9,
            "step_overhead_s": float(self.overhead_s),
            "power": {"idle_w": 10.0, "compute_w": 30.0},
            "default_access": "ethernet",
            "kind": "client",
            "sources": {
                "peak_flops": "measured: least-squares fit of step time = flops/R + overhead over the "
                              f"client, server and whole-model training steps ({', '.join(p.part for p in self.parts)})",
                "efficiency": "1.0 by construction (peak_flops is the measured effective rate)",
                "step_overhead_s": "measured: intercept of the same fit",
                "memory_bytes": "placeholder (not measured)",
                "power.idle_w": "placeholder (not measured; edit for your host)",
                "power.compute_w": "placeholder (not measured; edit for your host)",
            },
        }


def _train_step_fn(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None, upstream: torch.Tensor | None):
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        out = module(x)
        if y is not None:
            F.cross_entropy(out, y).backward()
        else:
            out.backward(upstream)
        opt.step()

    return step


def _time(step, min_time: float, reps: int) -> float:
    for _ in range(3):
        step()
    n = 1
    while True:  # calibrate the number of steps per timed run
        t = time.perf_counter()
        for _ in range(n):
            step()
        if time.perf_counter() - t >= min_time / 4 or n > 10000:
            break
        n *= 2
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            step()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def calibrate(scenario: Scenario, *, min_time: float = 0.3, reps: int = 5) -> Calibration:
    """Measure the scenario's workload model parts on this host and fit the compute model."""
    wl = scenario.workload
    data = load_dataset(wl.dataset, path=wl.data_path)
    gen = torch.Generator().manual_seed(0)
    sm = build_split_model(wl.model.family, data.input_shape, data.num_classes, cut=wl.model.cut, width=wl.model.width,
                           generator=gen)
    b = wl.batch_size
    x = torch.tensor(np.array(data.x[:b]), dtype=torch.float32)
    y = torch.tensor(np.array(data.y[:b]))
    act = sm.client(x).detach()
    parts = []
    # client part: forward + backward from an upstream gradient (as in split learning)
    upstream = torch.ones_like(act)
    fc = count_flops(sm.client, tuple(x.shape), backward=True)
    parts.append(PartTiming("client", fc.fwd + fc.bwd, _time(_train_step_fn(sm.client, x, None, upstream), min_time, reps)))
    # server part: the cut activation with its input gradient
    fs = count_flops(sm.server, tuple(act.shape), backward=True, input_requires_grad=True)
    a = act.clone().requires_grad_(True)
    parts.append(PartTiming("server", fs.fwd + fs.bwd, _time(_train_step_fn(sm.server, a, y, None), min_time, reps)))
    whole = sm.whole()
    fw = count_flops(whole, tuple(x.shape), backward=True)
    parts.append(PartTiming("whole", fw.fwd + fw.bwd, _time(_train_step_fn(whole, x, y, None), min_time, reps)))
    return fit(parts)


def fit(parts: list[PartTiming]) -> Calibration:
    """Fit the compute model ``t = flops / R + o`` to measured parts.

    Least squares on the relative error, ``min sum ((flops/R + o)/t - 1)^2`` -- linear in
    ``(1/R, o)`` -- so each part counts by its ratio, not its absolute time (the whole model would
    otherwise dominate). If that gives no positive rate (timings dominated by fixed cost), a pure
    rate through the origin (``R = sum flops / sum t``, ``o = 0``); a negative ``o`` is clipped to 0.
    """
    A = np.array([[p.flops / p.seconds, 1.0 / p.seconds] for p in parts])
    inv_r, o = np.linalg.lstsq(A, np.ones(len(parts)), rcond=None)[0]
    if inv_r <= 0:  # degenerate (timings dominated by overhead): pure rate fit through the origin
        inv_r, o = sum(p.seconds for p in parts) / sum(p.flops for p in parts), 0.0
    o = max(0.0, float(o))
    return Calibration(effective_flops=1.0 / float(inv_r), overhead_s=o, parts=list(parts))


def write_profile(cal: Calibration, path: str | Path, name: str = "host") -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cal.profile(name), sort_keys=False))
    return path
