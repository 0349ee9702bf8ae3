"""Image classification data sets, held in memory as uint8 tensors.

Every data set becomes an :class:`ImageData`: the train and validation images as one
``(N, C, H, W)`` uint8 tensor per split, the labels as int64, and the per-channel mean
and standard deviation (in [0, 1] units) used to normalise them. Batches are cut,
augmented and normalised on whatever device the tensors live on (:func:`batches`),
so there is no per-image Python work in the training loop.

Folders of image files too large for memory stay on disk instead (:class:`ImageFiles`):
DataLoader worker processes decode each batch's files, into pinned memory when the
batches go to a GPU, and the batch is then augmented and normalised exactly as an
in-memory one.

Add a data set by writing a loader ``(data_dir) -> ImageData`` in ``sources.py`` and listing
it in ``LOADERS`` (a folder of image files also takes ``stream`` and is listed in
``FILE_DATASETS``). The rooms: this module (the record, the names, ``load``), ``sources``
(the loaders), ``files`` (image folders, in memory or on disk), ``batching`` (batches and
augmentation on the device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from ttkd import config
from ttkd.errors import TTKDError

SPLIT_SEED = 0  # the train/validation split of data sets that ship without one never moves


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A classification data set.

    ``train_x``/``val_x`` are ``(N, C, H, W)`` uint8 tensors, or :class:`ImageFiles` for
    a data set left on disk; ``train_y``/``val_y`` are ``(N,)`` int64 in
    ``[0, num_classes)``. ``mean``/``std`` have one entry per channel.
    ``augment`` names the training augmentation: "" (none), "crop_flip" (random crop
    after ``crop_padding`` pixels of zero padding, then a random horizontal flip: CIFAR)
    or "rotate_flip" (random rotation within ±``rotation`` degrees, then a random
    horizontal flip: Tiny-ImageNet).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = ""
    crop_padding: int = 4       # pixels, for "crop_flip"
    rotation: float = 20.0      # degrees, for "rotate_flip"
    source: str = ""            # where the data came from, for the run's dataset record
    classes: tuple[str, ...] = ()  # class names by index; empty: the indices themselves

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes or tuple(str(i) for i in range(self.num_classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_x.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def streamed(self) -> bool:
        """Whether the images stay on disk and are decoded batch by batch."""
        return isinstance(self.train_x, ImageFiles)

    def digest(self) -> str:
        """A short hash of both splits, so runs on identical data can be matched: of their
        content in memory, of file names, sizes and times for a data set left on disk."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.val_x, self.val_y):
            h.update(t.fingerprint() if isinstance(t, ImageFiles) else t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with every tensor moved to ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("train_x", "train_y", "val_x", "val_y")}
        return dataclasses.replace(self, **moved)


from ttkd.data.batching import batches, crop_flip_draws, random_crop_flip, random_rotate_flip  # noqa: E402,F401,I001
from ttkd.data.batching import rotate_flip_draws  # noqa: E402,F401
from ttkd.data.files import ImageFiles, default_workers  # noqa: E402,F401
from ttkd.data.sources import (  # noqa: E402,F401
    CIFAR_STATS,
    SYNTHETIC_MAX_CLASSES,
    SYNTHETIC_MAX_PIXELS,
    TINY_STATS,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    load_mnist,
    load_synthetic,
    load_tiny_imagenet,
    synthetic_shape,
)


def names() -> list[str]:
    """The data set names ``load`` accepts (``synthetic`` also as ``synthetic-CxHxW-K``)."""
    return sorted(LOADERS)


def known(name: str) -> bool:
    return name in LOADERS or synthetic_shape(name) is not None


LOADERS: dict[str, Callable[[str | None], ImageData]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "tiny-imagenet": load_tiny_imagenet,
    "imagefolder": load_imagefolder,
    "synthetic": lambda data_dir: load_synthetic(),
}
config.provide("dataset", config.Provided(
    names, known, lambda: "one of " + ", ".join(names()) + f" (synthetic also as synthetic-CxHxW-K, C·H·W at most "
    f"{SYNTHETIC_MAX_PIXELS:,} and K from 2 to {SYNTHETIC_MAX_CLASSES:,})"))


FILE_DATASETS = ("imagefolder", "tiny-imagenet")  # the data sets that can stay on disk


_loaded: dict[tuple, ImageData] | None = None  # inside ``load_once()``: load()'s arguments -> data


@contextlib.contextmanager
def load_once():
    """Inside this block ``load`` reads and decodes each data set once: called again with
    the same arguments, it returns the same :class:`ImageData` (a study's five stages
    share one copy of Tiny-ImageNet instead of decoding it five times). The copies are
    dropped when the outermost block ends."""
    global _loaded
    outermost = _loaded is None
    if outermost:
        _loaded = {}
    try:
        yield
    finally:
        if outermost:
            _loaded = None


def load(name: str, data_dir: str | None = None, stream: bool | None = None) -> ImageData:
    """Load data set ``name`` (a key of ``LOADERS``); ``data_dir`` is where its files live.
    ``stream`` (folders of image files only): True leaves the images on disk, False
    decodes them into memory, None decides by their decoded size. Inside
    :func:`load_once`, a data set already loaded there is returned as it is."""
    key = (name, str(Path(data_dir).resolve()) if data_dir else None, stream)
    if _loaded is not None and key in _loaded:
        return _loaded[key]
    data = _load(name, data_dir, stream)
    if _loaded is not None:
        _loaded[key] = data
    return data


def _load(name: str, data_dir: str | None, stream: bool | None) -> ImageData:
    if not known(name):
        raise TTKDError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    if stream and name not in FILE_DATASETS:
        raise TTKDError(f"dataset {name} is always held in memory; stream=true applies to "
                        f"{' and '.join(FILE_DATASETS)} only, so use stream=auto")
    if name in FILE_DATASETS:
        data = LOADERS[name](data_dir, stream)
    else:
        data = load_synthetic(name) if name.startswith("synthetic") else LOADERS[name](data_dir)
    if len(data.train_y) == 0 or len(data.val_y) == 0:
        raise TTKDError(f"dataset {name} in {data.source} has an empty train or val split")
    return data
