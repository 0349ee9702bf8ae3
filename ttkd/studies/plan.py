"""The plan of a grid: its points, what each needs and the stage call that trains it.

A grid is seeds x teacher weights x KD methods. Each seed has one baseline student;
each (seed, w) one teacher trained against that seed's student; each (seed, w, method)
one student distilled from that teacher. Every point is an ordinary stage run
(``ttkd.stages``), a child of the grid's parent run, that fetches its partner from the
registry by ``NAME/VERSION`` exactly as a user would. A :class:`Task` is a point's stage
call as plain data, which ``ttkd.studies.runner`` hands to a scheduler
(``ttkd.studies.schedulers``) and a scheduler's worker executes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from ttkd.config import TRAIN, TrainConfig, method_uses
from ttkd.parsing import axis_roles, show
from ttkd.presets import method_params
from ttkd.stages import StageResult
from ttkd.studies.space import Axes, Values, combinations, own_axes, restrict
from ttkd.tracking import attempts

TAG_POINT = attempts.POINT_TAG


@dataclasses.dataclass(frozen=True)
class Point:
    """One stage of a grid: a baseline ``student``, a ``teacher`` trained with weight
    ``weight`` against that seed's student, or a ``kd`` student distilled from that
    teacher with ``method``; ``values``: what the sweep's other axes give it (``space``)."""

    role: str
    seed: int
    weight: float | None = None
    method: str | None = None
    values: Values = ()

    @property
    def key(self) -> str:
        """``student seed=0``, ``teacher seed=0 w=0.005``, ``kd seed=0 w=0.005 method=kd``, then
        each axis's value: ``kd seed=0 w=0.005 method=kd kd_temperature=2``."""
        parts = [self.role, f"seed={self.seed}"]
        if self.weight is not None:
            parts.append(f"w={self.weight:g}")
        if self.method is not None:
            parts.append(f"method={self.method}")
        return " ".join(parts + [f"{n}={show(v)}" for n, v in self.values])

    @property
    def needs(self) -> Point | None:
        """The point whose registered model this one trains beside."""
        if self.role == "teacher":
            return Point("student", self.seed, values=restrict(self.values, "student"))
        if self.role == "kd":
            return Point("teacher", self.seed, self.weight, values=restrict(self.values, "teacher"))
        return None

    @property
    def arm(self) -> str | None:
        """The arm of a tuned sweep (``ttkd.studies.tuning``) whose configuration this point trains
        with: ``student`` (the student without KD), ``METHOD w=W`` (a KD student), None (a teacher)."""
        if self.role == "teacher":
            return None
        return "student" if self.role == "student" else f"{self.method} w={self.weight:g}"

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
    axes: Axes = ()

    def points(self) -> list[Point]:
        """Every point, seed by seed, each after the point it needs."""
        found = []
        for seed in self.seeds:
            for sv in combinations(own_axes(self.axes, "student")):
                found.append(Point("student", seed, values=sv))
                for w, tv in itertools.product(self.weights, combinations(own_axes(self.axes, "teacher"))):
                    found.append(Point("teacher", seed, w, values=sv + tv))
                    found += [Point("kd", seed, w, m, sv + tv + kv) for m in self.methods
                              for kv in combinations(own_axes(self.axes, "kd", m))]
        return [dataclasses.replace(p, values=_in_order(p.values, self.axes)) for p in found]


def _in_order(values: Values, axes: Axes) -> Values:
    order = [n for n, _ in axes]
    return tuple(sorted(values, key=lambda nv: order.index(nv[0])))


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
    tuned: dict[str, dict] = dataclasses.field(default_factory=dict)  # a tuned sweep's choice per arm

    def task(self, point: Point, done: dict[Point, Outcome], parent_run_id: str,
             resume_run: str | None = None, generation: int = 1, partner_of: bool = True) -> Task:
        """The stage call that trains ``point``, its partner pinned to the version that
        the point it needs registered (without ``partner_of``: no partner, to check the call
        before anything trained); its attempt is of the grid's ``generation``."""
        train = {"student": self.student_train, "teacher": self.teacher_train}
        role = "teacher" if point.role == "teacher" else "student"
        given = {n: v for n, v in point.values if point.role in axis_roles(n)}  # what feeds this stage
        given |= {n: v for n, v in self.tuned.get(point.arm, {}).items() if point.role in axis_roles(n)}
        config = dataclasses.replace(train[role], seed=point.seed, **{
            n.rpartition(".")[2]: v for n, v in given.items() if n.rpartition(".")[2] in TRAIN})
        kw = dict(arch=given.get(f"{role}_arch", getattr(self, f"{role}_arch")), train=config,
                  register_as=self.name(point), tags=point.tags() | self.tags(point), parent_run_id=parent_run_id,
                  **self.data)
        if point.needs is not None and partner_of:
            partner = done[point.needs].result.model
            kw[{"teacher": "student", "kd": "teacher"}[point.role]] = f"{partner.name}/{partner.version}"
        if point.role == "teacher":
            kw |= dict(weight=point.weight, temperature=given.get("temperature", self.temperature))
        if point.role == "kd":
            reads = dict(zip(method_params("sweep", point.method), method_uses(point.method)))  # study name: own
            own = {reads[n]: v for n, v in given.items() if n in reads}
            kw |= dict(method=point.method, method_params=self.method_params[point.method] | own)
        stage = {"student": "baseline", "teacher": "teach", "kd": "distill"}[point.role]
        return Task(point, stage, kw, resume_run, (generation, 0))


@dataclasses.dataclass(frozen=True)
class TrialPoint:
    """One trial of a search (``ttkd.studies.search``): its number in the Optuna study and
    the values the sampler asked for; it needs no other point."""

    number: int
    values: Values = ()
    needs = None

    @property
    def key(self) -> str:
        return f"trial {self.number}"

    def tags(self) -> dict[str, str]:
        return {TAG_POINT: self.key, TAG_TRIAL: str(self.number)}


TAG_TRIAL = "ttkd.trial"  # a search's trial: its number in the Optuna study


@dataclasses.dataclass(frozen=True)
class Task:
    """A point's stage call, as plain data that a worker process can receive."""

    point: Point | TrialPoint
    stage: str
    kwargs: dict
    resume_run: str | None = None   # an unfinished run of this point to continue
    attempt: attempts.Token | None = None  # (the grid's generation, Ray's retry): ttkd.tracking.attempts
    report: Any = None              # a trial's line to its Optuna study (ttkd.studies.trials.Report)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a point ended: ``result`` when it registered its model, else ``error``."""

    point: Point | TrialPoint
    result: StageResult | None = None
    error: str | None = None
    interrupted: int = 0        # the signal that stopped it, if one did
    pruned: int = 0             # a trial: the epoch after which its pruner stopped it
    superseded: bool = False    # a newer attempt at the point took over (ttkd.tracking.attempts)
    seconds: float = 0.0
    reused: bool = False
