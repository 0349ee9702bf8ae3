"""The one door to MLflow. This module: runs opened and ended, parameters, metrics, tags, data
sets, artifacts and checkpoints. Its rooms: ``registry`` (model references, registration, the
store checked), ``modelstore`` (a model's files logged, digested and checked, the partner
rebuilt), ``promotion`` (aliases moved by metric, students or budget) and ``attempts`` (the
fence). Nothing outside this package calls MLflow, except ``ttkd.serving`` (an MLflow model
itself) and ``ttkd.predict``'s scoring server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ttkd.data import ImageData
from ttkd.engine import EpochStats
from ttkd.errors import TTKDError
from ttkd.tracking.registry import first_line, prepare_store, retry_locked

CHECKPOINT_FORMAT = 3  # 3: no stage arguments inside (they are the run's tag TAG_STAGE_ARGS)
TAG_CHECKPOINTS = "ttkd.checkpoint_sha256"  # on a run: {file: [SHA-256 of the newest, of the one before]}
TAG_STAGE_ARGS = "ttkd.stage_args"  # on a run: what resuming it needs (JSON), from the run, not its checkpoint
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


PARENT_TAG = MLFLOW_PARENT_RUN_ID  # on a child run: its parent's id
_started: list[str] = []  # the runs this process opened (start_run), oldest first


def runs_started() -> list[str]:
    """The ids of the runs this process opened or reopened, oldest first."""
    return list(_started)


def start_run(run_id: str | None = None, name: str | None = None, parent_run_id: str | None = None,
              nested: bool | None = None):
    """Open run ``run_id`` again (a resumed run), or a new run called ``name``, a child of
    ``parent_run_id`` or else (``nested``, by default when a run is active) of the active run;
    returns it."""
    nested = mlflow.active_run() is not None if nested is None else nested
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        run = mlflow.start_run(nested=nested, run_name=name, parent_run_id=parent_run_id)
    _started.append(run.info.run_id)
    return run


def end_run(status: str) -> None:
    """End the active run as ``status`` (FINISHED, FAILED or KILLED)."""
    mlflow.end_run(status)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run."""
    mlflow.set_tags(tags)


def tag_run(run_id: str, tags: dict[str, str]) -> None:
    """Tag run ``run_id`` (active or not)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log ``metrics`` on the active run."""
    mlflow.log_metrics(metrics, step=step)


def log_text(text: str, path: str) -> None:
    """``text`` as the active run's artifact ``path``."""
    mlflow.log_text(text, path)


def artifact_uri(path: str) -> str:
    """Where the active run's artifact ``path`` is (or will be) stored."""
    return mlflow.get_artifact_uri(path)


def log_dict(value: dict, path: str) -> None:
    """``value`` as the active run's JSON artifact ``path``."""
    mlflow.log_dict(value, path)


def read_json(run_id: str, path: str):
    """Run ``run_id``'s JSON artifact ``path``: its value, or None where the run has no such
    artifact; a file that cannot be read or parsed raises ``ValueError``."""
    if not has_artifact(run_id, path):
        return None
    try:
        return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_text())
    except (MlflowException, OSError) as exc:
        raise ValueError(str(exc)) from None


def log_file(run_id: str, path: Path, folder: str) -> None:
    """File ``path`` as an artifact of run ``run_id`` (active or not), under ``folder``."""
    MlflowClient().log_artifact(run_id, str(path), folder)


def has_artifact(run_id: str, path: str) -> bool:
    return path in (a.path for a in MlflowClient().list_artifacts(run_id))


def terminate(run_id: str, status: str) -> None:
    """Mark run ``run_id`` (not the active one) ``status``."""
    MlflowClient().set_terminated(run_id, status)


def child_runs(parent_id: str, tags: dict[str, str] | None = None, newest_first: bool = False,
               limit: int | None = None) -> list:
    """The runs whose parent is ``parent_id`` (and carrying ``tags``), in every experiment,
    oldest first unless ``newest_first``."""
    where = " and ".join([f"tags.`{PARENT_TAG}` = '{parent_id}'"]
                         + [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()])
    order = ["attributes.start_time " + ("DESC" if newest_first else "ASC")]
    return mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=where,
                              order_by=order, **({"max_results": limit} if limit else {}))


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def set_tracking_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which run ``run_id`` has metric ``key``."""
    return set(metric_by_step(run_id, key))


def metric_by_step(run_id: str, key: str) -> dict[int, float]:
    """Run ``run_id``'s values of metric ``key`` by step (the first logged at each step)."""
    found: dict[int, float] = {}
    for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.timestamp):
        found.setdefault(m.step, m.value)
    return found


def get_run(run_id: str):
    """Run ``run_id``, or None if the store has none of that id."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def newest_runs(tag: str, value: str, limit: int = 50) -> tuple[str, list]:
    """The name of this process's experiment (``use_experiment``) and its newest ``limit``
    runs tagged ``tag`` = ``value``, newest first."""
    experiment = mlflow.get_experiment(use_experiment(""))
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list",
                              filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return experiment.name, runs


def leave_run() -> None:
    """Leave the active run as it is, its status untouched: a newer attempt at it owns it
    (``mlflow.end_run`` would always write a status)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()  # private: MLflow has no public way to leave a run open
    if stack:
        os.environ.pop("MLFLOW_RUN_ID", None)
        stack.pop()


def log_params(params: dict) -> None:
    """Log ``params`` on the active run, except keys it already has: ``mlflow run`` logs
    its parameters as given (an empty string as ``''``), and MLflow refuses to change a
    logged value."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def log_epoch(s: EpochStats, partner_acc: float | None, split: str = "val") -> None:
    """Log one epoch's metrics at step = epoch, named by the ``split`` they were measured on."""
    metrics = s.metrics(split)
    if partner_acc is not None:
        metrics[f"partner_{split}_acc"] = partner_acc
    mlflow.log_metrics(metrics, step=s.epoch)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def refused_global(exc: BaseException) -> str | None:
    """The Python object (``posix.system``) torch's weights-only unpickler refused to load, if it says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found[1] if found else None


class DamagedCheckpoint(TTKDError):
    """A checkpoint that does not load with the weights-only unpickler."""


def load_checkpoint(path: Path, whose: str = "", fix: str = "start the stage again") -> dict:
    """A checkpoint, loaded with torch's weights-only unpickler (tensors and plain values:
    nothing in it can run code); a damaged file, or one holding anything else, is a
    one-line error naming ``whose`` checkpoint it is and the ``fix``."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, wrong format, disallowed types...
        found = refused_global(exc)
        reason = f"it holds a pickled {found}, which only the full unpickler would load" if found else first_line(exc)
        raise DamagedCheckpoint(f"checkpoint {path.name}{f' of {whose}' if whose else ''} is damaged or not a "
                                f"ttkd checkpoint ({reason}); {fix}") from None


def log_checkpoints(paths: list[Path], recorded: dict[str, list[str]], artifact_dir: str = "checkpoints") -> None:
    """Log checkpoint files so that the run's copy of each is whole or absent: on a local
    artifact store, a temporary file renamed into place; elsewhere, MLflow's upload of one
    object. Their SHA-256 go on the run first, in one tag, each beside the previous one
    (which the store holds until the new file is in place), so that what is read back can be
    checked; ``recorded`` (the run's tag as this process last wrote it) is updated."""
    for path in paths:
        recorded[path.name] = [hashlib.sha256(path.read_bytes()).hexdigest()] + recorded.get(path.name, [])[:1]
    mlflow.set_tag(TAG_CHECKPOINTS, json.dumps(recorded, sort_keys=True))
    uri = urllib.parse.urlparse(mlflow.get_artifact_uri(artifact_dir))
    for path in paths:
        if uri.scheme in ("", "file"):
            dest = Path(urllib.request.url2pathname(uri.path))
            dest.mkdir(parents=True, exist_ok=True)
            partial = dest / f".{path.name}.partial"
            shutil.copyfile(path, partial)
            os.replace(partial, dest / path.name)
        else:
            mlflow.log_artifact(str(path), artifact_dir)


def checkpoint_digests(run_id: str) -> dict[str, list[str]]:
    """The SHA-256 of run ``run_id``'s checkpoints, as its tag records them (empty: none)."""
    try:
        recorded = json.loads(MlflowClient().get_run(run_id).data.tags.get(TAG_CHECKPOINTS, "{}"))
    except (MlflowException, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def download_checkpoint(run_id: str, dst: str, role: str = "", model: str = "") -> dict | None:
    """The run's ``checkpoints/last.pt``, checked against the SHA-256 its run recorded and
    loaded weights-only; None if it has none. With ``role`` and ``model``, it holds the
    weights of that frozen partner (a model reference), registered by an older ttkd that
    recorded no digest: then an unrecorded checkpoint is read as it is (the user passed
    trust_unverified=true to come here)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                   dst_path=dst)
    except (MlflowException, OSError):
        return None
    whose = f"{role} {model} (run {run_id})" if role else f"run {run_id}"
    fix = (f"register that model again from a run whose checkpoint is whole, or use another {role}" if role
           else "start the stage again")
    recorded = checkpoint_digests(run_id).get("last.pt")
    if recorded is None and not role:
        raise DamagedCheckpoint(f"checkpoint last.pt of {whose} has no SHA-256 on its run (written by an older "
                                f"ttkd), so it cannot be checked; {fix}")
    if recorded is not None and hashlib.sha256(Path(path).read_bytes()).hexdigest() not in recorded:
        raise DamagedCheckpoint(f"checkpoint last.pt of {whose} is damaged or was changed after its run wrote it "
                                f"(its SHA-256 is not the one the run recorded); {fix}")
    return load_checkpoint(Path(path), whose, fix)


def log_dataset(data: ImageData) -> None:
    """Record both splits as the run's inputs (name, digest, schema, where they came from);
    a data set left on disk is recorded by name, digest and source only, unread."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source")
        source = resolve_dataset_source(Path(data.source).resolve().as_uri())
    evaluated = {"val": "validation"}.get(data.evaluated_on, data.evaluated_on)
    for context, x, y in (("training", data.train_x, data.train_y), (evaluated, data.val_x, data.val_y)):
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
    log_figures(figures)


def log_figures(figures: dict) -> None:
    """Log each figure (a matplotlib Figure) on the active run as a PNG under its name, then close it."""
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        mlflow.log_figure(fig, name)
        plt.close(fig)
