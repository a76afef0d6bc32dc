"""Batched (vectorised) local training: equal to the sequential loop, and FedAvg and SplitFed V1
with ``batched: on|auto`` keep every record of the sequential run."""

from __future__ import annotations

import copy
import math
import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simkit.algorithms import REGISTRY
from simkit.algorithms.adasplit import AdaSplit, make_head
from simkit.algorithms.fedavg import FedAvg
from simkit.algorithms.splitfed import SplitFed
from simkit.learning.batched import (
    AUTO_MAX_STEP_FLOPS,
    BatchedFallbackWarning,
    ClientJob,
    ClientState,
    OptimSpec,
    Unsupported,
    auto_chunk_size,
    compile_program,
    continue_local_batched,
    continue_local_sequential,
    optimizer_state,
    prefer_batched,
    train_local_batched,
    train_local_sequential,
    unsupported_reason,
)
from simkit.learning.flops import count_flops
from simkit.learning.models import build_client_backbone, build_split_model
from simkit.run import run

# uneven clients: last batches of 1, 4, 16 samples; 2..5 steps per epoch
SIZES = [70, 100, 33, 64, 95, 40, 49]
OPTIMS = [
    pytest.param({"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}, id="sgd-momentum"),
    pytest.param({"optimizer": "sgd", "lr": 0.1}, id="sgd"),
    pytest.param({"optimizer": "adam", "lr": 1e-3}, id="adam"),
    pytest.param({"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "mu": 0.1}, id="fedprox-sgd"),
    pytest.param({"optimizer": "adam", "lr": 2e-3, "mu": 0.05}, id="fedprox-adam"),
]


def whole(family, shape, dtype, cut=1, width=8, classes=10):
    sm = build_split_model(family, shape, classes, cut=cut, width=width, generator=torch.Generator().manual_seed(0))
    return nn.Sequential(sm.client, sm.server).to(dtype)


def jobs(shape, dtype, sizes=SIZES, epochs=3, batch=16, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.rand(n, *shape, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (n,), generator=g)
        batches = []
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            batches += [perm[i:i + batch] for i in range(0, n, batch)]
        out.append(ClientJob(x, y, batches))
    return out


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    assert len(a) == len(b)
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b) for k in x)


# ------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("kw", OPTIMS)
@pytest.mark.parametrize("family,shape,cut", [("cnn", (1, 8, 8), 1), ("cnn", (1, 8, 8), 2), ("mlp", (1, 8, 8), 1),
                                              ("cnn1d", (1, 40), 2)])
def test_float64_weights_equal_the_sequential_loop_after_several_epochs(family, shape, cut, kw):
    model = whole(family, shape, torch.float64, cut=cut)
    start = state_of(model)
    js = jobs(shape, torch.float64)
    ref = train_local_sequential(model, start, js, **kw)
    got = train_local_batched(model, start, js, **kw)
    assert [list(s) for s in got] == [list(s) for s in ref]  # same keys, same order
    assert max_diff(got, ref) < 1e-9
    # it trained (not a no-op), and the template was left alone
    assert max_diff(got, [start] * len(js)) > 1e-3
    assert max_diff([state_of(model)], [start]) == 0


def test_float64_mixed_backbone_with_unflatten_and_chunks():
    gen = torch.Generator().manual_seed(1)
    back = build_client_backbone("cnn", (1, 8, 8), (4, 2, 2), width=4, generator=gen)  # ends in Unflatten
    server = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5))
    model = nn.Sequential(back, server).to(torch.float64)
    start = state_of(model)
    js = jobs((1, 8, 8), torch.float64, classes=5)
    kw = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "mu": 0.01}
    ref = train_local_sequential(model, start, js, **kw)
    assert max_diff(train_local_batched(model, start, js, **kw), ref) < 1e-9
    assert max_diff(train_local_batched(model, start, js, chunk_size=3, **kw), ref) < 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_layer_variants_strides_dilation_groups_no_bias_padding_ceil(dtype, tol):
    torch.manual_seed(0)
    m2 = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=0, bias=False), nn.ReLU()),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.Identity(), nn.Flatten(),
        nn.Linear(8 * 3 * 3, 12, bias=False), nn.ReLU(), nn.Linear(12, 7)).to(dtype)
    m1 = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                       nn.Conv1d(4, 5, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2, 6)).to(dtype)
    for model, shape, classes in [(m2, (2, 9, 9), 7), (m1, (3, 17), 6)]:
        start = state_of(model)
        js = jobs(shape, dtype, classes=classes, epochs=2)
        for kw in [{"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}, {"optimizer": "adam", "lr": 1e-2, "mu": 0.1}]:
            assert max_diff(train_local_batched(model, start, js, **kw),
                            train_local_sequential(model, start, js, **kw)) < tol


@pytest.mark.parametrize("kw", [OPTIMS[0], OPTIMS[2], OPTIMS[3]])
@pytest.mark.parametrize("family,shape", [("cnn", (1, 8, 8)), ("mlp", (1, 8, 8)), ("cnn1d", (1, 40))])
def test_float32_single_step_is_close(family, shape, kw):
    model = whole(family, shape, torch.float32)
    start = state_of(model)
    # SGD: a big step, so that the update dominates the weight. Adam's first step is ~lr*sign(g), and
    # float32 rounding flips it where |g| ~ eps: a small lr keeps that within the tolerance
    kw = {**kw, "lr": 1.0 if kw["optimizer"] == "sgd" else 1e-3}
    js = jobs(shape, torch.float32, epochs=1)
    for j in js:
        j.batches = j.batches[-1:]  # one step, on the (small, padded) last batch
    ref = train_local_sequential(model, start, js, **kw)
    got = train_local_batched(model, start, js, **kw)
    for a, b in zip(got, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert max_diff(got, [start] * len(js)) > 0.5 * kw["lr"]  # it moved


def test_optimizer_objects_and_unsupported_options():
    p = [torch.zeros(2, requires_grad=True)]
    assert OptimSpec.from_optimizer(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == OptimSpec("sgd", 0.1, 0.9)
    assert OptimSpec.from_optimizer(torch.optim.Adam(p, lr=0.01)).kind == "adam"
    for opt, what in [(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
                      (torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad"),
                      (torch.optim.RMSprop(p, lr=0.1), "RMSprop")]:
        with pytest.raises(Unsupported, match=what):
            OptimSpec.from_optimizer(opt)


@pytest.mark.parametrize("layer,what", [(nn.BatchNorm2d(8), "buffers"), (nn.Tanh(), "Tanh"),
                                        (nn.Dropout(0.5), "Dropout")])
def test_unsupported_layers_are_refused_with_the_reason(layer, what):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), layer, nn.Flatten(), nn.Linear(512, 10))
    reason = unsupported_reason(model, (1, 8, 8))
    assert reason is not None and what in reason
    with pytest.raises(Unsupported, match=what):
        train_local_batched(model, state_of(model), jobs((1, 8, 8), torch.float32, sizes=[20, 30]))
    assert unsupported_reason(whole("cnn", (1, 8, 8), torch.float32), (1, 8, 8)) is None


def test_auto_rule_and_chunks():
    def step_flops(shape):
        m = whole("cnn", shape, torch.float32, width=16)
        fc = count_flops(m, (32, *shape), backward=True)
        return fc.fwd + fc.bwd

    digits, mnist = step_flops((1, 8, 8)), step_flops((1, 28, 28))
    assert prefer_batched(digits, 10, "cpu") and prefer_batched(mnist, 10, "cpu")
    assert not prefer_batched(digits, 1, "cpu")
    assert not prefer_batched(2 * AUTO_MAX_STEP_FLOPS, 10, "cpu") and prefer_batched(2 * AUTO_MAX_STEP_FLOPS, 10, "cuda")
    small = compile_program(whole("cnn", (1, 8, 8), torch.float32, width=16), (1, 8, 8))
    big = compile_program(whole("cnn", (1, 28, 28), torch.float32, width=16), (1, 28, 28))
    assert auto_chunk_size(small, 50, 32, 4, "cpu") == 17  # 3 equal chunks of <= 24
    assert auto_chunk_size(small, 10, 32, 4, "cpu") == 10
    assert 1 <= auto_chunk_size(big, 50, 32, 4, "cpu") < 17


# ------------------------------------------------------------------------------ FedAvg
def scenario(algo: dict, batched: str, dtype="float32", clients=None, dropout_p=0.0, **extra) -> dict:
    sc = {
        "name": "b",
        "seed": 3,
        "fleet": {"counts": clients or {"rpi4": 3, "laptop": 2, "phone-midrange": 2},
                  "availability": {"kind": "dropout", "dropout_p": dropout_p} if dropout_p else {"kind": "always"}},
        "server": {"profile": "server-t4", "slots": 1},
        "topology": {"kind": "two_tier"},
        "workload": {"dataset": "digits", "model": {"family": "cnn", "cut": 1}, "batch_size": 16,
                     "max_samples": 700, "dtype": dtype},
        "algorithm": {"rounds": 3, "batched": batched, **algo},
    }
    sc.update(extra)
    return sc


COSTS = ["bytes_up", "bytes_down", "bytes_total", "client_flops_fwd", "client_flops_bwd", "server_flops",
         "sim_time_s", "energy_j_clients", "energy_j_server", "energy_j_total", "clients_finished", "clients_lost"]


def spy(monkeypatch, change=None, cls=FedAvg, names=("fedavg", "fedprox")) -> list:
    """Capture the algorithm objects (FedAvg by default) that run() builds (optionally changing the
    context first)."""
    made = []

    class Spy(cls):
        def __init__(self, ctx):
            if change is not None:
                change(ctx)
            super().__init__(ctx)
            made.append(self)

    for name in names:
        monkeypatch.setitem(REGISTRY, name, Spy)
    return made


def assert_same_records(a, b, *, same_accuracy: bool):
    for kind in ["compute", "transfer", "state", "dropout", "round", "selection", "metric"]:
        pd.testing.assert_frame_equal(a.records[kind], b.records[kind], check_exact=True)
    cols = ["round", "client", "time", "n"] + (["accuracy"] if same_accuracy else [])
    ea, eb = a.records["eval"], b.records["eval"]
    pd.testing.assert_frame_equal(ea[cols], eb[cols], check_exact=True)
    if same_accuracy:  # float64: the same predictions; the loss equal up to rounding
        assert ea.loss.to_numpy() == pytest.approx(eb.loss.to_numpy(), rel=1e-9, nan_ok=True)
    assert {k: a.summary[k] for k in COSTS} == {k: b.summary[k] for k in COSTS}
    ca, cb = a.clients.drop(columns=["accuracy"]), b.clients.drop(columns=["accuracy"])
    pd.testing.assert_frame_equal(ca, cb, check_exact=True)


def assert_same_weights(a, b, tol: float = 1e-9):
    """Every trained tensor of run ``a`` equals ``b``'s within ``tol`` (0: bit for bit)."""
    assert a.models.keys() == b.models.keys() and a.models
    for part in a.models:
        for k in a.models[part]:
            assert (a.models[part][k] - b.models[part][k]).abs().max().item() <= tol


FAULTS = [{"kind": "crash", "fraction": 0.3, "between_s": [0.05, 0.5]}]
RUNS = [
    pytest.param({"name": "fedavg", "lr": 0.1, "momentum": 0.9, "local_epochs": 2, "fraction": 0.8}, id="fedavg"),
    pytest.param({"name": "fedprox", "mu": 0.1, "optimizer": "adam", "lr": 3e-3}, id="fedprox-adam"),
]


@pytest.mark.parametrize("algo", RUNS)
def test_fedavg_float64_batched_run_equals_the_sequential_run(algo, monkeypatch):
    made = spy(monkeypatch)
    extra = {"faults": FAULTS, "dropout_p": 0.2}
    off = run(scenario(algo, "off", "float64", **extra))
    on = run(scenario(algo, "on", "float64", **extra))
    assert_same_records(off, on, same_accuracy=True)
    assert off.summary["accuracy_mean"] == on.summary["accuracy_mean"]
    assert_same_weights(off, on)
    # the faults really hit the rounds: clients crashed mid-round and dropped updates
    drops = off.records["dropout"]
    assert off.summary["clients_lost"] > 0 and (drops.reason == "crash").any()
    assert (drops.reason == "mid_round").any() and (drops.reason == "round_dropout").any()
    assert made[0].batching == [] and all(e["batched"] for e in made[1].batching)
    assert len(made[1].batching) == algo.get("rounds", 3)


def test_fedavg_float32_batched_run_keeps_records_and_learns_the_same(monkeypatch):
    made = spy(monkeypatch)
    algo = {"name": "fedavg", "lr": 0.1, "momentum": 0.9, "local_epochs": 2}
    off = run(scenario(algo, "off"))
    on = run(scenario(algo, "on"))
    auto = run(scenario(algo, "auto"))
    assert_same_records(off, on, same_accuracy=False)
    assert_same_records(off, auto, same_accuracy=False)
    for r in (on, auto):
        assert r.summary["accuracy_mean"] == pytest.approx(off.summary["accuracy_mean"], abs=0.02)
        for part in off.models:
            for k in off.models[part]:
                torch.testing.assert_close(r.models[part][k], off.models[part][k], rtol=1e-3, atol=1e-4)
    assert off.summary["accuracy_mean"] > 0.6
    # auto chose batching for the small digits CNN and said why
    assert all(e["batched"] and e["reason"].startswith("auto") for e in made[2].batching)


def test_auto_keeps_small_rounds_sequential(monkeypatch):
    made = spy(monkeypatch)
    res = run(scenario({"name": "fedavg", "rounds": 2}, "auto", clients={"rpi4": 1}))
    assert res.summary["accuracy_mean"] > 0
    assert [e["batched"] for e in made[0].batching] == [False, False]


@pytest.mark.parametrize("name,cls", [("fedavg", FedAvg), ("splitfed", SplitFed)])
def test_mixed_workload_batches_each_model_group(name, cls, monkeypatch):
    made = spy(monkeypatch, cls=cls, names=(name,))
    wl = {"dataset": "digits", "partition": {"kind": "mixed", "datasets": ["digits", "mnist1d"]},
          "model": {"family": "auto", "cut": 1}, "batch_size": 16, "max_samples": 400, "dtype": "float64"}
    algo = {"name": name, "rounds": 2, "lr": 0.1}
    off = run(scenario(algo, "off", workload=wl, clients={"rpi4": 4}))
    on = run(scenario(algo, "on", workload=wl, clients={"rpi4": 4}))
    assert_same_records(off, on, same_accuracy=True)
    assert {e["key"] for e in made[1].batching} == {"digits", "mnist1d"}
    assert_same_weights(off, on)


def test_unsupported_model_falls_back_with_a_recorded_reason(monkeypatch):
    def add_tanh(ctx):  # a layer the batched trainer does not know (no parameters: same weights)
        ctx.server_template.append(nn.Sequential(nn.Tanh()))

    made = spy(monkeypatch, add_tanh)
    algo = {"name": "fedavg", "rounds": 2}
    off = run(scenario(algo, "off"))
    with pytest.warns(BatchedFallbackWarning, match="Tanh"):
        on = run(scenario(algo, "on"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falls back quietly
        auto = run(scenario(algo, "auto"))
    for r in (on, auto):
        assert_same_records(off, r, same_accuracy=True)
    for algo_obj in made[1:]:
        assert algo_obj.batching and not any(e["batched"] for e in algo_obj.batching)
        assert all("Tanh" in e["reason"] for e in algo_obj.batching)


def test_fast_mode_ignores_batching():
    sc = scenario({"name": "fedavg", "rounds": 2}, "on")
    sc["train"] = False
    a = run(sc)
    sc["algorithm"]["batched"] = "off"
    b = run(sc)
    assert_same_records(a, b, same_accuracy=True)
    assert not math.isnan(a.summary["sim_time_s"])


# ------------------------------------------------------------------------------ SplitFed V1
SPLITFED = [
    pytest.param({"name": "splitfed", "lr": 0.1, "momentum": 0.9, "local_epochs": 2}, id="sgd-momentum"),
    pytest.param({"name": "splitfed", "optimizer": "adam", "lr": 3e-3}, id="adam"),
]


@pytest.mark.parametrize("algo", SPLITFED)
def test_splitfed_v1_float64_batched_run_equals_the_sequential_run(algo, monkeypatch):
    """A V1 round trained ahead as whole models gives the split steps' weights (two optimisers,
    the server copy updated before the client backward) and every record of the sequential run,
    crashes and dropouts included."""
    made = spy(monkeypatch, cls=SplitFed, names=("splitfed",))
    extra = {"faults": FAULTS, "dropout_p": 0.2}
    off = run(scenario(algo, "off", "float64", **extra))
    on = run(scenario(algo, "on", "float64", **extra))
    assert_same_records(off, on, same_accuracy=True)
    assert off.summary["accuracy_mean"] == on.summary["accuracy_mean"]
    assert_same_weights(off, on)
    # the runs trained (not a no-op on both sides) and the faults hit them
    assert off.summary["accuracy_mean"] > 0.5
    assert off.summary["clients_lost"] > 0 and (off.records["dropout"].reason == "mid_round").any()
    assert made[0].batching == [] and len(made[1].batching) == 3 and all(e["batched"] for e in made[1].batching)
    # the activations and gradients were still sent, sized as the real tensors were
    tags = set(on.records["transfer"].tag)
    assert {"act_up", "grad_down", "model_down", "model_up"} <= tags


def test_splitfed_v1_float32_auto_batches_and_learns_the_same(monkeypatch):
    made = spy(monkeypatch, cls=SplitFed, names=("splitfed",))
    algo = {"name": "splitfed", "lr": 0.1, "momentum": 0.9}
    off = run(scenario(algo, "off"))
    auto = run(scenario(algo, "auto"))
    assert_same_records(off, auto, same_accuracy=False)
    assert auto.summary["accuracy_mean"] == pytest.approx(off.summary["accuracy_mean"], abs=0.02)
    for part in off.models:
        for k in off.models[part]:
            torch.testing.assert_close(auto.models[part][k], off.models[part][k], rtol=1e-3, atol=1e-4)
    assert all(e["batched"] and e["reason"].startswith("auto") for e in made[1].batching)


@pytest.mark.parametrize("algo,what", [({"name": "sl"}, "split learning"),
                                       ({"name": "splitfed", "variant": "v2"}, "SplitFed v2")])
def test_batched_on_warns_and_trains_sequentially_where_clients_share_state(algo, what):
    algo = {**algo, "rounds": 2}
    off = run(scenario(algo, "off", "float64"))
    with pytest.warns(BatchedFallbackWarning, match=f"batched: 'on' has no effect for {what}"):
        on = run(scenario(algo, "on", "float64"))
    assert_same_records(off, on, same_accuracy=True)
    assert_same_weights(off, on, tol=0.0)


def test_auto_trains_splitfed_v2_sequentially(monkeypatch):
    made = spy(monkeypatch, cls=SplitFed, names=("splitfed",))
    algo = {"name": "splitfed", "variant": "v2", "rounds": 2}
    off = run(scenario(algo, "off", "float64"))
    auto = run(scenario(algo, "auto", "float64"))
    assert_same_records(off, auto, same_accuracy=True)
    assert_same_weights(off, auto, tol=0.0)
    assert made[1].batching == []


# ------------------------------------------------------------------------------ continuing own training
def own_states(model, jobs_, spec, loss, pre_steps, gen, dtype):
    """Per client a state reached by a few ordinary steps from perturbed weights (different
    weights, optimiser buffers and step counts per client; 0 steps: a fresh optimiser)."""
    from simkit.learning.batched import _torch_optimizer
    from simkit.learning.losses import supcon_loss

    out = []
    for job, pre in zip(jobs_, pre_steps):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=dtype))
        params = dict(m.named_parameters())
        opt = _torch_optimizer(spec, list(params.values()))
        for idx in job.batches[:pre]:
            opt.zero_grad()
            z = m(job.x[idx])
            (supcon_loss(z, job.y[idx], 0.1) if loss == "supcon" else F.cross_entropy(z, job.y[idx])).backward()
            opt.step()
        out.append(optimizer_state(opt, params))
    return out


@pytest.mark.parametrize("spec", [OptimSpec("adam", 1e-2), OptimSpec("sgd", 0.05, 0.9)], ids=["adam", "sgd-momentum"])
@pytest.mark.parametrize("loss", ["supcon", "cross_entropy"])
def test_continuing_each_clients_own_training_equals_the_sequential_loop(spec, loss):
    """AdaSplit's local phase: every client from its own weights, optimiser buffers and step count
    (Adam's bias correction per client), SupCon on a head with global average pooling; uneven
    sizes (partial last batches, a batch of one), some clients with a fresh optimiser."""
    dt = torch.float64
    sm = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=8, generator=torch.Generator().manual_seed(1))
    head = make_head(tuple(sm.cut_shape), 16, torch.Generator().manual_seed(2))
    model = (nn.Sequential(sm.client, head) if loss == "supcon" else nn.Sequential(sm.client, sm.server)).to(dt)
    g = torch.Generator().manual_seed(3)
    js = []
    for n in (40, 33, 50, 17, 25):
        x, y = torch.rand(n, 1, 8, 8, generator=g, dtype=dt), torch.randint(0, 4, (n,), generator=g)
        perm = torch.randperm(n, generator=g)
        js.append(ClientJob(x, y, [perm[j:j + 8] for j in range(0, n, 8)]))
    states = own_states(model, js, spec, loss, [2, 0, 3, 1, 0], g, dt)
    ref = continue_local_sequential(model, states, js, optimizer=spec, loss=loss)
    got = continue_local_batched(model, states, js, optimizer=spec, loss=loss, dtype=dt, chunk_size=3)
    for a, b, st, job in zip(ref, got, states, js):
        assert max((a.params[k] - b.params[k]).abs().max().item() for k in a.params) < 1e-9
        assert max((a.params[k] - st.params[k]).abs().max().item() for k in a.params) > 1e-4  # it trained
        assert a.buffers.keys() == b.buffers.keys() and a.buffers
        for k in a.buffers:
            for u, v in zip(a.buffers[k], b.buffers[k]):
                assert (u - v).abs().max().item() < 1e-9
        if spec.kind == "adam":
            assert a.step == b.step == st.step + len(job.batches)


@pytest.mark.parametrize("spec", [OptimSpec("adam", 1e-2), OptimSpec("sgd", 0.05, 0.9)], ids=["adam", "sgd-momentum"])
def test_continuing_from_states_where_only_the_backbone_stepped_equals_the_sequential_loop(spec):
    """AdaSplit's split steps update the backbone only (the head gets no gradient and torch.optim
    skips it): the head's Adam step count stays behind, or it has no state at all when the first
    step was a split step. Continuing from such states keeps each parameter's own count."""
    from simkit.learning.batched import _torch_optimizer
    from simkit.learning.losses import supcon_loss

    dt = torch.float64
    sm = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=8, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(sm.client, make_head(tuple(sm.cut_shape), 16, torch.Generator().manual_seed(2))).to(dt)
    g = torch.Generator().manual_seed(5)
    js, states = [], []
    # per client: its earlier steps, "l" = local (backbone + head), "s" = split (backbone only)
    for n, history in [(24, "lsl"), (17, "s"), (30, "sls"), (20, "")]:
        x, y = torch.rand(n, 1, 8, 8, generator=g, dtype=dt), torch.randint(0, 4, (n,), generator=g)
        js.append(ClientJob(x, y, [torch.randperm(n, generator=g)[:8], torch.arange(n)]))
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        opt = _torch_optimizer(spec, list(params.values()))
        for kind in history:
            opt.zero_grad(set_to_none=True)
            a = m[0](x[:8])
            (supcon_loss(m[1](a), y[:8], 0.1) if kind == "l" else (a ** 2).mean()).backward()
            opt.step()
        states.append(optimizer_state(opt, params))
    if spec.kind == "adam":
        assert states[0].param_steps["0.0.0.weight"] == 3 and states[0].param_steps["1.0.weight"] == 2
        assert states[1].step_of("1.0.weight") == 0 and "1.0.weight" not in states[1].buffers
        assert states[3].param_steps is None and states[3].step == 0
    else:
        assert "0.0.0.weight" in states[1].buffers and "1.0.weight" not in states[1].buffers
    ref = continue_local_sequential(model, states, js, optimizer=spec, loss="supcon")
    got = continue_local_batched(model, states, js, optimizer=spec, loss="supcon", dtype=dt)
    for a, b in zip(ref, got):
        assert max((a.params[k] - b.params[k]).abs().max().item() for k in a.params) < 1e-9
        assert a.buffers.keys() == b.buffers.keys() == a.params.keys()
        for k in a.buffers:
            for u, v in zip(a.buffers[k], b.buffers[k]):
                assert (u - v).abs().max().item() < 1e-9
        assert a.step == b.step and a.param_steps == b.param_steps
        assert all(a.step_of(k) == b.step_of(k) for k in a.params)
    if spec.kind == "adam":
        assert got[0].param_steps == {k: 5 if k.startswith("0.") else 4 for k in got[0].params}


def test_continuing_refuses_unknown_losses():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    params = dict(model.named_parameters())
    job = ClientJob(torch.rand(4, 4), torch.tensor([0, 1, 2, 0]), [torch.arange(4)])
    with pytest.raises(Unsupported, match="loss 'mse'"):
        continue_local_batched(model, [ClientState({k: v.detach() for k, v in params.items()})], [job],
                               optimizer=OptimSpec("sgd", 0.1), loss="mse")


def assert_same_adasplit_records(a, b):
    """As assert_same_records; the bandit's scores (from the server's losses, which depend on the
    backbones' weights) equal up to rounding."""
    for kind in ["compute", "transfer", "state", "dropout", "round", "metric"]:
        pd.testing.assert_frame_equal(a.records[kind], b.records[kind], check_exact=True)
    sa, sb = a.records["selection"], b.records["selection"]
    pd.testing.assert_frame_equal(sa.drop(columns=["score"]), sb.drop(columns=["score"]), check_exact=True)
    assert sa.score.to_numpy() == pytest.approx(sb.score.to_numpy(), rel=1e-9)
    assert {k: a.summary[k] for k in COSTS} == {k: b.summary[k] for k in COSTS}
    ea, eb = a.records["eval"], b.records["eval"]
    assert ea.accuracy.tolist() == eb.accuracy.tolist()


@pytest.mark.parametrize("algo,faults", [
    ({"name": "adasplit", "kappa": 1.0, "rounds": 3}, [{"kind": "crash", "fraction": 0.4, "between_s": [0.001, 0.03]}]),
    ({"name": "adasplit", "kappa": 0.5, "rounds": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9}, FAULTS),
    ({"name": "adasplit", "kappa": 0.25, "rounds": 4, "eta": 0.3},
     [{"kind": "crash", "fraction": 0.4, "between_s": [0.05, 0.4]}]),
    ({"name": "adasplit", "kappa": 0.0, "rounds": 3, "eta": 0.5, "return_gradients": False}, FAULTS),
], ids=["local-phase-crashes", "sgd-with-global-phase", "adam-global-phase-crashes", "streaming-from-the-start"])
def test_adasplit_batched_run_equals_the_sequential_run(algo, faults, monkeypatch):
    """AdaSplit batched keeps every record and the weights of the sequential run. Local phase:
    each epoch trained ahead (each client continuing its own backbone + head and Adam/SGD state);
    a client that crashes mid-epoch keeps exactly the steps that had started (replayed). Global
    phase: the non-selected clients' local steps of each iteration trained together at its
    barrier, between split steps that move only the backbone (Adam step counts per parameter),
    including crashes mid-iteration and, with kappa 0, clients whose first step is a split step."""
    made = spy(monkeypatch, cls=AdaSplit, names=("adasplit",))
    extra = {"faults": faults, "dropout_p": 0.2}
    off = run(scenario(algo, "off", "float64", **extra))
    on = run(scenario(algo, "on", "float64", **extra))
    assert_same_adasplit_records(off, on)
    assert_same_weights(off, on)
    drops = off.records["dropout"]
    assert (drops.reason == "mid_round").any()
    local = int(algo["kappa"] * algo["rounds"])
    assert made[0].batching == []
    log = made[1].batching
    assert [e["round"] for e in log if e["phase"] == "local"] == list(range(local))
    glob = [e for e in log if e["phase"] == "global"]
    assert {e["round"] for e in glob} <= set(range(local, algo["rounds"]))
    its = [e["iteration"] for e in glob]
    assert its == sorted(set(its))   # at most one entry per iteration and model group
    assert all(e["batched"] for e in log)
    mid = set(drops[drops.reason == "mid_round"]["round"])
    if local < algo["rounds"]:   # several iterations per epoch; selected steps really happened
        assert len(its) > algo["rounds"] - local
        assert (on.records["selection"].selected).any() and (on.records["compute"].tag == "server_step").any()
    assert mid <= set(range(local)) if algo["kappa"] == 1.0 else mid & set(range(local, algo["rounds"]))


def test_adasplit_crash_inside_a_global_phase_local_step_keeps_that_step(monkeypatch):
    """A client that goes off in the middle of a global-phase local step has made that step (its
    work runs at the step's start): the batched run trains it at the iteration's barrier although
    the client never finished the iteration."""
    algo = {"name": "adasplit", "kappa": 0.34, "rounds": 3, "eta": 0.3}
    probe = run(scenario(algo, "off", "float64"))
    c = probe.records["compute"]
    local = c[(c.tag == "local_step") & (c["round"] == 2) & (c.device.str.startswith("rpi4"))].iloc[3]
    at = float((local.start + local.end) / 2)
    crash = [{"kind": "crash", "device": local.device, "at_s": at}]
    made = spy(monkeypatch, cls=AdaSplit, names=("adasplit",))
    off = run(scenario(algo, "off", "float64", faults=crash))
    on = run(scenario(algo, "on", "float64", faults=crash))
    d = off.records["dropout"]
    assert ((d.device == local.device) & (d.reason == "mid_round") & (d.time == at)).any()
    assert_same_adasplit_records(off, on)
    assert_same_weights(off, on)
    assert any(e["phase"] == "global" and e["batched"] for e in made[1].batching)


@pytest.mark.parametrize("algo", [
    {"name": "adasplit", "kappa": 1.0, "rounds": 3, "lr": 3e-3},
    # random selection: the choices (so the records) do not depend on float32 rounding of the losses
    {"name": "adasplit", "kappa": 0.34, "rounds": 3, "lr": 3e-3, "selection": "random"},
], ids=["local-phase", "with-global-phase"])
def test_adasplit_float32_auto_batches_and_learns_the_same(algo, monkeypatch):
    made = spy(monkeypatch, cls=AdaSplit, names=("adasplit",))
    off = run(scenario(algo, "off"))
    auto = run(scenario(algo, "auto"))
    for kind in ["compute", "transfer", "dropout", "round"]:
        pd.testing.assert_frame_equal(off.records[kind], auto.records[kind], check_exact=True)
    # float32: rounding differences grow with Adam over 3 epochs, most on weights whose gradient is
    # near zero (Adam normalises it), so whole tensors are compared (single steps: the next test)
    for part in off.models:
        for k in off.models[part]:
            a, b = auto.models[part][k].double(), off.models[part][k].double()
            assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6
    assert auto.summary["accuracy_mean"] == pytest.approx(off.summary["accuracy_mean"], abs=0.03)
    log = made[1].batching
    assert all(e["batched"] and e["reason"].startswith("auto") for e in log)
    assert len([e for e in log if e["phase"] == "local"]) == int(algo["kappa"] * algo["rounds"])
    if algo["kappa"] < 1:
        assert any(e["phase"] == "global" for e in log)


@pytest.mark.parametrize("spec", [OptimSpec("adam", 1e-2), OptimSpec("sgd", 0.05, 0.9)], ids=["adam", "sgd-momentum"])
def test_float32_single_continued_supcon_step_is_close(spec):
    dt = torch.float32
    sm = build_split_model("cnn", (1, 8, 8), 10, cut=1, width=8, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(sm.client, make_head(tuple(sm.cut_shape), 16, torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(4)
    js = []
    for n in (16, 13, 9):
        x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        js.append(ClientJob(x, y, [torch.randperm(n, generator=g)[:8], torch.arange(n)]))
    states = own_states(model, js, spec, "supcon", [1, 0, 1], g, dt)   # then one step each
    one = [ClientJob(j.x, j.y, j.batches[1:]) for j in js]
    ref = continue_local_sequential(model, states, one, optimizer=spec, loss="supcon")
    got = continue_local_batched(model, states, one, optimizer=spec, loss="supcon", dtype=dt)
    # Adam divides by sqrt(v): for a near-zero gradient a float32 rounding difference moves the
    # update by up to a fraction of the step size lr, hence an absolute tolerance of lr / 1000
    atol = 1e-3 * spec.lr if spec.kind == "adam" else 1e-6
    for a, b in zip(ref, got):
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-5, atol=atol)


def test_adasplit_mixed_workload_batches_each_model_group(monkeypatch):
    made = spy(monkeypatch, cls=AdaSplit, names=("adasplit",))
    wl = {"dataset": "digits", "partition": {"kind": "mixed", "datasets": ["digits", "mnist1d"]},
          "model": {"family": "auto", "cut": 1}, "batch_size": 16, "max_samples": 300, "dtype": "float64"}
    algo = {"name": "adasplit", "rounds": 3, "kappa": 0.67}
    off = run(scenario(algo, "off", workload=wl, clients={"rpi4": 4}))
    on = run(scenario(algo, "on", workload=wl, clients={"rpi4": 4}))
    assert_same_adasplit_records(off, on)
    assert_same_weights(off, on)
    log = made[1].batching
    assert {(e["round"], e["key"]) for e in log if e["phase"] == "local"} == \
        {(r, k) for r in (0, 1) for k in ("digits", "mnist1d")}
    assert {e["key"] for e in log if e["phase"] == "global"} == {"digits", "mnist1d"}
