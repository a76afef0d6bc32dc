"""Chains: back-to-back computes and transfers of one process, simulated with one event when
nothing else can happen meanwhile.

A split-learning step is five phases in a row -- client forward, activations up, server step,
gradient down, client backward -- which cost about ten SimPy events (a timeout per compute; a
latency timer, a completion timer and a delivery event per transfer) and as many process
switches. When the step's process is the only thing that will happen in the world until the step
ends, every one of those events is predictable: each compute holds a free slot for its
:meth:`~simkit.world.devices.Device.compute_time`, each transfer is alone on the network and takes
its route's latency plus its bytes at the least capacity on the route. A :class:`Chain` computes
those instants with the same floating-point operations the events would perform, and if the end
comes strictly before the next event already in the queue (``env.peek()``: another process's
timeout, a fault, an availability change, a battery check, the run's end), it replays the phases'
bookkeeping -- meter state changes at their instants, records, network counters -- and returns a
single timeout at the end. Nothing can observe the difference: no other event runs before the
end, so no other process sees the intermediate states, and the records, energy, counters and
later event order (SimPy breaks ties by scheduling order, which keeps its order) are those of
the phase-by-phase run, to the bit (``tests/test_chain.py`` compares whole runs with chains on and
off). This is the classic fast-forward of a discrete-event simulator over a stretch in which a
single entity is active.

A chain may hold several steps (vanilla SL chains the whole turns -- weight relay and steps -- of
as many consecutive clients as end before the next event: ``SplitLearning._plan_turns``, and a
turn that does not fit whole in :func:`simkit.algorithms.sl.split_steps`, greedily); the argument
is the same, since between the steps the process itself changes nothing but torch state.

Where a chain cannot be told in advance -- a slot taken or queued, other flows on the network, a
battery near empty (its check moves with every change of power), an event due before the end --
:meth:`Chain.clear` is False and the caller runs the phases one by one as usual. ``Chain.enabled
= False`` turns chains off (tests, and A/B measurements).

Callers run their real work (torch) for all phases before yielding the chain's event: in
simulated time each piece of work still happens at its phase's start, and no other process runs
in between, so the order of updates to shared state (server weights) is the same.
"""

from __future__ import annotations

import simpy

from simkit.world.devices import Device

__all__ = ["Chain"]

_COMPUTE, _SEND = 0, 1


class Chain:
    """Phases of one process from now on, checked one by one as they are added.

    Add phases with :meth:`compute` and :meth:`send`, in order; each returns False (and the chain
    is dead) when the phase cannot be timed in advance. Then :meth:`clear` says whether the whole
    chain ends before anything else happens, and :meth:`commit` accounts it and returns the event
    to wait for.
    """

    #: False: :meth:`clear` always says no (every phase runs as its own events)
    enabled = True

    __slots__ = ("env", "network", "overhead", "t", "ops", "last")

    def __init__(self, env: simpy.Environment, network, *, overhead: float = 0):
        self.env = env
        self.network = network
        self.overhead = overhead   # bytes added to every send (a protocol's per-message overhead)
        self.t = env._now      # when the phases so far end
        self.ops: list = []
        self.last = None       # (base, delay): the final event is `delay` after `base`

    def compute(self, device: Device, flops: float, tag: str, nbytes: float = 0.0, kernels: int = 0) -> bool:
        """A compute of ``flops`` (writing ``nbytes`` in ``kernels`` kernels) on ``device`` after the
        phases so far (as ``device.computing``)."""
        if not device.free_now():
            return False
        t = self.t
        delay = device.compute_time(flops, nbytes, kernels)
        end = t + delay
        self.ops.append((_COMPUTE, device, flops, tag, t, end))
        self.t = end
        self.last = (t, delay)
        return True

    def send(self, src: Device, dst: Device, nbytes: float, tag: str) -> bool:
        """A message of ``nbytes`` (plus the chain's ``overhead``) from device ``src`` to ``dst``
        after the phases so far (as ``network.transfer`` between their nodes)."""
        nbytes = nbytes + self.overhead
        times = self.network.solo_times(src.node, dst.node, nbytes, self.t)
        if times is None:
            return False
        self.ops.append((_SEND, src.node, dst.node, nbytes, tag, self.t, times))
        self.t = times[2]
        self.last = (times[2], 0.0)   # the delivery event is scheduled when the flow completes
        return True

    def mark(self) -> tuple:
        """The chain as it is now, for :meth:`rollback` (to add phases on trial)."""
        return len(self.ops), self.t, self.last

    def rollback(self, mark: tuple) -> None:
        """Drop every phase added since :meth:`mark` returned ``mark`` (nothing was accounted yet)."""
        n, self.t, self.last = mark
        del self.ops[n:]

    def clear(self) -> bool:
        """Do all the phases end strictly before the next event in the queue?"""
        return self.enabled and self.last is not None and self.t < self.env.peek()

    def commit(self) -> simpy.Timeout:
        """Account every phase at its instants and return the timeout that fires when the last
        ends (at exactly the instant the phase-by-phase run would resume the process)."""
        env = self.env
        now = env._now
        try:
            for op in self.ops:
                if op[0] == _COMPUTE:
                    _, device, flops, tag, start, end = op
                    device.replay_compute(start, end, flops, tag)
                else:
                    _, src, dst, nbytes, tag, start, times = op
                    self.network.replay_solo(src, dst, nbytes, tag, start, times)
            base, delay = self.last
            env._now = base
            ev = env.timeout(delay)   # scheduled at base + delay, as the last phase's own event
        finally:
            env._now = now
        return ev
