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

Add a data set by writing a loader ``(data_dir) -> ImageData`` and listing it in
``LOADERS`` (a folder of image files also takes ``stream`` and is listed in
``FILE_DATASETS``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import hashlib
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
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


def load_digits(data_dir: str | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

    Pixel values 0..16 are rescaled to 0..255; 20% of each class is held out for
    validation with a fixed seed, so every run sees the same split. Normalised with the
    training split's statistics; no augmentation.
    """
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    bunch = sklearn.datasets.load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    tx, vx, ty, vy = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    return _from_arrays("digits", tx, ty, vx, vy, num_classes=10, source=str(source))


# Normalisation constants as the seed uses them (CIFAR-100 shares CIFAR-10's).
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))


def _cifar(name: str, title: str, folder: str, num_classes: int, data_dir: str | None) -> ImageData:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if num_classes == 10 else tvd.CIFAR100
    root = Path(data_dir or "data")
    splits = []
    for train in (True, False):
        ds = _torchvision_dataset(cls, root, train, title, folder)
        splits += [np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),  # NHWC -> NCHW
                   np.asarray(ds.targets, dtype=np.int64)]
    return _from_arrays(name, *splits, num_classes=num_classes, stats=CIFAR_STATS, classes=ds.classes,
                        augment="crop_flip", crop_padding=4, source=str(root / folder))


def load_cifar10(data_dir: str | None) -> ImageData:
    """CIFAR-10 through torchvision: read from ``data_dir`` when its files are there
    (the ``cifar-10-batches-py`` folder torchvision leaves), else downloaded into it.
    Random crop 32 with padding 4 and horizontal flip, as in the seed."""
    return _cifar("cifar10", "CIFAR-10", "cifar-10-batches-py", 10, data_dir)


def load_cifar100(data_dir: str | None) -> ImageData:
    """CIFAR-100 through torchvision (folder ``cifar-100-python``), like CIFAR-10."""
    return _cifar("cifar100", "CIFAR-100", "cifar-100-python", 100, data_dir)


def _mnist(name: str, cls_name: str, title: str, stats, data_dir: str | None) -> ImageData:
    from torchvision import datasets as tvd

    cls = getattr(tvd, cls_name)
    root = Path(data_dir or "data")
    _unpack_idx_archives(cls, root)
    splits = []
    for train in (True, False):
        ds = _torchvision_dataset(cls, root, train, title, f"{cls_name}/raw")
        splits += [ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)]  # (N, 1, 28, 28)
    return _from_arrays(name, *splits, num_classes=10, stats=stats, source=str(root / cls_name),
                        classes=cls.classes)


def _unpack_idx_archives(cls, root: Path) -> None:
    """If only the original ``*-ubyte.gz`` archives are there (in ``root`` or in torchvision's
    ``root/NAME/raw``), unpack them where torchvision reads them, instead of downloading."""
    raw = root / cls.__name__ / "raw"
    for url, _ in cls.resources:
        archive = Path(url).name
        target = raw / archive.removesuffix(".gz")
        found = next((d / archive for d in (raw, root) if (d / archive).is_file()), None)
        if target.exists() or found is None:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        try:
            with gzip.open(found) as src, open(str(target) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            raise TTKDError(f"cannot unpack {found} ({exc}); replace it with the original "
                            f"{archive}") from None
        os.replace(str(target) + ".part", target)


def load_mnist(data_dir: str | None) -> ImageData:
    """MNIST through torchvision (``data_dir/MNIST/raw``, or just the four .gz archives)."""
    return _mnist("mnist", "MNIST", "MNIST", MNIST_STATS, data_dir)


def load_fashion_mnist(data_dir: str | None) -> ImageData:
    """Fashion-MNIST through torchvision (``data_dir/FashionMNIST/raw``, or the .gz archives)."""
    return _mnist("fashion-mnist", "FashionMNIST", "Fashion-MNIST", FASHION_STATS, data_dir)


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_LAYOUT = ("train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt "
               "(the layout of tiny-imagenet-200.zip)")


def load_tiny_imagenet(data_dir: str | None, stream: bool | None = None) -> ImageData:
    """Tiny-ImageNet (200 classes, 64x64) in its distributed layout, under ``data_dir`` or
    ``data_dir/tiny-imagenet-200``; downloaded into ``data_dir`` if absent. Random
    rotation of 20° and horizontal flip, as in the seed. ``stream``: leave the images on
    disk (True), decode them into memory (False), or decide by size (None)."""
    root = Path(data_dir or "data")
    base = root if (root / "train").is_dir() else root / "tiny-imagenet-200"
    if not base.is_dir():
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(TINY_URL, download_root=str(root))
        except Exception as exc:
            raise TTKDError(f"Tiny-ImageNet is not in {base} and could not be downloaded ({exc}); "
                            f"unpack tiny-imagenet-200.zip into data_dir") from None
    train_dir, val_dir = base / "train", base / "val"
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    annotations = val_dir / "val_annotations.txt"
    if not wnids or not annotations.is_file():
        raise TTKDError(f"{base} is not a Tiny-ImageNet folder: expected {TINY_LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    train = [(f, index[w]) for w in wnids for f in sorted((train_dir / w / "images").glob("*.JPEG"))]
    val = []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise TTKDError(f"{annotations} line {n} is not 'FILE<TAB>WNID<TAB>...' with a wnid "
                            f"that has a train folder: {line[:80]!r}")
        val.append((val_dir / "images" / fields[0], index[fields[1]]))
    if not train:
        raise TTKDError(f"{train_dir} holds no images: expected {TINY_LAYOUT}")
    stream = _should_stream(stream, len(train) + len(val), (64, 64), 3)
    tx, ty = _split(train, (64, 64), "RGB", stream)
    vx, vy = _split(val, (64, 64), "RGB", stream)
    return _from_arrays("tiny-imagenet", tx, ty, vx, vy, num_classes=len(wnids), stats=TINY_STATS,
                        classes=wnids, augment="rotate_flip", rotation=20.0, source=str(base))


IMAGEFOLDER_LAYOUT = "DATA_DIR/train/<class>/<image> and DATA_DIR/val/<class>/<image>"


def load_imagefolder(data_dir: str | None, stream: bool | None = None) -> ImageData:
    """Any folder of images in ``train/<class>/…`` and ``val/<class>/…``.

    Classes are the train sub-folders, sorted. The image size is the first training
    image's (others are resized to it); images are grayscale (1 channel) if all of them
    are, else RGB. Normalised with the training split's statistics (from a fixed sample
    of 5,000 images when left on disk); random crop with size/8 padding and horizontal
    flip, as for CIFAR. ``stream``: leave the images on disk (True), decode them into
    memory (False), or decide by size (None: on disk beyond a quarter of the RAM).
    """
    from torchvision.datasets import ImageFolder

    if not data_dir:
        raise TTKDError(f"dataset imagefolder needs data_dir: a folder with {IMAGEFOLDER_LAYOUT}")
    root = Path(data_dir)
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = ImageFolder(str(root / split))
        except (FileNotFoundError, OSError) as exc:
            raise TTKDError(f"{root / split}: {exc}; expected {IMAGEFOLDER_LAYOUT}") from None
    classes = splits["train"].classes
    unknown = sorted(set(splits["val"].classes) - set(classes))
    if unknown:
        raise TTKDError(f"{root / 'val'} has classes with no train folder: {', '.join(unknown)}")
    # size from the first image; grayscale only if the first 64 all are
    infos = [_image_info(path) for path, _ in splits["train"].samples[:64]]
    size, modes = infos[0][0], {mode for _, mode in infos}
    color = "L" if modes <= {"L", "1"} else "RGB"
    val_index = {i: classes.index(c) for i, c in enumerate(splits["val"].classes)}
    count = len(splits["train"].samples) + len(splits["val"].samples)
    stream = _should_stream(stream, count, size, 1 if color == "L" else 3)
    tx, ty = _split(splits["train"].samples, size, color, stream)
    vx, vy = _split([(p, val_index[y]) for p, y in splits["val"].samples], size, color, stream)
    return _from_arrays("imagefolder", tx, ty, vx, vy, num_classes=len(classes), classes=classes,
                        augment="crop_flip", crop_padding=max(1, size[0] // 8), source=str(root))


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


SYNTHETIC = re.compile(r"synthetic(?:-(\d+)x(\d+)x(\d+)-(\d+))?")
SYNTHETIC_SIZES = (50_000, 10_000)  # train, val: CIFAR's
SYNTHETIC_MAX_PIXELS = 3 * 64 * 64  # values per image (Tiny-ImageNet's): 60,000 of them are 737 MB
SYNTHETIC_MAX_CLASSES = 100_000


def synthetic_shape(name: str) -> tuple[int, int, int, int] | None:
    """``(C, H, W, K)`` of a synthetic data set's name, None if the name is not one or its
    size is out of bounds (C·H·W from 1 to SYNTHETIC_MAX_PIXELS, K from 2 to SYNTHETIC_MAX_CLASSES)."""
    match = SYNTHETIC.fullmatch(name)
    if match is None:
        return None
    c, h, w, k = (int(g) for g in match.groups()) if match.group(1) else (3, 32, 32, 10)
    ok = min(c, h, w) >= 1 and c * h * w <= SYNTHETIC_MAX_PIXELS and 2 <= k <= SYNTHETIC_MAX_CLASSES
    return (c, h, w, k) if ok else None


def load_synthetic(name: str = "synthetic") -> ImageData:
    """Random uint8 images and labels for benchmarks, always the same (fixed seed):
    ``synthetic`` is CIFAR-shaped (3x32x32, 10 classes, 50,000 + 10,000 images);
    ``synthetic-CxHxW-K`` chooses the image shape and class count. Augmented like CIFAR."""
    shape = synthetic_shape(name)
    if shape is None:
        raise TTKDError(f"invalid synthetic data set {name!r}; use synthetic-CxHxW-K with C·H·W at most "
                        f"{SYNTHETIC_MAX_PIXELS:,} (3x64x64) and K from 2 to {SYNTHETIC_MAX_CLASSES:,}")
    c, h, w, k = shape
    g = torch.Generator().manual_seed(SPLIT_SEED)
    n_train, n_val = SYNTHETIC_SIZES
    x = torch.randint(0, 256, (n_train + n_val, c, h, w), generator=g, dtype=torch.uint8)
    y = torch.randint(0, k, (n_train + n_val,), generator=g)
    return ImageData(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], k, (0.5,) * c,
                     (0.289,) * c, augment="crop_flip", crop_padding=max(1, h // 8), source=".")


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


def _torchvision_dataset(cls, root: Path, train: bool, title: str, folder: str):
    """Open a torchvision data set from ``root``, downloading it only if it is not there."""
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        pass  # not there (or damaged): fetch it
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as exc:  # no network, full disk, bad archive...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TTKDError(
            f"{title} is not in {root / folder} and could not be downloaded ({first}); "
            f"download it once on a machine with internet and pass its parent folder as data_dir"
        ) from None


def _from_arrays(name, tx, ty, vx, vy, *, num_classes, source, stats=None, classes=(), **augment) -> ImageData:
    """Wrap numpy splits (or :class:`ImageFiles`); ``stats`` = (mean, std) per channel,
    else the training split's (of a fixed sample of 5,000 images if it is on disk)."""
    def images(a):
        return a if isinstance(a, ImageFiles) else torch.from_numpy(np.ascontiguousarray(a))

    train_x = images(tx)
    if stats is None:
        sample = train_x
        if isinstance(train_x, ImageFiles):
            pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))[:5000]
            sample = torch.stack([train_x[int(i)] for i in pick])
        scaled = sample.double().div_(255)
        stats = (tuple(scaled.mean(dim=(0, 2, 3)).tolist()), tuple(scaled.std(dim=(0, 2, 3)).tolist()))
    return ImageData(name, train_x, torch.from_numpy(np.asarray(ty)), images(vx),
                     torch.from_numpy(np.asarray(vy)), num_classes, tuple(stats[0]), tuple(stats[1]),
                     source=source, classes=tuple(map(str, classes)), **augment)


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
