"""Devices, energy and availability: exact, hand-computed timelines and joules."""


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simkit.config import DeviceProfile, PowerSpec
from simkit.errors import TraceError
from simkit.records import Recorder
from simkit.world.availability import Availability, load_trace
from simkit.world.devices import Device, DeviceOff
from simkit.world.energy import EnergyMeter

PROFILE = DeviceProfile(name="toy", peak_flops=1e9, efficiency=0.5, memory_bytes=1e9, step_overhead_s=0.01,
                        power=PowerSpec(idle_w=1.0, compute_w=4.0))


def make_device(env, **kw):
    meter = EnergyMeter(env, idle_w=1.0, compute_w=4.0, **kw)
    return Device(env, "d0", PROFILE, node="d0", meter=meter, recorder=Recorder())


def test_compute_time_is_flops_over_effective_speed_plus_overhead(env, log):
    dev = make_device(env)

    def proc():
        yield dev.compute(1e9, "x")
        log.append(env.now)

    env.process(proc())
    env.run()
    # 1e9 FLOPs / (1e9 FLOP/s * 0.5) + 0.01 s
    assert log == [pytest.approx(2.01, rel=1e-12)]


def test_memory_traffic_and_kernels_add_their_terms(env, log):
    # 2e9 FLOP/s effective and 4e8 B/s of traffic, both x1.25 for this device's speed factor;
    # 0.01 s per compute and 1 ms per kernel
    prof = PROFILE.model_copy(update={"traffic_bytes_per_s": 4e8, "kernel_overhead_s": 1e-3, "efficiency": 1.0,
                                      "peak_flops": 2e9})
    meter = EnergyMeter(env, idle_w=1.0, compute_w=4.0)
    dev = Device(env, "d0", prof, node="d0", meter=meter, recorder=Recorder(), speed_factor=1.25)

    def proc():
        yield dev.compute(1e9, "a", nbytes=2e8, kernels=6)   # (0.4 + 0.4) + 0.01 + 0.006
        log.append(env.now)
        dev.slowdown = 2.0                                   # a straggler: both rates halve
        yield dev.compute(1e9, "b", nbytes=2e8)              # (0.4 + 0.4) * 2 + 0.01
        log.append(env.now)

    env.process(proc())
    env.run()
    assert log == [pytest.approx(0.816, rel=1e-12), pytest.approx(0.816 + 1.61, rel=1e-12)]
    assert meter.total_j == pytest.approx((0.816 + 1.61) * 5.0)   # idle + compute all along
    assert dev.compute_time(1e9, 2e8, 6) == pytest.approx(1.616, rel=1e-12)
    # no traffic rate: the bytes cost nothing, to the bit (the pure FLOP-rate model)
    plain = make_device(env)
    assert plain.compute_time(1e9, 5e9, 0) == plain.compute_time(1e9) == 1e9 / 5e8 + 0.01


@settings(max_examples=200, deadline=None)
@given(flops=st.floats(0, 1e13), nbytes=st.floats(0, 1e11), kernels=st.integers(0, 10_000),
       rate=st.floats(1e6, 1e12), kernel_s=st.floats(0, 1e-3), speed=st.floats(0.1, 10), slowdown=st.floats(1, 8))
def test_compute_time_adds_each_term_and_a_missing_rate_changes_nothing(flops, nbytes, kernels, rate, kernel_s, speed,
                                                                        slowdown):
    import simpy

    base = PROFILE.model_copy(update={"kernel_overhead_s": kernel_s})
    full = base.model_copy(update={"traffic_bytes_per_s": rate})
    env = simpy.Environment()
    plain = Device(env, "p", base, node="p", meter=None, recorder=None, speed_factor=speed)
    dev = Device(env, "d", full, node="d", meter=None, recorder=None, speed_factor=speed)
    plain.slowdown = dev.slowdown = slowdown
    flop_only = flops / (1e9 * 0.5 * speed) * slowdown + 0.01
    # without a traffic rate the bytes cost nothing, to the bit
    assert plain.compute_time(flops, nbytes, 0) == plain.compute_time(flops) == flop_only
    t = dev.compute_time(flops, nbytes, kernels)
    assert t == pytest.approx(flop_only + nbytes / (rate * speed) * slowdown + kernels * kernel_s, rel=1e-12)
    # more of any work never takes less time
    assert dev.compute_time(flops, nbytes * 2, kernels) >= t and dev.compute_time(flops, nbytes, kernels + 1) >= t
    assert t >= plain.compute_time(flops) >= 0.01


def test_compute_queues_when_busy(env, log):
    dev = make_device(env)

    def job(name, flops):
        yield dev.compute(flops, name)
        log.append((name, env.now))

    env.process(job("a", 1e9))
    env.process(job("b", 0.5e9))
    env.run()
    assert log == [("a", pytest.approx(2.01)), ("b", pytest.approx(2.01 + 1.01))]


def test_work_runs_at_the_instant_the_slot_is_taken(env, log):
    dev = make_device(env)

    def job(name):
        val = yield dev.compute(1e9, name, work=lambda: (log.append((name, env.now)), name)[1])
        assert val == name

    env.process(job("a"))
    env.process(job("b"))
    env.run()
    assert log == [("a", 0.0), ("b", pytest.approx(2.01))]


def test_exact_joules_compute_upload_idle_and_cellular_tail(env):
    # idle 1 W, compute +4 W, LTE-like radio: tx +3.9 W, tail 1.0 W for 11.6 s
    m = EnergyMeter(env, idle_w=1.0, compute_w=4.0, tx_w=3.9, rx_w=1.96, tail_w=1.0, tail_s=11.6)

    def proc():
        m.begin("compute")
        yield env.timeout(2.0)
        m.end("compute")
        m.begin("tx")
        yield env.timeout(1.0)
        m.end("tx")
        yield env.timeout(17.0)

    env.process(proc())
    env.run()
    j = m.snapshot()
    assert j["idle"] == pytest.approx(20.0)
    assert j["compute"] == pytest.approx(8.0)
    assert j["tx"] == pytest.approx(3.9)
    assert j["tail"] == pytest.approx(11.6)
    assert j["rx"] == 0.0
    assert m.total_j == pytest.approx(20 + 8 + 3.9 + 11.6)


def test_tail_is_cut_short_by_a_new_transfer_and_restarts_after_it(env):
    m = EnergyMeter(env, idle_w=0.0, compute_w=0.0, tx_w=2.0, rx_w=1.0, tail_w=1.0, tail_s=10.0)

    def proc():
        m.begin("tx")
        yield env.timeout(1.0)
        m.end("tx")          # tail 1..11, but ...
        yield env.timeout(4.0)
        m.begin("rx")        # ... a download at 5 ends it
        yield env.timeout(2.0)
        m.end("rx")          # new tail 7..17
        yield env.timeout(30.0)

    env.process(proc())
    env.run()
    j = m.snapshot()
    assert j["tx"] == pytest.approx(2.0)
    assert j["rx"] == pytest.approx(2.0)
    assert j["tail"] == pytest.approx(4.0 + 10.0)


def test_battery_empties_at_the_computed_instant_and_device_goes_off(env, log):
    meter = EnergyMeter(env, idle_w=1.0, compute_w=4.0, battery_j=12.0)
    dev = Device(env, "d0", PROFILE, node="d0", meter=meter, recorder=Recorder())
    meter.on_empty = lambda: (log.append(("empty", env.now)), dev.power_off("battery_empty", permanent=True))

    def job():
        try:
            yield dev.compute(1e10, "long")  # would take 20 s
        except DeviceOff:
            log.append(("interrupted", env.now))

    env.process(job())
    env.run(until=50)
    # power is 5 W while computing: 12 J last 2.4 s
    assert log == [("empty", pytest.approx(2.4)), ("interrupted", pytest.approx(2.4))]
    assert meter.total_j == pytest.approx(12.0)
    assert dev.dead and not dev.on


def test_battery_accounts_for_power_falling_when_the_tail_ends(env, log):
    meter = EnergyMeter(env, idle_w=1.0, compute_w=0.0, tx_w=0.0, tail_w=1.0, tail_s=2.0, battery_j=10.0)
    meter.on_empty = lambda: log.append(env.now)

    def proc():
        meter.begin("tx")
        yield env.timeout(1.0)
        meter.end("tx")  # 1 J used; tail 2 W for 2 s -> 5 J at t=3; then 1 W -> empty at t=8

    env.process(proc())
    env.run(until=100)
    assert log == [pytest.approx(8.0)]


def run_spans(env, meter, intervals):
    """Run one process per (state, start, duration): the meter is in ``state`` from start for duration."""
    def span(state, start, dur):
        yield env.timeout(start)
        meter.begin(state)
        yield env.timeout(dur)
        meter.end(state)

    for state, start, dur in intervals:
        env.process(span(state, start, dur))
    env.run()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["compute", "tx", "rx"]), st.floats(0, 5), st.floats(0, 5)),
                min_size=1, max_size=12),
       st.floats(0, 3), st.floats(0, 3), st.floats(0, 20))
def test_energy_never_negative_and_at_least_idle_times_duration(intervals, idle, tail_w, tail_s):
    import simpy

    env = simpy.Environment()
    m = EnergyMeter(env, idle_w=idle, compute_w=2.0, tx_w=1.5, rx_w=0.5, tail_w=tail_w, tail_s=tail_s)
    run_spans(env, m, intervals)
    end = env.now
    j = m.snapshot()
    assert all(v >= 0 for v in j.values())
    assert m.total_j >= idle * end - 1e-9
    # upper bound: everything on all the time
    assert m.total_j <= (idle + 2.0 * 12 + 1.5 + 0.5 + tail_w) * end + 1e-9


def _union_length(spans):
    total, cur_s, cur_e = 0.0, None, None
    for a, b in sorted(spans):
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["compute", "tx", "rx"]), st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 5),
                          st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0, 5)), min_size=1, max_size=12))
def test_radio_energy_is_power_times_the_union_of_overlapping_transfers(intervals):
    # the radio draws tx_w while *any* flow sends, however many overlap; compute scales with busy slots
    import simpy

    env = simpy.Environment()
    m = EnergyMeter(env, idle_w=0.25, compute_w=2.0, tx_w=1.5, rx_w=0.5, slots=2)
    run_spans(env, m, intervals)
    j = m.snapshot()
    spans = {k: [(a, a + d) for s_, a, d in intervals if s_ == k] for k in ("compute", "tx", "rx")}
    assert j["tx"] == pytest.approx(1.5 * _union_length(spans["tx"]), rel=1e-9, abs=1e-12)
    assert j["rx"] == pytest.approx(0.5 * _union_length(spans["rx"]), rel=1e-9, abs=1e-12)
    assert j["compute"] == pytest.approx(2.0 / 2 * sum(b - a for a, b in spans["compute"]), rel=1e-9, abs=1e-12)
    assert j["idle"] == pytest.approx(0.25 * env.now, rel=1e-9, abs=1e-12)
    assert j["tail"] == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["compute", "tx", "rx"]), st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 5),
                          st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0, 5)), min_size=1, max_size=12),
       st.lists(st.sampled_from([0.3, 2.0, 5.0, 12.0]) | st.floats(0.01, 40), min_size=1, max_size=3),
       st.sampled_from([0.0, 2.0]) | st.floats(0, 6))
def test_battery_empties_exactly_when_the_joules_drawn_reach_its_capacity(intervals, capacities, tail_s):
    # Far from empty a meter checks at the earliest instant the charge could run out (every term
    # on at once), near it at the exact instant under the current power; the meters' checks share
    # one BatteryWatch (as a fleet's do). Either way each on_empty runs once, at the instant a twin
    # meter without a battery, on the same timeline, has drawn exactly that capacity.
    import simpy

    from simkit.world.energy import BatteryWatch

    env = simpy.Environment()
    kw = dict(idle_w=0.25, compute_w=2.0, tx_w=1.5, rx_w=0.5, tail_w=0.75, tail_s=tail_s)
    twin = EnergyMeter(env, **kw)
    watch = BatteryWatch(env)
    meters = [EnergyMeter(env, battery_j=c, watch=watch, **kw) for c in capacities]
    hits = {i: [] for i in range(len(meters))}

    def empty(i):
        hits[i].append(twin.total_j)
        meters[i].power_off()

    for i, m in enumerate(meters):
        m.on_empty = lambda i=i: empty(i)

    def span(state, start, dur):
        yield env.timeout(start)
        for m in (*meters, twin):
            m.begin(state)
        yield env.timeout(dur)
        for m in (*meters, twin):
            m.end(state)

    for state, start, dur in intervals:
        env.process(span(state, start, dur))
    env.run()   # idle draws on after the spans: every battery runs out
    for i, c in enumerate(capacities):
        assert len(hits[i]) == 1
        assert hits[i][0] == pytest.approx(c, rel=1e-9, abs=1e-12)


def write(tmp_path, text, name="trace.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_trace_loads_and_drives_device_on_off(env, tmp_path, log):
    p = write(tmp_path, "device,start_s,end_s\nd0,5,10\nd0,20,30\n")
    from simkit.config import AvailabilitySpec

    av = Availability(AvailabilitySpec(kind="trace", trace=str(p)), 0, ["d0", "d1"])
    dev = make_device(env)
    dev.recorder = Recorder()
    av.trace_process(env, dev)

    def watch():
        for t in [1, 6, 12, 25, 31]:
            yield env.timeout(t - env.now)
            log.append((t, dev.on))

    env.process(watch())
    env.run(until=40)
    assert log == [(1, False), (6, True), (12, False), (25, True), (31, False)]
    # idle energy only while on: 5 + 10 s
    assert dev.meter.snapshot()["idle"] == pytest.approx(15.0)


@pytest.mark.parametrize("text,field", [
    ("dev,start,end\nd0,1,2\n", "line 1"),
    ("device,start_s,end_s\nd0,1\n", "line 2"),
    ("device,start_s,end_s\nd0,abc,2\n", "line 2"),
    ("device,start_s,end_s\nd0,5,2\n", "line 2"),
    ("device,start_s,end_s\nd0,nan,2\n", "line 2"),
    ("device,start_s,end_s\nd0,0,5\nd0,4,8\n", "windows"),
    ("device,start_s,end_s\nghost,0,5\n", "device"),
])
def test_malformed_trace_rows_give_clear_errors(tmp_path, text, field):
    p = write(tmp_path, text)
    with pytest.raises(TraceError) as info:
        load_trace(p, ["d0"])
    assert str(p) in str(info.value) and field in str(info.value)


def test_dropout_is_seeded_and_order_independent():
    from simkit.config import AvailabilitySpec

    spec = AvailabilitySpec(kind="dropout", dropout_p=0.3)
    a = Availability(spec, 7, [f"d{i}" for i in range(50)])
    b = Availability(spec, 7, [f"d{i}" for i in range(50)])
    first = [a.drops_round(f"d{i}", r) for i in range(50) for r in range(4)]
    second = [b.drops_round(f"d{i}", r) for r in reversed(range(4)) for i in range(50)]
    assert first == [second[(3 - r) * 50 + i] for i in range(50) for r in range(4)]
    rate = sum(first) / len(first)
    assert 0.2 < rate < 0.4
    c = Availability(spec, 8, [f"d{i}" for i in range(50)])
    assert [c.drops_round(f"d{i}", 0) for i in range(50)] != [a.drops_round(f"d{i}", 0) for i in range(50)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["compute", "tx", "rx"]), st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 5),
                          st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0, 5)), min_size=1, max_size=12),
       st.sampled_from([0.5, 2.0]) | st.floats(0.01, 6))
def test_tail_energy_is_tail_power_times_each_quiet_gap_capped_at_the_tail(intervals, tail_s):
    # after the radio's last flow ends (tx or rx) it stays in the tail until tail_s passes or a new
    # flow starts: the tail's joules are tail_w times min(gap, tail_s) summed over the radio's gaps
    import simpy

    env = simpy.Environment()
    m = EnergyMeter(env, idle_w=0.25, compute_w=2.0, tx_w=1.5, rx_w=0.5, tail_w=0.75, tail_s=tail_s)
    run_spans(env, m, intervals)
    end = env.now
    merged = []
    for a, b in sorted((a, a + d) for s_, a, d in intervals if s_ != "compute"):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    gaps = [nxt[0] - cur[1] for cur, nxt in zip(merged, merged[1:])] + ([end - merged[-1][1]] if merged else [])
    j = m.snapshot()
    assert j["tail"] == pytest.approx(0.75 * sum(min(g, tail_s) for g in gaps), rel=1e-9, abs=1e-12)
    radio = {k: [(a, a + d) for s_, a, d in intervals if s_ == k] for k in ("tx", "rx")}
    assert j["tx"] == pytest.approx(1.5 * _union_length(radio["tx"]), rel=1e-9, abs=1e-12)
    assert j["rx"] == pytest.approx(0.5 * _union_length(radio["rx"]), rel=1e-9, abs=1e-12)
    assert m.total_j == pytest.approx(sum(j.values()), rel=1e-12)
