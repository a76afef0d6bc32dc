"""Bare variant: a plain PyTorch FedAvg loop in one process (the anchor's "bare variant").

Per round the clients are trained one after another from the global weights, their weights
averaged (weighted by training samples), then the global model is evaluated on every client's
test part. Run: ``python -m benchmarks.flower_app.bare``.
"""

from __future__ import annotations

from benchmarks.flower_app import task


def main() -> dict:
    t_in = task.now()
    parts = [task.load_partition(c) for c in range(task.NUM_CLIENTS)]
    net = task.new_model()
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    accs = []
    t_rounds = task.now()
    for rnd in range(1, task.ROUNDS + 1):
        acc_sum = {k: 0.0 for k in glob}
        n_sum = 0
        for cid, (xtr, ytr, _, _) in enumerate(parts):
            net.load_state_dict(glob)
            task.train(net, xtr, ytr, rnd, cid)
            for k, v in net.state_dict().items():
                acc_sum[k] = acc_sum[k] + v * len(ytr)
            n_sum += len(ytr)
        glob = {k: (v / n_sum).to(glob[k].dtype) for k, v in acc_sum.items()}
        net.load_state_dict(glob)
        correct = total = 0
        for _, _, xte, yte in parts:
            c, _ = task.evaluate(net, xte, yte)
            correct += c
            total += len(yte)
        accs.append(correct / total)
    t_end = task.now()
    out = {"variant": "bare", "final_accuracy": accs[-1], "accuracy_per_round": accs,
           "inside_s": t_end - t_in, "rounds_s": t_end - t_rounds, "test_samples": total}
    task.write_result(out)
    return out


if __name__ == "__main__":
    main()
