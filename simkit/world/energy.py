"""Per-device energy: power integrated exactly over simulated time, by state.

Model (DESIGN.md §2): while a device is on it draws

    P(t) = idle_w
         + compute_w * busy_slots(t) / slots      (computing)
         + tx_w      * [sending any flow]          (radio transmit)
         + rx_w      * [receiving any flow]        (radio receive)
         + tail_w    * [radio in its tail]         (cellular tail)

where the radio tail is the high-power state a cellular radio keeps for ``tail_s`` seconds after
its last transfer ends (Huang et al., "A Close Examination of Performance and Power
Characteristics of 4G LTE Networks", MobiSys 2012); a new transfer during the tail ends it (the
radio is then in tx/rx). The meter settles the integral at every state change, so energy is
exact for piecewise-constant power; there is no sampling.

A device that is off (crashed, battery empty, outside its availability window) draws nothing.
With a battery, the meter schedules the instant the charge runs out under the current power and
calls ``on_empty`` then; every state change reschedules it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import simpy

STATES = ("idle", "compute", "tx", "rx", "tail")


class EnergyMeter:
    """Integrates one device's power by state.

    Args:
        env: the run's simulation environment (its ``now`` is the only clock read).
        idle_w, compute_w: device power (W), compute as an increment over idle at full load.
        tx_w, rx_w, tail_w, tail_s: radio power increments (W) and tail duration (s).
        slots: parallel compute slots (servers); compute power scales with busy/slots.
        battery_j: capacity in joules, or None for mains power.
        on_empty: called once (with no arguments) at the simulated instant the battery empties.
    """

    __slots__ = (
        "env", "idle_w", "compute_w", "tx_w", "rx_w", "tail_w", "tail_s", "slots",
        "battery_j", "on_empty", "joules", "on", "busy", "tx", "rx", "tail_until",
        "last", "_gen", "started", "on_time", "_check_at",
    )

    def __init__(self, env: simpy.Environment, *, idle_w: float, compute_w: float, tx_w: float = 0.0,
                 rx_w: float = 0.0, tail_w: float = 0.0, tail_s: float = 0.0, slots: int = 1,
                 battery_j: float | None = None, on_empty: Callable[[], None] | None = None):
        self.env = env
        self.idle_w, self.compute_w = float(idle_w), float(compute_w)
        self.tx_w, self.rx_w, self.tail_w, self.tail_s = float(tx_w), float(rx_w), float(tail_w), float(tail_s)
        self.slots = int(slots)
        self.battery_j = battery_j
        self.on_empty = on_empty
        self.joules = {s: 0.0 for s in STATES}
        self.on = True
        self.busy = 0
        self.tx = 0
        self.rx = 0
        self.tail_until = -math.inf
        self.last = env.now
        self.started = env.now
        self.on_time = 0.0
        self._gen = 0
        self._check_at = math.inf  # when the pending battery check fires (inf: none pending)
        if battery_j is not None:
            self._schedule_empty()

    # -- integration -------------------------------------------------------------------------
    def _settle(self) -> None:
        now = self.env._now
        dt = now - self.last
        if dt > 0 and self.on:
            j = self.joules
            j["idle"] += self.idle_w * dt
            self.on_time += dt
            if self.busy:
                j["compute"] += self.compute_w * (self.busy / self.slots) * dt
            if self.tx:
                j["tx"] += self.tx_w * dt
            if self.rx:
                j["rx"] += self.rx_w * dt
            if not self.tx and not self.rx and self.tail_until > self.last:
                j["tail"] += self.tail_w * (min(now, self.tail_until) - self.last)
        self.last = now

    def power(self) -> float:
        """Current power draw in watts."""
        if not self.on:
            return 0.0
        p = self.idle_w
        if self.busy:
            p += self.compute_w * self.busy / self.slots
        if self.tx:
            p += self.tx_w
        if self.rx:
            p += self.rx_w
        if not self.tx and not self.rx and self.tail_until > self.env.now:
            p += self.tail_w
        return p

    @property
    def total_j(self) -> float:
        self._settle()
        return sum(self.joules.values())

    def snapshot(self) -> dict[str, float]:
        """Joules per state up to now (settles first)."""
        self._settle()
        return dict(self.joules)

    # -- state changes (called by devices and the network) -----------------------------------
    def begin(self, state: str) -> None:
        """Enter ``state`` ('compute', 'tx' or 'rx'); nested entries are counted.

        A second flow on a radio already sending (receiving) leaves the power as it is: nothing
        is settled then (the integral over the whole constant stretch is taken at the next change).
        """
        if state == "compute":
            self._settle()
            self.busy += 1
        elif state == "tx":
            if self.tx:
                self.tx += 1
                return
            self._settle()
            self.tx = 1
        elif state == "rx":
            if self.rx:
                self.rx += 1
                return
            self._settle()
            self.rx = 1
        else:
            raise ValueError(f"unknown energy state {state!r}")
        self._changed()

    def end(self, state: str) -> None:
        """Leave ``state``; when the radio goes quiet its tail starts.

        Power falls, unless the radio drops into a tail that draws more than the state it left:
        only then is the battery check rescheduled. Otherwise the charge runs out later than
        before, so the pending check (at or before the old empty instant) fires first and
        reschedules (see :meth:`_schedule_empty`)."""
        if state == "compute":
            self._settle()
            self.busy -= 1
            return
        if state == "tx":
            if self.tx > 1:   # still sending: same power
                self.tx -= 1
                return
            self._settle()
            self.tx = 0
            left_w = self.tx_w
        elif state == "rx":
            if self.rx > 1:
                self.rx -= 1
                return
            self._settle()
            self.rx = 0
            left_w = self.rx_w
        else:
            raise ValueError(f"unknown energy state {state!r}")
        if not self.tx and not self.rx and self.tail_s > 0:
            self.tail_until = self.env.now + self.tail_s
            if self.tail_w > left_w:
                self._changed()

    def power_off(self) -> None:
        """The device is off from now on (no power is drawn, the tail is cut)."""
        self._settle()
        self.on = False
        self.tail_until = -math.inf
        self._changed()

    def power_on(self) -> None:
        self._settle()
        self.on = True
        self._changed()

    # -- battery -----------------------------------------------------------------------------
    def _changed(self) -> None:
        if self.battery_j is not None:
            self._schedule_empty()

    def _schedule_empty(self) -> None:
        """Make sure a battery check is pending at or before the instant the charge runs out.

        One check is kept pending. A state change schedules a new one only if the charge would
        now run out *earlier* than the pending check; otherwise the pending check fires first,
        finds charge left and reschedules from the state at that time. So the empty instant is
        exact, and stale timeouts do not pile up in the event queue (one per state change would
        grow memory and slow the whole simulation for long runs of large fleets).
        """
        if not self.on:
            self._gen += 1  # void the pending check
            self._check_at = math.inf
            return
        used = sum(self.joules.values())
        left = self.battery_j - used
        p = self.power()
        now = self.env.now
        if left <= 0:
            delay = 0.0
        elif p <= 0:
            return
        else:
            delay = left / p
            # if the tail ends before the charge runs out, power drops then: re-check at that instant
            if not self.tx and not self.rx and self.tail_until > now:
                delay = min(delay, self.tail_until - now)
        at = now + delay
        if at >= self._check_at:
            return  # the pending check comes first and will reschedule
        self._gen += 1
        self._check_at = at
        gen = self._gen
        ev = self.env.timeout(delay)
        ev.callbacks.append(lambda _ev, gen=gen: self._check_empty(gen))

    def _check_empty(self, gen: int) -> None:
        if gen != self._gen or not self.on:
            return
        self._check_at = math.inf
        self._settle()
        if sum(self.joules.values()) >= self.battery_j * (1 - 1e-12):
            self._gen += 1
            if self.on_empty is not None:
                self.on_empty()
        else:
            self._schedule_empty()
