"""Image classification data sets, held in memory as uint8 tensors.

Every data set becomes an :class:`ImageData`: the train and validation images as one
``(N, C, H, W)`` uint8 tensor per split, the labels as int64, and the per-channel mean
and standard deviation (in [0, 1] units) used to normalise them. Batches are cut,
augmented and normalised on whatever device the tensors live on (:func:`batches`),
so there is no per-image Python work in the training loop.

Add a data set by writing a loader ``(data_dir) -> ImageData`` and listing it in
``LOADERS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ttkd.errors import TTKDError

SPLIT_SEED = 0  # the train/validation split of data sets that ship without one never moves


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A classification data set in memory.

    ``train_x``/``val_x`` are ``(N, C, H, W)`` uint8; ``train_y``/``val_y`` are ``(N,)``
    int64 in ``[0, num_classes)``. ``mean``/``std`` have one entry per channel.
    ``crop_padding`` > 0 turns on the CIFAR augmentation (random crop with that much
    zero padding, then a random horizontal flip); 0 means no augmentation.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    source: str = ""  # where the data came from, for the run's dataset record

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_x.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def digest(self) -> str:
        """A short content hash of both splits, so runs on identical data can be matched."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.val_x, self.val_y):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with every tensor moved to ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("train_x", "train_y", "val_x", "val_y")}
        return dataclasses.replace(self, **moved)


def load_digits(data_dir: str | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

    Pixel values 0..16 are rescaled to 0..255; 20% of each class is held out for
    validation with a fixed seed, so every run sees the same split.
    """
    import sklearn.datasets
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    tx, vx, ty, vy = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    return _from_arrays("digits", tx, ty, vx, vy, num_classes=10, crop_padding=0,
                        source=str(source))


def load_cifar10(data_dir: str | None) -> ImageData:
    """CIFAR-10 through torchvision: read from ``data_dir`` when its files are there
    (the ``cifar-10-batches-py`` folder torchvision leaves), else downloaded into it."""
    from torchvision.datasets import CIFAR10

    root = Path(data_dir or "data")
    splits = []
    for train in (True, False):
        ds = _torchvision_dataset(CIFAR10, root, train, "CIFAR-10", "cifar-10-batches-py")
        splits += [np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),  # NHWC -> NCHW
                   np.asarray(ds.targets, dtype=np.int64)]
    return _from_arrays("cifar10", *splits, num_classes=10, crop_padding=4,
                        source=str(root / "cifar-10-batches-py"))


LOADERS: dict[str, Callable[[str | None], ImageData]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
}


def load(name: str, data_dir: str | None = None) -> ImageData:
    """Load data set ``name`` (a key of ``LOADERS``); ``data_dir`` is where its files live."""
    if name not in LOADERS:
        raise TTKDError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](data_dir)


def _torchvision_dataset(cls, root: Path, train: bool, title: str, folder: str):
    """Open a torchvision data set from ``root``, downloading it only if it is not there."""
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        pass  # not there (or damaged): fetch it
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as exc:  # no network, full disk, bad archive...
        raise TTKDError(
            f"{title} is not in {root / folder} and could not be downloaded ({exc}); "
            f"download it once on a machine with internet and pass its parent folder as data_dir"
        ) from None


def _from_arrays(name, tx, ty, vx, vy, *, num_classes, crop_padding, source) -> ImageData:
    train_x = torch.from_numpy(tx)
    scaled = train_x.double().div_(255)
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())  # statistics of the training split only
    std = tuple(scaled.std(dim=(0, 2, 3)).tolist())
    return ImageData(name, train_x, torch.from_numpy(ty), torch.from_numpy(vx),
                     torch.from_numpy(vy), num_classes, mean, std, crop_padding, source)


def batches(
    data: ImageData,
    split: str,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches of ``split`` ("train" or "val").

    Training batches are shuffled with ``generator`` and augmented; validation batches
    come in order, unaugmented. Images come out as normalised float32 ``(B, C, H, W)``
    on the data's device; the last, smaller batch is kept.
    """
    x, y = (data.train_x, data.train_y) if split == "train" else (data.val_x, data.val_y)
    train = split == "train"
    order = (torch.randperm(len(y), generator=generator).to(x.device) if train
             else torch.arange(len(y), device=x.device))
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        images = x[idx]
        if train and data.crop_padding:
            images = random_crop_flip(images, data.crop_padding, generator)
        yield (images.float().div_(255).sub_(mean).div_(std), y[idx])


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random crop (after zero padding by ``padding`` pixels) and horizontal flip.

    Same result set as torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()`` applied image by image, done for the whole batch at once.
    ``images``: ``(B, C, H, W)``; returns a tensor of the same shape and dtype.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p), zeros
    dev = images.device
    # offsets are drawn on the CPU generator, then moved: one small transfer per batch
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    flip = torch.rand(b, generator=generator).to(dev) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=dev)[None]).view(b, 1, h, 1)
    cols = torch.arange(w, device=dev)[None].expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    cols = cols.view(b, 1, 1, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(images.shape[1], device=dev).view(1, -1, 1, 1)
    return padded[bi, ci, rows, cols]
