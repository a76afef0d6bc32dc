"""Batched local training inside a round, for the algorithms whose clients' rounds are independent.

In FedAvg/FedProx and in SplitFed V1 every client of a round starts from the same global weights
(client part + server part), trains on its own data with fresh optimisers and touches no shared
state: FedAvg trains the whole model, SplitFed V1 the client part against *its own copy* of the
server part -- the same arithmetic, split in two (client forward; server forward, loss, backward
and update on the cut activations; client backward with their gradient and update; per-parameter
optimisers, so one optimiser over both parts updates exactly as two do). So the real training of
all the round's clients can be computed at once, vectorised
(:func:`simkit.learning.batched.train_local_batched`), at the start of the round. Each client
process then runs exactly the same costed steps as the sequential path (computes, transfers,
dropouts: the same records and timeline) without real work, and hands in its precomputed weights;
a client that drops out discards them just as the sequential path discards its partial update.
The weights equal the sequential path's up to rounding (float64: ~1e-15).

``algorithm.batched``: ``off`` (sequential), ``on`` (batched; an unsupported model warns with
:class:`~simkit.learning.batched.BatchedFallbackWarning` and trains sequentially) or ``auto``
(batched when the model is supported, at least 2 clients of the group train this round and the
step is within the measured range, :func:`~simkit.learning.batched.prefer_batched`: a fixed rule
on the model's FLOPs per step, never a timing, so runs stay deterministic). Whether and why each
round and model group was batched is logged in :attr:`RoundBatcher.batching`.

AdaSplit is batched too, differently: each client continues its *own* backbone + head and
optimiser state (:func:`~simkit.learning.batched.continue_local_batched`), a whole local-phase
epoch ahead (``AdaSplit.precompute_local``) and, in the global phase, the non-selected clients'
local steps of each iteration at its barrier (``AdaSplit.train_deferred``); its selected (split)
steps train sequentially against the shared server part.
Split learning and SplitFed V2 train their clients against one shared server part (and, in SL,
one relayed client part), so their steps depend on each other: ``on`` warns there
(:func:`warn_not_batchable`) and ``auto`` trains sequentially. (A warning rather than a scenario
error so that a study sweeping ``algorithm.name`` with ``batched: on`` still runs every point.)
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simkit.algorithms.base import ClientRuntime, Context
from simkit.learning.batched import (
    BatchedFallbackWarning,
    ClientJob,
    OptimSpec,
    Unsupported,
    compile_program,
    prefer_batched,
    train_local_batched,
)

log = logging.getLogger(__name__)


@dataclass
class Precomputed:
    """A client's round, trained ahead: its batch orders and its resulting weights."""

    orders: list  # per local epoch, the batches (for the costed steps)
    client_state: dict
    server_state: dict


def round_orders(ctx: Context, clients: Sequence[ClientRuntime], rnd: int, local_epochs: int) -> list[list]:
    """The batch orders of ``clients``' round ``rnd``: per client, per local epoch
    (:meth:`Context.epoch_order` of epoch ``rnd * local_epochs + e``), drawn in one go."""
    return [[ctx.epoch_order(c, rnd * local_epochs + e) for e in range(local_epochs)] for c in clients]


def working_model(cache: dict, ctx: Context, key: str, client_state: dict, server_state: dict) -> nn.Sequential:
    """The working copy of model group ``key``'s whole model (client part, server part) in which
    its clients train one after another (one per group, kept in ``cache``), loaded with
    ``client_state`` and ``server_state`` (the round's global weights): each client's round
    overwrites it whole."""
    model = cache.get(key)
    if model is None:
        model = cache[key] = nn.Sequential(copy.deepcopy(ctx.client_templates[key]), copy.deepcopy(ctx.server_template))
    model[0].load_state_dict(client_state)
    model[1].load_state_dict(server_state)
    return model


def warn_not_batchable(ctx: Context, algorithm: str, why: str) -> None:
    """``batched: on`` for an algorithm whose clients share state: warn
    (:class:`~simkit.learning.batched.BatchedFallbackWarning`) that it trains sequentially."""
    if ctx.spec.batched == "on" and ctx.train:
        warnings.warn(f"batched: 'on' has no effect for {algorithm}: {why}; its clients train one after another",
                      BatchedFallbackWarning, stacklevel=3)


class RoundBatcher:
    """Trains a round's clients ahead, batched per model group, when the run's setting says so.

    Args:
        ctx: the run's context.
        mode: ``"off"``, ``"on"`` or ``"auto"`` (the scenario's ``algorithm.batched``).
        model_of: the model a client of group ``key`` trains (default: client part + server part);
            AdaSplit's local phase trains backbone + head.
        step_flops_of: its training FLOPs per step at the run's batch size, for ``auto``.
    """

    def __init__(self, ctx: Context, mode: str, *, model_of: Callable[[str], nn.Module] | None = None,
                 step_flops_of: Callable[[str], float] | None = None):
        self.ctx = ctx
        self.mode = mode
        self.model_of = model_of or (lambda key: nn.Sequential(ctx.client_templates[key], ctx.server_template))
        self.step_flops_of = step_flops_of or self._whole_step_flops
        #: one entry per round and model group (when on/auto): round, key, clients, batched, reason
        self.batching: list[dict] = []
        self._unsupported: dict[str, str | None] = {}
        self._opt_spec: OptimSpec | None = None

    @property
    def active(self) -> bool:
        """Whether rounds may be trained ahead at all (batching not off, and real training)."""
        return self.mode != "off" and self.ctx.train

    def unsupported_reason(self, key: str) -> str | None:
        """Why the whole model of group ``key`` (or the optimiser) cannot be trained batched."""
        if key not in self._unsupported:
            ctx = self.ctx
            try:
                self._opt_spec = OptimSpec.from_optimizer(ctx.optimizer([torch.zeros(1, requires_grad=True)]))
                compile_program(self.model_of(key), ctx.input_shapes[key], device=ctx.tdev, dtype=ctx.dtype)
                reason = None
            except Unsupported as exc:
                reason = str(exc)
            self._unsupported[key] = reason
            if reason is not None:
                msg = f"batched local training is off for model {key!r}, trained sequentially: {reason}"
                if self.mode == "on":
                    warnings.warn(msg, BatchedFallbackWarning, stacklevel=3)
                else:
                    log.info(msg)
        return self._unsupported[key]

    def decide(self, key: str, n: int) -> tuple[bool, str]:
        """Whether to batch ``n`` clients of model group ``key`` this round, and why."""
        reason = self.unsupported_reason(key)
        if reason is not None:
            return False, f"unsupported: {reason}"
        if self.mode == "on":
            return True, "on"
        step = self.step_flops_of(key)
        use = prefer_batched(step, n, self.ctx.tdev)
        return use, f"auto: {n} clients, {step / 1e6:.1f} MFLOP per client step on {self.ctx.tdev.type}"

    def _whole_step_flops(self, key: str) -> float:
        ctx, b = self.ctx, self.ctx.batch_size
        cf = ctx.flops(ctx.client_templates[key], "client", key, b, input_grad=False)
        sf = ctx.flops(ctx.server_template, "server", key, b, input_grad=True)
        return cf.fwd + cf.bwd + sf.fwd + sf.bwd

    @property
    def optim_spec(self) -> OptimSpec | None:
        """The optimiser's hyper-parameters (known once a group has been checked)."""
        return self._opt_spec

    def log(self, rnd: int, key: str, n: int, use: bool, why: str, **extra) -> None:
        """One entry of :attr:`batching` (``extra``: more fields, e.g. AdaSplit's phase)."""
        self.batching.append({"round": rnd, "key": key, "clients": n, "batched": use, "reason": why, **extra})

    def precompute(self, chosen: Sequence[ClientRuntime], rnd: int, local_epochs: int,
                   global_client: dict[str, dict], global_server: dict, *, mu: float = 0.0) -> dict[str, Precomputed]:
        """Train the round's ``chosen`` clients ahead from the global weights (``global_client`` per
        model key, ``global_server``); returns the precomputed rounds by client name (clients of a
        group that is not batched are absent: they train sequentially). ``{}`` when not
        :attr:`active`."""
        if not self.active:
            return {}
        ctx = self.ctx
        groups: dict[str, list[ClientRuntime]] = {}
        for c in chosen:
            groups.setdefault(c.key, []).append(c)
        out: dict[str, Precomputed] = {}
        for key, group in groups.items():
            use, why = self.decide(key, len(group))
            self.log(rnd, key, len(group), use, why)
            if not use:
                continue
            orders = round_orders(ctx, group, rnd, local_epochs)
            jobs = [ClientJob(c.x_train, c.y_train, [idx for o in order for idx in o]) for c, order in zip(group, orders)]
            start = {**{f"0.{k}": v for k, v in global_client[key].items()},
                     **{f"1.{k}": v for k, v in global_server.items()}}
            states = train_local_batched(nn.Sequential(ctx.client_templates[key], ctx.server_template), start, jobs,
                                         optimizer=self._opt_spec, mu=mu, dtype=ctx.dtype, device=ctx.tdev)
            for c, order, st in zip(group, orders, states):
                out[c.name] = Precomputed(order, {k[2:]: v for k, v in st.items() if k.startswith("0.")},
                                          {k[2:]: v for k, v in st.items() if k.startswith("1.")})
        return out
