"""Classify a folder of image files with a registered model, as a user's own images come:
any size and colour mode, some files perhaps not images at all."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ttkd import cost, modelfile, serving, tracking
from ttkd.errors import TTKDError
from ttkd.tracking import modelstore, promotion, registry
from ttkd.tracking.registry import ModelRef, first_line


@dataclasses.dataclass
class Classified:
    rows: list[dict]                  # file, class, name, probability: one per image read
    skipped: list[tuple[str, str]]    # (file, why) for each file that is not a readable image
    resized: int                      # images that were not the model's size
    warning: str | None = None        # what could not be checked about the model


@dataclasses.dataclass
class Opened:
    """A registered model, its files checked, built by ttkd."""

    folder: str                       # where its files were downloaded (valid while the caller's folder lives)
    record: modelfile.Record
    net: torch.nn.Module              # ttkd's own architecture with the registered weights, eval mode
    classifier: serving.ImageClassifier  # this ttkd's serving.py around ``net``: the model as it answers
    warning: str | None               # why its files could not be checked (trust_unverified=true)


def open_model(ref: ModelRef, tmp: str, trust_unverified: bool = False) -> Opened:
    """The registered model ``ref`` as it answers when served, from this ttkd's own code:
    its files are checked against the digests the registry recorded when it was
    registered before any is read, then its network is built from ttkd's architecture code
    and ``weights.safetensors`` (``ttkd.modelfile``), inside this ttkd's
    ``ttkd/serving.py``; nothing in the model's folder runs."""
    who = f"model {ref.uri}"
    local = modelstore.download_model(ref.uri, who, tmp)
    warning = modelstore.verify_model(ref, local, who, trust_unverified)
    net, record = modelfile.build(local, who)

    def network(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    classifier = serving.ImageClassifier(network)
    classifier.load_context(SimpleNamespace(artifacts={}, model_config={
        "image_shape": list(record.image_shape), "classes": list(record.classes),
        "mean": list(record.mean), "std": list(record.std)}))
    return Opened(local, record, net, classifier, warning)


def classify_folder(ref: ModelRef, folder: str, batch_size: int = 256, trust_unverified: bool = False) -> Classified:
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
        opened = open_model(ref, tmp, trust_unverified)
    model, warning = opened.classifier, opened.warning
    c, h, w = opened.record.image_shape
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


def measure_version(version, trust_unverified: bool = False) -> tuple[dict[str, str], str | None]:
    """Measure what registered model ``version`` (a model version of the registry) costs,
    its files checked first: parameters and MACs of the network ttkd builds, times of the
    served ONNX network; tag the version with it; returns the tags, and a warning when its
    files could not be checked (``trust_unverified``)."""
    ref = ModelRef(f"models:/{version.name}/{version.version}", version.name, str(version.version), version.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        opened = open_model(ref, tmp, trust_unverified)
        path = Path(opened.folder, modelfile.NETWORK)
        served = serving.load_network(str(path), opened.record.image_shape, opened.record.num_classes,
                                      threads=tracking.COST_THREADS)
        measured = cost.measure(opened.net, served, opened.record.image_shape, path.stat().st_size,
                                threads=tracking.COST_THREADS)
    tags = tracking.cost_tags(measured)
    tracking.tag_version(version.name, str(version.version), tags)
    return tags, opened.warning


def measure_unmeasured(reference: str, students: bool = False,
                       trust_unverified: bool = False) -> tuple[list[str], list[str]]:
    """Measure every version of model ``reference`` (with ``students``: of the models
    distilled from it too) that has no measured cost yet; one line per version measured,
    and the warnings about versions whose files could not be checked."""
    registry.prepare_store()
    name = reference.strip().removeprefix("models:/").split("/")[0].split("@")[0]
    versions = registry.versions(name, students)
    lines, warnings, missing = [], [], set(promotion.unmeasured(versions, promotion.BUDGETS))  # what budgets need
    for v in (v for v in versions if str(v.version) in missing):
        tags, warning = measure_version(v, trust_unverified)
        warnings += [warning] if warning else []
        lines.append(f"measured {v.name} version {v.version}: {int(tags['ttkd.params']):,} parameters, "
                     f"{float(tags['ttkd.latency_ms_b1_cpu']):.3f} ms per image at batch 1")
    return lines, warnings


def scoring_app(ref: ModelRef, tmp: str, trust_unverified: bool = False):
    """MLflow's scoring server for model ``ref`` (a FastAPI app) and a warning, from its files
    downloaded under ``tmp`` and checked against the registry's digests, the network built
    and its ONNX file loaded once before (so that a bad file is one line now, not an answer
    later). A request without a Content-Type gets a one-line 415 instead of MLflow's 500."""
    from fastapi.responses import JSONResponse
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import load_model, scoring_server

    opened = open_model(ref, tmp, trust_unverified)  # checks every file, builds the network
    try:  # the checked copy, never downloaded again; its serving.py loads the ONNX file once, here
        model = load_model(opened.folder)
    except MlflowException as exc:  # serving.UnsafeModelFile among them
        raise TTKDError(f"model {ref.uri}: {first_line(exc)}") from None
    app = scoring_server.init(model)

    @app.middleware("http")
    async def content_type_needed(request, call_next):
        if request.method == "POST" and not request.headers.get("content-type"):
            return JSONResponse({"error_code": "BAD_REQUEST", "message": "the request has no Content-Type; send "
                                 "Content-Type: application/json with {\"inputs\": [...]}"}, status_code=415)
        return await call_next(request)
    return app, opened.warning
