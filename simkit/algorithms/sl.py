"""Vanilla split learning (Gupta & Raskar 2018; Vepakomma et al. 2018), with the weight relay.

Clients take turns, in fleet order, each round. A client's turn: it receives the client-part
weights from the previous client that finished a turn (the "relay"; a network transfer between
the two devices), then for every mini-batch of ``local_epochs`` passes over its data:

1. client forward (computed on the client device);
2. activations + labels up to the server;
3. server forward, loss, backward, update (on the server, queued on its slots);
4. gradient of the activations down to the client;
5. client backward and update.

Drop-out policy: a client that goes off mid-turn loses the weights of that turn (the next client
receives them from the last client that finished); the server updates already made stay. The
dropout is recorded. In the "mixed" workload each dataset group relays its own backbone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms.base import Algorithm, ClientRuntime, Unavailable, batch_len
from simkit.algorithms.batching import warn_not_batchable


def _torch_phases(cmodel: nn.Module, copt, smodel: nn.Module, sopt, x: torch.Tensor, y: torch.Tensor):
    """The torch work of a split step's three computes: client forward (returns the detached cut
    activations), server step (takes them, returns their gradient), client backward (takes it)."""
    box = {}

    def forward():
        copt.zero_grad(set_to_none=True)
        box["a"] = cmodel(x)
        return box["a"].detach()

    def server_step(act):
        a = act.clone().requires_grad_(True)
        sopt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(smodel(a), y)
        loss.backward()
        sopt.step()
        return a.grad

    def backward(grad):
        box["a"].backward(grad)
        copt.step()

    return forward, server_step, backward


def split_step(ctx, c: ClientRuntime, cmodel: nn.Module, copt, smodel: nn.Module, sopt, idx: torch.Tensor,
               *, real: bool | None = None):
    """One split-learning step of client ``c`` as SimPy sub-generator (``yield from``).

    ``real`` (default: whether the run trains): run the torch work. Without it the step costs the
    same (compute, transfers of the sizes the tensors would have: :meth:`Context.act_bytes`) and
    changes no weights: the fast mode, and SplitFed's batched rounds (trained ahead).

    When nothing else can happen in the world until the step ends (the usual case in vanilla SL,
    where clients take turns), its five phases are simulated as one chain
    (:mod:`simkit.world.chain`): the same instants, records and energy, one SimPy event instead
    of about ten; the torch work of the three computes then runs back to back, in order."""
    real = ctx.train if real is None else (real and ctx.train)   # (client_compute runs work only when training)
    b = batch_len(idx)
    cfwd, cbwd, srv_flops, up, down = ctx.split_costs(c.key, b)   # up/down: what the tensors will weigh
    server = ctx.world.server
    dev = c.device
    if real:
        y = c.y_train[idx]
        forward, server_step, backward = _torch_phases(cmodel, copt, smodel, sopt, c.x_train[idx], y)

    chain = ctx.chain()
    if (chain.compute(dev, cfwd, "client_fwd") and chain.send(dev, server, up, "act_up")
            and chain.compute(server, srv_flops, "server_step") and chain.send(server, dev, down, "grad_down")
            and chain.compute(dev, cbwd, "client_bwd") and chain.clear()):
        if real:
            act = forward()
            grad = server_step(act)
            sizes = ctx.act_bytes(b, act=act, labels=y), ctx.act_bytes(b, act=grad, with_labels=False)
            if sizes != (up, down):
                raise RuntimeError(f"split step of {c.name}: the cut tensors weigh {sizes} bytes, not the "
                                   f"{(up, down)} the cut shape gives (a simkit bug)")
            backward(grad)
        yield chain.commit()
        ctx.flops_client_fwd += cfwd   # as client_compute and server_compute count them
        ctx.flops_server += srv_flops
        ctx.flops_client_bwd += cbwd
        return

    act = yield from ctx.client_compute(c, cfwd, 0.0, "client_fwd", forward if real else None)
    yield ctx.send(dev, server, ctx.act_bytes(b, act=act, labels=y) if real else up, "act_up")
    grad = yield from ctx.server_compute(srv_flops, "server_step", (lambda: server_step(act)) if real else None)
    yield ctx.send(server, dev, ctx.act_bytes(b, act=grad, with_labels=False) if real else down, "grad_down")
    yield from ctx.client_compute(c, 0.0, cbwd, "client_bwd", (lambda: backward(grad)) if real else None)


class SplitLearning(Algorithm):
    name = "sl"

    def __init__(self, ctx):
        super().__init__(ctx)
        warn_not_batchable(ctx, "split learning", "clients take turns on one relayed client part and one server part")
        self.client_state = {k: copy.deepcopy(m.state_dict()) for k, m in ctx.client_templates.items()}
        self.holder: dict[str, ClientRuntime | None] = {k: None for k in ctx.client_templates}
        self.server = copy.deepcopy(ctx.server_template)
        self.server_opt = ctx.optimizer(self.server.parameters())
        self.client_bytes = {k: ctx.model_bytes(m) for k, m in ctx.client_templates.items()}
        self.workers: dict[str, nn.Module] = {k: copy.deepcopy(m) for k, m in ctx.client_templates.items()}

    def run(self):
        ctx, env, spec = self.ctx, self.ctx.env, self.spec
        for rnd in range(spec.rounds):
            ctx.recorder.round = rnd
            start = env.now
            served = 0
            for c in ctx.clients:
                if not ctx.available(c, rnd):
                    continue
                ok = yield from self.turn(c, rnd)
                served += ok
            ctx.recorder.round_done(start, env.now, served)
            self.maybe_evaluate(rnd)

    def turn(self, c: ClientRuntime, rnd: int):
        ctx, spec = self.ctx, self.spec
        try:
            prev = self.holder[c.key]
            if prev is not None and prev is not c:
                chain = ctx.chain()   # alone on the network, as usual: one event instead of three
                if chain.send(prev.device, c.device, self.client_bytes[c.key], "relay") and chain.clear():
                    yield chain.commit()
                else:
                    yield ctx.send(prev.device, c.device, self.client_bytes[c.key], "relay")
            model = self.workers[c.key]
            opt = None
            if ctx.train:
                model.load_state_dict(self.client_state[c.key])
                opt = ctx.optimizer(model.parameters())
            for e in range(spec.local_epochs):
                for idx in ctx.epoch_order(c, rnd * spec.local_epochs + e):
                    yield from split_step(ctx, c, model, opt, self.server, self.server_opt, idx)
            if ctx.train:
                self.client_state[c.key] = copy.deepcopy(model.state_dict())
            self.holder[c.key] = c
            ctx.finished[c.name] = ctx.finished.get(c.name, 0) + 1
            return 1
        except Unavailable as exc:
            ctx.dropped(c, exc)
            return 0

    def final_states(self) -> dict[str, dict]:
        return {"server": self.server.state_dict(), **{f"client/{k}": v for k, v in self.client_state.items()}}

    def evaluate(self) -> None:
        ctx = self.ctx
        if not ctx.train:
            for c in ctx.clients:
                ctx.evaluate_client(c, None)
            return
        self.server.eval()
        models = {}
        for key, state in self.client_state.items():
            m = copy.deepcopy(ctx.client_templates[key])
            m.load_state_dict(state)
            m.eval()
            models[key] = m
        for c in ctx.clients:
            ctx.evaluate_client(c, lambda x, m=models[c.key]: self.server(m(x)))
        self.server.train()
