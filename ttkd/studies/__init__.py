"""Studies: the Trained-Teacher comparison as a grid of stages under one parent run.

``study`` (``mlflow run .``) is the smallest grid: one seed, a normal (w = 0) and a
trained teacher, one KD method, compared in one table. ``sweep`` (``-e sweep``) runs
seeds x weights x methods, reports paired statistics and figures, and promotes its
teachers by how well their students learn. Both continue an unfinished parent run,
reusing every finished point.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable

from ttkd import data as datasets
from ttkd import kd, models, tracking
from ttkd.build import build_method, network
from ttkd.config import TrainConfig
from ttkd.errors import TTKDError
from ttkd.parsing import Space, axes_text, show, space_json, space_text, stored_space
from ttkd.presets import RunConfig, check_resume
from ttkd.resuming import unfinished_run
from ttkd.stages import STREAM_WORDS, TAG_STAGE, StageInterrupted, StageResult, default_method_params, teacher_kind
from ttkd.step import resolve_device
from ttkd.studies import report as reports
from ttkd.studies import trials as optuna_side
from ttkd.studies import tuning
from ttkd.studies.plan import Grid, Outcome, Plan, Point
from ttkd.studies.runner import found_points, point_line, run
from ttkd.studies.schedulers import Scheduler
from ttkd.studies.schedulers.local import LocalPool, WorkerDied
from ttkd.studies.schedulers.ray import Placement, RayCluster
from ttkd.studies.space import Axes
from ttkd.tracking import attempts, log_params, promotion, registry

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)
TAG_FAR_OFF = "ttkd.far_off"  # a point whose val_acc lies far from its row's other seeds (a collapse)
STUDY_ROWS = ("student", "kd_normal", "kd_trained", "teacher_normal", "teacher_trained")


def kd_name(prefix: str, method: str, kind: str) -> str:
    """Registered name of a study's KD student: ``PREFIX-student-kd-KIND`` for kd, and
    ``PREFIX-student-METHOD-KIND`` for the other methods, so methods never share a name."""
    return f"{prefix}-student-{method}-{kind}"


def sweep_name(prefix: str, point: Point) -> str:
    """A sweep registers one model per role and configuration: every seed's student as a
    version of ``PREFIX-student``, every teacher as a version of ``PREFIX-teacher`` and every
    KD student as a version of ``PREFIX-student-METHOD``, each followed by the values of the
    point's other axes (``PREFIX-student-kd-kd_temperature=2``); the versions' tags say which
    seed and weight."""
    base = {"student": f"{prefix}-student", "teacher": f"{prefix}-teacher",
            "kd": f"{prefix}-student-{point.method}"}[point.role]
    return base + "".join(f"-{n}={show(v)}" for n, v in point.values)


def study_name(prefix: str, point: Point) -> str:
    """The study's five names (``PREFIX-teacher-normal``, ``kd_name(...)``, ...)."""
    if point.role == "student":
        return f"{prefix}-student"
    kind = teacher_kind(point.weight)
    return f"{prefix}-teacher-{kind}" if point.role == "teacher" else kd_name(prefix, point.method, kind)


def study_role(point: Point) -> str:
    """A study point's row: student, teacher_normal, teacher_trained, kd_normal or kd_trained."""
    return point.role if point.role == "student" else f"{point.role}_{teacher_kind(point.weight)}"


@datasets.load_once()  # the data set is read and decoded once, not once per stage
def study(*, student_arch: str, teacher_arch: str, student_train: TrainConfig,
          teacher_train: TrainConfig, weight: float = 0.005, temperature: float = 4.0,
          method: str = "kd", method_params: dict | None = None, dataset: str = "digits",
          data_dir: str | None = None, stream: bool | None = None, register_as: str | None = None,
          resume_run: str | None = None) -> str:
    """The whole Trained-Teacher study on one data set; returns the comparison table.

    Child runs, in order: baseline student; normal teacher (weight 0) and trained teacher
    (``weight``, temperature ``temperature``), both against that student; a student
    distilled from each teacher with ``method`` (``method_params``: its hyper-parameters,
    defaults where missing). Students train with ``student_train``, teachers with
    ``teacher_train``, both with the student's seed. Each later stage fetches its partner
    from the registry by ``NAME/VERSION``, exactly as a user would. Every registered model
    is then promoted (alias ``champion`` to its best version). Registered names are
    ``PREFIX-student``, ``PREFIX-teacher-normal``, ``PREFIX-teacher-trained`` and the two of
    ``kd_name``, with PREFIX = ``register_as`` (default: the data set's name).
    ``resume_run`` continues an unfinished study run: finished children are reused, the
    others resumed. A stage that fails does not stop the ones that do not need it.
    """
    prefix = register_as or dataset
    method_params = default_method_params(method) | (method_params or {})
    if weight <= 0:
        raise TTKDError(f"the study's trained teacher needs weight > 0 (got {weight}); "
                        f"run the teach stage by hand for weight <= 0, or a sweep")
    grid = Grid((student_train.seed,), (0.0, weight), (method,))
    plan = Plan(grid, student_arch, teacher_arch, student_train, teacher_train, temperature,
                {method: method_params}, dict(dataset=dataset, data_dir=data_dir, stream=stream),
                name=lambda p: study_name(prefix, p), tags=lambda p: {"ttkd.role": study_role(p)})
    _check(plan)
    args = {"student_arch": student_arch, "teacher_arch": teacher_arch, "weight": weight,
            "temperature": temperature, "method": method, "method_params": method_params,
            "dataset": dataset, "data_dir": data_dir, "stream": stream, "register_as": prefix,
            "student_train": dataclasses.asdict(student_train),
            "teacher_train": dataclasses.asdict(teacher_train)}
    params = ({k: v for k, v in args.items() if not k.endswith("_train") and k != "method_params"}
              | {("kd_temperature" if k == "temperature" else k): v for k, v in method_params.items()})

    def finish(outcomes: dict[Point, Outcome]) -> str:
        res = {study_role(p): o.result for p, o in outcomes.items()}
        promotions = [promotion.promote(r.model.name) for r in res.values()]
        table = comparison_table(res, weight, method)
        table += "\n" + cost_table(res, {k: tracking.run_cost(r.run_id) for k, r in res.items()}, method)
        tracking.log_metrics({f"val_acc_{k}": res[k].val_acc for k in STUDY_ROWS})
        tracking.log_text(table, "comparison.md")
        tracking.log_dict({k: {"model": r.model.uri, "val_acc": r.val_acc, "agreement": r.agreement}
                         for k, r in res.items()}, "comparison.json")
        return "\n".join(map(str, promotions)) + "\n" + table

    return _run_grid("main", f"study {dataset}", plan, args, params, student_train, teacher_train,
                     resume_run, finish, LocalPool(jobs=1, threads=0), verbose=True, method=method)


@datasets.load_once()
def sweep(*, student_arch: str, teacher_arch: str, student_train: TrainConfig,
          teacher_train: TrainConfig, seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
          weights: tuple[float, ...] = (0.0, 0.005), methods: tuple[str, ...] = ("kd",),
          axes: Axes = (), temperature: float = 4.0, method_params: dict[str, dict] | None = None,
          dataset: str = "digits", data_dir: str | None = None, stream: bool | None = None,
          register_as: str | None = None, jobs: int = 2, threads: int = 0, cluster: str = "",
          cpus_per_point: float = 1.0, gpus_per_point: float = 0.0, cluster_auth: str = "token",
          tune: Space | list = (), trials: int = 20, sampler: str = "tpe", prune: str = "median",
          holdout: float = 0.1, storage: str = "", resume_run: str | None = None,
          print_line: Callable[[str], None] = print) -> str:
    """Seeds x teacher weights x KD methods x ``axes`` (module ``ttkd.studies.plan``), one
    child run per point under one parent run; returns the report's markdown.

    With ``tune`` (a space, as a search takes it) the sweep is a fair verdict
    (``ttkd.studies.tuning``): every arm first gets ``trials`` trials of it (Optuna's ``sampler``,
    pruner ``prune``, on a ``holdout`` of the training split; the studies in ``storage``), and
    each arm's points then train with its choice; the report begins with the tuning.

    ``weights`` always gets 0, the normal teacher every other weight is compared with.
    Registered names: ``sweep_name``. The parent run gets ``report.md``, ``report.json``
    and three figures; then each teacher model's alias ``champion`` goes to the version
    whose students are best (``promotion.promote(by="students")``) and each student model's
    to its best version by val_acc. A point that fails is reported and the others go on;
    the parent run then ends FAILED and ``resume`` retries what did not finish.
    ``jobs`` points train at once in worker processes, each with ``threads`` CPU threads
    (0: this process's threads / jobs). With ``cluster`` (``local``, ``auto``, ``HOST:PORT``
    or ``ray://HOST:PORT``) every point is a Ray task of ``cpus_per_point`` CPUs and
    ``gpus_per_point`` GPUs (``threads`` 0: ``cpus_per_point`` threads) on that cluster
    instead; ``cluster_auth`` ``none`` accepts a cluster that runs jobs without Ray's token
    authentication. ``print_line`` gets one line per finished point.
    """
    prefix = register_as or dataset
    weights = tuple(sorted(set(weights) | {0.0}))
    method_params = {m: default_method_params(m) | (method_params or {}).get(m, {}) for m in methods}
    axes = tuple((n, tuple(v)) for n, v in axes)  # (as resume reads them back: lists)
    grid = Grid(tuple(seeds), weights, tuple(methods), axes)
    plan = Plan(grid, student_arch, teacher_arch, student_train, teacher_train, temperature,
                method_params, dict(dataset=dataset, data_dir=data_dir, stream=stream),
                name=lambda p: sweep_name(prefix, p))
    tune = stored_space(tune)
    tuned = None
    if tune:
        tuned = tuning.Tuning(tune, trials, sampler, prune, holdout, optuna_side.storage_url(storage),
                              tuning.tuning_seed(tuple(seeds)), prefix)
        tuning.check(grid, tune, sampler, trials)
    _check(plan, tuned)
    args = {"student_arch": student_arch, "teacher_arch": teacher_arch, "seeds": list(seeds),
            "weights": list(weights), "methods": list(methods), "axes": [[n, list(v)] for n, v in axes],
            "temperature": temperature,
            "method_params": method_params, "dataset": dataset, "data_dir": data_dir,
            "stream": stream, "register_as": prefix, "jobs": jobs, "threads": threads,
            "cluster": cluster, "cpus_per_point": cpus_per_point, "gpus_per_point": gpus_per_point,
            "cluster_auth": cluster_auth, "student_train": dataclasses.asdict(student_train),
            "teacher_train": dataclasses.asdict(teacher_train)}
    if tuned:
        args |= {"tune": space_json(tune), "trials": trials, "sampler": sampler,
                 "prune": prune, "holdout": holdout, "storage": tuned.storage}
    params = ({k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in args.items()
               if not k.endswith("_train") and k not in ("method_params", "axes", "tune")}
              | {"axes": axes_text(axes)}
              | ({"tune": space_text(tune), "tune_seed": tuned.seed} if tuned else {})
              | {("kd_temperature" if k == "temperature" else f"{m}.{k}" if len(methods) > 1 else k): v
                 for m, p in method_params.items() for k, v in p.items()})

    scheduler = (RayCluster(Placement(cluster, cpus_per_point, gpus_per_point, threads, cluster_auth)) if cluster
                 else LocalPool(jobs, threads))
    summaries: list[dict] = []

    def prepare(parent_id: str, scheduler: Scheduler, generation: int) -> Plan:
        """A tuned sweep's tuning, before its points: the plan with each arm's choice."""
        if not tuned:
            return plan
        chosen, found = tuning.tune(plan, tuned, parent_id, scheduler, generation, args,
                                    lambda o, i, n: print_line("tuning " + point_line(o, i, n)), print_line)
        summaries.extend(found)
        tracking.log_dict(found, "tuning.json")
        tracking.log_metrics(tuning.metrics(found))
        return chosen

    def finish(outcomes: dict[Point, Outcome]) -> str:
        head = tuning.markdown(tuned, summaries, tuple(seeds)) + "\n" if tuned else ""
        return _finish_sweep(plan, prefix, outcomes, head)

    return _run_grid("sweep", f"sweep {dataset}", plan, args, params, student_train, teacher_train,
                     resume_run, finish, scheduler, verbose=False,
                     on_outcome=lambda o, i, n: print_line(point_line(o, i, n)), method=",".join(methods),
                     prepare=prepare)


def _finish_sweep(plan: Plan, prefix: str, outcomes: dict[Point, Outcome], head: str = "") -> str:
    """The report logged on the parent run (after ``head``: a tuned sweep's tuning), then the
    promotions: the teacher by its students, each student model by its own val_acc; returns
    their lines and the report's markdown."""
    report = reports.build(plan.grid, _values(outcomes), _failures(outcomes))
    text = head + reports.markdown(report)
    tracking.log_report(text, report, reports.figures(report))
    tracking.log_metrics(reports.headline_metrics(report))  # to sort and compare sweeps in mlflow ui
    tag_far_off(report)
    lines = []
    first = sorted(plan.grid.points(), key=lambda p: ("teacher", "student", "kd").index(p.role))
    for name, by in {sweep_name(prefix, p): "students" if p.role == "teacher" else "self" for p in first}.items():
        try:
            lines.append(str(promotion.promote(name, by=by)))
        except TTKDError as exc:
            lines.append(f"{name}: not promoted ({exc})")
    return "\n".join(lines) + "\n\n" + text


def tag_far_off(report: dict) -> None:
    """Tag each run whose seed lies far from the others of its row (``ttkd.far_off``: its value
    and the row's median), and the sweep's own run with their points, so mlflow ui shows them."""
    for f in report["far"]:
        tracking.tag_run(f["run_id"], {TAG_FAR_OFF: f"val_acc {f['val_acc']:.2f} against the median "
                                                    f"{f['median']:.2f} of its {f['n']} seeds"})
    if report["far"]:
        tracking.set_tags({TAG_FAR_OFF: "; ".join(f["point"] for f in report["far"])[:5000]})


def _check(plan: Plan, tuned: tuning.Tuning | None = None) -> None:
    """Everything a user can get wrong, before the parent run opens (with ``tuned``: its
    registered names, holdout and storage too)."""
    registry.prepare_store()
    names = [plan.name(p) for p in plan.grid.points()]
    if tuned:
        names += [f"{tuned.prefix}-tuning-{role}" for role in ("student", "teacher")]
        optuna_side.check_storage(tuned.storage)
    for name in dict.fromkeys(names):
        registry.check_model_name(name)
    models.get(plan.student_arch), models.get(plan.teacher_arch)
    resolve_device(plan.student_train.device), resolve_device(plan.teacher_train.device)
    data = datasets.load(plan.data["dataset"], plan.data["data_dir"], plan.data["stream"])
    if tuned:
        data.holdout(tuned.holdout)
    first = plan.grid.seeds[0]
    for point in plan.grid.points():  # a method that cannot pair these networks' features fails now
        if point.role == "kd" and point.seed == first and kd.get(point.method).features:
            kw = plan.task(point, {}, "", partner_of=False).kwargs
            teacher = dict(point.values).get("teacher_arch", plan.teacher_arch)
            build_method(point.method, "distill", data, network(kw["arch"], data), network(teacher, data),
                         kw["method_params"], kw["arch"], teacher)


def _run_grid(kind: str, run_name: str, plan: Plan, args: dict, params: dict, student_train: TrainConfig,
              teacher_train: TrainConfig, resume_run: str | None,
              finish: Callable[[dict[Point, Outcome]], str], scheduler: Scheduler, *, verbose: bool,
              method: str, on_outcome: Callable[[Outcome, int, int], None] = lambda o, i, n: None,
              prepare: Callable[[str, Scheduler, int], Plan] | None = None) -> str:
    """Open (or reopen) the parent run, train the grid's points as its children on
    ``scheduler``, then ``finish`` (tables, report, promotions) with every point's outcome.
    ``prepare`` (the parent run's id, the scheduler, this start's generation) first gives the
    plan the points train by (a tuned sweep's tuning). The scheduler is entered (a cluster
    joined, its resources checked) before the run opens."""
    found = found_points(resume_run, plan.grid) if resume_run else {}
    with scheduler:
        run_ = tracking.start_run(resume_run, name=run_name, nested=False)
        parent_id = run_.info.run_id
        status = "FAILED"
        try:
            if not resume_run:
                tracking.set_tags({TAG_STAGE: kind, "ttkd.method": method})
                per_seed = ("seed",) if kind == "sweep" else ()  # a sweep's seeds are a parameter of their own
                roles = (("student", student_train), ("teacher", teacher_train))
                log_params(params | {"stream": STREAM_WORDS[args["stream"]], "data_dir": args["data_dir"] or ""}
                           | {f"{role}.{k}": v for role, train in roles
                              for k, v in dataclasses.asdict(train).items() if k not in per_seed})
                tracking.log_dict(args, f"{kind}.json")  # what resuming rebuilds the grid from
            try:
                generation = attempts.next_generation(parent_id)
                if prepare is not None:
                    try:
                        plan = prepare(parent_id, scheduler, generation)
                    except StageInterrupted:
                        status = "KILLED"
                        raise
                outcomes, signum = run(plan, parent_id, found, scheduler, generation=generation, verbose=verbose,
                                       on_outcome=on_outcome)
            except WorkerDied as exc:
                raise TTKDError(f"a worker process died while training {exc}; run {parent_id} is marked FAILED: "
                                f"resume={parent_id} continues it") from None
            if signum is not None:
                status = "KILLED"
                left = len(plan.grid.points()) - sum(o.result is not None for o in outcomes.values())
                raise StageInterrupted(f"stopped by {signal.Signals(signum).name} with {left} of "
                                       f"{len(plan.grid.points())} stages "
                                       f"unfinished; {kind} run {parent_id} is marked KILLED and keeps every "
                                       f"finished stage: continue it with resume={parent_id}", signum)
            failed = _failures(outcomes)
            if kind == "main" and failed:  # the study's table needs all five
                raise TTKDError(_failure_line(failed, parent_id, len(outcomes)))
            text = finish(outcomes)
            if failed:
                log.info(text)
                raise TTKDError(_failure_line(failed, parent_id, len(outcomes)))
            status = "FINISHED"
        finally:
            tracking.end_run(status)
        return text


def _failure_line(failed: dict[Point, str], parent_id: str, total: int) -> str:
    first = next((p for p, e in failed.items() if not e.startswith("skipped")), next(iter(failed)))
    return (f"{len(failed)} of {total} stages did not finish ({first.key}: {failed[first]}); "
            f"run {parent_id} is marked FAILED: resume={parent_id} retries them")


def _values(outcomes: dict[Point, Outcome]) -> dict[Point, reports.PointValues]:
    values = {}
    for p, o in outcomes.items():
        if o.result is None:
            continue
        curve = tracking.metric_history(o.result.run_id, "val_acc") if p.role == "kd" else ()
        values[p] = reports.PointValues(o.result.val_acc, o.result.agreement, o.result.model.uri,
                                        o.result.run_id, tuple(curve), tracking.run_cost(o.result.run_id))
    return values


def _failures(outcomes: dict[Point, Outcome]) -> dict[Point, str]:
    return {p: o.error for p, o in outcomes.items() if o.result is None}


def resume_grid(kind: str, reference: str, cfg: RunConfig | None = None, **change) -> str:
    """Continue an unfinished study or sweep run (its id, or ``last``) where it stopped;
    the values ``cfg`` was given must be the run's own; ``change``: how a sweep's rest
    trains (``jobs``, ``threads``; ``cluster`` with ``cpus_per_point`` and ``gpus_per_point``:
    on that cluster, else on this machine, wherever it started)."""
    registry.prepare_store()
    run_ = unfinished_run(kind, reference)
    if cfg is not None:
        check_resume(cfg, run_.info.run_id, run_.data.params)
    try:
        args = tracking.read_json(run_.info.run_id, f"{kind}.json")
    except ValueError:
        raise TTKDError(f"{kind} run {run_.info.run_id} has no readable {kind}.json; start it again") from None
    if args is None:
        older = tracking.has_artifact(run_.info.run_id, "study.json")
        why = "was made by an older ttkd" if older else f"has no {kind}.json"
        raise TTKDError(f"{kind} run {run_.info.run_id} {why}; start it again")
    trains = {k: TrainConfig.from_dict(args.pop(k)) for k in ("student_train", "teacher_train")}
    log.info(f"resuming {kind} run {run_.info.run_id}")
    if os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run`: point its run at the real one,
        tracking.tag_run(os.environ["MLFLOW_RUN_ID"], {"ttkd.resumes_run": run_.info.run_id})
        del os.environ["MLFLOW_RUN_ID"]    # which new child runs must not attach to
    if kind == "main":
        return study(**args, **trains, resume_run=run_.info.run_id)
    args = args | {k: tuple(args.get(k, ())) for k in ("seeds", "weights", "methods", "axes")} | {"cluster": ""}
    return sweep(**(args | {k: v for k, v in change.items() if v}), **trains, resume_run=run_.info.run_id)


def comparison_table(res: dict[str, StageResult], weight: float, method: str = "kd") -> str:
    """A markdown table of the study: students first, then the teachers."""
    name = method.upper()
    labels = {
        "student": "student, no KD", "kd_normal": f"student, {name} from normal teacher",
        "kd_trained": f"student, {name} from trained teacher", "teacher_normal": "normal teacher (w = 0)",
        "teacher_trained": f"trained teacher (w = {weight:g})",
    }
    base = res["student"].val_acc
    lines = ["| model | val_acc (%) | vs no-KD student (pp) | agreement with partner (%) | registered as |",
             "|---|---:|---:|---:|---|"]
    for key in STUDY_ROWS:
        r = res[key]
        delta = f"{r.val_acc - base:+.2f}" if key.startswith(("student", "kd")) else ""
        agree = f"{r.agreement:.2f}" if r.agreement is not None else ""
        lines.append(f"| {labels[key]} | {r.val_acc:.2f} | {delta} | {agree} | {r.model.uri} |")
    return "\n".join(lines) + "\n"


COST_LABELS = {"student": "student, no KD", "kd_normal": "KD student, normal teacher",
               "kd_trained": "KD student, trained teacher", "teacher_normal": "normal teacher",
               "teacher_trained": "trained teacher"}


def cost_table(res: dict[str, StageResult], costs: dict[str, dict[str, float]], method: str = "kd") -> str:
    """What each model costs to run (measured on the served network, CPU at 1 thread), and
    each KD student against its teacher and the no-KD student: x fewer parameters and MACs,
    x faster at batch 1, the difference in val_acc."""
    if any(not c for c in costs.values()):
        return ""  # a run from before ttkd measured costs
    lines = ["| model | parameters | MACs per image | served file (KiB) | ms per image (batch 1) | "
             "images/s (batch 256) |", "|---|---:|---:|---:|---:|---:|"]
    for key in STUDY_ROWS:
        c = costs[key]
        lines.append(f"| {COST_LABELS[key]} | {c['params']:,.0f} | {c['macs']:,.0f} | {c['model_bytes'] / 1024:,.1f} | "
                     f"{c['latency_ms_b1_cpu']:.3f} | {c['throughput_b256_cpu']:,.0f} |")
    lines += ["", f"| {method.upper()} student | against | x fewer parameters | x fewer MACs | x faster (batch 1) | "
              "Δ val_acc (pp) |", "|---|---|---:|---:|---:|---:|"]
    for kind in ("normal", "trained"):
        student = costs[f"kd_{kind}"]
        for other in (f"teacher_{kind}", "student"):
            them = costs[other]
            lines.append(f"| {COST_LABELS['kd_' + kind]} | {COST_LABELS[other]} | "
                         f"{them['params'] / student['params']:.2f}x | {them['macs'] / student['macs']:.2f}x | "
                         f"{them['latency_ms_b1_cpu'] / student['latency_ms_b1_cpu']:.2f}x | "
                         f"{res[f'kd_{kind}'].val_acc - res[other].val_acc:+.2f} |")
    return "\n".join(lines) + "\n"
