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
