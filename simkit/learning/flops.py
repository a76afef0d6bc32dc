"""FLOP counts (and memory traffic) of real model parts, from torch's own counter.

The simulator charges compute time as ``flops / (peak_flops * efficiency)`` (DESIGN.md §1), plus,
on a profile that models them, ``bytes / traffic_bytes_per_s`` and a fixed cost per kernel
(:class:`~simkit.config.DeviceProfile`, ``docs/model.md#compute``). So the FLOPs come from the
actual module at the actual batch shape, counted by
:class:`torch.utils.flop_counter.FlopCounterMode`:

* it counts the matrix ops (``mm``, ``addmm``, ``bmm``, convolutions and their backward,
  attention), with **one multiply-add = 2 FLOPs** (so ``Linear(64, 10)`` on a batch of 32 is
  ``2*32*64*10`` forward FLOPs);
* elementwise ops (ReLU, pooling, bias add, the loss) are not counted; they are a small
  share of these models' work and memory-bound anyway.

**Memory traffic** is counted in the same passes by a dispatch mode that sees every ATen op: the
bytes of the tensors each op writes (its outputs; an in-place op's mutated tensor), leaving out
views (``view``, ``t``, ``expand``, ``detach``: no data moves). This counts what the FLOP count
leaves out -- ReLU, pooling, the bias add, activation gradients -- and scales with the activations,
which is what makes a small-spatial convolution slow per FLOP (a roofline's memory side:
Williams, Waterman & Patterson, "Roofline", CACM 2009). The same mode counts the **kernels**: the
ATen ops that are not views, each of which costs a fixed dispatch, allocation and set-up time
whatever its size (the per-kernel term of layer-wise performance models, e.g. Qi, Sparks & Talwalkar,
"Paleo", ICLR 2017) -- what dominates a small model's step.

Forward and backward are counted separately. The backward pass is started with
``output.sum().backward()``: the gradient that reaches the last layer differs from a
cross-entropy's, but the matrix ops, and so the count, are identical (the loss itself is
elementwise and uncounted). A *client* part's input does not require grad, so its first
layer computes weight gradients only. A *server* part in split learning must send the
gradient with respect to the cut activation back to the client: count it with
``input_requires_grad=True``.

Counting never changes the caller's module (it works on a deep copy) and never draws from
torch's global RNG (the random input comes from a local generator).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "architecture_key", "count_flops", "clear_flop_cache"]

_CACHE: dict[Hashable, "FlopCount"] = {}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs and memory traffic of one forward and one backward pass of a module at one batch shape.

    Attributes:
        fwd: forward FLOPs (multiply-add = 2).
        bwd: backward FLOPs (0 if backward was not counted).
        fwd_bytes: bytes the forward's ops write (activations, including elementwise ops').
        bwd_bytes: bytes the backward's ops write (activation and parameter gradients; 0 if not counted).
        fwd_kernels: ATen ops (not views) the forward runs.
        bwd_kernels: ATen ops (not views) the backward runs (0 if not counted).
    """

    fwd: int
    bwd: int
    fwd_bytes: int = 0
    bwd_bytes: int = 0
    fwd_kernels: int = 0
    bwd_kernels: int = 0

    @property
    def total(self) -> int:
        return self.fwd + self.bwd

    @property
    def nbytes(self) -> int:
        """Bytes written by both passes."""
        return self.fwd_bytes + self.bwd_bytes

    @property
    def kernels(self) -> int:
        """Kernels of both passes."""
        return self.fwd_kernels + self.bwd_kernels


def count_flops(
    module: nn.Module,
    input_shape_with_batch: Sequence[int],
    *,
    backward: bool = True,
    input_requires_grad: bool = False,
    key: Hashable | None = None,
) -> FlopCount:
    """Count the FLOPs of ``module`` on a batch of shape ``input_shape_with_batch``.

    Args:
        module: the model part (its parameters, grads and RNG are left untouched).
        input_shape_with_batch: full input shape, batch first, e.g. ``(32, 1, 28, 28)``.
        backward: also count the backward pass (``output.sum().backward()``).
        input_requires_grad: count the gradient with respect to the input too (server part
            of split learning, which returns it to the client).
        key: any hashable (e.g. ``(family, cut, width, "client", shape)``); with a key the
            result is cached and later calls return the *same* :class:`FlopCount` object.
            ``None`` counts every time.

    Returns:
        A :class:`FlopCount`.
    """
    if key is not None:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    result = _count(module, tuple(int(d) for d in input_shape_with_batch), backward, input_requires_grad)
    if key is not None:
        _CACHE[key] = result
    return result


def _count(module: nn.Module, shape: tuple[int, ...], backward: bool, input_grad: bool) -> FlopCount:
    work = copy.deepcopy(module)
    params = list(work.parameters())
    ref = params[0] if params else None
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    for p in params:
        p.grad = None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    x.requires_grad_(bool(backward and input_grad))
    with torch.enable_grad():
        with FlopCounterMode(display=False) as fwd_counter, _Traffic() as fwd_traffic:
            out = work(x)
        bwd = bwd_bytes = bwd_kernels = 0
        if backward and out.requires_grad:
            total = out.sum()   # (outside the count: the seed of the backward, not the model's work)
            grad = torch.ones_like(total)
            with FlopCounterMode(display=False) as bwd_counter, _Traffic() as bwd_traffic:
                total.backward(grad)
            bwd, bwd_bytes, bwd_kernels = int(bwd_counter.get_total_flops()), bwd_traffic.bytes, bwd_traffic.kernels
    return FlopCount(fwd=int(fwd_counter.get_total_flops()), bwd=bwd, fwd_bytes=fwd_traffic.bytes,
                     bwd_bytes=bwd_bytes, fwd_kernels=fwd_traffic.kernels, bwd_kernels=bwd_kernels)


class _Traffic(TorchDispatchMode):
    """Counts the ATen ops run under it that are not views (kernels), and the bytes of the tensors
    they write (views write none)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.kernels += 1
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def architecture_key(module: nn.Module) -> tuple:
    """A hashable that is equal for modules that compute the same ops on the same input shape.

    The class (module and qualified name), ``repr`` (every child's class and configuration:
    channels, kernel, stride, ...), and each parameter's and buffer's name, shape and dtype; not
    the values, which do not change the count. Use it in a :func:`count_flops` ``key`` so runs in
    one process share counts (a count takes milliseconds; a training step of a small model less)."""
    t = type(module)
    return (t.__module__, t.__qualname__, repr(module),
            tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()),
            tuple((n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers()))


def clear_flop_cache() -> None:
    """Forget every cached count."""
    _CACHE.clear()
