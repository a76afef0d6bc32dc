"""Speed and memory measurements (never tests). ``python -m benchmarks`` runs them all."""

from __future__ import annotations

import argparse
import json


def write_json(path: str | None, figures: dict) -> dict:
    """Write ``figures`` to ``path`` (if given) for ``python -m benchmarks --json``; returns them."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def parser(doc: str, *, reps: int | None = None, quick: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (CI smoke run), ``--reps N`` (default
    ``reps``; None: the benchmark decides) and ``--json FILE``; add the benchmark's own after."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--json", metavar="FILE", default=None, help="write the figures to FILE")
    return ap
