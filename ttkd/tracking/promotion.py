"""Promotion: point an alias at the best version of a registered model.

A version is judged by its own run's metric, or (a teacher) by the mean metric of the
students distilled from it; a cost budget (latency, parameters) leaves out the versions
that exceed it. A worse version never takes the alias from a better one unless forced.
"""

from __future__ import annotations

import dataclasses
import math
import re

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ttkd.errors import TTKDError
from ttkd.tracking.registry import (
    DEFAULT_ALIAS,
    MAX_NAME,
    TAG_PARTNER,
    check_registered,
    prepare_store,
    resolve,
    retry_locked,
    sorted_versions,
)


@dataclasses.dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: the alias moved from ``old`` to ``new`` (or not)."""

    name: str
    alias: str
    metric: str
    old: str | None          # version that held the alias before, if any
    old_value: float | None
    new: str
    new_value: float
    moved: bool
    evidence: tuple[str, ...] = ()   # by students: one line per version

    def __str__(self) -> str:
        new = f"version {self.new} ({self.metric} {self.new_value:.4g})"
        old = ("(unset)" if not self.old else f"version {self.old}" + (
            f" ({self.metric} {self.old_value:.4g})" if self.old_value is not None else " (not judged here)"))
        line = (f"{self.name}@{self.alias} unchanged: already {new}" if not self.moved
                else f"{self.name}@{self.alias}: {old} -> {new}")
        return "\n".join(self.evidence + (line,))


def lower_is_better(metric: str) -> bool:
    """Metrics named like losses or errors are minimised; everything else is maximised."""
    return any(word in metric for word in ("loss", "error", "time"))


BUDGETS = {"max_latency_ms": ("ttkd.latency_ms_b1_cpu", "ms per image at batch 1 on the CPU"),
           "max_params": ("ttkd.params", "parameters")}


def within(version, budget: dict[str, float]) -> bool:
    """Whether a version's measured cost (its tags) is within ``budget`` (BUDGETS' keys)."""
    return all(float(version.tags[BUDGETS[k][0]]) <= limit for k, limit in budget.items())


def unmeasured(versions, budget: dict[str, float]) -> list[str]:
    """The versions among ``versions`` that lack a figure ``budget`` needs."""
    return [str(v.version) for v in versions if any(BUDGETS[k][0] not in v.tags for k in budget)]


def promote(reference: str, metric: str = "val_acc", alias: str = DEFAULT_ALIAS,
            force: bool = False, by: str = "self", student_arch: str = "", method: str = "",
            budget: dict[str, float] | None = None) -> Promotion:
    """Point ``alias`` at a version of a registered model, judged by ``metric``.

    ``reference`` is ``NAME`` (pick the best version by the metric, as logged last by
    the run that made it) or a pinned ``NAME/VERSION`` / ``NAME@ALIAS`` (that version).
    A version worse than the alias's current holder is refused unless ``force``.

    ``by="students"`` judges a teacher by how well it teaches: a version's score is the
    mean ``metric`` of the students distilled from it (registered versions whose
    ``ttkd.partner_model`` tag names it), only those of ``student_arch`` and ``method``
    if given. Versions that taught no such student are left out.

    ``budget`` (``max_latency_ms``, ``max_params``) leaves out every version whose
    measured cost exceeds it (with ``by="students"``: every student); none within it is
    refused, naming the cheapest version's figure.
    """
    budget = budget or {}
    _check_request(by, metric, alias, budget)
    prepare_store()
    client = MlflowClient()
    ref = reference.strip().removeprefix("models:/")
    name = re.split(r"[/@]", ref, maxsplit=1)[0]
    check_registered(client, name)
    if by == "students":
        scored, evidence = _teaching_scores(client, name, metric, student_arch, method, budget)
        label = f"students' mean {metric}"
    else:
        scored, evidence, label = _own_scores(client, name, metric, budget), (), metric
    sign = -1 if lower_is_better(metric) else 1
    if ref == name:
        target = max(scored, key=lambda v: (sign * scored[v], int(v)))
    else:
        target = resolve(ref, client).version
        if target not in scored and by == "students":
            raise TTKDError(f"{name} version {target} has taught no student{_which(student_arch, method)}; "
                            f"distil one from it first, or choose another version")
        if target not in scored:
            raise TTKDError(f"{name} version {target} has no metric {metric!r}; choose another")
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    old_value = scored.get(current)
    if current == target:
        return Promotion(name, alias, label, current, old_value, target, scored[target], False, evidence)
    if old_value is not None and sign * scored[target] < sign * old_value and not force:
        raise TTKDError(
            f"refusing to move {name}@{alias} from version {current} ({label} {old_value:.4g}) "
            f"to the worse version {target} ({label} {scored[target]:.4g}); pass force=true to do it anyway")
    retry_locked(lambda: client.set_registered_model_alias(name, alias, target))
    return Promotion(name, alias, label, current, old_value, target, scored[target], True, evidence)


def _check_request(by: str, metric: str, alias: str, budget: dict[str, float]) -> None:
    if by not in ("self", "students"):
        raise TTKDError(f"invalid by {by!r}: use self (the version's own {metric}) or students "
                        f"(the mean {metric} of the students it taught)")
    if not re.fullmatch(r"[A-Za-z_][\w-]*", alias) or re.fullmatch(r"v\d+", alias):
        raise TTKDError(f"invalid alias {alias!r}: use letters, digits, '_' or '-', not starting "
                        f"with a digit; v<number> is reserved by MLflow")
    if len(alias) > MAX_NAME:
        raise TTKDError(f"invalid alias {alias[:40]}… ({len(alias)} characters): the registry keeps aliases of at "
                        f"most {MAX_NAME} characters; choose a shorter alias")
    for key, limit in budget.items():
        if key not in BUDGETS or not (isinstance(limit, int | float) and math.isfinite(limit) and limit > 0):
            raise TTKDError(f"invalid {key}: {limit!r}; give a number > 0")


def _own_scores(client: MlflowClient, name: str, metric: str, budget: dict[str, float]) -> dict[str, float]:
    """Per version of ``name`` (only those within ``budget``): its own run's ``metric``."""
    versions = sorted_versions(client, name)
    if budget:
        _check_measured(name, versions, budget)
        fits = [v for v in versions if within(v, budget)]
        if not fits:
            raise TTKDError(_nothing_within(name, versions, budget))
        versions = fits
    scores = {str(v.version): _score(client, v, metric) for v in versions}
    scored = {v: s for v, s in scores.items() if s is not None}
    if not scored:
        raise TTKDError(f"no version of {name!r} has a metric {metric!r}; "
                        f"pick a metric its runs logged, such as val_acc")
    return scored


def _which(student_arch: str, method: str) -> str:
    parts = [f"arch {student_arch}" if student_arch else "", f"method {method}" if method else ""]
    return f" ({', '.join(p for p in parts if p)})" if student_arch or method else ""


def _check_measured(name: str, versions, budget: dict[str, float]) -> None:
    missing = unmeasured(versions, budget)
    if missing:
        model = versions[0].name
        raise TTKDError(f"{name}: version{'s' * (len(missing) > 1)} {', '.join(missing)} of {model} "
                        f"{'have' if len(missing) > 1 else 'has'} no measured cost (registered before ttkd "
                        f"measured it); measure them with `mlflow run . -e promote -P model={model} -P measure=true`")


def _nothing_within(name: str, versions, budget: dict[str, float]) -> str:
    key = next(iter(budget))
    tag, what = BUDGETS[key]
    best = min(versions, key=lambda v: float(v.tags[tag]))
    return (f"no version of {name} is within {', '.join(f'{k}={v:g}' for k, v in budget.items())}; the "
            f"{'fastest' if key == 'max_latency_ms' else 'smallest'} is {best.name} version {best.version} at "
            f"{float(best.tags[tag]):.4g} {what}")


def _teaching_scores(client: MlflowClient, name: str, metric: str, student_arch: str,
                     method: str, budget: dict[str, float] | None = None) -> tuple[dict[str, float], tuple[str, ...]]:
    """Per version of teacher ``name``: the mean ``metric`` of the students it taught
    (only those within ``budget``); and one line of evidence per version."""
    budget = budget or {}
    students = []
    versions = sorted_versions(client, name)
    if not any(v.tags.get("ttkd.stage") == "teach" for v in versions):
        made = sorted({v.tags.get("ttkd.stage", "outside ttkd") for v in versions})
        raise TTKDError(f"{name!r} is not a teacher (its versions come from: {', '.join(made)}); "
                        f"by=students judges models made by the teach stage")
    scored, lines = {}, [f"{name}: each version judged by the {metric} of the students it taught"
                         f"{_which(student_arch, method)}"]
    for v in versions:
        taught = client.search_model_versions(f"tags.`{TAG_PARTNER}` = 'models:/{name}/{v.version}'",
                                              max_results=10000)
        mine = [sv for sv in taught if sv.tags.get("ttkd.stage") == "distill"
                and (not student_arch or sv.tags.get("ttkd.arch") == student_arch)
                and (not method or sv.tags.get("ttkd.method") == method)]
        if budget and mine:
            _check_measured(f"the students of {name} version {v.version}", mine, budget)
        students += mine
        values = [s for sv in mine if (not budget or within(sv, budget))
                  and (s := _score(client, sv, metric)) is not None]
        point = ", ".join(f"{k} {v.tags[f'ttkd.{k}']}" for k in ("seed", "weight") if f"ttkd.{k}" in v.tags)
        about = f"  version {v.version}" + (f" ({point})" if point else "")
        if values:
            scored[str(v.version)] = sum(values) / len(values)
            lines.append(f"{about}: {len(values)} student{'s' * (len(values) > 1)}, "
                         f"mean {metric} {scored[str(v.version)]:.4g}")
        else:
            lines.append(f"{about}: {'no student within the budget' if budget and mine else 'taught no student'}, "
                         f"left out")
    if not scored and budget and students:
        raise TTKDError(_nothing_within(f"the students of {name}", students, budget))
    if not scored:
        raise TTKDError(f"no version of {name!r} has taught a student{_which(student_arch, method)}; "
                        f"distil one from it first (the distill stage, or a sweep)")
    return scored, tuple(lines)


def _score(client: MlflowClient, version, metric: str) -> float | None:
    if not version.run_id:
        return None
    try:
        value = client.get_run(version.run_id).data.metrics.get(metric)
    except MlflowException:
        return None  # the run was deleted
    return value if value is not None and math.isfinite(value) else None
