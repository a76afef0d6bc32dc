"""Build the simulated world of one run from a scenario: devices, topology, network, energy.

This is the only place that turns world specs into live objects; algorithms receive the
:class:`World` and talk to it only through ``device.compute``, ``network.transfer``, the server's
slots and availability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import simpy

from simkit.config import PROFILES_DIR, DeviceProfile, Scenario, load_profiles
from simkit.errors import ConfigError, ProfileError, naming_file
from simkit.records import Recorder
from simkit.rng import SeedTree
from simkit.world.availability import Availability
from simkit.world.devices import Device
from simkit.world.energy import BatteryWatch, EnergyMeter
from simkit.world.network import Network
from simkit.world.topology import DeviceSlot, Placement, build_topology


@lru_cache(maxsize=8)
def _shipped_profiles(directory: str) -> dict[str, DeviceProfile]:
    return load_profiles(directory)


def get_profiles(directory: str | None = None) -> dict[str, DeviceProfile]:
    """The device profiles (shipped ones by default), loaded once per process."""
    return _shipped_profiles(str(directory or PROFILES_DIR))


@dataclass
class World:
    """The live world of one run."""

    env: simpy.Environment
    clients: dict[str, Device]
    server: Device
    network: Network
    placement: Placement
    recorder: Recorder
    availability: Availability
    devices: dict[str, Device] = field(default_factory=dict)

    @property
    def client_names(self) -> list[str]:
        return list(self.clients)

    def transfer(self, src: Device, dst: Device, nbytes: float, tag: str = ""):
        """Send ``nbytes`` from one device to another over the network (an event)."""
        return self.network.transfer(src.node, dst.node, nbytes, tag=tag)


def _world_view(env, clients, server, network, placement, recorder, devices):
    """A World without availability yet (faults need devices, network and placement only)."""
    return World(env=env, clients=clients, server=server, network=network, placement=placement,
                 recorder=recorder, availability=None, devices=devices)


def fleet_names(scenario: Scenario) -> list[tuple[str, str]]:
    """(device name, profile name) of every client, in fleet order."""
    out = []
    for profile, count in scenario.fleet.resolved_counts().items():
        out.extend((f"{profile}-{i}", profile) for i in range(count))
    return out


def build_world(scenario: Scenario, *, env: simpy.Environment, recorder: Recorder, seeds: SeedTree,
                profiles: dict[str, DeviceProfile] | None = None) -> World:
    """Construct devices, topology, network and energy meters for ``scenario``.

    Errors name the scenario's file when the problem is in the scenario itself.
    """
    with naming_file(scenario.source):
        return _build_world(scenario, env=env, recorder=recorder, seeds=seeds, profiles=profiles)


def _build_world(scenario: Scenario, *, env: simpy.Environment, recorder: Recorder, seeds: SeedTree,
                 profiles: dict[str, DeviceProfile] | None = None) -> World:
    profiles = profiles if profiles is not None else get_profiles()
    fleet = scenario.fleet
    access = scenario.topology.access_specs()

    names = fleet_names(scenario)
    if not names:
        raise ConfigError("the fleet is empty", field="fleet")
    for profile in fleet.resolved_counts():
        if profile not in profiles:
            raise ProfileError(f"unknown profile {profile!r}; known: {', '.join(sorted(profiles))}",
                               field=f"fleet.{'counts' if fleet.counts is not None else 'shares'}.{profile}")
    if scenario.server.profile not in profiles:
        raise ProfileError(f"unknown profile {scenario.server.profile!r}; known: {', '.join(sorted(profiles))}",
                           field="server.profile")
    for profile, tech in fleet.access.items():
        if tech not in access:
            raise ConfigError(f"unknown access technology {tech!r}; known: {', '.join(sorted(access))}",
                              field=f"fleet.access.{profile}")
    if scenario.server.access not in access:
        raise ConfigError(f"unknown access technology {scenario.server.access!r}", field="server.access")

    rng = seeds.numpy("fleet.jitter")
    n = len(names)
    speed = rng.lognormal(0.0, fleet.speed_jitter, n) if fleet.speed_jitter > 0 else [1.0] * n
    up = rng.lognormal(0.0, fleet.bandwidth_jitter, n) if fleet.bandwidth_jitter > 0 else [1.0] * n
    down = rng.lognormal(0.0, fleet.bandwidth_jitter, n) if fleet.bandwidth_jitter > 0 else [1.0] * n

    slots = []
    for i, (name, profile) in enumerate(names):
        tech = fleet.access.get(profile, profiles[profile].default_access)
        if tech not in access:
            raise ConfigError(f"profile {profile!r} defaults to unknown access technology {tech!r}",
                              field=f"fleet.access.{profile}")
        slots.append(DeviceSlot(name=name, tech=tech, up_factor=float(up[i]), down_factor=float(down[i])))

    placement = build_topology(scenario.topology, slots, server_name="server", server_tech=scenario.server.access,
                               access=access, rng=seeds.python("topology"))

    devices: dict[str, Device] = {}
    meters: dict = {}
    watch = BatteryWatch(env)   # one timeout for every battery's check

    def make(name: str, profile: DeviceProfile, node, tech: str, speed_factor: float, slots_n: int,
             battery: float | None) -> Device:
        radio = access[tech]
        meter = EnergyMeter(env, idle_w=profile.power.idle_w, compute_w=profile.power.compute_w,
                            tx_w=radio.tx_w, rx_w=radio.rx_w, tail_w=radio.tail_w, tail_s=radio.tail_s,
                            slots=slots_n, battery_j=battery, watch=watch)
        dev = Device(env, name, profile, node=node, meter=meter, recorder=recorder,
                     speed_factor=speed_factor, slots=slots_n, tech=tech)
        if battery is not None:
            def empty(dev=dev):
                recorder.dropout(dev.name, env.now, "battery_empty", f"{battery:.6g} J used")
                dev.power_off("battery_empty", permanent=True)
            meter.on_empty = empty
        meters[node] = meter
        devices[name] = dev
        return dev

    network = None  # bound below; the battery callback only runs once the simulation does
    clients = {}
    for i, (name, profile_name) in enumerate(names):
        profile = profiles[profile_name]
        battery = fleet.battery_j.get(profile_name, profile.battery_j)
        clients[name] = make(name, profile, placement.device_nodes[name], placement.tech_of.get(name, slots[i].tech),
                             float(speed[i]), 1, battery)
    server_profile = profiles[scenario.server.profile]
    server = make("server", server_profile, placement.server_node, scenario.server.access, 1.0,
                  scenario.server.slots, None)
    network = Network(env, placement.graph, recorder=recorder, meters=meters)
    for failure in scenario.topology.failures:
        u, v = failure.link
        if not placement.graph.has_edge(u, v):
            raise ConfigError(f"no link {u!r}-{v!r} in the topology", field="topology.failures.link")
        network.schedule_link_failure(u, v, failure.down_at_s, failure.up_at_s)

    from simkit.world.faults import install_faults

    install_faults(_world_view(env, clients, server, network, placement, recorder, devices), scenario.faults, seeds)
    availability = Availability(fleet.availability, scenario.seed, list(clients))
    for dev in clients.values():
        availability.trace_process(env, dev)
        dev.on_off_listeners.append(lambda d, on, reason: None if on else network.abort_flows(d.node))
    return World(env=env, clients=clients, server=server, network=network, placement=placement,
                 recorder=recorder, availability=availability, devices=devices)
