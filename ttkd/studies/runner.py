"""Running a plan: the points go to a scheduler, each as soon as its partner is registered,
and a scheduler's worker executes one point here (:func:`run_task`).

Points train where the scheduler (``ttkd.studies.schedulers``) puts them: in this process,
in worker processes, or on the nodes of a Ray cluster; a point's results depend on its seed
and thread count, never on where it trained or on the order in which points finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ttkd import distributed, resuming, signals, stages, tracking
from ttkd.callbacks import StopTraining
from ttkd.console import Terminal
from ttkd.errors import TTKDError
from ttkd.stages import TAG_PARTNER, StageInterrupted, StageResult
from ttkd.studies import trials
from ttkd.studies.plan import TAG_POINT, TAG_TRIAL, Grid, Outcome, Plan, Point, Task, TrialPoint
from ttkd.studies.schedulers import Scheduler
from ttkd.tracking import attempts, registry

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)


def run_task(task: Task, verbose: bool = False, extra_tags: dict[str, str] | None = None) -> Outcome:
    """Train one point; never raises for a failure of the point itself (a NaN, an
    unreachable store): the outcome says what went wrong, and the grid goes on.
    ``extra_tags`` (where it trains) also go on a continued run. Without ``verbose`` (the
    grid prints a line per point) what the stage prints goes to a file, kept with the
    point's run as ``logs/stage-TIME.log`` (an attempt a newer one superseded keeps none)."""
    if verbose:
        return _run_task(task, extra_tags)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"stage-{time.strftime('%Y%m%d-%H%M%S')}.log"
        before = len(tracking.runs_started())
        with open(path, "w", buffering=1) as sink, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink), log_to_output():
            outcome = _run_task(task, extra_tags)
        runs = tracking.runs_started()[before:]
        if runs and not outcome.superseded:
            try:
                tracking.log_file(runs[-1], path, "logs")
            except Exception as exc:  # the log is a convenience: the point's outcome stands
                log.warning(f"{task.point.key}: its log could not be kept with run {runs[-1]} ({exc})")
    return outcome


@contextlib.contextmanager
def log_to_output():
    """ttkd's log as the terminal shows it (``console.Terminal``), on whatever stdout and stderr
    are, and there alone while active: in any process, configured or not."""
    logger = logging.getLogger("ttkd")
    before = logger.handlers, logger.level, logger.propagate
    logger.handlers, logger.propagate = [Terminal()], False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = before[0], before[2]
        logger.setLevel(before[1])


def _run_task(task: Task, extra_tags: dict[str, str] | None) -> Outcome:
    start = time.perf_counter()
    try:
        callbacks = (trials.reporter(task.report),) if task.report is not None else ()
        stage = task.kwargs["stage"] if task.stage == "trial" else task.stage
        if task.resume_run:
            try:
                result = resuming.resume(stage, task.resume_run, tags=extra_tags, attempt=task.attempt,
                                         callbacks=callbacks)
            except resuming.NoCheckpoint:  # stopped in its first epoch: start it again
                if tracking.get_run(task.resume_run).info.status == "RUNNING":  # its process died
                    tracking.terminate(task.resume_run, "KILLED")
                result = getattr(stages, task.stage)(**task.kwargs, attempt=task.attempt, callbacks=callbacks)
        else:
            result = getattr(stages, task.stage)(**task.kwargs, attempt=task.attempt, callbacks=callbacks)
        return Outcome(task.point, result, seconds=time.perf_counter() - start)
    except StopTraining as exc:  # a trial its pruner stopped
        return Outcome(task.point, error=str(exc), pruned=exc.epoch, seconds=time.perf_counter() - start)
    except StageInterrupted as exc:
        return Outcome(task.point, error=str(exc), interrupted=exc.exit_code - 128,
                       seconds=time.perf_counter() - start)
    except attempts.Superseded as exc:
        return Outcome(task.point, error=str(exc), superseded=True, seconds=time.perf_counter() - start)
    except distributed.Lost:  # the other processes are gone: the grid cannot go on
        raise
    except Exception as exc:
        if os.environ.get("TTKD_DEBUG"):
            traceback.print_exc(file=sys.__stderr__)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if distributed.busy():  # failed here alone: the other processes are still inside the stage
            raise distributed.Lost(f"{task.point.key} failed in the leading process alone ({message}); "
                                   f"the other processes cannot follow it to the next stage") from None
        return Outcome(task.point, error=message, seconds=time.perf_counter() - start)


def finished_result(run) -> StageResult | None:
    """A point's result from its run, if the run registered its model."""
    tags = run.data.tags
    if "ttkd.registered_model" not in tags:
        return None
    ref = registry.resolve(tags["ttkd.registered_model"])
    partner = registry.resolve(tags[TAG_PARTNER]) if TAG_PARTNER in tags else None
    m = run.data.metrics
    return StageResult(run.info.run_id, ref, m["val_acc"], m.get("agreement"), partner, m.get("partner_val_acc"))


def found_points(parent_id: str, grid: Grid) -> dict[Point, StageResult | str]:
    """What an earlier attempt left of each point: its result (finished and registered)
    or its newest unfinished run's id (to continue)."""
    points = {p.key: p for p in grid.points()}
    found: dict[Point, StageResult | str] = {}
    for r in tracking.child_runs(parent_id):  # oldest first: a point's newest run wins
        point, tags = points.get(r.data.tags.get(TAG_POINT, "")), r.data.tags
        if point is None:
            continue
        if r.info.status == "FINISHED" and "ttkd.registered_model" in tags:
            found[point] = finished_result(r)
        elif r.info.status != "FINISHED":
            found[point] = r.info.run_id
    return found


def current_run(parent_id: str, key: str):
    """The run of point (or trial) ``key`` under ``parent_id``: the one its newest attempt claimed,
    unless deleted, else (a run started before attempts were claimed) the newest with its tag."""
    claimed = attempts.point_run(parent_id, key)
    if claimed is not None:
        run = tracking.get_run(claimed)
        return run if run is not None and run.info.lifecycle_stage == "active" else None
    runs = tracking.child_runs(parent_id, {TAG_POINT: key}, newest_first=True, limit=1)
    return runs[0] if runs else None


def abandon(parent: str, point: TrialPoint) -> None:
    """Mark KILLED what an interrupted teacher search's trial left running (its teacher's run, its
    KD student's), which the trial, asked again, does not continue."""
    for key in (f"{point.key} teacher", point.key):
        run = current_run(parent, key)
        if run is not None and run.info.status == "RUNNING":
            tracking.terminate(run.info.run_id, "KILLED")


def trial_outcome(point: TrialPoint, run) -> Outcome:
    """How a search's trial ended, read from its finished run: pruned after an epoch (tag
    ``ttkd.pruned``), or its last epoch's holdout_acc."""
    pruned = run.data.tags.get(trials.TAG_PRUNED)
    if pruned:
        return Outcome(point, error=f"{point.key} pruned after epoch {pruned}", pruned=int(pruned), reused=True)
    m = run.data.metrics
    return Outcome(point, StageResult(run.info.run_id, None, m["holdout_acc"], m.get("holdout_agreement"), None,
                                      None, "holdout"), reused=True)


def latest_attempt(task: Task) -> str | Outcome | None:
    """What an earlier attempt at ``task``'s point left (its process or node died): the
    id of its unfinished run to continue, or, when that run had registered its model and
    only failed to close, its outcome (the run is closed now); None: no earlier attempt."""
    if task.resume_run:
        return task.resume_run
    run = current_run(task.kwargs["parent_run_id"], task.point.key)
    if run is None:
        return None
    if run.info.status == "FINISHED" and TAG_TRIAL in run.data.tags:  # a trial registers nothing: its run tells
        return trial_outcome(task.point, run)
    if task.stage == "trial" and task.kwargs["stage"] == "teach":  # its teacher was not kept: train it again
        abandon(task.kwargs["parent_run_id"], task.point)
        return None
    result = finished_result(run)
    if result is not None:
        if run.info.status != "FINISHED":
            tracking.terminate(run.info.run_id, "FINISHED")
        return Outcome(task.point, result, reused=True)
    return None if run.info.status == "FINISHED" else run.info.run_id


class Source(Protocol):
    """What a study hands the scheduler, one point at a time: a grid's points as their partners
    are registered, or a search's trials as Optuna asks for them (``ttkd.studies.search``)."""

    verbose: bool  # the points' stages print to the terminal (else each to its run's log file)

    def ask(self) -> Task | None:
        """The next point to train now; None: none now (the runner waits for one to finish)."""

    def tell(self, outcome: Outcome) -> None:
        """How a point handed out by ``ask`` ended."""


def drive(source: Source, scheduler: Scheduler) -> int | None:
    """Hand ``source``'s points to ``scheduler`` (entered: connected, its resources checked)
    while it has room, and tell the source how each ended, until the source asks for nothing
    more and nothing is running. SIGINT or SIGTERM stops every running point after its current
    step (its run is marked KILLED) and starts no new one; a point stopped by a signal stops
    the rest alike. Returns the signal that stopped it, if any."""
    with signals.stop_on_signals(scheduler.stop) as stop:
        while True:
            while not stop() and scheduler.free():
                task = source.ask()
                if task is None:
                    break
                scheduler.submit(task, source.verbose)
            if not scheduler.running:
                break
            for outcome in scheduler.wait():
                source.tell(outcome)
                if outcome.interrupted and not stop():
                    stop.signum = outcome.interrupted
    return stop.signum


class GridSource:
    """A grid's points in order, each once the point it needs has registered its model; one
    whose partner failed is skipped. ``found``, ``generation``: as in :func:`run`."""

    def __init__(self, plan: Plan, parent_run_id: str, found: dict[Point, StageResult | str], generation: int,
                 verbose: bool, on_outcome: Callable[[Outcome, int, int], None]):
        self.plan, self.parent, self.found, self.generation = plan, parent_run_id, found, generation
        self.verbose, self.on_outcome = verbose, on_outcome
        self.points = plan.grid.points()
        self.done: dict[Point, Outcome] = {}
        for p in self.points:
            if isinstance(found.get(p), StageResult):
                self.tell(Outcome(p, found[p], reused=True))
        self.pending = [p for p in self.points if p not in self.done]

    def ask(self) -> Task | None:
        for point in list(self.pending):
            if point.needs is not None and point.needs not in self.done:
                continue  # its partner is still training
            self.pending.remove(point)
            if point.needs is not None and self.done[point.needs].result is None:
                self.tell(Outcome(point, error=f"skipped: {point.needs.key} did not finish"))
                continue
            resume = self.found.get(point) if isinstance(self.found.get(point), str) else None
            return self.plan.task(point, self.done, self.parent, resume, self.generation)
        return None

    def tell(self, outcome: Outcome) -> None:
        self.done[outcome.point] = outcome
        self.on_outcome(outcome, len(self.done), len(self.points))


def run(plan: Plan, parent_run_id: str, found: dict[Point, StageResult | str], scheduler: Scheduler, *,
        generation: int = 1, verbose: bool = False,
        on_outcome: Callable[[Outcome, int, int], None] = lambda o, i, n: None
        ) -> tuple[dict[Point, Outcome], int | None]:
    """Train every point of ``plan``'s grid as a child run of ``parent_run_id`` on
    ``scheduler`` (entered: connected, its resources checked).

    ``generation``: this start's (or resume's) count on the parent run, which makes its
    points' attempts newer than any earlier one's (``ttkd.tracking.attempts``). ``found`` holds
    what an earlier attempt left: a point's :class:`StageResult` (reused
    as it is) or the id of its unfinished run (continued from its checkpoint). A point
    starts once the point it needs has registered its model; one whose partner failed
    is skipped. Returns the outcomes (points never started are missing) and the signal that
    stopped the grid, if any (:func:`drive`).
    """
    source = GridSource(plan, parent_run_id, found, generation, verbose, on_outcome)
    signum = drive(source, scheduler)
    return source.done, signum


def point_line(o: Outcome, i: int, n: int) -> str:
    """A grid's line for its ``i``-th finished point of ``n``."""
    head = f"[{i:>{len(str(n))}}/{n}] {o.point.key}"
    if o.result is not None:
        how = "reused" if o.reused else f"{o.seconds:.1f} s"
        return f"{head}: val_acc {o.result.val_acc:.2f}% {o.result.model.uri} ({how})"
    if o.interrupted:
        return f"{head}: {o.error.split(';')[0]}; its run is KILLED and resuming the sweep continues it"
    return f"{head}: FAILED: {o.error}"


TAG_PARTNERS = "ttkd.tuning"  # a run of the student or teacher a tuned sweep's or a search's trials train beside


def run_partners(plan: Plan, parent_id: str, scheduler: Scheduler, generation: int, kind: str,
                 on_outcome: Callable[[Outcome, int, int], None]) -> dict[Point, Outcome]:
    """Train the student and teachers that trials train beside (``plan``'s grid, its runs tagged
    ``ttkd.tuning=partner``) as children of ``kind`` run ``parent_id``, reusing those an earlier
    start finished; raises unless every one finished."""
    plan = dataclasses.replace(plan, tags=lambda p: {TAG_PARTNERS: "partner"})
    outcomes, signum = run(plan, parent_id, found_points(parent_id, plan.grid), scheduler, generation=generation,
                           on_outcome=on_outcome)
    if signum is not None:
        raise StageInterrupted(f"stopped by {signal.Signals(signum).name} while training the student and teachers "
                               f"the trials train beside; {kind} run {parent_id} is marked KILLED: continue it with "
                               f"resume={parent_id}", signum)
    failed = [o for o in outcomes.values() if o.result is None]
    if failed:
        raise TTKDError(f"{failed[0].point.key}, which the trials train beside, did not finish ({failed[0].error}); "
                        f"{kind} run {parent_id} is marked FAILED: resume={parent_id} retries it")
    return outcomes
