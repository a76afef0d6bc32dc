"""Sensitivity of AdaSplit to its knobs: kappa, eta, lambda and return_gradients.

One knob at a time around the defaults (kappa 0.5 here so there is a global phase to study,
eta 0.3, lambda 1e-6, gradients returned), on the same heterogeneous setting as
``adasplit_vs_baselines.py``. One table per knob shows how it trades accuracy against bytes,
client compute, simulated time and client energy.

Run:  python studies/adasplit_sensitivity.py [--out DIR] [--executor serial|pool|ray]
                                              [--address ADDR] [--quick]
"""

from __future__ import annotations

from adasplit_vs_baselines import EPOCHS, QUICK_EPOCHS, base

from simkit.study import Study, finish_script, script_arguments

KNOBS = {
    "kappa": [0.25, 0.5, 0.75, 0.9],
    "eta": [0.1, 0.3, 0.6, 1.0],
    "lambda": [0.0, 1e-6, 1e-3, 1e-1],
    "return_gradients": [True, False],
}
QUICK_KNOBS = {"kappa": [0.5, 0.9], "eta": [0.1, 0.6], "lambda": [0.0, 0.1], "return_gradients": [True, False]}
DEFAULTS = {"kappa": 0.5, "eta": 0.3, "lambda": 1e-6, "return_gradients": True}


def build(args) -> Study:
    knobs = QUICK_KNOBS if args.quick else KNOBS
    epochs = QUICK_EPOCHS + 1 if args.quick else EPOCHS
    changes, seen = [], set()
    for knob, values in knobs.items():
        for v in values:
            point = {**DEFAULTS, knob: v}
            key = tuple(sorted(point.items()))
            if key in seen:  # the default point is shared by every knob's sweep
                continue
            seen.add(key)
            changes.append({"algorithm": {"name": "adasplit", "rounds": epochs, **point}})
    return Study("adasplit-sensitivity", base(args.quick), changes=changes, seeds=[0] if args.quick else [0, 1],
                 budgets={"max_bytes": 200e6, "max_client_flops": 20e12}, out=args.out)


if __name__ == "__main__":
    ap = script_arguments(__doc__.splitlines()[0], default_out="results/adasplit_sensitivity")
    args = ap.parse_args()
    tables = [(f"{knob} (the others at their defaults)", [f"algo_{knob}"],
               {f"algo_{k}": v for k, v in DEFAULTS.items() if k != knob}) for knob in KNOBS]
    finish_script(build(args), args, title="AdaSplit sensitivity: kappa, eta, lambda, return_gradients",
                  tables=tables, note="Each table varies one knob with the others at their defaults "
                                      f"({', '.join(f'{k}={v}' for k, v in DEFAULTS.items())}).")
