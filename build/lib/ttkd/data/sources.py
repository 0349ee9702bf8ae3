"""The data sets ttkd reads: each a loader ``(data_dir) -> ImageData`` (a folder of image
files also takes ``stream``), listed in ``ttkd.data.LOADERS``."""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ttkd.data.files import ImageFiles, _image_info, _should_stream, _split
from ttkd.data.record import SPLIT_SEED, ImageData
from ttkd.errors import TTKDError


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
