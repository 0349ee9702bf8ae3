"""The model a stage registers, as MLflow serves it: images in, classes out.

MLflow logs this file with the model ("models from code") and runs it wherever the model
is loaded, with or without ttkd installed, so it imports nothing from ttkd and needs no
torch: the network is ``network.onnx``, run by onnxruntime, which interprets a graph of
ONNX operators and runs no code from the file (it also refuses weights stored outside the
file). The image size, normalisation and class names come from the model's configuration,
and the network's declared input and output must agree with them. ttkd itself answers
with its own installed copy of this class around a network it built from the weights
(``ttkd.predict``), never with the model's copy.

Input: uint8 pixel values, ``(N, H, W, C)`` or ``(N, C, H, W)`` (for one channel also
``(N, H, W)``), as a numpy array or nested lists of numbers. Output: one row per image with
``class`` (index), ``name``, ``probability`` (of that class) and ``probabilities`` (all
classes). An input that does not fit is refused with one line, which ``mlflow models
serve`` answers as HTTP 400.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

Network = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) float32, normalised -> (N, classes) logits


class ImageClassifier(PythonModel):
    def __init__(self, network: Network | None = None):
        self.network = network  # given: ttkd's own network; otherwise read from the model's files

    def load_context(self, context) -> None:
        config = context.model_config
        self.shape = tuple(config["image_shape"])  # (C, H, W)
        self.classes = list(config["classes"])
        self.mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        if self.network is None:
            self.network = load_network(context.artifacts["network"], self.shape, len(self.classes))

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # np.ndarray: the one hint MLflow neither converts inputs by nor warns about; any
        # input still comes here as sent, and ``pixels`` checks it
        x = pixels(model_input, self.shape)
        try:  # in chunks, so that a large request does not hold every activation at once
            logits = np.concatenate([self.network((x[i:i + CHUNK] / 255 - self.mean) / self.std)
                                     for i in range(0, len(x), CHUNK)])
        except Exception as exc:  # one line, no traceback, in the answer to a request
            refuse(f"the model could not classify these images ({type(exc).__name__}: {_first_line(exc)[:200]})")
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        best = p.argmax(axis=1)
        return pd.DataFrame({"class": best, "name": [self.classes[i] for i in best.tolist()],
                             "probability": p[np.arange(len(p)), best], "probabilities": list(p)})


def pixels(images, shape: tuple[int, int, int]) -> np.ndarray:
    """``images`` as a float32 ``(N, C, H, W)`` array of values 0..255, or a one-line
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
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        refuse(f"the images hold values that are not finite numbers (such as {a[~np.isfinite(a)].flat[0]}); "
               f"expected {expected}: raw pixel values 0 to 255")
    if a.dtype.kind == "f" and not np.all(a == np.round(a)):
        refuse(f"the images hold fractional values (such as {a[a != np.round(a)].flat[0]:.4g}); expected "
               f"{expected}: raw pixel values 0 to 255, not normalised ones")
    if a.min() < 0 or a.max() > 255:
        refuse(f"pixel values must be 0 to 255 (got {a.min()} to {a.max()}); expected {expected}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def refuse(reason: str):
    raise MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)


CHUNK = 1024  # images per call of the network when serving a larger request


class UnsafeModelFile(MlflowException):
    """A network file that is not the one-input, one-output ONNX graph ttkd writes."""


def load_network(path: str, image_shape: tuple[int, int, int], num_classes: int, threads: int = 0) -> Network:
    """The ONNX network in ``path`` as a function of a normalised float32 batch, run by
    onnxruntime on the CPU (``threads``: its intra-op threads, 0 for its default). Its one
    input must take ``(N, *image_shape)`` float32 and its one output give ``num_classes``
    logits per image; anything else, or a file onnxruntime cannot read, raises
    :class:`UnsafeModelFile` naming the file."""
    import os

    import onnxruntime

    name = os.path.basename(path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the answer to a request is ours to word
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UnsafeModelFile(f"{name} is not an ONNX network onnxruntime can run ({_first_line(exc)[:200]})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not (len(inputs) == len(outputs) == 1 and inputs[0].type == "tensor(float)"
            and list(inputs[0].shape[1:]) == list(image_shape) and list(outputs[0].shape[1:]) == [num_classes]):
        found = [(i.name, i.type, i.shape) for i in inputs] + [(o.name, o.type, o.shape) for o in outputs]
        raise UnsafeModelFile(f"{name} does not take {'x'.join(map(str, image_shape))} images and answer "
                              f"{num_classes} classes (it declares {str(found)[:200]})")
    feed = inputs[0].name
    return lambda x: session.run(None, {feed: np.ascontiguousarray(x, dtype=np.float32)})[0]


set_model(ImageClassifier())
