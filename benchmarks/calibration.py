"""Compute-model fidelity: calibrate a profile on this host, then compare simulated and measured
step times for three model sizes (client part, server part, whole model) of the digits CNN.

Each repetition calibrates afresh (``simkit.calibrate``: client and server parts at cuts 1 and 2 and
the whole model, at batch 16, 32 and 64, fitted to flops/R + bytes/B + overhead + kernels *
per_kernel) and reports the ratios at the workload's cut (1) and batch (32):
``calibration_error_max`` is their median over repetitions. Printed beside it, from the same
measured points:

* the pure FLOP-rate model (flops/R + overhead) fitted as simkit did before the traffic and kernel
  terms (to the three parts at the workload's cut and batch) -- the gain, measured side by side;
* held-out models: the width-8 and width-32 CNNs, measured but *not* fitted, predicted with the
  profile calibrated on the width-16 model (and with the FLOP-rate one) -- does a profile carry
  over to models it was not fitted on?

Run:  python -m benchmarks.calibration [--quick] [--json FILE]
"""

from __future__ import annotations

import math
import statistics

from benchmarks import parser, write_json

HELD_OUT = ({"width": 8}, {"width": 32})


def _err(ratios) -> float:
    return max(math.exp(abs(math.log(r))) for r in ratios)


def main(argv=None) -> dict:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    import torch

    from simkit import scenario_from_dict
    from simkit.calibrate import PartTiming, fit, measure_parts

    torch.set_num_threads(1)
    sc = scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}})
    b = sc.workload.batch_size
    min_time, reps = (0.1, 3) if args.quick else (0.4, 7)
    errors, flop_only, held, held_flop = [], [], [], []
    for rep in range(args.reps or (1 if args.quick else 3)):
        parts = measure_parts(sc, min_time=min_time, reps=reps)
        cal = fit(parts, batch=b, cut=sc.workload.model.cut)
        errors.append(cal.error_max)
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in cal.ratios().items())
        print(f"rep {rep}: {cal.effective_flops / 1e9:.1f} GFLOP/s, "
              f"{(cal.traffic_bytes_per_s or math.inf) / 1e9:.2f} GB/s written, {cal.overhead_s * 1e6:.0f} us/step "
              f"+ {cal.kernel_overhead_s * 1e6:.1f} us/kernel; simulated/measured at batch {b}: {ratios}; "
              f"error max {cal.error_max:.3f} (all {len(parts)} points {cal.fit_error_max:.3f})")
        plain = fit([PartTiming(p.part, p.flops, p.seconds, batch=p.batch, cut=p.cut) for p in cal.fidelity_points()],
                    batch=b, cut=cal.cut)
        flop_only.append(plain.error_max)
        print(f"       FLOP-rate-only model (3 points): {plain.effective_flops / 1e9:.1f} GFLOP/s + "
              f"{plain.overhead_s * 1e6:.0f} us; error max {plain.error_max:.3f}; on all {len(parts)} points "
              f"{_err(plain.predicted(p.flops) / p.seconds for p in parts):.3f}")
        if args.quick:
            continue
        new_err, old_err = [], []
        for change in HELD_OUT:
            model = {**sc.workload.model.model_dump(), **change}
            other = scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}, "workload": {"model": model}})
            pts = measure_parts(other, batches=[b], cuts=[sc.workload.model.cut], min_time=min_time, reps=reps)
            rs = [cal.ratio(p) for p in pts]
            rs_old = [plain.predicted(p.flops) / p.seconds for p in pts]
            new_err.append(_err(rs))
            old_err.append(_err(rs_old))
            print(f"       held out {change}: " + ", ".join(f"{p.part} {r:.3f}" for p, r in zip(pts, rs))
                  + "; FLOP-rate-only: " + ", ".join(f"{r:.3f}" for r in rs_old))
        held.append(max(new_err))
        held_flop.append(max(old_err))
    figures = {"calibration_error_max": statistics.median(errors)}
    print(f"calibration_error_max (median over reps): {figures['calibration_error_max']:.3f}  (target <= 1.25); "
          f"FLOP-rate-only model: {statistics.median(flop_only):.3f}"
          + (f"; held-out models: {statistics.median(held):.3f} (FLOP-rate-only {statistics.median(held_flop):.3f})"
             if held else ""))
    return write_json(args.json, figures)


if __name__ == "__main__":
    main()
