"""What if the fleet were different? The same AdaSplit workload on fleets that differ in their
device and network mix: all Wi-Fi, half on LTE, phones on 5G, only Raspberry Pis, only phones.

Everything but the fleet is fixed (digits, IID, AdaSplit with kappa 0.5, the same epochs), so the
tables show how simulated time and energy move with the devices and their links. With
``--fast N`` the fleets have N devices each and run in the fast what-if mode (the identical
protocol and costs without tensors; AdaSplit with random selection so the schedule does not
depend on learned values; accuracy is not estimated).

Run:  python studies/fleet_whatif.py [--out DIR] [--executor serial|pool|ray] [--address ADDR]
                                     [--quick] [--fast N]
"""

from __future__ import annotations

from simkit.study import Study, finish_script, script_arguments


def fleets(n: int) -> dict[str, dict]:
    half = n // 2
    return {
        "all-wifi": {"counts": {"phone-midrange": half, "rpi4": n - half},
                     "access": {"phone-midrange": "wifi", "rpi4": "wifi"}},
        "half-lte": {"counts": {"phone-midrange": half, "rpi4": n - half},
                     "access": {"phone-midrange": "lte", "rpi4": "wifi"}},
        "phones-5g": {"counts": {"phone-midrange": half, "rpi4": n - half},
                      "access": {"phone-midrange": "5g", "rpi4": "wifi"}},
        "only-pis": {"counts": {"rpi4": n}, "access": {"rpi4": "wifi"}},
        "only-phones-lte": {"counts": {"phone-midrange": n}, "access": {"phone-midrange": "lte"}},
    }


def build(args) -> Study:
    fast = args.fast is not None
    n = args.fast if fast else 10
    epochs = 4 if args.quick else 8
    base = {
        "name": "fleet-whatif",
        "train": not fast,
        "record_timeline": not fast,
        "fleet": fleets(n)["all-wifi"],
        "server": {"profile": "server-t4", "slots": 2},
        "topology": {"kind": "two_tier", "gateways": max(2, n // 100)},
        "workload": {"dataset": "digits", "batch_size": 16,
                     **({"samples_per_client": 64} if fast else {"max_samples": 80 if args.quick else 170})},
        "algorithm": {"name": "adasplit", "kappa": 0.5, "rounds": epochs,
                      **({"selection": "random"} if fast else {})},
    }
    changes = [{"fleet": {**f, "speed_jitter": 0.1, "bandwidth_jitter": 0.1}, "name": name}
               for name, f in fleets(n).items()]
    return Study("fleet-whatif", base, changes=changes, seeds=[0] if args.quick else [0, 1], out=args.out)


if __name__ == "__main__":
    ap = script_arguments(__doc__.splitlines()[0], default_out="results/fleet_whatif")
    ap.add_argument("--fast", type=int, default=None, metavar="N",
                    help="fleets of N devices in the fast what-if mode (no tensors)")
    args = ap.parse_args()
    finish_script(build(args), args, title="Fleet what-if: the same AdaSplit workload on different fleets",
                  tables=[("Fleets", ["scenario"])],
                  note="scenario = the fleet variant. Time and energy come from the modelled devices and links.")
