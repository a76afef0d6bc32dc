"""AdaSplit (Chopra et al., arXiv 2112.01637, 2021) as SimPy processes on the shared world.

What is simulated follows shared ADASPLIT.md (mechanisms 1-6) and the authors' code as condensed in
shared research/adasplit-paper.md §1.3-1.9. Choices that neither source fixes are ours and are named
here.

Models
------
Client ``c`` owns a *backbone* (a deep copy of ``ctx.client_templates[c.key]``: the client part of the
split model, per dataset in the "mixed" workload) and a local *head* (:func:`make_head`): a 1x1
convolution to :data:`HEAD_CHANNELS` channels + ReLU + global average pool when the cut is a feature map
(``(C, H, W)`` or ``(C, L)``), ``Linear + ReLU`` when it is flat, then ``Linear`` to ``embedding_dim``.
The ReLU is ours (without it conv -> pool -> linear collapses to one linear map; the authors' LeNet head
has a leaky ReLU there). All heads start from one seeded initialisation (seed stream ``adasplit.head``).
The head is not part of the split and never leaves the device. Each client has one optimiser
(``spec.optimizer``, ``spec.lr``: Adam 1e-3 by default, as the authors) over backbone + head.

The server holds one copy of the server part wrapped in a :class:`~simkit.learning.masks.MaskedServer`
(``masks=True``, the default; mask logits start at :data:`MASK_INIT_LOGIT`) or the plain server part
(``masks=False``), and one optimiser (same kind and lr) over all of it. A step for client ``c`` gives
gradients only to the shared weights and ``c``'s masks, so only those move. There is no model sync of
any kind between clients (no relay, no averaging): the authors' relay copy was not counted as traffic
and ADASPLIT.md does not list it among the mechanisms.

Epochs and phases
-----------------
``rounds`` are epochs (``local_epochs`` is not used). Epochs ``0 .. floor(kappa * rounds) - 1`` are the
*local phase*: each available client runs through its mini-batches (``ctx.epoch_order``) taking local
SupCon steps (:func:`~simkit.learning.losses.supcon_loss` on the head's embedding, ``temperature``): one
client compute of backbone+head forward and backward, no traffic, server idle. The remaining epochs are
the *global phase*. Each epoch ends with a barrier (every client's process has finished and, in the
global phase, every server step of the epoch has been served), then ``round_done`` (phase ``"local"`` or
``"global"``) and, every ``eval_every`` epochs, evaluation. In the local phase these barriers cost
(almost) no makespan: a client's epoch takes the same time every epoch, so the slowest client is the
same every epoch and the others would wait for it at the start of the global phase anyway (only
time-varying slowdowns break this).

Batched local phase (``algorithm.batched: on | auto``): a local-phase epoch touches no shared state --
each client continues its own backbone + head with its own optimiser on its own data -- so at the
epoch's start the whole epoch of every client of a model group is computed at once, vectorised
(:func:`~simkit.learning.batched.continue_local_batched`: per-client weights, optimiser buffers and
Adam step counts, the SupCon gradient, global average pooling). The client processes then run the
same costed steps without torch work and install their new state when the epoch ends. A client that
drops out mid-epoch keeps exactly the steps that had started, as on the sequential path (a step's
work runs at its start): they are replayed on its untouched models. Records are the sequential
run's; weights equal it up to rounding (float64: within 1e-9, tested).

Batched global phase: in an iteration the *non-selected* clients' local SupCon steps touch only
their own models too, and nothing reads those models before the iteration's barrier (a client
takes one step per iteration; the server and the bandit never read a backbone). So those steps
only note that they started (when the sequential path would run them) and are trained together at
the barrier (:meth:`AdaSplit.train_deferred`), a client that dropped mid-step included. The
selected clients' steps stay sequential: with ``return_gradients`` their update needs the server's
gradient, and the server part is shared. A split step moves the backbone but not the head (no
gradient: torch.optim skips it), so the Adam step counts of a client's parameters differ from then
on; the batched update keeps them per parameter (:class:`~simkit.learning.batched.ClientState`).
``AdaSplit.batching`` logs what was batched and why: one entry per local epoch and model group
(``phase: "local"``) and per global iteration and model group (``phase: "global"``, ``iteration``).

Global phase: the timeline
--------------------------
Iterations are batch indices ``b``; iteration ``b`` involves every client still in the epoch that has a
batch ``b``. Iterations are synchronous, as in the authors' loop: **the selection for iteration b is made
at the instant every client has finished its step of iteration b-1** (iteration 0: the epoch's start).
It uses the bandit rows of every earlier iteration whose server steps have all completed by then. With
``return_gradients=True`` that is always every earlier iteration (a selected client's step ends only
after the server's reply); with ``return_gradients=False`` the server may still be serving iteration
``b-1`` and then the selection is made without it (the server does not hold up the fleet). The bandit's
rows are still closed in iteration order, each as soon as its server steps are done. Selection
notices are not modelled as messages (a few bytes; they could ride on the previous gradient). Fast
clients wait idle at each iteration barrier: that is the price of synchronous per-iteration selection,
and it is visible in the timeline.

In iteration ``b`` the selector picks ``k = ceil(eta * N)`` clients (``N`` = fleet size) among the
candidates (all candidates if fewer): the discounted UCB of :class:`~simkit.algorithms.bandits.DiscountedUCB`
(``selection="ucb"``, discount ``gamma``) or uniformly at random (``"random"``); seed stream
``adasplit.select``. Every client's score and whether it was picked is recorded
(``recorder.selection(step, client, score, selected)``, ``step`` counting global iterations from 0).

* A **non-selected** candidate takes a local SupCon step (as in the local phase).
* A **selected** client with ``return_gradients=True`` (the authors' code): backbone forward (client
  compute, tag ``client_fwd``), activations + labels up (``act_up``), the server step, the gradient of
  the activations down (``grad_down``), backbone backward + optimiser step (``client_bwd``). The head is
  not used: that step optimises the server's cross-entropy only (README: "if a client is communicating
  with the server ... it optimizes the cross-entropy objective").
* A selected client with ``return_gradients=False`` (streaming): it computes backbone + head forward
  (``client_fwd``), starts uploading the cut activations + labels, and *meanwhile* runs the local SupCon
  backward + step (``client_bwd``); its step ends when both the backward and the upload are done. It
  never waits for the server and receives nothing; its backbone learns only from its local loss (the
  server's cross-entropy still trains the server part and masks). So per selected step the activation
  tensor crosses the network once instead of twice.
* The **server step** (queued on the server's slots in request-arrival order via ``ctx.server_compute``,
  tag ``server_step``): forward through the masked server with client ``c``'s masks, loss
  ``CE + lambda * sum(sigmoid(m_c))``, backward, update; the per-sample CE mean and standard deviation
  (unbiased; 0 for a batch of one) are the bandit's observation of ``c`` for this iteration.

Traffic (every message also costs ``message_overhead_bytes``)
-------------------------------------------------------------
``act_up``: the activation tensor (``numel * element_size``) + labels (int64, 8 B/sample).
``grad_down``: the gradient tensor, same size as the activations. With ``sparse_payload=True``:
activations are sent as COO, ``nnz * (element_size + 4)`` bytes (value + int32 flat index), or densely
if that is smaller (an encoder picks the cheaper form); the gradient is sent as ``nnz * element_size``
bytes, the values at the non-zero positions of the activations, whose positions the client already
knows, and the client really backpropagates the gradient masked to those positions (exact when the
backbone ends in ReLU/max-pool of ReLU, as every simkit backbone does: a zero activation gets no
gradient anyway). ``kappa=1``: no message at all.

Compute
-------
Client FLOPs come from ``ctx.flops`` (backbone) and :func:`~simkit.learning.flops.count_flops` on the
head followed by the SupCon similarity matrix (``normalize(z) @ normalize(z).T``: counted, being a
matmul), cached per (dataset key, batch size). Forward and backward are charged separately. Server FLOPs
are the plain server part's (``input_grad`` only when the gradient is returned) plus, with masks, the
gating cost of :meth:`~simkit.learning.masks.MaskedServer.mask_flops` (``n_masked`` forward,
``2 * n_masked`` backward per step). Dense compute is charged whatever the mask sparsity.

Drop-outs
---------
Each epoch starts with ``ctx.available(c, epoch)``: a client that is off or drops that epoch sits it
out. A client whose device goes off (or whose transfer aborts) mid-step is recorded with
``ctx.dropped`` and takes no further part in the epoch: it is excluded from later selections and steps
until the next epoch's availability check. Updates already applied (its own earlier steps, server steps
served for it) stay; a server step whose upload never arrived is not an observation for the bandit.
A selected client that dropped before its server step is not marked selected in the bandit's history.

Records
-------
Per global-phase selection: ``selection`` records (above). Per client per global-phase epoch: metrics
``mask_sparsity`` (fraction of its gates < 0.5; only with masks) and ``selected_steps`` (server steps
served for it that epoch). Per epoch: ``round_done`` with ``phase``. Compute tags: ``local_step``,
``client_fwd``, ``client_bwd``, ``server_step``; transfer tags: ``act_up``, ``grad_down``.

Evaluation
----------
Client ``c``'s prediction is ``argmax(server(backbone_c(x), mask c))`` on its own test split
(``ctx.evaluate_client``), so during the local phase (server untrained) accuracy is near chance. The
summary's accuracy is the mean over clients. ``final_states()``: ``"server"`` (shared weights),
``"mask/<client>"`` (mask logits; BN tensors if any), ``"client/<client>"`` (backbone) and
``"head/<client>"``.

Tensor values steer the simulated control flow only where the method itself does: the bandit's choice
(from losses) and sparse payload sizes. All real torch work runs inside the ``work`` closures passed to
the compute primitives.

Fast what-if mode (``train: false``): the same protocol and costs without tensors. No per-client
model, mask or optimiser is built; payloads are dense (sizes from the cut shape; ``sparse_payload``
cannot be estimated without activations); the bandit gets no losses, so served clients are marked
selected with imputed values only -- after the optimistic start every client has been tried and the
discounted counts then rotate the choice. With ``selection="random"`` the choices, and so every cost
and the whole timeline, are identical to the real run's. Accuracy comes from the surrogate.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms.bandits import DiscountedUCB, RandomSelection
from simkit.algorithms.base import Algorithm, ClientRuntime, Unavailable, batch_len
from simkit.algorithms.batching import RoundBatcher
from simkit.learning.batched import (
    ClientJob,
    ClientState,
    Unsupported,
    continue_local_batched,
    load_optimizer_state,
    optimizer_state,
)
from simkit.learning.flops import FlopCount, architecture_key, count_flops
from simkit.learning.losses import supcon_loss
from simkit.learning.masks import MaskedServer, maskable_weights
from simkit.learning.models import init_parameters

__all__ = [
    "HEAD_CHANNELS",
    "INDEX_BYTES",
    "MASK_INIT_LOGIT",
    "AdaSplit",
    "clients_per_iteration",
    "make_head",
    "phase_split",
]

#: channels of the head's 1x1 convolution (hidden width of a flat head); the authors' ResNet head: 64
HEAD_CHANNELS = 64
#: initial mask logit: gates start at sigmoid(3) = 0.953
MASK_INIT_LOGIT = 3.0
#: bytes of one flat index in the sparse (COO) activation payload (int32)
INDEX_BYTES = 4
#: guards ceil/floor of float products such as 0.3 * 10 = 3.0000000000000004
_EPS = 1e-9


def phase_split(kappa: float, rounds: int) -> int:
    """Number of local-phase epochs, ``floor(kappa * rounds)`` (the authors' ``int(kappa * E)``)."""
    return min(int(rounds), math.floor(kappa * rounds + _EPS))


def clients_per_iteration(eta: float, n_clients: int) -> int:
    """``k = ceil(eta * N)``, at least 1 and at most ``N``."""
    return max(1, min(int(n_clients), math.ceil(eta * n_clients - _EPS)))


def make_head(cut_shape: tuple[int, ...], embedding_dim: int, generator: torch.Generator) -> nn.Sequential:
    """The local head on a cut of per-sample shape ``cut_shape`` (see the module docstring).

    Built on the CPU inside ``fork_rng`` (torch's global RNG is left as it was), then initialised
    from ``generator`` (as in simkit.learning.models)."""
    h = HEAD_CHANNELS
    with torch.random.fork_rng(devices=[]):
        if len(cut_shape) == 3:
            layers = [nn.Conv2d(cut_shape[0], h, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif len(cut_shape) == 2:
            layers = [nn.Conv1d(cut_shape[0], h, 1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        else:
            layers = [nn.Flatten(), nn.Linear(math.prod(cut_shape), h), nn.ReLU()]
        layers.append(nn.Linear(h, int(embedding_dim)))
    return init_parameters(nn.Sequential(*layers), generator)


class _Similarity(nn.Module):
    """The matmul of the SupCon loss, so that its FLOPs are counted with the head's."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z.flatten(1), dim=1)
        return z @ z.T


class _Served(NamedTuple):
    """What one upload + server step produced (``exc`` set if it did not happen)."""

    exc: BaseException | None = None
    grad: torch.Tensor | None = None
    mean: float | None = None
    std: float | None = None


class _Iteration:
    """Book-keeping of one global-phase iteration: its uploads and their outcomes."""

    __slots__ = ("complete", "pending", "procs", "results")

    def __init__(self):
        self.procs: list = []
        self.results: dict[int, _Served] = {}
        self.pending = 0
        self.complete = False

    def start(self, env, gen):
        self.pending += 1
        proc = env.process(gen)
        self.procs.append(proc)
        return proc


def _by_key(clients: list[ClientRuntime]) -> dict[str, list[ClientRuntime]]:
    """Clients grouped by model key (dataset group), in order."""
    groups: dict[str, list[ClientRuntime]] = {}
    for c in clients:
        groups.setdefault(c.key, []).append(c)
    return groups


class AdaSplit(Algorithm):
    """AdaSplit: local SupCon phase, bandit-selected split steps, per-client server masks."""

    name = "adasplit"

    def __init__(self, ctx):
        super().__init__(ctx)
        spec = self.spec
        n = len(ctx.clients)
        self.n_local = phase_split(spec.kappa, spec.rounds)
        self.k = clients_per_iteration(spec.eta, n)
        gen = torch.Generator().manual_seed(ctx.seeds.int_seed("adasplit.head"))
        head = make_head(ctx.cut_shape, spec.embedding_dim, gen).to(ctx.tdev, ctx.dtype)
        self._head_template = head
        self.masked = bool(spec.masks)
        n_masked = maskable_weights(ctx.server_template) if self.masked else 0
        self._mask_flops = float(n_masked + 2 * n_masked)  # = MaskedServer.mask_flops(), without building it
        # per-client models exist only when training (the fast mode has no tensors)
        self.backbones: list[nn.Module] = []
        self.heads: list[nn.Module] = []
        self.opts: list = []
        self.server: nn.Module | None = None
        self.server_opt = None
        if ctx.train:
            self.backbones = [copy.deepcopy(ctx.client_templates[c.key]) for c in ctx.clients]
            self.heads = [copy.deepcopy(head) for _ in ctx.clients]
            self.opts = [ctx.optimizer([*bb.parameters(), *hd.parameters()])
                         for bb, hd in zip(self.backbones, self.heads)]
            plain = copy.deepcopy(ctx.server_template)
            self.server = MaskedServer(plain, n, init_logit=MASK_INIT_LOGIT) if self.masked else plain
            self.server_opt = ctx.optimizer(self.server.parameters())
        rng = ctx.seeds.numpy("adasplit.select")
        if spec.selection == "ucb":
            self.selector = DiscountedUCB(n, self.k, spec.gamma, rng)
        else:
            self.selector = RandomSelection(n, self.k, rng)
        self.step = 0  # global-phase iterations so far
        self._head_flops: dict[tuple, FlopCount] = {}
        self._open: deque[_Iteration] = deque()  # iterations whose bandit row is not closed yet
        self.selected_steps = np.zeros(n, dtype=int)
        # batched local phase (algorithm.batched): backbone + head of every client of a group at once
        self._pmaps: dict[int, dict[str, nn.Parameter]] = {}
        self.batcher = RoundBatcher(ctx, spec.batched,
                                    model_of=lambda key: nn.Sequential(ctx.client_templates[key], self._head_template),
                                    step_flops_of=self._local_step_flops)
        #: when batching is on/auto, one entry per local epoch and model group and per global iteration
        #: and model group (fields ``phase``, and ``iteration`` in the global phase; see RoundBatcher.batching)
        self.batching = self.batcher.batching

    # -- helpers -----------------------------------------------------------------------------
    def _models(self, i: int):
        """Client ``i``'s backbone, head and optimiser (``None`` each in the fast mode)."""
        if not self.ctx.train:
            return None, None, None
        return self.backbones[i], self.heads[i], self.opts[i]

    def server_forward(self, a: torch.Tensor, client: int) -> torch.Tensor:
        return self.server(a, client) if self.masked else self.server(a)

    def head_flops(self, key: str, batch: int) -> FlopCount:
        ck = (key, batch)
        fc = self._head_flops.get(ck)
        if fc is None:
            probe = nn.Sequential(self._head_template, _Similarity())
            shape = (batch, *self.ctx.cut_shape)
            fc = count_flops(probe, shape, backward=True, input_requires_grad=True,
                             key=("adasplit-head", architecture_key(probe), shape))
            self._head_flops[ck] = fc
        return fc

    def server_cost(self, key: str, batch: int) -> tuple[float, float, int]:
        """The server step's FLOPs (with the masks'), bytes its ops write and kernels (the masks'
        own elementwise work is left out of those two, as their FLOPs are counted apart)."""
        sf = self.ctx.flops(self.ctx.server_template, "server", key, batch, input_grad=self.spec.return_gradients)
        return float(sf.total) + self._mask_flops, float(sf.nbytes), sf.kernels

    def act_bytes(self, act: torch.Tensor | None, batch: int) -> int:
        """Bytes of a batch's activation payload (labels not included)."""
        dense = self.ctx.act_bytes(batch, act=act, with_labels=False)
        if act is None or not self.spec.sparse_payload:  # no tensor (fast mode): the dense size
            return dense
        nnz = int(torch.count_nonzero(act))
        return min(dense, nnz * (act.element_size() + INDEX_BYTES))

    def grad_bytes(self, grad: torch.Tensor | None, act: torch.Tensor | None, batch: int) -> int:
        """Bytes of the returned gradient: dense, or its values at the activations' non-zeros."""
        if grad is None or act is None or not self.spec.sparse_payload:
            return self.ctx.act_bytes(batch, act=grad, with_labels=False)
        return int(torch.count_nonzero(act)) * grad.element_size()

    # -- the protocol ------------------------------------------------------------------------
    def run(self):
        ctx, env, spec = self.ctx, self.ctx.env, self.spec
        for e in range(spec.rounds):
            ctx.recorder.round = e
            start = env.now
            active = [c for c in ctx.clients if ctx.available(c, e)]
            if e < self.n_local:
                phase = "local"
                ahead = self.precompute_local(active, e)
                procs = [env.process(self.local_epoch(c, e, ahead.get(c.index))) for c in active]
                done = yield env.all_of(procs)
                finished = [c for c, p in zip(active, procs) if done[p]]
            else:
                phase = "global"
                finished = yield from self.global_epoch(active, e)
                for c in ctx.clients:
                    if self.masked and ctx.train:
                        ctx.recorder.metric(c.name, "mask_sparsity", self.server.mask_sparsity(c.index))
                    ctx.recorder.metric(c.name, "selected_steps", float(self.selected_steps[c.index]))
            for c in finished:
                ctx.finished[c.name] = ctx.finished.get(c.name, 0) + 1
            ctx.recorder.round_done(start, env.now, len(finished), phase)
            self.maybe_evaluate(e)

    def local_epoch(self, c: ClientRuntime, epoch: int, ahead: tuple[list, ClientState] | None = None):
        """A client's local-phase epoch. ``ahead``: its batches and the state after them, trained
        ahead (batched); the costed steps then run without torch work, and the state is installed
        at the end. A client that drops keeps the steps that started (their work runs at a step's
        start, as on the sequential path): those are replayed on its untouched models."""
        started = [0] if ahead is not None else None
        order = ahead[0] if ahead is not None else self.ctx.epoch_order(c, epoch)
        try:
            for idx in order:
                yield from self.local_step(c, idx, started)
            if ahead is not None:
                self._install(c.index, ahead[1])
            return True
        except Unavailable as exc:
            if started is not None:
                for idx in order[:started[0]]:
                    self._local_work(c, idx)()
            self.ctx.dropped(c, exc)
            return False

    def precompute_local(self, active: list[ClientRuntime], epoch: int) -> dict[int, tuple[list, ClientState]]:
        """Train the local-phase epoch of ``active`` ahead, batched per model group (when batching is
        on/auto and the group qualifies); returns per client index its batches and new state."""
        if not self.batcher.active:
            return {}
        out: dict[int, tuple[list, ClientState]] = {}
        for key, group in _by_key(active).items():
            orders = [list(self.ctx.epoch_order(c, epoch)) for c in group]
            new = self._continue_batched(key, group, orders, epoch, phase="local")
            for c, o, st in zip(group, orders, new or ()):
                out[c.index] = (o, st)
        return out

    def train_deferred(self, steps: list[tuple[ClientRuntime, torch.Tensor]], epoch: int, iteration: int) -> None:
        """The local SupCon steps that started in one global-phase iteration (non-selected clients),
        trained at the iteration's barrier: batched per model group where the batcher says so, else
        one after another. Each touches only its own client's backbone, head and optimiser, which
        nothing reads before the barrier, so the weights are those of running each at its start."""
        idx = {c.index: i for c, i in steps}
        for key, group in _by_key([c for c, _ in steps]).items():
            batches = [[idx[c.index]] for c in group]
            new = self._continue_batched(key, group, batches, epoch, phase="global", iteration=iteration)
            if new is None:
                for c, b in zip(group, batches):
                    self._local_work(c, b[0])()
            else:
                for c, st in zip(group, new):
                    self._install(c.index, st)

    def _continue_batched(self, key: str, group: list[ClientRuntime], batches: list[list], epoch: int,
                          **entry) -> list[ClientState] | None:
        """Each client of model group ``key`` continues its own training through its ``batches``,
        computed together; ``None`` (nothing trained) when the batcher decides against it or the
        state cannot be batched. The decision is logged for ``epoch`` with ``entry``'s fields."""
        use, why = self.batcher.decide(key, len(group))
        new = None
        if use:
            states = [optimizer_state(self.opts[c.index], self._param_map(c.index), copy=False) for c in group]
            jobs = [ClientJob(c.x_train, c.y_train, b) for c, b in zip(group, batches)]
            try:
                new = continue_local_batched(self.batcher.model_of(key), states, jobs, optimizer=self.batcher.optim_spec,
                                             loss="supcon", temperature=self.spec.temperature, dtype=self.ctx.dtype,
                                             device=self.ctx.tdev)
            except Unsupported as exc:
                use, why = False, f"unsupported: {exc}"
        self.batcher.log(epoch, key, len(group), use, why, **entry)
        return new

    def _param_map(self, i: int) -> dict[str, nn.Parameter]:
        """Client ``i``'s backbone + head parameters, named as in ``nn.Sequential(backbone, head)``
        (built once: the parameter objects never change, only their values)."""
        pm = self._pmaps.get(i)
        if pm is None:
            pm = self._pmaps[i] = {**{f"0.{n}": p for n, p in self.backbones[i].named_parameters()},
                                   **{f"1.{n}": p for n, p in self.heads[i].named_parameters()}}
        return pm

    def _install(self, i: int, state: ClientState) -> None:
        """Client ``i``'s weights and optimiser state become ``state`` (trained ahead)."""
        params = self._param_map(i)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state.params[name])
        load_optimizer_state(self.opts[i], params, state, copy=False)

    def _local_step_flops(self, key: str) -> float:
        b = self.ctx.batch_size
        cf = self.ctx.flops(self.ctx.client_templates[key], "client", key, b, input_grad=False)
        hf = self.head_flops(key, b)
        return cf.fwd + cf.bwd + hf.fwd + hf.bwd

    def global_epoch(self, active: list[ClientRuntime], epoch: int):
        ctx, env = self.ctx, self.ctx.env
        orders = {c.index: ctx.epoch_order(c, epoch) for c in active}
        alive = {c.index: c for c in active}
        n_iter = max((len(o) for o in orders.values()), default=0)
        self.selected_steps[:] = 0
        uploads = []  # every upload+server process of the epoch
        defer = [] if self.batcher.active else None   # local steps started this iteration, trained at its barrier
        for b in range(n_iter):
            cands = [i for i in alive if b < len(orders[i])]
            if not cands:
                break
            scores = self.selector.scores()
            chosen = set(self.selector.select(cands))
            for c in ctx.clients:
                ctx.recorder.selection(self.step, c.name, float(scores[c.index]), c.index in chosen)
            self.step += 1
            it = _Iteration()
            self._open.append(it)
            procs = {i: env.process(self.client_iteration(alive[i], orders[i][b], i in chosen, it, defer))
                     for i in cands}
            done = yield env.all_of(list(procs.values()))
            if defer:
                self.train_deferred(defer, epoch, self.step - 1)
                defer.clear()
            for i, p in procs.items():
                if not done[p]:
                    del alive[i]
            it.complete = True  # no more uploads can join this iteration
            uploads.extend(it.procs)
            self._close_rows()
        if uploads:
            yield env.all_of(uploads)  # every server step of the epoch served
        self._close_rows()
        return [c for c in active if c.index in alive]

    def _close_rows(self) -> None:
        """Close the bandit rows of finished iterations, oldest first, as soon as each is final.

        An iteration is final when every client's step of it has ended (no upload can join) and
        every server step it started has been served. Called at each iteration barrier and after
        each server step, so the row is closed at the instant its last information arrives.
        """
        while self._open and self._open[0].complete and self._open[0].pending == 0:
            it = self._open.popleft()
            sel = [i for i, out in it.results.items() if out.exc is None]  # served
            seen = [i for i in sel if it.results[i].mean is not None]  # with a loss (none in the fast mode)
            self.selector.update(sel, {i: it.results[i].mean for i in seen}, {i: it.results[i].std for i in seen})

    def client_iteration(self, c: ClientRuntime, idx: torch.Tensor, selected: bool, it: _Iteration,
                         defer: list | None = None):
        try:
            if not selected:
                yield from self.local_step(c, idx, defer=defer)
            elif self.spec.return_gradients:
                yield from self.split_step(c, idx, it)
            else:
                yield from self.stream_step(c, idx, it)
            return True
        except Unavailable as exc:
            self.ctx.dropped(c, exc)
            return False

    def local_step(self, c: ClientRuntime, idx: torch.Tensor, started: list[int] | None = None,
                   defer: list | None = None):
        """A local SupCon step on backbone + head: client compute only. With ``started`` (the
        epoch was trained ahead) the step only counts that it started, instead of training; with
        ``defer`` it notes ``(c, idx)`` there when it starts, to be trained at the iteration's
        barrier (:meth:`train_deferred`)."""
        ctx = self.ctx
        b = batch_len(idx)
        cf = ctx.flops(ctx.client_templates[c.key], "client", c.key, b, input_grad=False)
        hf = self.head_flops(c.key, b)
        if started is not None:
            def work():
                started[0] += 1
        elif defer is not None and ctx.train:
            def work():
                defer.append((c, idx))
        else:
            work = self._local_work(c, idx)

        yield from ctx.client_compute(c, cf.fwd + hf.fwd, cf.bwd + hf.bwd, "local_step", work, cf.nbytes + hf.nbytes,
                                      cf.kernels + hf.kernels)

    def _local_work(self, c: ClientRuntime, idx: torch.Tensor):
        """The torch work of a local SupCon step (None in the fast mode)."""
        bb, head, opt = self._models(c.index)
        if bb is None:
            return None
        temperature = self.spec.temperature

        def work():
            opt.zero_grad(set_to_none=True)
            loss = supcon_loss(head(bb(c.x_train[idx])), c.y_train[idx], temperature)
            loss.backward()
            opt.step()

        return work

    def split_step(self, c: ClientRuntime, idx: torch.Tensor, it: _Iteration):
        """Selected, ``return_gradients=True``: forward, up, server step, gradient down, backward."""
        ctx, env, i = self.ctx, self.ctx.env, c.index
        b = batch_len(idx)
        cf = ctx.flops(ctx.client_templates[c.key], "client", c.key, b, input_grad=False)
        bb, _, opt = self._models(i)
        box = {}

        def forward():
            opt.zero_grad(set_to_none=True)
            box["a"] = bb(c.x_train[idx])
            return box["a"].detach()

        act = yield from ctx.client_compute(c, cf.fwd, 0.0, "client_fwd", forward, cf.fwd_bytes, cf.fwd_kernels)
        up = it.start(env, self.upload_and_serve(c, idx, act, None, it))
        out: _Served = yield up
        if out.exc is not None:
            raise out.exc
        grad = out.grad
        yield ctx.send(ctx.world.server, c.device, self.grad_bytes(grad, act, b), "grad_down")

        def backward():
            box["a"].backward(grad)
            opt.step()

        yield from ctx.client_compute(c, 0.0, cf.bwd, "client_bwd", backward, cf.bwd_bytes, cf.bwd_kernels)

    def stream_step(self, c: ClientRuntime, idx: torch.Tensor, it: _Iteration):
        """Selected, ``return_gradients=False``: SupCon step on the client while the activations stream up."""
        ctx, env, i = self.ctx, self.ctx.env, c.index
        b = batch_len(idx)
        cf = ctx.flops(ctx.client_templates[c.key], "client", c.key, b, input_grad=False)
        hf = self.head_flops(c.key, b)
        bb, head, opt = self._models(i)
        temperature = self.spec.temperature
        box = {}

        def forward():
            opt.zero_grad(set_to_none=True)
            a = bb(c.x_train[idx])
            box["loss"] = supcon_loss(head(a), c.y_train[idx], temperature)
            return a.detach()

        act = yield from ctx.client_compute(c, cf.fwd + hf.fwd, 0.0, "client_fwd", forward,
                                            cf.fwd_bytes + hf.fwd_bytes, cf.fwd_kernels + hf.fwd_kernels)
        delivered = env.event()  # succeeds with None (delivered) or the exception; never fails
        it.start(env, self.upload_and_serve(c, idx, act, delivered, it))

        def backward():
            box["loss"].backward()
            opt.step()

        yield from ctx.client_compute(c, 0.0, cf.bwd + hf.bwd, "client_bwd", backward, cf.bwd_bytes + hf.bwd_bytes,
                                      cf.bwd_kernels + hf.bwd_kernels)
        exc = yield delivered
        if exc is not None:
            raise exc

    def upload_and_serve(self, c: ClientRuntime, idx: torch.Tensor, act: torch.Tensor | None, delivered,
                         it: _Iteration):
        """Activations + labels up, then the server step. Never fails: returns a :class:`_Served`
        (also stored in ``it.results``, after which finished bandit rows are closed)."""
        out = yield from self._upload_and_serve(c, idx, act, delivered)
        it.results[c.index] = out
        it.pending -= 1
        self._close_rows()
        return out

    def _upload_and_serve(self, c: ClientRuntime, idx: torch.Tensor, act: torch.Tensor | None, delivered):
        ctx, spec, i = self.ctx, self.spec, c.index
        b = batch_len(idx)
        y = c.y_train[idx] if ctx.train else None
        try:
            yield ctx.send(c.device, ctx.world.server, self.act_bytes(act, b) + 8 * b, "act_up")
        except Unavailable as exc:
            if delivered is not None:
                delivered.succeed(exc)
            return _Served(exc=exc)
        if delivered is not None:
            delivered.succeed(None)
        lam = float(spec.lambda_)
        want_grad = bool(spec.return_gradients)
        sparse = bool(spec.sparse_payload)

        def work():
            a = act.clone().requires_grad_(want_grad)
            self.server_opt.zero_grad(set_to_none=True)
            per_sample = F.cross_entropy(self.server_forward(a, i), y, reduction="none")
            loss = per_sample.mean()
            if self.masked and lam > 0:
                loss = loss + lam * self.server.sparsity_penalty(i)
            loss.backward()
            self.server_opt.step()
            ps = per_sample.detach()
            std = float(ps.std()) if ps.numel() > 1 else 0.0
            grad = a.grad if want_grad else None
            if grad is not None and sparse:
                grad = grad * (act != 0)
            return grad, float(ps.mean()), std

        try:
            flops, nbytes, kernels = self.server_cost(c.key, b)
            value = yield from ctx.server_compute(flops, "server_step", work, nbytes, kernels)
        except Unavailable as exc:
            return _Served(exc=exc)
        self.selected_steps[i] += 1
        if value is None:
            return _Served()
        grad, mean, std = value
        return _Served(grad=grad, mean=mean, std=std)

    # -- results -----------------------------------------------------------------------------
    def evaluate(self) -> None:
        ctx = self.ctx
        if not ctx.train:  # the surrogate's accuracy after the epochs done so far
            for c in ctx.clients:
                ctx.evaluate_client(c, None)
            return
        self.server.eval()
        for c in ctx.clients:
            bb = self.backbones[c.index]
            bb.eval()
            ctx.evaluate_client(c, lambda x, bb=bb, i=c.index: self.server_forward(bb(x), i))
            bb.train()
        self.server.train()

    def final_states(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.ctx.train:
            return out
        if self.masked:
            out["server"] = self.server.shared_state()
        else:
            out["server"] = {k: v.detach().clone() for k, v in self.server.state_dict().items()}
        for c in self.ctx.clients:
            if self.masked:
                out[f"mask/{c.name}"] = self.server.client_state(c.index)
            out[f"client/{c.name}"] = {k: v.detach().clone() for k, v in self.backbones[c.index].state_dict().items()}
            out[f"head/{c.name}"] = {k: v.detach().clone() for k, v in self.heads[c.index].state_dict().items()}
        return out
