"""Everything a stage writes to or reads from MLflow, except the registry's references
(``ttkd.registry``): parameters, metrics, data sets, models, checkpoints, and the frozen
partner rebuilt from a registered version's weights."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torch import nn

from ttkd import models
from ttkd.data import ImageData
from ttkd.engine import EpochStats
from ttkd.errors import TTKDError
from ttkd.registry import ModelRef, prepare_store, retry_locked

CHECKPOINT_FORMAT = 2  # 2: method state in the engine state, named loss parts
# a stage's own lines, not MLflow's download bars, are what its terminal shows
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def use_experiment(name: str) -> str:
    """Make experiment ``name`` the one every run of this process, and of the processes it
    starts, goes in; created when missing; returns its id. Without a name: the experiment
    of ``MLFLOW_EXPERIMENT_NAME``, else that of the run ``mlflow run`` opened, else
    ``MLFLOW_EXPERIMENT_ID`` (so a later call without a name keeps the same), else Default.
    When ``mlflow run`` opened its run in another experiment, that run gets a tag saying
    where the work went, and stays empty: MLflow cannot move a run to another experiment."""
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


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, loaded without pickle; a damaged file is a user-facing error."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, wrong format, disallowed types...
        raise TTKDError(f"checkpoint {path.name} is damaged or not a ttkd checkpoint "
                        f"({str(exc).splitlines()[0][:120]}); start the stage again") from None


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


def download_checkpoint(run_id: str, dst: str) -> dict | None:
    """The run's ``checkpoints/last.pt``, loaded without pickle; None if it has none."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                   dst_path=dst)
    except (MlflowException, OSError):
        return None
    return load_checkpoint(Path(path))


def load_partner(ref: ModelRef, data: ImageData, role: str, tmp: str) -> tuple[nn.Module, str]:
    """The frozen partner ``ref`` as ttkd's own class, rebuilt from the weights of the run
    that made it (its last checkpoint, which holds the registered weights), after checking
    that it fits ``data``; returns ``(network in eval mode, arch)``. The exported program
    stays what the registry serves: it yields classes only and is pinned to the CPU."""
    try:
        info = mlflow.models.get_model_info(ref.uri)
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"cannot read {role} {ref.uri} ({str(exc).splitlines()[0][:120]})") from None
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
    state = download_checkpoint(run_id, tmp) if run_id else None
    if state is None or "model" not in state or "arch" not in state:
        raise TTKDError(f"{role} {ref.uri} has no weights to rebuild it from (no checkpoints/last.pt "
                        f"in run {run_id}); use a model that a ttkd stage trained and registered")
    arch = state["arch"]
    if arch not in models.names():
        raise TTKDError(f"{role} {ref.uri} is a {arch!r}, an architecture this ttkd does not know; "
                        f"known: {', '.join(models.names())}")
    net = models.build(arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise TTKDError(f"the weights of {role} {ref.uri} do not fit a {arch} "
                        f"({str(exc).splitlines()[0][:120]}); re-register it with this ttkd") from None
    return net.eval(), arch


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


# what a registered model answers per image; no input schema, under which MLflow would cast
# JSON numbers to uint8 silently (0.5 -> 0) before the model could refuse them
ANSWER = ModelSignature(outputs=Schema([ColSpec(DataType.long, "class"), ColSpec(DataType.string, "name"),
                                        ColSpec(DataType.double, "probability"),
                                        ColSpec(Array(DataType.double), "probabilities")]))


def log_model(model: nn.Module, data: ImageData):
    """Log ``model`` (eval mode, on the CPU) as the model a user serves: ``ttkd/serving.py``
    around the network exported by ``torch.export`` (pickle-free), taking uint8 images and
    answering classes, with the image shape, normalisation and class names in its
    configuration and metadata."""
    model.eval().cpu()  # BatchNorm must be exported with its running statistics
    c, h, w = data.image_shape
    example = torch.zeros(2, c, h, w)  # batch > 1, so that the batch size stays free
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    config = {"image_shape": [c, h, w], "num_classes": data.num_classes, "classes": list(data.class_names),
              "mean": list(data.mean), "std": list(data.std)}
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, Path(tmp) / "network.pt2")
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("serving.py")),
            artifacts={"network": str(Path(tmp) / "network.pt2")}, model_config=config,
            signature=ANSWER,  # outputs only: the model checks its inputs itself (serving.pixels)
            input_example=data.val_x[:2].cpu().numpy().transpose(0, 2, 3, 1),  # uint8 (N, H, W, C), as users have
            metadata=config | {"dataset": data.name,
                               "input": "uint8 pixels (N, H, W, C) or (N, C, H, W); answers class, name, "
                                        "probability and probabilities per image"},
            # given, not inferred: inference re-loads the model in a subprocess (seconds)
            pip_requirements=[f"torch=={importlib.metadata.version('torch')}",
                              f"pandas=={importlib.metadata.version('pandas')}"],
        )


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
        if data.streamed:
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


def log_report(text: str, report: dict, figures: dict) -> None:
    """Log a study's report on the active run: ``report.md``, ``report.json`` and each
    figure (a matplotlib Figure) as a PNG under its name."""
    mlflow.log_text(text, "report.md")
    mlflow.log_dict(report, "report.json")
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
