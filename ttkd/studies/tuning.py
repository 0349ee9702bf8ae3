"""A tuned sweep (``tune=``): the fair verdict, where every arm gets the same search before the
sweep compares them.

An arm is what the verdict compares: each KD student (a method from a teacher of weight w) and,
when the space holds a student's parameter (``student.lr``, ``student_arch``), the student
without KD. Before the verdict, under the sweep's run, the tuning trains its own student and
one teacher per weight (seed ``tuning_seed``, none of the verdict's seeds; registered as
``PREFIX-tuning-student`` and ``PREFIX-tuning-teacher``), then gives each arm one search
(``ttkd.studies.search``) of the same number of trials over the space, as a child run of the
sweep's run with its trials under it. Trial 0 of every arm is the sweep's own configuration,
so the rise tuning bought is measured inside the same budget. Each search chooses on a holdout
of the training split; the verdict then trains each arm's choice on the sweep's seeds, on the
whole training split, and compares on the validation split as an untuned sweep does. A teacher's
parameters are not tuned: the verdict's teachers train as the sweep's parameters say.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

from ttkd import tracking
from ttkd.config import TRAIN, method_uses
from ttkd.errors import TTKDError
from ttkd.parsing import Space, axis_roles, show, space_json, space_text
from ttkd.presets import method_params
from ttkd.stages import StageInterrupted
from ttkd.studies import search
from ttkd.studies import trials as optuna_side
from ttkd.studies.plan import Grid, Outcome, Plan, Point
from ttkd.studies.runner import run_partners

TAG_ARM = "ttkd.arm"          # an arm's search run: the arm it tunes (``Point.arm``)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the verdict and the part of the space its stage reads."""

    key: str                 # ``student`` or ``METHOD w=W`` (``Point.arm``)
    weight: float | None
    method: str | None
    space: Space


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What a tuned sweep gives each arm: ``trials`` trials of ``space`` with Optuna's ``sampler``
    and pruner ``prune``, trained with ``seed`` and chosen on ``holdout`` of the training split."""

    space: Space
    trials: int
    sampler: str
    prune: str
    holdout: float
    storage: str             # the Optuna storage of the arms' studies
    seed: int                # ``tuning_seed``
    prefix: str              # of the tuning's registered names


def tuning_seed(seeds: tuple[int, ...]) -> int:
    """The seed the tuning trains with: the first after the verdict's, so no verdict seed tunes."""
    return max(seeds) + 1


def arms(grid: Grid, space: Space) -> list[Arm]:
    """The student without KD (when the space holds a parameter of its stage), then a KD
    student per teacher weight and method, each over the names its stage reads."""
    found = []
    own = tuple((n, d) for n, d in space if "student" in axis_roles(n))
    if own:
        found.append(Arm("student", None, None, own))
    for w in grid.weights:
        for m in grid.methods:
            reads = tuple((n, d) for n, d in space if axis_roles(n) != {"kd"} or n in method_params("sweep", m))
            found.append(Arm(Point("kd", 0, w, m).arm, w, m, reads))
    return found


def check(grid: Grid, space: Space, sampler: str = "tpe", trials: int = 1) -> None:
    """A tuned sweep compares two arms or more, each arm reads some of the space, and with the
    grid sampler each arm's part of the space has ``trials`` combinations at least."""
    found = arms(grid, space)
    if len(found) < 2:
        raise TTKDError(f"tune= gives each arm of the verdict the same search, and this sweep has one arm "
                        f"({found[0].key}); add a teacher weight (weights=0,0.005) or a method to compare")
    empty = [a.key for a in found if not a.space]
    if empty:
        raise TTKDError(f"tune: the arm {empty[0]} reads none of {', '.join(n for n, _ in space)}; add a parameter "
                        f"of its method to tune, or drop the method")
    if sampler == "grid":
        sizes = {a.key: math.prod(len(d.choices) for _, d in a.space) for a in found}
        arm = min(sizes, key=sizes.get)  # (the first of the smallest)
        size = sizes[arm]
        if trials > size:
            raise TTKDError(f"sampler=grid: the arm {arm} reads {size} combinations of the space and trials={trials}; "
                            f"ask for at most {size} trials per arm, or use another sampler")


def untuned(arm: Arm, plan: Plan) -> dict:
    """The sweep's own values of ``arm``'s parameters, trial 0 of its search; {} when one of
    them lies outside the space (the rise is then not measured)."""
    values = {}
    for name, d in arm.space:
        bare = name.rpartition(".")[2]
        if name == "student_arch":
            value = plan.student_arch
        elif bare in TRAIN:
            value = getattr(plan.student_train, bare)
        else:
            reads = dict(zip(method_params("sweep", arm.method), method_uses(arm.method)))
            value = plan.method_params[arm.method][reads[name]]
        if not d.holds(value):
            return {}
        values[name] = value
    return values


def tune(plan: Plan, tuning: Tuning, parent_id: str, scheduler, generation: int, sweep_args: dict,
         on_partner: Callable[[Outcome, int, int], None], print_line: Callable[[str], None]
         ) -> tuple[Plan, list[dict]]:
    """Train the tuning's student and teachers, then search every arm (each search a child run
    of ``parent_id``; a finished one is read back, an unfinished one continued); returns ``plan``
    with each arm's choice and one summary per arm. Raises when stopped or when a search chose
    nothing."""
    grid = Grid((tuning.seed,), plan.grid.weights, ())
    partners = dataclasses.replace(plan, grid=grid, name=lambda p: f"{tuning.prefix}-tuning-{p.role}", tuned={})
    outcomes = run_partners(partners, parent_id, scheduler, generation, "sweep", on_partner)
    chosen, summaries = {}, []
    for arm in arms(plan.grid, tuning.space):
        teacher = outcomes[Point("teacher", tuning.seed, arm.weight)].result.model if arm.method else None
        run_id = _search_arm(arm, plan, tuning, parent_id, scheduler, sweep_args,
                             f"{teacher.name}/{teacher.version}" if teacher else None, print_line)
        best = tracking.read_json(run_id, "best.json")
        chosen[arm.key] = best["params"]
        summaries.append(_summary(arm, plan, tuning, parent_id, run_id, best))
    return dataclasses.replace(plan, tuned=chosen), summaries


def _search_arm(arm: Arm, plan: Plan, tuning: Tuning, parent_id: str, scheduler, sweep_args: dict,
                teacher: str | None, print_line: Callable[[str], None]) -> str:
    """Run (or continue) ``arm``'s search as a child run of ``parent_id``; returns its run's id."""
    found = tracking.child_runs(parent_id, {TAG_ARM: arm.key}, newest_first=True, limit=1)
    if found and found[0].info.status == "FINISHED":
        return found[0].info.run_id
    train = dataclasses.replace(plan.student_train, seed=tuning.seed)
    method = arm.method or "kd"
    trials = search.Trials("distill" if teacher else "baseline", plan.student_arch, train, teacher, method,
                           {arm.method: plan.method_params[arm.method]} if arm.method else {}, plan.data,
                           tuning.holdout)
    args = {"space": space_json(arm.space), "trials": tuning.trials,
            "sampler": tuning.sampler, "prune": tuning.prune, "holdout": tuning.holdout, "teacher": teacher,
            "pinned": teacher, "student_arch": plan.student_arch, "method": method,
            "methods": [arm.method] if arm.method else [], "method_params": trials.method_params,
            **plan.data, "name": _study_name(parent_id, arm), "storage": tuning.storage, "seed": tuning.seed,
            "train": dataclasses.asdict(train)} | {k: sweep_args[k] for k in ("jobs", "threads", "cluster")}
    run_ = tracking.start_run(found[0].info.run_id if found else None, name=f"tune {arm.key}", nested=True)
    status = "FAILED"
    try:
        if not found:
            tracking.set_tags({TAG_ARM: arm.key})
            search.record(args, trials, arm.space, stage="tune")
        search.run_trials(args, trials, arm.space, run_.info.run_id, scheduler,
                           lambda line: print_line(f"{arm.key}: {line}"), first=untuned(arm, plan))
        status = "FINISHED"
    except StageInterrupted as exc:  # (its message names the arm's run; the sweep's is the one to resume)
        status = "KILLED"
        raise StageInterrupted(f"{arm.key}: {str(exc).split(';')[0]}; sweep run {parent_id} is marked KILLED and "
                               f"keeps every finished trial: continue it with resume={parent_id}",
                               exc.exit_code - 128) from None
    except TTKDError as exc:
        raise TTKDError(f"{arm.key}: {str(exc).split(';')[0]}; sweep run {parent_id} is marked FAILED: "
                        f"resume={parent_id} continues it") from None
    finally:
        tracking.end_run(status)
    return run_.info.run_id


def _study_name(parent_id: str, arm: Arm) -> str:
    return f"{parent_id} {arm.key}"


def _summary(arm: Arm, plan: Plan, tuning: Tuning, parent_id: str, run_id: str, best: dict) -> dict:
    """What ``arm``'s search did: its trials by state, trial 0's (the sweep's own configuration's)
    holdout accuracy, the chosen configuration's, and the rise between them."""
    o = optuna_side.optuna()
    study = o.load_study(study_name=_study_name(parent_id, arm), storage=optuna_side.storage(tuning.storage))
    done = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in done)
    in_space = bool(untuned(arm, plan))
    first = done[0] if done and in_space and done[0].state.name == "COMPLETE" else None
    why = "not in space" if not in_space else done[0].state.name.lower() if done else "not run"
    return {"arm": arm.key, "space": space_text(arm.space), "run_id": run_id, "chosen": best["params"],
            "chosen_trial": best["trial"], "holdout_acc": best["holdout_acc"],
            "untuned_holdout_acc": first.value if first else None, "untuned_state": "complete" if first else why,
            "rise": best["holdout_acc"] - first.value if first else None,
            "trials": {s: states.get(s, 0) for s in ("complete", "pruned", "fail")}}


def metrics(summaries: list[dict]) -> dict[str, float]:
    """The tuning as metrics of the sweep's run, named as its report's (``kd.w0.005.holdout_acc``,
    ``kd.w0.005.tuning_rise``, ``no_kd.holdout_acc``), to sort and compare tuned sweeps."""
    found = {}
    for s in summaries:
        method, _, w = s["arm"].partition(" w=")
        name = "no_kd" if s["arm"] == "student" else f"{method}.w{w}"
        found[f"{name}.holdout_acc"] = s["holdout_acc"]
        if s["rise"] is not None:
            found[f"{name}.tuning_rise"] = s["rise"]
    return found


def markdown(tuning: Tuning, summaries: list[dict], seeds: tuple[int, ...]) -> str:
    """The report's tuning section: the budget, then per arm the parameters its stage reads (the
    part of the space it searched), its trials, its holdout accuracy untuned and chosen, the rise
    and the chosen configuration."""
    lines = [f"## Tuning: {tuning.trials} trials per arm, chosen on the holdout", "",
             f"Every arm had {tuning.trials} trials of `{space_text(tuning.space)}` ({tuning.sampler} sampler, "
             f"pruner {tuning.prune}), each trained with seed {tuning.seed} (the verdict's seeds are "
             f"{', '.join(map(str, seeds))}) and evaluated on a holdout of {tuning.holdout:g} of the training split, "
             f"which the verdict below never sees. Trial 0 of each arm is the sweep's own configuration; the rise is "
             f"how far the chosen configuration beats it on the holdout. The verdict trains each arm's choice on "
             f"the whole training split.", "",
             "| arm | searched | trials (complete / pruned / failed) | holdout_acc, untuned (%) | "
             "holdout_acc, chosen (%) | rise (pp) | chosen configuration |", "|---|---|---|---:|---:|---:|---|"]
    for s in summaries:
        t = s["trials"]
        untuned_ = f"{s['untuned_holdout_acc']:.2f}" if s["untuned_holdout_acc"] is not None else s["untuned_state"]
        rise = f"{s['rise']:+.2f}" if s["rise"] is not None else ""
        config = " ".join(f"{n}={show(v)}" for n, v in s["chosen"].items())
        searched = ", ".join(n.split("=")[0] for n in s["space"].split(";"))
        lines.append(f"| {s['arm']} | {searched} | {t['complete']} / {t['pruned']} / {t['fail']} | {untuned_} | "
                     f"{s['holdout_acc']:.2f} | {rise} | {config} (trial {s['chosen_trial']}) |")
    return "\n".join(lines) + "\n"
