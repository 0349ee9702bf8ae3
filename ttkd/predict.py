"""Classify a folder of image files with a registered model, as a user's own images come:
any size and colour mode, some files perhaps not images at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from ttkd.errors import TTKDError


@dataclasses.dataclass
class Classified:
    rows: list[dict]                  # file, class, name, probability: one per image read
    skipped: list[tuple[str, str]]    # (file, why) for each file that is not a readable image
    resized: int                      # images that were not the model's size


def classify_folder(model_uri: str, folder: str, batch_size: int = 256) -> Classified:
    """Every file under ``folder`` (sorted, hidden ones left out) through the served model
    ``model_uri``: read first, each converted to the model's channels and size, so that a
    bad file is skipped and reported before anything is predicted."""
    root = Path(folder)
    if not root.is_dir():
        raise TTKDError(f"images={folder!r} is not a folder; give a folder of image files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise TTKDError(f"{folder} holds no files; give a folder of image files (PNG, JPEG, ...)")
    model = mlflow.pyfunc.load_model(model_uri)
    meta = model.metadata.metadata or {}
    if "image_shape" not in meta:
        raise TTKDError(f"{model_uri} does not say what images it takes; predict needs a model that "
                        f"this ttkd registered")
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
            skipped.append((str(path.relative_to(root)), str(exc).splitlines()[0][:200] or type(exc).__name__))
            continue
        images.append(pixels.reshape(h, w, c))
        names.append(str(path.relative_to(root)))
    if not images:
        raise TTKDError(f"none of the {len(files)} files in {folder} is a readable image "
                        f"({skipped[0][0]}: {skipped[0][1]})")
    rows = []
    for start in range(0, len(images), batch_size):
        answer = model.predict(np.stack(images[start:start + batch_size]))
        for file, (_, r) in zip(names[start:start + batch_size], answer.iterrows()):
            rows.append({"file": file, "class": int(r["class"]), "name": r["name"],
                         "probability": round(float(r["probability"]), 6)})
    return Classified(rows, skipped, resized)
