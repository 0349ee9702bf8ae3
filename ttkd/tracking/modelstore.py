"""A registered model's files in the tracking store: the model logged with every file digested,
its digests recorded and checked on the way back, and the frozen partner a stage trains beside
rebuilt from a registered version's weights by ttkd's own code."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torch import nn

from ttkd import modelfile, models, serving
from ttkd.data import ImageData
from ttkd.errors import TTKDError
from ttkd.tracking import download_checkpoint
from ttkd.tracking.registry import ModelRef, first_line

# on a run and its version: {every file in the model's folder: SHA-256}; the tag of the
# same name without "files" (an older ttkd's, three files only) is not taken as a record
TAG_DIGESTS = "ttkd.files_sha256"
TAG_TRUSTED = "ttkd.trust_unverified"  # on a run that used a model without a digest record, knowingly


@dataclasses.dataclass(frozen=True)
class Partner:
    """A frozen partner as a stage trains beside it."""

    net: nn.Module          # ttkd's own class, in eval mode, with the registered weights
    arch: str
    foreign: str | None     # how its training data differs from this stage's (allowed by partner_data=any)
    unchecked: str | None   # what could not be compared (a partner registered by an older ttkd)
    unverified: str | None = None  # why its files could not be checked (used as trust_unverified=true asks)


def load_partner(ref: ModelRef, data: ImageData, role: str, tmp: str, partner_data: str = "same",
                 trust_unverified: bool = False) -> Partner:
    """The frozen partner ``ref`` as ttkd's own class, after checking every file of the
    model against the SHA-256 digests the registry recorded when it was registered, and
    then that it was trained for the task of ``data``: the same image shape and class
    count always; the same data set, class names in order and training images (digest)
    unless ``partner_data`` is ``any``. The network is built from ttkd's architecture code
    and the model's ``weights.safetensors`` (``ttkd.modelfile``); the served ONNX network
    is not used: it yields classes only, not the features that feature-based methods
    read. A model without a digest record is refused unless ``trust_unverified``; such a
    model registered by an older ttkd is rebuilt from its run's last checkpoint, loaded
    weights-only and checked against the digest its run recorded, if any."""
    who = f"{role} {ref.uri}"
    local = download_model(ref.uri, who, tmp)
    unverified = verify_model(ref, local, who, trust_unverified)
    run_id = ref.run_id or source_run(ref)
    if Path(local, modelfile.RECORD).is_file() or not unverified:
        net, record = modelfile.build(local, who)
        arch, in_shape, num_classes = record.arch, record.image_shape, record.num_classes
        meta = {"dataset": record.dataset, "classes": list(record.classes), "train_digest": record.train_digest}
    else:  # registered by an older ttkd, used knowingly: its run's checkpoint and metadata
        net, arch, meta = _older_partner(local, run_id, who, role, tmp)
        in_shape, num_classes = tuple(meta["image_shape"]), meta["num_classes"]
    if in_shape != data.image_shape or num_classes != data.num_classes:
        raise TTKDError(
            f"{who} takes {_shape(in_shape)} images and predicts {num_classes} classes, "
            f"but dataset {data.name!r} has {_shape(data.image_shape)} images and "
            f"{data.num_classes} classes; pick a {role} trained on {data.name}")
    foreign, unchecked = task_difference(who, meta, run_id, data)
    if foreign and partner_data != "any":
        raise TTKDError(f"{foreign}; pick a {role} trained on {data.name}, or pass partner_data=any "
                        f"to distil across data sets")
    return Partner(net.eval(), arch, foreign, unchecked, unverified)


def _older_partner(local: str, run_id: str | None, who: str, role: str, tmp: str) -> tuple[nn.Module, str, dict]:
    """``(network, arch, metadata)`` of a model an older ttkd registered: the metadata of its
    MLmodel (YAML, read safely), the weights of its run's last checkpoint."""
    try:
        meta = Model.load(local).metadata or {}
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"{who} is not a model that ttkd registered ({first_line(exc)})") from None
    state = download_checkpoint(run_id, tmp, role, who.split(" ", 1)[1]) if run_id else None
    if "image_shape" not in meta or state is None or "model" not in state or "arch" not in state:
        raise TTKDError(f"{who} has no weights to rebuild it from (no record of its network, and no "
                        f"checkpoints/last.pt in run {run_id}); use a model that a ttkd stage trained and registered")
    arch = state["arch"]
    if arch not in models.names():
        raise TTKDError(f"{who} is a {arch!r}, an architecture this ttkd does not know; "
                        f"known: {', '.join(models.names())}")
    c, _, size = meta["image_shape"]
    net = models.build(arch, meta["num_classes"], c, image_size=size)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise TTKDError(f"the weights of {who} do not fit a {arch} ({first_line(exc)}); "
                        f"re-register it with this ttkd") from None
    return net, arch, meta


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


# the file MLflow writes into a models:/ download (the registered name and version it came
# as), not one of the model's files in the store; ttkd never reads it
DOWNLOAD_NOTE = "registered_model_meta"


def folder_digests(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file of the model downloaded to ``folder``, by its path there."""
    root = Path(folder)
    return file_digests({p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                         if p.is_file() and p.relative_to(root).as_posix() != DOWNLOAD_NOTE})


def source_run(ref: ModelRef) -> str | None:
    """The run that logged model ``ref``, as the tracking store knows it (never as the
    model's own files say): a ``runs:/`` reference's run, a registered version's run, a
    logged model's source run."""
    if ref.run_id:
        return ref.run_id
    model_id = ref.uri.removeprefix("models:/")
    if ref.uri.startswith("models:/m-") and "/" not in model_id:
        try:
            return MlflowClient().get_logged_model(model_id).source_run_id
        except MlflowException:
            return None
    return None


def recorded_digests(ref: ModelRef) -> dict[str, str] | None:
    """The digests recorded for model ``ref`` in the tracking store: a registered version's
    tag, else its source run's; None if there is none, or it is empty or malformed."""
    client = MlflowClient()
    try:
        if ref.version is not None:
            text = client.get_model_version(ref.name, ref.version).tags.get(TAG_DIGESTS)
        else:
            run_id = source_run(ref)
            text = client.get_run(run_id).data.tags.get(TAG_DIGESTS) if run_id else None
        recorded = json.loads(text) if text else None
    except (MlflowException, ValueError):
        return None
    if not isinstance(recorded, dict) or not recorded or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        return None
    return recorded


def verify_model(ref: ModelRef, local: str, who: str, trust_unverified: bool = False) -> str | None:
    """Check every file of model ``ref`` (its folder downloaded to ``local``) against the
    SHA-256 digests recorded in the tracking store when it was registered, before any of
    them is read: a file that differs, is missing or was added is refused, naming it. A
    model without a record is refused too, unless ``trust_unverified``: then the reason is
    returned, for a warning and a tag."""
    recorded = recorded_digests(ref)
    if recorded is None:
        reason = (f"{who} has no record of its files' SHA-256 in the registry (registered by an older ttkd or "
                  f"outside ttkd), so nothing shows that its files are the ones registered")
        if trust_unverified:
            return reason + "; used as it is, as trust_unverified=true asks"
        raise TTKDError(f"{reason}; register it again with this ttkd, or pass trust_unverified=true to use it "
                        f"as it is")
    found = folder_digests(local)
    for name in sorted(set(recorded) | set(found)):
        if found.get(name) != recorded.get(name):
            what = ("missing" if name not in found else "not one of the files registered" if name not in recorded
                    else "not the one registered (its SHA-256 differs)")
            raise TTKDError(f"{who}: its file {name} is {what}: someone changed the model's files after it "
                            f"was registered; register it again from a trusted run, or use another version")
    return None


def download_model(uri: str, who: str, dst: str) -> str:
    """The folder of model ``uri``, downloaded under ``dst``."""
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"cannot download the files of {who} ({first_line(exc)})") from None


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


# what a registered model answers per image; no input schema, under which MLflow would cast
# JSON numbers to uint8 silently (0.5 -> 0) before the model could refuse them
ANSWER = ModelSignature(outputs=Schema([ColSpec(DataType.long, "class"), ColSpec(DataType.string, "name"),
                                        ColSpec(DataType.double, "probability"),
                                        ColSpec(Array(DataType.double), "probabilities")]))


def log_model(model: nn.Module, data: ImageData, arch: str, on_export: Callable[[Path], None] | None = None):
    """Log ``model`` (eval mode, on the CPU) as the model a user serves: ``ttkd/serving.py``
    around the network as ONNX (``network.onnx``), taking uint8 images and answering
    classes, with the image shape, normalisation and class names in its configuration and
    metadata; beside it the weights (``weights.safetensors``) and the record
    (``network.json``) from which ttkd rebuilds it (``ttkd.modelfile``). ``on_export`` is
    called with the ONNX file before it is logged (to measure what is served). Returns
    ``(model info, SHA-256 of every file in the logged model's folder)``, read back from the
    store after logging: the digests go in the registry with the version."""
    config = {"image_shape": list(data.image_shape), "num_classes": data.num_classes,
              "classes": list(data.class_names), "mean": list(data.mean), "std": list(data.std)}
    code, train_digest = Path(serving.__file__), training_digest(data)
    with tempfile.TemporaryDirectory() as tmp:
        files = modelfile.write(model, arch, data, train_digest, Path(tmp))
        if on_export is not None:
            on_export(files["network"])
        written = file_digests({f"artifacts/{p.name}": p for p in files.values()} | {modelfile.CODE: code})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code),
            artifacts={k: str(p) for k, p in files.items()}, model_config=config,
            signature=ANSWER,  # outputs only: the model checks its inputs itself (serving.pixels)
            input_example=data.val_x[:2].cpu().numpy().transpose(0, 2, 3, 1),  # uint8 (N, H, W, C), as users have
            metadata=config | {"dataset": data.name, "train_digest": train_digest, "arch": arch,
                               "input": "uint8 pixels (N, H, W, C) or (N, C, H, W); answers class, name, "
                                        "probability and probabilities per image"},
            # given, not inferred: inference re-loads the model in a subprocess (seconds)
            pip_requirements=[f"{p}=={importlib.metadata.version(p)}" for p in ("onnxruntime", "numpy", "pandas")],
        )
    with tempfile.TemporaryDirectory() as tmp:
        digests = folder_digests(download_model(info.model_uri, "the model just logged", tmp))
    changed = sorted(k for k, v in written.items() if digests.get(k) != v)
    if changed:  # the store does not hold what was written: never register that
        raise TTKDError(f"the artifact store holds other files than this stage wrote ({', '.join(changed)}); "
                        f"check who else writes to it")
    return info, digests
