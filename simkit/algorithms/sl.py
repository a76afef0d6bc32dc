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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms.base import Algorithm, ClientRuntime, SplitCosts, Unavailable, batch_len
from simkit.algorithms.batching import warn_not_batchable
from simkit.world.chain import Chain


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


def _plan_step(chain, ctx, c: ClientRuntime, b: int) -> SplitCosts | None:
    """Add a split step's five phases at batch size ``b`` to ``chain``; its costs (as
    :meth:`Context.split_costs`), or None where a phase cannot be timed ahead (the chain is then
    dead: roll it back)."""
    costs = ctx.split_costs(c.key, b)
    cfwd, cbwd, srv_flops, up, down, fwd_bytes, fwd_kernels, bwd_bytes, bwd_kernels, srv_bytes, srv_kernels = costs
    dev, server = c.device, ctx.world.server
    if (chain.compute(dev, cfwd, "client_fwd", fwd_bytes, fwd_kernels) and chain.send(dev, server, up, "act_up")
            and chain.compute(server, srv_flops, "server_step", srv_bytes, srv_kernels)
            and chain.send(server, dev, down, "grad_down")
            and chain.compute(dev, cbwd, "client_bwd", bwd_bytes, bwd_kernels)):
        return costs
    return None


def _step_work(ctx, c: ClientRuntime, cmodel, copt, smodel, sopt, idx, up: int, down: int) -> None:
    """The torch work of a chained split step, its three computes back to back; checks that the cut
    tensors weigh what the chain sent."""
    y = c.y_train[idx]
    forward, server_step, backward = _torch_phases(cmodel, copt, smodel, sopt, c.x_train[idx], y)
    act = forward()
    grad = server_step(act)
    b = batch_len(idx)
    sizes = ctx.act_bytes(b, act=act, labels=y), ctx.act_bytes(b, act=grad, with_labels=False)
    if sizes != (up, down):
        raise RuntimeError(f"split step of {c.name}: the cut tensors weigh {sizes} bytes, not the "
                           f"{(up, down)} the cut shape gives (a simkit bug)")
    backward(grad)


def _count_step_flops(ctx, costs: SplitCosts) -> None:
    ctx.flops_client_fwd += costs.cfwd   # as client_compute and server_compute count them
    ctx.flops_server += costs.srv
    ctx.flops_client_bwd += costs.cbwd


def split_step(ctx, c: ClientRuntime, cmodel: nn.Module, copt, smodel: nn.Module, sopt, idx: torch.Tensor,
               *, real: bool | None = None):
    """One split-learning step of client ``c`` as SimPy sub-generator (``yield from``), phase by
    phase: client forward, activations up, server step, gradients down, client backward, each its
    own events. (:func:`split_steps` runs steps as chains where nothing else can happen meanwhile,
    and this for a step that cannot.)

    ``real`` (default: whether the run trains): run the torch work. Without it the step costs the
    same (compute, transfers of the sizes the tensors would have: :meth:`Context.act_bytes`) and
    changes no weights: the fast mode, and SplitFed's batched rounds (trained ahead)."""
    real = ctx.train if real is None else (real and ctx.train)   # (client_compute runs work only when training)
    b = batch_len(idx)
    # up/down: what the tensors will weigh
    (cfwd, cbwd, srv_flops, up, down, fwd_bytes, fwd_kernels, bwd_bytes, bwd_kernels, srv_bytes,
     srv_kernels) = ctx.split_costs(c.key, b)
    server = ctx.world.server
    dev = c.device
    if real:
        y = c.y_train[idx]
        forward, server_step, backward = _torch_phases(cmodel, copt, smodel, sopt, c.x_train[idx], y)
    act = yield from ctx.client_compute(c, cfwd, 0.0, "client_fwd", forward if real else None,
                                        fwd_bytes, fwd_kernels)
    yield ctx.send(dev, server, ctx.act_bytes(b, act=act, labels=y) if real else up, "act_up")
    grad = yield from ctx.server_compute(srv_flops, "server_step", (lambda: server_step(act)) if real else None,
                                         srv_bytes, srv_kernels)
    yield ctx.send(server, dev, ctx.act_bytes(b, act=grad, with_labels=False) if real else down, "grad_down")
    yield from ctx.client_compute(c, 0.0, cbwd, "client_bwd", (lambda: backward(grad)) if real else None,
                                  bwd_bytes, bwd_kernels)


def split_steps(ctx, c: ClientRuntime, models: Callable[[], tuple], batches: Sequence, *,
                relay: tuple | None = None, real: bool | None = None):
    """Split-learning steps of client ``c`` over ``batches``, in order, as SimPy sub-generator,
    optionally after a message ``relay = (src device, nbytes, tag)`` to ``c``'s device (vanilla
    SL's weight relay).

    Chained greedily (:mod:`simkit.world.chain`): the relay and as many whole steps as end before
    the next event in the queue form one chain (one SimPy event); then the next steps likewise. A
    step that cannot chain at all (a slot or the network busy, something due before it ends) runs
    phase by phase (:func:`split_step`), a relay that cannot as a plain transfer. The instants,
    records, energy and weights are those of the steps one by one, to the bit (tests/test_chain.py).

    ``models()`` returns ``(cmodel, copt, smodel, sopt)``, called once, before the first torch work
    (vanilla SL loads the relayed weights there; they are torch state only, so it does not matter
    that it runs before the relay's simulated end). ``real`` as in :func:`split_step`.
    """
    real = ctx.train if real is None else (real and ctx.train)
    if not Chain.enabled:   # phase by phase throughout
        if relay is not None:
            yield ctx.send(relay[0], c.device, relay[1], relay[2])
        m = models() if real and batches else (None,) * 4
        for idx in batches:
            yield from split_step(ctx, c, *m, idx, real=real)
        return
    env = ctx.env
    m = None
    i, n = 0, len(batches)
    while relay is not None or i < n:
        ch = ctx.chain()
        limit = env.peek()
        if relay is not None and not (ch.send(relay[0], c.device, relay[1], relay[2]) and ch.t < limit):
            yield ctx.send(relay[0], c.device, relay[1], relay[2])   # it cannot chain: a plain transfer
            relay = None
            continue
        planned = []
        while i + len(planned) < n:
            mark = ch.mark()
            costs = _plan_step(ch, ctx, c, batch_len(batches[i + len(planned)]))
            if costs is None or ch.t >= limit:
                ch.rollback(mark)
                break
            planned.append(costs)
        if ch.clear():   # the relay and/or whole steps, all ending before the next event
            if real and planned:
                if m is None:
                    m = models()
                for k, costs in enumerate(planned):
                    _step_work(ctx, c, *m, batches[i + k], costs.up, costs.down)
            yield ch.commit()
            for costs in planned:
                _count_step_flops(ctx, costs)
            relay = None
            i += len(planned)
        else:   # not even the next step fits: it runs phase by phase
            if real and m is None:
                m = models()
            yield from split_step(ctx, c, *(m or (None,) * 4), batches[i], real=real)
            i += 1


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
        #: (round, client index) -> the client's batches of that round (_batches; cleared each round)
        self._round_batches: dict[tuple[int, int], list] = {}

    def run(self):
        """Rounds of turns in fleet order. Where nothing else can happen meanwhile, the whole turns
        of consecutive clients -- relays and steps -- are one chain (:meth:`_plan_turns`; a round
        alone in the world is one event): their torch work runs back to back, turn by turn, then
        the chain is accounted. A turn that does not chain whole runs as it comes
        (:meth:`turn`). Same instants, records, energy and weights as turn by turn, to the bit
        (tests/test_chain.py)."""
        ctx, env, spec = self.ctx, self.ctx.env, self.spec
        clients = ctx.clients
        for rnd in range(spec.rounds):
            ctx.recorder.round = rnd
            start = env.now
            served = 0
            self._round_batches.clear()
            k, n = 0, len(clients)
            while k < n:
                c = clients[k]
                if not ctx.available(c, rnd):
                    k += 1
                    continue
                planned = self._plan_turns(k, rnd) if Chain.enabled else None
                if planned is None:   # the next turn alone does not chain whole: as it goes
                    served += yield from self.turn(c, rnd)
                    k += 1
                    continue
                ch, turns = planned
                if ctx.train:
                    for tc, batches, costs in turns:
                        if costs:
                            self._turn_work(tc, batches, costs)
                yield ch.commit()
                for tc, _, costs in turns:
                    for cs in costs:
                        _count_step_flops(ctx, cs)
                    self.holder[tc.key] = tc
                    ctx.finished[tc.name] = ctx.finished.get(tc.name, 0) + 1
                served += len(turns)
                k += len(turns)
            ctx.recorder.round_done(start, env.now, served)
            self.maybe_evaluate(rnd)

    def _batches(self, c: ClientRuntime, rnd: int) -> list:
        """``c``'s mini-batches of round ``rnd``: ``local_epochs`` passes over its data. Drawn once a
        round (kept until the next round starts): a turn planned whole but rolled back, or run as
        it comes after :meth:`_plan_turns` found it does not fit, reuses them."""
        got = self._round_batches.get((rnd, c.index))
        if got is None:
            ctx, e = self.ctx, self.spec.local_epochs
            got = self._round_batches[(rnd, c.index)] = [idx for ep in range(e)
                                                         for idx in ctx.epoch_order(c, rnd * e + ep)]
        return got

    def _relay(self, c: ClientRuntime, prev: ClientRuntime | None) -> tuple | None:
        """The weight relay to ``c`` from ``prev``, the last client that finished a turn on its
        client part, as ``(src device, nbytes, tag)``; None for the first turn or ``c`` itself."""
        if prev is not None and prev is not c:
            return prev.device, self.client_bytes[c.key], "relay"
        return None

    def _plan_turns(self, k: int, rnd: int):
        """The whole turns of ``ctx.clients[k:]``, in order, that form one chain ending before the
        next event: ``(chain, [(client, batches, step costs)])``, or None where not even the first
        turn fits whole. ``clients[k]`` is available now (the caller checked and recorded it); a
        later client ends the chain if it would sit out (its dropout is recorded when its turn
        comes), as does a turn with a phase that cannot be timed ahead or that ends too late. The
        relays follow the turns planned before them (``held``); the chain's phases are those the
        turns would add one after another, so its commit replays them at their instants."""
        ctx = self.ctx
        clients = ctx.clients
        ch = ctx.chain()
        limit = ctx.env.peek()
        held = {}
        turns = []
        n = len(clients)
        while k < n:
            c = clients[k]
            if turns and ctx.unavailable(c, rnd) is not None:
                break
            mark = ch.mark()
            prev = held[c.key] if c.key in held else self.holder[c.key]
            relay = self._relay(c, prev)
            ok = relay is None or ch.send(relay[0], c.device, relay[1], relay[2])
            batches = self._batches(c, rnd)
            costs = []
            if ok:
                for idx in batches:
                    cs = _plan_step(ch, ctx, c, batch_len(idx))
                    if cs is None:
                        ok = False
                        break
                    costs.append(cs)
            if not ok or ch.t >= limit:
                ch.rollback(mark)
                break
            turns.append((c, batches, costs))
            held[c.key] = c
            k += 1
        if not turns or not ch.clear():
            return None
        return ch, turns

    def _load(self, c: ClientRuntime) -> tuple:
        """``(client part, its optimiser, server part, server optimiser)`` for ``c``'s turn, the
        client part loaded with the relayed weights."""
        model = self.workers[c.key]
        model.load_state_dict(self.client_state[c.key])
        return model, self.ctx.optimizer(model.parameters()), self.server, self.server_opt

    def _turn_work(self, c: ClientRuntime, batches: list, costs: list[SplitCosts]) -> None:
        """The torch work of ``c``'s whole turn (planned by :meth:`_plan_turns`), and the relayed
        weights it leaves."""
        m = self._load(c)
        for idx, cs in zip(batches, costs):
            _step_work(self.ctx, c, *m, idx, cs.up, cs.down)
        self.client_state[c.key] = copy.deepcopy(m[0].state_dict())

    def turn(self, c: ClientRuntime, rnd: int):
        """Client ``c``'s turn as it comes (SimPy sub-generator): its relay and steps chained
        greedily or phase by phase (:func:`split_steps`); 1 if it finished, 0 if it dropped out."""
        ctx = self.ctx
        try:
            batches = self._batches(c, rnd)
            model = self.workers[c.key]
            yield from split_steps(ctx, c, lambda: self._load(c), batches, relay=self._relay(c, self.holder[c.key]))
            if ctx.train and batches:
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
