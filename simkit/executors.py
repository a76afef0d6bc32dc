"""Where the runs of a study execute: in this process, on a local process pool, or on a Ray cluster.

One interface, three implementations chosen by name (:func:`get_executor`). An executor maps a
*top-level* function ``fn(task) -> outcome`` over tasks and yields ``(task, outcome)`` pairs in
completion order. It knows nothing about simulations: :mod:`simkit.study` gives it the function
(:func:`simkit.study.execute_task`) and the tasks, and writes what comes back.

Why results never depend on the executor: every executor calls the same function on the same
resolved scenario, in a process that runs torch with ONE thread (a 2-core machine runs 2.4-6x
slower with two threads per process, research/perf-baselines.md §5d, and the thread count must
not be a hidden input of the numbers), and the study builds its tables from the written run
folders only, never from what an executor returned.

Failure isolation:

- ``serial``: an exception inside ``fn`` is ``fn``'s business (the study's function catches and
  records it); ``KeyboardInterrupt``/``SystemExit`` stop the study, finished runs stay.
- ``pool``: a worker process that dies (killed, segfault, out of memory) breaks a
  :class:`~concurrent.futures.ProcessPoolExecutor`. The tasks in flight are then re-run one at a
  time in a fresh pool; the one that kills its worker again is reported as :class:`WorkerLost`,
  the others finish normally. So a killed worker costs only its own run.
- ``ray``: tasks are retried by Ray on worker death (``max_retries=2``); after that the task is
  reported as :class:`WorkerLost`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from simkit.errors import StudyError

__all__ = ["Executor", "SerialExecutor", "PoolExecutor", "RayExecutor", "WorkerLost", "get_executor", "EXECUTORS"]

EXECUTORS = ("serial", "pool", "ray")

#: ``on_event(kind, task, *info)``: ``("start", task)`` when a task starts (pool/ray: when it is
#: handed to a worker), ``("round", task, done, total)`` after each simulated round (serial only).
OnEvent = Callable[..., None]


_LOST_MSG = ("the worker process running this run died (killed, crashed or out of memory) and died again when "
             "re-run alone; if every run fails like this, check that the script starting the study guards it with "
             "'if __name__ == \"__main__\":' (worker processes re-import it)")


class WorkerLost(Exception):
    """The process running a task died before the task returned (killed, crashed, out of memory)."""


def _one_thread() -> None:
    """Pin this worker process to one torch/OpenMP thread (see the module docstring)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work already started here
        torch.set_num_interop_threads(1)


class Executor(ABC):
    """Maps ``fn`` over tasks; see the module docstring for the contract.

    Attributes:
        name: ``serial`` | ``pool`` | ``ray``.
        shared_disk: whether ``fn`` runs where the driver's result folder is writable, so the
            worker can write its run folder itself (``True`` for serial and pool). When ``False``
            (Ray: the cluster needs no shared file system) the worker returns the files and the
            driver writes them.
        workers: how many tasks run at once (an estimate for Ray: the cluster's CPUs).
    """

    name: str = ""
    shared_disk: bool = True
    workers: int = 1

    @abstractmethod
    def map_runs(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_event: OnEvent | None = None
                 ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(task, fn(task))`` in completion order; ``fn(task)`` is replaced by a
        :class:`WorkerLost` instance when the worker died, or by the exception if the task could
        not be run at all (for example ``fn`` or the task could not be pickled)."""

    def close(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Release what the executor started (pools, a local Ray instance)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _emit(on_event: OnEvent | None, *args) -> None:
    if on_event is not None:
        on_event(*args)


class SerialExecutor(Executor):
    """Runs every task in this process, one after another (debugging, notebooks, profiling).

    ``fn`` is called as ``fn(task, on_round=callback)`` so a progress bar can follow the rounds
    of the run in progress.
    """

    name = "serial"
    shared_disk = True
    workers = 1

    def map_runs(self, fn, tasks, on_event=None):
        for task in tasks:
            _emit(on_event, "start", task)

            def on_round(done: int, total: int, _task=task) -> None:
                _emit(on_event, "round", _task, done, total)

            yield task, fn(task, on_round=on_round)


#: imported once by the fork server, so each worker starts warm: torch's first forward pass
#: imports torch._dynamo (~1.7 s) and the digits data import scikit-learn (~1.8 s)
_PRELOAD = ["torch", "torch._dynamo", "sklearn.datasets", "simkit.run", "simkit.study"]


def _mp_context():
    """``forkserver`` where it exists (each worker forks from a server that has already imported
    torch and simkit, so a worker starts in milliseconds instead of ~2-4 s), else ``spawn``.
    Never plain ``fork``: forking a process whose torch thread pool is running can deadlock."""
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


class PoolExecutor(Executor):
    """A local :class:`~concurrent.futures.ProcessPoolExecutor`, one torch thread per worker.

    Args:
        workers: number of worker processes (default ``os.cpu_count()``).
    """

    name = "pool"
    shared_disk = True

    def __init__(self, workers: int | None = None):
        self.workers = int(workers or os.cpu_count() or 1)
        if self.workers < 1:
            raise StudyError(f"workers must be at least 1, got {workers}")
        self._pool: cf.ProcessPoolExecutor | None = None

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context(), initializer=_one_thread)

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map_runs(self, fn, tasks, on_event=None):
        pending = deque(tasks)
        suspects: deque = deque()  # in flight when a worker died: re-run one at a time
        inflight: dict[cf.Future, Any] = {}
        alone: set[cf.Future] = set()  # futures that ran alone in their pool
        try:
            while pending or suspects or inflight:
                if self._pool is None:
                    self._pool = self._new_pool()
                if suspects:
                    if not inflight:
                        task = suspects.popleft()
                        fut = self._pool.submit(fn, task)
                        inflight[fut] = task
                        alone.add(fut)
                        _emit(on_event, "start", task)
                else:
                    while pending and len(inflight) < self.workers:
                        task = pending.popleft()
                        inflight[self._pool.submit(fn, task)] = task
                        _emit(on_event, "start", task)
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                broken = False
                for fut in done:
                    task = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if fut in alone:
                            yield task, WorkerLost(_LOST_MSG)
                        else:
                            suspects.append(task)
                    except Exception as exc:  # fn or task not picklable, ...
                        yield task, exc
                    else:
                        yield task, result
                    alone.discard(fut)
                if broken:
                    # every other future of a broken pool fails too: collect them as suspects
                    for fut in list(inflight):
                        task = inflight.pop(fut)
                        try:
                            result = fut.result()
                        except BrokenProcessPool:
                            suspects.append(task)
                        except Exception as exc:
                            yield task, exc
                        else:
                            yield task, result
                        alone.discard(fut)
                    self._drop_pool()
        finally:
            if inflight and self._pool is not None:  # interrupted: stop the runs in flight now
                procs = list((getattr(self._pool, "_processes", None) or {}).values())
                self._pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:  # their half-written .tmp folders are swept by the next run
                    proc.terminate()
                self._pool = None

    def close(self) -> None:
        self._drop_pool()


def _ray_call(fn, task):
    """What a Ray worker runs: one torch thread, then ``fn(task)``."""
    _one_thread()
    return fn(task)


class RayExecutor(Executor):
    """Ray core tasks: one task per run, ``num_cpus=1``, ``num_gpus=1`` for runs whose scenario
    asks for a CUDA device, ``max_retries=2`` on worker death.

    Args:
        address: ``None`` starts a local Ray instance with ``workers`` (default
            ``os.cpu_count()``) CPUs and shuts it down afterwards; ``"auto"`` or ``"HOST:PORT"``
            joins an existing cluster (``ray start --head`` on one machine, ``ray start
            --address HEAD:6379`` on the others). If Ray is already initialised in this process
            (a notebook, a test fixture), that instance is used and left running.
        workers: CPUs of the local instance (ignored when joining a cluster).

    Workers return the run's files to the driver, which writes the run folders: the cluster
    needs no shared file system, only simkit installed on every node.
    """

    name = "ray"
    shared_disk = False

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise StudyError("the 'ray' executor needs Ray: pip install 'simkit[ray]' "
                             "(or pip install 'ray[default]>=2.9')") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=int(workers or os.cpu_count() or 1), include_dashboard=False,
                             log_to_driver=False)
            except Exception as exc:  # ConnectionError, ValueError, ... from ray.init
                where = f"at {address!r}" if address else "locally"
                raise StudyError(f"cannot start or reach a Ray cluster {where}: {exc}") from None
            self._started = True
        resources = ray.cluster_resources()
        self.workers = max(1, int(resources.get("CPU", 1)))
        self._gpus = float(resources.get("GPU", 0))
        self._remote = ray.remote(_ray_call)

    def map_runs(self, fn, tasks, on_event=None):
        ray = self._ray
        pending = deque(tasks)
        inflight: dict[Any, Any] = {}  # in submission order
        started: set = set()
        # enough queued work to keep every CPU busy, few enough results waiting in the object store
        limit = 2 * self.workers + 2
        try:
            while pending or inflight:
                while pending and len(inflight) < limit:
                    task = pending.popleft()
                    gpu = bool(getattr(task, "gpu", False))
                    if gpu and not self._gpus:  # Ray would wait for a GPU node for ever
                        yield task, StudyError("the run asks for a CUDA device but the Ray cluster has no GPU",
                                               field="workload.torch_device")
                        continue
                    opts = dict(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=2)
                    inflight[self._remote.options(**opts).remote(fn, task)] = task
                # "running" is an estimate: the oldest tasks in flight, one per CPU
                for ref in list(inflight)[: self.workers]:
                    if ref not in started:
                        started.add(ref)
                        _emit(on_event, "start", inflight[ref])
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    task = inflight.pop(ref)
                    started.discard(ref)
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                        yield task, WorkerLost(f"the Ray worker running this run died (after retries): {exc}")
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        yield task, cause if isinstance(cause, Exception) else exc
                    except ray.exceptions.RayError as exc:
                        yield task, WorkerLost(f"Ray could not run this run: {exc}")
                    else:
                        yield task, result
        finally:
            for ref in inflight:  # interrupted: best effort on the way out
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def get_executor(name: str = "pool", *, workers: int | None = None, address: str | None = None) -> Executor:
    """The executor called ``name`` (``serial``, ``pool`` or ``ray``)."""
    if name == "serial":
        return SerialExecutor()
    if name == "pool":
        return PoolExecutor(workers)
    if name == "ray":
        return RayExecutor(address=address, workers=workers)
    raise StudyError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}", field="executor")

