"""Batches cut, augmented and normalised on whatever device the images live on: no per-image
Python work in the training loop. The augmentations are the batch forms of torchvision's
per-image transforms, their random draws made for a whole epoch at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ttkd.data.files import ImageFiles

if TYPE_CHECKING:
    from ttkd.data.record import ImageData


def batches(
    data: ImageData,
    split: str,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    indices: bool = False,
    part: Callable[[int], slice] | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(images, labels)`` batches of ``split`` ("train" or "val"), with
    ``indices`` ``(images, labels, positions)``: each sample's ``(B,)`` position in the split.

    Training batches are shuffled with ``generator`` and augmented; validation batches
    come in order, unaugmented. Images come out as normalised float32 ``(B, C, H, W)``
    on the data's device (in channels_last memory order if asked); the last, smaller
    batch is kept. ``part(n)``, if given, picks this process's slice of each batch of
    ``n`` images: the order and the augmentation of every image are those of the whole
    batch, drawn from ``generator`` alike in every process; only the slice is loaded.
    """
    x, y = (data.train_x, data.train_y) if split == "train" else (data.val_x, data.val_y)
    train = split == "train"
    order = torch.randperm(len(y), generator=generator) if train else torch.arange(len(y))
    starts = range(0, len(y), batch_size)
    keep = [(part or (lambda n: slice(0, n)))(len(order[s:s + batch_size])) for s in starts]
    if isinstance(x, ImageFiles):  # decoded from disk by DataLoader workers, ahead of use
        cut = x.batches([order[s:s + batch_size][k].tolist() for s, k in zip(starts, keep)])
    else:
        cut = (x[i[k]] for i, k in zip(order.to(x.device).split(batch_size), keep))
    order = order.to(y.device)
    # (pixel / 255 - mean) / std == pixel * scale + shift: one fused multiply-add
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * std)
    shift = -torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1) / std
    layout = torch.channels_last if channels_last else torch.contiguous_format
    augment = {"crop_flip": (random_crop_flip, crop_flip_draws, data.crop_padding),
               "rotate_flip": (random_rotate_flip, rotate_flip_draws, data.rotation)}.get(data.augment)
    if train and augment:
        # the whole epoch's random draws, moved to the device once: no transfer (on a GPU,
        # no wait for the host) inside the step loop
        apply, draw, amount = augment
        draws = [t.to(x.device) for t in draw(len(y), amount, generator)]
    for start, k, images in zip(starts, keep, cut):
        idx = order[start:start + batch_size][k]
        if train and augment:
            images = apply(images, amount, draws=[t[start:start + batch_size][k] for t in draws])
        images = images.contiguous(memory_format=layout)
        images = torch.addcmul(shift, images.float(), scale)
        yield (images, y[idx], idx) if indices else (images, y[idx])


def crop_flip_draws(n: int, padding: int, generator: torch.Generator | None = None):
    """The random part of :func:`random_crop_flip` for ``n`` images, on the CPU:
    ``(dy, dx, flip)``, offsets in ``[0, 2·padding]`` and flips with probability 1/2."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None, draws=None
) -> torch.Tensor:
    """Per-image random crop (after zero padding by ``padding`` pixels) and horizontal flip.

    Same result set as torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()`` applied image by image, done for the whole batch at once.
    ``images``: ``(B, C, H, W)``; returns a tensor of the same shape and dtype. ``draws``
    (from :func:`crop_flip_draws`, on any device) replace drawing from ``generator``.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p), zeros
    width = w + 2 * padding
    dev = images.device
    dy, dx, flip = (t.to(dev) for t in (draws or crop_flip_draws(b, padding, generator)))
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H) source rows
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (B, W) source columns
    # one gather over each image's flattened pixels, the same for every channel
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


def rotate_flip_draws(n: int, degrees: float, generator: torch.Generator | None = None):
    """The random part of :func:`random_rotate_flip` for ``n`` images, on the CPU:
    ``(angle, flip)``, angles in radians uniform in ±``degrees``, flips with probability 1/2."""
    angle = (torch.rand(n, generator=generator) * 2 - 1).mul_(math.radians(degrees))
    return angle, torch.rand(n, generator=generator) < 0.5


def random_rotate_flip(
    images: torch.Tensor, degrees: float, generator: torch.Generator | None = None, draws=None
) -> torch.Tensor:
    """Per-image random rotation by an angle uniform in [−degrees, degrees] about the
    centre (nearest pixel, zero fill, same size), then a random horizontal flip: the
    batch form of torchvision's ``RandomRotation(degrees)`` + ``RandomHorizontalFlip()``.
    ``images``: ``(B, C, H, W)``; returns the same shape and dtype. ``draws`` (from
    :func:`rotate_flip_draws`, on any device) replace drawing from ``generator``."""
    dev = images.device
    angle, flip = (t.to(dev) for t in (draws or rotate_flip_draws(images.shape[0], degrees, generator)))
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = torch.where(flip, -1.0, 1.0)  # flipping the output = negating its x coordinate
    theta = torch.stack([torch.stack([cos * sign, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin * sign, cos, torch.zeros_like(cos)], 1)], 1)  # (B, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="nearest",
                                          padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)
