"""A grid of stages and the scheduler that runs it.

A grid is seeds x teacher weights x KD methods. Each seed has one baseline student;
each (seed, w) one teacher trained against that seed's student; each (seed, w, method)
one student distilled from that teacher. Every point is an ordinary stage run
(``ttkd.stages``), a child of the grid's parent run, that fetches its partner from the
registry by ``NAME/VERSION`` exactly as a user would. Points train where a scheduler
(``ttkd.studies.scheduler``) puts them: in this process, in worker processes, or on the
nodes of a Ray cluster; a point's results depend on its seed and thread count, never on
where it trained or on the order in which points finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ttkd import attempts, distributed, registry, signals, stages, tracking
from ttkd.console import Terminal
from ttkd.engine import TrainConfig
from ttkd.stages import TAG_PARTNER, StageInterrupted, StageResult

if TYPE_CHECKING:
    from ttkd.studies.scheduler import Scheduler

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)
TAG_POINT = attempts.POINT_TAG


@dataclasses.dataclass(frozen=True)
class Point:
    """One stage of a grid: a baseline ``student``, a ``teacher`` trained with weight
    ``weight`` against that seed's student, or a ``kd`` student distilled from that
    teacher with ``method``."""

    role: str
    seed: int
    weight: float | None = None
    method: str | None = None

    @property
    def key(self) -> str:
        """``student seed=0``, ``teacher seed=0 w=0.005``, ``kd seed=0 w=0.005 method=kd``."""
        parts = [self.role, f"seed={self.seed}"]
        if self.weight is not None:
            parts.append(f"w={self.weight:g}")
        if self.method is not None:
            parts.append(f"method={self.method}")
        return " ".join(parts)

    @property
    def needs(self) -> Point | None:
        """The point whose registered model this one trains beside."""
        if self.role == "teacher":
            return Point("student", self.seed)
        if self.role == "kd":
            return Point("teacher", self.seed, self.weight)
        return None

    def tags(self) -> dict[str, str]:
        """Tags of its run and registered version, so lineage is queryable by point."""
        tags = {TAG_POINT: self.key, "ttkd.seed": str(self.seed)}
        if self.weight is not None:
            tags["ttkd.weight"] = repr(float(self.weight))
        return tags


@dataclasses.dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...]
    weights: tuple[float, ...]
    methods: tuple[str, ...]

    def points(self) -> list[Point]:
        """Every point, seed by seed, each after the point it needs."""
        found = []
        for seed in self.seeds:
            found.append(Point("student", seed))
            found += [Point("teacher", seed, w) for w in self.weights]
            found += [Point("kd", seed, w, m) for w in self.weights for m in self.methods]
        return found


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each point of a grid trains and the name it registers under."""

    grid: Grid
    student_arch: str
    teacher_arch: str
    student_train: TrainConfig
    teacher_train: TrainConfig
    temperature: float                 # T of the teach stage
    method_params: dict[str, dict]     # per KD method, its hyper-parameters
    data: dict                         # dataset, data_dir, stream
    name: Callable[[Point], str]       # the registered model a point's version goes to
    tags: Callable[[Point], dict] = lambda p: {}  # more tags for a point's run and version

    def task(self, point: Point, done: dict[Point, Outcome], parent_run_id: str,
             resume_run: str | None = None, generation: int = 1) -> Task:
        """The stage call that trains ``point``, its partner pinned to the version that
        the point it needs registered; its attempt is of the grid's ``generation``."""
        train = {"student": self.student_train, "teacher": self.teacher_train}
        role = "teacher" if point.role == "teacher" else "student"
        config = dataclasses.replace(train[role], seed=point.seed)
        kw = dict(arch=getattr(self, f"{role}_arch"), train=config, register_as=self.name(point),
                  tags=point.tags() | self.tags(point), parent_run_id=parent_run_id, **self.data)
        if point.needs is not None:
            partner = done[point.needs].result.model
            kw[{"teacher": "student", "kd": "teacher"}[point.role]] = f"{partner.name}/{partner.version}"
        if point.role == "teacher":
            kw |= dict(weight=point.weight, temperature=self.temperature)
        if point.role == "kd":
            kw |= dict(method=point.method, method_params=self.method_params[point.method])
        stage = {"student": "baseline", "teacher": "teach", "kd": "distill"}[point.role]
        return Task(point, stage, kw, resume_run, (generation, 0))


@dataclasses.dataclass(frozen=True)
class Task:
    """A point's stage call, as plain data that a worker process can receive."""

    point: Point
    stage: str
    kwargs: dict
    resume_run: str | None = None   # an unfinished run of this point to continue
    attempt: attempts.Token | None = None  # (the grid's generation, Ray's retry): ttkd.attempts


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a point ended: ``result`` when it registered its model, else ``error``."""

    point: Point
    result: StageResult | None = None
    error: str | None = None
    interrupted: int = 0        # the signal that stopped it, if one did
    superseded: bool = False    # a newer attempt at the point took over (ttkd.attempts)
    seconds: float = 0.0
    reused: bool = False


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
                contextlib.redirect_stderr(sink), _log_to_output():
            outcome = _run_task(task, extra_tags)
        runs = tracking.runs_started()[before:]
        if runs and not outcome.superseded:
            try:
                tracking.log_file(runs[-1], path, "logs")
            except Exception as exc:  # the log is a convenience: the point's outcome stands
                log.warning(f"{task.point.key}: its log could not be kept with run {runs[-1]} ({exc})")
    return outcome


@contextlib.contextmanager
def _log_to_output():
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
        if task.resume_run:
            try:
                result = stages.resume(task.stage, task.resume_run, tags=extra_tags, attempt=task.attempt)
            except stages.NoCheckpoint:  # stopped in its first epoch: start it again
                if tracking.get_run(task.resume_run).info.status == "RUNNING":  # its process died
                    tracking.terminate(task.resume_run, "KILLED")
                result = getattr(stages, task.stage)(**task.kwargs, attempt=task.attempt)
        else:
            result = getattr(stages, task.stage)(**task.kwargs, attempt=task.attempt)
        return Outcome(task.point, result, seconds=time.perf_counter() - start)
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


def latest_attempt(task: Task) -> str | Outcome | None:
    """What an earlier attempt at ``task``'s point left (its process or node died): the
    id of its unfinished run to continue, or, when that run had registered its model and
    only failed to close, its outcome (the run is closed now); None: no earlier attempt."""
    if task.resume_run:
        return task.resume_run
    claimed = attempts.point_run(task.kwargs["parent_run_id"], task.point.key)
    if claimed is not None:  # the run the newest attempt at this point trains in
        run = tracking.get_run(claimed)
        runs = [run] if run.info.lifecycle_stage == "active" else []
    else:  # (a run started before attempts were claimed)
        runs = tracking.child_runs(task.kwargs["parent_run_id"], {TAG_POINT: task.point.key}, newest_first=True,
                                   limit=1)
    if not runs:
        return None
    run = runs[0]
    result = finished_result(run)
    if result is not None:
        if run.info.status != "FINISHED":
            tracking.terminate(run.info.run_id, "FINISHED")
        return Outcome(task.point, result, reused=True)
    return None if run.info.status == "FINISHED" else run.info.run_id


def run(plan: Plan, parent_run_id: str, found: dict[Point, StageResult | str], scheduler: Scheduler, *,
        generation: int = 1, verbose: bool = False,
        on_outcome: Callable[[Outcome, int, int], None] = lambda o, i, n: None
        ) -> tuple[dict[Point, Outcome], int | None]:
    """Train every point of ``plan``'s grid as a child run of ``parent_run_id`` on
    ``scheduler`` (entered: connected, its resources checked).

    ``generation``: this start's (or resume's) count on the parent run, which makes its
    points' attempts newer than any earlier one's (``ttkd.attempts``). ``found`` holds
    what an earlier attempt left: a point's :class:`StageResult` (reused
    as it is) or the id of its unfinished run (continued from its checkpoint). A point
    starts once the point it needs has registered its model; one whose partner failed
    is skipped. SIGINT or SIGTERM stops every running point after its current step (its
    run is marked KILLED) and starts no new one. Returns the outcomes (points never
    started are missing) and the signal that stopped the grid, if any.
    """
    points = plan.grid.points()
    done = {}
    for p in points:
        if isinstance(found.get(p), StageResult):
            done[p] = Outcome(p, found[p], reused=True)
            on_outcome(done[p], len(done), len(points))
    pending = [p for p in points if p not in done]
    with signals.stop_on_signals(scheduler.stop) as stop:
        while pending or scheduler.running:
            for point in list(pending):
                if stop() or not scheduler.free():
                    break
                if point.needs is not None and point.needs not in done:
                    continue  # its partner is still training
                pending.remove(point)
                if point.needs is not None and done[point.needs].result is None:
                    done[point] = Outcome(point, error=f"skipped: {point.needs.key} did not finish")
                    on_outcome(done[point], len(done), len(points))
                    continue
                resume = found.get(point) if isinstance(found.get(point), str) else None
                scheduler.submit(plan.task(point, done, parent_run_id, resume, generation), verbose)
            if not scheduler.running:
                break
            for outcome in scheduler.wait():
                done[outcome.point] = outcome
                on_outcome(outcome, len(done), len(points))
                if outcome.interrupted and not stop():
                    stop.signum = outcome.interrupted  # a point stopped by a signal stops the grid
    return done, stop.signum
