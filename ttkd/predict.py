"""Classify a folder of image files with a registered model, as a user's own images come:
any size and colour mode, some files perhaps not images at all."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from PIL import Image

from ttkd import cost, registry, serving, tracking
from ttkd.errors import TTKDError
from ttkd.registry import TAG_PARTNER, ModelRef, first_line


@dataclasses.dataclass
class Classified:
    rows: list[dict]                  # file, class, name, probability: one per image read
    skipped: list[tuple[str, str]]    # (file, why) for each file that is not a readable image
    resized: int                      # images that were not the model's size
    warning: str | None = None        # what could not be checked about the model


def load_classifier(ref: ModelRef, tmp: str) -> tuple[serving.ImageClassifier, dict, str | None]:
    """The registered model ``ref`` as it answers when served, built from this ttkd's own
    ``ttkd/serving.py``, not from the copy in the model's folder (which MLflow would run):
    its files are checked against the digests recorded at registration and its network
    is read by ``serving.load_network``; nothing in the model's folder runs. Returns the
    model, its metadata and a warning when its files could not be checked."""
    who = f"model {ref.uri}"
    local = tracking.download_model(ref, who, tmp)
    try:
        mlmodel = Model.load(local)  # MLmodel: YAML, read with the safe loader
        flavor = mlmodel.flavors["python_function"]
        config, meta = flavor["config"], mlmodel.metadata or {}
        network = Path(local, flavor["artifacts"]["network"]["path"])
    except (MlflowException, OSError, KeyError, TypeError) as exc:
        raise TTKDError(f"{who} is not a model that ttkd registered ({first_line(exc)})") from None
    if "image_shape" not in meta:
        raise TTKDError(f"{ref.uri} does not say what images it takes; predict needs a model that "
                        f"this ttkd registered")
    warning = tracking.verify_model_files(ref, ref.run_id or mlmodel.run_id, local, who)
    model = serving.ImageClassifier()
    try:
        model.load_context(SimpleNamespace(model_config=config, artifacts={"network": str(network)}))
    except serving.UnsafeModelFile as exc:
        raise TTKDError(f"{who}: {exc}") from None
    return model, meta, warning


def classify_folder(ref: ModelRef, folder: str, batch_size: int = 256) -> Classified:
    """Every file under ``folder`` (sorted, hidden ones left out) through the registered
    model ``ref`` as served: read first, each converted to the model's channels and
    size, so that a bad file is skipped and reported before anything is predicted."""
    if not folder.strip():
        raise TTKDError("images is empty; give the folder of image files to classify (images=/path/to/folder)")
    root = Path(folder)
    if not root.is_dir():
        raise TTKDError(f"images={folder!r} is not a folder; give a folder of image files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise TTKDError(f"{folder} holds no files; give a folder of image files (PNG, JPEG, ...)")
    with tempfile.TemporaryDirectory() as tmp:
        model, meta, warning = load_classifier(ref, tmp)
    c, h, w = meta["image_shape"]
    images, names, skipped, resized = [], [], [], 0
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img, resized = img.resize((w, h), Image.Resampling.BILINEAR), resized + 1
                pixels = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # PIL raises many kinds for a damaged or foreign file
            skipped.append((shown(path.relative_to(root)), first_line(exc)))
            continue
        images.append(pixels.reshape(h, w, c))
        names.append(shown(path.relative_to(root)))
    if not images:
        raise TTKDError(f"none of the {len(files)} files in {folder} is a readable image "
                        f"({skipped[0][0]}: {skipped[0][1]})")
    rows = []
    for start in range(0, len(images), batch_size):
        answer = model.predict(None, np.stack(images[start:start + batch_size]))
        for file, (_, r) in zip(names[start:start + batch_size], answer.iterrows()):
            rows.append({"file": file, "class": int(r["class"]), "name": r["name"],
                         "probability": round(float(r["probability"]), 6)})
    return Classified(rows, skipped, resized, warning)


def shown(path: Path) -> str:
    """A file name as text: bytes that are not UTF-8 (a name from another system) as \\xNN."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def measure_version(version) -> dict[str, str]:
    """Measure what registered model ``version`` (a model version of the registry) costs,
    on its network as served, and tag the version with it; returns the tags."""
    ref = ModelRef(f"models:/{version.name}/{version.version}", version.name, str(version.version), version.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        model, meta, _ = load_classifier(ref, tmp)
        network = next(Path(tmp).rglob("network.pt2"))
        measured = cost.measure(model.network, tuple(meta["image_shape"]), network.stat().st_size,
                                threads=tracking.COST_THREADS)
    tags = tracking.cost_tags(measured)
    tracking.tag_version(version.name, str(version.version), tags)
    return tags


def measure_unmeasured(reference: str, students: bool = False) -> list[str]:
    """Measure every version of model ``reference`` (with ``students``: of the models
    distilled from it too) that has no measured cost yet; one line per version measured."""
    registry.prepare_store()
    name = reference.strip().removeprefix("models:/").split("/")[0].split("@")[0]
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    if students:
        versions += [s for v in versions for s in client.search_model_versions(
            f"tags.`{TAG_PARTNER}` = 'models:/{name}/{v.version}'", max_results=10000)]
    lines, missing = [], set(registry.unmeasured(versions, registry.BUDGETS))  # what promote's budgets need
    for v in (v for v in versions if str(v.version) in missing):
        tags = measure_version(v)
        lines.append(f"measured {v.name} version {v.version}: {int(tags['ttkd.params']):,} parameters, "
                     f"{float(tags['ttkd.latency_ms_b1_cpu']):.3f} ms per image at batch 1")
    return lines
