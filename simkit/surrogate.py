"""Learning-curve surrogate for the fast what-if mode (``train: false``).

The fast mode runs the identical protocol without tensors, so it cannot measure accuracy. It
predicts it instead from a saturating learning curve fitted on *real* runs of the same workload:

    acc(e) = a_inf - (a_inf - a_0) * exp(-k * e)

where ``e`` is the number of local epochs a client has done. The curve is fitted per algorithm by
least squares on the per-round mean accuracies of the real runs (scipy's ``curve_fit``). Every
result of a fast run says where its accuracy came from (``accuracy_source``), naming the runs.

File format (CSV, written by :func:`save_curves`): ``algorithm, epochs, accuracy, source``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simkit.errors import ConfigError


@dataclass(frozen=True)
class Curve:
    """A fitted learning curve and a label saying which runs it came from."""

    a0: float
    a_inf: float
    k: float
    label: str

    def predict(self, epochs: float) -> float:
        if math.isnan(self.a_inf):
            return float("nan")
        return float(self.a_inf - (self.a_inf - self.a0) * math.exp(-self.k * epochs))


NO_CURVE = Curve(float("nan"), float("nan"), 0.0, "none (fast mode without a surrogate: accuracy not estimated)")


def curve_points(results: Iterable) -> pd.DataFrame:
    """(algorithm, epochs, accuracy, source) points from real :class:`~simkit.run.RunResult` s."""
    rows = []
    for r in results:
        if not r.scenario.train:
            continue
        spec = r.scenario.algorithm
        le = getattr(spec, "local_epochs", 1)
        source = f"{r.scenario.name}/{spec.name}/seed{r.scenario.seed}"
        for row in r.rounds.itertuples():
            if not math.isnan(getattr(row, "accuracy_mean", float("nan"))):
                rows.append({"algorithm": spec.name, "epochs": (row.round + 1) * le,
                             "accuracy": row.accuracy_mean, "source": source})
    return pd.DataFrame(rows, columns=["algorithm", "epochs", "accuracy", "source"])


def save_curves(results: Iterable, path: str | Path) -> Path:
    """Write the learning-curve points of real runs to ``path`` (CSV) for later fast runs."""
    path = Path(path)
    curve_points(results).to_csv(path, index=False)
    return path


def fit_curve(points: pd.DataFrame, label: str) -> Curve:
    """Least-squares fit of the saturating curve to (epochs, accuracy) points."""
    from scipy.optimize import curve_fit

    e = points["epochs"].to_numpy(float)
    a = points["accuracy"].to_numpy(float)

    def f(x, a0, a_inf, k):
        return a_inf - (a_inf - a0) * np.exp(-k * x)

    guess = (max(0.0, float(a.min()) - 0.05), float(a.max()), 0.5)
    try:
        (a0, a_inf, k), _ = curve_fit(f, e, a, p0=guess, bounds=([0, 0, 1e-6], [1, 1, 50]), maxfev=20000)
    except (RuntimeError, ValueError):  # too few points to fit three numbers: hold the last value
        a0 = a_inf = float(a[np.argmax(e)])
        k = 1.0
    return Curve(float(a0), float(a_inf), float(k), label)


def load_curve(path: str | None, scenario) -> Curve:
    """The surrogate for ``scenario``'s algorithm from the CSV at ``path`` (or :data:`NO_CURVE`)."""
    if path is None:
        return NO_CURVE
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read surrogate: {exc}", file=str(path), field="surrogate") from None
    missing = {"algorithm", "epochs", "accuracy", "source"} - set(df.columns)
    if missing:
        raise ConfigError(f"missing column(s) {sorted(missing)}", file=str(path), field="surrogate")
    name = scenario.algorithm.name
    pts = df[df.algorithm == name]
    if pts.empty:
        raise ConfigError(f"no real-run points for algorithm {name!r} (has: {sorted(df.algorithm.unique())})",
                          file=str(path), field="surrogate")
    sources = sorted(pts.source.unique())
    shown = ", ".join(sources[:4]) + (f" and {len(sources) - 4} more" if len(sources) > 4 else "")
    return fit_curve(pts, f"surrogate fitted on {len(sources)} real run(s): {shown}")
