"""Flow-level network: transfers as flows sharing link capacity by max-min fairness.

This is the model SimGrid validated for bulk TCP flows (Velho et al., "On the Validity of
Flow-level TCP Network Models for Grid and Cloud Simulations", ACM TOMACS 23(4), 2013), reduced
to its core: no per-flow window cap, no slow start, no loss, no queueing delay. DESIGN.md §2.

Topology
    A :class:`networkx.DiGraph`. Each direction of a full-duplex link is its own edge ``(u, v)``
    with ``bandwidth_bps`` (> 0, finite, bits per second) and ``latency_s`` (>= 0, finite,
    seconds), so an upload ``u -> v`` and a download ``v -> u`` never share capacity. A "link
    u<->v" (for :meth:`Network.link_down` / :meth:`Network.link_up`) means both directed edges.
    Endpoint limits (a device's NIC or radio rate) are the capacities of its access edges. The
    graph is read once, at construction; later changes go through :meth:`Network.set_capacity`
    and the link methods (the graph object itself is never modified).

Routing
    Shortest path by total ``latency_s``; ties go to the fewest hops, then to the path whose
    sequence of nodes comes first in the graph's node order. Latencies are summed exactly (as
    integers scaled by a common power of two), so the choice never depends on floating-point
    summation order. Routes are cached and the cache is dropped whenever a link goes down or up.

Timeline of one transfer ``transfer(src, dst, nbytes)`` requested at ``t0``
    1. At ``t0`` the route is taken from the cache (recomputed if a link changed).
    2. *Latency phase*, status ``'latency'``: the flow waits the path latency ``L`` (the sum of
       ``latency_s`` over its edges). It uses no bandwidth and the radios are not active.
    3. At ``data_start = t0 + L`` the flow picks its route again (the best path among the links up
       *now*; normally the same one) and becomes ``'active'``: it shares capacity with every other
       active flow, and the sender's meter is in ``tx`` and the receiver's in ``rx``.
    4. It ends when its remaining bytes reach 0; its event succeeds then, with the :class:`Flow`
       as value. One flow alone on one edge therefore takes exactly ``L + nbytes * 8 / bandwidth``.

    ``nbytes == 0`` succeeds after the latency (no data phase); ``src == dst`` succeeds at once.
    Every flow that ends (delivered or dropped) is passed to ``recorder.transfer``.

Sharing (processor sharing per link, STYLE.md #14)
    The rates of the active flows are max-min fair: progressive filling raises all rates together
    until some edge is full; flows through a full edge keep their rate, the others keep rising, so a
    flow's rate is set by its bottleneck and capacity it cannot use goes to flows bottlenecked
    elsewhere. Whenever a flow becomes active or ends, or a capacity or link changes, the flows
    whose rate changes are settled at their old rate (``remaining -= rate * dt / 8``), the rates
    are recomputed and the next completion is rescheduled. Only the connected component (flows
    that share an edge, transitively) of the edges that changed is recomputed. Changes made at one
    simulated instant are folded into one recomputation, queued behind the events already
    scheduled for that instant (a change made after it ran queues another). :func:`maxmin_reference`
    is the plain statement of the allocation and defines the rates of small components to the bit;
    :func:`maxmin_fast` (numpy, level by level) computes the same rates for large ones (up to
    rounding). Completions are kept in a heap with one pending SimPy timeout for the earliest;
    timeouts that a later change made obsolete are ignored when they fire (SimPy cannot cancel one).

    Floating point: a flow is complete when its remaining bytes are below ``1e-9 * nbytes`` or its
    finish time equals ``now`` within ``1e-12`` relative, so no flow lingers with a few bytes left.
    A delivered flow counts exactly ``nbytes`` on every edge it crossed.

    Host cost, without changing a bit of the above: a recomputation walks the component once,
    sorting out done flows and taking the smallest fair share on the way. A component of one flow
    gets the smallest capacity on its path; a small one whose first round of progressive filling
    freezes every flow gets that round's share; both are what :func:`maxmin_reference` computes
    then (other small components run the reference's rounds edge-wise, :func:`maxmin_rounds`: the
    same floating-point operations). A flow whose finish is still further off than rounding could
    bridge skips the done test; only flows whose rate changes are settled and rescheduled. Routes
    take hops that are forced (a node with one edge out, or in) without a search. Per transfer few
    objects are left for the garbage collector to track (routes hold numbers and strings; flows by
    edge and by node need no container per flow). The completion heap holds distinct finish times
    as bare floats (a float heap pops ~4x faster than one of tuples), each with the flows due then
    in scheduling order; the completion timer is reused, not allocated per flow. A flow delivered
    when nothing else is due at that instant has its event's callbacks run by the completion timer's
    callback (``Network.inline_delivery``): its event would have been the very next one processed,
    with the same state, so only the trip through SimPy's queue is saved (a test runs every scenario
    with and without and compares the runs to the bit). Latency phases that end at the same instant,
    and the deliveries fired at one instant, share one entry in SimPy's queue
    (``Network.batch_events``; a FedAvg round's downloads start together): each still takes the
    event number its own entry would have had, and the shared entry runs them in that order,
    stepping aside whenever another queued event comes between two of them and staying queued while
    any is left (so ``env.peek()`` sees them due), so that every event runs in the order, at the
    instant and with the state it would have with an entry of its own (tests compare both ways to
    the bit, and check the order against urgent and same-instant events). The events are otherwise
    exactly those described above, so runs equal those of the plain implementation to the bit.

    Local updates (``Network.incremental``, on by default): a flow that becomes active or ends at a
    moment when no change is waiting does not trigger a recomputation when the answer is known
    locally. A joining flow whose shared edges are all below capacity takes the least of its own
    edges' capacities and its shared edges' leftovers, if that does not make it slower than a flow
    it meets on its bottleneck; an ending flow none of whose shared edges is anybody else's
    bottleneck just leaves. Both leave every other rate unchanged, which is the max-min allocation
    (it is unique), so only the joining flow's rate can differ from progressive filling, by
    rounding (``capacity - load`` instead of a sum of levels; loads are running sums per edge,
    reset to exactly 0 when an edge empties and summed afresh by every recomputation). The cost is
    O(edges of the flow) instead of O(component); the typical case is a device's upload
    bottlenecked by its own access link through an aggregation link that is not full. With
    ``incremental = False`` (class or instance attribute) every change recomputes; tests check both
    agree within 1e-9 on random runs and that, after every local update, the rates are the
    reference's and the running loads the sums of the rates.

Link failure policy
    * ``link_down(u, v)``: each *active* flow through ``u<->v`` is rerouted at once over the best
      remaining path, keeping its remaining bytes and without paying latency again (the TCP
      connection survives a routing change). If no path is left, the flow *stalls*: status
      ``'stalled'``, rate 0, radios off, remaining bytes kept.
    * ``link_up(u, v)``: every stalled flow that has a path again resumes at once, in the order the
      flows stalled (a flow that was cut off when it was requested pays its path latency first; one
      that already waited its latency does not). Active flows keep their current route even if the
      restored link would be better.
    * Flows in their latency phase pick their route when they become active (step 3), so a link
      that fails during the latency phase is simply avoided, or the flow stalls then.
    * A transfer between nodes that no path joins, even with every link up, raises
      :class:`~simkit.errors.TopologyError`; one that is only cut off by links that are down waits
      stalled until a path comes back.
    * ``abort_flows(node)`` (a device crashed): every unfinished flow from or to ``node`` is
      dropped; its event fails with :class:`TransferAborted` (already defused, so nobody has to
      watch it), and the remaining flows are re-shared.

Determinism (STYLE.md #6)
    Nothing depends on object ids, hashing or set order: flows are kept in insertion-ordered dicts,
    components are walked in a fixed order, same-instant events run in SimPy's insertion order,
    and route ties are broken by node order. The same inputs give the same records to the bit.

Limits of the model
    Bulk transfers only: a flow's rate jumps to its fair share at once (no TCP slow start or
    congestion window, no RTT bias between flows of different latency), there are no packets,
    queues, losses or retransmissions, and the latency is paid once per transfer, not per round
    trip. Short messages are dominated by the latency term, long ones by the shared bandwidth,
    which is the regime where the max-min flow model matches TCP well (Velho et al. 2013).
"""

from __future__ import annotations

import heapq
import math
import numbers
import sys
from collections.abc import Hashable, Mapping, Sequence
from itertools import count, pairwise
from typing import Any, NamedTuple

import networkx as nx
import numpy as np
import simpy
from simpy.events import NORMAL as _NORMAL

from simkit.errors import TopologyError

__all__ = ["Flow", "Network", "NetworkStats", "TransferAborted", "maxmin_fast", "maxmin_reference",
           "maxmin_rounds"]

_INF = math.inf
#: a flow with fewer than this fraction of its bytes left is complete
_REMAINING_EPS = 1e-9
#: a finish time within this relative distance of now is now
_TIME_EPS = 1e-12
#: an edge with less than this fraction of its capacity left (reference) or whose fair share is within
#: this relative distance of the current level (fast) is full
_FULL_EPS = 1e-12
#: the local join/leave update treats an edge with less than this fraction of its capacity left as full
_LOCAL_EPS = 1e-9


class TransferAborted(Exception):
    """A flow was aborted before delivery (an endpoint crashed or switched off).

    Attributes:
        flow: the aborted :class:`Flow` (status ``'dropped'``, ``remaining`` bytes not delivered).
    """

    def __init__(self, flow: Flow):
        # args must be (flow,): SimPy re-creates the exception from its args for each waiting process
        super().__init__(flow)
        self.flow = flow

    def __str__(self) -> str:
        f = self.flow
        return (f"flow {f.id} {f.src!r}->{f.dst!r} ({f.nbytes:g} B, tag {f.tag!r}) aborted at t={f.end!r} "
                f"with {f.remaining:g} B undelivered")


class Flow:
    """One transfer. Read-only for users; the :class:`Network` updates it.

    Attributes:
        id: unique, increasing in request order.
        src, dst: end nodes.
        nbytes: bytes requested; remaining: bytes not yet delivered (settled lazily: exact at the
            instants the flow's rate changes and at its end).
        path: the nodes of its current route (``()`` while it has none); links: its directed edges.
        rate: current rate in bits/s (0 unless active).
        start: request time; data_start: when it first became active (``None`` before; equal to
            ``end`` for a flow that never sent data); end: delivery or drop time, ``None`` before.
        tag: free label passed to the recorder.
        status: ``'latency'``, ``'active'``, ``'stalled'``, ``'delivered'`` or ``'dropped'``.
        event: succeeds with this flow when delivered, fails with :class:`TransferAborted`;
            ``None`` once it has fired (the network lets go of it then, so that a finished flow
            and its event -- whose value is the flow -- do not form a reference cycle that only
            the garbage collector could free: ~10 % of the host time of large fast-mode runs).
    """

    __slots__ = ("id", "src", "dst", "nbytes", "remaining", "path", "links", "rate", "start", "data_start",
                 "end", "tag", "status", "event",
                 # private bookkeeping of the Network
                 "_si", "_di", "_li", "_t", "_fin", "_hseq", "_paid", "_mtx", "_mrx", "_mark", "_rt", "_rep",
                 "_sp", "_sn", "_dp", "_dn", "_due")

    def __init__(self, id: int, src: Hashable, dst: Hashable, nbytes: float, start: float, tag: str,
                 event: simpy.Event):
        self.id = id
        self.src = src
        self.dst = dst
        self.nbytes = nbytes
        self.remaining = nbytes
        self.path: tuple = ()
        self.links: tuple = ()
        self.rate = 0.0
        self.start = start
        self.data_start: float | None = None
        self.end: float | None = None
        self.tag = tag
        self.status = "latency"
        self.event = event
        self._li: tuple[int, ...] = ()
        self._t = start          # time `remaining` was last settled
        self._fin = _INF         # finish time at the current rate
        self._hseq = -1          # seq of its valid entry in the network's finish-time heap (-1: none)
        self._paid = False       # latency already waited
        self._mtx = self._mrx = None
        self._mark = 0           # stamp of the last recomputation that visited it
        self._rt = None          # the route it was given, and the route epoch then
        self._rep = -1
        self._sp = self._sn = self._dp = self._dn = None   # neighbours in its end nodes' lists
        self._due = -_INF        # before this time it cannot be done (see Network._assign)

    def __repr__(self) -> str:
        return (f"Flow(id={self.id}, {self.src!r}->{self.dst!r}, nbytes={self.nbytes:g}, status={self.status!r}, "
                f"rate={self.rate:g}, remaining={self.remaining:g})")


def _fire(f: Flow, exc: BaseException | None = None) -> None:
    """Trigger ``f``'s event (delivered: with the flow; else failed with ``exc``, defused) and let
    go of it: the event's value refers to the flow, so keeping it would make a reference cycle
    that only the garbage collector could free (see :attr:`Flow.event`)."""
    ev, f.event = f.event, None
    if exc is None:
        ev.succeed(f)
    else:
        ev.defused = True
        ev.fail(exc)


def _trigger(f: Flow) -> simpy.Event:
    """Trigger delivered ``f``'s event with the flow, as ``succeed`` does, but without queueing it;
    let go of it (see :func:`_fire`). Returns the event."""
    ev, f.event = f.event, None
    ev._ok = True
    ev._value = f
    return ev


def _process_event(ev: simpy.Event) -> None:
    """Run a triggered event's callbacks, as ``Environment.step`` does when it pops the event."""
    cbs, ev.callbacks = ev.callbacks, None
    for cb in cbs:
        cb(ev)


def _before(entry: tuple, at: float, eid: int) -> bool:
    """Does the queue entry ``(time, priority, eid, event)`` come before a normal-priority one
    numbered ``eid`` at ``at`` (no earlier than now) in SimPy's order?"""
    return entry[0] == at and (entry[1] < _NORMAL or (entry[1] == _NORMAL and entry[2] < eid))


class NetworkStats(NamedTuple):
    """A snapshot of the network's counters (:attr:`Network.stats`).

    Attributes:
        link_bytes: bytes carried so far per directed edge ``(u, v)`` (settled up to now).
        max_utilisation: running maximum over every rate assignment of (sum of the rates on an edge)
            / (its capacity); max-min fairness keeps it <= 1 up to rounding.
        recomputations: how many times rates were recomputed.
        delivered, dropped: flows ended each way; bytes_delivered: their requested bytes, delivered.
        events_shared: latency ends and deliveries processed through a queue entry shared with
            earlier ones of the same instant (:attr:`Network.batch_events`): each is one SimPy event
            fewer than an entry of its own (SimPy's event numbers, ``env._eid``, still count it).
    """

    link_bytes: dict
    max_utilisation: float
    recomputations: int
    delivered: int
    dropped: int
    bytes_delivered: float
    events_shared: int = 0


# -- max-min fair allocation -------------------------------------------------------------------------

def maxmin_reference(flow_links: Sequence[Sequence[Hashable]], capacity: Mapping[Hashable, float]) -> list[float]:
    """Max-min fair rates by progressive filling, written for clarity (the reference).

    All flows start at rate 0 and grow together. Each round the increment is the smallest fair
    share ``left[l] / users[l]`` over the edges still used by growing flows; every growing flow
    gains it; then every edge that is now full freezes the flows through it. Flows bottlenecked
    elsewhere keep growing into the capacity the frozen ones leave.

    Args:
        flow_links: for each flow, the edges it crosses (any hashable keys; an edge listed twice
            is crossed twice). A flow with no edges is unconstrained and gets ``inf``.
        capacity: capacity of every edge used (same unit as the result).

    Returns:
        The rate of each flow, in ``flow_links`` order.
    """
    rate = [0.0] * len(flow_links)
    growing = []
    left: dict[Hashable, float] = {}
    for i, links in enumerate(flow_links):
        if not links:
            rate[i] = _INF
            continue
        growing.append(i)
        for link in links:
            left.setdefault(link, float(capacity[link]))
    while growing:
        users: dict[Hashable, int] = {}
        for i in growing:
            for link in flow_links[i]:
                users[link] = users.get(link, 0) + 1
        inc = min(left[link] / k for link, k in users.items())
        for i in growing:
            rate[i] += inc
        for link, k in users.items():
            left[link] -= inc * k
        full = {link for link in users if left[link] <= _FULL_EPS * capacity[link]}
        growing = [i for i in growing if not any(link in full for link in flow_links[i])]
    return rate


def _waterfill(pf: np.ndarray, pl: np.ndarray, cap: np.ndarray, n_flows: int) -> np.ndarray:
    """Max-min rates over an incidence given as pairs (flow ``pf[k]`` crosses edge ``pl[k]``).

    Level form of progressive filling: the next level is the smallest fair share
    ``left / users`` over the edges; every unfrozen flow through an edge whose share is at that
    level is frozen at it, its rate leaves the capacity of all its edges, and the pairs of frozen
    flows are dropped. One round per distinct rate level, each O(pairs), all vectorised.
    """
    n_links = cap.shape[0]
    rate = np.full(n_flows, _INF)
    users = np.bincount(pl, minlength=n_links).astype(np.float64)
    left = cap.astype(np.float64, copy=True)
    level = 0.0
    while pf.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(users > 0, left / users, _INF)
        s = float(share.min())
        if s < level:   # rounding only: levels never fall
            s = level
        level = s
        full = share <= s * (1.0 + _FULL_EPS)
        frozen = np.zeros(n_flows, dtype=bool)
        frozen[pf[full[pl]]] = True
        rate[frozen] = s
        gone = frozen[pf]
        k = np.bincount(pl[gone], minlength=n_links)
        users -= k
        left -= s * k
        keep = ~gone
        pf = pf[keep]
        pl = pl[keep]
    return rate


def maxmin_fast(flow_links: Sequence[Sequence[Hashable]], capacity: Mapping[Hashable, float]) -> list[float]:
    """The same allocation as :func:`maxmin_reference`, vectorised with numpy (same arguments)."""
    local: dict[Hashable, int] = {}
    pf: list[int] = []
    pl: list[int] = []
    for i, links in enumerate(flow_links):
        for link in links:
            j = local.get(link)
            if j is None:
                j = local[link] = len(local)
            pf.append(i)
            pl.append(j)
    cap = np.array([float(capacity[link]) for link in local], dtype=np.float64)
    return _waterfill(np.array(pf, dtype=np.intp), np.array(pl, dtype=np.intp), cap, len(flow_links)).tolist()


def _fill(fl: Sequence[Sequence[int]], cap: Sequence[float], left: list, users: list,
          act: list[int]) -> list[float]:
    """Progressive filling with exactly the floating-point operations of :func:`maxmin_reference`.

    ``fl[i]`` lists the (integer) edges of flow ``i``; ``act`` the distinct edges they use, and
    ``users[l]`` how many of those flows cross ``l`` (each time they list it). ``left`` is scratch
    space indexed like ``cap``. On return ``users[l]`` is 0 again for every ``l`` in ``act``.

    Same rounds as the reference, computed per edge instead of per (flow, edge) pair: every flow
    still growing has received the same increments in the same order, so its rate is one running
    sum ``acc`` (the reference adds ``inc`` to each flow separately, from 0.0, in the same order:
    the same float); each edge's ``left`` undergoes the same subtractions ``left - inc * k``; the
    users of the next round are this round's minus the flows just frozen. The result is identical
    to the bit, at O(edges) per round plus O(pairs) in all.
    """
    for l in act:
        left[l] = float(cap[l])
    n = len(fl)
    rate = [0.0] * n
    growing: Sequence[int] = range(n)
    acc = 0.0
    neg = -_INF   # marks an edge found full this round (no growing flow crosses it afterwards)
    while True:
        inc = _INF
        for l in act:
            s = left[l] / users[l]
            if s < inc:
                inc = s
        acc += inc
        nxt = []
        for l in act:
            x = left[l] - inc * users[l]
            if x <= _FULL_EPS * cap[l]:
                left[l] = neg
            else:
                left[l] = x
                nxt.append(l)
        still = []
        for i in growing:
            links = fl[i]
            for l in links:
                if left[l] == neg:
                    break
            else:
                still.append(i)
                continue
            rate[i] = acc
            for l in links:
                users[l] -= 1
        if not still:
            return rate
        growing = still
        act = [l for l in nxt if users[l]]


def maxmin_rounds(flow_links: Sequence[Sequence[Hashable]], capacity: Mapping[Hashable, float]) -> list[float]:
    """:func:`maxmin_reference` computed edge-wise: the same arguments and the same result to the bit.

    It runs the reference's rounds with the same floating-point operations (see :func:`_fill`,
    which the network runs for small components whose first round does not settle every flow).
    """
    local: dict[Hashable, int] = {}
    fl: list[list[int]] = []
    users: list[int] = []
    unconstrained = []
    for i, links in enumerate(flow_links):
        if not links:
            unconstrained.append(i)
            continue
        li = []
        for link in links:
            j = local.get(link)
            if j is None:
                j = local[link] = len(local)
                users.append(0)
            users[j] += 1
            li.append(j)
        fl.append(li)
    cap = [capacity[link] for link in local]
    rates = _fill(fl, cap, [0.0] * len(cap), users, list(range(len(cap)))) if fl else []
    for i in unconstrained:
        rates.insert(i, _INF)
    return rates


# -- routing -------------------------------------------------------------------------------------------

class _Tree:
    """A lazily grown shortest-path tree (from a source, or towards a destination)."""

    __slots__ = ("heap", "best", "done", "forward")

    def __init__(self, root: int, forward: bool):
        key = (0, 0, (root,))
        self.heap = [key]
        self.best = {root: key}
        self.done: dict[int, tuple] = {}
        self.forward = forward


_MISS = object()
_MAX_TREES = 64


def _positive_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# -- the network ----------------------------------------------------------------------------------------

class _LatencyTimer(simpy.events.Timeout):
    """The timeout of a flow's latency phase; it carries the flow (no closure per transfer)."""

    __slots__ = ("flow",)

    def __init__(self, env: simpy.Environment, delay: float, flow: Flow, callbacks: list):
        # what Timeout.__init__ does (the same scheduling), plus the flow; ``callbacks`` is the
        # network's one list for all of them (SimPy only reads it: it detaches it before the calls)
        self.env = env
        self.callbacks = callbacks
        self._value = None
        self._delay = delay
        self._ok = True
        self.flow = flow
        env.schedule(self, _NORMAL, delay)


class _Batch(simpy.events.Event):
    """One queued SimPy entry standing for several that fall due at the same instant ``at``
    (:attr:`Network.batch_events`): ``items`` is ``[eid, item, eid, item, ...]`` in eid order, each
    ``eid`` the number SimPy gave (reserved for) that item's own entry; the batch is queued under
    the eid of the next item to process, ``items[next]``, and steps aside (queues again under the
    following item's eid) whenever another queued event comes between two items."""

    def __init__(self, env: simpy.Environment, at: float, items: list, callbacks: list):
        self.env = env
        self.callbacks = callbacks
        self._ok = True
        self._value = None
        self.cbs = callbacks   # (SimPy sets .callbacks to None as it pops an entry)
        self.at = at
        self.items = items
        self.next = 0          # the next item to process
        self.queued = True     # an entry of it is in SimPy's queue (its maker queues the first)
        self.pops = 0          # entries of it SimPy has popped


class _Timer(simpy.events.Event):
    """The completion timer, reused: once one has fired (its callbacks ran) the network schedules
    it again instead of allocating a new timeout. Scheduled exactly as ``env.timeout`` would be."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self._ok = True
        self._value = None


class _Wakeup(simpy.events.Event):
    """The one event that runs the queued recomputation; reused (at most one is queued at a time)."""

    def __init__(self, env: simpy.Environment):
        super().__init__(env)
        self._ok = True
        self._value = None


_MAX_FLOAT = sys.float_info.max


class Network:
    """Flows over a directed topology, max-min fair, with link failures (see the module docstring).

    Args:
        env: the run's environment; ``env.now`` is the only clock.
        graph: a :class:`networkx.DiGraph` whose edges carry ``bandwidth_bps`` and ``latency_s``.
        recorder: optional; gets ``transfer(...)`` for every ended flow and ``state(...)`` for
            link changes.
        meters: optional energy meters by node; a flow keeps ``tx`` on at its source's meter and
            ``rx`` on at its destination's while it is active.

    Raises:
        TopologyError: the graph is not directed, or an edge lacks a valid ``bandwidth_bps`` or
            ``latency_s`` (the message names the edge and the field).
    """

    #: components with at least this many flows use the numpy allocation, smaller ones the reference
    _NUMPY_MIN_FLOWS = 24
    #: a flow that joins or ends may skip the recomputation (:meth:`_join_local`, :meth:`_leave_local`);
    #: False: every change recomputes its component (the plain statement)
    incremental = True
    #: the local update gives up when it would have to scan an edge with more flows than this (only
    #: a full edge, or the joining flow's shared bottleneck, is scanned; the loads are kept running)
    _LOCAL_MAX = 64
    #: a delivered flow whose event would be the very next one processed has its callbacks run by
    #: the completion timer's callback instead of a trip through the event queue (same order, same
    #: state: see :meth:`_on_timer`); False: every delivery is scheduled
    inline_delivery = True
    #: latency phases that end at the same instant share one entry in SimPy's queue, and so do the
    #: delivered flows' events fired at one instant; the entry processes them in the order (and under
    #: the event numbers) their own entries would have had (:meth:`_begin_latency`, :meth:`_deliver`).
    #: False: a timeout per latency phase and a queued event per delivery (the plain statement)
    batch_events = True

    def __init__(self, env: simpy.Environment, graph: nx.DiGraph, *, recorder: Any = None,
                 meters: Mapping[Hashable, Any] | None = None):
        if not isinstance(graph, nx.DiGraph) or graph.is_multigraph():
            raise TopologyError("the network graph must be a networkx.DiGraph (one edge per direction), "
                                f"got {type(graph).__name__}")
        self.env = env
        self.graph = graph
        self.recorder = recorder
        self.meters: Mapping[Hashable, Any] = meters if meters is not None else {}

        self._nodes: list = list(graph.nodes)
        self._nidx: dict = {n: i for i, n in enumerate(self._nodes)}
        edges = list(graph.edges(data=True))
        self._edges: list[tuple] = []
        self._cap: list[float] = []
        self._lat: list[float] = []
        ratios = []
        for u, v, data in edges:
            bw = data.get("bandwidth_bps")
            if not _positive_real(bw):
                raise TopologyError(f"edge {u!r}->{v!r} needs a finite bandwidth_bps > 0 (bits/s), got {bw!r}",
                                    field=f"edges[{u!r}->{v!r}].bandwidth_bps")
            lat = data.get("latency_s")
            if not (isinstance(lat, numbers.Real) and not isinstance(lat, bool) and math.isfinite(lat)
                    and lat >= 0):
                raise TopologyError(f"edge {u!r}->{v!r} needs a finite latency_s >= 0 (seconds), got {lat!r}",
                                    field=f"edges[{u!r}->{v!r}].latency_s")
            self._edges.append((u, v))
            self._cap.append(float(bw))
            self._lat.append(float(lat))
            ratios.append(float(lat).as_integer_ratio())
        # exact latency sums: every latency is num / 2**k; scale all by 2**kmax to integers
        kmax = max((den.bit_length() - 1 for _, den in ratios), default=0)
        self._lat_den = 1 << kmax
        lat_int = [num << (kmax - (den.bit_length() - 1)) for num, den in ratios]
        self._lidx: dict[tuple, int] = {e: i for i, e in enumerate(self._edges)}
        self._eidx: dict[tuple[int, int], int] = {}
        n = len(self._nodes)
        self._succ: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
        self._pred: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
        for li, (u, v) in enumerate(self._edges):
            ui, vi = self._nidx[u], self._nidx[v]
            self._eidx[(ui, vi)] = li
            self._succ[ui].append((vi, lat_int[li], li))
            self._pred[vi].append((ui, lat_int[li], li))
        # a node's only edge out (in), where it has exactly one: every path leaves (enters) by it
        self._out1 = [a[0] if len(a) == 1 else None for a in self._succ]
        self._in1 = [a[0] if len(a) == 1 else None for a in self._pred]
        # tuples, not lists: read-only from here on, and not tracked by the garbage collector
        self._succ = [tuple(a) for a in self._succ]
        self._pred = [tuple(a) for a in self._pred]
        n_edges = len(self._edges)
        self._down: list[bool] = [False] * n_edges
        self._n_down = 0

        # routing caches
        self._pairs: dict[int, tuple | None] = {}    # routes (_route_idx) by src * n_nodes + dst
        self._fwd: dict[int, _Tree] = {}
        self._rev: dict[int, _Tree] = {}
        self._dst_uses: dict[int, int] = {}
        self._epoch = 0                               # bumped whenever the route cache is dropped
        self._solo: dict[tuple, tuple] = {}           # solo_times' look-ups by (src, dst); with the routes

        # flow state
        self._ids = count()
        self._open: dict[int, Flow] = {}                        # unfinished flows by id
        # unfinished flows by end node: a doubly linked list through the flows (_sp/_sn where the
        # node is the source, _dp/_dn where it is the destination), head by node index
        self._node_head: list[Flow | None] = [None] * n
        # active flows per edge, in joining order: None (none), the Flow (one), or a dict (several)
        self._link_flows: list[Any] = [None] * n_edges
        self._stalled: dict[Flow, None] = {}
        self._dirty: dict[int, None] = {}                     # edges whose sharing changed
        self._pending = False                                 # a recomputation is queued for now
        self._wakeup = _Wakeup(env)                           # the event that runs it (reused)
        self._wakeup_cbs = [self._recompute]
        # finish times: a heap of distinct floats (floats compare several times faster than
        # tuples), and for each the flows due then, in the order they were scheduled, as a flat
        # list [seq, flow, seq, flow, ...]; an entry is valid while its flow's _hseq is its seq
        self._heap: list[float] = []
        self._due: dict[float, list] = {}
        self._seq = count()
        self._timer: simpy.Event | None = None                # the one pending completion timer that counts
        self._timer_at: float | None = None
        self._timer_cbs = [self._on_timer]
        self._spare: _Timer | None = None                     # a timer that has fired, to schedule again
        self._latency_cbs = [self._latency_done]   # every latency timer's callbacks (read-only)
        # latency ends of the flows requested at the instant _lat_now (batch_events): the first's
        # instant, then by instant: None while only the first to end then has its own timeout, then
        # the batch of the next ones (its items None once done)
        self._lat_now: float | None = None
        self._lat_first = 0.0
        self._lat_recent: dict[float, _Batch | None] | None = None
        self._lat_batch_cbs = [self._latency_batch_done]
        self._dbatch: _Batch | None = None          # the deliveries of this instant not processed yet
        self._dfirst: float | None = None           # the instant of the last delivery with its own entry
        self._dbatch_cbs = [self._delivery_batch_done]
        self._shared = 0   # latency ends and deliveries processed without an entry of their own
        self._n_active = 0
        self._heap_changed = False   # since the last _arm_timer: a flow rated, closed or off its edges
        # scratch space of the recomputation, indexed by edge (see _recompute and _fill)
        self._stamp = 0
        self._lmark = [0] * n_edges
        self._users = [0] * n_edges
        self._left = [0.0] * n_edges
        self._load = [0.0] * n_edges
        self._lload = [0.0] * n_edges   # running sum of the active flows' rates per edge (local updates)

        # counters
        self._link_bytes: list[float] = [0.0] * n_edges
        self._max_util = 0.0
        self._recomputations = 0
        self._delivered = 0
        self._dropped = 0
        self._bytes_delivered = 0.0

    # -- public API -------------------------------------------------------------------------------
    def transfer(self, src: Hashable, dst: Hashable, nbytes: float, *, tag: str = "") -> simpy.Event:
        """Send ``nbytes`` from ``src`` to ``dst``; the event succeeds (value: the :class:`Flow`) on delivery.

        Raises:
            ValueError: ``nbytes`` is negative or not finite.
            TopologyError: an unknown node, or no path joins ``src`` to ``dst`` even with every link up.
        """
        t = type(nbytes)
        if (not ((t is float or t is int) and 0 <= nbytes <= _MAX_FLOAT)   # the common case, checked fast
                and not (isinstance(nbytes, numbers.Real) and math.isfinite(nbytes) and nbytes >= 0)):
            raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
        nidx = self._nidx
        si = nidx.get(src)
        if si is None:
            self._node_index(src)
        di = nidx.get(dst)
        if di is None:
            self._node_index(dst)
        env = self.env
        now = env._now
        ev = simpy.Event(env)
        f = Flow(next(self._ids), src, dst, float(nbytes), now, tag, ev)
        f._si = si
        f._di = di
        if si == di:  # nothing crosses a link
            f.path = (src,)
            f.data_start = f.end = now
            f.remaining = 0.0
            f.status = "delivered"
            self._delivered += 1
            self._bytes_delivered += f.nbytes
            self._record(f)
            self._deliver(f)
            return ev
        key = si * len(self._nodes) + di
        route = self._pairs.get(key, _MISS)
        if route is _MISS:   # (_route_idx, inlined)
            route = self._pairs[key] = self._compute_route(si, di)
        if route is None and not self._reachable(src, dst):
            raise TopologyError(f"no path from {src!r} to {dst!r} in the topology")
        meters = self.meters
        if meters:
            f._mtx = meters.get(src)
            f._mrx = meters.get(dst)
        self._open[f.id] = f
        heads = self._node_head
        h = heads[si]   # push f at the head of both end nodes' lists
        if h is not None:
            if h._si == si:
                h._sp = f
            else:
                h._dp = f
            f._sn = h
        heads[si] = f
        h = heads[di]
        if h is not None:
            if h._si == di:
                h._sp = f
            else:
                h._dp = f
            f._dn = h
        heads[di] = f
        if route is None:   # only links that are down separate the ends: wait for one to come back
            f.status = "stalled"
            self._stalled[f] = None
        else:
            self._begin_latency(f, route)
        return ev

    def route(self, src: Hashable, dst: Hashable) -> tuple:
        """The nodes of the current route ``src -> ... -> dst`` over the links that are up.

        Raises:
            TopologyError: unknown node, or no path (the message says if links that are down cut it).
        """
        r = self._route_idx(self._node_index(src), self._node_index(dst))
        if r is None:
            if self._reachable(src, dst):
                raise TopologyError(f"no path from {src!r} to {dst!r} while {self._n_down} link "
                                    "direction(s) are down")
            raise TopologyError(f"no path from {src!r} to {dst!r} in the topology")
        return r[0]

    def path_latency(self, src: Hashable, dst: Hashable) -> float:
        """Sum of ``latency_s`` along :meth:`route` (exactly rounded), in seconds."""
        self.route(src, dst)
        return self._route_idx(self._nidx[src], self._nidx[dst])[3]

    def link_down(self, u: Hashable, v: Hashable) -> None:
        """Take the link ``u<->v`` (both directions that exist) down now; reroute or stall its flows."""
        lis = self._link_pair(u, v)
        changed = [li for li in lis if not self._down[li]]
        if not changed:
            return
        for li in changed:
            self._down[li] = True
        self._n_down += len(changed)
        self._invalidate_routes()
        if self.recorder is not None:
            self.recorder.state(f"{u}<->{v}", self.env.now, "link_down", "")
        affected: dict[Flow, None] = {}
        for li in changed:
            on = self._link_flows[li]
            if on is not None:
                affected.update({on: None} if on.__class__ is Flow else on)
        for f in affected:
            self._leave_links(f)
            route = self._route_idx(f._si, f._di)
            if route is None:
                self._stall(f)
            else:
                self._join_links(f, route)
        self._request_recompute()

    def link_up(self, u: Hashable, v: Hashable) -> None:
        """Bring the link ``u<->v`` back up now; stalled flows get a route and resume."""
        lis = self._link_pair(u, v)
        changed = [li for li in lis if self._down[li]]
        if not changed:
            return
        for li in changed:
            self._down[li] = False
        self._n_down -= len(changed)
        self._invalidate_routes()
        if self.recorder is not None:
            self.recorder.state(f"{u}<->{v}", self.env.now, "link_up", "")
        for f in list(self._stalled):
            route = self._route_idx(f._si, f._di)
            if route is None:
                continue
            del self._stalled[f]
            if f._paid:
                self._activate_on(f, route)
            else:
                self._begin_latency(f, route)

    def schedule_link_failure(self, u: Hashable, v: Hashable, down_at: float, up_at: float | None = None):
        """Start a process that takes ``u<->v`` down at ``down_at`` and (optionally) up at ``up_at``.

        Times are absolute simulated seconds. Returns the :class:`simpy.Process`.
        """
        self._link_pair(u, v)
        if not (math.isfinite(down_at) and down_at >= self.env.now):
            raise ValueError(f"down_at must be a finite time >= now ({self.env.now}), got {down_at!r}")
        if up_at is not None and not (math.isfinite(up_at) and up_at >= down_at):
            raise ValueError(f"up_at must be a finite time >= down_at ({down_at}), got {up_at!r}")
        return self.env.process(self._link_failure(u, v, down_at, up_at))

    def _link_failure(self, u, v, down_at, up_at):
        env = self.env
        yield env.timeout(down_at - env.now)
        self.link_down(u, v)
        if up_at is not None:
            yield env.timeout(up_at - env.now)
            self.link_up(u, v)

    def set_capacity(self, u: Hashable, v: Hashable, bps: float) -> None:
        """Set the capacity of the directed edge ``u -> v`` to ``bps`` (> 0) from now on."""
        li = self._lidx.get((u, v))
        if li is None:
            raise TopologyError(f"no edge {u!r}->{v!r} in the topology")
        if not _positive_real(bps):
            raise ValueError(f"capacity of {u!r}->{v!r} must be a finite bandwidth_bps > 0, got {bps!r}")
        self._cap[li] = float(bps)
        self._solo.clear()
        self._dirty[li] = None
        self._request_recompute()

    def abort_flows(self, node: Hashable) -> list[Flow]:
        """Drop every unfinished flow from or to ``node`` now (it crashed); returns them in request order.

        Each dropped flow is recorded with status ``'dropped'`` and its event fails with
        :class:`TransferAborted` (defused: an unwatched failure does not stop the run).
        """
        i = self._nidx.get(node)
        mine = []
        f = self._node_head[i] if i is not None else None
        while f is not None:
            mine.append(f)
            f = f._sn if f._si == i else f._dn
        flows = sorted(mine, key=lambda f: f.id)
        for f in flows:
            self._close(f, "dropped")
            _fire(f, TransferAborted(f))
        if flows:
            self._request_recompute()
        return flows

    @property
    def active_flows(self) -> list[Flow]:
        """The flows sharing capacity now (status ``'active'``), in request order."""
        return [f for f in self._open.values() if f.status == "active"]

    @property
    def open_flows(self) -> list[Flow]:
        """Every unfinished flow (latency phase, active or stalled), in request order."""
        return list(self._open.values())

    @property
    def stats(self) -> NetworkStats:
        """Counters up to now (settles every active flow's bytes first)."""
        now = self.env.now
        for f in self._open.values():
            if f.status == "active":
                self._settle(f, now)
        return NetworkStats(
            link_bytes={e: b for e, b in zip(self._edges, self._link_bytes)},
            max_utilisation=self._max_util,
            recomputations=self._recomputations,
            delivered=self._delivered,
            dropped=self._dropped,
            bytes_delivered=self._bytes_delivered,
            events_shared=self.events_shared,
        )

    @property
    def events_shared(self) -> int:
        """:attr:`NetworkStats.events_shared` so far, without settling anything (cheap)."""
        return self._shared

    def capacity(self, u: Hashable, v: Hashable) -> float:
        """Current capacity (bits/s) of the directed edge ``u -> v``."""
        li = self._lidx.get((u, v))
        if li is None:
            raise TopologyError(f"no edge {u!r}->{v!r} in the topology")
        return self._cap[li]

    # -- routing ----------------------------------------------------------------------------------
    def _node_index(self, node: Hashable) -> int:
        i = self._nidx.get(node)
        if i is None:
            raise TopologyError(f"unknown node {node!r}: not in the topology")
        return i

    def _reachable(self, src: Hashable, dst: Hashable) -> bool:
        return nx.has_path(self.graph, src, dst)

    def _link_pair(self, u: Hashable, v: Hashable) -> list[int]:
        lis = [li for li in (self._lidx.get((u, v)), self._lidx.get((v, u))) if li is not None]
        if not lis:
            raise TopologyError(f"no link {u!r}<->{v!r} in the topology")
        return lis

    def _invalidate_routes(self) -> None:
        self._pairs.clear()
        self._solo.clear()
        self._fwd.clear()
        self._rev.clear()
        self._epoch += 1

    def _route_idx(self, s: int, t: int) -> tuple | None:
        """The route from node index s to t: ``(nodes, links, edge indices, latency, latency as integer)``."""
        key = s * len(self._nodes) + t
        r = self._pairs.get(key, _MISS)
        if r is _MISS:
            r = self._pairs[key] = self._compute_route(s, t)
        return r

    def _compute_route(self, s: int, t: int) -> tuple | None:
        # Hops that are forced come first: while the path's current first node has only one edge
        # out (a device's access link), every path takes it; likewise into its last node. The best
        # path is the forced hops followed (preceded) by the best path from the node they lead to
        # (that one never revisits a forced node: it would contain a cycle), with the same key
        # order, since all candidates share the forced hops (same latency added, same hops, same
        # node prefix or suffix). That rest is cached and shared: gateway -> server by its devices.
        down = self._down
        out1 = self._out1
        o = out1[s]
        if o is not None and o[0] != t and out1[o[0]] is None and o[0] != s:
            # the common case, a device's access link to a gateway with several ways on: one forced
            # hop, then the gateway's (cached) route; the same tuple as the general loop below builds
            v, llat, li = o
            if down[li]:
                return None
            rest = self._route_idx(v, t)
            if rest is None:
                return None
            lat = llat + rest[4]
            return ((self._nodes[s],) + rest[0], (self._edges[li],) + rest[1], (li,) + rest[2],
                    lat / self._lat_den, lat)
        if o is not None:
            pre, pl, lat = [s], [], 0
            u = s
            while u != t and out1[u] is not None:
                v, llat, li = out1[u]
                if down[li] or v in pre:   # the only way on is down, or leads round in a circle
                    return None
                pre.append(v)
                pl.append(li)
                lat += llat
                u = v
            rest = self._route_idx(u, t) if u != t else ((self._nodes[t],), (), (), 0.0, 0)
            if rest is None:
                return None
            nodes = tuple(map(self._nodes.__getitem__, pre[:-1])) + rest[0]
            lidx = tuple(pl)
            return (nodes, tuple(map(self._edges.__getitem__, lidx)) + rest[1], lidx + rest[2],
                    (lat + rest[4]) / self._lat_den, lat + rest[4])
        in1 = self._in1
        if in1[t] is not None:
            suf, sl, lat = [t], [], 0
            w = t
            while w != s and in1[w] is not None:
                v, llat, li = in1[w]
                if down[li] or v in suf:
                    return None
                suf.append(v)
                sl.append(li)
                lat += llat
                w = v
            rest = self._route_idx(s, w) if w != s else ((self._nodes[s],), (), (), 0.0, 0)
            if rest is None:
                return None
            nodes = rest[0] + tuple(map(self._nodes.__getitem__, suf[-2::-1]))
            lidx = tuple(sl[::-1])
            return (nodes, rest[1] + tuple(map(self._edges.__getitem__, lidx)), rest[2] + lidx,
                    (lat + rest[4]) / self._lat_den, lat + rest[4])
        # Grow a shortest-path tree lazily and keep it: from s if we already have one, else towards
        # t if t was asked for before (many-to-one uploads), else from s (one-to-many downloads).
        # Both directions find the same path: the key (exact latency, hops, node sequence) is total
        # and only grows when a path is extended at either end.
        tree = self._fwd.get(s)
        if tree is None:
            tree = self._rev.get(t)
            if tree is None:
                uses = self._dst_uses[t] = self._dst_uses.get(t, 0) + 1
                if uses > 1:
                    tree = self._new_tree(self._rev, t, forward=False)
                else:
                    tree = self._new_tree(self._fwd, s, forward=True)
        key = self._grow(tree, t if tree.forward else s)
        if key is None:
            return None
        lat_int, _, seq = key
        nodes = tuple(map(self._nodes.__getitem__, seq))
        lidx = tuple(map(self._eidx.__getitem__, pairwise(seq)))
        links = tuple(map(self._edges.__getitem__, lidx))
        # a plain tuple of plain values: the garbage collector stops tracking it
        return (nodes, links, lidx, lat_int / self._lat_den, lat_int)   # int / int: correctly rounded

    @staticmethod
    def _new_tree(trees: dict[int, _Tree], root: int, forward: bool) -> _Tree:
        if len(trees) >= _MAX_TREES:
            del trees[next(iter(trees))]
        tree = trees[root] = _Tree(root, forward)
        return tree

    def _grow(self, tree: _Tree, target: int) -> tuple | None:
        """Dijkstra on keys (latency, hops, node sequence), resumed until ``target`` is settled."""
        done = tree.done
        key = done.get(target)
        if key is not None:
            return key
        heap, best, forward = tree.heap, tree.best, tree.forward
        adj = self._succ if forward else self._pred
        down = self._down
        while heap:
            key = heapq.heappop(heap)
            lat, hops, seq = key
            node = seq[-1] if forward else seq[0]
            if node in done:
                continue
            done[node] = key
            for nb, llat, li in adj[node]:
                if down[li] or nb in done:
                    continue
                nk = (lat + llat, hops + 1, seq + (nb,) if forward else (nb,) + seq)
                old = best.get(nb)
                if old is None or nk < old:
                    best[nb] = nk
                    heapq.heappush(heap, nk)
            if node == target:
                return key
        return None

    # -- solo transfers (simkit.world.chain) --------------------------------------------------------
    def solo_times(self, src: Hashable, dst: Hashable, nbytes: float, start: float) -> tuple | None:
        """If a transfer requested at ``start`` (now, or later with nothing happening meanwhile)
        would be alone on the network: ``(route, data_start, end, sender's meter, receiver's
        meter)``, the instants :meth:`transfer` would give it, to the bit. ``None`` where
        that cannot be told without running it: other flows open or a recomputation queued, a
        completion timer pending, ``incremental`` off, no route now, an end node's meter near
        empty (its battery check moves with the radio), ``nbytes`` not a positive number, or
        ``src == dst``. The route and its least capacity are cached by end nodes, dropped with the
        routes and whenever a capacity changes.

        Alone, the flow waits the route's latency ``L`` and then sends at the least capacity on its
        route ``b`` (:meth:`_join_local`, every edge its own): ``data_start = start + L``, finish
        ``fin = data_start + nbytes * 8 / b``, delivered when the completion timer armed at
        ``data_start`` fires, ``data_start + (fin - data_start)`` (:meth:`_arm_timer`).
        """
        if self._open or self._timer is not None or self._pending or self._dirty or not self.incremental:
            return None
        t = type(nbytes)
        if not ((t is float or t is int) and 0 < nbytes <= _MAX_FLOAT):
            return None
        pair = self._solo.get((src, dst))
        if pair is None:   # route, its latency and least capacity, the end nodes' meters
            si = self._nidx.get(src)
            di = self._nidx.get(dst)
            if si is None or di is None or si == di:
                return None
            route = self._route_idx(si, di)
            if route is None:
                return None
            meters = self.meters
            pair = self._solo[(src, dst)] = (route, route[3], min(map(self._cap.__getitem__, route[2])),
                                             meters.get(src), meters.get(dst))
        route, latency, b, mtx, mrx = pair
        if (mtx is not None and mtx._near) or (mrx is not None and mrx._near):
            return None
        ds = start + latency if latency > 0 else start
        fin = ds + float(nbytes) * 8.0 / b
        return route, ds, (ds + (fin - ds) if fin > ds else ds), mtx, mrx

    def replay_solo(self, src: Hashable, dst: Hashable, nbytes: float, tag: str, start: float,
                    times: tuple) -> None:
        """Account a transfer that :meth:`solo_times` timed (``times``) as delivered: the flow id,
        link bytes, counters, the end nodes' radio states at ``data_start`` and ``end``, and the
        record -- what :meth:`transfer` and its events do, without the events. Only for
        :class:`~simkit.world.chain.Chain`, which checked that nothing else happens until the end;
        it sets the clock."""
        route, ds, end, mtx, mrx = times
        nbytes = float(nbytes)
        fid = next(self._ids)
        lb = self._link_bytes
        for li in route[2]:
            lb[li] += nbytes
        if self._max_util < 1.0:   # the flow fills its bottleneck (_join_local: util 1)
            self._max_util = 1.0
        self._delivered += 1
        self._bytes_delivered += nbytes
        self._heap_changed = False   # (as _arm_timer leaves it after the completion)
        env = self.env
        env._now = ds
        if mtx is not None:
            mtx.tx_begin()
        if mrx is not None:
            mrx.rx_begin()
        env._now = end
        if mtx is not None:
            mtx.tx_end()
        if mrx is not None:
            mrx.rx_end()
        if self.recorder is not None:
            self.recorder.transfer(fid, src, dst, nbytes, start, ds, end, tag, "delivered")

    # -- flow life cycle --------------------------------------------------------------------------
    def _begin_latency(self, f: Flow, route: tuple) -> None:
        f.status = "latency"
        f.path, f.links, f._li, latency, _ = route
        f._rt = route
        f._rep = self._epoch
        if latency > 0:
            env = self.env
            if self.batch_events:
                # What env.timeout(latency) would do, without an event per flow: of the flows
                # requested at one instant whose latencies end at the same instant `at`, the first
                # gets a timeout of its own; the next ones take the eids their timeouts would have
                # had and share one queued entry, which processes them in eid order and steps aside
                # whenever another queued event comes between two of them (_run_batch). Same order,
                # same instants, same eids as a timeout per flow; a burst of transfers (a FedAvg
                # round's downloads) costs two events per distinct latency. A flow requested alone
                # at its instant (staggered starts) pays one comparison for it.
                now = env._now
                if now != self._lat_now:   # the first flow requested now
                    self._lat_now = now
                    self._lat_first = now + latency
                    self._lat_recent = None
                else:
                    at = now + latency
                    recent = self._lat_recent
                    if recent is None:   # the second: ends by instant, from now on
                        recent = self._lat_recent = {self._lat_first: None}
                    b = recent.get(at, _MISS)
                    if b is _MISS or (b is not None and b.items is None):   # the first to end then
                        recent[at] = None   # (the batch done: only if at == now, a latency below rounding)
                    elif b is None:   # the second to end then: a batch for it and the ones after
                        eid = next(env._eid)
                        recent[at] = b = _Batch(env, at, [eid, f], self._lat_batch_cbs)
                        heapq.heappush(env._queue, (at, _NORMAL, eid, b))
                        return
                    else:
                        b.items += (next(env._eid), f)
                        self._shared += 1
                        return
            _LatencyTimer(env, latency, f, self._latency_cbs)
        else:
            self._latency_done(f)

    def _latency_batch_done(self, b: _Batch) -> None:
        """The callback of a batch of latency ends: :meth:`_latency_done` for each flow in turn."""
        self._run_batch(b, self._latency_done)

    def _deliver(self, f: Flow) -> None:
        """Fire delivered ``f``'s event (:func:`_fire`). With ``batch_events`` the events fired at
        one instant share one queued entry: each is triggered now (as ``succeed`` does), takes the
        event number its own entry would have, and has its callbacks run, in that order, by the
        batch (:meth:`_run_batch`), as ``Environment.step`` would run them."""
        b = self._dbatch
        env = self.env
        if b is None:
            now = env._now
            if self._dfirst != now or not self.batch_events:   # the first at this instant: its own entry
                self._dfirst = now
                _fire(f)
                return
            eid = next(env._eid)   # the second: a batch for it and the ones after
            self._dbatch = b = _Batch(env, now, [eid, _trigger(f)], self._dbatch_cbs)
            heapq.heappush(env._queue, (now, _NORMAL, eid, b))
        else:   # (a batch is only pending at the instant it was made: it is done before time moves on)
            b.items += (next(env._eid), _trigger(f))
            self._shared += 1

    def _delivery_batch_done(self, b: _Batch) -> None:
        try:
            self._run_batch(b, _process_event)
        finally:
            if b.items is None:   # all done (even if the last callback raised)
                self._dbatch = None

    def _run_batch(self, b: _Batch, handle) -> None:
        """The callback of batch ``b`` (SimPy has just popped its entry): process its items from
        ``b.next`` on with ``handle``, in order, each only when no other queued event comes before
        it in SimPy's order (time, priority, eid); else leave an entry of ``b`` queued for it and
        return. ``b.items`` is None once every item is done.

        While items remain, an entry of ``b`` stays in the queue under a key no later than the next
        item's (``b.queued``), so that whatever looks at the queue meanwhile (``env.peek()``, a
        chain, the inline delivery) sees that something is due, as it would see the items' own
        entries; it is taken out (at the root of the heap then) before the last item. If ``handle``
        raises, the items after it stay queued and the exception goes on to ``env.step``'s caller."""
        q = self.env._queue
        lst = b.items
        i = b.next
        b.queued = False   # (SimPy popped it)
        if b.pops:
            self._shared -= 1   # each pop after the first is an event the items' own entries had too
        b.pops += 1
        try:
            # (the entry's key may be an earlier item's: check the first one too)
            while not self._other_first(b, lst[i]):
                if i + 2 < len(lst):
                    if not b.queued:
                        self._queue_batch(b, i + 2)
                elif b.queued:   # the last item: nothing else is due before it, so b's entry is the root
                    heapq.heappop(q)
                    b.queued = False
                handle(lst[i + 1])
                i += 2
                if i >= len(lst):
                    b.items = None
                    return
        except BaseException:
            i += 2
            if i >= len(lst):
                b.items = None
            else:
                self._leave_queued(b, i)
            raise
        self._leave_queued(b, i)

    def _leave_queued(self, b: _Batch, i: int) -> None:
        """Item ``i`` of ``b`` is next; make sure an entry of ``b`` is queued for it."""
        b.next = i
        if not b.queued:
            self._queue_batch(b, i)

    def _other_first(self, b: _Batch, eid: int) -> bool:
        """Is an event other than ``b``'s own entry queued before ``b``'s item numbered ``eid``?"""
        q = self.env._queue
        if not q:
            return False
        h = q[0]
        if h[3] is b:   # then the smallest other entry is a child of the root
            return (len(q) > 1 and _before(q[1], b.at, eid)) or (len(q) > 2 and _before(q[2], b.at, eid))
        return _before(h, b.at, eid)

    def _queue_batch(self, b: _Batch, i: int) -> None:
        """Queue an entry of ``b`` under item ``i``'s eid."""
        b.callbacks = b.cbs
        heapq.heappush(self.env._queue, (b.at, _NORMAL, b.items[i], b))
        b.queued = True

    def _latency_done(self, f: Flow | _LatencyTimer) -> None:
        """The latency phase of ``f`` is over (the callback of its timer, or called with the flow)."""
        if f.__class__ is _LatencyTimer:
            f = f.flow
        if f.status != "latency":   # aborted meanwhile
            return
        f._paid = True
        if f.nbytes == 0:
            f.data_start = self.env._now
            self._close(f, "delivered")
            self._deliver(f)
            return
        # the route as of now (links may have changed); the cached one if no link went down or up
        route = f._rt if f._rep == self._epoch else self._route_idx(f._si, f._di)
        if route is None:
            f.path, f.links, f._li = (), (), ()
            f.status = "stalled"
            self._stalled[f] = None
        else:
            self._activate_on(f, route)

    def _activate_on(self, f: Flow, route: tuple) -> None:
        """Make a flow active on ``route`` (radios on)."""
        if f.data_start is None:
            f.data_start = self.env._now
        if self.incremental and not self._pending and not self._dirty:   # the rates are max-min now
            joined = self._join_local(f, route)
        else:
            self._join_links(f, route)
            joined = False
        if f._mtx is not None:
            f._mtx.tx_begin()
        if f._mrx is not None:
            f._mrx.rx_begin()
        self._n_active += 1
        if joined:
            at = self._timer_at
            if at is None or f._fin < at:   # else the pending timer fires first and re-arms
                self._arm_timer()
            return
        if not self._pending:   # _request_recompute, inlined
            self._pending = True
            ev = self._wakeup
            ev.callbacks = self._wakeup_cbs
            self.env.schedule(ev)

    @staticmethod
    def _activate(f: Flow, route: tuple, now: float) -> tuple:
        """Set ``f`` up as active on ``route`` (rate 0, no finish time yet); returns its edges."""
        f.status = "active"
        f.path, f.links, lis, _, _ = route
        f._li = lis
        f.rate = 0.0
        f._t = now
        f._fin = _INF
        f._due = -_INF
        f._hseq = -1
        return lis

    def _join_links(self, f: Flow, route: tuple) -> None:
        self._activate(f, route, self.env._now)
        lf, dirty = self._link_flows, self._dirty
        for li in f._li:
            on = lf[li]
            if on is None:
                lf[li] = f
            elif on.__class__ is Flow:
                lf[li] = {on: None, f: None}
            else:
                on[f] = None
            dirty[li] = None

    def _join_local(self, f: Flow, route: tuple) -> bool:
        """Put ``f`` on ``route``'s edges (as :meth:`_join_links`) and give it its max-min rate
        without touching the others, if that is the answer; else mark its edges changed.

        Called when the rates are max-min (no change is waiting). Let ``b`` be the least of: the
        capacity of each edge only ``f`` crosses, and the capacity left (capacity minus the other
        flows' rates) on each shared edge. If no shared edge of ``f`` is full (so none is anybody's
        bottleneck), and ``b`` is reached on an edge of its own or on a shared edge where no other
        flow is faster than ``b``, then ``f`` at rate ``b`` with every other rate unchanged is
        max-min fair: each flow still has a bottleneck (a full edge on which no flow is faster),
        and the max-min allocation is unique. So it is *the* allocation, up to rounding: ``b`` is
        ``capacity - load`` here, where progressive filling would sum its levels (an edge of its
        own gives exactly its capacity either way), and the load is the edge's running sum of rates
        (reset to exactly 0 when the edge empties, summed afresh by every recomputation of its
        component), not a fresh sum. Otherwise (a shared edge is full, or the bottleneck to scan
        has more than ``_LOCAL_MAX`` flows) marks ``f``'s edges changed and returns False: the
        caller queues the full recomputation. O(edges of f), plus a scan of its bottleneck edge
        when that is a shared one.
        """
        now = self.env._now
        lis = self._activate(f, route, now)
        lf, cap, lload = self._link_flows, self._cap, self._lload
        own = _INF
        low = _INF
        low_li = -1
        shared = None
        ok = True
        for li in lis:
            on = lf[li]
            c = cap[li]
            if on is None:   # an edge of its own
                lf[li] = f
                if c < own:
                    own = c
                continue
            if on.__class__ is Flow:
                lf[li] = {on: None, f: None}
            else:
                on[f] = None
            if ok:
                left = c - lload[li]   # f's rate is still 0: the others' load
                if left <= _LOCAL_EPS * c:   # full: it may be another flow's bottleneck
                    ok = False
                    continue
                if left < low:
                    low, low_li = left, li
                if shared is None:
                    shared = [li]
                else:
                    shared.append(li)
        if ok:
            if own <= low:
                b = own
                util = 1.0
            else:
                b = low
                util = 0.0
                on = lf[low_li]
                if len(on) > self._LOCAL_MAX:
                    ok = False
                else:
                    for g in on:
                        if g is not f and g.rate > b:
                            ok = False
                            break
        if not ok:
            dirty = self._dirty
            for li in lis:
                dirty[li] = None
            return False
        if shared is not None:
            for li in shared:
                x = (lload[li] + b) / cap[li]
                if x > util:
                    util = x
        if util > self._max_util:
            self._max_util = util
        self._heap_changed = True
        if b == 0.0:   # (as _assign: a rate that does not change is left alone)
            return True
        # (_assign of the one flow, inlined: its rate was 0, so nothing to settle)
        f.rate = b
        for li in lis:
            lload[li] += b
        f._fin = fin = now + f.remaining * 8.0 / b
        f._due = fin - (2e-9 * 8.0 * f.nbytes / b + 3e-12 * abs(fin))   # as in _assign
        f._hseq = sq = next(self._seq)
        at = self._due.get(fin)   # (_push_due, inlined: every flow that joins alone comes here)
        if at is None:
            self._due[fin] = [sq, f]
            heapq.heappush(self._heap, fin)
        else:
            at += (sq, f)
        return True

    def _leave_local(self, f: Flow) -> bool:
        """Whether an active flow can end without changing any other flow's max-min rate.

        True when every shared edge of ``f`` is either not full, or full with every other flow on
        it slower than ``f``: then that edge is nobody else's bottleneck (a bottleneck is a full
        edge on which the flow is among the fastest), so every other flow keeps its bottleneck and
        its rate. Called only while the rates are max-min. O(edges of f), plus a scan of each full
        shared edge.
        """
        lf, cap, lload = self._link_flows, self._cap, self._lload
        r = f.rate
        for li in f._li:
            on = lf[li]
            if on is f:
                continue
            c = cap[li]
            if c - lload[li] <= _LOCAL_EPS * c:   # full (f included): is anyone else as fast?
                if len(on) > self._LOCAL_MAX:
                    return False
                rr = r * (1.0 - _LOCAL_EPS)
                for g in on:
                    if g is not f and g.rate >= rr:
                        return False
        return True

    def _leave_links(self, f: Flow) -> None:
        """Settle an active flow and take it off its edges (rate 0); its status is the caller's."""
        self._settle(f, self.env._now)
        self._off_links(f)
        f.rate = 0.0
        f._fin = _INF
        f._hseq = -1
        self._heap_changed = True

    def _off_links(self, f: Flow) -> None:
        lf, dirty, lload = self._link_flows, self._dirty, self._lload
        r = f.rate
        for li in f._li:
            on = lf[li]
            if on is f:
                lf[li] = None
                lload[li] = 0.0   # empty: exactly nothing (no rounding carried over)
            else:
                del on[f]
                if on:
                    lload[li] -= r
                else:
                    lf[li] = None
                    lload[li] = 0.0
            dirty[li] = None

    def _stall(self, f: Flow) -> None:
        f.status = "stalled"
        f.path, f.links, f._li = (), (), ()
        self._stalled[f] = None
        self._radios_off(f)

    def _radios_off(self, f: Flow) -> None:
        if f._mtx is not None:
            f._mtx.tx_end()
        if f._mrx is not None:
            f._mrx.rx_end()
        self._n_active -= 1

    def _settle(self, f: Flow, now: float) -> None:
        dt = now - f._t
        if dt > 0 and f.rate > 0:
            sent = f.rate * dt / 8.0
            if sent > f.remaining:
                sent = f.remaining
            f.remaining -= sent
            lb = self._link_bytes
            for li in f._li:
                lb[li] += sent
        f._t = now

    def _close(self, f: Flow, status: str) -> None:
        """End a flow (``'delivered'`` or ``'dropped'``): off its edges, radios off, recorded."""
        now = self.env._now
        st = f.status
        if st == "active":
            lidx = f._li
            if status == "delivered":   # the last bytes, whatever rounding left
                lb = self._link_bytes
                rem = f.remaining
                for li in lidx:
                    lb[li] += rem
                f.remaining = 0.0
            else:
                self._settle(f, now)
            f._t = now
            self._off_links(f)   # (_leave_links: a delivered flow is settled already)
            f._fin = _INF
            self._radios_off(f)
        elif st == "stalled":
            del self._stalled[f]
        if status == "delivered":
            f.remaining = 0.0
            self._delivered += 1
            self._bytes_delivered += f.nbytes
        else:
            self._dropped += 1
        f.status = status
        f.end = now
        f.rate = 0.0
        f._hseq = -1
        self._heap_changed = True
        if f.data_start is None:
            f.data_start = now
        del self._open[f.id]
        # off both end nodes' lists
        heads = self._node_head
        si, p, nxt = f._si, f._sp, f._sn
        if p is None:
            heads[si] = nxt
        elif p._si == si:
            p._sn = nxt
        else:
            p._dn = nxt
        if nxt is not None:
            if nxt._si == si:
                nxt._sp = p
            else:
                nxt._dp = p
        di, p, nxt = f._di, f._dp, f._dn
        if p is None:
            heads[di] = nxt
        elif p._si == di:
            p._sn = nxt
        else:
            p._dn = nxt
        if nxt is not None:
            if nxt._si == di:
                nxt._sp = p
            else:
                nxt._dp = p
        f._sp = f._sn = f._dp = f._dn = None
        if self.recorder is not None:
            self.recorder.transfer(f.id, f.src, f.dst, f.nbytes, f.start, f.data_start, now, f.tag, status)

    def _record(self, f: Flow) -> None:
        if self.recorder is not None:
            self.recorder.transfer(f.id, f.src, f.dst, f.nbytes, f.start, f.data_start, f.end, f.tag, f.status)

    # -- sharing ----------------------------------------------------------------------------------
    def _request_recompute(self) -> None:
        """Queue one recomputation for this instant, after the events already queued for it."""
        if not self._pending:
            self._pending = True
            ev = self._wakeup
            ev.callbacks = self._wakeup_cbs
            self.env.schedule(ev)

    def _recompute(self, _ev: Any = None) -> None:
        self._pending = False
        dirty = self._dirty
        if not dirty:
            return
        self._recomputations += 1
        now = self.env._now
        self._dirty = {}
        # The connected component of the changed edges: flows on them, their edges, and so on,
        # walked in the order of a breadth-first search (marks instead of sets). Each flow found
        # is sorted at once into those that are done (up to rounding: they end now instead of
        # lingering) and those that share; the done ones are closed after the search, in the order
        # found, before the rates are computed. The smallest fair share over the edges (the first
        # round of progressive filling) is taken on the way; ``links`` keeps the changed edges and
        # the shared ones (an edge that only one flow crosses is that flow's business).
        lf, cap = self._link_flows, self._cap
        lmark = self._lmark
        stamp = self._stamp = self._stamp + 1
        links = list(dirty)
        for li in links:
            lmark[li] = stamp
        keep: list[Flow] = []
        done: list[Flow] | None = None
        tnow = now + _TIME_EPS * abs(now)
        inc = _INF
        i = 0
        while i < len(links):
            li = links[i]
            i += 1
            on = lf[li]
            if on is None:
                continue
            if on.__class__ is Flow:
                x = cap[li]
                if x < inc:
                    inc = x
                if on._mark == stamp:   # e.g. the access link of a flow met on a shared edge
                    continue
                on = (on,)
            else:
                x = cap[li] / len(on)
                if x < inc:
                    inc = x
            for f in on:
                if f._mark != stamp:
                    f._mark = stamp
                    for l2 in f._li:
                        if lmark[l2] != stamp:
                            lmark[l2] = stamp
                            if lf[l2] is f:   # its own edge (no other flow): share = capacity
                                x = cap[l2]
                                if x < inc:
                                    inc = x
                            else:
                                links.append(l2)
                    if now >= f._due:   # else it cannot be done yet (see _assign)
                        rate = f.rate
                        rem = f.remaining - rate * (now - f._t) / 8.0 if rate else f.remaining
                        if rem <= _REMAINING_EPS * f.nbytes or f._fin <= tnow:
                            if done is None:
                                done = [f]
                            else:
                                done.append(f)
                            continue
                    keep.append(f)
        if done is not None or len(keep) >= self._NUMPY_MIN_FLOWS:
            if done is not None:
                for f in done:
                    self._close(f, "delivered")
                    self._deliver(f)
                self._dirty.clear()   # only edges of this component were touched
            if keep:
                self._assign(keep, self._rates(keep), now)
        elif keep:
            self._share_small(keep, links, inc, now)
        if keep:   # the component is closed: its edges' running loads, summed afresh
            lload = self._lload
            for f in keep:
                for li in f._li:
                    lload[li] = 0.0
            for f in keep:
                r = f.rate
                for li in f._li:
                    lload[li] += r
        if self._heap_changed:   # else _arm_timer has nothing to do
            self._arm_timer()

    def _share_small(self, keep: list[Flow], links: list[int], inc: float, now: float) -> None:
        """Share a small component: ``keep``, ``links`` its changed and shared edges, ``inc`` its smallest share.

        One flow alone: the reference's single round gives it the smallest capacity on its path
        (0.0 + min(cap / 1)), and that edge's utilisation is exactly 1.0.

        Several: the first round of the reference. Every flow grows by ``inc``; an edge is full
        when ``cap - inc * users <= eps * cap``. If every flow crosses a full edge, the rates are
        all ``0.0 + inc``; otherwise :meth:`_rates` runs the reference's rounds. Same floats
        either way, and the same peak utilisation: once it is >= 1.0, only a full edge with
        several flows (inc added once per flow may round above its capacity) or one with more
        than 4096 can raise it. An edge with one flow has load ``inc <= cap``; a non-full edge
        has ``inc * k < cap * (1 - eps)``, below its capacity even after adding ``k <= 4096``
        terms with rounding.
        """
        if len(keep) == 1:
            if self._max_util < 1.0:
                self._max_util = 1.0
            if keep[0].rate != inc:
                self._assign(keep, [inc], now)
            return
        if self._max_util < 1.0:   # before the first full edge: the plain way, every edge's load
            self._assign(keep, self._rates(keep), now)
            return
        cap, left, lf = self._cap, self._left, self._link_flows
        neg = -_INF
        util = 0.0
        for li in links:   # shared edges: full or not
            on = lf[li]
            if on is None or on.__class__ is Flow:
                continue
            k = len(on)
            c = cap[li]
            if c - inc * k <= _FULL_EPS * c:
                left[li] = neg
            else:
                left[li] = 0.0
                if k <= 4096:
                    continue
            x = inc   # the edge's load: inc added once per flow
            while k > 1:
                x += inc
                k -= 1
            x /= c
            if x > util:
                util = x
        changed = None
        for f in keep:
            for li in f._li:
                on = lf[li]
                if on is f:   # its own edge
                    c = cap[li]
                    if c - inc <= _FULL_EPS * c:
                        break
                elif left[li] == neg:
                    break
            else:   # a flow grows on: more rounds
                self._assign(keep, self._rates(keep), now)
                return
            if f.rate != inc:
                if changed is None:
                    changed = [f]
                else:
                    changed.append(f)
        if util > self._max_util:
            self._max_util = util
        if changed is not None:
            self._assign(changed, [inc] * len(changed), now)

    def _assign(self, keep: list[Flow], rates: list[float], now: float) -> None:
        """Give the flows their new rates: settle those whose rate changes, new finish times."""
        seq = self._seq
        lb, lload = self._link_bytes, self._lload
        for f, r in zip(keep, rates):
            old = f.rate
            if r != old:
                dt = now - f._t   # _settle, inlined
                if dt > 0 and old > 0:
                    sent = old * dt / 8.0
                    if sent > f.remaining:
                        sent = f.remaining
                    f.remaining -= sent
                    for li in f._li:
                        lb[li] += sent
                f._t = now
                f.rate = r
                d = r - old
                for li in f._li:
                    lload[li] += d
                f._fin = fin = now + f.remaining * 8.0 / r
                # Before _due the flow cannot pass the done test of _recompute: that needs
                # now >= fin - 1e-9 * nbytes * 8 / r (up to rounding errors of a few ulps of the
                # bytes and times involved), or now * (1 + 1e-12) >= fin. The margin below is
                # twice the first and 3e-12 * fin for the second and for rounding.
                f._due = fin - (2e-9 * 8.0 * f.nbytes / r + 3e-12 * abs(fin))
                f._hseq = sq = next(seq)
                self._push_due(fin, sq, f)
        self._heap_changed = True

    def _push_due(self, fin: float, sq: int, f: Flow) -> None:
        """File ``f`` (its entry ``sq``) as due at ``fin`` in the completion heap."""
        at = self._due.get(fin)
        if at is None:
            self._due[fin] = [sq, f]
            heapq.heappush(self._heap, fin)
        else:
            at += (sq, f)

    def _rates(self, flows: list[Flow]) -> list[float]:
        """Max-min rates of a closed component of active flows; also tracks the peak utilisation."""
        cap = self._cap
        n = len(flows)
        if n < self._NUMPY_MIN_FLOWS:
            if n == 1:
                # one flow: the reference's single round gives it the smallest capacity on its path
                # (0.0 + min(cap / 1)), and that edge's utilisation is exactly 1.0
                rates = [min(map(cap.__getitem__, flows[0]._li))]
                util = 1.0
            else:
                users, left = self._users, self._left
                act: list[int] = []
                fl = []
                for f in flows:
                    li = f._li
                    fl.append(li)
                    for l in li:
                        k = users[l]
                        if not k:
                            act.append(l)
                        users[l] = k + 1
                # the reference's first round (left == capacity): often it freezes every flow
                inc = _INF
                for l in act:
                    x = cap[l] / users[l]
                    if x < inc:
                        inc = x
                neg = -_INF
                for l in act:
                    c = cap[l]
                    left[l] = neg if c - inc * users[l] <= _FULL_EPS * c else 0.0
                for li in fl:
                    for l in li:
                        if left[l] == neg:
                            break
                    else:
                        break   # a flow still grows: more rounds
                else:
                    # one round: every rate is 0.0 + inc; an edge's load is inc added once per user
                    rates = [inc] * n
                    util = 0.0
                    for l in act:
                        k = users[l]
                        users[l] = 0
                        x = inc
                        while k > 1:
                            x += inc
                            k -= 1
                        x /= cap[l]
                        if x > util:
                            util = x
                    if util > self._max_util:
                        self._max_util = util
                    return rates
                rates = _fill(fl, cap, left, users, act)
                load = self._load
                for l in act:
                    load[l] = 0.0
                for li, r in zip(fl, rates):
                    for l in li:
                        load[l] += r
                util = max([load[l] / cap[l] for l in act])
        else:
            local: dict[int, int] = {}
            pf: list[int] = []
            pl: list[int] = []
            for i, f in enumerate(flows):
                for li in f._li:
                    j = local.get(li)
                    if j is None:
                        j = local[li] = len(local)
                    pf.append(i)
                    pl.append(j)
            capa = np.array([cap[li] for li in local], dtype=np.float64)
            pfa = np.array(pf, dtype=np.intp)
            pla = np.array(pl, dtype=np.intp)
            ra = _waterfill(pfa, pla, capa, len(flows))
            util = float((np.bincount(pla, weights=ra[pfa], minlength=capa.shape[0]) / capa).max())
            rates = ra.tolist()
        if util > self._max_util:
            self._max_util = util
        return rates

    def _arm_timer(self) -> None:
        """Keep one pending timeout at the earliest finish time (older ones are ignored when they fire)."""
        self._heap_changed = False
        heap, due = self._heap, self._due
        while heap:
            at = due[heap[0]]
            if (at[1]._hseq == at[0] if len(at) == 2
                    else any(at[i + 1]._hseq == at[i] for i in range(0, len(at), 2))):
                break
            del due[heapq.heappop(heap)]
        if len(heap) > 4 * self._n_active + 256:   # drop stale entries in bulk
            for t in heap:
                at = due[t]
                at[:] = [x for i in range(0, len(at), 2) if at[i + 1]._hseq == at[i] for x in at[i:i + 2]]
                if not at:
                    del due[t]
            heap[:] = due
            heapq.heapify(heap)
        if not heap:
            self._timer = None
            self._timer_at = None
            return
        t = heap[0]
        if self._timer_at is not None and self._timer_at <= t:
            return   # the pending timer fires first and re-arms
        self._timer_at = t
        env = self.env
        now = env._now
        ev = self._spare
        if ev is None:
            ev = _Timer(env)
        else:
            self._spare = None
        self._timer = ev
        ev.callbacks = self._timer_cbs
        env.schedule(ev, _NORMAL, t - now if t > now else 0.0)   # (what env.timeout does)

    def _on_timer(self, ev: Any) -> None:
        self._spare = ev   # it has fired: free to be scheduled again
        if ev is not self._timer:
            return
        self._timer = None
        self._timer_at = None
        now = self.env._now
        tnow = now + _TIME_EPS * abs(now)
        heap, due = self._heap, self._due
        last = None   # the flow closed last, its event not fired yet
        local = self.incremental and not self._pending and not self._dirty
        while heap and heap[0] <= tnow:
            at = due.pop(heapq.heappop(heap))
            for i in range(0, len(at), 2):
                f = at[i + 1]
                if f._hseq != at[i]:
                    continue
                if last is not None:
                    self._deliver(last)
                if local and not self._leave_local(f):
                    local = False
                self._close(f, "delivered")
                last = f
        if last is None:
            self._arm_timer()
            return
        if not local:
            self._deliver(last)
            self._request_recompute()
            self._arm_timer()
            return
        self._dirty.clear()   # nobody's rate changes: forget the edges _close marked
        self._arm_timer()     # (at a time after now: every finish up to now was popped)
        q = self.env._queue
        if (q and q[0][0] <= now) or not self.inline_delivery:
            self._deliver(last)
            return
        # Nothing else is due now, so the flow's event, fired here, would be the very next event
        # processed, with every bit of state as it is now: process it here instead (what
        # Environment.step does with it) and spare it the trip through the event queue. (One
        # call of env.step() then runs both; env.run() cannot tell.)
        # (_process_event(_trigger(last)), inlined: once per lone delivery)
        ev, last.event = last.event, None
        ev._ok = True
        ev._value = last
        cbs, ev.callbacks = ev.callbacks, None
        for cb in cbs:
            cb(ev)
