"""Flat, immutable records of everything that happens in a run, and the recorder that keeps them.

Records are plain tuples appended to per-kind lists (cheap on the hot path, STYLE.md #16); they
become pandas DataFrames only at the edge (:meth:`Recorder.frames`). Every time is simulated
seconds (``env.now``), never the host clock.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple


_tnew = tuple.__new__


class ComputeRecord(NamedTuple):
    device: str
    start: float
    end: float
    flops: float
    tag: str
    round: int
    status: str  # "done" | "interrupted"


class TransferRecord(NamedTuple):
    flow: int
    src: str
    dst: str
    nbytes: float
    start: float
    data_start: float
    end: float
    tag: str
    round: int
    status: str  # "delivered" | "dropped"


class StateRecord(NamedTuple):
    device: str
    time: float
    state: str  # "on" | "off" | "battery_empty" | "crash" | "link_down" | "link_up" ...
    detail: str


class DropoutRecord(NamedTuple):
    device: str
    time: float
    round: int
    reason: str
    detail: str


class EvalRecord(NamedTuple):
    round: int
    client: str
    time: float
    accuracy: float
    loss: float
    n: int


class RoundRecord(NamedTuple):
    round: int
    start: float
    end: float
    participants: int
    phase: str


class SelectionRecord(NamedTuple):
    round: int
    step: int
    client: str
    score: float
    selected: bool


class MetricRecord(NamedTuple):
    round: int
    client: str
    name: str
    value: float


RECORD_TYPES = {
    "compute": ComputeRecord,
    "transfer": TransferRecord,
    "state": StateRecord,
    "dropout": DropoutRecord,
    "eval": EvalRecord,
    "round": RoundRecord,
    "selection": SelectionRecord,
    "metric": MetricRecord,
}


class Recorder:
    """Collects records of one run.

    Args:
        timeline: keep per-event compute/transfer records (the timeline). Totals are kept either
            way, so a 10,000-device what-if run can switch the timeline off and still report.
    """

    def __init__(self, timeline: bool = True):
        self.timeline = timeline
        self.lists: dict[str, list] = {k: [] for k in RECORD_TYPES}
        self.round = -1
        # running totals, kept even without the timeline (defaultdicts: one `+=` per record on the
        # hot path; read them with .get, which never inserts)
        self.flops_by_device: dict[str, float] = defaultdict(float)
        self.flops_by_tag: dict[str, float] = defaultdict(float)
        self.bytes_by_tag: dict[str, float] = defaultdict(float)
        self.bytes_sent: dict[str, float] = defaultdict(float)
        self.bytes_received: dict[str, float] = defaultdict(float)

    def compute(self, device: str, start: float, end: float, flops: float, tag: str, status: str = "done") -> None:
        if status == "done":
            self.flops_by_device[device] += flops
            self.flops_by_tag[tag] += flops
        if self.timeline:
            # (tuple.__new__: what the NamedTuple's own __new__ does, without its Python-level frame)
            self.lists["compute"].append(_tnew(ComputeRecord, (device, start, end, flops, tag, self.round, status)))

    def transfer(self, flow: int, src: str, dst: str, nbytes: float, start: float, data_start: float,
                 end: float, tag: str, status: str = "delivered") -> None:
        if status == "delivered":
            self.bytes_by_tag[tag] += nbytes
            self.bytes_sent[src] += nbytes
            self.bytes_received[dst] += nbytes
        if self.timeline:
            self.lists["transfer"].append(
                _tnew(TransferRecord, (flow, src, dst, nbytes, start, data_start, end, tag, self.round, status)))

    def state(self, device: str, time: float, state: str, detail: str = "") -> None:
        self.lists["state"].append(StateRecord(device, time, state, detail))

    def dropout(self, device: str, time: float, reason: str, detail: str = "") -> None:
        self.lists["dropout"].append(DropoutRecord(device, time, self.round, reason, detail))

    def eval(self, client: str, time: float, accuracy: float, loss: float, n: int) -> None:
        self.lists["eval"].append(EvalRecord(self.round, client, time, accuracy, loss, n))

    def round_done(self, start: float, end: float, participants: int, phase: str = "") -> None:
        self.lists["round"].append(RoundRecord(self.round, start, end, participants, phase))

    def selection(self, step: int, client: str, score: float, selected: bool) -> None:
        self.lists["selection"].append(SelectionRecord(self.round, step, client, score, selected))

    def metric(self, client: str, name: str, value: float) -> None:
        self.lists["metric"].append(MetricRecord(self.round, client, name, value))

    def frames(self):
        """All records as pandas DataFrames, one per kind (empty frames keep their columns)."""
        import pandas as pd

        return {k: pd.DataFrame(self.lists[k], columns=list(RECORD_TYPES[k]._fields)) for k in RECORD_TYPES}
