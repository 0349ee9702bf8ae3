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
from collections.abc import Callable
from pathlib import Path

from ttkd import config
from ttkd.data.batching import batches, crop_flip_draws, random_crop_flip, random_rotate_flip, rotate_flip_draws  # noqa: F401
from ttkd.data.files import ImageFiles, default_workers  # noqa: F401
from ttkd.data.record import SPLIT_SEED, ImageData  # noqa: F401
from ttkd.data.sources import (  # noqa: F401
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
from ttkd.errors import TTKDError


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
