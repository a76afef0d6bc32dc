"""Validated, frozen specs: device profiles, access technologies, topology, fleet, workload,
algorithm, budgets and the scenario that holds them all.

Files are loaded once, at the edge, into these pydantic models (``extra="forbid"``: unknown
keys are errors; NaN and infinities are rejected). Any validation failure is turned into one
:class:`~simkit.errors.SimkitError` subclass naming the file, the dotted field and the problem.

A spec is not state (STYLE.md #9): the world and the workload build live objects from it, so
one spec serves every point of a sweep.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from simkit.errors import ConfigError, ProfileError, SimkitError

#: repository folders shipped next to the package (editable install / source checkout)
REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = Path(os.environ.get("SIMKIT_PROFILES_DIR", REPO_ROOT / "device_profiles"))
TOPOLOGIES_DIR = Path(os.environ.get("SIMKIT_TOPOLOGIES_DIR", REPO_ROOT / "topologies"))

def _no_bool(value: Any) -> Any:
    """YAML's ``yes``/``true`` must not pass as the number 1."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


PositiveFloat = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]
NonNegFloat = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]


class Spec(BaseModel):
    """Base of every spec: frozen, no unknown keys, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)


# --------------------------------------------------------------------------- device profiles
class PowerSpec(Spec):
    """Electrical power of one device, in watts.

    ``idle_w`` is drawn whenever the device is on; the others are *increments* on top of idle
    while the device is in that state (DESIGN.md §2):
    P = idle + compute*[computing] + tx*[sending] + rx*[receiving] (+ radio tail, see AccessSpec).
    """

    idle_w: NonNegFloat
    compute_w: NonNegFloat


class DeviceProfile(Spec):
    """One device class (``device_profiles/NAME.yaml``).

    Compute time of ``flops`` FLOPs that write ``bytes`` of tensor data in ``kernels`` kernels
    (all counted by :func:`simkit.learning.flops.count_flops`) is

        flops / (peak_flops * efficiency) + bytes / traffic_bytes_per_s
            + step_overhead_s + kernels * kernel_overhead_s

    (``docs/model.md#compute``). The last three terms are optional: without
    ``traffic_bytes_per_s`` memory traffic costs nothing and the model is the pure FLOP-rate one.
    ``simkit calibrate`` measures all of them on a host.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    peak_flops: PositiveFloat  # FP32 FLOP/s
    efficiency: Annotated[float, Field(gt=0, le=1)]
    memory_bytes: PositiveFloat
    step_overhead_s: NonNegFloat = 0.0
    traffic_bytes_per_s: PositiveFloat | None = None   # effective rate of the bytes ops write; None: not modelled
    kernel_overhead_s: NonNegFloat = 0.0               # fixed cost per kernel (ATen op) a compute runs
    power: PowerSpec
    default_access: str = "wifi"
    battery_j: PositiveFloat | None = None
    kind: Literal["client", "server"] = "client"
    sources: dict[str, str] = Field(default_factory=dict)

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.efficiency


# --------------------------------------------------------------------------- access technologies
class AccessSpec(Spec):
    """An access-link technology: its rates, latency and the radio power it costs the device.

    ``tx_w``/``rx_w`` are power increments on the device while it sends/receives over this
    technology; after the last transfer ends a cellular radio stays in a high-power state for
    ``tail_s`` seconds at ``tail_w`` (Huang et al., MobiSys 2012), unless a new transfer starts.
    """

    uplink_bps: PositiveFloat
    downlink_bps: PositiveFloat
    latency_s: NonNegFloat
    tx_w: NonNegFloat
    rx_w: NonNegFloat
    tail_w: NonNegFloat = 0.0
    tail_s: NonNegFloat = 0.0


#: Defaults; every number's source is in docs/network-and-energy.md. Scenario files may override
#: any field with ``topology.access.<tech>.<field>``.
DEFAULT_ACCESS: dict[str, dict[str, float]] = {
    # Pi 4/5 iperf to LAN 108-186 Mbps (sbc-reviews); LAN RTT a few ms; radio power from
    # Huang et al. 2012 Wi-Fi model at 6 Mbps: 0.13+0.28*6 W up, 0.13+0.137*6 W down.
    "wifi": dict(uplink_bps=100e6, downlink_bps=100e6, latency_s=0.005, tx_w=1.8, rx_w=0.95, tail_w=0.0, tail_s=0.0),
    # LTE median 13 Mbps down / 6 Mbps up (Huang et al. 2012), 50 ms (Opensignal US 2019: 44-66 ms);
    # power 1.29+0.44*6 W up, 1.29+0.052*13 W down, tail ~11.6 s at ~1 W (Huang et al. 2012).
    "lte": dict(uplink_bps=6e6, downlink_bps=13e6, latency_s=0.05, tx_w=3.9, rx_w=1.96, tail_w=1.0, tail_s=11.6),
    # 5G median 166 down / 21 up Mbps (Ookla Q3 2021); latency like LTE in early deployments
    # (Opensignal); radio power assumed LTE-like (low confidence, documented).
    "5g": dict(uplink_bps=21e6, downlink_bps=166e6, latency_s=0.03, tx_w=4.5, rx_w=2.5, tail_w=1.0, tail_s=10.0),
    # GbE measured 938 Mbps (Pi 4/5, sbc-reviews), sub-ms LAN latency; PHY power ~0.1 W (estimate).
    "ethernet": dict(uplink_bps=940e6, downlink_bps=940e6, latency_s=0.0005, tx_w=0.1, rx_w=0.1, tail_w=0.0, tail_s=0.0),
}


# --------------------------------------------------------------------------- topology
class LinkFailure(Spec):
    """Link ``link=[u, v]`` (both directions) is down from ``down_at_s`` until ``up_at_s`` (simulated s)."""

    link: tuple[str, str]
    down_at_s: NonNegFloat
    up_at_s: NonNegFloat | None = None

    @model_validator(mode="after")
    def _order(self):
        if self.up_at_s is not None and self.up_at_s <= self.down_at_s:
            raise ValueError("up_at_s must be later than down_at_s")
        return self


class TopologySpec(Spec):
    """Which graph the fleet lives on.

    kinds: ``star`` (every device one access link to the server), ``two_tier`` (devices ->
    ``gateways`` edge gateways -> cloud server), ``random_geometric`` (seeded unit-square graph
    of routers, devices attach to the nearest router), ``file`` (GraphML at ``path``).
    """

    kind: Literal["star", "two_tier", "random_geometric", "file"] = "two_tier"
    path: str | None = None
    gateways: Annotated[int, Field(ge=1)] = 2
    routers: Annotated[int, Field(ge=1)] = 8
    radius: Annotated[float, Field(gt=0)] = 0.5
    backhaul_bps: PositiveFloat = 1e9
    backhaul_latency_s: NonNegFloat = 0.005
    core_bps: PositiveFloat = 10e9
    core_latency_s: NonNegFloat = 0.01
    access: dict[str, dict[str, float]] = Field(default_factory=dict)
    failures: list[LinkFailure] = Field(default_factory=list)

    @model_validator(mode="after")
    def _path_for_file(self):
        if self.kind == "file" and not self.path:
            raise ValueError("topology kind 'file' needs 'path'")
        for name, fields in self.access.items():
            base = {**DEFAULT_ACCESS.get(name, {}), **fields}
            try:
                AccessSpec(**base)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ()))
                raise ValueError(f"access.{name}.{where}: {err.get('msg')} (got {err.get('input')!r})") from None
        return self

    def access_specs(self) -> dict[str, AccessSpec]:
        """Default access technologies with this scenario's overrides applied (validated)."""
        out = {}
        names = set(DEFAULT_ACCESS) | set(self.access)
        for name in sorted(names):
            base = dict(DEFAULT_ACCESS.get(name, {}))
            base.update(self.access.get(name, {}))
            try:
                out[name] = AccessSpec(**base)
            except ValidationError as exc:
                raise _from_validation(exc, prefix=f"topology.access.{name}") from None
        return out


# --------------------------------------------------------------------------- fleet and availability
class AvailabilitySpec(Spec):
    """When devices are on.

    kinds: ``always``; ``dropout`` (each device independently misses each round with probability
    ``dropout_p``, seeded); ``trace`` (on/off windows from the CSV at ``trace``: columns
    ``device,start_s,end_s`` listing *on* windows; a device absent from the trace is always on).
    Batteries are separate (``FleetSpec.battery_j`` or the profile's ``battery_j``).
    """

    kind: Literal["always", "dropout", "trace"] = "always"
    dropout_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    trace: str | None = None

    @model_validator(mode="after")
    def _trace_path(self):
        if self.kind == "trace" and not self.trace:
            raise ValueError("availability kind 'trace' needs 'trace' (a CSV path)")
        return self


class FleetSpec(Spec):
    """How many devices of which profiles, on which access technology.

    Give either ``counts`` (profile -> number) or ``size`` with ``shares`` (profile -> fraction;
    turned into counts by the largest-remainder rule, deterministically). Devices are named
    ``<profile>-<i>`` in profile order. ``access`` maps a profile to a technology (default: the
    profile's ``default_access``). ``speed_jitter``/``bandwidth_jitter`` are sigmas of a seeded
    lognormal factor (median 1) per device.
    """

    counts: dict[str, Annotated[int, Field(ge=0)]] | None = None
    size: Annotated[int, Field(ge=1)] | None = None
    shares: dict[str, NonNegFloat] | None = None
    access: dict[str, str] = Field(default_factory=dict)
    speed_jitter: NonNegFloat = 0.0
    bandwidth_jitter: NonNegFloat = 0.0
    battery_j: dict[str, PositiveFloat] = Field(default_factory=dict)
    availability: AvailabilitySpec = Field(default_factory=AvailabilitySpec)

    @model_validator(mode="after")
    def _counts_or_shares(self):
        if self.counts is None and self.shares is None:
            raise ValueError("give 'counts' or 'size' with 'shares'")
        if self.counts is not None and self.shares is not None:
            raise ValueError("give 'counts' or 'shares', not both")
        if self.shares is not None:
            if self.size is None:
                raise ValueError("'shares' needs 'size'")
            if sum(self.shares.values()) <= 0:
                raise ValueError("'shares' must not all be zero")
        if sum(self.resolved_counts().values()) == 0:
            raise ValueError("the fleet is empty")
        return self

    def resolved_counts(self) -> dict[str, int]:
        """profile -> number of devices (shares resolved by largest remainder)."""
        if self.counts is not None:
            return {k: v for k, v in self.counts.items()}
        total = sum(self.shares.values())
        raw = {k: self.size * v / total for k, v in self.shares.items()}
        counts = {k: int(math.floor(x)) for k, x in raw.items()}
        left = self.size - sum(counts.values())
        order = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))
        for k in order[:left]:
            counts[k] += 1
        return counts


class ServerSpec(Spec):
    """The server: a device with ``slots`` parallel workers and a FIFO queue."""

    profile: str = "server-t4"
    slots: Annotated[int, Field(ge=1)] = 1
    access: str = "ethernet"


# --------------------------------------------------------------------------- workload
class PartitionSpec(Spec):
    """How data are split over clients (seeded).

    ``iid``; ``dirichlet`` (label skew with concentration ``alpha``); ``label_groups`` (each client
    sees only ``classes_per_client`` classes); ``mixed`` (client groups hold different datasets,
    listed in ``datasets``, round-robin over clients in contiguous blocks).
    """

    kind: Literal["iid", "dirichlet", "label_groups", "mixed"] = "iid"
    alpha: PositiveFloat = 0.5
    classes_per_client: Annotated[int, Field(ge=1)] = 2
    datasets: list[str] = Field(default_factory=lambda: ["mnist5k", "digits", "mnist1d"])


class ModelSpec(Spec):
    """The split model: family (``auto`` picks by input shape), cut layer, width."""

    family: Literal["auto", "cnn", "mlp", "cnn1d"] = "auto"
    cut: Annotated[int, Field(ge=1)] = 1
    width: Annotated[int, Field(ge=1)] = 16


class WorkloadSpec(Spec):
    """What is learned: data, partition, model, batch and the torch device to use.

    ``samples_per_client`` (fast what-if mode only, ``train: false``): give every client this many
    samples instead of partitioning the real dataset, so fleets larger than the dataset can be
    planned. Without it the fast mode partitions the real data and gets the same sizes as training.
    """

    dataset: str = "digits"
    data_path: str | None = None
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    batch_size: Annotated[int, Field(ge=1)] = 32
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    max_samples: Annotated[int, Field(ge=1)] | None = None
    samples_per_client: Annotated[int, Field(ge=2)] | None = None
    torch_device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"


# --------------------------------------------------------------------------- algorithms
class _AlgorithmBase(Spec):
    rounds: Annotated[int, Field(ge=1)] = 3
    local_epochs: Annotated[int, Field(ge=1)] = 1
    lr: NonNegFloat = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_accuracy: Annotated[float, Field(gt=0, le=1)] = 0.8
    eval_every: Annotated[int, Field(ge=1)] = 1
    message_overhead_bytes: Annotated[int, Field(ge=0)] = 64
    batched: Literal["off", "on", "auto"] = "off"


class FedAvgSpec(_AlgorithmBase):
    """FedAvg (McMahan et al. 2017); ``mu > 0`` adds FedProx's proximal term (Li et al. 2020)."""

    name: Literal["fedavg", "fedprox"]
    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    mu: NonNegFloat = 0.0


class SLSpec(_AlgorithmBase):
    """Vanilla split learning (Gupta & Raskar 2018): clients take turns, weights relayed."""

    name: Literal["sl"]


class SplitFedSpec(_AlgorithmBase):
    """SplitFed (Thapa et al. 2022). ``v1``: clients in parallel, a server copy per client, both
    halves averaged each round. ``v2``: one shared server part trained in request-arrival order."""

    name: Literal["splitfed"]
    variant: Literal["v1", "v2"] = "v1"


class AdaSplitSpec(_AlgorithmBase):
    """AdaSplit (Chopra et al. 2021), options as in shared ADASPLIT.md."""

    name: Literal["adasplit"]
    kappa: Annotated[float, Field(ge=0, le=1)] = 0.75
    eta: Annotated[float, Field(gt=0, le=1)] = 0.3
    lambda_: Annotated[float, Field(ge=0, alias="lambda")] = 1e-6
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.85
    selection: Literal["ucb", "random"] = "ucb"
    return_gradients: bool = True
    masks: bool = True
    sparse_payload: bool = False
    temperature: PositiveFloat = 0.1
    embedding_dim: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: NonNegFloat = 1e-3


AlgorithmSpec = Annotated[Union[FedAvgSpec, SLSpec, SplitFedSpec, AdaSplitSpec], Field(discriminator="name")]
ALGORITHMS = ("fedavg", "fedprox", "sl", "splitfed", "adasplit")


# --------------------------------------------------------------------------- faults
class CrashFault(Spec):
    """Devices crash for good: the named ``device`` at ``at_s``, or a seeded random ``fraction`` of
    the clients, each at a uniform random time in ``between_s``. Work in progress is lost, flows
    are aborted (not delivered), energy up to the crash is counted."""

    kind: Literal["crash"]
    device: str | None = None
    at_s: NonNegFloat | None = None
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    between_s: tuple[NonNegFloat, NonNegFloat] = (0.0, 60.0)

    @model_validator(mode="after")
    def _one_way(self):
        if (self.device is None) == (self.fraction is None):
            raise ValueError("give either 'device' with 'at_s', or 'fraction' with 'between_s'")
        if self.device is not None and self.at_s is None:
            raise ValueError("'device' needs 'at_s'")
        if self.between_s[1] < self.between_s[0]:
            raise ValueError("between_s must be [earliest, latest]")
        return self


class ServerDownFault(Spec):
    """The server starts no new work from ``from_s`` to ``to_s`` (work already running finishes);
    requests queue and are served, in arrival order, when it is back."""

    kind: Literal["server_down"]
    from_s: NonNegFloat
    to_s: NonNegFloat


class StragglerFault(Spec):
    """``device`` computes ``factor`` times slower for computes that start in [from_s, to_s)."""

    kind: Literal["straggler"]
    device: str
    factor: Annotated[float, Field(gt=0)]
    from_s: NonNegFloat = 0.0
    to_s: NonNegFloat | None = None


class LinkDownFault(Spec):
    """Link ``link`` (both directions) is down from ``from_s`` to ``to_s`` (None: for good)."""

    kind: Literal["link_down"]
    link: tuple[str, str]
    from_s: NonNegFloat
    to_s: NonNegFloat | None = None


class BatteryFault(Spec):
    """``device`` runs on a battery of ``capacity_j`` joules (it goes off for good when empty)."""

    kind: Literal["battery"]
    device: str
    capacity_j: PositiveFloat


FaultSpec = Annotated[Union[CrashFault, ServerDownFault, StragglerFault, LinkDownFault, BatteryFault],
                      Field(discriminator="kind")]


# --------------------------------------------------------------------------- budgets and scenario
class BudgetSpec(Spec):
    """Resource budgets for the C3-Score (any may be left out)."""

    max_bytes: PositiveFloat | None = None
    max_client_flops: PositiveFloat | None = None
    max_client_energy_j: PositiveFloat | None = None
    max_time_s: PositiveFloat | None = None


class Scenario(Spec):
    """One simulated run: world + workload + algorithm + seed.

    ``train: false`` is the fast what-if mode: the identical protocol and costs, no tensors.
    Accuracy then comes from the learning-curve ``surrogate`` (a CSV written by
    :func:`simkit.surrogate.save_curves` from real runs of the same workload) and is labelled so.
    """

    @model_validator(mode="after")
    def _fast_mode_fields(self):
        if self.train and self.workload.samples_per_client is not None:
            raise ValueError("workload.samples_per_client is for the fast what-if mode (train: false) only")
        return self

    name: str = "scenario"
    seed: Annotated[int, Field(ge=0)] = 0
    train: bool = True
    fleet: FleetSpec
    server: ServerSpec = Field(default_factory=ServerSpec)
    topology: TopologySpec = Field(default_factory=TopologySpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    algorithm: AlgorithmSpec = Field(default_factory=lambda: FedAvgSpec(name="fedavg"))
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    torch_threads: Annotated[int, Field(ge=1)] | None = None
    record_timeline: bool = True
    surrogate: str | None = None
    faults: list[FaultSpec] = Field(default_factory=list)
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file this scenario was loaded from (None if built in Python)."""
        return self._source

    @field_validator("algorithm", mode="before")
    @classmethod
    def _known_algorithm(cls, value: Any):
        if isinstance(value, Mapping):
            name = value.get("name")
            if name is None:
                raise ValueError(f"missing 'name'; choose one of {', '.join(ALGORITHMS)}")
            if name not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
        return value


# --------------------------------------------------------------------------- loading
def _from_validation(exc: ValidationError, *, file: str | None = None, prefix: str = "",
                     cls: type[SimkitError] = ConfigError) -> SimkitError:
    """Turn pydantic's error list into one SimkitError naming file, field and reason."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    # pydantic puts the union tag into the location ('algorithm', 'adasplit', 'kappa'): drop it
    if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in ALGORITHMS:
        del loc[1]
    field = ".".join(([prefix] if prefix else []) + loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "missing":
        msg = "missing required field"
    if "input" in err and err.get("type") not in {"missing"} and not isinstance(err["input"], Mapping):
        msg = f"{msg} (got {err['input']!r})"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return cls(msg, file=file, field=field)


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def read_yaml(path: str | os.PathLike, *, cls: type[SimkitError] = ConfigError) -> dict:
    """Read a YAML mapping, with a clear error if the file is missing or not YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise cls("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise cls(f"cannot read file: {exc}", file=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise cls(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=str(path)) from None
    if not isinstance(data, dict):
        raise cls(f"expected a mapping at the top level, got {type(data).__name__}", file=str(path))
    return data


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """Load and validate one device profile YAML; the file stem must equal its ``name``."""
    data = read_yaml(path, cls=ProfileError)
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, file=str(path), cls=ProfileError) from None
    if Path(path).stem != profile.name:
        raise ProfileError(f"name {profile.name!r} does not match the file name", file=str(path), field="name")
    return profile


def load_profiles(directory: str | os.PathLike | None = None) -> dict[str, DeviceProfile]:
    """All profiles in ``directory`` (default: the shipped ``device_profiles/``), by name."""
    directory = Path(directory) if directory is not None else PROFILES_DIR
    if not directory.is_dir():
        raise ProfileError("profile folder not found", file=str(directory))
    return {p.stem: load_profile(p) for p in sorted(directory.glob("*.yaml"))}


def scenario_from_dict(data: Mapping[str, Any], *, file: str | None = None) -> Scenario:
    """Validate a scenario mapping; errors name ``file`` (if given), the field and the reason."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, file=file) from None


def load_scenario(path: str | os.PathLike) -> Scenario:
    """Load and validate a scenario YAML file. Relative paths inside resolve against its folder."""
    path = Path(path)
    data = read_yaml(path)
    data = _resolve_relative(data, path.parent)
    sc = scenario_from_dict(data, file=str(path))
    sc._source = str(path)
    return sc


def _resolve_relative(data: dict, base: Path) -> dict:
    """Make the file paths a scenario names relative to the scenario's folder, if they exist there."""
    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and (base / p).exists():
            return str(base / p)
        return p

    data = dict(data)
    if isinstance(data.get("topology"), Mapping):
        t = dict(data["topology"])
        if "path" in t:
            t["path"] = fix(t["path"])
        data["topology"] = t
    if isinstance(data.get("fleet"), Mapping):
        f = dict(data["fleet"])
        if isinstance(f.get("availability"), Mapping):
            a = dict(f["availability"])
            if "trace" in a:
                a["trace"] = fix(a["trace"])
            f["availability"] = a
        data["fleet"] = f
    if isinstance(data.get("surrogate"), str):
        data["surrogate"] = fix(data["surrogate"])
    if isinstance(data.get("workload"), Mapping) and "data_path" in data["workload"]:
        w = dict(data["workload"])
        w["data_path"] = fix(w["data_path"])
        data["workload"] = w
    return data


def as_scenario(scenario: "Scenario | Mapping[str, Any] | str | os.PathLike") -> Scenario:
    """A Scenario from a Scenario, a mapping, or a path to a scenario YAML."""
    if isinstance(scenario, Scenario):
        return scenario
    if isinstance(scenario, Mapping):
        return scenario_from_dict(scenario)
    return load_scenario(scenario)


def with_changes(scenario: Scenario, changes: Mapping[str, Any]) -> Scenario:
    """A new, validated scenario with dotted-path ``changes`` applied (``"algorithm.kappa": 0.5``)."""
    import copy

    data = scenario.model_dump(by_alias=True, exclude_none=False)
    old_algorithm = data["algorithm"]["name"]
    for dotted, value in changes.items():
        value = copy.deepcopy(value)  # never alias the caller's objects
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set a field inside a {type(node).__name__}", field=dotted)
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set a field inside a {type(node).__name__}", field=dotted)
        last = parts[-1]
        if last == "lambda_":
            last = "lambda"
        node[last] = value
    algo = data.get("algorithm")
    if isinstance(algo, dict) and algo.get("name") != old_algorithm and "algorithm" not in changes:
        # switching algorithm with 'algorithm.name': keep the options the new one shares with the
        # old (rounds, lr, ...) and drop those it does not have (e.g. FedAvg's fraction)
        new_cls = {"fedavg": FedAvgSpec, "fedprox": FedAvgSpec, "sl": SLSpec, "splitfed": SplitFedSpec,
                   "adasplit": AdaSplitSpec}.get(algo.get("name"))
        if new_cls is not None:
            allowed = {f.alias or k for k, f in new_cls.model_fields.items()}
            old = scenario.algorithm
            set_before = {old.model_fields[k].alias or k for k in old.model_fields_set}
            explicit = {d.split(".", 1)[1] for d in changes if d.startswith("algorithm.")}
            keep = (set_before | explicit | {"name"}) & allowed
            data["algorithm"] = {k: v for k, v in algo.items() if k in keep}
    out = scenario_from_dict(data, file=scenario.source)
    out._source = scenario.source
    return out
