"""Compute-model fidelity: calibrate a profile on this host, then compare simulated and measured
step times for three model sizes (client part, server part, whole model) of the digits CNN.

Each repetition calibrates afresh (``simkit.calibrate``: the three computes of a split step at cuts
1 and 2 and a whole-model step, each at batch 16, 32 and 64, timed in place; fitted to flops/R +
bytes/B + overhead + kernels * per_kernel) and reports the ratios at the workload's cut (1) and
batch (32): the client part (its forward and backward computes), the server part and the whole
model. ``calibration_error_max`` is the median over repetitions of the largest of the three.
Printed beside it, from the same run:

* the pure FLOP-rate model (flops/R + overhead) fitted to the same computes at the workload's
  cut and batch -- what simkit had before the traffic and kernel terms, measured side by side;
* held-out models: the width-8 and width-32 CNNs, measured but *not* fitted, predicted with the
  profile calibrated on the width-16 model (and with the FLOP-rate one) -- does a profile carry
  over to models it was not fitted on?
* in place: real simkit runs (split learning and FedAvg, 4 clients, 3 rounds, batch 32) on the
  calibrated profile (clients and server), the simulated compute time of a step against the host
  time of its torch work, timed inside the same runs -- is the simulated step the host's step?

Run:  python -m benchmarks.calibration [--quick] [--json FILE]
"""

from __future__ import annotations

import math
import statistics
import time

from benchmarks import parser, write_json

HELD_OUT = ({"width": 8}, {"width": 32})


def _err(ratios) -> float:
    return max(math.exp(abs(math.log(r))) for r in ratios)


def in_place(cal, batch: int) -> dict[str, float]:
    """Simulated / host time of a training step's computes inside real simkit runs (SL and FedAvg)
    on the calibrated profile: the host time is that of the step's torch work, timed around the
    work the algorithms run (``sl._step_work``, ``fedavg.local_step``)."""
    import simkit.algorithms.fedavg as fedavg
    import simkit.algorithms.sl as sl
    import simkit.world.fleet as fleet
    from simkit.config import DeviceProfile
    from simkit.run import run

    host = DeviceProfile(**cal.profile("host"))
    profiles = {**fleet.get_profiles(), "host": host,
                "hostsrv": host.model_copy(update={"name": "hostsrv", "kind": "server"})}
    spent = [0.0, 0]

    def timed(fn):
        def w(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return r
        return w

    orig_profiles, orig_step, orig_local = fleet.get_profiles, sl._step_work, fedavg.local_step
    fleet.get_profiles = lambda directory=None: profiles
    sl._step_work = timed(orig_step)
    fedavg.local_step = timed(orig_local)
    out = {}
    try:
        for algo, tags in (("sl", ("client_fwd", "server_step", "client_bwd")), ("fedavg", ("train",))):
            spent[:] = [0.0, 0]
            res = run({"name": "in-place", "fleet": {"counts": {"host": 4}}, "server": {"profile": "hostsrv"},
                       "algorithm": {"name": algo, "rounds": 3, **({"batched": "off"} if algo == "fedavg" else {})},
                       "workload": {"max_samples": 1200, "batch_size": batch}})
            comp = res.records["compute"]
            comp = comp[comp.tag.isin(tags)]
            steps = int((comp.tag == tags[0]).sum())
            if spent[1] != steps:   # (a step that did not run as one chain would escape the timing)
                raise RuntimeError(f"{algo}: timed {spent[1]} steps of {steps}")
            out[algo] = float((comp.end - comp.start).sum()) / spent[0]
    finally:
        fleet.get_profiles, sl._step_work, fedavg.local_step = orig_profiles, orig_step, orig_local
    return out


def main(argv=None) -> dict:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    import torch

    from simkit import scenario_from_dict
    from simkit.calibrate import PartTiming, fit, measure_parts

    torch.set_num_threads(1)
    sc = scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}})
    b, cut = sc.workload.batch_size, sc.workload.model.cut
    min_time, reps = (0.1, 3) if args.quick else (0.4, 7)
    errors, flop_only, held, held_flop, places = [], [], [], [], []
    for rep in range(args.reps or (1 if args.quick else 3)):
        parts = measure_parts(sc, min_time=min_time, reps=reps)
        cal = fit(parts, batch=b, cut=cut)
        errors.append(cal.error_max)
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in cal.ratios().items())
        print(f"rep {rep}: {cal.effective_flops / 1e9:.1f} GFLOP/s, "
              f"{(cal.traffic_bytes_per_s or math.inf) / 1e9:.2f} GB/s written, {cal.overhead_s * 1e6:.0f} us/compute "
              f"+ {cal.kernel_overhead_s * 1e6:.1f} us/kernel; simulated/measured at batch {b}: {ratios}; "
              f"error max {cal.error_max:.3f} (each of the {len(parts)} computes: {cal.fit_error_max:.3f})")
        at = cal.fidelity_points()
        plain = fit([PartTiming(p.part, p.flops, p.seconds, batch=p.batch, cut=p.cut) for p in at], batch=b, cut=cut)
        flop_only.append(plain.error_max)
        print(f"       FLOP-rate-only model ({len(at)} computes): {plain.effective_flops / 1e9:.1f} GFLOP/s + "
              f"{plain.overhead_s * 1e6:.0f} us; error max {plain.error_max:.3f}; on each of the {len(parts)} "
              f"computes {_err(plain.predicted(p.flops) / p.seconds for p in parts):.3f}")
        if args.quick:
            continue
        new_err, old_err = [], []
        for change in HELD_OUT:
            model = {**sc.workload.model.model_dump(), **change}
            other = scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}, "workload": {"model": model}})
            pts = measure_parts(other, batches=[b], cuts=[cut], min_time=min_time, reps=reps)
            rs, rs_old = cal.ratios(pts), plain.ratios([PartTiming(p.part, p.flops, p.seconds) for p in pts])
            new_err.append(_err(rs.values()))
            old_err.append(_err(rs_old.values()))
            print(f"       held out {change}: " + ", ".join(f"{k} {v:.3f}" for k, v in rs.items())
                  + "; FLOP-rate-only: " + ", ".join(f"{v:.3f}" for v in rs_old.values()))
        held.append(max(new_err))
        held_flop.append(max(old_err))
        place = in_place(cal, b)
        places.append(_err(place.values()))
        print("       in place (simulated / host time of the steps' torch work in real runs): "
              + ", ".join(f"{k} {v:.3f}" for k, v in place.items()))
    figures = {"calibration_error_max": statistics.median(errors)}
    print(f"calibration_error_max (median over reps): {figures['calibration_error_max']:.3f}  (target <= 1.25); "
          f"FLOP-rate-only model: {statistics.median(flop_only):.3f}"
          + (f"; held-out models: {statistics.median(held):.3f} (FLOP-rate-only {statistics.median(held_flop):.3f})"
             f"; in place: {statistics.median(places):.3f}" if held else ""))
    return write_json(args.json, figures)


if __name__ == "__main__":
    main()
