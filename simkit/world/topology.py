"""The network graph a fleet lives on: generators, a validating GraphML loader, device placement.

The graph is a :class:`networkx.DiGraph`. Each direction of a full-duplex link is its own edge
``(u, v)`` (DESIGN.md §2), with attributes

- ``bandwidth_bps`` (> 0, finite): capacity of that direction, bits per second;
- ``latency_s`` (>= 0, finite): one-way latency of that direction, seconds;
- ``loss`` (optional, in [0, 1]): packet loss probability;
- ``tech`` (optional): the access technology of the link (a key of the scenario's access specs:
  ``wifi``, ``lte``, ``5g``, ``ethernet`` ...); core and backhaul links have none.

Every node has ``kind`` in ``{"device", "router", "server"}``; there is exactly one server.

Generators (node ids are the device names, ``server_name``, ``gw-<i>``, ``r-<i>``):

- :func:`star`: each device has one access link straight to the server.
- :func:`two_tier`: devices -> edge gateways (round-robin) -> server over backhaul links.
- :func:`random_geometric`: a seeded random geometric graph of routers in the unit square,
  connected if need be; the server hangs off ``r-0``, each device off its nearest router.

An access link of technology ``t`` (an :class:`~simkit.config.AccessSpec`) carries
``uplink_bps * up_factor`` device->network, ``downlink_bps * down_factor`` network->device, and
``latency_s`` each way; the factors are the fleet's per-device bandwidth jitter.

GraphML files (``topologies/*.graphml``, see ``topologies/README.md``)
---------------------------------------------------------------------
The file is parsed with :mod:`xml.etree.ElementTree` (not ``networkx.read_graphml``, which does not
keep the source/target order of undirected edges). Conventions:

- ``<key>`` elements declare attributes by ``attr.name`` and ``attr.type`` (``boolean``, ``int``,
  ``long``, ``float``, ``double``, ``string``; default ``string``), optionally with a ``<default>``.
  Keys without ``attr.name`` (e.g. yEd's graphics keys) are ignored, and so is their data.
- Node ``kind`` is required (``device``, ``router`` or ``server``); exactly one node is a server.
- Edge ``bandwidth_bps`` and ``latency_s`` are required (a key default counts); ``loss`` and
  ``tech`` are optional. Any other attribute is kept as is.
- The graph may be undirected (``edgedefault="undirected"``) or directed; an ``<edge>`` may
  override it with ``directed="true|false"``. A directed edge is one direction. An undirected
  edge ``source``-``target`` is both directions: ``bandwidth_bps`` is the source->target rate and
  ``bandwidth_reverse_bps`` (optional, default ``bandwidth_bps``) the target->source rate;
  latency, loss and tech apply to both. Write access links with the device as the source, so
  ``bandwidth_bps`` is its uplink.
- No self-loops, no two edges for the same direction, no nested graphs or hyperedges.

A ``file`` topology places the fleet on the file's ``kind=device`` nodes in document order; unused
device nodes are removed. A device's access technology is the ``tech`` of its first incident edge
in document order, else the fleet's choice for it. The device's bandwidth jitter multiplies the
rates of its incident edges (out-edges by ``up_factor``, in-edges by ``down_factor``).

Whatever the kind, :func:`build_topology` checks that every device has a directed path to the
server and one back, and raises :class:`~simkit.errors.TopologyError` naming the device otherwise.
"""

from __future__ import annotations

import math
import os
import random
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from simkit.config import TOPOLOGIES_DIR, AccessSpec, TopologySpec
from simkit.errors import TopologyError

__all__ = [
    "NODE_KINDS",
    "DeviceSlot",
    "Placement",
    "build_topology",
    "star",
    "two_tier",
    "random_geometric",
    "load_graphml",
    "check_reachable",
]

NODE_KINDS = ("device", "router", "server")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DeviceSlot:
    """What the fleet asks the topology to place: one device and its access link.

    Args:
        name: the device's unique name (becomes its node id in generated graphs).
        tech: access technology of its access link (a key of the access specs).
        up_factor, down_factor: bandwidth jitter multipliers (> 0) of its uplink / downlink.
    """

    name: str
    tech: str
    up_factor: float = 1.0
    down_factor: float = 1.0

    def __post_init__(self):
        for attr in ("up_factor", "down_factor"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TopologyError(f"must be a finite number > 0 (got {value!r})",
                                    field=f"device '{self.name}'.{attr}")


@dataclass
class Placement:
    """A built topology and where the fleet sits on it."""

    graph: nx.DiGraph
    device_nodes: dict[str, str]  # device name -> node id in graph
    server_node: str
    tech_of: dict[str, str]  # device name -> access technology of its access link


# --------------------------------------------------------------------------- helpers
def _access_specs(access: Mapping[str, Any]) -> dict[str, AccessSpec]:
    out = {}
    for name, spec in access.items():
        out[name] = spec if isinstance(spec, AccessSpec) else AccessSpec.model_validate(spec)
    return out


def _check_devices(devices: Sequence[DeviceSlot], access: Mapping[str, AccessSpec], reserved: set[str]) -> None:
    seen: set[str] = set()
    for slot in devices:
        if slot.name in seen:
            raise TopologyError(f"duplicate device name {slot.name!r}", field="topology")
        if slot.name in reserved:
            raise TopologyError(f"device name {slot.name!r} clashes with an infrastructure node of the topology",
                                field="topology")
        seen.add(slot.name)
        if slot.tech not in access:
            raise TopologyError(f"unknown access technology {slot.tech!r}; known: {', '.join(sorted(access))}",
                                field=f"device '{slot.name}'.tech")


def _positive(value: float, field: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise TopologyError(f"must be a finite number > 0 (got {value!r})", field=field)
    return float(value)


def _non_negative(value: float, field: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise TopologyError(f"must be a finite number >= 0 (got {value!r})", field=field)
    return float(value)


def _link(g: nx.DiGraph, u: str, v: str, *, up_bps: float, down_bps: float, latency_s: float,
          tech: str | None = None) -> None:
    """Add both directions of a full-duplex link: ``up_bps`` u->v, ``down_bps`` v->u."""
    extra = {} if tech is None else {"tech": tech}
    g.add_edge(u, v, bandwidth_bps=float(up_bps), latency_s=float(latency_s), **extra)
    g.add_edge(v, u, bandwidth_bps=float(down_bps), latency_s=float(latency_s), **extra)


def _attach(g: nx.DiGraph, slot: DeviceSlot, to: str, access: Mapping[str, AccessSpec]) -> None:
    spec = access[slot.tech]
    g.add_node(slot.name, kind="device", tech=slot.tech)
    _link(g, slot.name, to, up_bps=spec.uplink_bps * slot.up_factor, down_bps=spec.downlink_bps * slot.down_factor,
          latency_s=spec.latency_s, tech=slot.tech)


def _placement(g: nx.DiGraph, devices: Sequence[DeviceSlot], server: str) -> Placement:
    return Placement(graph=g, device_nodes={d.name: d.name for d in devices}, server_node=server,
                     tech_of={d.name: d.tech for d in devices})


# --------------------------------------------------------------------------- generators
def star(devices: Sequence[DeviceSlot], *, access: Mapping[str, AccessSpec], server_name: str = "server") -> Placement:
    """Every device has one access link of its technology straight to the server."""
    access = _access_specs(access)
    _check_devices(devices, access, {server_name})
    g = nx.DiGraph(kind="star")
    g.add_node(server_name, kind="server")
    for slot in devices:
        _attach(g, slot, server_name, access)
    return _placement(g, devices, server_name)


def two_tier(devices: Sequence[DeviceSlot], *, access: Mapping[str, AccessSpec], gateways: int, backhaul_bps: float,
             backhaul_latency_s: float, server_name: str = "server") -> Placement:
    """Devices -> edge gateways ``gw-0..gw-{k-1}`` (round-robin in device order) -> server.

    Each device reaches its gateway over its access link; each gateway reaches the server over a
    backhaul link of ``backhaul_bps`` both ways and ``backhaul_latency_s`` one way.
    """
    if not (isinstance(gateways, int) and gateways >= 1):
        raise TopologyError(f"must be an integer >= 1 (got {gateways!r})", field="topology.gateways")
    backhaul_bps = _positive(backhaul_bps, "topology.backhaul_bps")
    backhaul_latency_s = _non_negative(backhaul_latency_s, "topology.backhaul_latency_s")
    access = _access_specs(access)
    gws = [f"gw-{i}" for i in range(gateways)]
    _check_devices(devices, access, {server_name, *gws})
    g = nx.DiGraph(kind="two_tier")
    g.add_node(server_name, kind="server")
    for gw in gws:
        g.add_node(gw, kind="router")
        _link(g, gw, server_name, up_bps=backhaul_bps, down_bps=backhaul_bps, latency_s=backhaul_latency_s)
    for i, slot in enumerate(devices):
        _attach(g, slot, gws[i % gateways], access)
    return _placement(g, devices, server_name)


def _connect_nearest(g: nx.Graph, pos: dict[int, Sequence[float]]) -> list[tuple[int, int]]:
    """Join the components of ``g`` by nearest pairs until it is connected (deterministic).

    Prim's algorithm over components: the component holding node 0 grows by the shortest edge
    to any node outside it (ties: lowest node ids), then absorbs that node's whole component.
    O(n^2) distance evaluations in total.
    """
    comp_of = {}
    for comp in nx.connected_components(g):
        for n in comp:
            comp_of[n] = comp
    inside = set(comp_of[0])
    outside = sorted(set(g) - inside)
    best = {v: min((math.dist(pos[v], pos[a]), a) for a in inside) for v in outside}
    added = []
    while best:
        v = min(best, key=lambda n: (best[n][0], best[n][1], n))
        _, a = best[v]
        g.add_edge(a, v)
        added.append((a, v))
        joined = comp_of[v]
        inside |= joined
        for w in joined:
            best.pop(w, None)
        for u in best:
            for w in joined:
                cand = (math.dist(pos[u], pos[w]), w)
                if cand < best[u]:
                    best[u] = cand
    return added


def random_geometric(devices: Sequence[DeviceSlot], *, access: Mapping[str, AccessSpec], routers: int, radius: float,
                     rng: random.Random, core_bps: float, core_latency_s: float,
                     server_name: str = "server") -> Placement:
    """Seeded random geometric graph of routers ``r-0..`` in the unit square, devices at the nearest router.

    Steps (all randomness from ``rng``, in this order):

    1. ``nx.random_geometric_graph(routers, radius, seed=rng)``; if it is disconnected, the
       components are joined by nearest pairs (:func:`_connect_nearest`), so it is connected.
    2. Each router link carries ``core_bps`` both ways with latency ``core_latency_s * d / radius``
       for Euclidean length ``d``.
    3. The server sits at ``r-0``'s position, joined to it by a ``core_bps`` link of zero length
       (latency 0).
    4. Each device, in order, gets a position ``(rng.random(), rng.random())`` and joins the
       nearest router (lowest index on a tie) by its access link.

    Node attribute ``pos`` holds every router's and device's position.
    """
    if not (isinstance(routers, int) and routers >= 1):
        raise TopologyError(f"must be an integer >= 1 (got {routers!r})", field="topology.routers")
    radius = _positive(radius, "topology.radius")
    core_bps = _positive(core_bps, "topology.core_bps")
    core_latency_s = _non_negative(core_latency_s, "topology.core_latency_s")
    access = _access_specs(access)
    names = [f"r-{i}" for i in range(routers)]
    _check_devices(devices, access, {server_name, *names})

    geo = nx.random_geometric_graph(routers, radius, seed=rng)
    pos = {i: tuple(float(x) for x in geo.nodes[i]["pos"]) for i in range(routers)}
    added = _connect_nearest(geo, pos)

    g = nx.DiGraph(kind="random_geometric", bridges=[(names[a], names[b]) for a, b in added])
    g.add_node(server_name, kind="server", pos=pos[0])
    for i in range(routers):
        g.add_node(names[i], kind="router", pos=pos[i])
    for a, b in sorted((min(e), max(e)) for e in geo.edges()):
        lat = core_latency_s * math.dist(pos[a], pos[b]) / radius
        _link(g, names[a], names[b], up_bps=core_bps, down_bps=core_bps, latency_s=lat)
    _link(g, server_name, names[0], up_bps=core_bps, down_bps=core_bps, latency_s=0.0)

    coords = [pos[i] for i in range(routers)]
    for slot in devices:
        p = (rng.random(), rng.random())
        nearest = min(range(routers), key=lambda i: ((coords[i][0] - p[0]) ** 2 + (coords[i][1] - p[1]) ** 2, i))
        _attach(g, slot, names[nearest], access)
        g.nodes[slot.name]["pos"] = p
    return _placement(g, devices, server_name)


# --------------------------------------------------------------------------- GraphML
_GRAPHML_NS = "http://graphml.graphdrawing.org/xmlns"
_NUMERIC_EDGE = ("bandwidth_bps", "bandwidth_reverse_bps", "latency_s", "loss")
_TYPES = {"boolean", "int", "long", "float", "double", "string"}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _convert(raw: str, typ: str, *, file: str, field: str) -> Any:
    text = raw.strip() if typ != "string" else raw
    try:
        if typ == "boolean":
            low = text.lower()
            if low in ("true", "1"):
                return True
            if low in ("false", "0"):
                return False
            raise ValueError(raw)
        if typ in ("int", "long"):
            return int(text)
        if typ in ("float", "double"):
            return float(text)
    except ValueError:
        raise TopologyError(f"{raw!r} is not a valid {typ}", file=file, field=field) from None
    return raw


def _number(value: Any, *, file: str, field: str) -> float:
    if isinstance(value, bool):
        raise TopologyError(f"must be a number (got {value!r})", file=file, field=field)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TopologyError(f"must be a number (got {value!r})", file=file, field=field) from None
    if not math.isfinite(x):
        raise TopologyError(f"must be finite (got {value!r})", file=file, field=field)
    return x


@dataclass
class _Parsed:
    graph: nx.DiGraph
    first_tech: dict[str, str | None]  # device node -> tech of its first incident edge (document order)


def _parse_graphml(path: str | os.PathLike, access: Mapping[str, Any] | None) -> _Parsed:
    file = str(path)
    try:
        tree = ET.parse(file)
    except FileNotFoundError:
        raise TopologyError("file not found", file=file) from None
    except IsADirectoryError:
        raise TopologyError("is a folder, not a GraphML file", file=file) from None
    except ET.ParseError as exc:
        raise TopologyError(f"not a GraphML file (not valid XML: {exc})", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read file: {exc}", file=file) from None
    except (LookupError, ValueError) as exc:   # e.g. <?xml encoding="TF-8"?>: an encoding Python does not know
        raise TopologyError(f"not a GraphML file (cannot decode the XML: {exc})", file=file) from None
    root = tree.getroot()
    if _local(root.tag) != "graphml":
        raise TopologyError(f"not a GraphML file (root element is <{_local(root.tag)}>, expected <graphml>)", file=file)

    # keys: id -> (name, type, domain); defaults per domain
    keys: dict[str, tuple[str, str, str]] = {}
    ignored: set[str] = set()
    defaults: dict[str, dict[str, Any]] = {"node": {}, "edge": {}, "graph": {}}
    for key in root:
        if _local(key.tag) != "key":
            continue
        kid = key.get("id")
        if not kid:
            raise TopologyError("a <key> has no 'id'", file=file, field="key")
        if kid in keys or kid in ignored:
            raise TopologyError(f"key id {kid!r} is declared twice", file=file, field=f"key '{kid}'")
        name = key.get("attr.name")
        if name is None:  # e.g. yEd graphics keys: not ours, ignored
            ignored.add(kid)
            continue
        typ = key.get("attr.type", "string")
        if typ not in _TYPES:
            raise TopologyError(f"unknown attr.type {typ!r}; use one of {', '.join(sorted(_TYPES))}",
                                file=file, field=f"key '{name}'.attr.type")
        domain = key.get("for", "all")
        keys[kid] = (name, typ, domain)
        for child in key:
            if _local(child.tag) == "default":
                value = _convert(child.text or "", typ, file=file, field=f"key '{name}'.default")
                for d in (("node", "edge", "graph") if domain == "all" else (domain,)):
                    if d in defaults:
                        defaults[d][name] = value

    graphs = [el for el in root if _local(el.tag) == "graph"]
    if len(graphs) != 1:
        raise TopologyError(f"expected exactly one <graph> element, found {len(graphs)}", file=file, field="graph")
    gel = graphs[0]
    edgedefault = gel.get("edgedefault", "directed")
    if edgedefault not in ("directed", "undirected"):
        raise TopologyError(f"edgedefault must be 'directed' or 'undirected' (got {edgedefault!r})",
                            file=file, field="graph.edgedefault")

    def data_of(el: ET.Element, domain: str, what: str) -> dict[str, Any]:
        attrs = dict(defaults[domain])
        for child in el:
            tag = _local(child.tag)
            if tag == "data":
                kid = child.get("key")
                if kid in ignored:
                    continue
                if kid not in keys:
                    raise TopologyError(f"<data> refers to undeclared key {kid!r}", file=file, field=what)
                name, typ, _ = keys[kid]
                attrs[name] = _convert(child.text or "", typ, file=file, field=f"{what}.{name}")
            elif tag in ("graph", "port"):
                raise TopologyError(f"nested <{tag}> elements are not supported", file=file, field=what)
        return attrs

    g = nx.DiGraph(**data_of(gel, "graph", "graph"))
    g.graph["file"] = file

    servers: list[str] = []
    for el in gel:
        if _local(el.tag) != "node":
            continue
        nid = el.get("id")
        if nid is None:
            raise TopologyError("a <node> has no 'id'", file=file, field="node")
        what = f"node '{nid}'"
        if nid in g:
            raise TopologyError("node id declared twice", file=file, field=what)
        attrs = data_of(el, "node", what)
        kind = attrs.get("kind")
        if kind is None:
            raise TopologyError(f"missing; choose one of {', '.join(NODE_KINDS)}", file=file, field=f"{what}.kind")
        if kind not in NODE_KINDS:
            raise TopologyError(f"unknown node kind {kind!r}; choose one of {', '.join(NODE_KINDS)}",
                                file=file, field=f"{what}.kind")
        if kind == "server":
            servers.append(nid)
        g.add_node(nid, **attrs)
    if not servers:
        raise TopologyError("no node has kind 'server' (exactly one is needed)", file=file, field="nodes.kind")
    if len(servers) > 1:
        raise TopologyError(f"{len(servers)} nodes have kind 'server' ({', '.join(map(repr, servers))}); "
                            "exactly one is needed", file=file, field="nodes.kind")

    techs = None if access is None else set(access)
    first_tech: dict[str, str | None] = {}
    for el in gel:
        tag = _local(el.tag)
        if tag == "hyperedge":
            raise TopologyError("hyperedges are not supported", file=file, field="hyperedge")
        if tag != "edge":
            continue
        u, v = el.get("source"), el.get("target")
        what = f"edge '{u}'->'{v}'"
        for end in (u, v):
            if end is None or end not in g:
                raise TopologyError(f"refers to undeclared node {end!r}", file=file, field=what)
        if u == v:
            raise TopologyError("self-loops are not allowed", file=file, field=what)
        directed = el.get("directed", "true" if edgedefault == "directed" else "false").lower()
        if directed not in ("true", "false"):
            raise TopologyError(f"'directed' must be true or false (got {el.get('directed')!r})",
                                file=file, field=f"{what}.directed")
        directed = directed == "true"
        attrs = data_of(el, "edge", what)
        for name in _NUMERIC_EDGE:
            if name in attrs:
                attrs[name] = _number(attrs[name], file=file, field=f"{what}.{name}")
        for name in ("bandwidth_bps", "latency_s"):
            if name not in attrs:
                raise TopologyError("missing required attribute", file=file, field=f"{what}.{name}")
        for name in ("bandwidth_bps", "bandwidth_reverse_bps"):
            if name in attrs and attrs[name] <= 0:
                raise TopologyError(f"must be > 0 (got {attrs[name]!r})", file=file, field=f"{what}.{name}")
        if attrs["latency_s"] < 0:
            raise TopologyError(f"must be >= 0 (got {attrs['latency_s']!r})", file=file, field=f"{what}.latency_s")
        if "loss" in attrs and not 0 <= attrs["loss"] <= 1:
            raise TopologyError(f"must be in [0, 1] (got {attrs['loss']!r})", file=file, field=f"{what}.loss")
        if "tech" in attrs:
            if not isinstance(attrs["tech"], str):
                raise TopologyError(f"must be a string (got {attrs['tech']!r})", file=file, field=f"{what}.tech")
            if techs is not None and attrs["tech"] not in techs:
                raise TopologyError(f"unknown access technology {attrs['tech']!r}; known: {', '.join(sorted(techs))}",
                                    file=file, field=f"{what}.tech")
        if directed and "bandwidth_reverse_bps" in attrs:
            raise TopologyError("only undirected edges have a reverse bandwidth; give the other direction "
                                "its own edge", file=file, field=f"{what}.bandwidth_reverse_bps")
        reverse_bps = attrs.pop("bandwidth_reverse_bps", attrs["bandwidth_bps"])
        pairs = [(u, v, attrs)] if directed else [(u, v, attrs), (v, u, {**attrs, "bandwidth_bps": reverse_bps})]
        for a, b, at in pairs:
            if g.has_edge(a, b):
                raise TopologyError(f"a second edge for the direction '{a}'->'{b}'", file=file, field=what)
            g.add_edge(a, b, **at)
        for end in (u, v):
            if g.nodes[end]["kind"] == "device" and end not in first_tech:
                first_tech[end] = attrs.get("tech")
    return _Parsed(graph=g, first_tech=first_tech)


def load_graphml(path: str | os.PathLike, *, access: Mapping[str, Any] | None = None) -> nx.DiGraph:
    """Load and validate a GraphML topology (conventions in the module docstring).

    Args:
        path: the GraphML file.
        access: the known access technologies; if given, every edge ``tech`` must be one of them.

    Raises:
        TopologyError: naming the file and the offending node or edge field.
    """
    return _parse_graphml(path, access).graph


def _resolve_path(path: str) -> Path:
    """``path`` as given; else relative to the shipped ``topologies/`` folder (``.graphml`` optional)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for cand in (TOPOLOGIES_DIR / path, TOPOLOGIES_DIR / f"{path}.graphml"):
        if cand.exists():
            return cand
    return p


def _from_file(path: str, devices: Sequence[DeviceSlot], access: Mapping[str, AccessSpec]) -> Placement:
    parsed = _parse_graphml(path, access)
    g, file = parsed.graph, str(path)
    server = next(n for n, k in g.nodes(data="kind") if k == "server")
    slots = [n for n, k in g.nodes(data="kind") if k == "device"]
    if len(devices) > len(slots):
        raise TopologyError(f"the fleet has {len(devices)} devices but the file has only {len(slots)} "
                            "device nodes", file=file, field="topology")
    g.remove_nodes_from(slots[len(devices):])
    device_nodes, tech_of = {}, {}
    for slot, node in zip(devices, slots):
        tech = parsed.first_tech.get(node) or slot.tech
        if tech not in access:
            raise TopologyError(f"unknown access technology {tech!r}; known: {', '.join(sorted(access))}",
                                file=file, field=f"device '{slot.name}'.tech")
        device_nodes[slot.name] = node
        tech_of[slot.name] = tech
        g.nodes[node]["device"] = slot.name
        g.nodes[node].setdefault("tech", tech)
        for _, _, data in g.out_edges(node, data=True):
            data["bandwidth_bps"] *= slot.up_factor
        for _, _, data in g.in_edges(node, data=True):
            data["bandwidth_bps"] *= slot.down_factor
    return Placement(graph=g, device_nodes=device_nodes, server_node=server, tech_of=tech_of)


# --------------------------------------------------------------------------- building
def check_reachable(placement: Placement, *, file: str | None = None) -> None:
    """Raise :class:`TopologyError` unless every placed device reaches the server and back."""
    g, server = placement.graph, placement.server_node
    to_server = nx.ancestors(g, server)
    from_server = nx.descendants(g, server)
    for name, node in placement.device_nodes.items():
        label = f"device {name!r}" + (f" (node {node!r})" if node != name else "")
        if node not in to_server:
            raise TopologyError(f"{label} has no path to the server {server!r}", file=file, field="topology")
        if node not in from_server:
            raise TopologyError(f"{label} has no path from the server {server!r}", file=file, field="topology")


def build_topology(spec: TopologySpec, devices: Sequence[DeviceSlot], *, server_name: str = "server",
                   server_tech: str = "ethernet", access: Mapping[str, AccessSpec],
                   rng: random.Random) -> Placement:
    """Build the graph ``spec`` describes and place ``devices`` (and the server) on it.

    Args:
        spec: the scenario's topology spec; ``spec.kind`` picks the generator or ``file``.
        devices: the fleet, in fleet order (names must be unique).
        server_name: node id of the server in generated graphs (a file names its own server).
        server_tech: the server's access technology, recorded as the server node's ``tech``.
        access: known access technologies (usually ``spec.access_specs()``).
        rng: the topology's random stream (used by ``random_geometric`` only).

    Raises:
        TopologyError: bad parameters or file, duplicate devices, or a device that cannot reach
            the server or be reached from it.
    """
    access = _access_specs(access)
    if server_tech not in access:
        raise TopologyError(f"unknown access technology {server_tech!r}; known: {', '.join(sorted(access))}",
                            field="server.access")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TopologyError(f"duplicate device name {dup!r}", field="topology")
    file = None
    if spec.kind == "star":
        placement = star(devices, access=access, server_name=server_name)
    elif spec.kind == "two_tier":
        placement = two_tier(devices, access=access, gateways=spec.gateways, backhaul_bps=spec.backhaul_bps,
                             backhaul_latency_s=spec.backhaul_latency_s, server_name=server_name)
    elif spec.kind == "random_geometric":
        placement = random_geometric(devices, access=access, routers=spec.routers, radius=spec.radius, rng=rng,
                                     core_bps=spec.core_bps, core_latency_s=spec.core_latency_s,
                                     server_name=server_name)
    elif spec.kind == "file":
        file = str(_resolve_path(spec.path))
        placement = _from_file(file, devices, access)
    else:  # pragma: no cover - TopologySpec.kind is a Literal
        raise TopologyError(f"unknown topology kind {spec.kind!r}", field="topology.kind")
    placement.graph.nodes[placement.server_node].setdefault("tech", server_tech)
    check_reachable(placement, file=file)
    return placement
