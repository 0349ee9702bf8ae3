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
from collections.abc import Callable

from ttkd import attempts
from ttkd.config import TrainConfig
from ttkd.stages import StageResult

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
