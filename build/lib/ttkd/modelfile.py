"""A registered model's files, as ttkd writes them and reads them back.

    artifacts/network.json          the record: architecture and its arguments, image shape,
                                    classes, normalisation, training data, and every tensor's
                                    name, shape and dtype (JSON, validated strictly)
    artifacts/weights.safetensors   the weights (tensors only)
    artifacts/network.onnx          the served network, run by onnxruntime (a graph of ONNX
                                    operators: no Python, no pickle)
    serving.py                      the model's code, which MLflow runs (ttkd/serving.py)

ttkd itself never loads a program from a model file: :func:`build` makes the network from
ttkd's installed architecture code and fills it from the weights, after checking the record
and every tensor against the network it built. The digest of every file (``ttkd.tracking``)
is checked before any of them is read. Pure torch, safetensors and JSON: no MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from ttkd import models
from ttkd.errors import TTKDError

RECORD = "artifacts/network.json"
WEIGHTS = "artifacts/weights.safetensors"
NETWORK = "artifacts/network.onnx"
CODE = "serving.py"
FORMAT = 1              # the record's format; another one is refused
MAX_RECORD_BYTES = 1 << 22  # 4 MiB: a record of ten thousand classes and a thousand tensors fits
MAX_CLASSES = 100_000
MAX_IMAGE_SIDE = 4096    # pixels
DTYPES = {"float32": torch.float32, "int64": torch.int64}  # what ttkd's networks hold
SAFETENSORS_DTYPES = {"F32": "float32", "I64": "int64"}  # their names in a safetensors header


class BadModelFile(TTKDError):
    """A model file that is not what ttkd writes."""


@dataclasses.dataclass(frozen=True)
class Record:
    """What ``network.json`` says, checked."""

    arch: str
    num_classes: int
    image_shape: tuple[int, int, int]          # (C, H, W)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    train_digest: str
    tensors: dict[str, tuple[tuple[int, ...], str]]  # state-dict name -> (shape, dtype)

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]


def make_record(model: nn.Module, arch: str, data, train_digest: str) -> dict:
    """The record of ``model`` (an ``arch`` trained on ``data``, an ``ImageData``)."""
    return {"format": FORMAT, "arch": arch, "num_classes": data.num_classes,
            "image_shape": list(data.image_shape), "classes": list(data.class_names),
            "mean": [float(m) for m in data.mean], "std": [float(s) for s in data.std],
            "dataset": data.name, "train_digest": train_digest,
            "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
                        for k, v in model.state_dict().items()}}


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def parse_record(text: bytes, who: str) -> Record:
    """The record in ``text``, every field checked: its keys exactly, a known architecture,
    positive sizes within bounds, one class name per class, finite normalisation with
    std > 0, and tensor shapes of non-negative integers with known dtypes. Anything else
    is a :class:`BadModelFile` naming ``who`` and the field."""
    def bad(why: str):
        raise BadModelFile(f"{who}: its {RECORD} {why}; register the model again with this ttkd")

    if len(text) > MAX_RECORD_BYTES:
        bad(f"is {len(text):,} bytes, more than a record holds ({MAX_RECORD_BYTES:,})")
    try:
        raw = json.loads(text, parse_constant=lambda c: bad(f"holds {c}, which is not a number"))
    except (ValueError, UnicodeDecodeError) as exc:
        bad(f"is not JSON ({exc})")
    keys = {"format", "arch", "num_classes", "image_shape", "classes", "mean", "std", "dataset",
            "train_digest", "tensors"}
    if not isinstance(raw, dict) or set(raw) != keys:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        bad(f"does not have the fields of a record (found {found}; expected {sorted(keys)})")
    if raw["format"] != FORMAT:
        bad(f"is of format {raw['format']!r}, not {FORMAT}")
    if raw["arch"] not in models.names():
        bad(f"names architecture {str(raw['arch'])[:60]!r}, which this ttkd does not know")

    def count(v, top: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top

    if not count(raw["num_classes"], MAX_CLASSES):
        bad(f"has num_classes {raw['num_classes']!r}, not an integer from 1 to {MAX_CLASSES}")
    shape = raw["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and count(shape[0], 64)
            and all(count(s, MAX_IMAGE_SIDE) for s in shape[1:])):
        bad(f"has image_shape {str(shape)[:60]}, not [C, H, W] of positive integers")
    classes = raw["classes"]
    if not (isinstance(classes, list) and len(classes) == raw["num_classes"]
            and all(isinstance(c, str) and len(c) <= 1000 for c in classes)):
        bad(f"does not name one class per class ({raw['num_classes']})")
    for name in ("mean", "std"):
        v = raw[name]
        if not (isinstance(v, list) and len(v) == shape[0] and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            bad(f"has {name} {str(v)[:60]}, not one finite number per channel")
    if not all(s > 0 for s in raw["std"]):
        bad("has a std that is not > 0")
    for name in ("dataset", "train_digest"):
        if not (isinstance(raw[name], str) and len(raw[name]) <= 1000):
            bad(f"has {name} that is not a short text")
    tensors = raw["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        bad("lists no tensors")
    parsed = {}
    for key, spec in tensors.items():
        if not (isinstance(spec, dict) and set(spec) == {"shape", "dtype"} and spec["dtype"] in DTYPES
                and isinstance(spec["shape"], list) and len(spec["shape"]) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])):
            bad(f"describes tensor {key[:60]!r} as {str(spec)[:80]}, not a shape and a dtype "
                f"({', '.join(DTYPES)})")
        parsed[key] = (tuple(spec["shape"]), spec["dtype"])
    return Record(raw["arch"], raw["num_classes"], tuple(shape), tuple(classes), tuple(raw["mean"]),
                  tuple(raw["std"]), raw["dataset"], raw["train_digest"], parsed)


def read_record(folder: str | Path, who: str) -> Record:
    path = Path(folder, RECORD)
    if not path.is_file():
        raise BadModelFile(f"{who} has no {RECORD}; register the model again with this ttkd")
    return parse_record(path.read_bytes(), who)


def build(folder: str | Path, who: str) -> tuple[nn.Module, Record]:
    """The network of the model in ``folder`` (eval mode, on the CPU) and its record: built
    from ttkd's own ``arch`` code, its state checked against the record, the weights file
    checked against both (every name, shape and dtype, before a byte of data is read),
    then loaded. The digests must have been checked first (``modelstore.verify_model``)."""
    record = read_record(folder, who)
    net = models.build(record.arch, record.num_classes, record.in_channels, image_size=record.image_shape[-1])
    expected = {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in net.state_dict().items()}
    if record.tensors != expected:
        raise BadModelFile(f"{who}: its {RECORD} describes tensors that a {record.arch} for "
                           f"{record.num_classes} classes and images of {'x'.join(map(str, record.image_shape))} "
                           f"does not have ({_first_difference(record.tensors, expected)}); register it again")
    path = Path(folder, WEIGHTS)
    try:
        with safetensors.safe_open(path, framework="pt") as f:  # reads the header only
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        found = {k: (shape, SAFETENSORS_DTYPES.get(dtype, dtype)) for k, (shape, dtype) in found.items()}
        if found != expected:
            raise BadModelFile(f"{who}: its {WEIGHTS} does not hold the tensors of a {record.arch} "
                               f"({_first_difference(found, expected)}); register it again")
        state = safetensors.torch.load_file(path)
    except BadModelFile:
        raise
    except Exception as exc:  # a damaged file: safetensors reads tensors only, whatever it holds
        raise BadModelFile(f"{who}: its {WEIGHTS} is damaged ({_line(exc)})") from None
    net.load_state_dict(state, strict=True)
    return net.eval(), record


def _first_difference(found: dict, expected: dict) -> str:
    for key in sorted(set(found) | set(expected)):
        if key not in expected:
            return f"{key[:60]!r} is not one of its tensors"
        if key not in found:
            return f"{key[:60]!r} is missing"
        if found[key] != expected[key]:
            return f"{key[:60]!r} is {found[key]}, not {expected[key]}"
    return "none"


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def write(model: nn.Module, arch: str, data, train_digest: str, folder: Path) -> dict[str, Path]:
    """Write ``model``'s record, weights and served network under ``folder``; returns
    the files by their key in the logged model's ``artifacts``."""
    model.eval().cpu()
    files = {"record": folder / "network.json", "weights": folder / "weights.safetensors",
             "network": folder / "network.onnx"}
    files["record"].write_text(json.dumps(make_record(model, arch, data, train_digest), indent=1))
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                                files["weights"])
    export_onnx(model, data.image_shape, files["network"])
    return files


def export_onnx(model: nn.Module, image_shape: tuple[int, int, int], path: Path) -> None:
    """``model`` as one ONNX file (weights inside, batch size free): input ``images``
    ``(N, C, H, W)`` float32, normalised; output ``logits`` ``(N, classes)``. torch's
    TorchScript-based exporter: 0.01-0.9 s for ttkd's architectures on a 2-core CPU,
    where the torch.export-based one takes 0.7-1.4 s for the digits networks alone, a
    second on every stage of every sweep."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notice that a newer one exists
        torch.onnx.export(model, (torch.zeros(2, *image_shape),), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
