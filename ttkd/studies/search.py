"""A search: Optuna's sampler asks for a configuration, a scheduler trains it as a trial, and
the trial's holdout accuracy is told back; one MLflow child run per trial under the search's run.

A trial is one stage, evaluated on a holdout carved from the training split
(``ImageData.holdout``): a KD student from ``teacher`` (pinned to one version when the search
starts), or without a teacher the student alone. Its validation split is never computed, and it
registers nothing. Each trial trains with the search's ``seed``, so configurations differ only
in what the sampler chose. Trials go through the same runner and schedulers as a sweep's
points (``ttkd.studies.runner.drive``): ``jobs`` at once on this machine, or Ray tasks on a
cluster. A trial reports its holdout accuracy to the study after every epoch, wherever it
trains, and its pruner may stop it there (``ttkd.studies.trials``).

The study lives in an Optuna storage of its own beside the tracking store (never in MLflow's
database: both keep an Alembic version table). Resuming a search (``resume=``) keeps every
finished trial, tells the study what a trial finished while the search was down, continues an
interrupted trial from its checkpoint (or starts it again with the same values), and asks for
new trials until the study holds ``trials``, none counted twice. Before each question the
sampler is seeded from ``seed`` and the number of trials so far (``question_seed``), so with
``jobs=1`` a resumed search asks what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ttkd import data as datasets
from ttkd import kd, models, tracking
from ttkd.build import build_method, network
from ttkd.config import TRAIN, TrainConfig, method_uses
from ttkd.errors import TTKDError
from ttkd.parsing import Dist, Space, axis_roles, show, space_json, space_text, stored_space
from ttkd.presets import RunConfig, check_resume, method_params
from ttkd.resuming import unfinished_run
from ttkd.stages import STREAM_WORDS, TAG_STAGE, StageInterrupted
from ttkd.step import resolve_device
from ttkd.studies import trials as optuna_side
from ttkd.studies.plan import TAG_POINT, Grid, Outcome, Plan, Point, Task, TrialPoint
from ttkd.studies.report import trials as trials_report
from ttkd.studies.runner import abandon, current_run, drive, point_line, run_partners, trial_outcome
from ttkd.studies.schedulers.local import LocalPool, WorkerDied
from ttkd.studies.schedulers.ray import Placement, RayCluster
from ttkd.tracking import attempts, log_params, modelstore, registry

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)
TAG_STATE = "ttkd.trial_state"     # a trial's run: COMPLETE, PRUNED or FAIL, as its study has it
TAG_STUDY = "ttkd.optuna_study"    # the search's run: its study's name and storage


@dataclasses.dataclass(frozen=True)
class Trials:
    """What every trial of a search trains, before the sampler's values are put in."""

    stage: str                       # distill (with a teacher), baseline, or teach (with a student)
    arch: str
    train: TrainConfig
    teacher: str | None              # NAME/VERSION, pinned when the search started
    method: str
    method_params: dict[str, dict]   # per method the trials may train, its fixed parameters
    data: dict                       # dataset, data_dir, stream
    holdout: float
    partner_data: str = "same"
    trust_unverified: bool = False
    student: str | None = None       # a teacher search's frozen student, pinned
    teacher_arch: str = "cnn"        # and its trials' teachers, unless the space says otherwise
    weight: float = 0.005
    temperature: float = 4.0

    def kwargs(self, values: dict[str, Any], parent_run_id: str, point: TrialPoint) -> dict:
        """``stages.trial``'s arguments for the trial that trains ``values``."""
        if self.stage == "teach":
            return self._teacher_trial(values, parent_run_id, point)
        return self._one_stage(self.stage, values, parent_run_id, point, self.teacher)

    def _train(self, values: dict[str, Any], role: str) -> TrainConfig:
        """The training parameters of ``role``'s stage: the search's, then the trial's (``lr`` for
        every stage, ``student.lr`` for the KD student's, ``teacher.lr`` for the teacher's)."""
        given = {n.rpartition(".")[2]: v for n, v in values.items() if n.rpartition(".")[0] in ("", role)}
        return dataclasses.replace(self.train, **{n: v for n, v in given.items() if n in TRAIN})

    def _one_stage(self, stage: str, values: dict[str, Any], parent_run_id: str, point: TrialPoint,
                   partner: str | None) -> dict:
        method = values.get("method", self.method)
        kw = dict(stage=stage, arch=values.get("student_arch", self.arch), train=self._train(values, "student"),
                  tags=point.tags(), parent_run_id=parent_run_id, holdout=self.holdout,
                  run_name=f"{point.key} {stage}",
                  param_names={"temperature": "kd_temperature"} if stage == "distill" else {},
                  partner=partner, partner_data=self.partner_data, trust_unverified=self.trust_unverified,
                  **self.data)
        if stage == "baseline":
            return kw | dict(method="ce", method_params={})
        reads = dict(zip(method_params("search", method), method_uses(method)))  # study name: the method's
        own = {reads[n]: v for n, v in values.items() if n in reads}
        return kw | dict(method=method, method_params=self.method_params[method] | own)

    def _teacher_trial(self, values: dict[str, Any], parent_run_id: str, point: TrialPoint) -> dict:
        """A teacher search's trial (``stages.teacher_trial``): the teacher the values make, against
        the frozen student, then its KD student; the teacher's run is the point ``trial N teacher``."""
        distill = self._one_stage("distill", values, parent_run_id, point, None)
        del distill["stage"], distill["partner"], distill["parent_run_id"]
        teach = dict(arch=values.get("teacher_arch", self.teacher_arch), train=self._train(values, "teacher"),
                     partner=self.student, method="teach", tags={TAG_POINT: f"{point.key} teacher"},
                     method_params={"weight": values.get("weight", self.weight),
                                    "temperature": values.get("temperature", self.temperature)},
                     holdout=self.holdout, run_name=f"{point.key} teach", partner_data=self.partner_data,
                     trust_unverified=self.trust_unverified, **self.data)
        return dict(stage="teach", parent_run_id=parent_run_id, teach=teach, distill=distill)


def question_seed(seed: int, asked_before: int) -> int:
    """The sampler's seed for the question after ``asked_before`` trials of a search seeded
    ``seed``: one stream per (seed, count), so searches of two seeds share no question."""
    return int(np.random.SeedSequence([seed, asked_before]).generate_state(1)[0])


def asked(trial, space: Space, method: str) -> dict[str, Any]:
    """The values ``trial`` asks for, ``method`` first (else the search's ``method``): a
    distillation parameter only when the trial's method reads it (alpha for kd, dkd_beta for
    dkd), every other entry of ``space`` always."""
    values: dict[str, Any] = {}
    for name, d in sorted(space, key=lambda nd: nd[0] != "method"):
        if name != "method" and axis_roles(name) == {"kd"} and \
                name not in method_params("search", values.get("method", method)):
            continue
        values[name] = suggest(trial, name, d)
    return values


def suggest(trial, name: str, d: Dist) -> Any:
    if d.choices:
        return trial.suggest_categorical(name, list(d.choices))
    if d.integer:
        return trial.suggest_int(name, d.low, d.high, log=d.log)
    return trial.suggest_float(name, d.low, d.high, log=d.log)


class TrialSource:
    """The search's side of :func:`ttkd.studies.runner.drive`: ``ask`` hands out first the
    trials an earlier start left unfinished, then new trials until the study holds
    ``count``; ``tell`` tells the study how each ended and tags its run."""

    verbose = False

    def __init__(self, study, args: dict, trials: Trials, space: Space, parent_run_id: str, generation: int,
                 print_line: Callable[[str], None]):
        self.study, self.args, self.trials, self.space, self.parent = study, args, trials, space, parent_run_id
        self.count, self.generation, self.print_line = args["trials"], generation, print_line
        self.again: list[tuple] = []  # (number, id, values, unfinished run) of each trial to continue
        self.told: list[Outcome] = []   # how each trial of this start ended

    def recover(self) -> None:
        """Settle what an earlier start left: a trial whose run finished is told as it ended; one
        interrupted is asked again (its run continued from its checkpoint, if it has one)."""
        o = optuna_side.optuna()
        for t in self.study.get_trials(deepcopy=False, states=(o.trial.TrialState.RUNNING,)):
            run = current_run(self.parent, TrialPoint(t.number).key)
            if run is not None and run.info.status == "FINISHED":  # told as it ended
                self.tell(trial_outcome(TrialPoint(t.number, tuple(t.params.items())), run))
            else:  # (its values again: those asked before the search stopped, the rest asked now)
                values = asked(o.trial.Trial(self.study, t._trial_id), self.space, self.trials.method)
                if self.trials.stage == "teach":  # its teacher was not kept: the trial starts again from it
                    abandon(self.parent, TrialPoint(t.number))
                    run = None
                self.again.append((t.number, t._trial_id, values, run.info.run_id if run is not None else None))

    def _run_id(self, outcome: Outcome) -> str | None:
        """The run a trial trained in: its result's, or (pruned, failed) the one its attempt claimed."""
        if outcome.result is not None:
            return outcome.result.run_id
        run = current_run(self.parent, outcome.point.key)
        return run.info.run_id if run is not None else None

    def _state(self, number: int) -> str:
        return self.study.get_trials(deepcopy=False)[number].state.name

    def ask(self) -> Task | None:
        if self.again:
            number, trial_id, values, run_id = self.again.pop(0)
            return self._task(trial_id, number, values, run_id)
        waiting = optuna_side.optuna().trial.TrialState.WAITING  # (an enqueued trial: asked next, not yet asked)
        asked_before = len([t for t in self.study.get_trials(deepcopy=False) if t.state != waiting])
        if asked_before >= self.count:
            return None
        self.study.sampler = optuna_side.sampler(self.args["sampler"], question_seed(self.args["seed"], asked_before),
                                                 self.space)
        trial = self.study.ask()
        return self._task(trial._trial_id, trial.number, asked(trial, self.space, self.trials.method), None)

    def _task(self, trial_id: int, number: int, values: dict, resume_run: str | None) -> Task:
        point = TrialPoint(number, tuple(values.items()))
        kwargs = self.trials.kwargs(values, self.parent, point)
        epochs = (kwargs["distill"] if kwargs["stage"] == "teach" else kwargs)["train"].epochs
        report = optuna_side.Report(self.args["storage"], self.args["name"], trial_id, number, self.args["prune"],
                                    epochs)
        return Task(point, "trial", kwargs, resume_run, (self.generation, 0), report)

    def tell(self, outcome: Outcome) -> None:
        self.told.append(outcome)
        state = optuna_side.optuna().trial.TrialState
        number = outcome.point.number
        if outcome.result is not None:
            self.study.tell(number, outcome.result.val_acc)
        elif outcome.pruned:
            self.study.tell(number, state=state.PRUNED)
        elif outcome.interrupted or outcome.superseded:
            return self._line(outcome, "interrupted: resuming the search continues it")
        else:
            self.study.tell(number, state=state.FAIL)
        run_id = self._run_id(outcome)
        if run_id:
            tracking.tag_run(run_id, {TAG_STATE: self._state(number)})
        self._line(outcome, None)

    def _line(self, o: Outcome, note: str | None) -> None:
        values = " ".join(f"{n}={show(v)}" for n, v in o.point.values)
        done = len([t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()])
        head = f"[{done:>{len(str(self.count))}}/{self.count}] {o.point.key} {values}"
        if note:
            self.print_line(f"{head}: {note}")
        elif o.result is not None:
            self.print_line(f"{head}: holdout_acc {o.result.val_acc:.2f}% ({o.seconds:.1f} s)")
        elif o.pruned:
            self.print_line(f"{head}: pruned after epoch {o.pruned} ({o.seconds:.1f} s)")
        else:
            self.print_line(f"{head}: FAILED: {o.error}")


def _check(trials: Trials, space: Space, args: dict) -> None:
    """Everything a user can get wrong, before the search's run opens: the data set and its
    holdout, the architectures and device, the teacher (verified once), each method against
    these networks."""
    registry.prepare_store()
    data = datasets.load(trials.data["dataset"], trials.data["data_dir"], trials.data["stream"])
    data.holdout(trials.holdout)
    arches = dict(space).get("student_arch", Dist(choices=(trials.arch,))).choices
    for arch in arches:
        models.get(arch)
    resolve_device(trials.train.device)
    if trials.student is not None:
        with tempfile.TemporaryDirectory() as tmp:  # a teacher search's frozen student, verified once
            modelstore.load_partner(registry.resolve(trials.student), data, "student", tmp, trials.partner_data,
                                    trials.trust_unverified)
    if args["own_teacher"]:
        registry.check_model_name(f"{trials.data['dataset']}-search-teacher")
        teacher_arch = dict(space).get("teacher_arch", Dist(choices=(args["own_teacher"]["teacher_arch"],))).choices[0]
        net = network(teacher_arch, data)
    elif trials.teacher is None:
        return
    else:
        with tempfile.TemporaryDirectory() as tmp:
            found = modelstore.load_partner(registry.resolve(trials.teacher), data, "teacher", tmp,
                                            trials.partner_data, trials.trust_unverified)
        for warning in (found.unverified, found.unchecked):
            if warning:
                log.warning(warning)
        net, teacher_arch = found.net, found.arch
    for method in args["methods"]:
        if kd.get(method).features:  # a method that cannot pair these networks fails now
            for arch in arches:
                build_method(method, "distill", data, network(arch, data), net, trials.method_params[method],
                             arch, teacher_arch)


@datasets.load_once()
def search(*, space: Space, trials: int, train: TrainConfig, sampler: str = "tpe", prune: str = "median",
           holdout: float = 0.1, teacher: str | None = None, student_arch: str = "mlp", method: str = "kd",
           methods: tuple[str, ...] = (), method_params: dict[str, dict] | None = None, dataset: str = "digits",
           data_dir: str | None = None, stream: bool | None = None, partner_data: str = "same",
           trust_unverified: bool = False, name: str = "", storage: str = "", jobs: int = 2, threads: int = 0,
           cluster: str = "", cpus_per_point: float = 1.0, gpus_per_point: float = 0.0, cluster_auth: str = "token",
           teacher_arch: str = "cnn", weight: float = 0.005, temperature: float = 4.0, student: str | None = None,
           resume_run: str | None = None, print_line: Callable[[str], None] = print) -> str:
    """Search ``space`` with ``trials`` trials of Optuna's ``sampler`` (seeded with ``train.seed``,
    every trial's seed), each evaluated on ``holdout`` of the training split and stopped early by
    ``prune``; with ``teacher`` a KD student of ``method`` (or of the space's ``method`` choice) from
    that teacher; without one, when the space holds a distillation parameter, from a teacher the
    search trains first (``own_teacher``: ``teacher_arch`` with ``weight`` and ``temperature``
    against a student of ``student_arch``), else the student alone. With ``student`` (a model
    reference) it searches the teacher: each trial trains a teacher against that frozen student
    (``teacher_arch``, ``weight``, ``temperature``, unless the space holds them) and a KD student
    from it, whose holdout accuracy is the trial's (``stages.teacher_trial``). Returns the trials' table and
    the best configuration, which the search's run also logs, with Optuna's figures. ``name``: the
    study's name in ``storage`` (defaults: the run's id; ``storage_url``). ``jobs``, ``threads``,
    ``cluster`` and the rest: where trials train, as in a sweep (``ttkd.studies.sweep``)."""
    o = optuna_side.optuna()
    own = teacher is None and student is None and distils(space)
    methods = tuple(methods) or ((method,) if teacher or student or own else ())
    params = method_params or {}
    pinned = registry.resolve(teacher).uri if teacher else None
    frozen = registry.resolve(student).uri if student else None
    stage = "teach" if student else "distill" if teacher or own else "baseline"
    plan = Trials(stage, student_arch, train, pinned, method, {m: dict(params.get(m, {})) for m in methods},
                  dict(dataset=dataset, data_dir=data_dir, stream=stream), holdout, partner_data, trust_unverified,
                  frozen, teacher_arch, weight, temperature)
    storage = optuna_side.storage_url(storage)
    args = {"space": space_json(space), "trials": trials, "sampler": sampler,
            "prune": prune, "holdout": holdout, "teacher": teacher, "student_arch": student_arch, "method": method,
            "methods": list(methods), "method_params": plan.method_params, "dataset": dataset, "data_dir": data_dir,
            "stream": stream, "partner_data": partner_data, "trust_unverified": trust_unverified, "name": name,
            "storage": storage, "jobs": jobs, "threads": threads, "cluster": cluster, "cpus_per_point": cpus_per_point,
            "gpus_per_point": gpus_per_point, "cluster_auth": cluster_auth, "train": dataclasses.asdict(train),
            "seed": train.seed, "pinned": pinned, "student": student, "student_pinned": frozen,
            "own_teacher": dict(teacher_arch=teacher_arch, weight=weight, temperature=temperature)
            if own or student else None}
    _check(plan, space, args)
    optuna_side.check_storage(storage)
    kept = optuna_side.storage(storage)
    if name and not resume_run and name in o.get_all_study_names(kept):
        owner = o.load_study(study_name=name, storage=kept).user_attrs.get("mlflow_run", "?")
        raise TTKDError(f"a search named {name!r} already lives in {storage} (run {owner}); continue it with "
                        f"resume={owner}, or give this one another name=")
    scheduler = (RayCluster(Placement(cluster, cpus_per_point, gpus_per_point, threads, cluster_auth)) if cluster
                 else LocalPool(jobs, threads))
    with scheduler:
        run = tracking.start_run(resume_run, name=f"search {dataset}", nested=False)
        parent = run.info.run_id
        status = "FAILED"
        try:
            if resume_run:
                args = tracking.read_json(parent, "search.json")
            else:
                args["name"] = name or parent
                record(args, plan, space)
            if own:
                plan = own_teacher(plan, args, parent, scheduler, print_line)
            text = run_trials(args, plan, space, parent, scheduler, print_line)
            status = "FINISHED"
        except StageInterrupted:
            status = "KILLED"
            raise
        finally:
            tracking.end_run(status)
        return text


def distils(space: Space) -> bool:
    """Whether ``space`` holds a distillation parameter (or ``method``): its trials train KD students."""
    return any(n == "method" or axis_roles(n) == {"kd"} for n, _ in space)


def own_teacher(plan: Trials, args: dict, parent: str, scheduler, print_line) -> Trials:
    """The student and the teacher a search without ``teacher=`` trains before its KD trials (seed
    ``seed``, child runs of its run, registered as ``DATASET-search-student`` and
    ``DATASET-search-teacher``; an earlier start's reused); returns ``plan`` with that teacher."""
    given = args["own_teacher"]
    grid = Grid((args["seed"],), (given["weight"],), ())
    partners = Plan(grid, plan.arch, given["teacher_arch"], plan.train, plan.train, given["temperature"], {},
                    plan.data, name=lambda p: f"{plan.data['dataset']}-search-{p.role}")
    done = run_partners(partners, parent, scheduler, attempts.next_generation(parent), "search",
                        lambda o, i, n: print_line(point_line(o, i, n)))
    teacher = done[Point("teacher", args["seed"], given["weight"])].result.model.uri
    log_params({"teacher_pinned": teacher})
    args["pinned"] = teacher
    tracking.log_dict(args, "search.json")  # (resuming from here on reuses this teacher)
    return dataclasses.replace(plan, teacher=teacher)


def run_trials(args: dict, plan: Trials, space: Space, parent: str, scheduler, print_line,
                first: dict | None = None) -> str:
    """Open the study (or reopen it), settle what an earlier start left, train every trial on
    ``scheduler`` and tell the study; then log the report. ``first``: the values of trial 0, asked
    before the sampler asks anything. Raises when the search was stopped, left trials unfinished
    or chose nothing."""
    o = optuna_side.optuna()
    study = o.create_study(study_name=args["name"], storage=optuna_side.storage(args["storage"]),
                           direction="maximize", pruner=optuna_side.pruner(args["prune"]), load_if_exists=True)
    if first and not study.get_trials(deepcopy=False):
        study.enqueue_trial(first)
    study.set_user_attr("mlflow_run", parent)
    source = TrialSource(study, args, plan, space, parent, attempts.next_generation(parent), print_line)
    source.recover()
    try:
        signum = drive(source, scheduler)
    except WorkerDied as exc:
        raise TTKDError(f"a worker process died while training {exc}; run {parent} is marked FAILED: "
                        f"resume={parent} continues it") from None
    left = args["trials"] - len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    if signum is not None:
        raise StageInterrupted(f"stopped by {signal.Signals(signum).name} with {left} of {args['trials']} trials "
                               f"unfinished; search run {parent} is marked KILLED and keeps every finished trial: "
                               f"continue it with resume={parent}", signum)
    if left:
        raise TTKDError(f"{left} of {args['trials']} trials did not finish; run {parent} is marked FAILED: "
                        f"resume={parent} continues them")
    text = finish(study, args, space)
    if not any(t.state == o.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        failed = next((x.error for x in source.told if x.error and not x.pruned), "every trial was pruned")
        log.info(text)
        raise TTKDError(f"none of the {args['trials']} trials completed ({failed}); search run {parent} is "
                        f"marked FAILED and chose nothing: widen or move the space, then search again")
    return text


def record(args: dict, plan: Trials, space: Space, stage: str = "search") -> None:
    """A new search's tags, parameters and ``search.json``, what resuming rebuilds it from;
    ``stage``: ``tune`` for an arm of a tuned sweep (``ttkd.studies.tuning``)."""
    tracking.set_tags({TAG_STAGE: stage, "ttkd.method": ",".join(args["methods"]) or "ce",
                       TAG_STUDY: f"{args['name']} in {args['storage']}"})
    study_name = {"temperature": "kd_temperature"}  # (the study's name: temperature is the teach stage's)
    fixed = {f"{m}.{study_name.get(k, k)}" if len(args["methods"]) > 1 else study_name.get(k, k): v
             for m, p in plan.method_params.items() for k, v in p.items()}
    log_params({"space": space_text(space), "trials": args["trials"], "sampler": args["sampler"],
                "prune": args["prune"], "holdout": args["holdout"], "teacher": args["teacher"] or "",
                "student_arch": args["student_arch"],
                **({"student": args["student"], "student_pinned": args["student_pinned"]}
                   if args.get("student") else {}),
                "dataset": args["dataset"], "data_dir": args["data_dir"] or "", "stream": STREAM_WORDS[args["stream"]],
                "name": args["name"], "storage": args["storage"], "jobs": args["jobs"], "threads": args["threads"],
                "cluster": args["cluster"]} | ({"method": args["method"]} if args["methods"] else {})
               | args["train"] | fixed | {k: v for k, v in (args.get("own_teacher") or {}).items()
                                          if k not in dict(space)}
               | ({} if args.get("own_teacher") else {"teacher_pinned": args["pinned"] or ""}))
    tracking.log_dict(args, "search.json")


def finish(study, args: dict, space: Space) -> str:
    """The search's results on its run: the best configuration (``best.json``, parameters
    ``best.NAME``, metrics ``best_holdout_acc`` and ``best_trial``), the table of trials
    (``trials.md``, ``trials.csv``) and Optuna's figures; returns the table and the best."""
    text = trials_report.markdown(study, args, [n for n, _ in space])
    complete = any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    if complete:
        best = study.best_trial
        log_params({f"best.{n}": v for n, v in best.params.items()})
        tracking.log_metrics({"best_holdout_acc": best.value, "best_trial": best.number})
        tracking.log_dict({"trial": best.number, "holdout_acc": best.value, "params": best.params}, "best.json")
    tracking.log_text(text, "trials.md")
    tracking.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
    tracking.log_figures(trials_report.figures(study) if complete else {})
    return text


def resume_search(reference: str, cfg: RunConfig | None = None, print_line: Callable[[str], None] = print,
                  **change) -> str:
    """Continue an unfinished search run (its id, or ``last``); ``change``: where its rest trains
    (``jobs``, ``threads``, ``cluster`` and its placement)."""
    registry.prepare_store()
    run = unfinished_run("search", reference)
    if cfg is not None:
        check_resume(cfg, run.info.run_id, run.data.params)
    args = tracking.read_json(run.info.run_id, "search.json")
    if args is None:
        raise TTKDError(f"search run {run.info.run_id} has no search.json; start it again")
    log.info(f"resuming search run {run.info.run_id}")
    if os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run`: point its run at the real one
        tracking.tag_run(os.environ["MLFLOW_RUN_ID"], {"ttkd.resumes_run": run.info.run_id})
        del os.environ["MLFLOW_RUN_ID"]
    keep = ("sampler", "prune", "holdout", "student_arch", "method", "dataset", "data_dir", "stream",
            "partner_data", "trust_unverified", "name", "storage", "jobs", "threads", "cpus_per_point",
            "gpus_per_point", "cluster_auth", "trials")
    kw = ({k: args[k] for k in keep} | (args.get("own_teacher") or {}) | {k: v for k, v in change.items() if v}
          | {"cluster": change.get("cluster") or ""})
    return search(**kw, space=stored_space(args["space"]), train=TrainConfig.from_dict(args["train"]),
                  teacher=args["pinned"], student=args.get("student_pinned"), methods=tuple(args["methods"]),
                  method_params=args["method_params"],
                  resume_run=run.info.run_id, print_line=print_line)
