"""Batched (vectorised) local training: many clients that start from the same weights, at once.

FedAvg/FedProx local training of one client touches no shared state: every client of a round
starts from the same global weights and trains on its own data with a fresh optimiser. So the
local training of all the round's clients can be computed together, as one "wide" network whose
k copies are independent, and handed back as k state dicts. This module does that, in pure torch
(no simpy): :func:`train_local_batched`.

**The equivalence contract.** For every client ``i`` the result is the state that the ordinary
loop (:func:`train_local_sequential`, the same loop as FedAvg's sequential path) produces::

    model.load_state_dict(start_state); opt = SGD/Adam(model.parameters(), ...)
    for idx in batches_i:                      # all local epochs, in order
        opt.zero_grad(); loss = cross_entropy(model(x_i[idx]), y_i[idx]) (+ FedProx term); loss.backward(); opt.step()

up to floating-point rounding only: the same formulas, the same per-step mean over the real batch,
the same update rules as ``torch.optim`` (SGD with momentum, no dampening/nesterov/weight decay;
Adam with amsgrad off, no weight decay), the same max-pool tie rule (first maximum) and ReLU
derivative (0 at 0). In float64 the weights agree with the sequential loop to ~1e-15 after several
epochs (tests check 1e-9); in float32 a single step agrees within rtol 1e-5 (tested) and longer
runs drift by ordinary rounding amplified by training (as any two float32 implementations do).
The result does not depend on the host's speed: every choice below is a fixed rule on shapes.

**How it computes.**

- Clients may have different numbers of steps and different batch sizes (the last batch of an
  epoch is smaller). The clients are sorted by their number of steps (descending) so that the
  clients still training at step ``t`` are always a *prefix* ``0..k_t-1``: finished clients are
  simply not computed any more, so their weights *and* optimiser state (momentum, Adam moments and
  step count) stay exactly as they were -- no masking of updates is needed. Within a step the
  batches are padded to the largest one; a padded sample has loss weight 0 and the mean is over
  the client's real batch size (weight ``1/n``), so it contributes exactly nothing.
- Activations are kept in a "grouped" layout ``[B, k*C, *spatial]``: a ``Conv1d``/``Conv2d``
  over k clients is one convolution with ``groups = k``; ReLU and max-pooling act per channel and
  need no change. After ``Flatten`` activations are ``[k, B, F]`` and ``Linear`` is one batched
  matmul (``baddbmm``). Inputs are gathered for all clients by one index op per step.
- Forward and backward are written out explicitly (no autograd graph, no ``vmap``): each layer
  saves what its backward needs and calls the ATen backward kernels directly
  (``convolution_backward``, ``max_pool2d_with_indices_backward``, ``threshold_backward``, bmm).
  ``ReLU -> MaxPool`` is computed as ``MaxPool -> ReLU`` (the same values and the same
  gradients, exactly: ReLU is monotone and both orders route the gradient to the same winner or
  give 0), which makes the ReLU four times cheaper.
- 2-D convolutions and max-pooling run in ``channels_last`` on the CPU for float32 (oneDNN's
  grouped convolution is 2-4x faster there, and max-pooling k*C channels of a tiny map ~30x; the
  NCHW backward of the 4x4 digits layer is faster alone but loses once the layout copies are
  counted). The layout policy is a fixed rule (never a timing), so a run is deterministic.
- The optimiser keeps one stacked tensor per parameter (``[N, *shape]``) and updates all clients
  with a handful of ``torch._foreach_*`` calls per step, with torch.optim's single-tensor formulas.
  FedProx's proximal gradient ``mu * (w - w_global)`` is added to the gradient as autograd would.
- Few allocations per step: ReLU runs in place on temporaries, the max-pool outputs, indices and
  input gradients reuse the previous step's buffers (fresh multi-MB tensors cost page faults).

**Supported** (the models of :mod:`simkit.learning.models`): ``nn.Sequential`` nesting of
``Conv1d``/``Conv2d`` (zeros padding given as numbers, any stride/dilation/groups, bias or not),
``Linear``, ``ReLU``, ``MaxPool1d``/``MaxPool2d``, ``AdaptiveAvgPool1d``/``2d`` to size 1 (global
average pooling), ``Flatten`` (dims 1..-1), ``Unflatten`` (dim 1), ``Identity``; no buffers (so no
BatchNorm); the model must end in a flat output ``[B, F]`` (class logits for the cross-entropy, an
embedding for the supervised contrastive loss).
Anything else raises :class:`Unsupported` with the reason (callers fall back to the sequential
loop): see :func:`unsupported_reason`.

**Which is faster** (:func:`prefer_batched`, measured in ``benchmarks/batched.py``): on this
project's 2-core CPU (1 torch thread) the batched path wins by ~3-4x for the small digits CNN at
10-100 clients and still by 1.1-1.8x for 28x28/32x32 CNNs and MLPs (unlike plain ``vmap``, which
loses there: the grouped convolution and pooling run in ``channels_last``). Clients are trained in
chunks of at most ~24 (:func:`auto_chunk_size`): wider batches spill the caches and get slower.
Both rules depend on the model's shapes and FLOPs only, never on the host clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AUTO_MAX_STEP_FLOPS",
    "AUTO_MIN_CLIENTS",
    "BatchedFallbackWarning",
    "BatchedProgram",
    "ClientJob",
    "ClientState",
    "OptimSpec",
    "Unsupported",
    "auto_chunk_size",
    "compile_program",
    "continue_local_batched",
    "continue_local_sequential",
    "load_optimizer_state",
    "optimizer_state",
    "prefer_batched",
    "train_local_batched",
    "train_local_sequential",
    "unsupported_reason",
]

_CL = torch.channels_last
#: ``auto`` batches a model on a CPU only up to this many training FLOPs per client step (forward +
#: backward at the run's batch size): batching won for every model measured on the 2-core CPU here
#: (benchmarks/batched.py, 1 and 2 threads, 2-100 clients): digits MLP 1.4 MFLOP 5.7x, digits CNN
#: 15.6 MFLOP 3.1-3.7x (2 threads 4.7-5.5x), MNIST-1D CNN 1.75x, 28x28 CNN 0.36 GFLOP 1.4-1.7x,
#: 32x32x3 CNN 0.5 GFLOP 1.5-1.7x, width 32 1.9 GFLOP 1.25-1.35x; beyond that it is not assumed
AUTO_MAX_STEP_FLOPS = 2.5e9
#: CPU chunking (:func:`auto_chunk_size`): measured on the 2-core CPU here, 16-25 digits clients
#: together are faster than 50 or 100 (3.0k vs 2.7k / 2.2k client-steps/s)
CHUNK_MAX_CLIENTS = 24
CHUNK_ACT_BYTES = 16 << 20
#: ``auto`` batches only when at least this many clients train in the round
AUTO_MIN_CLIENTS = 2


class Unsupported(Exception):
    """The model or optimiser cannot be trained batched; ``str(exc)`` says why."""


class BatchedFallbackWarning(UserWarning):
    """Batched training was asked for (``batched: on``) but the model is trained sequentially."""


# ---------------------------------------------------------------------------------- optimiser
@dataclass(frozen=True)
class OptimSpec:
    """The optimiser of the local training: ``sgd`` (with momentum) or ``adam``, as torch.optim."""

    kind: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in ("sgd", "adam"):
            raise Unsupported(f"optimizer {self.kind!r} (batched training supports sgd and adam)")

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer) -> OptimSpec:
        """Read the hyper-parameters of a built ``torch.optim.SGD``/``Adam`` (one param group);
        raises :class:`Unsupported` for any option the batched update does not implement."""
        if len(opt.param_groups) != 1:
            raise Unsupported("optimizer with several parameter groups")
        g = opt.param_groups[0]
        if type(opt) is torch.optim.SGD:
            bad = {k: g.get(k) for k in ("dampening", "weight_decay") if g.get(k)}
            bad.update({k: True for k in ("nesterov", "maximize") if g.get(k)})
            if bad:
                raise Unsupported(f"SGD options {bad}")
            return cls("sgd", float(g["lr"]), float(g["momentum"]))
        if type(opt) is torch.optim.Adam:
            bad = {k: g.get(k) for k in ("weight_decay",) if g.get(k)}
            bad.update({k: True for k in ("amsgrad", "maximize", "decoupled_weight_decay") if g.get(k)})
            if bad:
                raise Unsupported(f"Adam options {bad}")
            return cls("adam", float(g["lr"]), betas=(float(g["betas"][0]), float(g["betas"][1])),
                       eps=float(g["eps"]))
        raise Unsupported(f"optimizer {type(opt).__name__} (batched training supports SGD and Adam)")


@dataclass
class ClientState:
    """Where a client's own training stands, to continue it (AdaSplit): its weights
    (``named_parameters`` names), the optimiser steps it has taken (Adam's bias correction) and its
    optimiser buffers per parameter -- SGD ``(momentum_buffer,)``, Adam ``(exp_avg, exp_avg_sq)``;
    ``{}`` for an optimiser that has not stepped yet.

    ``param_steps``: Adam only, where the parameters are at different step counts (torch.optim
    skips a parameter that got no gradient: AdaSplit's split steps update the backbone, not the
    head), each parameter's count; ``step`` is then the largest. A parameter at step 0 has no
    buffers (Adam's state is created at its first step)."""

    params: dict[str, torch.Tensor]
    step: int = 0
    buffers: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    param_steps: dict[str, int] | None = None

    def step_of(self, name: str) -> int:
        """The optimiser steps parameter ``name`` has taken."""
        return self.step if self.param_steps is None else self.param_steps.get(name, 0)

    @classmethod
    def with_steps(cls, params: dict[str, torch.Tensor], steps: dict[str, int],
                   buffers: dict[str, tuple[torch.Tensor, ...]]) -> ClientState:
        """An Adam state from each parameter's step count (``param_steps`` kept only where they differ)."""
        mixed = len(set(steps.values())) > 1
        return cls(params, max(steps.values(), default=0), buffers, steps if mixed else None)


@dataclass
class ClientJob:
    """One client's local training: its data and the mini-batches it steps through, in order
    (every local epoch's batches concatenated; each an index tensor into ``x``/``y``)."""

    x: torch.Tensor
    y: torch.Tensor
    batches: Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------- layers
# Activations between ops: "grid" = [B, k*C, *spatial] (one conv with groups=k), "flat" = [k, B, F].
def _like(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``g`` in the memory layout of ``ref`` (elementwise kernels are slow on mixed layouts)."""
    if ref.dim() == 4 and ref.is_contiguous(memory_format=_CL) and not ref.is_contiguous():
        return g.contiguous(memory_format=_CL)
    return g.contiguous()


class _Op:
    params: tuple[int, ...] = ()  # indices into the stacked parameter list
    ws: dict  # per-run workspace: buffers reused from step to step (set by _run_group)

    def forward(self, x, P, k):  # -> (y, saved)
        raise NotImplementedError

    def backward(self, g, saved, P, k, grads, need_gx):  # -> g_x (or None)
        raise NotImplementedError


class _Conv(_Op):
    def __init__(self, m, iw, ib, cl_fwd: bool, cl_bwd: bool):
        self.d = 2 if isinstance(m, nn.Conv2d) else 1
        self.params = (iw,) if ib is None else (iw, ib)
        self.iw, self.ib = iw, ib
        self.wshape = tuple(m.weight.shape)
        self.cout = m.out_channels
        self.g = m.groups
        self.stride, self.padding, self.dilation = list(m.stride), list(m.padding), list(m.dilation)
        self.conv = F.conv2d if self.d == 2 else F.conv1d
        self.cl_fwd, self.cl_bwd = cl_fwd, cl_bwd

    def forward(self, x, P, k):
        w = P[self.iw][:k].reshape(k * self.cout, *self.wshape[1:])
        b = P[self.ib][:k].reshape(-1) if self.ib is not None else None
        if self.cl_fwd:
            x = x.contiguous(memory_format=_CL)
        y = self.conv(x, w, b, self.stride, self.padding, self.dilation, k * self.g)
        return y, (x, w)

    def backward(self, g, saved, P, k, grads, need_gx):
        x, w = saved
        fmt = _CL if self.cl_bwd else torch.contiguous_format
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), w,
            [k * self.cout] if self.ib is not None else None, self.stride, self.padding, self.dilation,
            False, [0] * self.d, k * self.g, [need_gx, True, self.ib is not None])
        grads[self.iw] = gw.reshape(k, *self.wshape)
        if self.ib is not None:
            grads[self.ib] = gb.reshape(k, self.cout)
        return _like(gx, x) if need_gx else None


class _Linear(_Op):
    def __init__(self, m, iw, ib):
        self.params = (iw,) if ib is None else (iw, ib)
        self.iw, self.ib = iw, ib

    def forward(self, x, P, k):  # x [k, B, F]
        w = P[self.iw][:k]
        if self.ib is None:
            return torch.bmm(x, w.transpose(1, 2)), (x,)
        return torch.baddbmm(P[self.ib][:k].unsqueeze(1), x, w.transpose(1, 2)), (x,)

    def backward(self, g, saved, P, k, grads, need_gx):
        (x,) = saved
        grads[self.iw] = torch.bmm(g.transpose(1, 2), x)
        if self.ib is not None:
            grads[self.ib] = g.sum(1)
        return torch.bmm(g, P[self.iw][:k]) if need_gx else None


class _ReLU(_Op):
    def __init__(self, inplace: bool):
        self.inplace = inplace  # the input is a temporary nobody saved (a conv/linear/pool output)

    def forward(self, x, P, k):
        y = torch.relu_(x) if self.inplace else torch.relu(x)
        return y, y

    def backward(self, g, y, P, k, grads, need_gx):
        g = _like(g, y) if g.dim() == 4 else g
        # gradients are temporaries nobody else holds: mask in place
        return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)


class _MaxPool(_Op):
    def __init__(self, m, d: int):
        def pair(v, fill):
            v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * d
            return list(v) if d == 2 else [fill, v[0]]

        self.d = d
        self.ks = pair(m.kernel_size, 1)
        self.stride = pair(m.stride if m.stride is not None else m.kernel_size, 1)
        self.padding = pair(m.padding, 0)
        self.dilation = pair(m.dilation, 1)
        self.ceil = bool(m.ceil_mode)

    def forward(self, x, P, k):
        x2 = x.unsqueeze(2) if self.d == 1 else x
        args = (self.ks, self.stride, self.padding, self.dilation, self.ceil)
        key = (tuple(x2.shape), x2.stride())
        hit = self.ws.get("fwd")
        if hit is not None and hit[0] == key:  # reuse last step's buffers (no fresh pages)
            y, idx = hit[1], hit[2]
            torch.ops.aten.max_pool2d_with_indices.out(x2, *args, out=y, indices=idx)
        else:
            y, idx = torch.ops.aten.max_pool2d_with_indices(x2, *args)
            self.ws["fwd"] = (key, y, idx)
        return (y.squeeze(2) if self.d == 1 else y), (x2, idx)

    def backward(self, g, saved, P, k, grads, need_gx):
        x2, idx = saved
        g = g.unsqueeze(2) if self.d == 1 else _like(g, x2)
        args = (self.ks, self.stride, self.padding, self.dilation, self.ceil, idx)
        key = (tuple(x2.shape), x2.stride())
        hit = self.ws.get("bwd")
        if hit is not None and hit[0] == key:
            gx = torch.ops.aten.max_pool2d_with_indices_backward.grad_input(g, x2, *args, grad_input=hit[1])
        else:
            gx = torch.ops.aten.max_pool2d_with_indices_backward(g, x2, *args)
            self.ws["bwd"] = (key, gx)
        return gx.squeeze(2) if self.d == 1 else gx


class _GlobalAvgPool(_Op):  # AdaptiveAvgPool{1,2}d(1): grid [B, k*C, *sp] -> [B, k*C, 1...]
    def forward(self, x, P, k):
        dims = tuple(range(2, x.dim()))
        # what torch's adaptive average pooling to size 1 computes: the mean over the map
        return x.mean(dims, keepdim=True), (tuple(x.shape), math.prod(x.shape[2:]), x)

    def backward(self, g, saved, P, k, grads, need_gx):
        shape, n, x = saved
        return _like((g / n).expand(shape), x)


class _Flatten(_Op):  # grid [B, k*C, *sp] -> flat [k, B, C*prod(sp)]
    def forward(self, x, P, k):
        b = x.shape[0]
        return x.contiguous().reshape(b, k, -1).transpose(0, 1), x

    def backward(self, g, x, P, k, grads, need_gx):
        return _like(g.transpose(0, 1).reshape(x.shape), x)


class _Unflatten(_Op):  # flat [k, B, F] -> grid [B, k*s0, *s[1:]]
    def __init__(self, size):
        self.size = tuple(size)

    def forward(self, x, P, k):
        b = x.shape[1]
        return x.transpose(0, 1).reshape(b, k * self.size[0], *self.size[1:]), None

    def backward(self, g, saved, P, k, grads, need_gx):
        return g.reshape(g.shape[0], k, -1).transpose(0, 1)


# ---------------------------------------------------------------------------------- program
def _leaves(module: nn.Module, prefix: str = ""):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}{name}.")
        return
    if any(True for _ in module.children()):
        raise Unsupported(f"container {type(module).__name__} at {prefix[:-1] or 'top'} (only nn.Sequential "
                          f"nesting is supported)")
    yield prefix, module


def unsupported_reason(template: nn.Module, input_shape: Sequence[int], *, device=None, dtype=None) -> str | None:
    """Why ``template`` cannot be trained batched on inputs of ``input_shape`` (None: it can)."""
    try:
        compile_program(template, input_shape, device=device, dtype=dtype)
    except Unsupported as exc:
        return str(exc)
    return None


@dataclass
class BatchedProgram:
    """A model compiled into batched ops: parameter names (in ``named_parameters`` order), their
    shapes, and the op list with the index of the first op that has parameters."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    ops: list[_Op]
    first_param_op: int
    input_shape: tuple[int, ...]
    grid_input: bool
    cl_input: bool
    max_act: int  # largest per-sample activation (elements), for the chunk size


def auto_chunk_size(prog: BatchedProgram, n_clients: int, batch: int, elem_bytes: int, device) -> int:
    """How many clients to train together: the largest layer output of one chunk stays within
    :data:`CHUNK_ACT_BYTES` (CPU: cache-sized work; too wide a batch spills the caches and gets
    slower) and at most :data:`CHUNK_MAX_CLIENTS`; the clients are split into equal chunks."""
    if torch.device(device).type == "cpu":
        per = max(1, prog.max_act * batch * elem_bytes)
        size = max(1, min(CHUNK_MAX_CLIENTS, CHUNK_ACT_BYTES // per))
    else:
        size = max(1, (1 << 30) // max(1, prog.max_act * batch * elem_bytes))
    chunks = math.ceil(n_clients / size)
    return math.ceil(n_clients / chunks)


def compile_program(template: nn.Module, input_shape: Sequence[int], *, device=None, dtype=None) -> BatchedProgram:
    """Translate ``template`` into batched ops; raises :class:`Unsupported` with the reason."""
    params = dict(template.named_parameters())
    if any(True for _ in template.buffers()):
        names = [n for n, _ in template.named_buffers()]
        raise Unsupported(f"model has buffers {names[:3]} (e.g. BatchNorm running statistics)")
    p0 = next(iter(params.values()), None)
    device = torch.device(device) if device is not None else (p0.device if p0 is not None else torch.device("cpu"))
    dtype = dtype or (p0.dtype if p0 is not None else torch.float32)
    index = {n: i for i, n in enumerate(params)}
    shape = tuple(int(d) for d in input_shape)
    layout = "grid" if len(shape) >= 2 else "flat"
    cl_ok = device.type == "cpu" and dtype == torch.float32
    ops: list[_Op] = []
    max_act = math.prod(shape)
    leaves = list(_leaves(template))
    used: set[str] = set()
    i = 0
    while i < len(leaves):
        prefix, m = leaves[i]
        where = f"{type(m).__name__} at {prefix[:-1] or 'top'}"
        own = {n: p for n, p in m.named_parameters(recurse=False)}
        for n in own:
            used.add(prefix + n)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            d = 2 if isinstance(m, nn.Conv2d) else 1
            if layout != "grid" or len(shape) != d + 1 or shape[0] != m.in_channels:
                raise Unsupported(f"{where}: expects ({m.in_channels}, {d}-D) input, gets {shape}")
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise Unsupported(f"{where}: padding {m.padding!r} / mode {m.padding_mode!r} (only numeric zeros "
                                  f"padding)")
            sp = [(s + 2 * p - dl * (kk - 1) - 1) // st + 1
                  for s, p, dl, kk, st in zip(shape[1:], m.padding, m.dilation, m.kernel_size, m.stride)]
            cl = cl_ok and d == 2  # fixed layout rule (see the module docstring)
            ops.append(_Conv(m, index[prefix + "weight"], index[prefix + "bias"] if m.bias is not None else None,
                             cl, cl))
            shape = (m.out_channels, *sp)
        elif isinstance(m, nn.Linear):
            if layout != "flat" or shape != (m.in_features,):
                raise Unsupported(f"{where}: expects flat ({m.in_features},) input, gets {layout} {shape}")
            ops.append(_Linear(m, index[prefix + "weight"], index[prefix + "bias"] if m.bias is not None else None))
            shape = (m.out_features,)
        elif isinstance(m, nn.ReLU):
            nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
            if isinstance(nxt, (nn.MaxPool1d, nn.MaxPool2d)):
                # ReLU -> MaxPool == MaxPool -> ReLU (values and gradients, exactly): pool first
                leaves[i], leaves[i + 1] = leaves[i + 1], leaves[i]
                continue
            ops.append(_ReLU(inplace=bool(ops) and isinstance(ops[-1], (_Conv, _Linear, _MaxPool))))
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            d = 2 if isinstance(m, nn.MaxPool2d) else 1
            if layout != "grid" or len(shape) != d + 1:
                raise Unsupported(f"{where}: expects a {d}-D map, gets {layout} {shape}")
            if m.return_indices:
                raise Unsupported(f"{where}: return_indices=True")
            op = _MaxPool(m, d)
            ks, st, pd, dl = (v[-d:] for v in (op.ks, op.stride, op.padding, op.dilation))
            sp = []
            for s, kk, s_, p, dil in zip(shape[1:], ks, st, pd, dl):
                num = s + 2 * p - dil * (kk - 1) - 1
                o = (-(-num // s_) if op.ceil else num // s_) + 1
                if op.ceil and (o - 1) * s_ >= s + p:
                    o -= 1
                sp.append(o)
            ops.append(op)
            shape = (shape[0], *sp)
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            d = 2 if isinstance(m, nn.AdaptiveAvgPool2d) else 1
            size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * d
            if layout != "grid" or len(shape) != d + 1 or any(v != 1 for v in size):
                raise Unsupported(f"{where}: only global average pooling (output size 1) of a {d}-D map")
            ops.append(_GlobalAvgPool())
            shape = (shape[0],) + (1,) * d
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise Unsupported(f"{where}: start_dim={m.start_dim}, end_dim={m.end_dim} (only 1, -1)")
            if layout == "grid":
                ops.append(_Flatten())
                layout, shape = "flat", (math.prod(shape),)
        elif isinstance(m, nn.Unflatten):
            size = tuple(int(s) for s in m.unflattened_size)
            if m.dim != 1 or layout != "flat" or len(size) < 2 or math.prod(size) != shape[0]:
                raise Unsupported(f"{where}: only Unflatten(1, (C, ...)) of a flat activation")
            ops.append(_Unflatten(size))
            layout, shape = "grid", size
        elif isinstance(m, nn.Identity):
            pass
        else:
            raise Unsupported(f"layer {where} is not supported by batched training")
        max_act = max(max_act, math.prod(shape))
        i += 1
    if set(params) - used:
        raise Unsupported(f"parameters outside the supported layers: {sorted(set(params) - used)[:3]}")
    if layout != "flat":
        raise Unsupported(f"the model must end in flat class logits, ends in a {len(shape) - 1}-D map {shape}")
    firsts = [j for j, o in enumerate(ops) if o.params]
    if not firsts:
        raise Unsupported("model has no trainable parameters")
    inp = tuple(int(d) for d in input_shape)
    return BatchedProgram(names=list(params), shapes=[tuple(p.shape) for p in params.values()], ops=ops,
                          first_param_op=firsts[0], input_shape=inp, grid_input=len(inp) >= 2,
                          cl_input=bool(ops and isinstance(ops[0], _Conv) and ops[0].cl_fwd), max_act=max_act)


# ---------------------------------------------------------------------------------- training
def _stack_start(prog: BatchedProgram, start_state: dict | Sequence[dict], n: int, device, dtype) -> list[torch.Tensor]:
    """The parameters stacked ``[n, *shape]``: one common start state, or one state per client."""
    per_client = not isinstance(start_state, dict)
    out = []
    for name, shp in zip(prog.names, prog.shapes):
        ts = [st[name] for st in start_state] if per_client else [start_state[name]]
        for t in ts:
            if tuple(t.shape) != shp:
                raise ValueError(f"start state {name!r} has shape {tuple(t.shape)}, the model {shp}")
        if per_client:
            out.append(torch.stack([t.detach().to(device, dtype) for t in ts]).contiguous())
        else:
            t = ts[0].detach().to(device, dtype)
            out.append(t.unsqueeze(0).repeat(n, *([1] * t.dim())).contiguous())
    return out


def _supcon_grad(z: torch.Tensor, y: torch.Tensor, lens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gradient of the sum over clients of each client's supervised contrastive loss
    (:func:`simkit.learning.losses.supcon_loss` on its own real samples) w.r.t. ``z [k, bmax, D]``.

    The same formula per client, with the padded samples masked out: a padded column never
    enters an anchor's softmax (``-inf``) nor its positives, a padded anchor is not counted. A
    client with no anchor that has a positive (e.g. one sample) gets zero gradient, as the loss
    is then the constant 0. Small (``k x bmax x bmax``): computed with autograd."""
    bmax = z.shape[1]
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        zn = F.normalize(leaf, dim=2)
        logits = torch.bmm(zn, zn.transpose(1, 2)) / temperature
        ar = torch.arange(bmax, device=z.device)
        valid = ar.unsqueeze(0) < lens.unsqueeze(1)                        # [k, bmax]
        eye = torch.eye(bmax, dtype=torch.bool, device=z.device).unsqueeze(0)
        drop = eye | ~valid.unsqueeze(1)                                     # self, padded columns
        logits = logits.masked_fill(drop, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)
        pos = (y.unsqueeze(2) == y.unsqueeze(1)) & ~drop & valid.unsqueeze(2)
        n_pos = pos.sum(dim=2)
        has = n_pos > 0
        pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=2)
        per_anchor = torch.where(has, -pos_log_prob / n_pos.clamp(min=1).to(log_prob.dtype),
                                 torch.zeros_like(pos_log_prob))
        count = has.sum(dim=1)
        loss = (per_anchor.sum(dim=1) / count.clamp(min=1).to(log_prob.dtype)).sum()
        (g,) = torch.autograd.grad(loss, leaf)
    return g


def _stack_buffers(prog: BatchedProgram, P: list[torch.Tensor], states: Sequence[ClientState] | None, slot: int,
                   device, dtype) -> list[torch.Tensor]:
    """Optimiser buffer ``slot`` of every parameter, stacked per client (zeros for a fresh one)."""
    out = [torch.zeros_like(t) for t in P]
    if states is not None:
        for i, st in enumerate(states):
            for j, name in enumerate(prog.names):
                b = st.buffers.get(name)
                if b:   # (none: a parameter that has not stepped yet, zeros as torch.optim starts)
                    out[j][i].copy_(b[slot].to(device, dtype))
    return out


@torch.no_grad()
def _run_group(prog: BatchedProgram, start_state: dict | Sequence[dict], jobs: list[ClientJob], opt: OptimSpec,
               mu: float, device, dtype, *, states: Sequence[ClientState] | None = None, loss: str = "cross_entropy",
               temperature: float = 0.1):
    """Train ``jobs`` (sorted by step count, descending) together; per job its parameter list, and
    the optimiser buffers (stacked) and per-client step counts after.

    ``states`` (one per job): continue each client's own training -- its weights, optimiser
    buffers and step count -- instead of starting every client from ``start_state`` afresh."""
    n = len(jobs)
    P = _stack_start(prog, [st.params for st in states] if states is not None else start_state, n, device, dtype)
    anchor = [t.clone() for t in P] if mu > 0 else None  # the round's global weights (same for all)
    # per client and parameter: the optimiser steps taken before (Adam's bias correction)
    s0 = [[st.step_of(name) for name in prog.names] for st in states] if states is not None \
        else [[0] * len(prog.names)] * n
    uniform = len({s for row in s0 for s in row}) <= 1
    fresh = all(not st.buffers for st in states) if states is not None else True
    if opt.kind == "sgd":
        bufs = _stack_buffers(prog, P, states, 0, device, dtype) if opt.momentum != 0 else None
    else:
        exp_avg = _stack_buffers(prog, P, states, 0, device, dtype)
        exp_avg_sq = _stack_buffers(prog, P, states, 1, device, dtype)
        if not uniform:   # clients (or parameters) at different step counts: bias corrections per client
            s0_t = torch.tensor(s0, dtype=torch.float64)   # [n, params]
    # all clients' data in one tensor; a client's batch indices are offset into it
    offsets, off = [], 0
    for j in jobs:
        offsets.append(off)
        off += int(j.x.shape[0])
    X = torch.cat([j.x.to(device, dtype) for j in jobs]) if n > 1 else jobs[0].x.to(device, dtype)
    Y = torch.cat([j.y.to(device) for j in jobs]) if n > 1 else jobs[0].y.to(device)
    steps = [len(j.batches) for j in jobs]
    feat = prog.input_shape
    ops = prog.ops
    for op in ops:
        op.ws = {}
    last = len(ops) - 1
    b1, b2 = opt.betas
    for t in range(steps[0] if n else 0):
        k = sum(1 for s in steps if s > t)  # active clients = a prefix (sorted by steps)
        idx = [jobs[i].batches[t].to(device) for i in range(k)]
        lens = torch.tensor([int(ix.shape[0]) for ix in idx], device=device)
        bmax = int(lens.max())
        gidx = torch.nn.utils.rnn.pad_sequence(idx, batch_first=False)  # [bmax, k], padded with 0
        gidx = gidx + torch.tensor(offsets[:k], device=device)
        # --- forward
        x = X[gidx]  # [bmax, k, *feat]
        if prog.grid_input:
            x = x.reshape(bmax, k * feat[0], *feat[1:])
            if prog.cl_input:
                x = x.contiguous(memory_format=_CL)
        else:
            x = x.transpose(0, 1)
        saved = []
        for op in ops:
            x, s = op.forward(x, P, k)
            saved.append(s)
        if loss == "supcon":
            g = _supcon_grad(x, Y[gidx].transpose(0, 1), lens, temperature)
        else:
            logits = x  # [k, bmax, classes]
            # --- loss gradient: per sample (softmax - onehot) * w, w = 1/n_real (0 for padding)
            y = Y[gidx].transpose(0, 1).unsqueeze(2)  # [k, bmax, 1]
            w = (torch.arange(bmax, device=device).unsqueeze(0) < lens.unsqueeze(1)).to(dtype)
            w = (w / lens.unsqueeze(1).to(dtype)).unsqueeze(2)  # [k, bmax, 1]
            g = torch.log_softmax(logits, 2).exp_().mul_(w)
            g.scatter_add_(2, y, -w)
        # --- backward
        grads: list = [None] * len(P)
        for j in range(last, prog.first_param_op - 1, -1):
            g = ops[j].backward(g, saved[j], P, k, grads, j > prog.first_param_op)
        saved = None
        params = [p[:k] for p in P]
        if mu > 0:  # FedProx: d/dw mu/2 ||w - w_g||^2 = mu (w - w_g)
            prox = torch._foreach_sub(params, [a[:k] for a in anchor])
            torch._foreach_mul_(prox, mu)
            torch._foreach_add_(grads, prox)
        # --- optimiser step (torch.optim's single-tensor formulas, all clients at once)
        if opt.kind == "sgd":
            if bufs is not None:
                bk = [b_[:k] for b_ in bufs]
                if t == 0 and fresh:   # torch.optim clones the first gradient (= 0 * momentum + g)
                    torch._foreach_copy_(bk, grads)
                else:
                    torch._foreach_mul_(bk, opt.momentum)
                    torch._foreach_add_(bk, grads)
                torch._foreach_add_(params, bk, alpha=-opt.lr)
            else:
                torch._foreach_add_(params, grads, alpha=-opt.lr)
        else:
            m1 = [m_[:k] for m_ in exp_avg]
            m2 = [v_[:k] for v_ in exp_avg_sq]
            torch._foreach_lerp_(m1, grads, 1 - b1)
            torch._foreach_mul_(m2, b2)
            torch._foreach_addcmul_(m2, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(m2)
            if uniform:
                step = (s0[0][0] if s0 and s0[0] else 0) + t + 1
                step_size = opt.lr / (1 - b1 ** step)
                bc2_sqrt = (1 - b2 ** step) ** 0.5
                torch._foreach_div_(denom, bc2_sqrt)
                torch._foreach_add_(denom, opt.eps)
                torch._foreach_addcdiv_(params, m1, denom, value=-step_size)
            else:   # the same formulas with each client's own step (Python doubles, as torch.optim's)
                step_t = s0_t[:k] + (t + 1)
                size_t = (opt.lr / (1 - b1 ** step_t)).to(device, dtype)
                bc2_t = ((1 - b2 ** step_t) ** 0.5).to(device, dtype)
                for j, (d_, m_, p_) in enumerate(zip(denom, m1, params)):
                    shp = (k,) + (1,) * (p_.dim() - 1)
                    d_.div_(bc2_t[:, j].reshape(shp)).add_(opt.eps)
                    p_.addcdiv_(m_ * size_t[:, j].reshape(shp), d_, value=-1.0)
    for op in ops:
        op.ws = {}
    steps_done = [[s + steps[i] for s in s0[i]] for i in range(n)]   # per client and parameter
    if opt.kind == "sgd":
        buffers = (bufs,) if bufs is not None else ()
    else:
        buffers = (exp_avg, exp_avg_sq)
    return [[p[i] for p in P] for i in range(n)], buffers, steps_done


def _compile_for(template: nn.Module, clients: Sequence[ClientJob], device, dtype):
    """The device, dtype (default: the template's) and compiled program for ``clients``' inputs."""
    p0 = next(iter(template.parameters()), None)
    device = torch.device(device) if device is not None else (p0.device if p0 is not None else torch.device("cpu"))
    dtype = dtype or (p0.dtype if p0 is not None else torch.float32)
    shapes = {tuple(c.x.shape[1:]) for c in clients}
    if len(shapes) != 1:
        raise Unsupported(f"clients have different input shapes {sorted(shapes)}")
    return device, dtype, compile_program(template, shapes.pop(), device=device, dtype=dtype)


def _chunks(prog: BatchedProgram, clients: Sequence[ClientJob], chunk_size: int | None, device, dtype) -> list[list[int]]:
    """Client indices sorted by step count (descending; ties keep order), in chunks trained together."""
    order = sorted(range(len(clients)), key=lambda i: -len(clients[i].batches))
    if chunk_size is None:
        bmax = max((int(b.shape[0]) for c in clients for b in c.batches), default=1)
        chunk_size = auto_chunk_size(prog, len(order), bmax, torch.empty((), dtype=dtype).element_size(), device)
    size = max(1, int(chunk_size))
    return [order[s:s + size] for s in range(0, len(order), size)]


def train_local_batched(template: nn.Module, start_state: dict[str, torch.Tensor], clients: Sequence[ClientJob], *,
                        optimizer: str | OptimSpec | torch.optim.Optimizer = "sgd", lr: float = 0.05,
                        momentum: float = 0.0, mu: float = 0.0, dtype: torch.dtype | None = None,
                        device=None, chunk_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Local training of every client in ``clients`` from ``start_state``, computed together.

    Args:
        template: the model (its structure; its weights are not used or changed).
        start_state: the common starting weights (``template.state_dict()`` keys).
        clients: per client its data and its mini-batch index tensors in step order.
        optimizer: ``"sgd"`` / ``"adam"`` (with ``lr``, ``momentum``), an :class:`OptimSpec`, or a
            built ``torch.optim.SGD``/``Adam`` whose hyper-parameters are read.
        mu: FedProx coefficient (``mu/2 ||w - w_start||^2`` added to each client's loss).
        dtype, device: of the computation (default: the template's parameters').
        chunk_size: train at most this many clients together; default :func:`auto_chunk_size`
            (a fixed rule on the model's activation sizes).

    Returns:
        Per client (in the given order) a state dict with the trained weights (fresh tensors).

    Raises:
        Unsupported: the model or optimiser is not supported (the message says why); nothing
            was computed, the caller can run the sequential loop instead.
    """
    if isinstance(optimizer, OptimSpec):
        opt = optimizer
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = OptimSpec.from_optimizer(optimizer)
    else:
        opt = OptimSpec(str(optimizer), float(lr), float(momentum))
    if not clients:
        return []
    device, dtype, prog = _compile_for(template, clients, device, dtype)
    out: list = [None] * len(clients)
    for part in _chunks(prog, clients, chunk_size, device, dtype):
        res, _, _ = _run_group(prog, start_state, [clients[i] for i in part], opt, float(mu), device, dtype)
        for i, plist in zip(part, res):
            out[i] = {name: p.clone() for name, p in zip(prog.names, plist)}
    return out


def continue_local_batched(template: nn.Module, states: Sequence[ClientState], clients: Sequence[ClientJob], *,
                           optimizer: OptimSpec, loss: str = "cross_entropy", temperature: float = 0.1,
                           dtype: torch.dtype | None = None, device=None,
                           chunk_size: int | None = None) -> list[ClientState]:
    """Continue each client's *own* training, computed together: client ``i`` starts from
    ``states[i]`` (weights, optimiser buffers and step count) and steps through
    ``clients[i].batches``. ``loss``: ``"cross_entropy"`` (the model ends in class logits) or
    ``"supcon"`` (:func:`simkit.learning.losses.supcon_loss` on the model's output embedding,
    ``temperature``). The equivalence contract is :func:`train_local_batched`'s, against the loop
    of :func:`continue_local_sequential`. Returns the new states (fresh tensors), in order.

    Raises:
        Unsupported: the model, optimiser or loss is not supported; nothing was computed.
    """
    if loss not in ("cross_entropy", "supcon"):
        raise Unsupported(f"loss {loss!r} (batched training supports cross_entropy and supcon)")
    if len(states) != len(clients):
        raise ValueError(f"{len(states)} states for {len(clients)} clients")
    if not clients:
        return []
    device, dtype, prog = _compile_for(template, clients, device, dtype)
    nbuf = 0 if (optimizer.kind == "sgd" and optimizer.momentum == 0) else (1 if optimizer.kind == "sgd" else 2)
    for st in states:
        if any(len(b) != nbuf for b in st.buffers.values()) or not st.buffers.keys() <= set(prog.names):
            raise Unsupported(f"optimiser state does not match {optimizer.kind} (expected {nbuf} buffers per "
                              f"parameter)")
    out: list = [None] * len(clients)
    for part in _chunks(prog, clients, chunk_size, device, dtype):
        res, buffers, steps = _run_group(prog, None, [clients[i] for i in part], optimizer, 0.0, device, dtype,
                                         states=[states[i] for i in part], loss=loss, temperature=temperature)
        for j, (i, plist) in enumerate(zip(part, res)):
            done = steps[j]
            # buffers only where torch.optim would have state: Adam, a parameter that has stepped;
            # SGD, one that had a momentum buffer or stepped now
            if optimizer.kind == "adam":
                has = [d > 0 for d in done]
            else:
                stepped = len(clients[i].batches) > 0
                has = [stepped or name in states[i].buffers for name in prog.names]
            bufs = {name: tuple(b[k][j].clone() for b in buffers)
                    for k, name in enumerate(prog.names) if buffers and has[k]}
            params = {name: p.clone() for name, p in zip(prog.names, plist)}
            if optimizer.kind == "adam":
                out[i] = ClientState.with_steps(params, dict(zip(prog.names, done)), bufs)
            else:   # SGD keeps no step count (as optimizer_state reads it)
                out[i] = ClientState(params, states[i].step, bufs, states[i].param_steps)
    return out


def continue_local_sequential(template: nn.Module, states: Sequence[ClientState], clients: Sequence[ClientJob], *,
                              optimizer: OptimSpec, loss: str = "cross_entropy",
                              temperature: float = 0.1) -> list[ClientState]:
    """The reference of :func:`continue_local_batched`: per client, load its state into a model and
    a torch.optim optimiser and run the ordinary loop."""
    import copy

    from simkit.learning.losses import supcon_loss

    model = copy.deepcopy(template)
    params = dict(model.named_parameters())
    out = []
    for st, c in zip(states, clients):
        model.load_state_dict(st.params)
        opt = _torch_optimizer(optimizer, list(params.values()))
        load_optimizer_state(opt, params, st)
        for idx in c.batches:
            opt.zero_grad(set_to_none=True)
            z = model(c.x[idx])
            (supcon_loss(z, c.y[idx], temperature) if loss == "supcon" else F.cross_entropy(z, c.y[idx])).backward()
            opt.step()
        out.append(optimizer_state(opt, params))
    return out


def _torch_optimizer(spec: OptimSpec, params: list) -> torch.optim.Optimizer:
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)


def load_optimizer_state(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], st: ClientState, *,
                         copy: bool = True) -> None:
    """Put ``st``'s optimiser buffers and step counts into a torch.optim SGD/Adam over ``params``.
    ``copy=False``: the optimiser takes ``st``'s buffer tensors themselves (``st`` is not used after)."""
    from torch.optim.optimizer import _get_scalar_dtype

    def own(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().to(p) if copy else t.detach().to(p)

    for name, p in params.items():
        bufs = st.buffers.get(name)
        if not bufs:
            opt.state.pop(p, None)
            continue
        if isinstance(opt, torch.optim.Adam):
            opt.state[p] = {"step": torch.tensor(float(st.step_of(name)), dtype=_get_scalar_dtype()),
                            "exp_avg": own(bufs[0], p), "exp_avg_sq": own(bufs[1], p)}
        else:
            opt.state[p] = {"momentum_buffer": own(bufs[0], p)}


def optimizer_state(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], *, copy: bool = True) -> ClientState:
    """A client's :class:`ClientState` read from its model parameters and torch.optim SGD/Adam.

    Parameters that torch.optim skipped (no gradient at some step) keep their own Adam step
    counts (``param_steps``); a parameter without state has none (Adam: step 0, SGD: no momentum
    buffer yet -- both what zeros give the batched update). ``copy=False``: the state refers to
    the live tensors (read it before anything steps again; :func:`continue_local_batched` copies
    what it reads)."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if copy else t.detach()

    steps, bufs = {}, {}
    for name, p in params.items():
        stt = opt.state.get(p) or {}
        if isinstance(opt, torch.optim.Adam):
            if stt:
                steps[name] = int(float(stt["step"]))
                bufs[name] = (own(stt["exp_avg"]), own(stt["exp_avg_sq"]))
            else:
                steps[name] = 0
        elif stt.get("momentum_buffer") is not None:
            bufs[name] = (own(stt["momentum_buffer"]),)
    return ClientState.with_steps({n: own(p) for n, p in params.items()}, steps, bufs)


def train_local_sequential(template: nn.Module, start_state: dict[str, torch.Tensor], clients: Sequence[ClientJob],
                           *, optimizer: str | OptimSpec = "sgd", lr: float = 0.05, momentum: float = 0.0,
                           mu: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """The reference: the ordinary per-client loop (what FedAvg's sequential path does)."""
    import copy

    from simkit.learning.losses import proximal_term

    opt_spec = optimizer if isinstance(optimizer, OptimSpec) else OptimSpec(str(optimizer), float(lr), float(momentum))
    model = copy.deepcopy(template)
    out = []
    for c in clients:
        model.load_state_dict(start_state)
        if opt_spec.kind == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=opt_spec.lr, betas=opt_spec.betas, eps=opt_spec.eps)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=opt_spec.lr, momentum=opt_spec.momentum)
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
        for idx in c.batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(c.x[idx]), c.y[idx])
            if anchor is not None:
                loss = loss + proximal_term(model.parameters(), anchor, mu)
            loss.backward()
            opt.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def prefer_batched(step_flops: float, n_clients: int, device) -> bool:
    """The ``auto`` rule: batch when at least :data:`AUTO_MIN_CLIENTS` clients train and, on a
    CPU, one client's training step costs at most :data:`AUTO_MAX_STEP_FLOPS` (the measured range;
    see benchmarks/batched.py). On an accelerator batching always pays. A fixed rule, not a
    timing, so the choice -- and with it the float32 rounding of a run -- is deterministic."""
    if n_clients < AUTO_MIN_CLIENTS:
        return False
    if torch.device(device).type != "cpu":
        return True
    return step_flops <= AUTO_MAX_STEP_FLOPS
