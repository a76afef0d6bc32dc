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
With a battery, the meter calls ``on_empty`` at the exact instant the charge runs out. While more
than :data:`NEAR_EMPTY` of the charge is left it only checks at the earliest instant the battery
*could* be empty (drawing every term at once, :attr:`EnergyMeter.max_w`), so no state change has to
look at the battery; closer to empty it schedules the instant the charge runs out under the
current power, and a state change that brings that instant forward reschedules it. The
checks of a fleet's meters share one :class:`BatteryWatch`: its own heap, and one SimPy timeout at
the earliest check, so the event queue does not carry one far-future timeout per battery (with
10,000 devices those made up two thirds of the queue, and every event paid for its depth).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import simpy


#: below this share of its capacity left, a battery is checked at the exact empty instant under the
#: current power (rescheduled by every rise in power); above it, at the earliest possible one
NEAR_EMPTY = 0.05


class BatteryWatch:
    """Battery checks of many meters behind one SimPy timeout.

    :meth:`schedule` files a check (instant, meter, generation) in a heap; one timeout is kept
    pending at the earliest filed instant (an earlier filing arms a new one; the older timeout,
    no longer current, does nothing when it fires). When the current one fires, every check
    due by then runs, in the order filed for equal instants, and the next one is armed. A check
    whose generation is no longer its meter's (the meter rescheduled or switched off) is skipped.
    """

    __slots__ = ("env", "_heap", "_seq", "_at", "_timer", "_cb")

    def __init__(self, env: simpy.Environment):
        self.env = env
        self._heap: list[tuple[float, int, EnergyMeter, int]] = []
        self._seq = itertools.count()
        self._at = math.inf      # when the pending timeout fires (inf: none pending)
        self._timer = None
        self._cb = self._fire

    def schedule(self, meter: "EnergyMeter", at: float, gen: int) -> None:
        """Run ``meter._check_empty(gen)`` at simulated time ``at`` (>= now)."""
        heapq.heappush(self._heap, (at, next(self._seq), meter, gen))
        if at < self._at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        self._at = at
        now = self.env._now
        ev = self._timer = self.env.timeout(at - now if at > now else 0.0)
        ev.callbacks.append(self._cb)

    def _fire(self, ev) -> None:
        if ev is not self._timer:   # superseded by an earlier filing
            return
        due = self._at   # the instant it was armed for (the clock may differ from it in the last bit)
        self._timer = None
        self._at = -math.inf   # no arming while the checks run: they may file new checks
        heap = self._heap
        while heap and heap[0][0] <= due:
            _, _, meter, gen = heapq.heappop(heap)
            meter._check_empty(gen)
        while heap and heap[0][2]._gen != heap[0][3]:   # drop stale checks at the top
            heapq.heappop(heap)
        self._at = math.inf
        if heap:
            self._arm(heap[0][0])


class EnergyMeter:
    """Integrates one device's power by state.

    Args:
        env: the run's simulation environment (its ``now`` is the only clock read).
        idle_w, compute_w: device power (W), compute as an increment over idle at full load.
        tx_w, rx_w, tail_w, tail_s: radio power increments (W) and tail duration (s).
        slots: parallel compute slots (servers); compute power scales with busy/slots.
        battery_j: capacity in joules, or None for mains power.
        on_empty: called once (with no arguments) at the simulated instant the battery empties.
        watch: the :class:`BatteryWatch` that runs the battery checks (a fleet shares one); by
            default the meter makes its own when it first needs one.

    State changes come through :meth:`compute_begin`/:meth:`compute_end`, :meth:`tx_begin`/
    :meth:`tx_end`, :meth:`rx_begin`/:meth:`rx_end` (nested entries are counted) and
    :meth:`power_off`/:meth:`power_on`; :meth:`begin`/:meth:`end` take the state by name.
    """

    __slots__ = (
        "env", "idle_w", "compute_w", "tx_w", "rx_w", "tail_w", "tail_s", "slots",
        "battery_j", "on_empty", "on", "busy", "tx", "rx", "tail_until", "started", "_gen", "_check_at", "watch",
        "_near",
        # committed joules per term, and since when each term has been constant and not committed
        "_on_acc", "_on_since", "_j_compute", "_c_since", "_j_tx", "_tx_since", "_j_rx", "_rx_since",
        "_j_tail", "_quiet_since",
    )

    def __init__(self, env: simpy.Environment, *, idle_w: float, compute_w: float, tx_w: float = 0.0,
                 rx_w: float = 0.0, tail_w: float = 0.0, tail_s: float = 0.0, slots: int = 1,
                 battery_j: float | None = None, on_empty: Callable[[], None] | None = None,
                 watch: BatteryWatch | None = None):
        self.env = env
        self.watch = watch
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
        self._near = False   # a battery near empty: rises in power reschedule the check
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
    def max_w(self) -> float:
        """The most the device can draw with its slots as busy as now or more: every term at once
        (the tail only while the radio is quiet). Exactly ``idle_w + compute_w + max(tx_w + rx_w,
        tail_w)`` unless a meter driven by hand has more computes than slots."""
        return (self.idle_w + self.compute_w * (max(self.busy, self.slots) / self.slots)
                + max(self.tx_w + self.rx_w, self.tail_w))

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
        # near empty every rise reschedules; far from it only one that raises max_w (more
        # computes than slots, on a meter driven by hand)
        if self._near or (b >= self.slots and self.battery_j is not None):
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
        if self._near:
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
        if self._near:
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
            if self.tail_w > left_w and self._near:
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

        One check is kept pending. With more than :data:`NEAR_EMPTY` of the charge left it is
        the earliest instant the charge could run out, at :attr:`max_w`: no state change can
        bring the empty instant before it, so none reschedules (``_near`` is False). Closer to
        empty it is the instant the charge runs out at the current power, and a state change
        that raises the power calls this again: it schedules a new check only if the charge would
        now run out *earlier* than the pending check; otherwise the pending check fires first,
        finds charge left and reschedules from the state at that time. So the empty instant is
        exact, and stale checks do not pile up.
        """
        if not self.on:
            self._gen += 1  # void the pending check
            self._check_at = math.inf
            return
        now = self.env._now
        used, p = self._used_and_power()
        left = self.battery_j - used
        self._near = near = left <= NEAR_EMPTY * self.battery_j
        if left <= 0:
            delay = 0.0
        elif not near:
            max_w = self.max_w
            if max_w <= 0:
                return
            delay = left / max_w
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
        if self.watch is None:
            self.watch = BatteryWatch(self.env)
        self.watch.schedule(self, at, self._gen)

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
