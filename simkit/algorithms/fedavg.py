"""FedAvg (McMahan et al., AISTATS 2017) with FedProx's proximal term (Li et al., MLSys 2020).

Each round the server picks ``max(1, round(fraction * N))`` of the clients that are available
(seeded), sends each the whole model (client part + server part), each trains ``local_epochs``
over its own data, sends its weights back, and the server averages the returned weights, weighted
by the clients' training-set sizes. With ``mu > 0`` the local loss gains ``mu/2 ||w - w_global||^2``.

Drop-out policy: a client that goes off mid-round (or whose transfer is aborted) returns nothing;
the server averages whatever came back (the global model is unchanged if nothing did). The
dropout is recorded. In the "mixed" workload each dataset group has its own client backbone:
backbones are averaged within their group, the server part over everyone.

Training ahead: every chosen client starts from the same global weights and touches no shared
state, so when its torch work runs in host time cannot change anything. The round's real
training is therefore computed at the round's start, ahead, while each client process runs the
same costed steps in simulated time (the update of a client that drops out is discarded as
before): one client after another (:meth:`FedAvg.train_ahead`, each client's steps back to back,
not interleaved with other clients' events, which keeps the host's caches warm), or batched
(``algorithm.batched: on | auto``, :mod:`simkit.algorithms.batching`; ``FedAvg.batching`` logs
what was batched and why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms.base import (
    Algorithm,
    ClientRuntime,
    Unavailable,
    average_states,
    batch_len,
)
from simkit.algorithms.batching import Precomputed, RoundBatcher, round_orders, working_model
from simkit.learning.losses import proximal_term


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def local_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, idx,
               anchor: list | None, mu: float) -> None:
    """One local step of FedAvg on the batch ``idx`` of ``(x, y)`` (with FedProx's proximal term
    towards ``anchor``, the round's start weights, if given)."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    if anchor is not None:
        loss = loss + proximal_term(model.parameters(), anchor, mu)
    loss.backward()
    opt.step()


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_client = {k: _clone_state(m) for k, m in ctx.client_templates.items()}
        self.global_server = _clone_state(ctx.server_template)
        self.rng = ctx.seeds.numpy("fedavg.select")
        #: model key -> the whole model its clients train in, one after another (train_ahead)
        self.scratch: dict[str, nn.Sequential] = {}
        self.whole_bytes = {k: ctx.model_bytes(m) + ctx.model_bytes(ctx.server_template)
                            for k, m in ctx.client_templates.items()}
        self.batcher = RoundBatcher(ctx, self.spec.batched)
        #: one entry per round and model group when batching is on/auto: round, key, clients,
        #: batched (bool) and the reason
        self.batching = self.batcher.batching
        #: model key -> batch size -> (fwd, bwd FLOPs, bytes written, kernels) of one local step of the whole model
        self._step_costs: dict[str, dict[int, tuple[float, float]]] = {}

    def train_ahead(self, clients: list[ClientRuntime], rnd: int) -> dict[str, Precomputed]:
        """Train ``clients``' round ``rnd`` from the global weights, one after another (the loop of
        a client's round: load the global weights, a fresh optimiser, per batch :func:`local_step`);
        their batch orders and resulting weights by client name. The batch orders are drawn
        first, in one go."""
        ctx, spec = self.ctx, self.spec
        orders = round_orders(ctx, clients, rnd, spec.local_epochs)
        out = {}
        for c, order in zip(clients, orders):
            model = working_model(self.scratch, ctx, c.key, self.global_client[c.key], self.global_server)
            opt = ctx.optimizer(model.parameters())
            anchor = [p.detach().clone() for p in model.parameters()] if spec.mu > 0 else None
            x, y = c.x_train, c.y_train
            for batches in order:
                for idx in batches:
                    local_step(model, opt, x, y, idx, anchor, spec.mu)
            out[c.name] = Precomputed(order, _clone_state(model[0]), _clone_state(model[1]))
        return out

    def select(self, rnd: int) -> list[ClientRuntime]:
        ctx = self.ctx
        avail = [c for c in ctx.clients if ctx.available(c, rnd)]
        m = max(1, round(self.spec.fraction * len(ctx.clients)))
        if m >= len(avail):
            return avail
        idx = sorted(self.rng.choice(len(avail), size=m, replace=False).tolist())
        return [avail[i] for i in idx]

    def run(self):
        ctx, env = self.ctx, self.ctx.env
        for rnd in range(self.spec.rounds):
            ctx.recorder.round = rnd
            start = env.now
            chosen = self.select(rnd)
            pre = self.batcher.precompute(chosen, rnd, self.spec.local_epochs, self.global_client, self.global_server,
                                          mu=self.spec.mu)
            if ctx.train:   # the clients not batched: one after another
                pre.update(self.train_ahead([c for c in chosen if c.name not in pre], rnd))
            procs = [env.process(self.client_round(c, rnd, pre.get(c.name))) for c in chosen]
            done = yield env.all_of(procs)
            updates = [v for v in done.values() if v is not None]
            if updates:
                yield from self.aggregate(updates)
            ctx.recorder.round_done(start, env.now, len(updates))
            self.maybe_evaluate(rnd)

    def client_round(self, c: ClientRuntime, rnd: int, pre: Precomputed | None = None):
        """``c``'s round (SimPy process): download, local epochs (their costed steps), upload; its
        update, or None if it dropped out. ``pre``: its training, done ahead (None: the fast
        mode, no training)."""
        ctx, spec = self.ctx, self.spec
        server, dev = ctx.world.server, c.device
        try:
            yield ctx.send(server, dev, self.whole_bytes[c.key], "model_down")
            costs = self._step_costs.get(c.key)   # batch size -> (fwd, bwd FLOPs, bytes, kernels) of a local step
            if costs is None:
                costs = self._step_costs[c.key] = {}
            for e in range(spec.local_epochs):
                order = pre.orders[e] if pre is not None else ctx.epoch_order(c, rnd * spec.local_epochs + e)
                for idx in order:
                    b = batch_len(idx)
                    cost = costs.get(b)
                    if cost is None:
                        cf = ctx.flops(ctx.client_templates[c.key], "client", c.key, b, input_grad=False)
                        sf = ctx.flops(ctx.server_template, "server", c.key, b, input_grad=True)
                        cost = costs[b] = (cf.fwd + sf.fwd, cf.bwd + sf.bwd, cf.nbytes + sf.nbytes,
                                           cf.kernels + sf.kernels)
                    yield from ctx.client_compute(c, cost[0], cost[1], "train", None, cost[2], cost[3])
            result = (pre.client_state, pre.server_state) if pre is not None else (None, None)
            yield ctx.send(dev, server, self.whole_bytes[c.key], "model_up")
            ctx.finished[c.name] = ctx.finished.get(c.name, 0) + 1
            return result + (c.n_train, c.key)
        except Unavailable as exc:
            ctx.dropped(c, exc)
            return None

    def aggregate(self, updates):
        ctx = self.ctx
        n_params = sum(t.numel() for t in self.global_server.values())
        n_params += sum(t.numel() for s in self.global_client.values() for t in s.values())

        def work():
            self.global_server = average_states([u[1] for u in updates], [u[2] for u in updates])
            for key in self.global_client:
                group = [u for u in updates if u[3] == key]
                if group:
                    self.global_client[key] = average_states([u[0] for u in group], [u[2] for u in group])

        yield from ctx.aggregate_compute(n_params, len(updates), work)

    def final_states(self) -> dict[str, dict]:
        return {"server": self.global_server, **{f"client/{k}": v for k, v in self.global_client.items()}}

    def evaluate(self) -> None:
        ctx = self.ctx
        if not ctx.train:
            for c in ctx.clients:
                ctx.evaluate_client(c, None)
            return
        evals = {}   # fresh copies (the training ones stay in training mode)
        for key, state in self.global_client.items():
            working_model(evals, ctx, key, state, self.global_server).eval()
        for c in ctx.clients:
            ctx.evaluate_client(c, evals[c.key])
