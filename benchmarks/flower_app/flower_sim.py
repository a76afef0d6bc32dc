"""Flower variant: the anchor's workload under ``flwr.simulation.run_simulation`` (Message API).

A ``ServerApp`` runs ``flwr.serverapp.strategy.FedAvg`` (all nodes train and evaluate every
round) for 5 rounds; a ``ClientApp`` with ``@app.train()`` / ``@app.evaluate()`` handlers
trains / evaluates on the partition named by ``context.node_config["partition-id"]``.
10 supernodes, ``client_resources = {num_cpus: 1, num_gpus: 0}`` (Ray gets every CPU).
Run: ``python -m benchmarks.flower_app.flower_sim`` (needs ``pip install -e ".[flower]"``).
"""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks.flower_app import task

client_app = ClientApp()
server_app = ServerApp()
_SERVER_OUT: dict = {}


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    t0 = task.now()
    cid = int(context.node_config["partition-id"])
    xtr, ytr, _, _ = task.load_partition(cid, int(context.node_config["num-partitions"]))
    net = task.Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    loss = task.train(net, xtr, ytr, rnd, cid)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(ytr), "handler_s": task.now() - t0})
    return Message(content=RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    cid = int(context.node_config["partition-id"])
    _, _, xte, yte = task.load_partition(cid, int(context.node_config["num-partitions"]))
    net = task.Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    correct, loss = task.evaluate(net, xte, yte)
    metrics = MetricRecord({"eval_acc": correct / len(yte), "eval_loss": loss / len(yte), "num-examples": len(yte)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    n = task.NUM_CLIENTS
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                      min_available_nodes=n)
    t0 = task.now()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(task.new_model().state_dict()),
                            num_rounds=task.ROUNDS)
    _SERVER_OUT["rounds_s"] = task.now() - t0
    ev = result.evaluate_metrics_clientapp
    _SERVER_OUT["accuracy_per_round"] = [float(ev[r]["eval_acc"]) for r in sorted(ev)]


def main() -> dict:
    from flwr.simulation import run_simulation

    t0 = task.now()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=task.NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}})
    t1 = task.now()
    accs = _SERVER_OUT.get("accuracy_per_round") or [float("nan")]
    import flwr
    import ray

    out = {"variant": "flower", "final_accuracy": accs[-1], "accuracy_per_round": accs, "inside_s": t1 - t0,
           "rounds_s": _SERVER_OUT.get("rounds_s"), "flwr": flwr.__version__, "ray": ray.__version__}
    task.write_result(out)
    return out


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    main()
