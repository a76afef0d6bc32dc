"""Compute-model fidelity: calibrate a profile on this host, then compare simulated and measured
step times for three model sizes (client part, server part, whole model) of the digits CNN.

Run:  python -m benchmarks.calibration [--quick] [--json FILE]
"""

from __future__ import annotations

import statistics

from benchmarks import parser, write_json


def main(argv=None) -> dict:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    import torch

    from simkit import scenario_from_dict
    from simkit.calibrate import calibrate

    torch.set_num_threads(1)
    sc = scenario_from_dict({"fleet": {"counts": {"rpi4": 1}}})
    errors = []
    for rep in range(args.reps or (1 if args.quick else 3)):
        cal = calibrate(sc, min_time=0.1 if args.quick else 0.4, reps=3 if args.quick else 7)
        errors.append(cal.error_max)
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in cal.ratios().items())
        print(f"rep {rep}: {cal.effective_flops / 1e9:.2f} GFLOP/s effective, {cal.overhead_s * 1e6:.0f} us overhead; "
              f"simulated/measured: {ratios}; error max {cal.error_max:.3f}")
    out = {"calibration_error_max": statistics.median(errors)}
    print(f"calibration_error_max (median over reps): {out['calibration_error_max']:.3f}  (target <= 1.25)")
    return write_json(args.json, out)


if __name__ == "__main__":
    main()
