"""The seed tree: one root seed per run, named child streams, no global random state.

Every random choice in simkit draws from a generator obtained here, keyed by a stable name
(``"fleet.jitter"``, ``"partition"``, ``"torch.init"`` ...). Adding a new consumer never
shifts the numbers another consumer sees, because each child is derived from the root seed
and the *name*, not from the order of calls (Mesa-style per-instance RNGs; see STYLE.md #7).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np


def _name_key(name: str) -> list[int]:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


class SeedTree:
    """Derives independent, reproducible generators from one root seed.

    Args:
        seed: the run's root seed (any non-negative int).
    """

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.seed = int(seed)

    def sequence(self, name: str) -> np.random.SeedSequence:
        """The SeedSequence of the child stream ``name``."""
        return np.random.SeedSequence([self.seed, *_name_key(name)])

    def numpy(self, name: str) -> np.random.Generator:
        """A fresh numpy Generator for ``name`` (same name, same numbers)."""
        return np.random.default_rng(self.sequence(name))

    def python(self, name: str) -> random.Random:
        """A fresh stdlib Random for ``name`` (for networkx generators' ``seed=``)."""
        return random.Random(int(self.sequence(name).generate_state(1, np.uint64)[0]))

    def int_seed(self, name: str) -> int:
        """A 63-bit integer seed for ``name`` (for torch.Generator.manual_seed)."""
        return int(self.sequence(name).generate_state(1, np.uint64)[0] >> np.uint64(1))
