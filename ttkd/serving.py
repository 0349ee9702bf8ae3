"""The model a stage registers, as MLflow serves it: images in, classes out.

MLflow logs this file with the model ("models from code") and runs it wherever the model
is loaded, with or without ttkd installed, so it imports nothing from ttkd (ttkd itself
loads models with its own installed copy of this file, never the model's). The network is
a ``torch.export`` program (``network.pt2``: a graph as JSON and its weights as raw
tensors), read by :func:`load_network`, which refuses an archive that would need Python's
full unpickler or a compiled library; the image size, normalisation and class names come
from the model's configuration.

Input: uint8 pixel values, ``(N, H, W, C)`` or ``(N, C, H, W)`` (for one channel also
``(N, H, W)``), as a numpy array or nested lists of numbers. Output: one row per image with
``class`` (index), ``name``, ``probability`` (of that class) and ``probabilities`` (all
classes). An input that does not fit is refused with one line, which ``mlflow models
serve`` answers as HTTP 400.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

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
        self.network = load_network(context.artifacts["network"])

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # np.ndarray: the one hint MLflow neither converts inputs by nor warns about; any
        # input still comes here as sent, and ``pixels`` checks it
        x = pixels(model_input, self.shape)
        try:
            with torch.no_grad():  # in chunks: the exported batch size is bounded (MAX_BATCH)
                p = torch.cat([torch.softmax(self.network((chunk / 255 - self.mean) / self.std), dim=1)
                               for chunk in x.split(CHUNK)])
        except Exception as exc:  # one line, no traceback, in the answer to a request
            refuse(f"the model could not classify these images ({type(exc).__name__}: {_first_line(exc)[:200]})")
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
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        refuse(f"the images hold values that are not finite numbers (such as {a[~np.isfinite(a)].flat[0]}); "
               f"expected {expected}: raw pixel values 0 to 255")
    if a.dtype.kind == "f" and not np.all(a == np.round(a)):
        refuse(f"the images hold fractional values (such as {a[a != np.round(a)].flat[0]:.4g}); expected "
               f"{expected}: raw pixel values 0 to 255, not normalised ones")
    if a.min() < 0 or a.max() > 255:
        refuse(f"pixel values must be 0 to 255 (got {a.min()} to {a.max()}); expected {expected}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def refused_global(exc: BaseException) -> str | None:
    """The Python object (``posix.system``) torch's weights-only unpickler refused to load, if it says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found[1] if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def refuse(reason: str):
    raise MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)


MAX_BATCH = 1 << 16  # the largest batch the network is exported for (ttkd.tracking.log_model)
CHUNK = 1024         # images per call of the network when serving a larger request

# The parts of a torch.export archive (after its root folder) that ttkd's own export
# writes and torch reads without code: the graph and its configs as JSON, tensors as raw
# bytes, and the example inputs, read here with torch's weights-only unpickler. Anything
# else (a compiled AOTInductor library, pickled custom or opaque objects, legacy pickled
# weights) is refused before torch opens the archive.
_SAFE_PART = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                        r"|models/[\w.-]+\.json|data/weights/(weight_\d+|[\w.-]+_weights_config\.json)"
                        r"|data/constants/(tensor_\w+|[\w.-]+_constants_config\.json)"
                        r"|data/sample_inputs/[\w.-]+\.pt)")


class UnsafeModelFile(MlflowException):
    """A model file that could run code when loaded."""


def load_network(path: str) -> torch.nn.Module:
    """The network of a ``torch.export`` archive, read without Python's full unpickler: an
    archive with a part ttkd's export does not write, or whose weights or constants are
    marked as pickled, is refused; the parts torch unpickles (the example inputs) are read
    with ``torch.load``'s weights-only unpickler, forced, so that torch's fallback to the
    full unpickler cannot run. Raises :class:`UnsafeModelFile` naming the file and part."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as archive:
            parts = [n.split("/", 1)[-1] for n in archive.namelist() if not n.endswith("/")]
            unsafe = [n for n in parts if not _SAFE_PART.fullmatch(n)]
            for config in (n for n in archive.namelist() if n.endswith(("_weights_config.json",
                                                                        "_constants_config.json"))):
                entries = json.loads(archive.read(config)).get("config", {})
                unsafe += [f"{config.split('/', 1)[-1]}: {k}" for k, v in entries.items()
                           if v.get("use_pickle") or not str(v.get("path_name", "")).startswith(("weight_", "tensor_"))]
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise UnsafeModelFile(f"{name} is not a torch.export archive ({_first_line(exc)})") from None
    if unsafe:
        raise UnsafeModelFile(f"{name} holds a part that would be unpickled or run as code when loaded "
                              f"({unsafe[0]}); it was not written by ttkd's export: refusing to load it")
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # torch.export.load falls back to the full unpickler
    try:
        return torch.export.load(path).module()
    except pickle.UnpicklingError as exc:  # from the forced weights-only load
        found = refused_global(exc)
        raise UnsafeModelFile(f"{name} holds a pickled object{f' ({found})' if found else ''} that only the "
                              f"full unpickler would load, running code: refusing to load it") from None
    except Exception as exc:  # a damaged archive
        raise UnsafeModelFile(f"{name} is damaged ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


set_model(ImageClassifier())
