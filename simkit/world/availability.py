"""Device availability: always on, random dropout per round, on/off windows from a CSV trace.

Batteries are modelled by the energy meter (a device whose battery empties is switched off for
good and the event is recorded); this module covers the other three models.

Trace CSV format (header required)::

    device,start_s,end_s
    phone-midrange-0,0,120.5
    phone-midrange-0,300,900

Each row is an *on* window ``[start_s, end_s)`` in simulated seconds; a device is off outside
its windows. A device that appears in no row is always on. Windows of a device must not overlap.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from simkit.config import AvailabilitySpec
from simkit.errors import TraceError


def load_trace(path: str | Path, devices: Iterable[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Parse an availability trace; every malformed row is a :class:`TraceError` with its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError("file not found", file=str(path), field="fleet.availability.trace") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace: {exc}", file=str(path), field="fleet.availability.trace") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != ["device", "start_s", "end_s"]:
        raise TraceError("the first line must be the header 'device,start_s,end_s'", file=str(path), field="line 1")
    windows: dict[str, list[tuple[float, float]]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise TraceError(f"expected 3 columns, got {len(row)}", file=str(path), field=f"line {lineno}")
        name, start, end = (c.strip() for c in row)
        if not name:
            raise TraceError("empty device name", file=str(path), field=f"line {lineno}.device")
        try:
            s, e = float(start), float(end)
        except ValueError:
            raise TraceError(f"start_s/end_s must be numbers (got {start!r}, {end!r})", file=str(path),
                             field=f"line {lineno}") from None
        if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e <= s:
            raise TraceError(f"need 0 <= start_s < end_s, finite (got {s}, {e})", file=str(path),
                             field=f"line {lineno}")
        windows.setdefault(name, []).append((s, e))
    for name, ws in windows.items():
        ws.sort()
        for (s0, e0), (s1, _e1) in zip(ws, ws[1:]):
            if s1 < e0:
                raise TraceError(f"windows of device {name!r} overlap ({s0}-{e0} and {s1}-...)", file=str(path),
                                 field="windows")
    if devices is not None:
        known = set(devices)
        unknown = sorted(set(windows) - known)
        if unknown:
            raise TraceError(f"unknown device(s) {unknown[:5]}; the fleet's devices are named like "
                             f"{sorted(known)[:3]}", file=str(path), field="device")
    return windows


class Availability:
    """Answers "is this device available for round r?" and drives trace windows.

    Args:
        spec: the availability spec.
        seed: the run's root seed (dropout draws are keyed by (seed, device index, round), so
            they do not depend on the order of questions).
        devices: the client names, in fleet order.
    """

    def __init__(self, spec: AvailabilitySpec, seed: int, devices: list[str]):
        self.spec = spec
        self.seed = seed
        self.index = {d: i for i, d in enumerate(devices)}
        self.windows = load_trace(spec.trace, devices) if spec.kind == "trace" else {}

    def drops_round(self, device: str, rnd: int) -> bool:
        """True if the per-round dropout model takes ``device`` out of round ``rnd``."""
        if self.spec.kind != "dropout" or self.spec.dropout_p <= 0:
            return False
        u = np.random.default_rng([self.seed, 0xA5A1, self.index[device], rnd]).random()
        return bool(u < self.spec.dropout_p)

    def trace_process(self, env, device):
        """A SimPy process switching ``device`` on and off at its trace windows."""
        ws = self.windows.get(device.name)
        if not ws:
            return None

        def run():
            if ws[0][0] > env.now:
                device.power_off("trace")
            for s, e in ws:
                if s > env.now:
                    yield env.timeout(s - env.now)
                device.power_on("trace")
                yield env.timeout(e - env.now)
                device.power_off("trace")

        return env.process(run())
