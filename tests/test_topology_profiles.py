"""Shipped device profiles, topology generators, the GraphML loader and their bad-input errors."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit.config import DEFAULT_ACCESS, PROFILES_DIR, TOPOLOGIES_DIR, DeviceProfile, TopologySpec, load_profile, \
    load_profiles
from simkit.errors import ProfileError, SimkitError, TopologyError
from simkit.world.topology import DeviceSlot, Placement, build_topology, check_reachable, load_graphml, \
    random_geometric, star, two_tier

BAD = Path(__file__).parent / "data" / "bad"
ACCESS = TopologySpec().access_specs()
TECHS = sorted(ACCESS)

REQUIRED = ["rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "phone-midrange", "phone-flagship", "laptop",
            "server-t4", "server-a100"]
SERVERS = {"server-t4", "server-a100"}
SHIPPED_PROFILES = sorted(PROFILES_DIR.glob("*.yaml"))
SHIPPED_TOPOLOGIES = sorted(TOPOLOGIES_DIR.glob("*.graphml"))


def slots(n: int, tech: str = "wifi", prefix: str = "d") -> list[DeviceSlot]:
    return [DeviceSlot(f"{prefix}-{i}", tech) for i in range(n)]


def assert_two_way(p: Placement) -> None:
    for name, node in p.device_nodes.items():
        assert nx.has_path(p.graph, node, p.server_node), name
        assert nx.has_path(p.graph, p.server_node, node), name


def numeric_fields(profile: DeviceProfile) -> set[str]:
    """The numbers the profile's file gives (a field left to its default, e.g. no traffic rate, makes no claim)."""
    out = set()
    for key, value in profile.model_dump(exclude={"sources"}, exclude_unset=True).items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}" for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.add(key)
    return out


# =========================================================================== profiles
def test_required_profiles_ship_and_load_profiles_returns_them():
    profiles = load_profiles()
    assert set(REQUIRED) <= set(profiles)
    assert sorted(profiles) == sorted(p.stem for p in SHIPPED_PROFILES)
    for name, profile in profiles.items():
        assert profile.name == name


@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.stem)
def test_shipped_profile_loads_and_sources_every_number(path):
    profile = load_profile(path)
    fields = numeric_fields(profile)
    assert {"peak_flops", "efficiency", "memory_bytes", "step_overhead_s", "power.idle_w", "power.compute_w"} <= fields
    missing = fields - set(profile.sources)
    assert not missing, f"{path.name}: no source for {sorted(missing)}"
    stale = set(profile.sources) - fields
    assert not stale, f"{path.name}: sources for fields it does not set: {sorted(stale)}"
    for field, text in profile.sources.items():
        assert any(f"({c}" in text for c in "HML"), f"{path.name}: source of {field} has no confidence (H/M/L)"
    assert profile.description
    assert profile.default_access in DEFAULT_ACCESS
    assert 0 < profile.efficiency <= 1
    assert 0 <= profile.step_overhead_s <= 5e-3


def test_profile_kinds_access_and_batteries():
    profiles = load_profiles()
    for name in REQUIRED:
        assert profiles[name].kind == ("server" if name in SERVERS else "client"), name
    for name in SERVERS:
        assert profiles[name].default_access == "ethernet"
    assert profiles["rpi4"].default_access == profiles["rpi5"].default_access == "wifi"
    assert profiles["phone-midrange"].default_access == "lte"
    assert profiles["phone-flagship"].default_access == "5g"
    for name, profile in profiles.items():
        is_phone = name.startswith("phone-")
        assert (profile.battery_j is not None) == is_phone, name
        if is_phone:
            assert 30e3 < profile.battery_j < 100e3  # a 3,000-6,000 mAh cell at ~3.85 V


def test_profile_numbers_follow_the_research_note():
    p = load_profiles()
    assert p["rpi4"].power.idle_w == 1.6 and p["rpi4"].power.compute_w == pytest.approx(7.2 - 1.6)
    assert p["rpi5"].power.idle_w == 2.8
    assert p["server-t4"].peak_flops == pytest.approx(8.1e12)
    assert p["server-a100"].peak_flops == pytest.approx(19.5e12)
    assert p["server-t4"].power.idle_w + p["server-t4"].power.compute_w == pytest.approx(70)  # TDP
    assert p["jetson-nano"].peak_flops == pytest.approx(128 * 2 * 0.9216e9, rel=1e-3)
    # effective speed ordering the simulator relies on
    eff = {k: v.effective_flops for k, v in p.items()}
    assert eff["server-a100"] > eff["server-t4"] > max(v for k, v in eff.items() if k not in SERVERS)
    assert eff["rpi5"] > eff["rpi4"]
    assert eff["jetson-orin-nano"] > eff["jetson-nano"]


BAD_PROFILES = [
    ("profile-negative-flops.yaml", "peak_flops", "greater than 0"),
    ("profile-nan-efficiency.yaml", "efficiency", "finite"),
    ("profile-missing-power.yaml", "power", "missing"),
    ("profile-unknown-field.yaml", "turbo_boost", "unknown field"),
    ("profile-name-mismatch.yaml", "name", "does not match"),
    ("profile-not-yaml.yaml", None, "not valid YAML"),
    ("profile-zero-traffic.yaml", "traffic_bytes_per_s", "greater than 0"),
    ("profile-negative-kernel-overhead.yaml", "kernel_overhead_s", "greater than or equal to 0"),
]


@pytest.mark.parametrize("name,field,reason", BAD_PROFILES, ids=[b[0] for b in BAD_PROFILES])
def test_bad_profile_names_file_and_field(name, field, reason):
    path = BAD / name
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    err = info.value
    assert err.file == str(path) and str(path) in str(err)
    assert err.field == field
    if field:
        assert f"field '{field}'" in str(err)
    assert reason.lower() in str(err).lower()


def test_load_profiles_fails_on_a_bad_file_in_the_folder(tmp_path):
    shutil.copy(PROFILES_DIR / "rpi4.yaml", tmp_path / "rpi4.yaml")
    assert list(load_profiles(tmp_path)) == ["rpi4"]
    shutil.copy(BAD / "profile-negative-flops.yaml", tmp_path / "profile-negative-flops.yaml")
    with pytest.raises(ProfileError, match="peak_flops"):
        load_profiles(tmp_path)


# =========================================================================== generators
def test_star_edges_and_attributes():
    devs = [DeviceSlot("a", "wifi", up_factor=0.5, down_factor=2.0), DeviceSlot("b", "lte"), DeviceSlot("c", "5g", 1.5)]
    p = star(devs, access=ACCESS)
    g = p.graph
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == 4 and g.number_of_edges() == 6
    assert p.server_node == "server" and g.nodes["server"]["kind"] == "server"
    assert p.device_nodes == {"a": "a", "b": "b", "c": "c"}
    assert p.tech_of == {"a": "wifi", "b": "lte", "c": "5g"}
    for d in devs:
        spec = ACCESS[d.tech]
        assert g.nodes[d.name]["kind"] == "device"
        up, down = g.edges[d.name, "server"], g.edges["server", d.name]
        assert up["bandwidth_bps"] == pytest.approx(spec.uplink_bps * d.up_factor)
        assert down["bandwidth_bps"] == pytest.approx(spec.downlink_bps * d.down_factor)
        assert up["latency_s"] == down["latency_s"] == spec.latency_s
        assert up["tech"] == down["tech"] == d.tech
    assert g.edges["b", "server"]["bandwidth_bps"] == 6e6 and g.edges["server", "b"]["bandwidth_bps"] == 13e6


def test_two_tier_round_robin_and_backhaul():
    devs = slots(7, "lte")
    p = two_tier(devs, access=ACCESS, gateways=3, backhaul_bps=2e9, backhaul_latency_s=0.007)
    g = p.graph
    assert g.number_of_edges() == 2 * 7 + 2 * 3
    assert [n for n, k in g.nodes(data="kind") if k == "router"] == ["gw-0", "gw-1", "gw-2"]
    for i, d in enumerate(devs):
        assert list(g.successors(d.name)) == [f"gw-{i % 3}"]
        assert list(g.predecessors(d.name)) == [f"gw-{i % 3}"]
        assert g.edges[d.name, f"gw-{i % 3}"]["bandwidth_bps"] == ACCESS["lte"].uplink_bps
    for k in range(3):
        for e in ((f"gw-{k}", "server"), ("server", f"gw-{k}")):
            assert g.edges[e]["bandwidth_bps"] == 2e9 and g.edges[e]["latency_s"] == 0.007
            assert "tech" not in g.edges[e]
    assert_two_way(p)


def test_two_tier_more_gateways_than_devices():
    p = two_tier(slots(2), access=ACCESS, gateways=5, backhaul_bps=1e9, backhaul_latency_s=0.0)
    assert p.graph.number_of_edges() == 2 * 2 + 2 * 5
    assert_two_way(p)


def graph_signature(g: nx.DiGraph):
    return (list(g.nodes(data=True)), sorted((u, v, sorted(d.items())) for u, v, d in g.edges(data=True)))


def test_random_geometric_is_seeded():
    kw = dict(access=ACCESS, routers=12, radius=0.3, core_bps=10e9, core_latency_s=0.01)
    a = random_geometric(slots(20), rng=random.Random(7), **kw)
    b = random_geometric(slots(20), rng=random.Random(7), **kw)
    c = random_geometric(slots(20), rng=random.Random(8), **kw)
    assert graph_signature(a.graph) == graph_signature(b.graph)
    assert graph_signature(a.graph) != graph_signature(c.graph)


def test_random_geometric_connects_components_and_sets_latency():
    # 30 routers with a tiny radius start as (nearly) isolated points
    p = random_geometric(slots(10), access=ACCESS, routers=30, radius=0.02, rng=random.Random(1), core_bps=1e9,
                         core_latency_s=0.01)
    g = p.graph
    routers = [n for n, k in g.nodes(data="kind") if k == "router"]
    assert routers == [f"r-{i}" for i in range(30)]
    assert g.graph["bridges"], "expected components to be joined"
    assert nx.is_connected(g.subgraph(routers).to_undirected())
    assert nx.is_strongly_connected(g)
    for u, v, d in g.edges(data=True):
        if u in routers and v in routers:
            dist = math.dist(g.nodes[u]["pos"], g.nodes[v]["pos"])
            assert d["latency_s"] == pytest.approx(0.01 * dist / 0.02)
            assert d["bandwidth_bps"] == 1e9
    assert set(g.successors("server")) == {"r-0"}
    for name in p.device_nodes:  # attached to the nearest router
        (r,) = g.successors(name)
        pos = g.nodes[name]["pos"]
        assert math.dist(pos, g.nodes[r]["pos"]) == pytest.approx(min(math.dist(pos, g.nodes[x]["pos"]) for x in routers))
    assert_two_way(p)


def test_random_geometric_spanning_join_is_minimal():
    """Joining k components adds exactly k-1 bridges."""
    rng = random.Random(3)
    geo = nx.random_geometric_graph(25, 0.1, seed=random.Random(3))
    k = nx.number_connected_components(geo)
    p = random_geometric([], access=ACCESS, routers=25, radius=0.1, rng=rng, core_bps=1e9, core_latency_s=0.0)
    assert len(p.graph.graph["bridges"]) == k - 1


@pytest.mark.parametrize("kind", ["star", "two_tier", "random_geometric"])
def test_build_topology_dispatches(kind):
    spec = TopologySpec(kind=kind, gateways=2, routers=5)
    p = build_topology(spec, slots(4), access=ACCESS, rng=random.Random(0), server_tech="ethernet")
    assert p.graph.graph["kind"] == kind
    assert p.graph.nodes["server"]["tech"] == "ethernet"
    kinds = {k for _, k in p.graph.nodes(data="kind")}
    assert kinds == ({"device", "server"} if kind == "star" else {"device", "server", "router"})
    assert_two_way(p)


def test_build_topology_rejects_duplicates_unknown_tech_and_clashes():
    with pytest.raises(TopologyError, match="duplicate device name 'd-0'") as info:
        build_topology(TopologySpec(kind="star"), [DeviceSlot("d-0", "wifi"), DeviceSlot("d-0", "lte")],
                       access=ACCESS, rng=random.Random(0))
    assert info.value.field == "topology"
    with pytest.raises(TopologyError, match="duplicate device name 'A'"):
        build_topology(TopologySpec(kind="file", path="home-star"), [DeviceSlot("A", "wifi")] * 2, access=ACCESS,
                       rng=random.Random(0))
    with pytest.raises(TopologyError, match="carrier") as info:
        star([DeviceSlot("x", "carrier")], access=ACCESS)
    assert info.value.field == "device 'x'.tech"
    with pytest.raises(TopologyError, match="clashes"):
        two_tier([DeviceSlot("gw-0", "wifi")], access=ACCESS, gateways=1, backhaul_bps=1e9, backhaul_latency_s=0)
    with pytest.raises(TopologyError) as info:
        build_topology(TopologySpec(kind="star"), slots(1), access=ACCESS, server_tech="fibre", rng=random.Random(0))
    assert info.value.field == "server.access"


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan, math.inf])
def test_device_slot_rejects_bad_factors(factor):
    with pytest.raises(TopologyError, match="up_factor"):
        DeviceSlot("d", "wifi", up_factor=factor)


def test_generator_parameters_are_validated():
    with pytest.raises(TopologyError) as info:
        two_tier(slots(1), access=ACCESS, gateways=1, backhaul_bps=0.0, backhaul_latency_s=0.0)
    assert info.value.field == "topology.backhaul_bps"
    with pytest.raises(TopologyError) as info:
        random_geometric(slots(1), access=ACCESS, routers=0, radius=0.1, rng=random.Random(0), core_bps=1e9,
                         core_latency_s=0.0)
    assert info.value.field == "topology.routers"


# =========================================================================== shipped GraphML files
def test_at_least_three_topologies_ship():
    names = {p.stem for p in SHIPPED_TOPOLOGIES}
    assert {"campus-two-tier", "home-star", "metro-mesh"} <= names


@pytest.mark.parametrize("path", SHIPPED_TOPOLOGIES, ids=lambda p: p.stem)
def test_shipped_topology_loads_and_places_a_full_fleet(path):
    g = load_graphml(path, access=ACCESS)
    device_nodes = [n for n, k in g.nodes(data="kind") if k == "device"]
    assert sum(1 for _, k in g.nodes(data="kind") if k == "server") == 1
    for _, _, d in g.edges(data=True):
        assert d["bandwidth_bps"] > 0 and d["latency_s"] >= 0
    fleet = slots(len(device_nodes), "wifi")
    p = build_topology(TopologySpec(kind="file", path=str(path)), fleet, access=ACCESS, rng=random.Random(0))
    assert list(p.device_nodes.values()) == device_nodes  # document order
    assert p.graph.nodes[p.server_node]["kind"] == "server"
    for d in fleet:
        assert p.tech_of[d.name] in ACCESS
    assert_two_way(p)
    with pytest.raises(TopologyError) as info:
        build_topology(TopologySpec(kind="file", path=str(path)), slots(len(device_nodes) + 1), access=ACCESS,
                       rng=random.Random(0))
    assert f"{len(device_nodes) + 1} devices" in str(info.value) and f"only {len(device_nodes)}" in str(info.value)
    assert info.value.file == str(path)


def test_campus_sizes_orientation_and_techs():
    g = load_graphml(TOPOLOGIES_DIR / "campus-two-tier.graphml")
    devices = [n for n, k in g.nodes(data="kind") if k == "device"]
    gateways = [n for n, k in g.nodes(data="kind") if k == "router"]
    assert len(devices) >= 12 and len(gateways) == 3
    techs = {d["tech"] for _, _, d in g.edges(data=True) if "tech" in d}
    assert techs == {"wifi", "lte", "5g", "ethernet"}
    # undirected edge written device -> gateway: bandwidth_bps is the uplink, the reverse the downlink
    assert g.edges["cell-phone-0", "gw-cell"]["bandwidth_bps"] == ACCESS["lte"].uplink_bps
    assert g.edges["gw-cell", "cell-phone-0"]["bandwidth_bps"] == ACCESS["lte"].downlink_bps
    assert g.edges["gw-cell", "cloud"]["bandwidth_bps"] == 500e6 and g.edges["cloud", "gw-cell"]["bandwidth_bps"] == 1e9
    assert g.edges["lab-pc-0", "gw-lab"]["loss"] == 0.0  # key default
    assert g.edges["lib-pi-0", "gw-library"]["loss"] == 0.001


def test_file_placement_tech_jitter_and_unused_nodes():
    path = TOPOLOGIES_DIR / "campus-two-tier.graphml"
    fleet = [DeviceSlot("a", "wifi", up_factor=0.5, down_factor=2.0), DeviceSlot("b", "lte")]
    p = build_topology(TopologySpec(kind="file", path=str(path)), fleet, access=ACCESS, rng=random.Random(0))
    assert p.device_nodes == {"a": "lab-pc-0", "b": "lab-pc-1"}
    assert p.tech_of == {"a": "ethernet", "b": "ethernet"}  # the edge's tech wins over the slot's
    assert p.server_node == "cloud"
    assert p.graph.edges["lab-pc-0", "gw-lab"]["bandwidth_bps"] == pytest.approx(940e6 * 0.5)
    assert p.graph.edges["gw-lab", "lab-pc-0"]["bandwidth_bps"] == pytest.approx(940e6 * 2.0)
    assert sum(1 for _, k in p.graph.nodes(data="kind") if k == "device") == 2  # unused removed
    assert p.graph.nodes["lab-pc-0"]["device"] == "a"


def test_file_by_bare_name_and_directed_home_star():
    p = build_topology(TopologySpec(kind="file", path="home-star"), slots(10), access=ACCESS, rng=random.Random(0))
    g = p.graph
    assert p.server_node == "home-server" and len(p.device_nodes) == 10
    assert g.edges["pi-garden", "home-server"]["bandwidth_bps"] == 20e6
    assert g.edges["home-server", "pi-garden"]["bandwidth_bps"] == 30e6


def test_metro_mesh_survives_any_single_core_link_failure():
    path = TOPOLOGIES_DIR / "metro-mesh.graphml"
    g = load_graphml(path)
    p = build_topology(TopologySpec(kind="file", path=str(path)), slots(12), access=ACCESS, rng=random.Random(0))
    assert len(p.device_nodes) >= 10
    core = {(u, v) for u, v in g.edges if g.nodes[u]["kind"] != "device" and g.nodes[v]["kind"] != "device" and u < v}
    assert len(core) >= 10
    for u, v in core:
        h = p.graph.copy()
        h.remove_edges_from([(u, v), (v, u)])
        check_reachable(Placement(h, p.device_nodes, p.server_node, p.tech_of))


def write_graphml(path: Path, body: str, keys: str = "", edgedefault: str = "undirected") -> Path:
    path.write_text(f"""<?xml version="1.0"?>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
  <key id="k" for="node" attr.name="kind" attr.type="string"/>
  <key id="b" for="edge" attr.name="bandwidth_bps" attr.type="double"/>
  <key id="br" for="edge" attr.name="bandwidth_reverse_bps" attr.type="double"/>
  <key id="l" for="edge" attr.name="latency_s" attr.type="double"/>
  <key id="t" for="edge" attr.name="tech" attr.type="string"/>
  {keys}
  <graph edgedefault="{edgedefault}">{body}</graph>
</graphml>""")
    return path


def test_first_incident_edge_tech_else_slot_tech_and_ignored_keys(tmp_path):
    body = """
    <node id="s"><data key="k">server</data></node>
    <node id="x"><data key="k">device</data><data key="y">drawing</data></node>
    <node id="y"><data key="k">device</data></node>
    <edge source="x" target="s"><data key="b">1e6</data><data key="l">0</data></edge>
    <edge source="y" target="s"><data key="b">1e6</data><data key="l">0</data><data key="t">5g</data></edge>
    <edge source="x" target="y"><data key="b">1e6</data><data key="l">0</data><data key="t">lte</data></edge>"""
    path = write_graphml(tmp_path / "t.graphml", body, keys='<key id="y" for="node" yfiles.type="nodegraphics"/>')
    p = build_topology(TopologySpec(kind="file", path=str(path)), [DeviceSlot("A", "wifi"), DeviceSlot("B", "wifi")],
                       access=ACCESS, rng=random.Random(0))
    assert p.tech_of == {"A": "wifi", "B": "5g"}
    assert p.graph.nodes["x"] == {"kind": "device", "device": "A", "tech": "wifi"}  # yEd-style data ignored


def test_reverse_bandwidth_only_on_undirected_edges(tmp_path):
    body = """<node id="s"><data key="k">server</data></node><node id="x"><data key="k">device</data></node>
    <edge source="x" target="s"><data key="b">1e6</data><data key="br">2e6</data><data key="l">0</data></edge>"""
    g = load_graphml(write_graphml(tmp_path / "u.graphml", body))
    assert g.edges["x", "s"]["bandwidth_bps"] == 1e6 and g.edges["s", "x"]["bandwidth_bps"] == 2e6
    assert "bandwidth_reverse_bps" not in g.edges["s", "x"]
    path = write_graphml(tmp_path / "d.graphml", body, edgedefault="directed")
    with pytest.raises(TopologyError, match="bandwidth_reverse_bps"):
        load_graphml(path)


def test_duplicate_direction_and_self_loop_rejected(tmp_path):
    nodes = '<node id="s"><data key="k">server</data></node><node id="x"><data key="k">device</data></node>'
    e = '<edge source="{}" target="{}"><data key="b">1e6</data><data key="l">0</data></edge>'
    with pytest.raises(TopologyError, match="second edge"):
        load_graphml(write_graphml(tmp_path / "a.graphml", nodes + e.format("x", "s") + e.format("s", "x")))
    with pytest.raises(TopologyError, match="self-loop"):
        load_graphml(write_graphml(tmp_path / "b.graphml", nodes + e.format("x", "x")))
    # a directed file may give both directions
    g = load_graphml(write_graphml(tmp_path / "c.graphml", nodes + e.format("x", "s") + e.format("s", "x"),
                                   edgedefault="directed"))
    assert g.number_of_edges() == 2


# =========================================================================== bad topology corpus
BAD_TOPOLOGIES = [
    ("topo-not-graphml.graphml", None, "not a GraphML file"),
    ("topo-wrong-root.graphml", None, "not a GraphML file"),
    ("topo-zero-bandwidth.graphml", "edge 'dev-1'->'server'.bandwidth_bps", "> 0"),
    ("topo-negative-bandwidth.graphml", "edge 'dev-0'->'server'.bandwidth_bps", "> 0"),
    ("topo-missing-bandwidth.graphml", "edge 'dev-0'->'server'.bandwidth_bps", "missing"),
    ("topo-nan-bandwidth.graphml", "edge 'dev-0'->'server'.bandwidth_bps", "finite"),
    ("topo-inf-bandwidth.graphml", "edge 'dev-0'->'server'.bandwidth_bps", "finite"),
    ("topo-text-bandwidth.graphml", "edge 'dev-0'->'server'.bandwidth_bps", "must be a number"),
    ("topo-negative-latency.graphml", "edge 'dev-0'->'server'.latency_s", ">= 0"),
    ("topo-loss-above-one.graphml", "edge 'dev-0'->'server'.loss", "[0, 1]"),
    ("topo-no-server.graphml", "nodes.kind", "no node has kind 'server'"),
    ("topo-two-servers.graphml", "nodes.kind", "2 nodes have kind 'server'"),
    ("topo-unknown-kind.graphml", "node 'sw-0'.kind", "unknown node kind 'switch'"),
    ("topo-unknown-tech.graphml", "edge 'dev-0'->'server'.tech", "carrier-pigeon"),
]


@pytest.mark.parametrize("name,field,reason", BAD_TOPOLOGIES, ids=[b[0] for b in BAD_TOPOLOGIES])
def test_bad_topology_file_names_file_and_field(name, field, reason):
    path = BAD / name
    for load in (lambda: load_graphml(path, access=ACCESS),
                 lambda: build_topology(TopologySpec(kind="file", path=str(path)), slots(1), access=ACCESS,
                                        rng=random.Random(0))):
        with pytest.raises(TopologyError) as info:
            load()
        err = info.value
        assert isinstance(err, SimkitError)
        assert err.file == str(path) and str(path) in str(err)
        assert err.field == field
        if field:
            assert f"field '{field}'" in str(err)
        assert reason in str(err)


def test_unknown_tech_is_fine_without_access():
    g = load_graphml(BAD / "topo-unknown-tech.graphml")
    assert g.edges["dev-0", "server"]["tech"] == "carrier-pigeon"


@pytest.mark.parametrize("name,direction", [("topo-disconnected-device.graphml", "from the server"),
                                            ("topo-isolated-device.graphml", "to the server")])
def test_unreachable_device_is_named(name, direction):
    path = BAD / name
    load_graphml(path, access=ACCESS)  # the file itself is valid
    spec = TopologySpec(kind="file", path=str(path))
    build_topology(spec, slots(1), access=ACCESS, rng=random.Random(0))  # dev-0 alone is fine
    with pytest.raises(TopologyError) as info:
        build_topology(spec, [DeviceSlot("alice", "wifi"), DeviceSlot("bob", "wifi")], access=ACCESS,
                       rng=random.Random(0))
    err = info.value
    assert err.file == str(path) and err.field == "topology"
    assert "'bob'" in str(err) and "'dev-1'" in str(err) and direction in str(err)


def test_missing_topology_file():
    with pytest.raises(TopologyError, match="file not found"):
        load_graphml(BAD / "no-such-file.graphml")


# =========================================================================== properties
slot_lists = st.lists(
    st.builds(lambda t, u, d: (t, u, d), st.sampled_from(TECHS), st.floats(0.05, 20), st.floats(0.05, 20)),
    min_size=0, max_size=25,
).map(lambda xs: [DeviceSlot(f"dev-{i}", t, u, d) for i, (t, u, d) in enumerate(xs)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devs=slot_lists, kind=st.sampled_from(["star", "two_tier", "random_geometric"]),
       gateways=st.integers(1, 8), routers=st.integers(1, 40), radius=st.floats(0.001, 1.5),
       backhaul=st.floats(1e3, 1e11), latency=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_generated_topologies_always_serve_every_device_both_ways(devs, kind, gateways, routers, radius, backhaul,
                                                                   latency, seed):
    spec = TopologySpec(kind=kind, gateways=gateways, routers=routers, radius=radius, backhaul_bps=backhaul,
                        backhaul_latency_s=latency, core_bps=backhaul, core_latency_s=latency)
    p = build_topology(spec, devs, access=ACCESS, rng=random.Random(seed))
    g = p.graph
    assert_two_way(p)
    assert nx.is_strongly_connected(g)
    assert set(p.device_nodes) == {d.name for d in devs}
    for d in devs:
        (hop,) = g.successors(d.name)
        assert g.edges[d.name, hop]["bandwidth_bps"] == pytest.approx(ACCESS[d.tech].uplink_bps * d.up_factor)
        assert g.edges[hop, d.name]["bandwidth_bps"] == pytest.approx(ACCESS[d.tech].downlink_bps * d.down_factor)
    for _, _, e in g.edges(data=True):
        assert e["bandwidth_bps"] > 0 and math.isfinite(e["latency_s"]) and e["latency_s"] >= 0
    infra = {"star": 0, "two_tier": 2 * gateways}
    if kind in infra:
        assert g.number_of_edges() == 2 * len(devs) + infra[kind]
    else:
        routers_g = g.subgraph([f"r-{i}" for i in range(routers)])
        assert nx.is_strongly_connected(routers_g)


@settings(max_examples=40, deadline=None)
@given(rates=st.lists(st.tuples(st.floats(1, 1e10), st.floats(1, 1e10) | st.none(), st.floats(0, 1)),
                      min_size=1, max_size=8))
def test_graphml_orientation_round_trip(tmp_path_factory, rates):
    """Every undirected edge keeps source->target = bandwidth_bps, target->source = reverse (or the same)."""
    nodes = '<node id="s"><data key="k">server</data></node>' + "".join(
        f'<node id="n{i}"><data key="k">device</data></node>' for i in range(len(rates)))
    edges = []
    for i, (bw, rev, lat) in enumerate(rates):
        src, dst = (f"n{i}", "s") if i % 2 == 0 else ("s", f"n{i}")
        extra = "" if rev is None else f'<data key="br">{rev!r}</data>'
        edges.append(f'<edge source="{src}" target="{dst}"><data key="b">{bw!r}</data>{extra}'
                     f'<data key="l">{lat!r}</data></edge>')
    path = write_graphml(tmp_path_factory.mktemp("g") / "r.graphml", nodes + "".join(edges))
    g = load_graphml(path)
    for i, (bw, rev, lat) in enumerate(rates):
        src, dst = (f"n{i}", "s") if i % 2 == 0 else ("s", f"n{i}")
        assert g.edges[src, dst]["bandwidth_bps"] == bw
        assert g.edges[dst, src]["bandwidth_bps"] == (bw if rev is None else rev)
        assert g.edges[src, dst]["latency_s"] == g.edges[dst, src]["latency_s"] == lat
