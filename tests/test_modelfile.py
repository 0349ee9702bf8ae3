"""A registered model's files: the record is checked field by field, the weights against the
network it describes, and the served ONNX network answers as the torch network does."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from ttkd import data, modelfile, models, serving


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    digits = data.load("digits")
    net = models.build("cnn", digits.num_classes, digits.in_channels, image_size=8).eval()
    modelfile.write(net, "cnn", digits, "d1g3st", folder)
    (folder / "artifacts").mkdir()
    for name in ("network.json", "weights.safetensors", "network.onnx"):
        (folder / name).rename(folder / "artifacts" / name)
    return folder, net


def test_the_network_is_rebuilt_from_the_record_and_weights_and_the_onnx_one_agrees(written):
    folder, net = written
    rebuilt, record = modelfile.build(folder, "model m")
    assert (record.arch, record.image_shape, record.classes[:2], record.train_digest) == ("cnn", (1, 8, 8),
                                                                                           ("0", "1"), "d1g3st")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
        served = serving.load_network(str(folder / modelfile.NETWORK), (1, 8, 8), 10)
        assert np.allclose(served(x.numpy()), net(x).numpy(), atol=1e-5)
    with pytest.raises(serving.UnsafeModelFile, match=r"network.onnx does not take 3x8x8 images and answer 10"):
        serving.load_network(str(folder / modelfile.NETWORK), (3, 8, 8), 10)


def record_with(written, change) -> bytes:
    folder, _ = written
    raw = json.loads((folder / modelfile.RECORD).read_text())
    change(raw)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("change, why", [
    (lambda r: r.update(arch="__import__('os')"), "names architecture \"__import__('os')\", which this ttkd"),
    (lambda r: r.update(num_classes=10**9), "has num_classes 1000000000, not an integer from 1 to 100000"),
    (lambda r: r.update(num_classes=True), "has num_classes True"),
    (lambda r: r.update(image_shape=[1, 8]), "has image_shape [1, 8], not [C, H, W] of positive integers"),
    (lambda r: r.update(classes=r["classes"][:9]), "does not name one class per class (10)"),
    (lambda r: r.update(mean=[float("nan")]), "holds NaN, which is not a number"),
    (lambda r: r.update(std=[0.0]), "has a std that is not > 0"),
    (lambda r: r.update(extra=1), "does not have the fields of a record"),
    (lambda r: r.update(format=2), "is of format 2, not 1"),
    (lambda r: r["tensors"].update({"head.weight": {"shape": [-1], "dtype": "float32"}}), "describes tensor 'head"),
    (lambda r: r["tensors"].update({"head.weight": {"shape": [10, 64], "dtype": "object"}}), "describes tensor 'head"),
])
def test_a_record_that_ttkd_did_not_write_is_refused_naming_the_field(written, change, why):
    with pytest.raises(modelfile.BadModelFile) as exc:
        modelfile.parse_record(record_with(written, change), "model m")
    assert why in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_weights_that_do_not_fit_the_record_are_refused_before_they_are_read(written, tmp_path):
    folder, net = written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "artifacts").mkdir()
    (bad / modelfile.RECORD).write_bytes((folder / modelfile.RECORD).read_bytes())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["extra"] = torch.zeros(3)
    safetensors.torch.save_file(state, bad / modelfile.WEIGHTS)
    with pytest.raises(modelfile.BadModelFile, match=r"does not hold the tensors of a cnn \('extra' is not one of"):
        modelfile.build(bad, "model m")
    (bad / modelfile.RECORD).write_bytes(record_with(written, lambda r: r.update(arch="mlp")))
    with pytest.raises(modelfile.BadModelFile, match=r"describes tensors that a mlp for 10 classes and images of"):
        modelfile.build(bad, "model m")


@pytest.mark.parametrize("arch", models.names())
def test_every_architecture_exports_to_an_onnx_network_that_answers_like_it(arch, tmp_path):
    net = models.build(arch, 10, 3, image_size=32).eval()
    path = tmp_path / "network.onnx"
    modelfile.export_onnx(net, (3, 32, 32), path)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = net(x).numpy()
    got = serving.load_network(str(path), (3, 32, 32), 10)(x.numpy())
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(expected).max()))
