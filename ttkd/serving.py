"""The model a stage registers, as MLflow serves it: images in, classes out.

MLflow logs this file with the model ("models from code") and runs it wherever the model
is loaded, with or without ttkd installed, so it imports nothing from ttkd. The network is
a ``torch.export`` program (``network.pt2``: a graph and its weights, no pickle); the
image size, normalisation and class names come from the model's configuration.

Input: uint8 pixel values, ``(N, H, W, C)`` or ``(N, C, H, W)`` (for one channel also
``(N, H, W)``), as a numpy array or nested lists of numbers. Output: one row per image with
``class`` (index), ``name``, ``probability`` (of that class) and ``probabilities`` (all
classes). An input that does not fit is refused with one line, which ``mlflow models
serve`` answers as HTTP 400.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config
        self.shape = tuple(config["image_shape"])  # (C, H, W)
        self.classes = list(config["classes"])
        self.mean = torch.tensor(config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.network = torch.export.load(context.artifacts["network"]).module()

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # np.ndarray: the one hint MLflow neither converts inputs by nor warns about; any
        # input still comes here as sent, and ``pixels`` checks it
        x = pixels(model_input, self.shape)
        with torch.no_grad():
            p = torch.softmax(self.network((x / 255 - self.mean) / self.std), dim=1)
        best = p.argmax(dim=1)
        return pd.DataFrame({"class": best.numpy(), "name": [self.classes[i] for i in best.tolist()],
                             "probability": p.gather(1, best[:, None])[:, 0].numpy(),
                             "probabilities": list(p.numpy())})


def pixels(images, shape: tuple[int, int, int]) -> torch.Tensor:
    """``images`` as a float32 ``(N, C, H, W)`` tensor of values 0..255, or a one-line
    refusal saying what was expected."""
    c, h, w = shape
    expected = f"uint8 images of {h}x{w} pixels with {c} channel{'s' * (c > 1)}, as (N, H, W, C) or (N, C, H, W)"
    if isinstance(images, pd.DataFrame):
        refuse(f"send the images as a tensor ({{\"inputs\": [...]}}), not a table; expected {expected}")
    try:
        a = np.asarray(images)
    except ValueError:  # ragged lists
        refuse(f"the images are not all the same size; expected {expected}")
    if a.dtype.kind not in "uif":
        refuse(f"the images hold {a.dtype.name} values, not numbers; expected {expected}")
    if a.ndim == 3 and c == 1:
        a = a[:, None]
    if a.ndim != 4 or len(a) == 0:
        refuse(f"got an array of shape {a.shape}; expected {expected}")
    if a.shape[1:] == (h, w, c):
        a = a.transpose(0, 3, 1, 2)
    elif a.shape[1:] != (c, h, w):
        refuse(f"got images of shape {a.shape[1:]}; expected {expected}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        refuse(f"the images hold fractional values (such as {a[a != np.round(a)].flat[0]:.4g}); expected "
               f"{expected}: raw pixel values 0 to 255, not normalised ones")
    if a.min() < 0 or a.max() > 255:
        refuse(f"pixel values must be 0 to 255 (got {a.min()} to {a.max()}); expected {expected}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def refuse(reason: str):
    raise MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)


set_model(ImageClassifier())
