"""What every algorithm shares: the run context, client runtimes, costed steps, evaluation.

The co-simulation contract (DESIGN.md §1): a protocol is a set of SimPy processes. Real PyTorch
work runs at one simulated instant -- the instant the device starts the compute, after queueing
for a slot -- and the process then waits out ``device.compute(flops)``. Every message is a
``network.transfer`` whose size comes from the real tensors or state dicts sent, plus
``message_overhead_bytes`` per message. Evaluation is a measurement, not part of the protocol: it
takes no simulated time.

Counting conventions (documented in docs/model.md):
- client FLOPs are split into forward and backward (``client_flops_fwd``/``client_flops_bwd``);
  FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts 2);
- bytes: a tensor costs ``numel * element_size``; labels travel with activations as int64;
- a step whose device went off before it finished is not counted (its energy is).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simkit.config import Scenario
from simkit.errors import WorkloadError
from simkit.learning.data import load_dataset
from simkit.learning.flops import architecture_key, count_flops
from simkit.learning.models import build_mixed_models, build_split_model, model_bytes
from simkit.learning.partition import ClientData, partition
from simkit.records import Recorder
from simkit.rng import SeedTree
from simkit.world.chain import Chain
from simkit.world.devices import Device, DeviceOff
from simkit.world.fleet import World
from simkit.world.network import TransferAborted

#: what a protocol catches when a device it depends on goes away mid-step
Unavailable = (DeviceOff, TransferAborted)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a dense tensor on the wire."""
    return t.numel() * t.element_size()


def batch_len(idx) -> int:
    """Size of a mini-batch from :meth:`Context.epoch_order` (an index tensor, or an int in fast mode)."""
    return idx if isinstance(idx, int) else int(idx.shape[0])


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict on the wire (every tensor, parameters and buffers)."""
    return sum(tensor_bytes(t) for t in state.values())


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (FedAvg, McMahan et al. 2017); integer buffers take the first."""
    total = float(sum(weights))
    out = {}
    for k in states[0]:
        if states[0][k].is_floating_point():
            acc = torch.zeros_like(states[0][k])
            for s, w in zip(states, weights):
                acc.add_(s[k], alpha=w / total)
            out[k] = acc
        else:
            out[k] = states[0][k].clone()
    return out


class SplitCosts(NamedTuple):
    """A split step's costs at one batch size (:meth:`Context.split_costs`): FLOPs of the client
    forward, the client backward and the server step (forward + backward, with the input gradient),
    as floats; bytes up (activations + labels) and down (their gradient); then each compute's bytes
    written and kernels (:class:`~simkit.learning.flops.FlopCount`). A tuple: the hot path unpacks it."""

    cfwd: float
    cbwd: float
    srv: float
    up: int
    down: int
    fwd_bytes: float
    fwd_kernels: int
    bwd_bytes: float
    bwd_kernels: int
    srv_bytes: float
    srv_kernels: int


@dataclass
class ClientRuntime:
    """One client: its device, its data (on the run's torch device) and its model key."""

    name: str
    index: int
    device: Device
    data: ClientData
    key: str  # which client-model family it uses (the dataset name; one key unless 'mixed')
    n_train: int = 0
    n_test: int = 0
    input_shape: tuple = ()
    x_train: torch.Tensor = None
    y_train: torch.Tensor = None
    x_test: torch.Tensor = None
    y_test: torch.Tensor = None
    state: dict = field(default_factory=dict)  # per-algorithm scratch (models, optimisers)


class Context:
    """Everything one run's algorithm needs, built from the scenario."""

    def __init__(self, scenario: Scenario, world: World, recorder: Recorder, seeds: SeedTree):
        self.scenario = scenario
        self.spec = scenario.algorithm
        self.world = world
        self.env = world.env
        self.recorder = recorder
        self.seeds = seeds
        self.tdev = torch.device(scenario.workload.torch_device)
        self.dtype = torch.float64 if scenario.workload.dtype == "float64" else torch.float32
        self.batch_size = scenario.workload.batch_size
        self.overhead = scenario.algorithm.message_overhead_bytes
        self.train = scenario.train
        self.elem_bytes = 8 if self.dtype == torch.float64 else 4
        self.accuracy_source = "measured"
        self._surrogate = None
        self.flops_client_fwd = 0.0
        self.flops_client_bwd = 0.0
        self.flops_server = 0.0
        self._flop_cache: dict = {}
        self._split_costs: dict = {}
        self._sizes: dict[int, tuple[int, ...]] = {}   # fast mode: n_train -> its mini-batch sizes
        self.finished: dict[str, int] = {}  # client -> rounds it completed
        self._build_workload()
        # Count each model part at the batch size now, as the algorithms will (client part without,
        # server part with the input gradient): part of setting the run up, and the first count in
        # a process also pays torch's one-off set-up of its FLOP counter (about 1 s here), which
        # would otherwise land inside the simulation's first step.
        for key, m in self.client_templates.items():
            self.flops(m, "client", key, self.batch_size, input_grad=False)
            self.flops(self.server_template, "server", key, self.batch_size, input_grad=True)

    # -- workload ----------------------------------------------------------------------------
    def _build_workload(self) -> None:
        sc = self.scenario
        wl = sc.workload
        names = list(self.world.clients)
        rng = self.seeds.numpy("partition")
        if wl.partition.kind == "mixed":
            data = {d: load_dataset(d, path=wl.data_path) for d in wl.partition.datasets}
            num_classes = max(d.num_classes for d in data.values())
        else:
            data = load_dataset(wl.dataset, path=wl.data_path)
            num_classes = data.num_classes
        self.num_classes = num_classes
        self.clients: list[ClientRuntime] = []
        if not self.train and wl.samples_per_client is not None:
            # fast what-if mode at scale: sizes only, no partition of the real data
            pools = list(data.values()) if isinstance(data, dict) else [data]
            groups = np.array_split(np.arange(len(names)), len(pools))
            n = wl.samples_per_client
            n_test = int(min(max(1, round(n * wl.test_fraction)), n - 1))
            key_of = {}
            for pool, members in zip(pools, groups):
                for i in members:
                    key_of[int(i)] = pool
            for i, name in enumerate(names):
                pool = key_of[i]
                self._add_client(i, name, None, pool.name, n - n_test, n_test, pool.input_shape)
        else:
            parts = partition(wl.partition, data, len(names), rng, test_fraction=wl.test_fraction,
                              max_samples=wl.max_samples)
            for i, (name, cd) in enumerate(zip(names, parts)):
                self._add_client(i, name, cd, cd.dataset, int(cd.y_train.shape[0]), int(cd.y_test.shape[0]),
                                 tuple(cd.x_train.shape[1:]))
        self.by_name = {c.name: c for c in self.clients}
        self.input_shapes = {c.key: c.input_shape for c in self.clients}

        gen = torch.Generator().manual_seed(self.seeds.int_seed("torch.init"))
        ms = wl.model
        if wl.partition.kind == "mixed":
            factories, server, cut_shape = build_mixed_models(self.input_shapes, num_classes, cut=ms.cut,
                                                              width=ms.width, generator=gen)
            self.client_templates = {k: f() for k, f in factories.items()}
            self.server_template = server
            self.cut_shape = tuple(cut_shape)
        else:
            key = self.clients[0].key
            sm = build_split_model(ms.family, self.input_shapes[key], num_classes, cut=ms.cut, width=ms.width,
                                   generator=gen)
            self.client_templates = {key: sm.client}
            self.server_template = sm.server
            self.cut_shape = tuple(sm.cut_shape)
        for m in [*self.client_templates.values(), self.server_template]:
            m.to(self.tdev, self.dtype)
        self._cut_numel = int(np.prod(self.cut_shape))

    def _add_client(self, i: int, name: str, cd: ClientData | None, key: str, n_train: int, n_test: int,
                    input_shape: tuple) -> None:
        if n_train < self.batch_size:
            raise WorkloadError(f"batch size {self.batch_size} is larger than client {name!r}'s {n_train} "
                                f"training samples", field="workload.batch_size")
        c = ClientRuntime(name=name, index=i, device=self.world.clients[name], data=cd, key=key,
                          n_train=n_train, n_test=n_test, input_shape=input_shape)
        if self.train:
            c.x_train = cd.x_train.to(self.tdev, self.dtype)
            c.y_train = cd.y_train.to(self.tdev)
            c.x_test = cd.x_test.to(self.tdev, self.dtype)
            c.y_test = cd.y_test.to(self.tdev)
        self.clients.append(c)

    # -- batches -----------------------------------------------------------------------------
    def epoch_order(self, client: ClientRuntime, epoch: int) -> Sequence:
        """The mini-batches of ``client`` in ``epoch``: index tensors (seeded, deterministic), or in
        the fast mode just their sizes (a tuple of ints, shared: the same sizes, since order does not
        change them).
        Use :func:`batch_len` for the size of either."""
        b = self.batch_size
        if not self.train:
            sizes = self._sizes.get(client.n_train)
            if sizes is None:   # the same for every epoch and every client of this size: built once
                full, rest = divmod(client.n_train, b)
                sizes = self._sizes[client.n_train] = (b,) * full + ((rest,) if rest else ())
            return sizes
        rng = np.random.default_rng(self.seeds.sequence(f"batches.{client.index}.{epoch}"))
        perm = torch.from_numpy(rng.permutation(client.n_train)).to(self.tdev)
        return [perm[i:i + b] for i in range(0, client.n_train, b)]

    def steps_per_epoch(self, client: ClientRuntime) -> int:
        return math.ceil(client.n_train / self.batch_size)

    # -- costs -------------------------------------------------------------------------------
    def flops(self, module: nn.Module, part: str, key: str, batch: int, *, input_grad: bool):
        """Forward/backward FLOPs of ``module`` at batch size ``batch`` (cached per part and shape)."""
        shape = (batch, *(self.cut_shape if part == "server" else self.input_shapes[key]))
        ck = (part, key, shape, input_grad)
        fc = self._flop_cache.get(ck)
        if fc is None:
            # per run by (part, key, shape); across runs of this process by architecture
            fc = count_flops(module, shape, backward=True, input_requires_grad=input_grad,
                             key=("context", architecture_key(module), shape, input_grad))
            self._flop_cache[ck] = fc
        return fc

    def split_costs(self, key: str, batch: int) -> SplitCosts:
        """A split step's costs at ``batch``, for client part ``key`` (cached per run); FLOPs as
        floats, as :meth:`client_compute` sums them."""
        ck = (key, batch)
        v = self._split_costs.get(ck)
        if v is None:
            cf = self.flops(self.client_templates[key], "client", key, batch, input_grad=False)
            sf = self.flops(self.server_template, "server", key, batch, input_grad=True)
            v = self._split_costs[ck] = SplitCosts(
                float(cf.fwd), float(cf.bwd), float(sf.fwd + sf.bwd),
                self.act_bytes(batch), self.act_bytes(batch, with_labels=False),
                float(cf.fwd_bytes), cf.fwd_kernels, float(cf.bwd_bytes), cf.bwd_kernels,
                float(sf.nbytes), sf.kernels)
        return v

    def act_bytes(self, batch: int, *, act: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  with_labels: bool = True) -> int:
        """Bytes of a batch's cut activations (and its int64 labels if ``with_labels``): from the
        real tensors when ``act`` is given (training), else from the cut shape (fast mode). The
        two agree (tested)."""
        if act is not None:
            return tensor_bytes(act) + (tensor_bytes(labels) if (with_labels and labels is not None) else 0)
        return batch * self._cut_numel * self.elem_bytes + (batch * 8 if with_labels else 0)

    def model_bytes(self, module: nn.Module) -> int:
        return model_bytes(module)

    def client_compute(self, client: ClientRuntime, fwd: float, bwd: float, tag: str,
                       work: Callable | None = None, nbytes: float = 0.0, kernels: int = 0):
        """A SimPy process: compute fwd+bwd FLOPs (writing ``nbytes`` in ``kernels`` kernels:
        :meth:`Device.compute_time <simkit.world.devices.Device.compute_time>`) on the client's
        device, counted on success."""
        value = yield from client.device.computing(fwd + bwd, tag, work if self.train else None, nbytes, kernels)
        self.flops_client_fwd += fwd
        self.flops_client_bwd += bwd
        return value

    def server_compute(self, flops: float, tag: str, work: Callable | None = None, nbytes: float = 0.0,
                       kernels: int = 0):
        value = yield from self.world.server.computing(flops, tag, work if self.train else None, nbytes, kernels)
        self.flops_server += flops
        return value

    def aggregate_compute(self, n_params: int, updates: int, work: Callable | None = None):
        """The server's compute averaging ``updates`` models of ``n_params`` parameters: a
        multiply-add per parameter per update (2 FLOPs), each writing the running sum (one
        element's bytes), no kernels counted."""
        return (yield from self.server_compute(2.0 * n_params * updates, "aggregate", work,
                                               float(n_params * updates * self.elem_bytes)))

    def send(self, src: Device, dst: Device, nbytes: float, tag: str):
        """Transfer event of one message (payload + per-message overhead)."""
        return self.world.network.transfer(src.node, dst.node, nbytes + self.overhead, tag=tag)

    def chain(self) -> Chain:
        """Phases of the calling process from now on, to simulate with one event when nothing else
        can happen meanwhile (:mod:`simkit.world.chain`); its sends add the per-message overhead,
        as :meth:`send` does."""
        return Chain(self.env, self.world.network, overhead=self.overhead)

    # -- availability ------------------------------------------------------------------------
    def unavailable(self, client: ClientRuntime, rnd: int) -> str | None:
        """Why ``client`` would sit out round ``rnd`` if its turn came now ("dead", "off",
        "round_dropout"), or None; records nothing."""
        dev = client.device
        if dev.dead or not dev.on:
            return "off" if not dev.dead else "dead"
        if self.world.availability.drops_round(client.name, rnd):
            return "round_dropout"
        return None

    def available(self, client: ClientRuntime, rnd: int) -> bool:
        """Is ``client`` on and not dropped for round ``rnd``? Records the dropout if not."""
        reason = self.unavailable(client, rnd)
        if reason is not None:
            self.recorder.dropout(client.name, self.env.now, reason)
            return False
        return True

    def dropped(self, client: ClientRuntime, exc: Exception) -> None:
        """Record that ``client`` dropped out mid-round."""
        self.recorder.dropout(client.name, self.env.now, "mid_round", type(exc).__name__)

    # -- optimisers and evaluation ----------------------------------------------------------
    def optimizer(self, params) -> torch.optim.Optimizer:
        s = self.spec
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr)
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum)

    def surrogate_accuracy(self, epochs: float) -> float:
        """Accuracy predicted by the scenario's learning-curve surrogate after ``epochs`` epochs."""
        if self._surrogate is None:
            from simkit.surrogate import load_curve

            self._surrogate = load_curve(self.scenario.surrogate, self.scenario)
            self.accuracy_source = self._surrogate.label
        return self._surrogate.predict(epochs)

    @torch.no_grad()
    def evaluate_client(self, client: ClientRuntime, predict: Callable[[torch.Tensor], torch.Tensor],
                        *, epochs: float | None = None) -> None:
        """Accuracy and loss of ``predict`` on ``client``'s own test split, recorded now.

        In the fast mode (no tensors) the accuracy is the surrogate's prediction after ``epochs``
        (default: the rounds done so far times ``local_epochs``) and the loss is NaN."""
        if client.device.dead:  # accuracy is reported over the clients that remain
            return
        if not self.train:
            if epochs is None:
                epochs = (self.recorder.round + 1) * getattr(self.spec, "local_epochs", 1)
            acc = self.surrogate_accuracy(epochs)
            self.recorder.eval(client.name, self.env.now, acc, float("nan"), client.n_test)
            return
        logits = predict(client.x_test)
        loss = float(F.cross_entropy(logits, client.y_test))
        acc = float((logits.argmax(1) == client.y_test).float().mean())
        self.recorder.eval(client.name, self.env.now, acc, loss, int(client.y_test.shape[0]))


class Algorithm:
    """Base of an algorithm: configured from the context; ``run()`` is the SimPy process."""

    name = "base"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.spec = ctx.spec

    def run(self):  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def evaluate(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def final_states(self) -> dict[str, dict]:  # pragma: no cover - abstract
        """The trained weights: ``{"server": state_dict, "client/<key>": state_dict, ...}``."""
        raise NotImplementedError

    def maybe_evaluate(self, rnd: int) -> None:
        if (rnd + 1) % self.spec.eval_every == 0 or rnd + 1 == self.spec.rounds:
            self.evaluate()
