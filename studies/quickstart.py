"""Quickstart: FedAvg, vanilla split learning and SplitFed on one mixed fleet.

8 clients on a two-tier topology (devices -> 2 edge gateways -> cloud server with a T4): three
mid-range phones on LTE, two Raspberry Pi 4 and two Raspberry Pi 5 on Wi-Fi, one laptop on
Wi-Fi. Each trains a small split CNN on scikit-learn's 8x8 digits (embedded, nothing is
downloaded). Prints a table of accuracy, bytes, client FLOPs, simulated time and energy (with a
progress bar while it runs), writes ``results/quickstart/summary.csv`` and ``summary.md``, and an
offline HTML report in ``results/quickstart/report/``.

Run:  python studies/quickstart.py [--out DIR] [--rounds N] [--seed S]
                                   [--executor serial|pool|ray] [--address ADDR] [--quick]
"""

from __future__ import annotations

from simkit.study import Study, finish_script, script_arguments

BASE = {
    "name": "quickstart",
    "fleet": {
        "counts": {"phone-midrange": 3, "rpi4": 2, "rpi5": 2, "laptop": 1},
        "access": {"phone-midrange": "lte", "rpi4": "wifi", "rpi5": "wifi", "laptop": "wifi"},
        "speed_jitter": 0.1,
        "bandwidth_jitter": 0.1,
    },
    "server": {"profile": "server-t4", "slots": 1},
    "topology": {"kind": "two_tier", "gateways": 2},
    "workload": {"dataset": "digits", "partition": {"kind": "iid"}, "model": {"family": "cnn", "cut": 1},
                 "batch_size": 32},
    "algorithm": {"name": "fedavg"},
}
ALGORITHMS = [
    {"name": "fedavg", "lr": 0.1, "momentum": 0.9, "local_epochs": 2},
    {"name": "sl", "lr": 0.05, "momentum": 0.9},
    {"name": "splitfed", "lr": 0.1, "momentum": 0.9},
]


def build(args) -> Study:
    rounds = 3 if args.quick else args.rounds
    changes = [{"algorithm": {**a, "rounds": rounds}} for a in ALGORITHMS]
    return Study("quickstart", BASE, changes=changes, seeds=[args.seed],
                 budgets={"max_bytes": 50e6, "max_client_flops": 50e9}, out=args.out)


if __name__ == "__main__":
    ap = script_arguments(__doc__.splitlines()[0], default_out="results/quickstart")
    ap.add_argument("--rounds", type=int, default=8, help="rounds (epochs) per algorithm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    finish_script(build(args), args, title="Quickstart: FedAvg vs split learning vs SplitFed on a mixed fleet",
                  tables=[("Algorithms", ["algorithm"])],
                  note="8 clients: 3 phones on LTE, 4 Raspberry Pis and a laptop on Wi-Fi; digits, IID; "
                       "budgets for C3: 50 MB, 50 GFLOP of client compute.")
