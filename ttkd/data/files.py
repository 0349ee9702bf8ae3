"""Folders of image files: decoded into memory, or left on disk (:class:`ImageFiles`) and
decoded batch by batch by DataLoader worker processes, into pinned memory when the batches go
to a GPU; "auto" leaves a folder on disk when its decoded images would fill more than a
quarter of the RAM."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch

from ttkd.errors import TTKDError


class ImageFiles(torch.utils.data.Dataset):
    """One split left on disk: images are decoded from their files, resized to ``size``
    and converted to ``mode`` ("L" or "RGB") when a batch is drawn.

    It stands in for the split's ``(N, C, H, W)`` uint8 tensor wherever ttkd reads one:
    ``shape``, ``device`` (where its batches land), ``to(device)``, and indexing by an
    integer (one image) or a slice (a stacked batch). :meth:`batches` runs ``workers``
    DataLoader processes, with pinned memory when the batches go to a GPU.
    """

    def __init__(self, paths: list, size: tuple[int, int], mode: str, workers: int | None = None):
        self.paths = [str(p) for p in paths]
        self.size, self.mode = tuple(size), mode
        self.device = torch.device("cpu")
        self.workers = default_workers() if workers is None else workers

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 1 if self.mode == "L" else 3, *self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return torch.stack([self[j] for j in range(*i.indices(len(self)))])
        return torch.from_numpy(np.ascontiguousarray(_read(self.paths[i], self.size, self.mode)))

    def to(self, device: torch.device | str) -> ImageFiles:
        moved = copy.copy(self)
        moved.device = torch.device(device)
        return moved

    def subset(self, rows: list[int]) -> ImageFiles:
        """The images at ``rows``, in that order."""
        part = copy.copy(self)
        part.paths = [self.paths[i] for i in rows]
        return part

    def fingerprint(self) -> bytes:
        """File names, sizes and modification times: changes when any file does."""
        lines = []
        for path in self.paths:
            st = os.stat(path)
            lines.append(f"{path}\t{st.st_size}\t{st.st_mtime_ns}")
        return "\n".join(lines + [f"{self.size} {self.mode}"]).encode()

    def batches(self, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        """The images of each index list in ``chunks``, in order, as ``(B, C, H, W)`` uint8
        on ``self.device``; workers decode ahead of the training step."""
        loader = torch.utils.data.DataLoader(
            self, batch_sampler=chunks, collate_fn=torch.stack, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        try:
            for images in loader:
                yield images.to(self.device, non_blocking=True)
        except TTKDError as exc:  # raised in a worker: keep its own one-line message
            raise TTKDError(str(exc).strip().splitlines()[-1].split("TTKDError: ", 1)[-1]) from None


def default_workers() -> int:
    """DataLoader workers for a data set on disk: one core is left to the training step."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


STREAM_FRACTION = 0.25  # "auto" keeps a folder on disk if its decoded images exceed this share of RAM


def physical_memory() -> int:
    """Bytes of RAM on this machine (8 GiB if the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _split(samples: list[tuple], size: tuple[int, int], mode: str, stream: bool):
    """``(images, labels)`` of ``(path, label)`` pairs: decoded now, or left on disk."""
    if stream:
        labels = np.array([y for _, y in samples], dtype=np.int64)
        return ImageFiles([p for p, _ in samples], size, mode), labels
    return _decode(samples, size, mode)


def _should_stream(stream: bool | None, count: int, size: tuple[int, int], channels: int) -> bool:
    if stream is not None:
        return stream
    return count * channels * size[0] * size[1] > STREAM_FRACTION * physical_memory()


def _image_info(path) -> tuple[tuple[int, int], str]:
    """``((height, width), PIL mode)`` of one image file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.height, im.width), im.mode
    except OSError as exc:
        raise TTKDError(f"cannot read image {path}: {exc}; remove or replace it") from None


def _decode(samples: list[tuple], size: tuple[int, int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(path, label)`` pairs into ``(N, C, H, W)`` uint8 images of ``size`` and labels."""
    images = np.empty((len(samples), 1 if mode == "L" else 3, *size), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _read(path, size, mode)
    return images, np.array([y for _, y in samples], dtype=np.int64)


def _read(path, size: tuple[int, int], mode: str) -> np.ndarray:
    """One image file as ``(C, H, W)`` uint8, converted to ``mode`` and resized to ``size``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if (im.height, im.width) != size:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.array(im)  # a writable copy
    except OSError as exc:
        raise TTKDError(f"cannot read image {path}: {exc}; remove or replace it") from None
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
