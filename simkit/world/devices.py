"""Devices: compute with a queue, on/off state, energy.

``device.compute(flops)`` is the only way simulated compute time passes (DESIGN.md §1): it
queues on the device's ``slots`` (a ``simpy.Resource``; a client has one slot, a server as many
as its scenario gives), then lasts

    (flops / (peak_flops * efficiency * speed_factor) + bytes / (traffic_bytes_per_s * speed_factor))
        * slowdown + step_overhead_s + kernels * kernel_overhead_s

seconds (``bytes``: tensor data the compute's ops write; ``kernels``: the ops it runs;
both 0 unless the caller counts them, and the bytes term 0 on a profile without a traffic rate:
``docs/model.md#compute``), during which the device's energy meter is in the ``compute`` state. ``speed_factor``
is the device's seeded lognormal jitter (fixed for the run); ``slowdown`` is a straggler factor
that a fault may change for an interval (it applies to computes that *start* in the interval).

When a device goes off (battery empty, crash, end of an availability window) every compute it
is running or queueing is interrupted: the waiting process sees :class:`DeviceOff`. Its energy
up to that instant is counted; nothing after it.
"""

from __future__ import annotations

from collections import deque

import simpy

from simkit.config import DeviceProfile
from simkit.records import Recorder
from simkit.world.energy import EnergyMeter


class DeviceOff(Exception):
    """The device went off while the caller was waiting on it. ``args[0]`` is the device name."""

    def __init__(self, device: str, reason: str = "off"):
        super().__init__(device, reason)
        self.device = device
        self.reason = reason


class Device:
    """A device in the fleet (or the server).

    Args:
        env: the run's environment.
        name: unique device name (e.g. ``"rpi4-0"``).
        profile: its validated device class.
        node: its node in the topology graph.
        meter: its energy meter.
        recorder: where compute and state records go.
        speed_factor: seeded per-device multiplier on effective FLOP/s (1 = the profile's).
        slots: parallel compute slots (1 for clients).
    """

    __slots__ = ("env", "name", "profile", "node", "meter", "recorder", "speed_factor", "slots",
                 "effective_flops", "traffic_rate", "overhead", "kernel_overhead", "busy", "_queue", "_urgent", "on", "dead", "slowdown", "_running",
                 "tech", "on_off_listeners")

    def __init__(self, env: simpy.Environment, name: str, profile: DeviceProfile, *, node, meter: EnergyMeter,
                 recorder: Recorder, speed_factor: float = 1.0, slots: int = 1, tech: str = ""):
        self.env = env
        self.name = name
        self.profile = profile
        self.node = node
        self.meter = meter
        self.recorder = recorder
        self.speed_factor = float(speed_factor)
        self.slots = int(slots)
        self.effective_flops = profile.peak_flops * profile.efficiency * self.speed_factor
        # inf without a traffic rate: bytes / inf is exactly 0.0, so such a profile times a compute
        # to the bit as the pure FLOP-rate model does
        rate = profile.traffic_bytes_per_s
        self.traffic_rate = rate * self.speed_factor if rate is not None else float("inf")
        self.overhead = profile.step_overhead_s
        self.kernel_overhead = profile.kernel_overhead_s
        self.busy = 0
        self._queue: deque = deque()   # waiting compute requests, FIFO
        self._urgent: deque = deque()  # requests ahead of the queue (a server_down fault)
        self.on = True
        self.dead = False
        self.slowdown = 1.0
        self._running: set = set()
        self.tech = tech
        self.on_off_listeners: list = []

    # -- slots -------------------------------------------------------------------------------
    def acquire(self, priority: bool = False):
        """Take a compute slot: ``None`` if one was free (taken now), else an event that succeeds
        when a slot is handed over (FIFO; ``priority`` requests go ahead of ordinary ones).

        A hand-rolled queue instead of ``simpy.Resource``: taking a free slot costs no event,
        which matters on the co-simulation hot path (one compute per training step).
        """
        if self.busy < self.slots and not self._queue and not self._urgent:
            self.busy += 1
            return None
        ev = self.env.event()
        (self._urgent if priority else self._queue).append(ev)
        return ev

    def release(self) -> None:
        """Give a slot back; the next waiter (urgent first, then FIFO) gets it at once."""
        while self._urgent or self._queue:
            ev = (self._urgent or self._queue).popleft()
            if not ev.triggered:  # a waiter that gave up (interrupted) has been triggered by cancel
                ev.succeed()
                return
        self.busy -= 1

    def _cancel(self, ev) -> None:
        """A waiter stops waiting: drop its request, or pass on a slot it was already handed."""
        if ev.triggered:
            self.release()
        else:
            for q in (self._queue, self._urgent):
                try:
                    q.remove(ev)
                    return
                except ValueError:
                    pass

    @property
    def queue_length(self) -> int:
        return len(self._queue) + len(self._urgent)

    # -- compute -----------------------------------------------------------------------------
    def compute_time(self, flops: float, nbytes: float = 0.0, kernels: int = 0) -> float:
        """Simulated seconds one compute of ``flops`` FLOPs, writing ``nbytes`` bytes in ``kernels``
        kernels, takes once it holds a slot."""
        return ((flops / self.effective_flops + nbytes / self.traffic_rate) * self.slowdown + self.overhead
                + kernels * self.kernel_overhead)

    def compute(self, flops: float, tag: str = "", work=None, nbytes: float = 0.0, kernels: int = 0) -> simpy.Process:
        """An event that succeeds when ``flops`` FLOPs have been computed on this device.

        ``work`` (optional, no arguments) is the real computation: it runs at the simulated
        instant the device starts this compute (after queueing for a slot), so shared state it
        changes (server weights) changes in simulated-time order. Its return value is the
        event's value. Fails with :class:`DeviceOff` if the device is (or goes) off first.
        ``nbytes`` and ``kernels`` are the compute's memory traffic and kernel count
        (:meth:`compute_time`); records keep its FLOPs.
        """
        return self.env.process(self.computing(float(flops), tag, work, nbytes, kernels))

    def computing(self, flops: float, tag: str = "", work=None, nbytes: float = 0.0, kernels: int = 0):
        """The same as :meth:`compute`, as a sub-generator for ``yield from`` inside the caller's
        own process (no extra SimPy process: the hot path of every training step)."""
        env = self.env
        if not self.on:
            raise DeviceOff(self.name, "off")
        proc = env.active_process
        self._running.add(proc)
        started = None
        held = False
        ev = None
        try:
            ev = self.acquire()
            if ev is not None:
                yield ev
            held = True
            started = env._now
            value = work() if work is not None else None
            meter = self.meter
            meter.compute_begin()
            try:
                # (compute_time, inlined; chains time their computes with it: keep them equal)
                yield env.timeout((flops / self.effective_flops + nbytes / self.traffic_rate) * self.slowdown
                                  + self.overhead + kernels * self.kernel_overhead)
            finally:
                meter.compute_end()
            self.recorder.compute(self.name, started, env._now, flops, tag)
            return value
        except simpy.Interrupt as intr:
            if started is not None:
                self.recorder.compute(self.name, started, env.now, flops, tag, status="interrupted")
            raise DeviceOff(self.name, str(intr.cause)) from None
        finally:
            if held:
                self.release()
            elif ev is not None:
                self._cancel(ev)
            self._running.discard(proc)

    # -- chains (simkit.world.chain) ---------------------------------------------------------
    def free_now(self) -> bool:
        """Would a compute started now take a slot at once and leave the battery check alone?
        (On, a slot free and nobody queued, the meter not near empty.)"""
        return self.on and self.busy < self.slots and not self._queue and not self._urgent and not self.meter._near

    def replay_compute(self, start: float, end: float, flops: float, tag: str) -> None:
        """Account a compute of ``flops`` that held a slot from ``start`` to ``end`` (both past or
        now): what :meth:`computing` does at those instants -- the meter's state changes and the
        record -- without the SimPy events. Only for :class:`~simkit.world.chain.Chain`, which
        checked :meth:`free_now` and that nothing else happens in between; it sets the clock."""
        env, meter = self.env, self.meter
        env._now = start
        meter.compute_begin()
        env._now = end
        meter.compute_end()
        self.recorder.compute(self.name, start, end, flops, tag)

    # -- on / off ----------------------------------------------------------------------------
    def power_off(self, reason: str, *, permanent: bool = False) -> None:
        """Switch the device off now: energy stops, running computes are interrupted."""
        if self.dead or not self.on:
            if permanent:
                self.dead = True
            return
        self.on = False
        self.dead = permanent
        self.meter.power_off()
        self.recorder.state(self.name, self.env.now, "off", reason)
        for proc in list(self._running):
            if proc.is_alive:
                proc.interrupt(reason)
        for listener in self.on_off_listeners:
            listener(self, False, reason)

    def power_on(self, reason: str = "") -> None:
        if self.dead or self.on:
            return
        self.on = True
        self.meter.power_on()
        self.recorder.state(self.name, self.env.now, "on", reason)
        for listener in self.on_off_listeners:
            listener(self, True, reason)

    def __repr__(self) -> str:
        return f"Device({self.name!r}, {self.profile.name}, node={self.node!r})"
