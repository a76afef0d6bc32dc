"""Progress bars (rich) for runs and rounds; kept out of the simulation's logic."""

from __future__ import annotations

import contextlib

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress(quiet: bool = False, **kwargs) -> Progress:
    """A rich progress bar (elapsed, remaining); ``quiet`` hides it."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False, disable=quiet, **kwargs)


@contextlib.contextmanager
def round_progress(total: int, description: str):
    """A progress bar over rounds; yields the ``on_round(done, total)`` callback for :func:`simkit.run`."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total)

        def on_round(done: int, _total: int) -> None:
            progress.update(task, completed=done)

        yield on_round
