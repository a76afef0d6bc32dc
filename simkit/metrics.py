"""Pure metric functions over result tables: C3-Score, time to target, Pareto fronts.

C3-Score is *simkit's definition*. The AdaSplit paper (Chopra et al., arXiv 2112.01637) introduces
a C3-Score "to evaluate performance under resource budgets" but its equation is not available to
us, so simkit defines one with the properties the paper's description requires (shared
ADASPLIT.md): C3 = A when every cost is 0; strictly decreasing in each cost; scale-free (costs
enter as fractions of their budgets); 0 (infeasible) when any cost exceeds its budget:

    C3 = A * prod_k (1 - cost_k / budget_k)     if cost_k <= budget_k for every k, else 0

with k over bandwidth B (bytes) and client compute C (FLOPs), and -- the energy- and time-aware
extension -- client energy E (J) and simulated time T (s) when their budgets are given. A user
may pass any function with the same signature instead (``score_fn``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd


def c3_score(accuracy: float, *, bytes_total: float, client_flops: float, max_bytes: float | None,
             max_client_flops: float | None, energy_j: float | None = None, max_energy_j: float | None = None,
             time_s: float | None = None, max_time_s: float | None = None) -> float:
    """simkit's C3-Score (see the module docstring). Costs without a budget are ignored."""
    score = float(accuracy)
    for cost, budget in ((bytes_total, max_bytes), (client_flops, max_client_flops),
                         (energy_j, max_energy_j), (time_s, max_time_s)):
        if budget is None or cost is None:
            continue
        if budget <= 0:
            raise ValueError("budgets must be positive")
        if cost > budget:
            return 0.0
        score *= 1.0 - cost / budget
    return score


C3Fn = Callable[..., float]


def score_row(row: dict, budgets, score_fn: C3Fn | None = None) -> float:
    """C3 of one summary row under ``budgets`` (a BudgetSpec or mapping), with an optional user function."""
    get = (lambda k: getattr(budgets, k, None)) if not isinstance(budgets, dict) else budgets.get
    fn = score_fn or c3_score
    return float(fn(row["accuracy_mean"], bytes_total=row["bytes_up"] + row["bytes_down"],
                    client_flops=row["client_flops_fwd"] + row["client_flops_bwd"],
                    max_bytes=get("max_bytes"), max_client_flops=get("max_client_flops"),
                    energy_j=row.get("energy_j_clients"), max_energy_j=get("max_client_energy_j"),
                    time_s=row.get("sim_time_s"), max_time_s=get("max_time_s")))


def time_to_target(times: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """First simulated time at which the accuracy reaches ``target`` (None if never)."""
    for t, a in zip(times, accuracies):
        if a >= target:
            return float(t)
    return None


def pareto_front(df: pd.DataFrame, maximize: Sequence[str], minimize: Sequence[str]) -> pd.Series:
    """Boolean mask of the rows no other row dominates (>= on every maximised column, <= on every
    minimised one, and strictly better on at least one)."""
    vals = np.column_stack([df[c].to_numpy(float) for c in maximize] + [-df[c].to_numpy(float) for c in minimize])
    n = len(vals)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        ge = (vals >= vals[i]).all(axis=1)
        gt = (vals > vals[i]).any(axis=1)
        if (ge & gt).any():
            mask[i] = False
    return pd.Series(mask, index=df.index)
