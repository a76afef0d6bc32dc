"""Speed and memory measurements (never tests). ``python -m benchmarks`` runs them all."""

from __future__ import annotations

import json


def write_json(path: str | None, figures: dict) -> dict:
    """Write ``figures`` to ``path`` (if given) for ``python -m benchmarks --json``; returns them."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures
