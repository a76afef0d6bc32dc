"""SplitFed (Thapa et al., AAAI 2022), versions 1 and 2.

``variant="v1"`` (default, "SFL-V1"):
Each round every available client, in parallel: receives the averaged client part from the
server, runs split-learning steps against *its own copy* of the server part (the server trains
the copies in parallel, queued on its ``slots``), then uploads its client part. At the end of the
round the server averages the client parts (FedAvg, weighted by training-set size) and the
server-part copies.

``variant="v2"`` ("SFL-V2"): the server keeps ONE server part, trained by every client's requests
in the order they arrive at the server (simulated time); only client parts are averaged.

Drop-out policy: a client that goes off mid-round is left out of both averages (its server copy
is discarded); the dropout is recorded.

Training ahead (V1): a V1 client's round touches no shared state -- its client part against its
own copy of the server part, from the global weights, with fresh optimisers -- which is FedAvg's
local training of the whole model split in two. So the round's real training is computed at the
round's start, ahead, and each client process runs the same costed split steps (computes,
activation and gradient transfers) without the torch work: one client after another
(:meth:`SplitFed.train_ahead`, split learning's own torch phases, in one working client part and
server copy per model group), or batched (``algorithm.batched: on | auto``,
:mod:`simkit.algorithms.batching`; ``SplitFed.batching`` logs what was batched and why). V2's
clients share one server part in arrival order, so V2 trains each step's torch work at its
computes, one client's part each (``on`` warns).
"""

from __future__ import annotations

import copy

from torch import nn

from simkit.algorithms.base import Algorithm, ClientRuntime, Unavailable, average_states
from simkit.algorithms.batching import Precomputed, RoundBatcher, round_orders, warn_not_batchable, working_model
from simkit.algorithms.sl import _torch_phases, split_steps


def _clone(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class SplitFed(Algorithm):
    name = "splitfed"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_client = {k: _clone(m) for k, m in ctx.client_templates.items()}
        self.global_server = _clone(ctx.server_template)
        self.client_bytes = {k: ctx.model_bytes(m) for k, m in ctx.client_templates.items()}
        #: V2: client name -> its client part
        self.workers: dict[str, nn.Module] = {}
        #: V1: model key -> the (client part, server copy) its clients train in (working_model)
        self.scratch: dict[str, nn.Sequential] = {}
        self.v2 = getattr(self.spec, "variant", "v1") == "v2"
        if self.v2:
            self.shared_server = copy.deepcopy(ctx.server_template)
            self.shared_opt = ctx.optimizer(self.shared_server.parameters())
        if self.v2:   # V2 rounds share the server part: never trained ahead
            warn_not_batchable(ctx, "SplitFed v2", "clients train one shared server part in arrival order")
        self.batcher = RoundBatcher(ctx, "off" if self.v2 else self.spec.batched)
        #: one entry per round and model group when batching is on/auto (see RoundBatcher.batching)
        self.batching = self.batcher.batching

    def worker(self, c: ClientRuntime):
        """V2: ``c``'s own client part (its steps interleave with other clients' on the shared server)."""
        w = self.workers.get(c.name)
        if w is None:
            w = self.workers[c.name] = copy.deepcopy(self.ctx.client_templates[c.key])
        return w

    def train_ahead(self, clients: list[ClientRuntime], rnd: int) -> dict[str, Precomputed]:
        """V1: train ``clients``' round ``rnd`` from the global weights, one after another (their
        batch orders drawn first, in one go), each step split learning's torch phases (client
        forward, server step on the client's server copy, client backward), fresh optimisers per
        client; their batch orders and resulting weights by client name."""
        ctx, spec = self.ctx, self.spec
        orders = round_orders(ctx, clients, rnd, spec.local_epochs)
        out = {}
        for c, order in zip(clients, orders):
            cmodel, smodel = working_model(self.scratch, ctx, c.key, self.global_client[c.key], self.global_server)
            copt, sopt = ctx.optimizer(cmodel.parameters()), ctx.optimizer(smodel.parameters())
            x, y = c.x_train, c.y_train
            for batches in order:
                for idx in batches:
                    forward, server_step, backward = _torch_phases(cmodel, copt, smodel, sopt, x[idx], y[idx])
                    backward(server_step(forward()))
            out[c.name] = Precomputed(order, _clone(cmodel), _clone(smodel))
        return out

    def run(self):
        ctx, env = self.ctx, self.ctx.env
        for rnd in range(self.spec.rounds):
            ctx.recorder.round = rnd
            start = env.now
            chosen = [c for c in ctx.clients if ctx.available(c, rnd)]
            pre = self.batcher.precompute(chosen, rnd, self.spec.local_epochs, self.global_client, self.global_server)
            if ctx.train and not self.v2:   # the V1 clients not batched: one after another
                pre.update(self.train_ahead([c for c in chosen if c.name not in pre], rnd))
            done = yield env.all_of([env.process(self.client_round(c, rnd, pre.get(c.name))) for c in chosen])
            updates = [v for v in done.values() if v is not None]
            if updates:
                yield from self.aggregate(updates)
            ctx.recorder.round_done(start, env.now, len(updates))
            self.maybe_evaluate(rnd)

    def client_round(self, c: ClientRuntime, rnd: int, pre: Precomputed | None = None):
        ctx, spec = self.ctx, self.spec
        server = ctx.world.server
        try:
            yield ctx.send(server, c.device, self.client_bytes[c.key], "model_down")
            cmodel = smodel = copt = sopt = None
            real = ctx.train and pre is None   # V1: trained ahead at the start of the round
            if real:   # V2
                cmodel = self.worker(c)
                cmodel.load_state_dict(self.global_client[c.key])
                copt = ctx.optimizer(cmodel.parameters())
                smodel, sopt = self.shared_server, self.shared_opt
            batches = [idx for e in range(spec.local_epochs)
                       for idx in (pre.orders[e] if pre is not None else ctx.epoch_order(c, rnd * spec.local_epochs + e))]
            yield from split_steps(ctx, c, lambda: (cmodel, copt, smodel, sopt), batches, real=real)
            if pre is not None:
                result = (pre.client_state, pre.server_state, c.n_train, c.key)
            elif ctx.train:   # V2
                result = (_clone(cmodel), None, c.n_train, c.key)
            else:
                result = (None, None, c.n_train, c.key)
            yield ctx.send(c.device, server, self.client_bytes[c.key], "model_up")
            ctx.finished[c.name] = ctx.finished.get(c.name, 0) + 1
            return result
        except Unavailable as exc:
            ctx.dropped(c, exc)
            return None

    def aggregate(self, updates):
        n_params = 0 if self.v2 else sum(t.numel() for t in self.global_server.values())
        n_params += sum(t.numel() for s in self.global_client.values() for t in s.values())

        def work():
            if self.v2:
                self.global_server = _clone(self.shared_server)
            else:
                self.global_server = average_states([u[1] for u in updates], [u[2] for u in updates])
            for key in self.global_client:
                group = [u for u in updates if u[3] == key]
                if group:
                    self.global_client[key] = average_states([u[0] for u in group], [u[2] for u in group])

        yield from self.ctx.aggregate_compute(n_params, len(updates), work)

    def final_states(self) -> dict[str, dict]:
        return {"server": self.global_server, **{f"client/{k}": v for k, v in self.global_client.items()}}

    def evaluate(self) -> None:
        ctx = self.ctx
        if not ctx.train:
            for c in ctx.clients:
                ctx.evaluate_client(c, None)
            return
        server = copy.deepcopy(ctx.server_template)
        server.load_state_dict(self.global_server)
        server.eval()
        models = {}
        for key, state in self.global_client.items():
            m = copy.deepcopy(ctx.client_templates[key])
            m.load_state_dict(state)
            m.eval()
            models[key] = m
        for c in ctx.clients:
            ctx.evaluate_client(c, lambda x, m=models[c.key]: server(m(x)))
