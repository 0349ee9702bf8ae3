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
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from torch import nn

from ttkd import data as datasets
from ttkd import losses, models, registry
from ttkd.data import ImageData
from ttkd.errors import TTKDError
from ttkd.registry import ModelRef
from ttkd.train import EpochStats, TrainConfig, accuracy, fit, predict, resolve_device, seed_everything

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
             data_dir: str | None = None, register_as: str | None = None) -> StageResult:
    """Train ``arch`` from scratch with cross-entropy; register it as ``register_as``
    (default ``DATASET-ARCH``)."""
    return _run_stage(
        "baseline", arch=arch, train=train, dataset=dataset, data_dir=data_dir,
        register_as=register_as or f"{dataset}-{arch}",
        loss=lambda z, _, y: losses.cross_entropy(z, y), partner=None, extra_params={},
    )


def teach(*, student: str, arch: str, train: TrainConfig, weight: float = 0.005,
          temperature: float = 4.0, dataset: str = "digits", data_dir: str | None = None,
          register_as: str | None = None) -> StageResult:
    """Train teacher ``arch`` against the frozen ``student`` (a model reference) with
    CE + weight·T²·KL(teacher ‖ student); register it (default ``DATASET-ARCH-KIND``,
    KIND trained / normal / nasty for weight > 0 / = 0 / < 0)."""
    kind = "trained" if weight > 0 else "normal" if weight == 0 else "nasty"
    return _run_stage(
        "teach", arch=arch, train=train, dataset=dataset, data_dir=data_dir,
        register_as=register_as or f"{dataset}-{arch}-{kind}",
        loss=lambda z, p, y: losses.teacher_loss(z, p, y, weight, temperature),
        partner=("student", student), extra_params={"weight": weight, "temperature": temperature},
    )


def distill(*, teacher: str, arch: str, train: TrainConfig, alpha: float = 0.9,
            temperature: float = 4.0, dataset: str = "digits", data_dir: str | None = None,
            register_as: str | None = None) -> StageResult:
    """Distil student ``arch`` from the frozen ``teacher`` (a model reference) with
    (1−α)·CE + α·T²·KL(teacher ‖ student); register it (default ``DATASET-ARCH-kd``)."""
    return _run_stage(
        "distill", arch=arch, train=train, dataset=dataset, data_dir=data_dir,
        register_as=register_as or f"{dataset}-{arch}-kd",
        loss=lambda z, p, y: losses.distill_loss(z, p, y, alpha, temperature),
        partner=("teacher", teacher), extra_params={"alpha": alpha, "temperature": temperature},
    )


def _run_stage(stage: str, *, arch: str, train: TrainConfig, dataset: str, data_dir: str | None,
               register_as: str, loss: Callable, partner: tuple[str, str] | None,
               extra_params: dict) -> StageResult:
    # Everything a user can get wrong is checked here, before a run is opened.
    registry.check_model_name(register_as)
    device = resolve_device(train.device)
    data = datasets.load(dataset, data_dir)
    seed_everything(train.seed)
    model = models.build(arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])
    partner_ref = partner_net = None
    if partner is not None:
        role, reference = partner
        partner_ref = registry.resolve(reference)
        partner_net = load_partner(partner_ref, data, role)

    data = data.to(device)
    model.to(device)
    with mlflow.start_run(nested=mlflow.active_run() is not None,
                          run_name=f"{stage} {arch}") as run:
        tags = {TAG_STAGE: stage}
        if partner_ref is not None:
            tags[TAG_PARTNER] = partner_ref.uri
        mlflow.set_tags(tags)
        _log_params({
            "dataset": dataset, "data_dir": data_dir or "", "arch": arch,
            "register_as": register_as, **dataclasses.asdict(train), **extra_params,
            **({partner[0]: partner[1]} if partner else {}),
            "num_params": models.num_parameters(model), "device_used": str(device),
        })
        _log_dataset(data)

        partner_acc = None
        if partner_net is not None:
            partner_net.to(device)
            partner_acc = accuracy(predict(partner_net, data, train.batch_size), data.val_y)
            print(f"{partner[0]} {partner_ref.uri}: val_acc {partner_acc:.2f}%", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            best = [-1.0]

            def on_epoch(s: EpochStats) -> None:
                metrics = s.metrics()
                if partner_acc is not None:
                    metrics["partner_val_acc"] = partner_acc
                mlflow.log_metrics(metrics, step=s.epoch)
                state = checkpoint_state(model, arch, data, s)
                save_checkpoint(Path(tmp) / "last.pt", state)
                mlflow.log_artifact(str(Path(tmp) / "last.pt"), "checkpoints")
                if s.val_acc > best[0]:
                    best[0] = s.val_acc
                    save_checkpoint(Path(tmp) / "best.pt", state)
                    mlflow.log_artifact(str(Path(tmp) / "best.pt"), "checkpoints")

            history = fit(model, data, loss, train, partner=partner_net, on_epoch=on_epoch)
        mlflow.log_metric("best_val_acc", best[0])

        info = log_model(model, data)
        version_tags = {TAG_STAGE: stage, "ttkd.dataset": dataset, "ttkd.arch": arch}
        if partner_ref is not None:
            version_tags[TAG_PARTNER] = partner_ref.uri
        ref = registry.register(info.model_uri, register_as, version_tags)
        mlflow.set_tag("ttkd.registered_model", ref.uri)
        print(f"registered {ref.uri} (val_acc {history[-1].val_acc:.2f}%, run {run.info.run_id})",
              flush=True)
    return StageResult(run.info.run_id, ref, history[-1].val_acc, history[-1].agreement,
                       partner_ref, partner_acc)


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


def checkpoint_state(model: nn.Module, arch: str, data: ImageData, s: EpochStats) -> dict:
    """A checkpoint of plain tensors and numbers: loads with ``torch.load(weights_only=True)``."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": arch, "num_classes": data.num_classes, "image_shape": list(data.image_shape),
            "epoch": s.epoch, "val_acc": s.val_acc}


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
    """Record both splits as the run's inputs (name, digest, schema, where they came from)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers its local file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source")
        source = resolve_dataset_source(Path(data.source).resolve().as_uri())
    for context, x, y in (("training", data.train_x, data.train_y), ("validation", data.val_x, data.val_y)):
        mlflow.log_input(mlflow.data.from_numpy(x.cpu().numpy(), targets=y.cpu().numpy(),
                                                source=source, name=f"{data.name}-{context}"),
                         context=context)


STUDY_ROWS = ("student", "kd_normal", "kd_trained", "teacher_normal", "teacher_trained")


def study(*, student_arch: str, teacher_arch: str, student_train: TrainConfig,
          teacher_train: TrainConfig, weight: float = 0.005, alpha: float = 0.9,
          temperature: float = 4.0, kd_temperature: float = 4.0, dataset: str = "digits",
          data_dir: str | None = None, register_as: str | None = None) -> str:
    """The whole Trained-Teacher study on one data set; returns the comparison table.

    Child runs, in order: baseline student; normal teacher (weight 0) and trained teacher
    (``weight``, temperature ``temperature``), both against that student; a KD student
    from each teacher (temperature ``kd_temperature``). Students train with
    ``student_train``, teachers with ``teacher_train``. Each later stage fetches its
    partner from the registry by ``NAME/VERSION``, exactly as a user would. Every
    registered model is then promoted (alias ``champion`` to its best version).
    Registered names are ``PREFIX-student``, ``PREFIX-teacher-normal``, ... with
    PREFIX = ``register_as`` (default: the data set's name).
    """
    prefix = register_as or dataset
    for suffix in ("student", "teacher-normal", "teacher-trained", "student-kd-normal",
                   "student-kd-trained"):
        registry.check_model_name(f"{prefix}-{suffix}")
    if weight <= 0:
        raise TTKDError(f"the study's trained teacher needs weight > 0 (got {weight}); "
                        f"run the teach stage by hand for weight <= 0")
    models.get(student_arch), models.get(teacher_arch)  # fail before the parent run opens
    resolve_device(student_train.device), resolve_device(teacher_train.device)
    datasets.load(dataset, data_dir)
    common = dict(dataset=dataset, data_dir=data_dir)
    with mlflow.start_run(run_name=f"study {dataset}") as parent:
        mlflow.set_tag(TAG_STAGE, "main")
        _log_params({"dataset": dataset, "data_dir": data_dir or "", "student_arch": student_arch,
                     "teacher_arch": teacher_arch, "weight": weight, "alpha": alpha,
                     "temperature": temperature, "kd_temperature": kd_temperature,
                     "register_as": prefix,
                     **{f"student.{k}": v for k, v in dataclasses.asdict(student_train).items()},
                     **{f"teacher.{k}": v for k, v in dataclasses.asdict(teacher_train).items()}})
        res = {"student": baseline(arch=student_arch, train=student_train,
                                   register_as=f"{prefix}-student", **common)}
        for kind, w in (("normal", 0.0), ("trained", weight)):
            res[f"teacher_{kind}"] = teach(
                student=_pinned(res["student"]), arch=teacher_arch, train=teacher_train, weight=w,
                temperature=temperature, register_as=f"{prefix}-teacher-{kind}", **common)
        for kind in ("normal", "trained"):
            res[f"kd_{kind}"] = distill(
                teacher=_pinned(res[f"teacher_{kind}"]), arch=student_arch, train=student_train,
                alpha=alpha, temperature=kd_temperature,
                register_as=f"{prefix}-student-kd-{kind}", **common)
        promotions = [registry.promote(r.model.name) for r in res.values()]
        table = comparison_table(res, weight)
        mlflow.log_metrics({f"val_acc_{k}": res[k].val_acc for k in STUDY_ROWS})
        mlflow.log_text(table, "comparison.md")
        mlflow.log_dict({k: {"model": r.model.uri, "val_acc": r.val_acc, "agreement": r.agreement}
                         for k, r in res.items()}, "comparison.json")
    for p in promotions:
        print(p)
    return table


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
