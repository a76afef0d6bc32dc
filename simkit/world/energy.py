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
radio is then in tx/rx). Each term is integrated exactly over the stretches where it is
constant, and only when that term changes: ``idle_w`` times the time on; the compute term when
the number of busy slots changes; tx (rx) from the instant the radio starts sending (receiving)
to the instant it stops; the tail from the instant the radio goes quiet to the earliest of the
tail's end, the next transfer and switching off. There is no sampling, and a change of one term
costs a few float operations (this is the co-simulation hot path: every compute and transfer).

A device that is off (crashed, battery empty, outside its availability window) draws nothing.
With a battery, the meter schedules the instant the charge runs out under the current power and
calls ``on_empty`` then; every state change reschedules it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import simpy


class EnergyMeter:
    """Integrates one device's power by state.

    Args:
        env: the run's simulation environment (its ``now`` is the only clock read).
        idle_w, compute_w: device power (W), compute as an increment over idle at full load.
        tx_w, rx_w, tail_w, tail_s: radio power increments (W) and tail duration (s).
        slots: parallel compute slots (servers); compute power scales with busy/slots.
        battery_j: capacity in joules, or None for mains power.
        on_empty: called once (with no arguments) at the simulated instant the battery empties.

    State changes come through :meth:`compute_begin`/:meth:`compute_end`, :meth:`tx_begin`/
    :meth:`tx_end`, :meth:`rx_begin`/:meth:`rx_end` (nested entries are counted) and
    :meth:`power_off`/:meth:`power_on`; :meth:`begin`/:meth:`end` take the state by name.
    """

    __slots__ = (
        "env", "idle_w", "compute_w", "tx_w", "rx_w", "tail_w", "tail_s", "slots",
        "battery_j", "on_empty", "on", "busy", "tx", "rx", "tail_until", "started", "_gen", "_check_at",
        # committed joules per term, and since when each term has been constant and not committed
        "_on_acc", "_on_since", "_j_compute", "_c_since", "_j_tx", "_tx_since", "_j_rx", "_rx_since",
        "_j_tail", "_quiet_since",
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
        self.on = True
        self.busy = 0
        self.tx = 0
        self.rx = 0
        self.tail_until = -math.inf
        now = env.now
        self.started = now
        self._on_acc = 0.0
        self._on_since = now
        self._j_compute = self._j_tx = self._j_rx = self._j_tail = 0.0
        self._c_since = self._tx_since = self._rx_since = self._quiet_since = now
        self._gen = 0
        self._check_at = math.inf  # when the pending battery check fires (inf: none pending)
        if battery_j is not None:
            self._schedule_empty()

    # -- integration -------------------------------------------------------------------------
    def _tail_upto(self, now: float) -> float:
        """Joules of the tail since the radio went quiet, up to ``now`` (not committed)."""
        if self.on and not self.tx and not self.rx and self.tail_until > self._quiet_since:
            return self.tail_w * (min(now, self.tail_until) - self._quiet_since)
        return 0.0

    def _commit(self) -> None:
        """Commit every term up to now (the terms' stretches restart now)."""
        now = self.env._now
        if self.on:
            self._on_acc += now - self._on_since
            if self.busy:
                self._j_compute += self.compute_w * (self.busy / self.slots) * (now - self._c_since)
            if self.tx:
                self._j_tx += self.tx_w * (now - self._tx_since)
            if self.rx:
                self._j_rx += self.rx_w * (now - self._rx_since)
            self._j_tail += self._tail_upto(now)
        self._on_since = self._c_since = self._tx_since = self._rx_since = self._quiet_since = now

    def _used_and_power(self) -> tuple[float, float]:
        """Joules drawn up to now (committed plus the open stretches, not committed) and the power
        now, in one pass; for a device that is on."""
        now = self.env._now
        used = self._j_compute + self._j_tx + self._j_rx + self._j_tail
        p = self.idle_w
        if self.busy:
            w = self.compute_w * (self.busy / self.slots)
            used += w * (now - self._c_since)
            p += w
        if self.tx:
            used += self.tx_w * (now - self._tx_since)
            p += self.tx_w
        if self.rx:
            used += self.rx_w * (now - self._rx_since)
            p += self.rx_w
        if not self.tx and not self.rx:
            used += self._tail_upto(now)
            if self.tail_until > now:
                p += self.tail_w
        return used + self.idle_w * (self._on_acc + (now - self._on_since)), p

    @property
    def on_time(self) -> float:
        """Seconds the device has been on."""
        return self._on_acc + (self.env._now - self._on_since if self.on else 0.0)

    def power(self) -> float:
        """Current power draw in watts."""
        return self._used_and_power()[1] if self.on else 0.0

    @property
    def total_j(self) -> float:
        return sum(self.snapshot().values())

    def snapshot(self) -> dict[str, float]:
        """Joules per state up to now."""
        self._commit()
        return {"idle": self.idle_w * self._on_acc, "compute": self._j_compute, "tx": self._j_tx,
                "rx": self._j_rx, "tail": self._j_tail}

    # -- state changes (called by devices and the network) -----------------------------------
    def compute_begin(self) -> None:
        """One more compute slot busy."""
        now = self.env._now
        b = self.busy
        if b and self.on:
            self._j_compute += self.compute_w * (b / self.slots) * (now - self._c_since)
        self._c_since = now
        self.busy = b + 1
        if self.battery_j is not None:
            self._schedule_empty()

    def compute_end(self) -> None:
        """One compute slot fewer busy (power falls: the pending battery check stays valid)."""
        now = self.env._now
        if self.on:
            self._j_compute += self.compute_w * (self.busy / self.slots) * (now - self._c_since)
        self._c_since = now
        self.busy -= 1

    def tx_begin(self) -> None:
        """A flow starts sending; a second one on a radio already sending changes nothing."""
        if self.tx:
            self.tx += 1
            return
        now = self.env._now
        if not self.rx:   # the radio was quiet: its tail (if any) ends now
            self._j_tail += self._tail_upto(now)
        self.tx = 1
        self._tx_since = now
        if self.battery_j is not None:
            self._schedule_empty()

    def rx_begin(self) -> None:
        if self.rx:
            self.rx += 1
            return
        now = self.env._now
        if not self.tx:
            self._j_tail += self._tail_upto(now)
        self.rx = 1
        self._rx_since = now
        if self.battery_j is not None:
            self._schedule_empty()

    def tx_end(self) -> None:
        """A flow stops sending; when the radio goes quiet its tail starts.

        Power falls, unless the radio drops into a tail that draws more than the state it left:
        only then is the battery check rescheduled. Otherwise the charge runs out later than
        before, so the pending check (at or before the old empty instant) fires first and
        reschedules (see :meth:`_schedule_empty`)."""
        if self.tx > 1:   # still sending: same power
            self.tx -= 1
            return
        now = self.env._now
        if self.on:
            self._j_tx += self.tx_w * (now - self._tx_since)
        self.tx = 0
        if not self.rx:
            self._went_quiet(now, self.tx_w)

    def rx_end(self) -> None:
        if self.rx > 1:
            self.rx -= 1
            return
        now = self.env._now
        if self.on:
            self._j_rx += self.rx_w * (now - self._rx_since)
        self.rx = 0
        if not self.tx:
            self._went_quiet(now, self.rx_w)

    def _went_quiet(self, now: float, left_w: float) -> None:
        self._quiet_since = now
        if self.tail_s > 0:
            self.tail_until = now + self.tail_s
            if self.tail_w > left_w and self.battery_j is not None:
                self._schedule_empty()

    def begin(self, state: str) -> None:
        """Enter ``state`` ('compute', 'tx' or 'rx')."""
        fn = {"compute": self.compute_begin, "tx": self.tx_begin, "rx": self.rx_begin}.get(state)
        if fn is None:
            raise ValueError(f"unknown energy state {state!r}")
        fn()

    def end(self, state: str) -> None:
        """Leave ``state`` ('compute', 'tx' or 'rx')."""
        fn = {"compute": self.compute_end, "tx": self.tx_end, "rx": self.rx_end}.get(state)
        if fn is None:
            raise ValueError(f"unknown energy state {state!r}")
        fn()

    def power_off(self) -> None:
        """The device is off from now on (no power is drawn, the tail is cut)."""
        self._commit()
        self.on = False
        self.tail_until = -math.inf
        self._changed()

    def power_on(self) -> None:
        self._commit()   # (off: only restarts the stretches, nothing was drawn)
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
        now = self.env._now
        used, p = self._used_and_power()
        left = self.battery_j - used
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
        if self._used_and_power()[0] >= self.battery_j * (1 - 1e-12):
            self._gen += 1
            if self.on_empty is not None:
                self.on_empty()
        else:
            self._schedule_empty()
