"""The three stages and the whole study, each an MLflow run.

``baseline``  train from scratch with cross-entropy
``teach``     train a teacher against a frozen student fetched from the registry
``distill``   distil a student from a frozen teacher fetched from the registry
``study``     all of them on one data set, as child runs of one parent run

Every stage checks all its inputs (data set, architecture, partner, model name)
before it opens a run, and writes to the registry only after training finished.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import signal
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from ttkd import data as datasets
from ttkd import losses, models, registry
from ttkd.data import ImageData
from ttkd.errors import TTKDError
from ttkd.registry import ModelRef
from ttkd.train import (EpochStats, Interrupted, TrainConfig, accuracy, fit, predict, resolve_device,
                        seed_everything, set_deterministic)

TAG_STAGE = "ttkd.stage"
TAG_PARTNER = "ttkd.partner_model"


@dataclasses.dataclass(frozen=True)
class StageResult:
    run_id: str
    model: ModelRef            # the registered version this stage made
    val_acc: float             # of the registered (last-epoch) weights, percent
    agreement: float | None    # top-1 agreement with the partner, percent
    partner: ModelRef | None
    partner_val_acc: float | None


def baseline(*, arch: str, train: TrainConfig, dataset: str = "digits",
             data_dir: str | None = None, stream: bool | None = None, register_as: str | None = None,
             resume_from: tuple[str, dict] | None = None) -> StageResult:
    """Train ``arch`` from scratch with cross-entropy; register it as ``register_as``
    (default ``DATASET-ARCH``). ``resume_from`` = (run id, checkpoint) continues a run."""
    return _run_stage(
        "baseline", arch=arch, train=train, dataset=dataset, data_dir=data_dir, stream=stream,
        register_as=register_as or f"{dataset}-{arch}",
        loss=lambda z, _, y: losses.cross_entropy(z, y), partner=None, extra_params={},
        resume_from=resume_from,
    )


def teach(*, student: str, arch: str, train: TrainConfig, weight: float = 0.005,
          temperature: float = 4.0, dataset: str = "digits", data_dir: str | None = None,
          stream: bool | None = None, register_as: str | None = None,
          resume_from: tuple[str, dict] | None = None) -> StageResult:
    """Train teacher ``arch`` against the frozen ``student`` (a model reference) with
    CE + weight·T²·KL(teacher ‖ student); register it (default ``DATASET-ARCH-KIND``,
    KIND trained / normal / nasty for weight > 0 / = 0 / < 0)."""
    kind = "trained" if weight > 0 else "normal" if weight == 0 else "nasty"
    return _run_stage(
        "teach", arch=arch, train=train, dataset=dataset, data_dir=data_dir, stream=stream,
        register_as=register_as or f"{dataset}-{arch}-{kind}",
        loss=lambda z, p, y: losses.teacher_loss(z, p, y, weight, temperature),
        partner=("student", student), extra_params={"weight": weight, "temperature": temperature},
        resume_from=resume_from,
    )


def distill(*, teacher: str, arch: str, train: TrainConfig, alpha: float = 0.9,
            temperature: float = 4.0, dataset: str = "digits", data_dir: str | None = None,
            stream: bool | None = None, register_as: str | None = None,
            resume_from: tuple[str, dict] | None = None) -> StageResult:
    """Distil student ``arch`` from the frozen ``teacher`` (a model reference) with
    (1−α)·CE + α·T²·KL(teacher ‖ student); register it (default ``DATASET-ARCH-kd``)."""
    return _run_stage(
        "distill", arch=arch, train=train, dataset=dataset, data_dir=data_dir, stream=stream,
        register_as=register_as or f"{dataset}-{arch}-kd",
        loss=lambda z, p, y: losses.distill_loss(z, p, y, alpha, temperature),
        partner=("teacher", teacher), extra_params={"alpha": alpha, "temperature": temperature},
        resume_from=resume_from,
    )


class StageInterrupted(TTKDError):
    """A stage stopped by SIGINT or SIGTERM; its run is marked KILLED and can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _run_stage(stage: str, *, arch: str, train: TrainConfig, dataset: str, data_dir: str | None,
               stream: bool | None, register_as: str, loss: Callable, partner: tuple[str, str] | None,
               extra_params: dict, resume_from: tuple[str, dict] | None) -> StageResult:
    # Everything a user can get wrong is checked here, before a run is opened.
    registry.check_model_name(register_as)
    registry.prepare_store()
    device = resolve_device(train.device)
    data = datasets.load(dataset, data_dir, stream)
    set_deterministic(train.deterministic)
    seed_everything(train.seed)
    model = models.build(arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])
    partner_ref = partner_net = None
    if partner is not None:
        role, reference = partner
        partner_ref = registry.resolve(reference)
        partner_net = load_partner(partner_ref, data, role)
    # what resuming needs to rebuild this stage exactly: the partner pinned to its version
    kwargs = {"arch": arch, "dataset": dataset, "data_dir": data_dir, "stream": stream,
              "register_as": register_as, "train": dataclasses.asdict(train), **extra_params,
              **({partner[0]: partner_ref.uri} if partner else {})}
    ckpt = resume_from[1] if resume_from else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])

    data = data.to(device)
    model.to(device)
    if resume_from:
        run = mlflow.start_run(run_id=resume_from[0], nested=mlflow.active_run() is not None)
    else:
        run = mlflow.start_run(nested=mlflow.active_run() is not None, run_name=f"{stage} {arch}")
    status = "FAILED"
    try:
        if ckpt is None:
            tags = {TAG_STAGE: stage}
            if _role_tag.active:
                tags["ttkd.role"] = _role_tag.active
            if partner_ref is not None:
                tags[TAG_PARTNER] = partner_ref.uri
            mlflow.set_tags(tags)
            _log_params({
                "dataset": dataset, "data_dir": data_dir or "", "stream": _STREAM_WORDS[stream],
                "streamed": data.streamed, "arch": arch,
                "register_as": register_as, **dataclasses.asdict(train), **extra_params,
                **({partner[0]: partner[1]} if partner else {}),
                "num_params": models.num_parameters(model), "device_used": str(device),
            })
            _log_dataset(data)
        else:
            mlflow.set_tag("ttkd.resumed_after_epoch", str(ckpt["epoch"]))
            print(f"resuming run {run.info.run_id} after epoch {ckpt['epoch']}", flush=True)

        partner_acc = None
        if partner_net is not None:
            partner_net.to(device)
            partner_acc = accuracy(predict(partner_net, data, train.batch_size), data.val_y)
            print(f"{partner[0]} {partner_ref.uri}: val_acc {partner_acc:.2f}%", flush=True)

        last = dict(ckpt["stats"]) if ckpt else None
        if ckpt is not None:  # killed between its checkpoint and its metrics: log them now
            logged = {m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")}
            if ckpt["epoch"] not in logged:
                log_epoch(EpochStats(**last), partner_acc)
        best = [ckpt["best_val_acc"] if ckpt else -1.0]
        with tempfile.TemporaryDirectory() as tmp, _stop_on_signals() as stop:
            def on_epoch(s: EpochStats, engine: dict) -> None:
                best[0] = max(best[0], s.val_acc)
                state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "engine": engine, "stage": stage, "kwargs": kwargs,
                         "arch": arch, "num_classes": data.num_classes,
                         "image_shape": list(data.image_shape), "epoch": s.epoch,
                         "val_acc": s.val_acc, "best_val_acc": best[0],
                         "stats": dataclasses.asdict(s)}
                save_checkpoint(Path(tmp) / "last.pt", state)
                log_checkpoint(Path(tmp) / "last.pt")
                if s.val_acc == best[0]:
                    save_checkpoint(Path(tmp) / "best.pt", state)
                    log_checkpoint(Path(tmp) / "best.pt")
                # metrics after the checkpoint: an epoch with metrics always has its checkpoint
                log_epoch(s, partner_acc)

            try:
                history = fit(model, data, loss, train, partner=partner_net, on_epoch=on_epoch,
                              resume=ckpt["engine"] if ckpt else None, stop=stop)
            except Interrupted as exc:
                status = "KILLED"
                name = signal.Signals(stop.signum).name
                raise StageInterrupted(
                    f"stopped by {name} in epoch {exc.epoch}; run {run.info.run_id} is marked KILLED "
                    f"and keeps its last finished epoch: continue it with resume={run.info.run_id}",
                    stop.signum) from None
        if history:
            last = dataclasses.asdict(history[-1])
        mlflow.log_metric("best_val_acc", best[0])

        info = log_model(model, data)
        version_tags = {TAG_STAGE: stage, "ttkd.dataset": dataset, "ttkd.arch": arch}
        if partner_ref is not None:
            version_tags[TAG_PARTNER] = partner_ref.uri
        ref = registry.register(info.model_uri, register_as, version_tags)
        mlflow.set_tag("ttkd.registered_model", ref.uri)
        print(f"registered {ref.uri} (val_acc {last['val_acc']:.2f}%, run {run.info.run_id})",
              flush=True)
        status = "FINISHED"
    finally:
        mlflow.end_run(status)
    return StageResult(run.info.run_id, ref, last["val_acc"], last["agreement"], partner_ref, partner_acc)


_STREAM_WORDS = {None: "auto", True: "true", False: "false"}


def log_epoch(s: EpochStats, partner_acc: float | None) -> None:
    """Log one epoch's metrics at step = epoch."""
    metrics = s.metrics()
    if partner_acc is not None:
        metrics["partner_val_acc"] = partner_acc
    mlflow.log_metrics(metrics, step=s.epoch)


class _stop_on_signals:
    """While active, SIGINT and SIGTERM ask training to stop after the current step
    (a second signal stops at once); calling the object says whether one came."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def log_checkpoint(path: Path, artifact_dir: str = "checkpoints") -> None:
    """Log a checkpoint file so that the run's copy is whole or absent: on a local artifact
    store, a temporary file renamed into place; elsewhere, MLflow's upload of one object."""
    uri = urllib.parse.urlparse(mlflow.get_artifact_uri(artifact_dir))
    if uri.scheme in ("", "file"):
        dest = Path(urllib.request.url2pathname(uri.path))
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / f".{path.name}.partial"
        shutil.copyfile(path, partial)
        os.replace(partial, dest / path.name)
    else:
        mlflow.log_artifact(str(path), artifact_dir)


def resume(stage: str, reference: str) -> StageResult:
    """Continue an unfinished ``stage`` run (its id, or ``last`` for the newest one) from
    its last checkpoint, in the same MLflow run."""
    registry.prepare_store()
    client = MlflowClient()
    run = _unfinished_run(stage, reference)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                       dst_path=tmp)
        except (MlflowException, OSError):
            raise TTKDError(f"run {run_id} has no checkpoint (it stopped in its first epoch); "
                            f"start the stage again without resume") from None
        ckpt = load_checkpoint(Path(path))
    if "engine" not in ckpt or ckpt.get("stage") != stage:
        raise TTKDError(f"the checkpoint of run {run_id} cannot be resumed (made by another version "
                        f"of ttkd or another stage); start the stage again")
    if os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run`: point its run at the real one
        client.set_tag(os.environ["MLFLOW_RUN_ID"], "ttkd.resumes_run", run_id)
    kwargs = dict(ckpt["kwargs"])
    train = _train_config(kwargs.pop("train"))
    fn = {"baseline": baseline, "teach": teach, "distill": distill}[stage]
    return fn(**kwargs, train=train, resume_from=(run_id, ckpt))


def _unfinished_run(stage: str, reference: str):
    """The unfinished ``stage`` run named by ``reference`` (a run id, or ``last``)."""
    if reference == "last":
        runs = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                              filter_string=f"tags.`{TAG_STAGE}` = '{stage}'",
                                              order_by=["attributes.start_time DESC"], max_results=50)
                if r.info.status != "FINISHED"]
        if not runs:
            raise TTKDError(f"no unfinished {stage} run to resume; start one without resume")
        return runs[0]
    try:
        run = MlflowClient().get_run(reference)
    except MlflowException:
        raise TTKDError(f"no run with id {reference!r}; give a run id from mlflow ui, or last") from None
    if run.data.tags.get(TAG_STAGE) != stage:
        raise TTKDError(f"run {run.info.run_id} is a {run.data.tags.get(TAG_STAGE, 'non-ttkd')} run; "
                        f"resume it with its own entry point")
    if run.info.status == "FINISHED":
        raise TTKDError(f"run {run.info.run_id} has finished; there is nothing to resume")
    return run


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, loaded without pickle; a damaged file is a user-facing error."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, wrong format, disallowed types...
        raise TTKDError(f"checkpoint {path.name} is damaged or not a ttkd checkpoint "
                        f"({str(exc).splitlines()[0][:120]}); start the stage again") from None


def _log_params(params: dict) -> None:
    """Log ``params`` on the active run, except keys it already has: ``mlflow run`` logs
    its parameters as given (an empty string as ``''``), and MLflow refuses to change a
    logged value."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def load_partner(ref: ModelRef, data: ImageData, role: str) -> nn.Module:
    """Load a frozen partner from the registry after checking it fits ``data``."""
    signature = mlflow.models.get_model_info(ref.uri).signature
    if signature is None or not signature.inputs.is_tensor_spec():
        raise TTKDError(f"{role} {ref.uri} has no image tensor signature; use a model that "
                        f"ttkd registered")
    in_shape = tuple(signature.inputs.inputs[0].shape[1:])
    num_classes = signature.outputs.inputs[0].shape[-1]
    if in_shape != data.image_shape or num_classes != data.num_classes:
        raise TTKDError(
            f"{role} {ref.uri} takes {_shape(in_shape)} images and predicts {num_classes} classes, "
            f"but dataset {data.name!r} has {_shape(data.image_shape)} images and "
            f"{data.num_classes} classes; pick a {role} trained on {data.name}")
    return mlflow.pytorch.load_model(ref.uri)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def log_model(model: nn.Module, data: ImageData):
    """Log ``model`` (eval mode, on the CPU) in MLflow's pickle-free pt2 format."""
    model.eval().cpu()  # BatchNorm must be exported with its running statistics
    example = (data.val_x[:4].cpu().float() / 255).sub(torch.tensor(data.mean).view(1, -1, 1, 1))
    example = example.div(torch.tensor(data.std).view(1, -1, 1, 1)).numpy()  # batch > 1: dynamic
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model, name="model", input_example=example, signature=infer_signature(example, output),
        serialization_format="pt2",
        metadata={"input": "float32 (B, C, H, W): (pixel / 255 - mean) / std, per channel",
                  "mean": list(data.mean), "std": list(data.std), "dataset": data.name},
        # given, not inferred: inference re-loads the model in a subprocess (seconds)
        pip_requirements=[f"torch=={importlib.metadata.version('torch')}"],
    )


def _log_dataset(data: ImageData) -> None:
    """Record both splits as the run's inputs (name, digest, schema, where they came from);
    a data set left on disk is recorded by name, digest and source only, unread."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source")
        source = resolve_dataset_source(Path(data.source).resolve().as_uri())
    for context, x, y in (("training", data.train_x, data.train_y), ("validation", data.val_x, data.val_y)):
        name = f"{data.name}-{context}"
        if data.streamed:
            record = MetaDataset(source, name=name, digest=data.digest())
        else:
            record = mlflow.data.from_numpy(x.cpu().numpy(), targets=y.cpu().numpy(), source=source,
                                            name=name)
        mlflow.log_input(record, context=context)


STUDY_ROWS = ("student", "kd_normal", "kd_trained", "teacher_normal", "teacher_trained")


STUDY_ROLES = ("student", "teacher_normal", "teacher_trained", "kd_normal", "kd_trained")


@datasets.load_once()  # the data set is read and decoded once, not once per stage
def study(*, student_arch: str, teacher_arch: str, student_train: TrainConfig,
          teacher_train: TrainConfig, weight: float = 0.005, alpha: float = 0.9,
          temperature: float = 4.0, kd_temperature: float = 4.0, dataset: str = "digits",
          data_dir: str | None = None, stream: bool | None = None, register_as: str | None = None,
          resume_run: str | None = None) -> str:
    """The whole Trained-Teacher study on one data set; returns the comparison table.

    Child runs, in order: baseline student; normal teacher (weight 0) and trained teacher
    (``weight``, temperature ``temperature``), both against that student; a KD student
    from each teacher (temperature ``kd_temperature``). Students train with
    ``student_train``, teachers with ``teacher_train``. Each later stage fetches its
    partner from the registry by ``NAME/VERSION``, exactly as a user would. Every
    registered model is then promoted (alias ``champion`` to its best version).
    Registered names are ``PREFIX-student``, ``PREFIX-teacher-normal``, ... with
    PREFIX = ``register_as`` (default: the data set's name). ``resume_run`` continues
    an unfinished study run: finished children are reused, an unfinished one resumed.
    """
    prefix = register_as or dataset
    registry.prepare_store()
    for suffix in ("student", "teacher-normal", "teacher-trained", "student-kd-normal",
                   "student-kd-trained"):
        registry.check_model_name(f"{prefix}-{suffix}")
    if weight <= 0:
        raise TTKDError(f"the study's trained teacher needs weight > 0 (got {weight}); "
                        f"run the teach stage by hand for weight <= 0")
    models.get(student_arch), models.get(teacher_arch)  # fail before the parent run opens
    resolve_device(student_train.device), resolve_device(teacher_train.device)
    datasets.load(dataset, data_dir, stream)
    args = {"student_arch": student_arch, "teacher_arch": teacher_arch, "weight": weight,
            "alpha": alpha, "temperature": temperature, "kd_temperature": kd_temperature,
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
            _log_params({k: v for k, v in args.items() if not k.endswith("_train")}
                        | {"stream": _STREAM_WORDS[stream]}
                        | {f"student.{k}": v for k, v in args["student_train"].items()}
                        | {f"teacher.{k}": v for k, v in args["teacher_train"].items()})
            mlflow.log_dict(args, "study.json")  # what resuming rebuilds the study from

        def child(role: str, run_stage: Callable[..., StageResult]) -> StageResult:
            if role in done and isinstance(done[role], StageResult):
                return done[role]  # finished and registered in an earlier attempt
            if role in done:  # started before: continue it from its checkpoint
                return resume(done[role][0], done[role][1])
            with _role_tag(role):
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
                alpha=alpha, temperature=kd_temperature,
                register_as=f"{prefix}-student-kd-{kind}", **common))
        promotions = [registry.promote(r.model.name) for r in res.values()]
        table = comparison_table(res, weight)
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


class _role_tag:
    """Tag the next child run with its role in the study (``ttkd.role``)."""

    active: str | None = None

    def __init__(self, role: str):
        self.role = role

    def __enter__(self):
        _role_tag.active = self.role

    def __exit__(self, *exc):
        _role_tag.active = None
        return False


def resume_study(reference: str) -> str:
    """Continue an unfinished study run (its id, or ``last``) where it stopped."""
    registry.prepare_store()
    run = _unfinished_run("main", reference)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="study.json")
        args = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        raise TTKDError(f"study run {run.info.run_id} has no readable study.json; start it again") from None
    trains = {k: _train_config(args.pop(k)) for k in ("student_train", "teacher_train")}
    return study(**args, **trains, resume_run=run.info.run_id)


def _train_config(values: dict) -> TrainConfig:
    """A TrainConfig from its dict form (as checkpoints and study.json keep it)."""
    return TrainConfig(**(values | {"milestones": tuple(values["milestones"])}))


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


def comparison_table(res: dict[str, StageResult], weight: float) -> str:
    """A markdown table of the study: students first, then the teachers."""
    labels = {
        "student": "student, no KD", "kd_normal": "student, KD from normal teacher",
        "kd_trained": "student, KD from trained teacher", "teacher_normal": "normal teacher (w = 0)",
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
