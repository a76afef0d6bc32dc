"""Split a dataset pool over clients (seeded), then each client's share into train and test.

Kinds (:class:`~simkit.config.PartitionSpec`):

``iid``
    shuffle the pool, deal it out in equal shares.
``dirichlet``
    label skew: for every class, client proportions ~ Dirichlet(alpha * 1) and that class's
    samples are cut at the cumulative proportions (Hsu, Qi & Brown 2019, arXiv 1909.06335;
    the balancing and minimum-size rule follow NIID-Bench, Li et al. 2022, ICDE). Small
    ``alpha`` (0.1) gives each client a few dominant classes; large ``alpha`` approaches IID.
``label_groups``
    each client sees exactly ``classes_per_client`` classes (McMahan et al. 2017's
    "pathological non-IID" shards, made deterministic): the classes are put in a seeded random
    order and client ``i`` takes ``k`` consecutive ones starting at ``i*k`` (wrapping), so
    every class is held once ``n_clients*k >= n_classes``; a class's samples are shared
    equally by the clients that hold it.
``mixed``
    the clients are cut into ``len(datasets)`` contiguous groups; group ``g`` holds dataset
    ``datasets[g]``, dealt out IID inside the group. Labels keep their meaning across sets
    (digit ``d`` is class ``d`` in mnist5k, digits and mnist1d).

Each client's share is then split into disjoint train and test parts: a ``test_fraction``
of it (at least one sample, at least one left for training) goes to test, stratified by
class so that a class a client holds stays in its training part whenever it has two or more
samples of it. Everything is deterministic given the numpy Generator passed in (take it from
``SeedTree.numpy("partition")``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from simkit.config import PartitionSpec
from simkit.errors import WorkloadError
from simkit.learning.data import ArrayData

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["ClientData", "partition", "class_histogram", "format_histogram"]

_F_PART = "workload.partition"

#: restarts of the Dirichlet draw before falling back to moving samples (NIID-Bench style)
_DIRICHLET_TRIES = 100
#: the fewest samples a client may hold (one for training, one for testing)
MIN_SAMPLES_PER_CLIENT = 2


@dataclass
class ClientData:
    """One client's data, as CPU torch tensors (the runner moves them to its torch device).

    Attributes:
        x_train, y_train: training samples (float32, shape ``(n, *input_shape)``) and int64 labels.
        x_test, y_test: this client's held-out samples, disjoint from its training samples.
        dataset: name of the dataset these samples come from.
        num_classes: the dataset's number of classes.
        train_index, test_index: positions of the samples in the source pool (provenance).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    dataset: str
    num_classes: int
    train_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    test_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])


# --------------------------------------------------------------------------- index partitioners
def _split_iid(n: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.asarray(c, dtype=np.int64) for c in np.array_split(rng.permutation(n), n_clients)]


def _split_dirichlet(y: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skew Dirichlet split (Hsu et al. 2019; NIID-Bench, Li et al. 2022).

    For every class ``k`` (in label order): draw ``p ~ Dir(alpha * 1_n)``, give no new samples
    to clients that already hold more than ``N/n`` (NIID-Bench's balancing), renormalise, and
    cut the shuffled class indices at the cumulative proportions. Redraw the whole split until
    every client holds at least :data:`MIN_SAMPLES_PER_CLIENT` samples (at most
    :data:`_DIRICHLET_TRIES` times); if that still fails, move random samples from the largest
    clients to the short ones, which changes the skew by a handful of samples.
    """
    n = len(y)
    classes = np.unique(y)
    best: list[list[int]] | None = None
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for k in classes:
            idx = rng.permutation(np.flatnonzero(y == k))
            p = rng.dirichlet(np.full(n_clients, alpha))
            p = np.array([pi * (len(part) < n / n_clients) for pi, part in zip(p, parts)])
            total = p.sum()
            p = p / total if total > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        best = parts
        if min(len(p) for p in parts) >= MIN_SAMPLES_PER_CLIENT:
            break
    assert best is not None
    sizes = [len(p) for p in best]
    while min(sizes) < MIN_SAMPLES_PER_CLIENT:
        short = int(np.argmin(sizes))
        donor = int(np.argmax(sizes))
        take = int(rng.integers(len(best[donor])))
        best[short].append(best[donor].pop(take))
        sizes = [len(p) for p in best]
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in best]


def _split_label_groups(y: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    c = len(classes)
    if k > c:
        raise WorkloadError(f"classes_per_client is {k} but the dataset has only {c} classes",
                            field=f"{_F_PART}.classes_per_client")
    order = classes[rng.permutation(c)]
    held = [[order[(i * k + j) % c] for j in range(k)] for i in range(n_clients)]
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for cls in classes:
        holders = [i for i in range(n_clients) if cls in held[i]]
        if not holders:
            continue  # fewer clients than needed to cover every class: this one is unused
        idx = rng.permutation(np.flatnonzero(y == cls))
        if len(idx) < len(holders):
            raise WorkloadError(f"class {int(cls)} has {len(idx)} samples for {len(holders)} clients that hold it",
                                field=_F_PART)
        for i, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[i].extend(chunk.tolist())
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]


# --------------------------------------------------------------------------- train/test split
def _train_test(idx: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Stratified split of one client's indices; returns (train_idx, test_idx), both non-empty.

    The test size is ``round(n * test_fraction)`` clipped to ``1..n-1``. It is shared over the
    client's classes in proportion to their counts (largest remainder), never taking a class's
    last training sample while another class can still give one.
    """
    n = len(idx)
    n_test = int(min(max(1, round(n * test_fraction)), n - 1))
    labels = y[idx]
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / n
    take = np.minimum(np.floor(quota).astype(int), counts - 1)
    left = n_test - int(take.sum())
    for cap in (counts - 1, counts):  # first keep one training sample per class, then not
        if left <= 0:
            break
        order = np.argsort(-(quota - take), kind="stable")
        while left > 0:
            moved = False
            for j in order:
                if left > 0 and take[j] < cap[j]:
                    take[j] += 1
                    left -= 1
                    moved = True
            if not moved:
                break
    train, test = [], []
    for cls, t in zip(classes, take):
        members = rng.permutation(idx[labels == cls])
        test.append(members[:t])
        train.append(members[t:])
    train_idx = rng.permutation(np.concatenate(train)).astype(np.int64)
    test_idx = rng.permutation(np.concatenate(test)).astype(np.int64)
    return train_idx, test_idx


def _client(data: ArrayData, idx: np.ndarray, test_fraction: float, rng: np.random.Generator) -> ClientData:
    tr, te = _train_test(idx, data.y, test_fraction, rng)
    return ClientData(
        x_train=torch.from_numpy(data.x[tr]), y_train=torch.from_numpy(data.y[tr]),
        x_test=torch.from_numpy(data.x[te]), y_test=torch.from_numpy(data.y[te]),
        dataset=data.name, num_classes=data.num_classes, train_index=tr, test_index=te,
    )


# --------------------------------------------------------------------------- entry point
def partition(
    spec: PartitionSpec,
    data: ArrayData | Mapping[str, ArrayData],
    n_clients: int,
    rng: np.random.Generator,
    *,
    test_fraction: float,
    max_samples: int | None = None,
) -> list[ClientData]:
    """Deal a dataset (or, for ``mixed``, several) out to ``n_clients`` clients.

    Args:
        spec: the partition kind and its options.
        data: one pool; for ``mixed`` a mapping from every name in ``spec.datasets`` to its pool
            (a single :class:`ArrayData` is accepted when ``spec.datasets`` names only it).
        n_clients: number of clients (>= 1).
        rng: the only source of randomness; the same generator state gives the same split.
        test_fraction: share of each client's samples held out for its test set, in (0, 1).
        max_samples: if set, each client keeps at most this many samples (drawn at random from
            its share) *before* the train/test split, for fast runs.

    Returns:
        One :class:`ClientData` per client, in client order. Without ``max_samples``, the
        clients' train and test sets together use every sample of the pool(s) exactly once
        (``label_groups`` may leave classes unused when ``n_clients * k < n_classes``).

    Raises:
        WorkloadError: fewer than two samples per client, a missing dataset for ``mixed``,
            more classes per client than the dataset has, or a bad fraction/cap.
    """
    if n_clients < 1:
        raise WorkloadError(f"need at least one client, got {n_clients}", field=_F_PART)
    if not 0 < test_fraction < 1:
        raise WorkloadError(f"test_fraction must be in (0, 1), got {test_fraction}", field="workload.test_fraction")
    if max_samples is not None and max_samples < MIN_SAMPLES_PER_CLIENT:
        raise WorkloadError(f"max_samples must be at least {MIN_SAMPLES_PER_CLIENT} (one train, one test sample)",
                            field="workload.max_samples")

    if spec.kind == "mixed":
        pools = _mixed_pools(spec, data)
        groups = np.array_split(np.arange(n_clients), len(pools))
        if any(len(g) == 0 for g in groups):
            raise WorkloadError(f"mixed partition over {len(pools)} datasets needs at least {len(pools)} clients, "
                                f"got {n_clients}", field=_F_PART)
        out: list[ClientData] = []
        for pool, group in zip(pools, groups):
            _check_size(pool, len(group))
            for idx in _split_iid(len(pool), len(group), rng):
                out.append(_client(pool, _cap(idx, max_samples), test_fraction, rng))
        return out

    pool = _single_pool(spec, data)
    _check_size(pool, n_clients)
    if spec.kind == "iid":
        shares = _split_iid(len(pool), n_clients, rng)
    elif spec.kind == "dirichlet":
        shares = _split_dirichlet(pool.y, n_clients, spec.alpha, rng)
    elif spec.kind == "label_groups":
        shares = _split_label_groups(pool.y, n_clients, spec.classes_per_client, rng)
    else:  # pragma: no cover - PartitionSpec's Literal forbids it
        raise WorkloadError(f"unknown partition kind {spec.kind!r}", field=f"{_F_PART}.kind")
    out = []
    for i, idx in enumerate(shares):
        if len(idx) < MIN_SAMPLES_PER_CLIENT:
            raise WorkloadError(f"client {i} would get {len(idx)} sample(s); each needs at least "
                                f"{MIN_SAMPLES_PER_CLIENT} (use fewer clients or more data)", field=_F_PART)
        out.append(_client(pool, _cap(idx, max_samples), test_fraction, rng))
    return out


def _cap(idx: np.ndarray, max_samples: int | None) -> np.ndarray:
    # shares are already in random order, so the first max_samples are a random subset
    return idx if max_samples is None else idx[:max_samples]


def _check_size(pool: ArrayData, n_clients: int) -> None:
    need = MIN_SAMPLES_PER_CLIENT * n_clients
    if len(pool) < need:
        raise WorkloadError(f"{n_clients} clients need at least {need} samples ({MIN_SAMPLES_PER_CLIENT} each), "
                            f"but dataset {pool.name!r} has {len(pool)}", field=_F_PART)


def _single_pool(spec: PartitionSpec, data: ArrayData | Mapping[str, ArrayData]) -> ArrayData:
    if isinstance(data, ArrayData):
        return data
    if len(data) == 1:
        return next(iter(data.values()))
    raise WorkloadError(f"partition kind {spec.kind!r} takes one dataset, got {len(data)}: {', '.join(data)}",
                        field=f"{_F_PART}.kind")


def _mixed_pools(spec: PartitionSpec, data: ArrayData | Mapping[str, ArrayData]) -> list[ArrayData]:
    names: Sequence[str] = spec.datasets
    if not names:
        raise WorkloadError("mixed partition needs at least one dataset", field=f"{_F_PART}.datasets")
    if isinstance(data, ArrayData):
        data = {data.name: data}
    missing = [n for n in names if n not in data]
    if missing:
        raise WorkloadError(f"mixed partition: no data given for {', '.join(missing)}", field=f"{_F_PART}.datasets")
    return [data[n] for n in names]


# --------------------------------------------------------------------------- inspection
def class_histogram(clients: Sequence[ClientData]) -> "pd.DataFrame":
    """Training-label counts: one row per client (index ``client``), one column per class."""
    import pandas as pd

    n_cls = max((c.num_classes for c in clients), default=0)
    rows = [np.bincount(c.y_train.numpy(), minlength=n_cls)[:n_cls] if c.n_train else np.zeros(n_cls, int)
            for c in clients]
    df = pd.DataFrame(np.asarray(rows, dtype=np.int64).reshape(len(clients), n_cls),
                      columns=list(range(n_cls)))
    df.index.name = "client"
    df.columns.name = "class"
    return df


def format_histogram(clients: "Sequence[ClientData] | pd.DataFrame") -> str:
    """A printable table of :func:`class_histogram` with each client's dataset and total."""
    import pandas as pd

    if isinstance(clients, pd.DataFrame):
        df = clients.copy()
    else:
        df = class_histogram(clients)
        df.insert(0, "dataset", [c.dataset for c in clients])
    numeric = df.select_dtypes("number")
    df["total"] = numeric.sum(axis=1)
    return df.to_string()
