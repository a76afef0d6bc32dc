"""Client selection for AdaSplit: a discounted UCB on server-side losses, and a random ablation.

Pure numpy, no SimPy and no torch: the protocol (:mod:`simkit.algorithms.adasplit`) decides *when*
a selection is made and which losses it has seen; these classes only keep the history and score it.

Discounted UCB (shared ADASPLIT.md, mechanism 3; the authors' ``BayesianUCB``/``BayesianAdvantage``)
----------------------------------------------------------------------------------------------------
Three history matrices with one row per iteration and one column per client: ``mean[t, c]`` (mean
per-sample cross-entropy of client ``c`` at the server in iteration ``t``), ``std[t, c]`` (its
standard deviation) and ``selected[t, c]`` (1 if the server observed ``c`` in ``t``). With ``T`` rows
and discount ``gamma`` (weight ``gamma**(T-1-t)``, the newest row weighs 1)::

    M_c = sum_t gamma^(T-1-t) * mean[t, c]
    D_c = sum_t gamma^(T-1-t) * std[t, c]
    n_c = sum_t gamma^(T-1-t) * selected[t, c] + 1e-15
    score_c = M_c + 2 * D_c / sqrt(n_c)

Clients with a *higher* loss (and a less certain one) score higher and are picked more often. M and
D are discounted *sums*, not averages; the exploration constant is 2 (both as in the authors' code).

Row life cycle, as in the authors' code: the history always ends in an *open* row, the iteration now
being played. It is created pre-filled with an imputation, the mean of the two rows before it (rows
before row 0 count as ``init``); :meth:`DiscountedUCB.update` overwrites the entries of the clients it
observed, marks them selected, and opens the next row. Row 0 is ``init`` (100) for every client, so
a client never observed has ``n_c = 1e-15`` and a score near ``2 * 100 / 3.2e-8``: every client is
tried once (in seeded random order) before any is tried twice -- the optimistic start. A client that
is not observed carries a decaying imputed value forward. :meth:`scores` therefore includes the open
row (purely imputed at selection time), exactly like the authors' ``select_clients`` after
``end_round``. History is capped at ``max_history`` rows (2048, the authors' cap); the oldest row is
dropped.

One older version of the authors' ``BayesianAdvantage`` divided ``M`` by a count of *non*-selections;
we follow the newer version, which matches ADASPLIT.md.

Ties (e.g. every client still at the optimistic prior) are broken by the caller's seeded
``numpy.random.Generator``: every :meth:`select` draws one uniform number per client, whether or not
there is a tie, so the stream consumed, and hence the whole run, is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DiscountedUCB", "RandomSelection", "topk"]

#: added to the discounted selection count (the authors' constant): a never-selected client's
#: exploration bonus is huge but finite
COUNT_EPS = 1e-15


def topk(scores: np.ndarray, k: int, rng: np.random.Generator, candidates: Sequence[int] | None = None) -> list[int]:
    """The ``k`` candidates with the highest score, ties broken by ``rng`` (returned best first).

    One uniform number per client is drawn on every call (ties or not), so the generator advances
    the same way whatever the scores are.
    """
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[0]
    tiebreak = rng.random(n)
    cand = np.arange(n) if candidates is None else np.asarray(sorted({int(c) for c in candidates}), dtype=int)
    if cand.size == 0 or k <= 0:
        return []
    # lexsort: last key is primary -> highest score first, then the random key
    order = np.lexsort((tiebreak[cand], -scores[cand]))
    return [int(cand[i]) for i in order[: min(k, cand.size)]]


class DiscountedUCB:
    """Discounted UCB over clients, rewarded by their server-side loss (ADASPLIT.md §3).

    Args:
        n_clients: number of arms (clients), indexed ``0..n_clients-1``.
        k: how many clients :meth:`select` returns (at most the number of candidates).
        gamma: discount in ``(0, 1]`` (0.85 in the authors' newest script).
        rng: the run's seeded generator (tie-breaking only).
        init: the optimistic value of row 0 for mean and std (100, as the authors).
        max_history: most rows kept (2048, as the authors).

    Attributes:
        mean, std, selected: the ``(T, n_clients)`` history, oldest row first; the last row is the
            open one (see the module docstring).
    """

    def __init__(self, n_clients: int, k: int, gamma: float, rng: np.random.Generator, *, init: float = 100.0,
                 max_history: int = 2048):
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if max_history < 2:
            raise ValueError(f"max_history must be >= 2, got {max_history}")
        self.n_clients = int(n_clients)
        self.k = int(k)
        self.gamma = float(gamma)
        self.rng = rng
        self.init = float(init)
        self.max_history = int(max_history)
        self.mean = np.full((1, self.n_clients), self.init)
        self.std = np.full((1, self.n_clients), self.init)
        self.selected = np.zeros((1, self.n_clients))

    @property
    def rows(self) -> int:
        """Rows in the history, the open one included."""
        return int(self.mean.shape[0])

    def weights(self) -> np.ndarray:
        """Discount of each row, oldest first: ``gamma**(T-1-t)``."""
        return self.gamma ** np.arange(self.rows - 1, -1, -1, dtype=float)

    def scores(self) -> np.ndarray:
        """``M + 2 D / sqrt(n)`` per client (see the module docstring)."""
        w = self.weights()
        m = w @ self.mean
        d = w @ self.std
        n = w @ self.selected + COUNT_EPS
        return m + 2.0 * d / np.sqrt(n)

    def select(self, candidates: Iterable[int] | None = None, k: int | None = None) -> list[int]:
        """Top-``k`` clients by :meth:`scores` among ``candidates`` (default: all), best first."""
        cand = None if candidates is None else list(candidates)
        return topk(self.scores(), self.k if k is None else int(k), self.rng, cand)

    def update(self, selected: Iterable[int], mean_loss: Mapping[int, float], std_loss: Mapping[int, float]) -> None:
        """Close the open row with this iteration's observations and open the next one.

        Args:
            selected: clients the server trained on this iteration (marked selected).
            mean_loss, std_loss: their observed statistics; a selected client missing from these
                keeps the imputed value (it still counts as selected). Keys outside ``selected``
                are an error.
        """
        sel = [int(c) for c in selected]
        extra = (set(mean_loss) | set(std_loss)) - set(sel)
        if extra:
            raise ValueError(f"losses given for clients that were not selected: {sorted(extra)}")
        row = self.rows - 1
        for c in sel:
            if not 0 <= c < self.n_clients:
                raise ValueError(f"client {c} out of range 0..{self.n_clients - 1}")
            self.selected[row, c] = 1.0
            if c in mean_loss:
                self.mean[row, c] = float(mean_loss[c])
            if c in std_loss:
                self.std[row, c] = float(std_loss[c])
        self._open_row()

    def _open_row(self) -> None:
        prev2_m = self.mean[-2] if self.rows >= 2 else np.full(self.n_clients, self.init)
        prev2_s = self.std[-2] if self.rows >= 2 else np.full(self.n_clients, self.init)
        new_m = (prev2_m + self.mean[-1]) / 2.0
        new_s = (prev2_s + self.std[-1]) / 2.0
        self.mean = np.vstack([self.mean, new_m])
        self.std = np.vstack([self.std, new_s])
        self.selected = np.vstack([self.selected, np.zeros(self.n_clients)])
        if self.rows > self.max_history:
            self.mean, self.std, self.selected = self.mean[1:], self.std[1:], self.selected[1:]


class RandomSelection:
    """Uniformly random ``k`` clients per iteration (the ``selection="random"`` ablation).

    Same interface as :class:`DiscountedUCB`; :meth:`scores` is all zeros and :meth:`update` only
    counts selections (``selected_counts``).
    """

    def __init__(self, n_clients: int, k: int, rng: np.random.Generator):
        if n_clients < 1 or k < 1:
            raise ValueError(f"need n_clients >= 1 and k >= 1, got {n_clients}, {k}")
        self.n_clients = int(n_clients)
        self.k = int(k)
        self.rng = rng
        self.selected_counts = np.zeros(self.n_clients)

    def scores(self) -> np.ndarray:
        return np.zeros(self.n_clients)

    def select(self, candidates: Iterable[int] | None = None, k: int | None = None) -> list[int]:
        cand = None if candidates is None else list(candidates)
        return topk(self.scores(), self.k if k is None else int(k), self.rng, cand)

    def update(self, selected: Iterable[int], mean_loss: Mapping[int, float], std_loss: Mapping[int, float]) -> None:
        for c in selected:
            self.selected_counts[int(c)] += 1
