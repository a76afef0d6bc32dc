"""FedAvg (McMahan et al., AISTATS 2017) with FedProx's proximal term (Li et al., MLSys 2020).

Each round the server picks ``max(1, round(fraction * N))`` of the clients that are available
(seeded), sends each the whole model (client part + server part), each trains ``local_epochs``
over its own data, sends its weights back, and the server averages the returned weights, weighted
by the clients' training-set sizes. With ``mu > 0`` the local loss gains ``mu/2 ||w - w_global||^2``.

Drop-out policy: a client that goes off mid-round (or whose transfer is aborted) returns nothing;
the server averages whatever came back (the global model is unchanged if nothing did). The
dropout is recorded. In the "mixed" workload each dataset group has its own client backbone:
backbones are averaged within their group, the server part over everyone.

Batched local training (``algorithm.batched: on | auto``; :mod:`simkit.learning.batched`): the
local training of a client touches no shared state (every chosen client starts from the same
global weights, with a fresh optimiser, on its own data), so the real training of all the round's
clients is computed at once, vectorised, at the start of the round, before the models are sent.
Each client process then runs exactly the same costed steps (compute, transfers, dropouts: the
same records and timeline as ``off``) without real work, and uploads its precomputed weights; a
client that drops out discards its precomputed update just as the sequential path discards its
partial one. The weights equal the sequential path's up to rounding (float64: ~1e-15).
``auto`` batches a model group when it is supported, has at least 2 clients in the round and is
within the measured range (:func:`~simkit.learning.batched.prefer_batched`, a fixed rule on the
model's FLOPs per step, never a timing, so runs stay deterministic). Whether and why each round/model group was batched is kept in
``FedAvg.batching``; ``on`` with an unsupported model warns (``BatchedFallbackWarning``) and
trains sequentially.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms.base import Algorithm, ClientRuntime, Unavailable, average_states, batch_len
from simkit.learning.batched import (BatchedFallbackWarning, ClientJob, OptimSpec, Unsupported, compile_program,
                                     prefer_batched, train_local_batched)
from simkit.learning.losses import proximal_term

log = logging.getLogger(__name__)


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class _Precomputed:
    """A client's round, trained ahead (batched): its batch orders and its resulting weights."""

    orders: list  # per local epoch, the batches (for the costed steps)
    client_state: dict
    server_state: dict


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_client = {k: _clone_state(m) for k, m in ctx.client_templates.items()}
        self.global_server = _clone_state(ctx.server_template)
        self.rng = ctx.seeds.numpy("fedavg.select")
        self.workers: dict[str, nn.Sequential] = {}
        self.whole_bytes = {k: ctx.model_bytes(m) + ctx.model_bytes(ctx.server_template)
                            for k, m in ctx.client_templates.items()}
        #: one entry per round and model group when batching is on/auto: round, key, clients,
        #: batched (bool) and the reason
        self.batching: list[dict] = []
        self._unsupported: dict[str, str | None] = {}
        #: model key -> batch size -> (fwd, bwd) FLOPs of one local step of the whole model
        self._step_costs: dict[str, dict[int, tuple[float, float]]] = {}

    def worker(self, c: ClientRuntime) -> nn.Sequential:
        m = self.workers.get(c.name)
        if m is None:
            m = nn.Sequential(copy.deepcopy(self.ctx.client_templates[c.key]), copy.deepcopy(self.ctx.server_template))
            self.workers[c.name] = m
        return m

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
            pre = self.precompute(chosen, rnd) if (self.spec.batched != "off" and ctx.train) else {}
            procs = [env.process(self.client_round(c, rnd, pre.get(c.name))) for c in chosen]
            done = yield env.all_of(procs)
            updates = [v for v in done.values() if v is not None]
            if updates:
                yield from self.aggregate(updates)
            ctx.recorder.round_done(start, env.now, len(updates))
            self.maybe_evaluate(rnd)

    def client_round(self, c: ClientRuntime, rnd: int, pre: _Precomputed | None = None):
        ctx, env, spec = self.ctx, self.ctx.env, self.spec
        server, dev = ctx.world.server, c.device
        try:
            yield ctx.send(server, dev, self.whole_bytes[c.key], "model_down")
            model = opt = anchor = None
            if ctx.train and pre is None:
                model = self.worker(c)
                model[0].load_state_dict(self.global_client[c.key])
                model[1].load_state_dict(self.global_server)
                opt = ctx.optimizer(model.parameters())
                anchor = [p.detach().clone() for p in model.parameters()] if spec.mu > 0 else None
            real = ctx.train and pre is None   # batched: the real work was done at the start of the round
            costs = self._step_costs.get(c.key)   # batch size -> (fwd, bwd) FLOPs of a local step
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
                        cost = costs[b] = (cf.fwd + sf.fwd, cf.bwd + sf.bwd)
                    step = None
                    if real:
                        def step(idx=idx):
                            opt.zero_grad(set_to_none=True)
                            loss = F.cross_entropy(model(c.x_train[idx]), c.y_train[idx])
                            if anchor is not None:
                                loss = loss + proximal_term(model.parameters(), anchor, spec.mu)
                            loss.backward()
                            opt.step()

                    yield from ctx.client_compute(c, cost[0], cost[1], "train", step)
            if pre is not None:
                result = (pre.client_state, pre.server_state, c.n_train, c.key)
            else:
                result = ((_clone_state(model[0]), _clone_state(model[1])) if ctx.train else (None, None)) + \
                    (c.n_train, c.key)
            yield ctx.send(dev, server, self.whole_bytes[c.key], "model_up")
            ctx.finished[c.name] = ctx.finished.get(c.name, 0) + 1
            return result
        except Unavailable as exc:
            ctx.dropped(c, exc)
            return None

    # -- batched local training ---------------------------------------------------------------
    def _unsupported_reason(self, key: str) -> str | None:
        """Why the whole model of group ``key`` (or the optimiser) cannot be trained batched."""
        if key not in self._unsupported:
            ctx = self.ctx
            try:
                self._opt_spec = OptimSpec.from_optimizer(ctx.optimizer([torch.zeros(1, requires_grad=True)]))
                compile_program(nn.Sequential(ctx.client_templates[key], ctx.server_template), ctx.input_shapes[key],
                                device=ctx.tdev, dtype=ctx.dtype)
                reason = None
            except Unsupported as exc:
                reason = str(exc)
            self._unsupported[key] = reason
            if reason is not None:
                msg = f"batched local training is off for model {key!r}, trained sequentially: {reason}"
                if self.spec.batched == "on":
                    warnings.warn(msg, BatchedFallbackWarning, stacklevel=2)
                else:
                    log.info(msg)
        return self._unsupported[key]

    def _decide(self, key: str, n: int) -> tuple[bool, str]:
        reason = self._unsupported_reason(key)
        if reason is not None:
            return False, f"unsupported: {reason}"
        if self.spec.batched == "on":
            return True, "on"
        ctx, b = self.ctx, self.ctx.batch_size
        cf = ctx.flops(ctx.client_templates[key], "client", key, b, input_grad=False)
        sf = ctx.flops(ctx.server_template, "server", key, b, input_grad=True)
        step = cf.fwd + cf.bwd + sf.fwd + sf.bwd
        use = prefer_batched(step, n, ctx.tdev)
        return use, f"auto: {n} clients, {step / 1e6:.1f} MFLOP per client step on {ctx.tdev.type}"

    def precompute(self, chosen: list[ClientRuntime], rnd: int) -> dict[str, _Precomputed]:
        """Train the round's chosen clients ahead, batched per model group (see the module docs)."""
        ctx, spec = self.ctx, self.spec
        groups: dict[str, list[ClientRuntime]] = {}
        for c in chosen:
            groups.setdefault(c.key, []).append(c)
        out: dict[str, _Precomputed] = {}
        for key, group in groups.items():
            use, why = self._decide(key, len(group))
            self.batching.append({"round": rnd, "key": key, "clients": len(group), "batched": use, "reason": why})
            if not use:
                continue
            orders = [[ctx.epoch_order(c, rnd * spec.local_epochs + e) for e in range(spec.local_epochs)]
                      for c in group]
            jobs = [ClientJob(c.x_train, c.y_train, [idx for o in order for idx in o]) for c, order in zip(group, orders)]
            start = {**{f"0.{k}": v for k, v in self.global_client[key].items()},
                     **{f"1.{k}": v for k, v in self.global_server.items()}}
            states = train_local_batched(nn.Sequential(ctx.client_templates[key], ctx.server_template), start, jobs,
                                         optimizer=self._opt_spec, mu=spec.mu, dtype=ctx.dtype, device=ctx.tdev)
            for c, order, st in zip(group, orders, states):
                out[c.name] = _Precomputed(order, {k[2:]: v for k, v in st.items() if k.startswith("0.")},
                                           {k[2:]: v for k, v in st.items() if k.startswith("1.")})
        return out

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

        # one multiply-add per parameter per update
        yield from ctx.server_compute(2.0 * n_params * len(updates), "aggregate", work)

    def final_states(self) -> dict[str, dict]:
        return {"server": self.global_server, **{f"client/{k}": v for k, v in self.global_client.items()}}

    def evaluate(self) -> None:
        ctx = self.ctx
        if not ctx.train:
            for c in ctx.clients:
                ctx.evaluate_client(c, None)
            return
        evals = {}
        for key, state in self.global_client.items():
            m = nn.Sequential(copy.deepcopy(ctx.client_templates[key]), copy.deepcopy(ctx.server_template))
            m[0].load_state_dict(state)
            m[1].load_state_dict(self.global_server)
            m.eval()
            evals[key] = m
        for c in ctx.clients:
            ctx.evaluate_client(c, evals[c.key])
