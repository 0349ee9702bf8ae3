"""The whole Trained-Teacher study on one data set: five stages as child runs of one
parent run, compared in one table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from ttkd import data as datasets
from ttkd import kd, models, registry
from ttkd.engine import TrainConfig, resolve_device
from ttkd.errors import TTKDError
from ttkd.stages import (
    STREAM_WORDS,
    TAG_PARTNER,
    TAG_STAGE,
    StageInterrupted,
    StageResult,
    baseline,
    build_method,
    default_method_params,
    distill,
    resume,
    role_tag,
    teach,
    train_config,
    unfinished_run,
)
from ttkd.tracking import log_params

STUDY_ROWS = ("student", "kd_normal", "kd_trained", "teacher_normal", "teacher_trained")


def kd_name(prefix: str, method: str, kind: str) -> str:
    """Registered name of a study's KD student: ``PREFIX-student-kd-KIND`` for kd, and
    ``PREFIX-student-METHOD-KIND`` for the other methods, so methods never share a name."""
    return f"{prefix}-student-{method}-{kind}"


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
    ``teacher_train``. Each later stage fetches its partner from the registry by
    ``NAME/VERSION``, exactly as a user would. Every registered model is then promoted
    (alias ``champion`` to its best version). Registered names are ``PREFIX-student``,
    ``PREFIX-teacher-normal``, ``PREFIX-teacher-trained`` and the two of ``kd_name``, with
    PREFIX = ``register_as`` (default: the data set's name). ``resume_run`` continues an
    unfinished study run: finished children are reused, an unfinished one resumed.
    """
    prefix = register_as or dataset
    registry.prepare_store()
    kd.get(method)
    method_params = default_method_params(method) | (method_params or {})
    for name in (f"{prefix}-student", f"{prefix}-teacher-normal", f"{prefix}-teacher-trained",
                 kd_name(prefix, method, "normal"), kd_name(prefix, method, "trained")):
        registry.check_model_name(name)
    if weight <= 0:
        raise TTKDError(f"the study's trained teacher needs weight > 0 (got {weight}); "
                        f"run the teach stage by hand for weight <= 0")
    models.get(student_arch), models.get(teacher_arch)  # fail before the parent run opens
    resolve_device(student_train.device), resolve_device(teacher_train.device)
    data = datasets.load(dataset, data_dir, stream)
    if kd.get(method).features:  # a method that cannot pair these networks' features fails now
        build = lambda arch: models.build(arch, data.num_classes, data.in_channels,  # noqa: E731
                                          image_size=data.image_shape[-1])
        build_method(method, "distill", data, build(student_arch), build(teacher_arch), method_params,
                     student_arch, teacher_arch)
    args = {"student_arch": student_arch, "teacher_arch": teacher_arch, "weight": weight,
            "temperature": temperature, "method": method, "method_params": method_params,
            "dataset": dataset, "data_dir": data_dir, "stream": stream, "register_as": prefix,
            "student_train": dataclasses.asdict(student_train),
            "teacher_train": dataclasses.asdict(teacher_train)}
    done = _study_children(resume_run) if resume_run else {}
    common = dict(dataset=dataset, data_dir=data_dir, stream=stream)
    if resume_run:
        mlflow.start_run(run_id=resume_run)
    else:
        mlflow.start_run(run_name=f"study {dataset}")
    status = "FAILED"
    try:
        if not resume_run:
            mlflow.set_tag(TAG_STAGE, "main")
            mlflow.set_tag("ttkd.method", method)
            log_params({k: v for k, v in args.items() if not k.endswith("_train") and k != "method_params"}
                       | {("kd_temperature" if k == "temperature" else k): v for k, v in method_params.items()}
                       | {"stream": STREAM_WORDS[stream]}
                       | {f"student.{k}": v for k, v in args["student_train"].items()}
                       | {f"teacher.{k}": v for k, v in args["teacher_train"].items()})
            mlflow.log_dict(args, "study.json")  # what resuming rebuilds the study from

        def child(role: str, run_stage: Callable[..., StageResult]) -> StageResult:
            if role in done and isinstance(done[role], StageResult):
                return done[role]  # finished and registered in an earlier attempt
            if role in done:  # started before: continue it from its checkpoint
                return resume(done[role][0], done[role][1])
            with role_tag(role):
                return run_stage()

        res = {"student": child("student", lambda: baseline(
            arch=student_arch, train=student_train, register_as=f"{prefix}-student", **common))}
        for kind, w in (("normal", 0.0), ("trained", weight)):
            res[f"teacher_{kind}"] = child(f"teacher_{kind}", lambda w=w, kind=kind: teach(
                student=_pinned(res["student"]), arch=teacher_arch, train=teacher_train, weight=w,
                temperature=temperature, register_as=f"{prefix}-teacher-{kind}", **common))
        for kind in ("normal", "trained"):
            res[f"kd_{kind}"] = child(f"kd_{kind}", lambda kind=kind: distill(
                teacher=_pinned(res[f"teacher_{kind}"]), arch=student_arch, train=student_train,
                method=method, method_params=method_params,
                register_as=kd_name(prefix, method, kind), **common))
        promotions = [registry.promote(r.model.name) for r in res.values()]
        table = comparison_table(res, weight, method)
        mlflow.log_metrics({f"val_acc_{k}": res[k].val_acc for k in STUDY_ROWS})
        mlflow.log_text(table, "comparison.md")
        mlflow.log_dict({k: {"model": r.model.uri, "val_acc": r.val_acc, "agreement": r.agreement}
                         for k, r in res.items()}, "comparison.json")
        status = "FINISHED"
    except StageInterrupted as exc:
        status = "KILLED"
        study_id = mlflow.active_run().info.run_id
        raise StageInterrupted(f"{str(exc).split(';')[0]}; study run {study_id} is marked KILLED and "
                               f"keeps every finished stage: continue it with resume={study_id}",
                               exc.exit_code - 128) from None
    finally:
        mlflow.end_run(status)
    for p in promotions:
        print(p)
    return table


def resume_study(reference: str) -> str:
    """Continue an unfinished study run (its id, or ``last``) where it stopped."""
    registry.prepare_store()
    run = unfinished_run("main", reference)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="study.json")
        args = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        raise TTKDError(f"study run {run.info.run_id} has no readable study.json; start it again") from None
    if "method" not in args:
        raise TTKDError(f"study run {run.info.run_id} was made by an older ttkd; start it again")
    trains = {k: train_config(args.pop(k)) for k in ("student_train", "teacher_train")}
    return study(**args, **trains, resume_run=run.info.run_id)


def _study_children(parent_id: str) -> dict:
    """role -> StageResult (finished and registered) or (stage, run id) (to resume)."""
    found = {}
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    for r in sorted(runs, key=lambda r: r.info.start_time):
        role, tags = r.data.tags.get("ttkd.role"), r.data.tags
        if role is None:
            continue
        if r.info.status == "FINISHED" and "ttkd.registered_model" in tags:
            ref = registry.resolve(tags["ttkd.registered_model"])
            partner = registry.resolve(tags[TAG_PARTNER]) if TAG_PARTNER in tags else None
            m = r.data.metrics
            found[role] = StageResult(r.info.run_id, ref, m["val_acc"], m.get("agreement"),
                                      partner, m.get("partner_val_acc"))
        elif r.info.status != "FINISHED":
            found[role] = (tags[TAG_STAGE], r.info.run_id)
    return found


def _pinned(result: StageResult) -> str:
    return f"{result.model.name}/{result.model.version}"


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
