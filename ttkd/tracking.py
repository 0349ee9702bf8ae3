"""Everything a stage writes to or reads from MLflow, except the registry's references
(``ttkd.registry``): parameters, metrics, data sets, models, checkpoints, and the frozen
partner rebuilt from a registered version's weights."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import safetensors.torch
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torch import nn

from ttkd import models, serving
from ttkd.data import ImageData
from ttkd.engine import EpochStats
from ttkd.errors import TTKDError
from ttkd.registry import ModelRef, first_line, prepare_store, retry_locked

CHECKPOINT_FORMAT = 2  # 2: method state in the engine state, named loss parts
TAG_DIGESTS = "ttkd.model_sha256"  # on a run and its version: {file in the model's folder: SHA-256}
# a stage's own lines, not MLflow's download bars, are what its terminal shows
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# the experiment tag MLflow 3's UI picks its view from, and its value for model training
# (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` in MLflow's front end); a kind already set is kept
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def use_experiment(name: str) -> str:
    """Make experiment ``name`` the one every run of this process, and of the processes it
    starts, goes in; created when missing; returns its id. Without a name: the experiment
    of ``MLFLOW_EXPERIMENT_NAME``, else that of the run ``mlflow run`` opened, else
    ``MLFLOW_EXPERIMENT_ID`` (so a later call without a name keeps the same), else Default.
    When ``mlflow run`` opened its run in another experiment, that run gets a tag saying
    where the work went, and stays empty: MLflow cannot move a run to another experiment.
    An experiment without a kind is tagged as one of model training, for MLflow's UI."""
    prepare_store()
    client = MlflowClient()
    launcher = os.environ.get("MLFLOW_RUN_ID")
    launched_in = client.get_run(launcher).info.experiment_id if launcher else None
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                client.create_experiment(name)
            except MlflowException:  # created by another process meanwhile
                pass
            experiment = client.get_experiment_by_name(name)
    else:
        found = launched_in or os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        try:
            experiment = client.get_experiment(found)
        except MlflowException:
            raise TTKDError(f"MLFLOW_EXPERIMENT_ID={found} is not an experiment of "
                            f"{mlflow.get_tracking_uri()}; unset it or give experiment=NAME") from None
    if experiment.lifecycle_stage == "deleted":
        raise TTKDError(f"experiment {experiment.name!r} is deleted (MLflow keeps it in its trash, and "
                        f"its name taken): restore it with `mlflow experiments restore --experiment-id "
                        f"{experiment.experiment_id}`, or give another experiment name")
    if TAG_EXPERIMENT_KIND not in experiment.tags:  # MLflow's UI opens it in its model-training view
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    if launcher and launched_in != experiment.experiment_id:
        client.set_tag(launcher, "ttkd.ran_in_experiment", experiment.name)
        del os.environ["MLFLOW_RUN_ID"]
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)  # the id below says the same
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment.experiment_id
    return experiment.experiment_id


def log_params(params: dict) -> None:
    """Log ``params`` on the active run, except keys it already has: ``mlflow run`` logs
    its parameters as given (an empty string as ``''``), and MLflow refuses to change a
    logged value."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def log_epoch(s: EpochStats, partner_acc: float | None) -> None:
    """Log one epoch's metrics at step = epoch."""
    metrics = s.metrics()
    if partner_acc is not None:
        metrics["partner_val_acc"] = partner_acc
    mlflow.log_metrics(metrics, step=s.epoch)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class DamagedCheckpoint(TTKDError):
    """A checkpoint that does not load with the weights-only unpickler."""


def load_checkpoint(path: Path, whose: str = "", fix: str = "start the stage again") -> dict:
    """A checkpoint, loaded with torch's weights-only unpickler (tensors and plain values:
    nothing in it can run code); a damaged file, or one holding anything else, is a
    one-line error naming ``whose`` checkpoint it is and the ``fix``."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, wrong format, disallowed types...
        found = serving.refused_global(exc)
        reason = f"it holds a pickled {found}, which only the full unpickler would load" if found else first_line(exc)
        raise DamagedCheckpoint(f"checkpoint {path.name}{f' of {whose}' if whose else ''} is damaged or not a "
                                f"ttkd checkpoint ({reason}); {fix}") from None


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


def download_checkpoint(run_id: str, dst: str, role: str = "", model: str = "") -> dict | None:
    """The run's ``checkpoints/last.pt``, loaded weights-only; None if it has none. With
    ``role`` and ``model``, it holds the weights of that frozen partner (a model reference)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                   dst_path=dst)
    except (MlflowException, OSError):
        return None
    if role:
        return load_checkpoint(Path(path), f"{role} {model} (run {run_id})", "register that model again from a "
                               f"run whose checkpoint is whole, or use another {role}")
    return load_checkpoint(Path(path), f"run {run_id}")


@dataclasses.dataclass(frozen=True)
class Partner:
    """A frozen partner as a stage trains beside it."""

    net: nn.Module          # ttkd's own class, in eval mode, with the registered weights
    arch: str
    foreign: str | None     # how its training data differs from this stage's (allowed by partner_data=any)
    unchecked: str | None   # what could not be compared (a partner registered by an older ttkd)


def load_partner(ref: ModelRef, data: ImageData, role: str, tmp: str, partner_data: str = "same") -> Partner:
    """The frozen partner ``ref`` as ttkd's own class, after checking that it was trained
    for the task of ``data``: the same image shape and class count always; the same data
    set, class names in order and training images (the digest MLflow recorded) unless
    ``partner_data`` is ``any``. The weights are the registered version's own
    ``weights.safetensors`` (a format that holds tensors only), after checking the model's
    files against the SHA-256 digests recorded when it was registered; a model registered
    by an older ttkd is rebuilt from its run's last checkpoint, loaded weights-only. The
    exported program is not used: it yields classes only, not the features that
    feature-based methods read."""
    try:
        info = mlflow.models.get_model_info(ref.uri)
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"cannot read {role} {ref.uri} ({first_line(exc)})") from None
    meta, signature = info.metadata or {}, info.signature
    if "image_shape" in meta:
        in_shape, num_classes = tuple(meta["image_shape"]), meta["num_classes"]
    elif signature and signature.inputs and signature.inputs.is_tensor_spec():  # an earlier ttkd's pt2 network
        in_shape, num_classes = tuple(signature.inputs.inputs[0].shape[1:]), signature.outputs.inputs[0].shape[-1]
    else:
        raise TTKDError(f"{role} {ref.uri} does not say what images it takes; use a model that "
                        f"ttkd registered")
    if in_shape != data.image_shape or num_classes != data.num_classes:
        raise TTKDError(
            f"{role} {ref.uri} takes {_shape(in_shape)} images and predicts {num_classes} classes, "
            f"but dataset {data.name!r} has {_shape(data.image_shape)} images and "
            f"{data.num_classes} classes; pick a {role} trained on {data.name}")
    run_id = ref.run_id or info.run_id
    foreign, unchecked = task_difference(f"{role} {ref.uri}", meta, run_id, data)
    if foreign and partner_data != "any":
        raise TTKDError(f"{foreign}; pick a {role} trained on {data.name}, or pass partner_data=any "
                        f"to distil across data sets")
    if meta.get("files") == MODEL_FILES and "arch" in meta:
        arch, state = meta["arch"], _registered_weights(ref, run_id, role, tmp)
    else:  # registered by an older ttkd: the weights of its run's last checkpoint
        state = download_checkpoint(run_id, tmp, role, ref.uri) if run_id else None
        if state is None or "model" not in state or "arch" not in state:
            raise TTKDError(f"{role} {ref.uri} has no weights to rebuild it from (no checkpoints/last.pt "
                            f"in run {run_id}); use a model that a ttkd stage trained and registered")
        arch, state = state["arch"], state["model"]
    if arch not in models.names():
        raise TTKDError(f"{role} {ref.uri} is a {arch!r}, an architecture this ttkd does not know; "
                        f"known: {', '.join(models.names())}")
    net = models.build(arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise TTKDError(f"the weights of {role} {ref.uri} do not fit a {arch} "
                        f"({first_line(exc)}); re-register it with this ttkd") from None
    return Partner(net.eval(), arch, foreign, unchecked)


def task_difference(who: str, meta: dict, run_id: str | None, data: ImageData) -> tuple[str | None, str | None]:
    """``(difference, unchecked)``: how the training data of the model ``who`` (its
    metadata ``meta``, logged by run ``run_id``) differs from ``data``'s in data set,
    class names or their order, and training images (digest), as one phrase, or None;
    and what could not be compared (a model registered before ttkd recorded it), or None."""
    if "dataset" not in meta:
        return None, f"{who} was registered without a record of its training data; it could not be checked"
    theirs_digest = meta.get("train_digest") or (training_input_digest(run_id) if run_id else None)
    ours_digest = training_digest(data)
    theirs, ours = list(meta.get("classes") or []), list(data.class_names)
    same_name, same_classes = meta["dataset"] == data.name, theirs == ours
    same_images = theirs_digest is None or theirs_digest == ours_digest
    unchecked = None if theirs_digest else f"{who} has no digest of its training images; they could not be compared"
    if same_name and same_classes and same_images:
        return None, unchecked
    if sorted(theirs) == sorted(ours) and not same_classes:
        classes = f"the same classes in another order ({_classes(theirs)}; here {_classes(ours)})"
    else:
        classes = f"classes {_classes(theirs)}" + ("" if same_classes else f"; here {_classes(ours)}")
    digest = f", digest {theirs_digest[:8]}" if theirs_digest else ""
    return (f"{who} was trained on {meta['dataset']} ({classes}{digest}), this stage trains on {data.name} "
            f"(digest {ours_digest[:8]})"), unchecked


def _classes(names: list[str]) -> str:
    if names == [str(i) for i in range(len(names))]:
        return f"0..{len(names) - 1}"
    return ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")


def training_digest(data: ImageData) -> str:
    """The digest :func:`log_dataset` records for ``data``'s training split."""
    if data.streamed:
        return data.digest()
    return mlflow.data.from_numpy(data.train_x.cpu().numpy(), targets=data.train_y.cpu().numpy()).digest


def training_input_digest(run_id: str) -> str | None:
    """The digest of the training split that run ``run_id`` recorded with ``log_input``."""
    try:
        inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    except MlflowException:
        return None
    return next((d.dataset.digest for d in inputs
                 if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags)), None)


def file_digests(files: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of each file, by its path in the model's folder."""
    return {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in files.items()}


def verify_model_files(ref: ModelRef, run_id: str | None, local: str, who: str) -> str | None:
    """Check the files of model ``ref`` (its folder downloaded to ``local``) against the
    SHA-256 digests recorded when it was registered: the version's tag in the registry,
    else the tag of the run that logged it. A file that differs or is missing is refused,
    naming it; a model registered before ttkd recorded digests gets a warning (returned)."""
    client, recorded = MlflowClient(), None
    try:
        if ref.version is not None:
            recorded = client.get_model_version(ref.name, ref.version).tags.get(TAG_DIGESTS)
        if recorded is None and run_id:
            recorded = client.get_run(run_id).data.tags.get(TAG_DIGESTS)
        recorded = json.loads(recorded) if recorded else None
    except (MlflowException, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"{who} has no record of its files' SHA-256 (registered by an older ttkd): they could not be checked"
    for name, digest in sorted(recorded.items()):
        path = Path(local, name)
        if not path.is_file() or file_digests({name: path})[name] != digest:
            what = "missing" if not path.is_file() else "not the one registered (its SHA-256 differs)"
            raise TTKDError(f"{who}: its file {name} is {what}: someone changed the model's files after it "
                            f"was registered; register it again from a trusted run, or use another version")
    return None


def download_model(ref: ModelRef, who: str, dst: str) -> str:
    """The folder of model ``ref``, downloaded under ``dst``."""
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=dst)
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"cannot download the files of {who} ({first_line(exc)})") from None


def _registered_weights(ref: ModelRef, run_id: str | None, role: str, tmp: str) -> dict:
    """The state dict in the model's ``weights.safetensors``, its files checked first."""
    who = f"{role} {ref.uri}"
    local = download_model(ref, who, tmp)
    if verify_model_files(ref, run_id, local, who) is not None:  # written with the files: never missing
        raise TTKDError(f"{who} has no record of its files' SHA-256; register it again from its run")
    try:
        return safetensors.torch.load_file(Path(local, MODEL_FILES["weights"]))
    except Exception as exc:  # a damaged file: safetensors reads tensors only, whatever it holds
        raise TTKDError(f"{who}: its weights file is damaged ({first_line(exc)})") from None


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


# what a registered model answers per image; no input schema, under which MLflow would cast
# JSON numbers to uint8 silently (0.5 -> 0) before the model could refuse them
ANSWER = ModelSignature(outputs=Schema([ColSpec(DataType.long, "class"), ColSpec(DataType.string, "name"),
                                        ColSpec(DataType.double, "probability"),
                                        ColSpec(Array(DataType.double), "probabilities")]))


MODEL_FILES = {"network": "artifacts/network.pt2", "weights": "artifacts/weights.safetensors",
               "code": "serving.py"}  # the model's files ttkd reads or MLflow runs, by path in its folder


def log_model(model: nn.Module, data: ImageData, arch: str,
              on_export: Callable[[nn.Module, Path], None] | None = None):
    """Log ``model`` (eval mode, on the CPU) as the model a user serves: ``ttkd/serving.py``
    around the network exported by ``torch.export`` (pickle-free), taking uint8 images and
    answering classes, with the image shape, normalisation and class names in its
    configuration and metadata; beside it the weights as ``weights.safetensors``, from
    which later stages rebuild it as ttkd's ``arch``. ``on_export`` is called with the
    exported network and its file before it is logged (to measure what is served). Returns
    ``(model info, SHA-256 of each file in MODEL_FILES)``: the digests go in the registry
    with the version."""
    model.eval().cpu()  # BatchNorm must be exported with its running statistics
    c, h, w = data.image_shape
    example = torch.zeros(2, c, h, w)  # batch > 1, so that the batch size stays free
    batch = torch.export.Dim("batch", min=1, max=serving.MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    config = {"image_shape": [c, h, w], "num_classes": data.num_classes, "classes": list(data.class_names),
              "mean": list(data.mean), "std": list(data.std)}
    code = Path(serving.__file__)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"network": Path(tmp) / "network.pt2", "weights": Path(tmp) / "weights.safetensors"}
        torch.export.save(program, files["network"])
        if on_export is not None:
            on_export(program.module(), files["network"])
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                                    files["weights"])
        digests = file_digests({MODEL_FILES[k]: p for k, p in files.items()} | {MODEL_FILES["code"]: code})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code),
            artifacts={k: str(p) for k, p in files.items()}, model_config=config,
            signature=ANSWER,  # outputs only: the model checks its inputs itself (serving.pixels)
            input_example=data.val_x[:2].cpu().numpy().transpose(0, 2, 3, 1),  # uint8 (N, H, W, C), as users have
            metadata=config | {"dataset": data.name, "train_digest": training_digest(data), "arch": arch,
                               "files": MODEL_FILES,
                               "input": "uint8 pixels (N, H, W, C) or (N, C, H, W); answers class, name, "
                                        "probability and probabilities per image"},
            # given, not inferred: inference re-loads the model in a subprocess (seconds)
            pip_requirements=[f"torch=={importlib.metadata.version('torch')}",
                              f"pandas=={importlib.metadata.version('pandas')}"],
        )
    return info, digests


def log_dataset(data: ImageData) -> None:
    """Record both splits as the run's inputs (name, digest, schema, where they came from);
    a data set left on disk is recorded by name, digest and source only, unread."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source")
        source = resolve_dataset_source(Path(data.source).resolve().as_uri())
    for context, x, y in (("training", data.train_x, data.train_y), ("validation", data.val_x, data.val_y)):
        name = f"{data.name}-{context}"
        if data.streamed:  # the same digest as training_digest's
            record = MetaDataset(source, name=name, digest=data.digest())
        else:
            record = mlflow.data.from_numpy(x.cpu().numpy(), targets=y.cpu().numpy(), source=source,
                                            name=name)
        # stages started together may insert the same data set at once: the store's unique
        # constraint says the other one won, and the next try links to its row
        retry_locked(lambda: mlflow.log_input(record, context=context), attempts=4, first_wait_s=0.1,
                     transient=("UNIQUE constraint", "duplicate key"))


def metric_history(run_id: str, key: str) -> list[float]:
    """A run's values of metric ``key``, by step."""
    history = MlflowClient().get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


COST_THREADS = 1  # CPU threads a served network's latency and throughput are measured with


def cost_tags(c) -> dict[str, str]:
    """A model version's cost (a ``ttkd.cost.Cost``) as searchable tags: ``tags.`ttkd.params```, ..."""
    return {f"ttkd.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v))
            for k, v in dataclasses.asdict(c).items() if v is not None}


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        retry_locked(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v))


COST_METRICS = ("params", "macs", "model_bytes", "latency_ms_b1_cpu", "throughput_b256_cpu",
                "latency_ms_b1_cuda", "throughput_b256_cuda")


def run_cost(run_id: str) -> dict[str, float]:
    """The cost metrics a stage logged for its model (none for a run older than them)."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {k: metrics[k] for k in COST_METRICS if k in metrics}


def log_report(text: str, report: dict, figures: dict) -> None:
    """Log a study's report on the active run: ``report.md``, ``report.json`` and each
    figure (a matplotlib Figure) as a PNG under its name."""
    mlflow.log_text(text, "report.md")
    mlflow.log_dict(report, "report.json")
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
