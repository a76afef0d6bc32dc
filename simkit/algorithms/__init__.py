"""Training protocols as SimPy processes: one module per algorithm."""

from simkit.algorithms.adasplit import AdaSplit
from simkit.algorithms.base import Algorithm, Context
from simkit.algorithms.fedavg import FedAvg
from simkit.algorithms.sl import SplitLearning
from simkit.algorithms.splitfed import SplitFed

REGISTRY: dict[str, type[Algorithm]] = {
    "fedavg": FedAvg,
    "fedprox": FedAvg,
    "sl": SplitLearning,
    "splitfed": SplitFed,
    "adasplit": AdaSplit,
}


def register(name: str, cls: type[Algorithm]) -> None:
    """Add an algorithm class under ``name`` (used by AdaSplit and by users' own protocols)."""
    REGISTRY[name] = cls


__all__ = ["Algorithm", "Context", "REGISTRY", "register", "FedAvg", "SplitLearning", "SplitFed", "AdaSplit"]
