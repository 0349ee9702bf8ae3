import dataclasses
import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.transforms.functional as TF
from torchvision.datasets import CIFAR10

from ttkd import data
from ttkd.errors import TTKDError


def test_digits_split_is_fixed_stratified_and_uint8():
    a, b = data.load("digits"), data.load("digits")
    assert a.digest() == b.digest()
    assert a.train_x.dtype == torch.uint8 and a.image_shape == (1, 8, 8)
    assert len(a.train_y) + len(a.val_y) == 1797 and len(a.val_y) == 360
    assert int(a.train_x.max()) == 255
    train_share = torch.bincount(a.train_y) / len(a.train_y)
    val_share = torch.bincount(a.val_y) / len(a.val_y)
    assert torch.allclose(train_share, val_share, atol=0.01)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(TTKDError, match="unknown dataset 'imagenet'.*cifar10.*digits"):
        data.load("imagenet")


def test_batches_cover_the_split_once_normalised():
    d = data.load("digits")
    seen = torch.cat([y for _, y in data.batches(d, "train", 100, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(d.train_y.tolist())
    x = torch.cat([x for x, _ in data.batches(d, "train", 100, generator=torch.Generator())])
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0, abs=1e-3) and x.std().item() == pytest.approx(1, abs=1e-2)
    val = list(data.batches(d, "val", 64))
    assert torch.equal(torch.cat([y for _, y in val]), d.val_y) and len(val[-1][1]) == 360 % 64


def test_shuffle_is_fixed_by_the_generator():
    d = data.load("digits")
    first = [y for _, y in data.batches(d, "train", 64, generator=torch.Generator().manual_seed(3))]
    again = [y for _, y in data.batches(d, "train", 64, generator=torch.Generator().manual_seed(3))]
    other = [y for _, y in data.batches(d, "train", 64, generator=torch.Generator().manual_seed(4))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_random_crop_flip_matches_per_image_definition():
    """Every output is some torchvision crop-after-padding, optionally flipped, and
    over many draws every one of the (2p+1)² · 2 possibilities appears."""
    pad, side = 1, 4
    image = torch.arange(3 * side * side, dtype=torch.uint8).view(1, 3, side, side)
    padded = TF.pad(image, [pad] * 4)
    allowed = set()
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = TF.crop(padded, top, left, side, side)
            allowed |= {crop.numpy().tobytes(), TF.hflip(crop).numpy().tobytes()}
    assert len(allowed) == (2 * pad + 1) ** 2 * 2
    out = data.random_crop_flip(image.expand(400, -1, -1, -1), pad, torch.Generator().manual_seed(0))
    assert out.shape == (400, 3, side, side) and out.dtype == torch.uint8
    produced = {o.numpy().tobytes() for o in out}
    assert produced == allowed


def write_cifar10(root, n_train=20, n_test=10):
    """CIFAR-10's python layout: pickled dicts of uint8 rows (R plane, G plane, B plane)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    written = {}
    for name, n in batches.items():
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)
        written[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path)
    # generated files cannot match the published MD5 sums: skip exactly that check
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    d = data.load("cifar10", str(tmp_path))
    assert d.image_shape == (3, 32, 32) and d.num_classes == 10 and d.crop_padding == 4
    assert len(d.train_y) == 20 and len(d.val_y) == 10
    rows, labels = written["data_batch_1"]
    assert torch.equal(d.train_x[0], torch.from_numpy(rows[0].reshape(3, 32, 32)))
    assert d.train_y[:4].tolist() == labels
    assert torch.equal(d.val_x[-1], torch.from_numpy(written["test_batch"][0][-1].reshape(3, 32, 32)))


def test_cifar10_missing_and_offline_says_what_to_do(tmp_path, monkeypatch):
    def offline(self):
        raise OSError("network unreachable")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(TTKDError, match=r"CIFAR-10 is not in .*cifar-10-batches-py.*network unreachable.*data_dir"):
        data.load("cifar10", str(tmp_path / "nothing"))


def test_random_rotate_flip_matches_torchvision_per_image():
    """Same angles and flips as drawn from the generator, the batch result equals
    torchvision's rotate (nearest, zero fill) then hflip, image by image."""
    from torchvision.transforms import InterpolationMode
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data.random_rotate_flip(image.expand(6, -1, -1, -1), 20, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    angles = (torch.rand(6, generator=g) * 2 - 1) * 20
    flips = torch.rand(6, generator=g) < 0.5
    assert angles.abs().max() <= 20 and flips.any() and not flips.all()
    for i in range(6):
        expected = TF.rotate(image[0], angles[i].item(), interpolation=InterpolationMode.NEAREST)
        expected = TF.hflip(expected) if flips[i] else expected
        assert torch.equal(out[i], expected)


def write_cifar100(root, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist(),
                         "coarse_labels": rng.integers(0, 20, n).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


def test_cifar100_reads_torchvision_layout(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    d = data.load("cifar100", str(tmp_path))
    assert d.num_classes == 100 and d.image_shape == (3, 32, 32) and len(d.train_y) == 12
    assert d.augment == "crop_flip" and d.mean == data.CIFAR_STATS[0]


def write_idx(folder, prefix, images, labels, gz=False):
    """MNIST's IDX files: big-endian magic, sizes, then the uint8 payload."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    blobs = {f"{prefix}-images-idx3-ubyte": np.array([2051, n, h, w], ">i4").tobytes() + images.tobytes(),
             f"{prefix}-labels-idx1-ubyte": np.array([2049, n], ">i4").tobytes() + labels.tobytes()}
    for name, blob in blobs.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            (folder / name).write_bytes(blob)


def make_idx_set(folder, gz):
    rng = np.random.default_rng(2)
    split = {}
    for prefix, n in (("train", 10), ("t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder, prefix, images, labels, gz)
        split[prefix] = (images, labels)
    return split


@pytest.mark.parametrize("name, cls_folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_reads_raw_idx_files(tmp_path, name, cls_folder):
    split = make_idx_set(tmp_path / cls_folder / "raw", gz=False)
    d = data.load(name, str(tmp_path))
    assert d.image_shape == (1, 28, 28) and len(d.train_y) == 10 and len(d.val_y) == 5
    assert torch.equal(d.train_x[3, 0], torch.from_numpy(split["train"][0][3]))
    assert d.val_y.tolist() == split["t10k"][1].tolist()


def test_mnist_reads_only_the_gz_archives(tmp_path):
    split = make_idx_set(tmp_path, gz=True)  # just the four .gz files in data_dir
    d = data.load("mnist", str(tmp_path))
    assert torch.equal(d.val_x[4, 0], torch.from_numpy(split["t10k"][0][4]))


def test_corrupt_gz_archive_is_named(tmp_path):
    make_idx_set(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(TTKDError, match="cannot unpack .*train-images-idx3-ubyte.gz"):
        data.load("mnist", str(tmp_path))


def write_image(path, size, color, value):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGB" if color else "L"
    fill = (value, 255 - value, value // 2) if color else value
    Image.new(mode, size, fill).save(path)


def make_tiny_imagenet(root, wnids=("n01", "n02", "n03"), per_class=2):
    base = root / "tiny-imagenet-200"
    for i, w in enumerate(wnids):
        for j in range(per_class):
            write_image(base / "train" / w / "images" / f"{w}_{j}.JPEG", (64, 64), True, 40 * i + j)
    lines = []
    for k, w in enumerate(wnids):
        write_image(base / "val" / "images" / f"val_{k}.JPEG", (64, 64), True, 40 * k)
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return base


def test_tiny_imagenet_reads_its_distributed_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    d = data.load("tiny-imagenet", str(tmp_path))
    assert d.num_classes == 3 and d.image_shape == (3, 64, 64)
    assert len(d.train_y) == 6 and d.val_y.tolist() == [0, 1, 2]
    assert d.augment == "rotate_flip" and d.rotation == 20 and d.mean == data.TINY_STATS[0]
    assert abs(int(d.val_x[1, 0].float().mean()) - 40) <= 2  # JPEG keeps a flat colour


def test_tiny_imagenet_bad_annotation_names_the_line(tmp_path):
    base = make_tiny_imagenet(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(TTKDError, match="val_annotations.txt line 1 .*n99"):
        data.load("tiny-imagenet", str(tmp_path))


def make_imagefolder(root, classes=("cat", "dog"), size=(12, 12), color=True):
    for split, n in (("train", 3), ("val", 2)):
        for i, c in enumerate(classes):
            for j in range(n):
                write_image(root / split / c / f"{j}.png", size, color, 100 * i + j)


def test_imagefolder_takes_classes_size_and_channels_from_the_data(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b", "c"), size=(12, 10), color=False)
    (tmp_path / "train" / "a" / "big.png").unlink(missing_ok=True)
    write_image(tmp_path / "train" / "b" / "odd.png", (20, 20), False, 7)  # resized to 12x10
    d = data.load("imagefolder", str(tmp_path))
    assert d.num_classes == 3 and d.image_shape == (1, 10, 12)
    assert len(d.train_y) == 10 and d.train_y.tolist().count(1) == 4
    assert d.val_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.augment == "crop_flip" and d.crop_padding == 1


def test_imagefolder_rgb_and_val_subset(tmp_path):
    make_imagefolder(tmp_path, classes=("x", "y"))
    import shutil
    shutil.rmtree(tmp_path / "val" / "x")
    d = data.load("imagefolder", str(tmp_path))
    assert d.image_shape == (3, 12, 12) and d.val_y.tolist() == [1, 1]  # 'y' keeps its train index


@pytest.mark.parametrize("make, message", [
    (lambda root: None, r"train.*expected DATA_DIR/train/<class>/<image> and DATA_DIR/val/<class>/<image>"),
    (lambda root: (root / "train").mkdir(parents=True), r"Couldn't find any class folder"),
    (lambda root: make_imagefolder(root) or (root / "val" / "bird").mkdir() or
     write_image(root / "val" / "bird" / "0.png", (12, 12), True, 1), r"classes with no train folder: bird"),
    (lambda root: make_imagefolder(root) or (root / "train" / "cat" / "9.png").write_bytes(b"xx"),
     r"cannot read image .*9.png"),
])
def test_bad_image_folders_say_what_was_expected(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(TTKDError, match=message):
        data.load("imagefolder", str(tmp_path))


def assert_same_batches(a, b, split, augment_seed=3):
    ga, gb = torch.Generator().manual_seed(augment_seed), torch.Generator().manual_seed(augment_seed)
    pairs = list(zip(data.batches(a, split, 4, generator=ga), data.batches(b, split, 4, generator=gb)))
    assert len(pairs) == -(-len(a.train_y if split == "train" else a.val_y) // 4)
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_image_folder_gives_the_same_batches_as_in_memory(tmp_path, workers):
    make_imagefolder(tmp_path, classes=("a", "b", "c"), size=(12, 12))
    write_image(tmp_path / "train" / "b" / "odd.png", (20, 20), True, 7)  # resized on the fly too
    memory = data.load("imagefolder", str(tmp_path), stream=False)
    disk = data.load("imagefolder", str(tmp_path), stream=True)
    assert not memory.streamed and disk.streamed
    disk = dataclasses.replace(disk, train_x=data.ImageFiles(disk.train_x.paths, (12, 12), "RGB", workers))
    assert disk.image_shape == memory.image_shape and disk.in_channels == 3
    assert torch.equal(disk.val_x[:3], memory.val_x[:3])
    assert disk.mean == pytest.approx(memory.mean) and disk.std == pytest.approx(memory.std)
    for split in ("train", "val"):
        assert_same_batches(memory, disk, split)
    assert disk.digest() != memory.digest() and disk.digest() == data.load("imagefolder", str(tmp_path),
                                                                           stream=True).digest()


def test_streamed_tiny_imagenet_rotates_like_in_memory(tmp_path):
    make_tiny_imagenet(tmp_path)
    memory = data.load("tiny-imagenet", str(tmp_path), stream=False)
    disk = data.load("tiny-imagenet", str(tmp_path), stream=True)
    assert disk.streamed and disk.mean == memory.mean
    assert_same_batches(memory, disk, "train")


def test_stream_auto_keeps_folders_on_disk_only_when_they_would_not_fit(tmp_path, monkeypatch):
    make_imagefolder(tmp_path)  # 10 images of 3x12x12 = 4,320 bytes decoded
    monkeypatch.setattr(data.files, "physical_memory", lambda: 4 * 4320)
    assert not data.load("imagefolder", str(tmp_path)).streamed
    monkeypatch.setattr(data.files, "physical_memory", lambda: 4 * 4320 - 4)
    assert data.load("imagefolder", str(tmp_path)).streamed


def test_stream_is_refused_for_data_sets_held_in_memory():
    with pytest.raises(TTKDError, match="dataset digits is always held in memory; stream=true applies to"):
        data.load("digits", stream=True)


def test_unreadable_file_in_a_streamed_folder_is_named_when_reached(tmp_path):
    make_imagefolder(tmp_path)
    d = data.load("imagefolder", str(tmp_path), stream=True)
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")  # damaged after loading
    d = dataclasses.replace(d, train_x=data.ImageFiles(d.train_x.paths, (12, 12), "RGB", workers=1))
    with pytest.raises(TTKDError) as caught:
        list(data.batches(d, "train", 4, generator=torch.Generator().manual_seed(0)))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot read image ") and "1.png" in message


def test_missing_tiny_imagenet_offline(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(TTKDError, match="Tiny-ImageNet is not in .*network unreachable"):
        data.load("tiny-imagenet", str(tmp_path / "none"))
    (tmp_path / "empty" / "tiny-imagenet-200").mkdir(parents=True)
    with pytest.raises(TTKDError, match="is not a Tiny-ImageNet folder: expected train/<wnid>"):
        data.load("tiny-imagenet", str(tmp_path / "empty"))


def test_channels_last_batches_hold_the_same_values():
    d = data.load("digits")
    plain = next(data.batches(d, "val", 32))[0]
    cl = next(data.batches(d, "val", 32, channels_last=True))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, cl)
    expected = (d.val_x[:32].float() / 255 - d.mean[0]) / d.std[0]
    assert torch.allclose(plain, expected, atol=1e-5)


def test_synthetic_data_is_fixed_and_shaped_as_asked():
    a, b = data.load("synthetic-1x16x16-5"), data.load("synthetic-1x16x16-5")
    assert a.image_shape == (1, 16, 16) and a.num_classes == 5 and torch.equal(a.train_x, b.train_x)
    assert int(a.train_y.max()) == 4
    cifar_like = data.load("synthetic")
    assert cifar_like.image_shape == (3, 32, 32) and len(cifar_like.train_y) == 50_000
    with pytest.raises(TTKDError, match="unknown dataset 'synthetic-3x32'"):
        data.load("synthetic-3x32")


def test_load_once_decodes_each_data_set_once_inside_the_block(tmp_path, monkeypatch):
    make_imagefolder(tmp_path)
    decoded = []
    real = data.LOADERS["imagefolder"]
    monkeypatch.setitem(data.LOADERS, "imagefolder", lambda *a: decoded.append(a) or real(*a))
    with data.load_once():
        first = data.load("imagefolder", str(tmp_path))
        with data.load_once():  # a nested block shares the outer one's copies
            assert data.load("imagefolder", str(tmp_path / "train" / "..")) is first  # same folder
        on_disk = data.load("imagefolder", str(tmp_path), stream=True)  # other arguments: loaded
        assert on_disk.streamed and not first.streamed
        assert data.load("imagefolder", str(tmp_path), stream=True) is on_disk
        assert len(decoded) == 2
    again = data.load("imagefolder", str(tmp_path))  # outside the block: read afresh
    assert again is not first and len(decoded) == 3
    assert torch.equal(again.train_x, first.train_x)
