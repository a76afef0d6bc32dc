"""Faults injected into the simulated world at given simulated times (scenario ``faults:``).

Each fault acts only through the world's own mechanisms, so every algorithm sees it the same way:

- ``crash``: ``device.power_off(permanent=True)``: running computes raise ``DeviceOff`` in the
  waiting process, the device's flows are aborted (partial transfers are not delivered), its
  energy stops at the crash instant. A ``crash`` dropout is recorded.
- ``server_down``: the server takes all its slots at high priority: work already running
  finishes, new requests queue (FIFO, by arrival) and are served from ``to_s``. Transfers still
  arrive. Clients therefore *wait*; an algorithm whose clients have local work (AdaSplit) keeps
  it going.
- ``straggler``: ``device.slowdown = factor`` for computes starting in the interval.
- ``link_down``: the network's link failure (flows reroute or stall, then resume).
- ``battery``: a battery of the given capacity on that device (it goes off for good when empty).

Random crash times and victims are drawn from the run's seed tree (``faults.crash.<i>``).
"""

from __future__ import annotations

import simpy

from simkit.config import BatteryFault, CrashFault, LinkDownFault, ServerDownFault, StragglerFault
from simkit.errors import ConfigError
from simkit.rng import SeedTree


def install_faults(world, faults, seeds: SeedTree) -> None:
    """Schedule every fault of the scenario on ``world`` (a :class:`~simkit.world.fleet.World`)."""
    env = world.env
    devices = world.devices
    for i, f in enumerate(faults):
        field = f"faults.{i}"
        if isinstance(f, CrashFault):
            if f.device is not None:
                _check_device(world, f.device, field)
                env.process(_crash(env, world, devices[f.device], f.at_s))
            else:
                rng = seeds.numpy(f"faults.crash.{i}")
                names = list(world.clients)
                k = max(1, round(f.fraction * len(names)))
                victims = sorted(rng.choice(len(names), size=k, replace=False).tolist())
                times = rng.uniform(f.between_s[0], f.between_s[1], size=k)
                for v, t in zip(victims, times):
                    env.process(_crash(env, world, devices[names[v]], float(t)))
        elif isinstance(f, ServerDownFault):
            if f.to_s <= f.from_s:
                raise ConfigError("to_s must be later than from_s", field=f"{field}.to_s")
            env.process(_server_down(env, world, f.from_s, f.to_s))
        elif isinstance(f, StragglerFault):
            _check_device(world, f.device, field)
            env.process(_straggle(env, devices[f.device], f.factor, f.from_s, f.to_s))
        elif isinstance(f, LinkDownFault):
            u, v = f.link
            if not world.placement.graph.has_edge(u, v):
                raise ConfigError(f"no link {u!r}-{v!r} in the topology", field=f"{field}.link")
            world.network.schedule_link_failure(u, v, f.from_s, f.to_s)
        elif isinstance(f, BatteryFault):
            _check_device(world, f.device, field)
            dev = devices[f.device]
            dev.meter.battery_j = f.capacity_j
            if dev.meter.on_empty is None:
                def empty(dev=dev):
                    world.recorder.dropout(dev.name, env.now, "battery_empty", f"{dev.meter.battery_j:.6g} J used")
                    dev.power_off("battery_empty", permanent=True)
                dev.meter.on_empty = empty
            dev.meter._schedule_empty()


def _check_device(world, name: str, field: str) -> None:
    if name not in world.devices:
        known = ", ".join(list(world.devices)[:6])
        raise ConfigError(f"unknown device {name!r} (devices are named like {known}, ...)", field=f"{field}.device")


def _crash(env: simpy.Environment, world, dev, at: float):
    if at > env.now:
        yield env.timeout(at - env.now)
    if not dev.dead:
        world.recorder.dropout(dev.name, env.now, "crash", "fault")
        dev.power_off("crash", permanent=True)


def _server_down(env, world, start: float, end: float):
    server = world.server
    if start > env.now:
        yield env.timeout(start - env.now)
    for _ in range(server.slots):  # take every slot, ahead of queued work, as running work ends
        ev = server.acquire(priority=True)
        if ev is not None:
            yield ev
    world.recorder.state(server.name, env.now, "down", "server_down fault")
    if end > env.now:
        yield env.timeout(end - env.now)
    for _ in range(server.slots):
        server.release()
    world.recorder.state(server.name, env.now, "up", "server_down fault")


def _straggle(env, dev, factor: float, start: float, end: float | None):
    if start > env.now:
        yield env.timeout(start - env.now)
    dev.slowdown = factor
    dev.recorder.state(dev.name, env.now, "straggler", f"x{factor:g}")
    if end is not None:
        yield env.timeout(max(0.0, end - env.now))
        dev.slowdown = 1.0
        dev.recorder.state(dev.name, env.now, "straggler_end", "")
