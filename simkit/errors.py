"""Errors simkit raises on purpose.

Every error a user can cause (a bad scenario, profile, topology, trace or dataset) is a
:class:`SimkitError` subclass that names the *file*, the *field* and the *reason*, so the CLI
can print one clear line instead of a traceback from deep inside a library.
"""

from __future__ import annotations

import contextlib


class SimkitError(Exception):
    """Base class of every error simkit raises for bad input or an impossible scenario.

    Args:
        reason: what is wrong, in words a user can act on.
        file: the file the bad value came from (``None`` for values built in Python).
        field: dotted path of the offending field inside that file (``None`` if not a field).
    """

    def __init__(self, reason: str, *, file: str | None = None, field: str | None = None):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.field = field
        super().__init__(self._message())

    def __str__(self) -> str:
        return self._message()

    def _message(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ": ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason


@contextlib.contextmanager
def naming_file(file: str | None):
    """Inside this block, a SimkitError raised without a file is given ``file`` (the scenario
    it came from), so an error found while building the world still names its source."""
    try:
        yield
    except SimkitError as exc:
        if exc.file is None and file is not None:
            exc.file = str(file)
            exc.args = (exc._message(),)
        raise


class ConfigError(SimkitError):
    """A scenario file or scenario dict is invalid."""


class ProfileError(SimkitError):
    """A device profile is invalid or unknown."""


class TopologyError(SimkitError):
    """A topology file or generator spec is invalid, or the graph cannot serve the fleet."""


class TraceError(SimkitError):
    """An availability trace CSV is malformed."""


class DatasetError(SimkitError):
    """A dataset is unknown, not installed, or its files are malformed."""


class WorkloadError(SimkitError):
    """The workload cannot run as configured (cut layer out of range, batch too large, ...)."""


class StudyError(SimkitError):
    """A study cannot run or its result folder cannot be used."""
