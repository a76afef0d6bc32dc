"""Split models: a small network cut into a client part and a server part.

A model is a list of *layers* (each an ``nn.Sequential`` block); the client runs layers
``[0:cut]`` and the server runs ``[cut:]`` (split learning, Gupta & Raskar 2018; Vepakomma
et al. 2018). Families:

``cnn`` (inputs ``(C, H, W)``)
    block ``i`` = ``Conv2d(c_in, width*2**i, 3, padding=1)`` + ReLU + ``MaxPool2d(2)``, added
    while the pooled size stays >= 2 (at most :data:`MAX_BLOCKS`), then a head
    ``Flatten + Linear(-> num_classes)``. 8x8 digits: 2 blocks + head (3 layers);
    28x28 MNIST and 32x32 CIFAR: 3 blocks + head (4 layers).
``mlp`` (any input)
    ``Flatten + Linear(d, 4*width) + ReLU``, ``Linear(4*width, 4*width) + ReLU``,
    ``Linear(4*width, num_classes)`` (3 layers).
``cnn1d`` (inputs ``(C, L)``)
    block ``i`` = ``Conv1d(c_in, width*2**i, 5, padding=2)`` + ReLU + ``MaxPool1d(2)`` while the
    pooled length stays >= 2 (at most :data:`MAX_BLOCKS`), then ``Flatten + Linear``.
    MNIST-1D (length 40): 3 blocks + head (4 layers).
``auto``
    ``cnn`` for ``(C, H, W)`` with ``H, W >= 8``, ``cnn1d`` for ``(C, L)``, else ``mlp``.

Initialisation never touches torch's global RNG: modules are built on the ``meta`` device,
materialised with ``to_empty`` and filled from the caller's :class:`torch.Generator` with
torch's own default rule for Linear/Conv (``kaiming_uniform_(a=sqrt(5))`` for weights,
i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and the same bound for biases). The same
generator state therefore gives bit-identical weights.

**Mixed datasets** (``partition.kind = mixed``): clients of different datasets need
different client parts but must feed one server. :func:`build_mixed_models` gives each
dataset a backbone = its family's layers ``[0:cut]`` + ``Flatten`` + ``Linear(-> 4*width)``
+ ReLU, so the cut is always a flat ``4*width`` vector; the server is an MLP on that vector
(``Linear(4w, 4w) + ReLU``, ``Linear(4w, num_classes)``). This is the per-client-head
design of shared research note A.5 item 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from simkit.errors import WorkloadError

__all__ = [
    "FAMILIES", "MAX_BLOCKS", "SplitModel", "MixedModels", "resolve_family", "layer_count",
    "build_split_model", "build_client_backbone", "build_mixed_models", "init_parameters", "model_bytes",
]

#: model families build_split_model knows (plus "auto")
FAMILIES: tuple[str, ...] = ("cnn", "mlp", "cnn1d")
#: most convolution blocks a cnn / cnn1d stacks, to keep CPU runs small
MAX_BLOCKS = 3

_F_CUT = "workload.model.cut"
_F_FAMILY = "workload.model.family"
# Layers are constructed on the CPU inside ``torch.random.fork_rng`` (torch's default init draws
# from the global RNG; fork_rng restores its state afterwards), then re-initialised from the run's
# own generator. (Constructing on the meta device and materialising with ``to_empty`` would avoid
# the throw-away init, but ``to_empty`` imports torch's meta machinery: ~1.5 s per process.)
_META = torch.device("cpu")


# --------------------------------------------------------------------------- families
def resolve_family(family: str, input_shape: Sequence[int]) -> str:
    """The concrete family for ``family`` (``auto`` picks by input shape); validates the pair."""
    shape = tuple(int(d) for d in input_shape)
    if family == "auto":
        if len(shape) == 3 and shape[1] >= 8 and shape[2] >= 8:
            return "cnn"
        if len(shape) == 2:
            return "cnn1d"
        return "mlp"
    if family not in FAMILIES:
        raise WorkloadError(f"unknown model family {family!r}; choose auto, {', '.join(FAMILIES)}", field=_F_FAMILY)
    if family == "cnn" and (len(shape) != 3 or min(shape[1:]) < 4):
        raise WorkloadError(f"family 'cnn' needs image inputs (C, H, W) with H, W >= 4, got {shape}", field=_F_FAMILY)
    if family == "cnn1d" and (len(shape) != 2 or shape[1] < 4):
        raise WorkloadError(f"family 'cnn1d' needs signal inputs (C, L) with L >= 4, got {shape}", field=_F_FAMILY)
    return family


def _layers(family: str, shape: tuple[int, ...], num_classes: int, width: int) -> list[nn.Sequential]:
    """The layer stack of a family (torch's global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        return _layers_unseeded(family, shape, num_classes, width)


def _layers_unseeded(family: str, shape: tuple[int, ...], num_classes: int, width: int) -> list[nn.Sequential]:
    if width < 1:
        raise WorkloadError(f"width must be >= 1, got {width}", field="workload.model.width")
    if num_classes < 1:
        raise WorkloadError(f"num_classes must be >= 1, got {num_classes}", field="workload.dataset")
    dev = _META
    layers: list[nn.Sequential] = []
    if family == "mlp":
        d = math.prod(shape)
        h = 4 * width
        layers.append(nn.Sequential(nn.Flatten(), nn.Linear(d, h, device=dev), nn.ReLU()))
        layers.append(nn.Sequential(nn.Linear(h, h, device=dev), nn.ReLU()))
        layers.append(nn.Sequential(nn.Linear(h, num_classes, device=dev)))
        return layers
    if family == "cnn":
        c, h, w = shape
        i = 0
        while i < MAX_BLOCKS and h // 2 >= 2 and w // 2 >= 2:
            out = width * 2**i
            layers.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1, device=dev), nn.ReLU(), nn.MaxPool2d(2)))
            c, h, w, i = out, h // 2, w // 2, i + 1
        flat = c * h * w
    elif family == "cnn1d":
        c, length = shape
        i = 0
        while i < MAX_BLOCKS and length // 2 >= 2:
            out = width * 2**i
            layers.append(nn.Sequential(nn.Conv1d(c, out, 5, padding=2, device=dev), nn.ReLU(), nn.MaxPool1d(2)))
            c, length, i = out, length // 2, i + 1
        flat = c * length
    else:  # pragma: no cover - resolve_family rejects it
        raise WorkloadError(f"unknown model family {family!r}", field=_F_FAMILY)
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes, device=dev)))
    return layers


def layer_count(family: str, input_shape: Sequence[int]) -> int:
    """Number of layers of a family on an input shape (valid cuts are ``1..count-1``)."""
    fam = resolve_family(family, input_shape)
    return len(_layers(fam, tuple(int(d) for d in input_shape), 1, 1))


# --------------------------------------------------------------------------- initialisation
@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter of ``module`` from ``generator`` (in ``module.modules()`` order).

    Linear and Conv layers get torch's default rule (``U(+-1/sqrt(fan_in))`` for weight and
    bias, = ``kaiming_uniform_(a=sqrt(5))``) drawn from ``generator``; LayerNorm/BatchNorm/
    GroupNorm get weight 1, bias 0. Meta-device modules are materialised on the generator's
    device first. The global RNG is not used.

    Raises:
        TypeError: a module owns parameters of a kind this function does not know.
    """
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device=generator.device)
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.reset_running_stats()
        else:
            raise TypeError(f"init_parameters: no rule for {type(m).__name__}")
    return module


@torch.no_grad()
def _out_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape, from one forward pass of a zero sample on a CPU copy with
    uninitialised weights (``to_empty``: no RNG, no initialisation cost).

    Not traced on the ``meta`` device: a meta forward imports torch's decomposition machinery
    (dynamo, sympy; ~800 modules, 1-2 s), a start-up cost every process would pay."""
    import copy

    probe = copy.deepcopy(module).to_empty(device="cpu")
    return tuple(int(d) for d in probe(torch.zeros((1, *input_shape))).shape[1:])


def _to_meta_copy(module: nn.Module) -> nn.Module:
    if all(p.is_meta for p in module.parameters()):
        return module
    import copy

    return copy.deepcopy(module).to(_META)


# --------------------------------------------------------------------------- split model
@dataclass
class SplitModel:
    """A model cut in two at ``cut``.

    Attributes:
        client: layers ``[0:cut]`` (runs on the device).
        server: layers ``[cut:]`` (runs on the server); ends in class logits.
        family: the concrete family (``cnn``, ``mlp`` or ``cnn1d``).
        cut: the cut layer index.
        num_layers: total number of layers (valid cuts are ``1..num_layers-1``).
        input_shape: per-sample input shape.
        cut_shape: per-sample shape of the activation at the cut ("smashed data").
        num_classes: number of output classes.
    """

    client: nn.Module
    server: nn.Module
    family: str
    cut: int
    num_layers: int
    input_shape: tuple[int, ...]
    cut_shape: tuple[int, ...]
    num_classes: int

    def whole(self) -> nn.Sequential:
        """``nn.Sequential(client, server)``: the full model, sharing the same parameters."""
        return nn.Sequential(self.client, self.server)


def _check_cut(cut: int, n: int, what: str) -> None:
    if not 1 <= cut <= n - 1:
        raise WorkloadError(f"cut layer {cut} is out of range for {what}: it has {n} layers, so cut must be "
                            f"between 1 and {n - 1}", field=_F_CUT)


def build_split_model(
    family: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    cut: int,
    width: int,
    generator: torch.Generator,
) -> SplitModel:
    """Build a split model of ``family`` on ``input_shape``, cut after layer ``cut``.

    Args:
        family: ``auto``, ``cnn``, ``mlp`` or ``cnn1d`` (see the module docstring).
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        num_classes: size of the output layer.
        cut: number of layers on the client, ``1..num_layers-1``.
        width: channels of the first conv block (doubling per block); MLP hidden size is ``4*width``.
        generator: the only source of the initial weights (CPU generator -> CPU parameters).

    Raises:
        WorkloadError: ``cut`` out of range (``workload.model.cut``, with the valid range) or a
            family that does not fit the input (``workload.model.family``).
    """
    shape = tuple(int(d) for d in input_shape)
    fam = resolve_family(family, shape)
    layers = _layers(fam, shape, int(num_classes), int(width))
    _check_cut(int(cut), len(layers), f"the {fam} model on input {shape}")
    client = nn.Sequential(*layers[:cut])
    server = nn.Sequential(*layers[cut:])
    cut_shape = _out_shape(client, shape)
    init_parameters(client, generator)
    init_parameters(server, generator)
    return SplitModel(client=client, server=server, family=fam, cut=int(cut), num_layers=len(layers),
                      input_shape=shape, cut_shape=cut_shape, num_classes=int(num_classes))


# --------------------------------------------------------------------------- mixed datasets
def build_client_backbone(
    family_or_auto: str,
    input_shape: Sequence[int],
    cut_shape: Sequence[int],
    *,
    width: int,
    generator: torch.Generator,
    cut: int = 1,
) -> nn.Module:
    """A client part for ``input_shape`` whose output has exactly ``cut_shape`` per sample.

    The backbone is the family's layers ``[0:cut]`` followed by ``Flatten``,
    ``Linear(-> prod(cut_shape))``, ReLU and (for a multi-dimensional ``cut_shape``) an
    ``Unflatten``. Used to let clients of different modalities feed one server.

    Raises:
        WorkloadError: ``cut`` outside ``1..layers-1`` of that family on that input.
    """
    shape = tuple(int(d) for d in input_shape)
    target = tuple(int(d) for d in cut_shape)
    fam = resolve_family(family_or_auto, shape)
    layers = _layers(fam, shape, 1, int(width))
    _check_cut(int(cut), len(layers), f"the {fam} backbone on input {shape}")
    body = nn.Sequential(*layers[:cut])
    flat = math.prod(_out_shape(body, shape))
    with torch.random.fork_rng(devices=[]):
        proj = nn.Linear(flat, math.prod(target), device=_META)
    parts: list[nn.Module] = [*body, nn.Flatten(), proj, nn.ReLU()]
    if len(target) > 1:
        parts.append(nn.Unflatten(1, target))
    return init_parameters(nn.Sequential(*parts), generator)


class MixedModels(NamedTuple):
    """What :func:`build_mixed_models` returns (unpacks as a 3-tuple)."""

    client_factory: dict[str, Callable[[], nn.Module]]
    server: nn.Module
    cut_shape: tuple[int, ...]


def build_mixed_models(
    datasets: Mapping[str, Sequence[int]],
    num_classes: int,
    *,
    cut: int,
    width: int,
    generator: torch.Generator,
    family: str = "auto",
) -> MixedModels:
    """Per-dataset client backbones and one shared server for the ``mixed`` partition.

    The cut is a flat vector of ``4*width`` features (see the module docstring). Each
    dataset's backbone seed is drawn from ``generator`` in sorted-name order, then the server
    is initialised from ``generator``; every call of a factory returns a *new* module with the
    *same* initial weights (clients of one group start from a common point, as in FedAvg).

    Args:
        datasets: dataset name -> per-sample input shape.
        num_classes: server output size (the largest class count of the datasets).
        cut: backbone layers before the projection, valid for every dataset's family.
        width: as in :func:`build_split_model`.
        generator: source of all initial weights.
        family: ``auto`` (per dataset) or one family for all.

    Raises:
        WorkloadError: ``cut`` out of range for some dataset (the message gives each range).
    """
    if not datasets:
        raise WorkloadError("mixed models need at least one dataset", field="workload.partition.datasets")
    cut_shape = (4 * int(width),)
    ranges = {name: layer_count(family, shape) - 1 for name, shape in datasets.items()}
    if not all(1 <= cut <= hi for hi in ranges.values()):
        allowed = ", ".join(f"{n}: 1..{hi}" for n, hi in ranges.items())
        raise WorkloadError(f"cut layer {cut} is out of range for the mixed backbones ({allowed}); "
                            f"use 1..{min(ranges.values())}", field=_F_CUT)
    factories: dict[str, Callable[[], nn.Module]] = {}
    for name in sorted(datasets):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        factories[name] = _backbone_factory(family, tuple(datasets[name]), cut_shape, int(width), int(cut), seed,
                                            generator.device)
    h = cut_shape[0]
    with torch.random.fork_rng(devices=[]):
        server = nn.Sequential(
            nn.Sequential(nn.Linear(h, h, device=_META), nn.ReLU()),
            nn.Sequential(nn.Linear(h, int(num_classes), device=_META)),
        )
    init_parameters(server, generator)
    return MixedModels({n: factories[n] for n in datasets}, server, cut_shape)


def _backbone_factory(family, shape, cut_shape, width, cut, seed, device) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return build_client_backbone(family, shape, cut_shape, width=width, generator=g, cut=cut)

    return make


# --------------------------------------------------------------------------- sizes
def model_bytes(module: nn.Module) -> int:
    """Bytes of ``module.state_dict()``: sum of ``numel * element_size`` over parameters and buffers.

    This is the payload of sending the weights (FedAvg/SplitFed sync), without framing overhead.
    """
    return int(sum(t.numel() * t.element_size() for t in module.state_dict().values()))
