"""A server part with client-specific sigmoid-gated weight masks (AdaSplit, shared ADASPLIT.md #5).

The server keeps *shared* weights ``U`` (the wrapped module's own parameters) and, for every client
``c`` and every Linear/Conv weight ``W``, a real-valued mask logit tensor ``m_c`` of the same shape.
The weight client ``c`` sees is ``W * sigmoid(m_c)``; biases are shared and not masked (the authors'
``weight_masks`` mask weights only). Training client ``c``'s batch with
``CE + lambda * sparsity_penalty(c)`` (``sparsity_penalty(c) = sum(sigmoid(m_c))``, an L1 norm of the
positive gates) updates ``U``, the shared biases and ``m_c`` only: the other clients' logits are not
in the graph, so their gradients stay ``None`` and torch's optimisers skip them (momentum too).
Masks live in separate ``Parameter`` objects per client for exactly that reason.

BatchNorm: if the server has ``BatchNorm1d/2d/3d`` layers, each client gets its own affine
parameters and running statistics (initialised from the wrapped layer's), as the authors'
``MaskedBatchNorm2d(planes, num_masks)``; the wrapped layer's own BN parameters are then unused.
simkit's shipped server parts have no BN, so this path only matters for user models.

The forward pass is ``torch.func.functional_call`` on the wrapped module with the gated weights (and
client ``c``'s BN tensors) substituted, so :class:`~torch.utils.flop_counter.FlopCounterMode` counts
exactly the same matrix FLOPs as for the plain server. The gating itself is elementwise, which
simkit's FLOP convention (:mod:`simkit.learning.flops`) does not count; :meth:`MaskedServer.mask_flops`
gives the extra FLOPs a caller may charge for it (AdaSplit does: one multiply per masked weight
forward, two backward -- see its docstring). Dense compute is charged regardless of mask sparsity.

Pure torch: no SimPy here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["BN_TYPES", "MASKED_TYPES", "MaskedServer", "maskable_weights"]

#: layers whose ``weight`` gets a per-client mask
MASKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: layers that get per-client parameters and statistics
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def maskable_weights(server: nn.Module) -> int:
    """How many weights a :class:`MaskedServer` on ``server`` masks per client (its ``n_masked``)."""
    return int(sum(m.weight.numel() for m in server.modules()
                   if isinstance(m, MASKED_TYPES) and getattr(m, "weight", None) is not None))


class MaskedServer(nn.Module):
    """Wrap ``server`` (its parameters become the shared weights) with per-client masks.

    Args:
        server: the server part; it is wrapped, not copied (deep-copy it first to keep a template).
        n_clients: number of clients ``0..n_clients-1``.
        init_logit: initial mask logit (3.0 -> every gate starts at ``sigmoid(3) = 0.953``, i.e.
            close to the unmasked weight; the authors' value is unknown).

    Attributes:
        masked: names of the masked weights in ``server.state_dict()`` order (``"0.0.weight"``...).
        masks: ``masks[c][j]`` is client ``c``'s logit tensor for ``masked[j]``.
    """

    def __init__(self, server: nn.Module, n_clients: int, init_logit: float = 3.0):
        super().__init__()
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        self.server = server
        self.n_clients = int(n_clients)
        self.init_logit = float(init_logit)
        self.masked: list[str] = []
        self.bn: list[str] = []
        weights = []
        for name, mod in server.named_modules():
            if isinstance(mod, MASKED_TYPES) and getattr(mod, "weight", None) is not None:
                self.masked.append(f"{name}.weight" if name else "weight")
                weights.append(mod.weight)
            elif isinstance(mod, BN_TYPES):
                self.bn.append(name)
        if not self.masked:
            raise ValueError("the server part has no Linear/Conv layer to mask")
        self.masks = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.full_like(w.detach(), self.init_logit)) for w in weights)
            for _ in range(self.n_clients))
        # per-client BatchNorm: affine parameters in a ParameterList, statistics as buffers
        self.bn_affine = nn.ModuleList()
        for c in range(self.n_clients):
            plist = nn.ParameterList()
            for j, name in enumerate(self.bn):
                mod = server.get_submodule(name)
                if mod.affine:
                    plist.append(nn.Parameter(mod.weight.detach().clone()))
                    plist.append(nn.Parameter(mod.bias.detach().clone()))
                if mod.track_running_stats:
                    self.register_buffer(f"bn_{c}_{j}_mean", mod.running_mean.detach().clone())
                    self.register_buffer(f"bn_{c}_{j}_var", mod.running_var.detach().clone())
                    self.register_buffer(f"bn_{c}_{j}_count", mod.num_batches_tracked.detach().clone())
            self.bn_affine.append(plist)

    # -- forward -----------------------------------------------------------------------------
    def _check(self, client: int) -> int:
        client = int(client)
        if not 0 <= client < self.n_clients:
            raise IndexError(f"client {client} out of range 0..{self.n_clients - 1}")
        return client

    def client_tensors(self, client: int) -> dict[str, torch.Tensor]:
        """The tensors substituted into the server for ``client``: gated weights and its BN state."""
        client = self._check(client)
        params = dict(self.server.named_parameters())
        out = {name: params[name] * torch.sigmoid(m) for name, m in zip(self.masked, self.masks[client])}
        affine = iter(self.bn_affine[client])
        for j, name in enumerate(self.bn):
            mod = self.server.get_submodule(name)
            prefix = f"{name}." if name else ""
            if mod.affine:
                out[prefix + "weight"] = next(affine)
                out[prefix + "bias"] = next(affine)
            if mod.track_running_stats:
                out[prefix + "running_mean"] = getattr(self, f"bn_{client}_{j}_mean")
                out[prefix + "running_var"] = getattr(self, f"bn_{client}_{j}_var")
                out[prefix + "num_batches_tracked"] = getattr(self, f"bn_{client}_{j}_count")
        return out

    def forward(self, x: torch.Tensor, client: int) -> torch.Tensor:
        """The server's output for ``client``'s batch ``x`` (its masks, its BN statistics)."""
        return functional_call(self.server, self.client_tensors(client), (x,))

    # -- masks -------------------------------------------------------------------------------
    def gates(self, client: int) -> list[torch.Tensor]:
        """``sigmoid(m_c)`` per masked weight (attached to the graph)."""
        return [torch.sigmoid(m) for m in self.masks[self._check(client)]]

    def sparsity_penalty(self, client: int) -> torch.Tensor:
        """``sum(sigmoid(m_c))`` over every mask of ``client`` (differentiable; the authors' penalty)."""
        return torch.stack([g.sum() for g in self.gates(client)]).sum()

    @torch.no_grad()
    def mask_sparsity(self, client: int) -> float:
        """Fraction of ``client``'s gates below 0.5 (logit < 0)."""
        ms = self.masks[self._check(client)]
        below = sum(int((m < 0).sum()) for m in ms)
        return below / self.n_masked

    @property
    def n_masked(self) -> int:
        """Masked weights per client (the size of one client's mask set)."""
        return int(sum(m.numel() for m in self.masks[0]))

    def mask_flops(self) -> tuple[int, int]:
        """Extra (forward, backward) FLOPs of the gating per step: ``n_masked`` and ``2 * n_masked``.

        Forward: one multiply ``W * g`` per masked weight. Backward: ``dL/dW = G * g`` and
        ``dL/dm = G * W * g * (1 - g)`` (counted as 2 per weight; the sigmoid and the penalty's sum
        are elementwise/reductions and, like ReLU in :mod:`simkit.learning.flops`, uncounted).
        """
        n = self.n_masked
        return n, 2 * n

    # -- states ------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor]:
        """The shared weights ``U`` (the wrapped server's state dict, detached copies)."""
        return {k: v.detach().clone() for k, v in self.server.state_dict().items()}

    def client_state(self, client: int) -> dict[str, torch.Tensor]:
        """``client``'s mask logits (keyed by weight name) and, if any, its BN tensors."""
        client = self._check(client)
        out = {f"mask.{n}": m.detach().clone() for n, m in zip(self.masked, self.masks[client])}
        if self.bn:
            for k, v in self.client_tensors(client).items():
                if k not in self.masked:
                    out[f"bn.{k}"] = v.detach().clone()
        return out
