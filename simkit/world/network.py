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
    is the plain statement of the allocation and serves small components; :func:`maxmin_fast`
    (numpy, level by level) computes the same rates for large ones. Completions are kept in a heap
    with one pending SimPy timeout for the earliest; a generation counter voids timeouts that a
    later change made obsolete (SimPy cannot cancel a timeout).

    Floating point: a flow is complete when its remaining bytes are below ``1e-9 * nbytes`` or its
    finish time equals ``now`` within ``1e-12`` relative, so no flow lingers with a few bytes left.
    A delivered flow counts exactly ``nbytes`` on every edge it crossed.

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
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from itertools import count
from typing import Any, NamedTuple

import networkx as nx
import numpy as np
import simpy

from simkit.errors import TopologyError

__all__ = ["Flow", "Network", "NetworkStats", "TransferAborted", "maxmin_fast", "maxmin_reference"]

_INF = math.inf
#: a flow with fewer than this fraction of its bytes left is complete
_REMAINING_EPS = 1e-9
#: a finish time within this relative distance of now is now
_TIME_EPS = 1e-12
#: an edge with less than this fraction of its capacity left (reference) or whose fair share is within
#: this relative distance of the current level (fast) is full
_FULL_EPS = 1e-12


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
        event: succeeds with this flow when delivered, fails with :class:`TransferAborted`.
    """

    __slots__ = ("id", "src", "dst", "nbytes", "remaining", "path", "links", "rate", "start", "data_start",
                 "end", "tag", "status", "event",
                 # private bookkeeping of the Network
                 "_si", "_di", "_li", "_t", "_fin", "_ver", "_paid", "_mtx", "_mrx")

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
        self._ver = 0            # bumped whenever the rate or route changes (stale heap entries)
        self._paid = False       # latency already waited
        self._mtx = self._mrx = None

    def __repr__(self) -> str:
        return (f"Flow(id={self.id}, {self.src!r}->{self.dst!r}, nbytes={self.nbytes:g}, status={self.status!r}, "
                f"rate={self.rate:g}, remaining={self.remaining:g})")


class NetworkStats(NamedTuple):
    """A snapshot of the network's counters (:attr:`Network.stats`).

    Attributes:
        link_bytes: bytes carried so far per directed edge ``(u, v)`` (settled up to now).
        max_utilisation: running maximum over every rate assignment of (sum of the rates on an edge)
            / (its capacity); max-min fairness keeps it <= 1 up to rounding.
        recomputations: how many times rates were recomputed.
        delivered, dropped: flows ended each way; bytes_delivered: their requested bytes, delivered.
    """

    link_bytes: dict
    max_utilisation: float
    recomputations: int
    delivered: int
    dropped: int
    bytes_delivered: float


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


# -- routing -------------------------------------------------------------------------------------------

class _Route(NamedTuple):
    nodes: tuple
    links: tuple
    lidx: tuple
    latency: float


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
        self._down: list[bool] = [False] * len(self._edges)
        self._n_down = 0

        # routing caches
        self._pairs: dict[tuple[int, int], _Route | None] = {}
        self._fwd: dict[int, _Tree] = {}
        self._rev: dict[int, _Tree] = {}
        self._dst_uses: dict[int, int] = {}

        # flow state
        self._ids = count()
        self._open: dict[int, Flow] = {}                      # unfinished flows by id
        self._by_node: dict[Hashable, dict[Flow, None]] = {}  # unfinished flows by end node
        self._link_flows: list[dict[Flow, None]] = [{} for _ in self._edges]  # active flows per edge
        self._stalled: dict[Flow, None] = {}
        self._dirty: dict[int, None] = {}                     # edges whose sharing changed
        self._pending = False                                 # a recomputation is queued for now
        self._heap: list[tuple[float, int, int, Flow]] = []   # (finish, seq, version, flow)
        self._seq = count()
        self._timer_gen = 0
        self._timer_at: float | None = None
        self._n_active = 0

        # counters
        self._link_bytes: list[float] = [0.0] * len(self._edges)
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
        if not (isinstance(nbytes, numbers.Real) and math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
        si, di = self._node_index(src), self._node_index(dst)
        env = self.env
        now = env.now
        ev = env.event()
        f = Flow(next(self._ids), src, dst, float(nbytes), now, tag, ev)
        f._si, f._di = si, di
        if si == di:  # nothing crosses a link
            f.path = (src,)
            f.data_start = f.end = now
            f.remaining = 0.0
            f.status = "delivered"
            self._delivered += 1
            self._bytes_delivered += f.nbytes
            self._record(f)
            ev.succeed(f)
            return ev
        route = self._route_idx(si, di)
        if route is None and not self._reachable(src, dst):
            raise TopologyError(f"no path from {src!r} to {dst!r} in the topology")
        meters = self.meters
        f._mtx = meters.get(src)
        f._mrx = meters.get(dst)
        self._open[f.id] = f
        self._by_node.setdefault(src, {})[f] = None
        self._by_node.setdefault(dst, {})[f] = None
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
        return r.nodes

    def path_latency(self, src: Hashable, dst: Hashable) -> float:
        """Sum of ``latency_s`` along :meth:`route` (exactly rounded), in seconds."""
        self.route(src, dst)
        return self._route_idx(self._nidx[src], self._nidx[dst]).latency

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
            affected.update(self._link_flows[li])
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
        self._dirty[li] = None
        self._request_recompute()

    def abort_flows(self, node: Hashable) -> list[Flow]:
        """Drop every unfinished flow from or to ``node`` now (it crashed); returns them in request order.

        Each dropped flow is recorded with status ``'dropped'`` and its event fails with
        :class:`TransferAborted` (defused: an unwatched failure does not stop the run).
        """
        flows = sorted(self._by_node.get(node, {}), key=lambda f: f.id)
        for f in flows:
            self._close(f, "dropped")
            f.event.defused = True
            f.event.fail(TransferAborted(f))
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
        )

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
        self._fwd.clear()
        self._rev.clear()

    def _route_idx(self, s: int, t: int) -> _Route | None:
        r = self._pairs.get((s, t), _MISS)
        if r is _MISS:
            r = self._pairs[(s, t)] = self._compute_route(s, t)
        return r

    def _compute_route(self, s: int, t: int) -> _Route | None:
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
        nodes = tuple(self._nodes[i] for i in seq)
        lidx = tuple(self._eidx[(seq[k], seq[k + 1])] for k in range(len(seq) - 1))
        links = tuple(self._edges[li] for li in lidx)
        return _Route(nodes, links, lidx, lat_int / self._lat_den)   # int / int: correctly rounded

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

    # -- flow life cycle --------------------------------------------------------------------------
    def _begin_latency(self, f: Flow, route: _Route) -> None:
        f.status = "latency"
        f.path, f.links, f._li = route.nodes, route.links, route.lidx
        if route.latency > 0:
            self.env.timeout(route.latency).callbacks.append(partial(self._latency_done, f))
        else:
            self._latency_done(f, None)

    def _latency_done(self, f: Flow, _ev: Any) -> None:
        if f.status != "latency":   # aborted meanwhile
            return
        f._paid = True
        if f.nbytes == 0:
            f.data_start = self.env.now
            self._close(f, "delivered")
            f.event.succeed(f)
            return
        route = self._route_idx(f._si, f._di)   # the route as of now (links may have changed)
        if route is None:
            f.path, f.links, f._li = (), (), ()
            f.status = "stalled"
            self._stalled[f] = None
        else:
            self._activate_on(f, route)

    def _activate_on(self, f: Flow, route: _Route) -> None:
        """Make a flow active on ``route`` (radios on)."""
        if f.data_start is None:
            f.data_start = self.env.now
        self._join_links(f, route)
        if f._mtx is not None:
            f._mtx.begin("tx")
        if f._mrx is not None:
            f._mrx.begin("rx")
        self._n_active += 1
        self._request_recompute()

    def _join_links(self, f: Flow, route: _Route) -> None:
        f.status = "active"
        f.path, f.links, f._li = route.nodes, route.links, route.lidx
        f.rate = 0.0
        f._t = self.env.now
        f._fin = _INF
        f._ver += 1
        lf, dirty = self._link_flows, self._dirty
        for li in route.lidx:
            lf[li][f] = None
            dirty[li] = None

    def _leave_links(self, f: Flow) -> None:
        """Settle an active flow and take it off its edges (rate 0); its status is the caller's."""
        self._settle(f, self.env.now)
        lf, dirty = self._link_flows, self._dirty
        for li in f._li:
            del lf[li][f]
            dirty[li] = None
        f.rate = 0.0
        f._fin = _INF
        f._ver += 1

    def _stall(self, f: Flow) -> None:
        f.status = "stalled"
        f.path, f.links, f._li = (), (), ()
        self._stalled[f] = None
        self._radios_off(f)

    def _radios_off(self, f: Flow) -> None:
        if f._mtx is not None:
            f._mtx.end("tx")
        if f._mrx is not None:
            f._mrx.end("rx")
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
        now = self.env.now
        if f.status == "active":
            if status == "delivered":   # the last bytes, whatever rounding left
                lb = self._link_bytes
                for li in f._li:
                    lb[li] += f.remaining
                f.remaining = 0.0
                f._t = now
            self._leave_links(f)
            self._radios_off(f)
        elif f.status == "stalled":
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
        f._ver += 1
        if f.data_start is None:
            f.data_start = now
        del self._open[f.id]
        self._by_node[f.src].pop(f, None)
        self._by_node[f.dst].pop(f, None)
        self._record(f)

    def _record(self, f: Flow) -> None:
        if self.recorder is not None:
            self.recorder.transfer(f.id, f.src, f.dst, f.nbytes, f.start, f.data_start, f.end, f.tag, f.status)

    # -- sharing ----------------------------------------------------------------------------------
    def _request_recompute(self) -> None:
        """Queue one recomputation for this instant, after the events already queued for it."""
        if not self._pending:
            self._pending = True
            ev = self.env.event()
            ev.callbacks.append(self._recompute)
            ev.succeed()

    def _recompute(self, _ev: Any = None) -> None:
        self._pending = False
        if not self._dirty:
            return
        self._recomputations += 1
        now = self.env.now
        dirty = self._dirty
        self._dirty = {}
        # the connected component of the changed edges: flows on them, their edges, and so on
        lf = self._link_flows
        links = list(dirty)
        seen_l = set(links)
        seen_f: set[Flow] = set()
        flows: list[Flow] = []
        i = 0
        while i < len(links):
            for f in lf[links[i]]:
                if f not in seen_f:
                    seen_f.add(f)
                    flows.append(f)
                    for l2 in f._li:
                        if l2 not in seen_l:
                            seen_l.add(l2)
                            links.append(l2)
            i += 1
        # flows that are done (up to rounding) end now instead of lingering
        keep = []
        tnow = now + _TIME_EPS * abs(now)
        for f in flows:
            rem = f.remaining - f.rate * (now - f._t) / 8.0 if f.rate else f.remaining
            if rem <= _REMAINING_EPS * f.nbytes or f._fin <= tnow:
                self._close(f, "delivered")
                f.event.succeed(f)
            else:
                keep.append(f)
        self._dirty.clear()   # only edges of this component were touched above
        if keep:
            rates = self._rates(keep)
            heap, seq = self._heap, self._seq
            for f, r in zip(keep, rates):
                if r != f.rate:
                    self._settle(f, now)
                    f.rate = r
                    f._ver += 1
                    f._fin = fin = now + f.remaining * 8.0 / r
                    heapq.heappush(heap, (fin, next(seq), f._ver, f))
        self._arm_timer()

    def _rates(self, flows: list[Flow]) -> list[float]:
        """Max-min rates of a closed component of active flows; also tracks the peak utilisation."""
        cap = self._cap
        if len(flows) < self._NUMPY_MIN_FLOWS:
            rates = maxmin_reference([f._li for f in flows], cap)
            load: dict[int, float] = {}
            for f, r in zip(flows, rates):
                for li in f._li:
                    load[li] = load.get(li, 0.0) + r
            util = max(x / cap[li] for li, x in load.items())
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
        """Keep one pending timeout at the earliest finish time (a generation counter voids old ones)."""
        heap = self._heap
        while heap:
            _, _, ver, f = heap[0]
            if ver == f._ver and f.status == "active":
                break
            heapq.heappop(heap)
        if len(heap) > 4 * self._n_active + 256:   # drop stale entries in bulk
            heap[:] = [e for e in heap if e[2] == e[3]._ver and e[3].status == "active"]
            heapq.heapify(heap)
        if not heap:
            self._timer_gen += 1
            self._timer_at = None
            return
        t = heap[0][0]
        if self._timer_at is not None and self._timer_at <= t:
            return   # the pending timer fires first and re-arms
        self._timer_gen += 1
        self._timer_at = t
        now = self.env.now
        self.env.timeout(t - now if t > now else 0.0).callbacks.append(partial(self._on_timer, self._timer_gen))

    def _on_timer(self, gen: int, _ev: Any) -> None:
        if gen != self._timer_gen:
            return
        self._timer_at = None
        now = self.env.now
        tnow = now + _TIME_EPS * abs(now)
        heap = self._heap
        ended = False
        while heap and heap[0][0] <= tnow:
            _, _, ver, f = heapq.heappop(heap)
            if ver == f._ver and f.status == "active":
                self._close(f, "delivered")
                f.event.succeed(f)
                ended = True
        if ended:
            self._request_recompute()
        self._arm_timer()
