"""Calibrate a device profile on this host, and check the compute model's fidelity.

``simkit calibrate`` times real training steps of the workload's model on this machine the way
simkit's algorithms run them, each compute the simulator charges timed on its own: split steps at
every cut the model allows (client forward, server step, client backward + SGD step, on a fresh
batch each, as split learning alternates them) and whole-model steps (a local step of FedAvg), at
half, once and twice the workload's batch size. It counts their work the way the simulator does
(:func:`simkit.learning.flops.count_flops`: FLOPs, bytes the ops write, kernels) and fits the
compute model the simulator uses (:class:`simkit.config.DeviceProfile`, ``docs/model.md``),

    compute time = flops / R + bytes / B + overhead + kernels * kernel_overhead,

to the measured computes (21 for the digits CNN), minimising the squared *relative* error with
every coefficient non-negative (Lawson & Hanson's NNLS, ``scipy.optimize.nnls``), and writes a
device profile with ``peak_flops = R``, ``efficiency = 1``, ``traffic_bytes_per_s = B``,
``step_overhead_s`` and ``kernel_overhead_s``. The memory term is a roofline's other side (Williams, Waterman & Patterson,
CACM 2009): on small inputs the elementwise work and activation traffic, not the FLOPs, set the
time (a 1-channel convolution on 8x8 digits runs at a fifth of the FLOP rate of the layers after
it); the kernel term is the fixed cost of each op whatever its size (as in Paleo, Qi et al.,
ICLR 2017), which dominates a small model's step. Fidelity is reported per model part at the
workload's cut and batch size -- the client part (its forward and backward computes), the server
part and the whole model -- as the ratio of the simulated step time on that profile to the
measured host step time (1.0 is perfect); ``calibration_error_max`` is the largest
``exp(|log ratio|)`` of the three. Timing the parts in place rather than each in a tight loop of
its own matters: a split step's phases, alternating client and server, cost ~15 % more than the
same parts timed alone (cold caches, a fresh batch each step).

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
from scipy.optimize import nnls
from torch import nn

from simkit.config import Scenario
from simkit.learning.data import load_dataset
from simkit.learning.flops import count_flops
from simkit.learning.models import build_split_model, layer_count

@dataclass
class PartTiming:
    """One measured compute (``client_fwd``, ``server`` or ``client_bwd`` of a split step at
    ``cut``, or ``whole``: a whole-model step, ``cut`` 0) at a batch size: its counted work and its
    median time."""

    part: str
    flops: float
    seconds: float  # median measured seconds per step
    nbytes: float = 0.0  # bytes its ops write (forward + backward)
    kernels: int = 0     # kernels it runs (forward + backward)
    batch: int = 0
    cut: int = 0


@dataclass
class Calibration:
    """A fitted compute model and the points it was fitted to.

    ``traffic_bytes_per_s`` is None when the fit gives memory traffic no cost (the profile then
    has no traffic rate: the pure FLOP-rate model). ``batch`` is the workload's batch size: the
    fidelity figures are the parts' at that size and the workload's ``cut``.
    """

    effective_flops: float
    overhead_s: float
    parts: list[PartTiming]
    traffic_bytes_per_s: float | None = None
    kernel_overhead_s: float = 0.0
    batch: int = 0
    cut: int = 0

    def predicted(self, flops: float, nbytes: float = 0.0, kernels: int = 0) -> float:
        """Simulated seconds of one step on the calibrated profile (as Device.compute_time)."""
        traffic = nbytes / self.traffic_bytes_per_s if self.traffic_bytes_per_s else 0.0
        return flops / self.effective_flops + traffic + self.overhead_s + kernels * self.kernel_overhead_s

    def ratio(self, p: PartTiming) -> float:
        """Simulated / measured step time of one measured point."""
        return self.predicted(p.flops, p.nbytes, p.kernels) / p.seconds

    def fidelity_points(self) -> list[PartTiming]:
        """The measured points at the workload's batch size and cut, and the whole model's (every
        point if none matches)."""
        at = [p for p in self.parts if p.batch == self.batch and p.cut in (0, self.cut)]
        return at or list(self.parts)

    def ratios(self, points: list[PartTiming] | None = None) -> dict[str, float]:
        """Simulated / measured step time per model part (default: the points at the workload's
        batch size and cut): ``client`` sums its forward and backward computes."""
        sums: dict[str, list[float]] = {}
        for p in self.fidelity_points() if points is None else points:
            s = sums.setdefault("client" if p.part.startswith("client") else p.part, [0.0, 0.0])
            s[0] += self.predicted(p.flops, p.nbytes, p.kernels)
            s[1] += p.seconds
        return {part: pred / meas for part, (pred, meas) in sums.items()}

    @property
    def error_max(self) -> float:
        """Largest |log ratio| as a factor (1.12 means 12% off in the worse direction), over the
        parts at the workload's batch size."""
        return max(math.exp(abs(math.log(r))) for r in self.ratios().values())

    @property
    def fit_error_max(self) -> float:
        """The same over every measured compute, one by one (all cuts and batch sizes)."""
        return max(math.exp(abs(math.log(self.ratio(p)))) for p in self.parts)

    def profile(self, name: str = "host") -> dict:
        cores = torch.get_num_threads()
        cuts = ", ".join(str(c) for c in sorted({p.cut for p in self.parts} - {0}))
        fitted = "measured: non-negative least-squares fit of compute time = flops/R + bytes/B + overhead + " \
                 f"kernels * kernel_overhead over {len(self.parts)} computes of training steps (split steps " \
                 f"at cut {cuts or '-'} and whole-model steps, at batch " \
                 f"{', '.join(str(b) for b in sorted({p.batch for p in self.parts}))}) (H)"
        prof = {
            "name": name,
            "description": f"this host, calibrated by simkit calibrate ({cores} torch thread(s))",
            "peak_flops": float(self.effective_flops),
            "efficiency": 1.0,
            "memory_bytes": 8.0e9,
            "step_overhead_s": float(self.overhead_s),
            "kernel_overhead_s": float(self.kernel_overhead_s),
            **({"traffic_bytes_per_s": float(self.traffic_bytes_per_s)} if self.traffic_bytes_per_s else {}),
            "power": {"idle_w": 10.0, "compute_w": 30.0},
            "default_access": "ethernet",
            "kind": "client",
            "sources": {
                "peak_flops": fitted,
                "efficiency": "1.0 by construction (peak_flops is the measured effective rate) (H)",
                "step_overhead_s": "measured: the same fit's constant term (H)",
                "kernel_overhead_s": "measured: the same fit's per-kernel term (H)",
                "memory_bytes": "placeholder (not measured) (L)",
                "power.idle_w": "placeholder (not measured; edit for your host) (L)",
                "power.compute_w": "placeholder (not measured; edit for your host) (L)",
            },
        }
        if self.traffic_bytes_per_s:
            prof["sources"]["traffic_bytes_per_s"] = "measured: the same fit's bytes term (H)"
        return prof


def _time_phases(phases, min_time: float, reps: int) -> list[float]:
    """Median seconds per call of each of ``phases`` (no arguments), called in turn, each timed on
    its own: warm up, find a number of rounds lasting ~``min_time / 4``, then ``reps`` timed runs."""
    clock = time.perf_counter
    for _ in range(3):
        for ph in phases:
            ph()
    n = 1
    while True:  # calibrate the number of rounds per timed run
        t = clock()
        for _ in range(n):
            for ph in phases:
                ph()
        if clock() - t >= min_time / 4 or n > 10000:
            break
        n *= 2
    runs = []
    for _ in range(reps):
        tot = [0.0] * len(phases)
        for _ in range(n):
            for k, ph in enumerate(phases):
                t = clock()
                ph()
                tot[k] += clock() - t
        runs.append([x / n for x in tot])
    return [statistics.median(r[k] for r in runs) for k in range(len(phases))]


def _batches(n: int, b: int, gen: torch.Generator):
    """An endless cycle of index batches of size ``b`` over ``n`` samples (seeded)."""
    order = torch.randperm(max(n, 8 * b), generator=gen) % n
    chunks = [order[i:i + b] for i in range(0, len(order) - b + 1, b)]
    while True:
        yield from chunks


def _split_phases(sm, x: torch.Tensor, y: torch.Tensor, b: int):
    """The three computes of a split-learning step, run by split learning's own torch phases
    (:func:`simkit.algorithms.sl._torch_phases`) on a fresh batch each step: client forward (with
    the batch's gather), server step, client backward + SGD step."""
    from simkit.algorithms.sl import _torch_phases

    copt = torch.optim.SGD(sm.client.parameters(), lr=1e-3)
    sopt = torch.optim.SGD(sm.server.parameters(), lr=1e-3)
    nxt = _batches(len(x), b, torch.Generator().manual_seed(0))
    box = {}

    def forward():
        idx = next(nxt)
        fwd, box["server"], box["backward"] = _torch_phases(sm.client, copt, sm.server, sopt, x[idx], y[idx])
        box["act"] = fwd()

    def server():
        box["grad"] = box["server"](box["act"])

    def backward():
        box["backward"](box["grad"])

    return [forward, server, backward]


def _whole_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: int):
    """A whole-model training step (a FedAvg local step) on a fresh batch each call."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    nxt = _batches(len(x), b, torch.Generator().manual_seed(1))

    def step():
        idx = next(nxt)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    return step


def measure_parts(scenario: Scenario, *, batches=None, cuts=None, min_time: float = 0.3,
                  reps: int = 5) -> list[PartTiming]:
    """Time the computes of training steps of the scenario's model and count their work: the
    three computes of a split step at each cut in ``cuts`` (default: every cut the model allows)
    and a whole-model step, at each batch size in ``batches`` (default: half, once and twice the
    workload's)."""
    wl = scenario.workload
    data = load_dataset(wl.dataset, path=wl.data_path)
    m = wl.model
    if cuts is None:
        cuts = range(1, layer_count(m.family, data.input_shape))
    if batches is None:
        batches = sorted({max(1, wl.batch_size // 2), wl.batch_size, 2 * wl.batch_size})

    def split(cut):
        return build_split_model(m.family, data.input_shape, data.num_classes, cut=cut, width=m.width,
                                 generator=torch.Generator().manual_seed(0))

    models = {cut: split(cut) for cut in cuts}
    whole = split(m.cut).whole()
    x = torch.tensor(np.array(data.x), dtype=torch.float32)
    y = torch.tensor(np.array(data.y))
    parts = []
    for b in batches:
        shape = (b, *x.shape[1:])
        for cut, sm in models.items():
            fc = count_flops(sm.client, shape, backward=True)
            fs = count_flops(sm.server, (b, *sm.cut_shape), backward=True, input_requires_grad=True)
            t_fwd, t_srv, t_bwd = _time_phases(_split_phases(sm, x, y, b), min_time, reps)
            parts += [PartTiming("client_fwd", float(fc.fwd), t_fwd, float(fc.fwd_bytes), fc.fwd_kernels, b, cut),
                      PartTiming("server", float(fs.total), t_srv, float(fs.nbytes), fs.kernels, b, cut),
                      PartTiming("client_bwd", float(fc.bwd), t_bwd, float(fc.bwd_bytes), fc.bwd_kernels, b, cut)]
        fw = count_flops(whole, shape, backward=True)
        (t_whole,) = _time_phases([_whole_step(whole, x, y, b)], min_time, reps)
        parts.append(PartTiming("whole", float(fw.total), t_whole, float(fw.nbytes), fw.kernels, b, 0))
    return parts


def calibrate(scenario: Scenario, *, min_time: float = 0.3, reps: int = 5) -> Calibration:
    """Measure the scenario's workload model parts on this host and fit the compute model."""
    wl = scenario.workload
    return fit(measure_parts(scenario, min_time=min_time, reps=reps), batch=wl.batch_size, cut=wl.model.cut)


def fit(parts: list[PartTiming], *, batch: int | None = None, cut: int | None = None) -> Calibration:
    """Fit the compute model ``t = flops/R + bytes/B + o + kernels*o_k`` to measured points.

    Minimises the squared relative error ``sum ((flops/R + bytes/B + o + kernels*o_k)/t - 1)^2``
    -- linear in ``(1/R, 1/B, o, o_k)`` -- with every coefficient >= 0 (NNLS), so each point
    counts by its ratio, not its absolute time (the whole model would otherwise dominate), and no
    term can be negative work. A term the points cannot tell apart from the others (e.g. no
    bytes counted) comes out 0. If no positive FLOP rate results (timings that fall as FLOPs
    grow), a pure rate through the origin: ``R = sum flops / sum t``, every other term 0.
    ``batch``, ``cut``: the workload's (whose points the fidelity figures use; default: the first point's).
    """
    A = np.array([[p.flops, p.nbytes, 1.0, p.kernels] for p in parts]) / np.array([[p.seconds] for p in parts])
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(A / scale, np.ones(len(parts)))
    inv_r, inv_b, o, o_k = (float(c) for c in coef / scale)
    if inv_r <= 0:  # degenerate (timings dominated by fixed cost): pure rate fit through the origin
        inv_r, inv_b, o, o_k = sum(p.seconds for p in parts) / sum(p.flops for p in parts), 0.0, 0.0, 0.0
    return Calibration(effective_flops=1.0 / inv_r, overhead_s=o, parts=list(parts),
                       traffic_bytes_per_s=1.0 / inv_b if inv_b > 0 else None, kernel_overhead_s=o_k,
                       batch=batch if batch is not None else (parts[0].batch if parts else 0),
                       cut=cut if cut is not None else next((p.cut for p in parts if p.cut), 0))


def write_profile(cal: Calibration, path: str | Path, name: str = "host") -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cal.profile(name), sort_keys=False))
    return path
