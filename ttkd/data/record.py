"""The record every data set becomes: :class:`ImageData`."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ttkd.data.files import ImageFiles
from ttkd.errors import TTKDError

SPLIT_SEED = 0  # the train/validation split of data sets that ship without one never moves
HOLDOUT_SEED = 0  # nor does the holdout carved from a training split


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
    evaluated_on: str = "val"   # the split val_x and val_y hold: "val" or "holdout"

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

    def holdout(self, fraction: float) -> ImageData:
        """The training split cut in two, stratified by class with a fixed seed: the data
        trains on ``1 - fraction`` of it and is evaluated on the rest, the holdout; the
        validation split is not in the answer at all, so nothing trained or chosen on it can
        see it. A class left without an image on either side is a one-line error."""
        from sklearn.model_selection import train_test_split

        if not 0 < fraction < 0.5:
            raise TTKDError(f"invalid holdout: {fraction}; holdout must be a fraction of the training split "
                            f"above 0 and below 0.5, like 0.1")
        labels = self.train_y.cpu().numpy()
        counts = np.bincount(labels, minlength=self.num_classes)
        n_holdout = max(1, round(fraction * len(labels)))
        if counts.min() < 2 or n_holdout < self.num_classes or len(labels) - n_holdout < self.num_classes:
            scarce = int(counts.argmin())
            raise TTKDError(f"holdout={fraction:g} of {len(labels):,} training images leaves a class of "
                            f"{self.name} with no image on one side (class {self.class_names[scarce]} has "
                            f"{counts[scarce]}, and there are {self.num_classes} classes); use a larger holdout "
                            f"or a data set with more images per class")
        kept, held = train_test_split(np.arange(len(labels)), test_size=n_holdout, stratify=labels,
                                      random_state=HOLDOUT_SEED)
        kept, held = np.sort(kept), np.sort(held)

        def take(x, rows):
            return x.subset(rows.tolist()) if isinstance(x, ImageFiles) else x[torch.from_numpy(rows).to(x.device)]
        return dataclasses.replace(self, train_x=take(self.train_x, kept), train_y=take(self.train_y, kept),
                                   val_x=take(self.train_x, held), val_y=take(self.train_y, held),
                                   evaluated_on="holdout")

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with every tensor moved to ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("train_x", "train_y", "val_x", "val_y")}
        return dataclasses.replace(self, **moved)
