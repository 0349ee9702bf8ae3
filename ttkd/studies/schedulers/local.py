"""The scheduler of this machine: a pool of ``jobs`` processes (this one when ``jobs`` is 1)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterator

import torch

from ttkd import data as datasets
from ttkd import signals, tracking
from ttkd.errors import TTKDError
from ttkd.studies.plan import Outcome, Point, Task
from ttkd.studies.runner import run_task


class WorkerDied(TTKDError):
    """A local worker process died (kill -9, out of memory) while training ``points``."""

    def __init__(self, points: list[str]):
        super().__init__(", ".join(points))
        self.points = points


class LocalPool:
    """``jobs`` points at once, each with ``threads`` CPU threads: in this process when
    ``jobs`` is 1, else in worker processes of their own (spawned, in their own process
    group so that a terminal's Ctrl-C reaches them only through :meth:`stop`)."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads or max(1, torch.get_num_threads() // jobs)
        self._futures: dict[cf.Future, Point] = {}
        self._pool = None

    @property
    def running(self) -> int:
        return len(self._futures)

    def __enter__(self) -> LocalPool:
        if self.jobs == 1:
            self._before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            self._pool = cf.ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_start_worker,
                                                initargs=(self.threads, tracking.tracking_uri()))
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self._pool is None:
            torch.set_num_threads(self._before)
        elif kind is None:
            self._pool.shutdown(wait=True)
        else:  # a dead worker, a second Ctrl-C: do not wait for the others
            for child in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)  # their runs stay RUNNING: resume continues them
            self._pool.shutdown(wait=False, cancel_futures=True)
        return False

    def free(self) -> bool:
        return self.running < self.jobs

    def submit(self, task: Task, verbose: bool) -> None:
        if self._pool is None:
            future = cf.Future()
            future.set_result(run_task(task, verbose))
        else:
            with _signals_blocked():  # a worker started here ignores them until it can take them
                future = self._pool.submit(run_task, task, verbose)
        self._futures[future] = task.point

    def wait(self) -> list[Outcome]:
        finished, _ = cf.wait(self._futures, return_when=cf.FIRST_COMPLETED)
        outcomes = []
        for future in finished:
            try:
                outcomes.append(future.result())
            except cf.process.BrokenProcessPool:
                raise WorkerDied([p.key for p in self._futures.values()]) from None
            del self._futures[future]
        return outcomes

    def stop(self, signum: int) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)


@contextlib.contextmanager
def _signals_blocked() -> Iterator:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_worker(threads: int, tracking_uri: str) -> None:
    """A worker process: its own thread count; no `mlflow run` run of its own to attach
    to; its data sets kept for the points it trains; signals only from the grid (its own
    process group). It starts with them blocked; between points it notes a stop request
    for the next point, which then stops at its first step."""
    os.setpgrp()
    os.environ.pop("MLFLOW_RUN_ID", None)
    tracking.set_tracking_uri(tracking_uri)
    torch.set_num_threads(threads)
    datasets.load_once().__enter__()
    signals.note_signal.installed = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signals.note_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
