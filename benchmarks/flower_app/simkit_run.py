"""simkit variant: ``simkit.run.run`` of the scenario equivalent to the anchor's workload.

10 Raspberry Pi 4 clients on a star, digits IID, the cnn family at width 16 (the same three
layers as the anchor's model, cut after the first block -- the cut does not matter for FedAvg,
which trains the whole model), FedAvg 5 rounds, plain SGD lr 0.05, batch 32, 1 local epoch,
20 % of each client's samples held out for test, 1 torch thread.
Run: ``python -m benchmarks.flower_app.simkit_run``.
"""

from __future__ import annotations

import os
import time

ROUNDS = int(os.environ.get("SIMKIT_BENCH_ROUNDS", "5"))
CLIENTS = int(os.environ.get("SIMKIT_BENCH_CLIENTS", "10"))

SCENARIO = {
    "name": "flower-peer",
    "seed": 0,
    "fleet": {"counts": {"rpi4": CLIENTS}},
    "topology": {"kind": "star"},
    "workload": {"dataset": "digits", "partition": {"kind": "iid"},
                 "model": {"family": "cnn", "cut": 1, "width": 16}, "batch_size": 32, "test_fraction": 0.2},
    "algorithm": {"name": "fedavg", "rounds": ROUNDS, "lr": 0.05, "local_epochs": 1},
    "torch_threads": 1,
}


def main() -> dict:
    t_in = time.perf_counter()
    from simkit.run import run

    t_run = time.perf_counter()
    res = run(SCENARIO)
    t_end = time.perf_counter()
    s = res.summary
    # the layers simkit trains here (checked against the anchor's model by the driver)
    import torch

    from simkit.learning.models import build_split_model

    sm = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=16, generator=torch.Generator().manual_seed(0))
    model_layers = [repr(m) for m in list(sm.client) + list(sm.server)]
    acc_rounds = None
    if "accuracy_mean" in res.rounds:
        acc_rounds = [float(a) for a in res.rounds.sort_values("round")["accuracy_mean"]]
    # sample-weighted accuracy over all test samples (the anchor's figure); simkit's own
    # accuracy_mean is the unweighted mean of per-client accuracies
    cl = res.clients
    weighted = float((cl.accuracy * cl.n_test).sum() / cl.n_test.sum())
    out = {
        "variant": "simkit", "final_accuracy": weighted, "accuracy_mean_clients": s["accuracy_mean"],
        "accuracy_per_round": acc_rounds, "inside_s": t_end - t_in, "run_s": t_end - t_run,
        "host_wall_s": s["host_wall_s"], "sim_time_s": s["sim_time_s"], "bytes_up": s["bytes_up"],
        "bytes_down": s["bytes_down"], "bytes_total": s["bytes_total"], "energy_j_clients": s["energy_j_clients"],
        "energy_j_server": s["energy_j_server"], "energy_j_total": s["energy_j_total"],
        "client_flops": s["client_flops_fwd"] + s["client_flops_bwd"], "test_samples": int(cl.n_test.sum()),
        "train_samples": int(cl.n_train.sum()), "model_layers": model_layers,
    }
    print(f"simkit: simulated time {s['sim_time_s']:.4f} s, bytes up {s['bytes_up']:.0f} / down {s['bytes_down']:.0f}, "
          f"client energy {s['energy_j_clients']:.3f} J (server {s['energy_j_server']:.3f} J)", flush=True)
    from benchmarks.flower_app import task

    task.write_result(out)
    return out


if __name__ == "__main__":
    main()
