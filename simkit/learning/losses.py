"""Losses beyond cross-entropy: supervised contrastive (AdaSplit's local loss) and FedProx's term."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

__all__ = ["supcon_loss", "proximal_term"]


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss, the ``L_out`` form of Khosla et al. 2020 (NeurIPS), eq. 2.

    With ``z`` the L2-normalised embeddings (normalised here), ``A(i)`` every other sample of
    the batch and ``P(i)`` those with the same label as anchor ``i``::

        L = mean over anchors i with |P(i)| > 0 of
            -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

    One view per sample (no augmentations): positives are the other same-label samples in the
    batch, as AdaSplit uses it (Chopra et al. 2021). Anchors without a positive are skipped.

    Args:
        embeddings: ``(B, D)`` (extra dims are flattened).
        labels: ``(B,)`` integer labels.
        temperature: ``t`` > 0 (0.1 in Khosla et al. and AdaSplit).

    Returns:
        A scalar tensor; ``0`` (still attached to the graph, with zero gradient) when no anchor
        has a positive, e.g. a batch of one sample or all-distinct labels.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = embeddings.reshape(embeddings.shape[0], -1)
    if z.shape[0] < 2:
        return z.sum() * 0.0
    z = F.normalize(z, dim=1)
    labels = labels.reshape(-1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # A(i) excludes i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has] / n_pos[has].to(log_prob.dtype)
    return per_anchor.mean()


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's proximal term ``mu/2 * sum ||w - w_g||^2`` (Li et al. 2020, MLSys, eq. 2).

    Args:
        params: the local model's parameters (gradients flow into these).
        global_params: the round's global weights, same order and shapes (treated as constants).
        mu: proximal coefficient (``mu = 0`` gives FedAvg; returns an exact 0 then).

    Raises:
        ValueError: the two lists differ in length or in a shape.
    """
    params, global_params = list(params), list(global_params)
    if len(params) != len(global_params):
        raise ValueError(f"{len(params)} parameters but {len(global_params)} global parameters")
    if not params:
        return torch.zeros(())
    total = params[0].new_zeros(())
    for w, g in zip(params, global_params):
        if w.shape != g.shape:
            raise ValueError(f"shape mismatch: {tuple(w.shape)} vs {tuple(g.shape)}")
        total = total + (w - g.detach().to(w.device, w.dtype)).pow(2).sum()
    return (mu / 2.0) * total
