"""Hostile input: fuzzed scenario, profile, topology and trace files give a SimkitError (with a
reason) and nothing else, quickly; absurd but valid values run or fail clearly in bounded time."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit import SimkitError
from simkit.config import load_profile, load_scenario
from simkit.world.availability import load_trace
from simkit.world.topology import load_graphml

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@contextmanager
def bounded(seconds: int):
    """Fail (instead of hanging) if the block runs longer than ``seconds``."""
    def boom(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
KEYS = ["name", "seed", "train", "fleet", "counts", "size", "shares", "access", "rpi4", "laptop", "server", "profile",
        "slots", "topology", "kind", "path", "gateways", "workload", "dataset", "batch_size", "partition", "alpha",
        "model", "cut", "algorithm", "rounds", "lr", "fraction", "mu", "kappa", "faults", "at_s", "device", "budgets",
        "availability", "dropout_p", "trace", "lte", "uplink_bps", "bogus"]
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), kids, max_size=5)),
                     max_leaves=25)


def only_simkit_errors(fn, *args):
    try:
        fn(*args)
    except SimkitError as exc:
        assert exc.reason and str(exc)
        return exc
    return None


@FUZZ
@given(tree=trees)
def test_fuzzed_scenario_files_raise_only_simkit_errors(tmp_path_factory, tree):
    p = tmp_path_factory.mktemp("s") / "scenario.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True))
    exc = only_simkit_errors(load_scenario, p)
    if exc is not None:
        assert exc.file == str(p)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_scenario_or_profile_raise_only_simkit_errors(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("b")
    p = d / "rpi4.yaml"
    p.write_bytes(raw)
    for loader in (load_scenario, load_profile):
        exc = only_simkit_errors(loader, p)
        assert exc is None or exc.file == str(p)


VALID_PROFILE = yaml.safe_load((ROOT / "device_profiles" / "rpi4.yaml").read_text())


@FUZZ
@given(path=st.lists(st.sampled_from(["peak_flops", "efficiency", "power", "idle_w", "compute_w", "memory_bytes",
                                      "sources", "name", "kind", "battery_j", "x"]), min_size=1, max_size=2),
       value=scalars)
def test_mutated_profiles_raise_only_simkit_errors(tmp_path_factory, path, value):
    data = yaml.safe_load(yaml.safe_dump(VALID_PROFILE))
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    p = tmp_path_factory.mktemp("p") / "rpi4.yaml"
    p.write_text(yaml.safe_dump(data))
    exc = only_simkit_errors(load_profile, p)
    if exc is None:  # it loaded: then every number is finite and in range
        prof = load_profile(p)
        assert math.isfinite(prof.peak_flops) and prof.peak_flops > 0 and 0 < prof.efficiency <= 1


GRAPHML = (ROOT / "topologies" / "home-star.graphml").read_text()


@FUZZ
@given(cuts=st.lists(st.tuples(st.integers(0, len(GRAPHML) - 1), st.integers(1, 40),
                               st.sampled_from(["", "-", "0", "nan", "<", ">", "\"", "x", "1e999", "&"])),
                     min_size=1, max_size=4))
def test_mutated_graphml_raises_only_simkit_errors(tmp_path_factory, cuts):
    text = GRAPHML
    for at, n, repl in cuts:
        text = text[:at] + repl + text[at + n:]
    p = tmp_path_factory.mktemp("g") / "t.graphml"
    p.write_text(text)
    with bounded(10):
        exc = only_simkit_errors(load_graphml, p)
    assert exc is None or exc.file == str(p)


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(st.text(max_size=6), st.floats(allow_nan=True).map(str)), max_size=4),
                     max_size=6))
def test_fuzzed_trace_csv_raises_only_trace_errors(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("t") / "trace.csv"
    p.write_text("device,start_s,end_s\n" + "\n".join(",".join(r) for r in rows))
    only_simkit_errors(load_trace, p, None)


def test_the_bad_file_corpus_gives_simkit_errors_only():
    bad = sorted((ROOT / "tests" / "data" / "bad").iterdir())
    assert len(bad) >= 30
    for p in bad:
        loader = {".graphml": load_graphml, ".csv": load_trace}.get(p.suffix)
        if loader is None:
            loader = load_profile if p.name.startswith("profile") else load_scenario
        try:
            with bounded(10):
                loader(p)
        except SimkitError as exc:
            assert exc.reason
        # scenario files whose problem only shows when the world is built are covered in test_scenarios_cli


# ------------------------------------------------------------------ absurd but valid values
def _run(sc):
    from simkit.run import run

    return run(sc)


def test_one_bit_per_second_link_runs_and_takes_forever_in_simulated_time_only():
    sc = {"fleet": {"counts": {"rpi4": 2}}, "topology": {"kind": "star", "access": {"wifi": {"uplink_bps": 1.0}}},
          "workload": {"max_samples": 40, "batch_size": 16}, "algorithm": {"name": "fedavg", "rounds": 1}}
    t = time.perf_counter()
    with bounded(60):
        res = _run(sc)
    assert time.perf_counter() - t < 60
    # the model upload alone is (model bytes + overhead) * 8 seconds at 1 bit/s
    assert res.summary["sim_time_s"] > res.summary["bytes_up"] / 2 * 8 * 0.99


def test_exaflop_device_runs():
    from simkit.world.fleet import get_profiles

    fast = get_profiles()["laptop"].model_copy(update={"peak_flops": 1e18})
    import simkit.world.fleet as fleet

    profiles = {**get_profiles(), "laptop": fast}
    orig = fleet.get_profiles
    fleet.get_profiles = lambda directory=None: profiles
    try:
        with bounded(60):
            res = _run({"fleet": {"counts": {"laptop": 2}}, "topology": {"kind": "star"},
                        "workload": {"max_samples": 40, "batch_size": 16}, "algorithm": {"name": "sl", "rounds": 1}})
    finally:
        fleet.get_profiles = orig
    comp = res.records["compute"].query("device != 'server'")
    assert ((comp.end - comp.start) < 1e-3).all()  # only the per-step overhead is left


def test_ten_thousand_clients_with_one_sample_each_fail_clearly_or_run_bounded():
    sc = {"fleet": {"counts": {"rpi4": 10_000}}, "topology": {"kind": "two_tier", "gateways": 100},
          "workload": {"batch_size": 1}, "algorithm": {"name": "fedavg", "rounds": 1}}
    t = time.perf_counter()
    with bounded(120), pytest.raises(SimkitError, match="client"):
        _run(sc)  # digits has 1,797 samples: cannot give 10,000 clients any
    assert time.perf_counter() - t < 120
    # the fast mode plans it: two samples each (one to train, one to test)
    with bounded(240):
        res = _run({**sc, "train": False, "record_timeline": False, "workload": {"batch_size": 1,
                                                                                  "samples_per_client": 2}})
    assert res.summary["n_clients"] == 10_000 and res.summary["clients_finished"] == 10_000
