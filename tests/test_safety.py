"""Model files that try to run code, partners trained on other data: refused in one line."""

import io
import json
import os
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.test_data import write_image
from ttkd import data, models, serving, tracking


class Payload:
    """Unpickled in full, this creates the file ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def pickled_payload(path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": Payload(path)}, buffer)  # torch's zip format around a pickle that runs code
    return buffer.getvalue()


def rewrite_zip(file: Path, replace: dict[str, bytes]) -> None:
    """Rewrite the zip ``file`` with the parts named (after the archive's root folder) replaced or added."""
    with zipfile.ZipFile(file) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    root = items[0][0].filename.split("/", 1)[0]
    with zipfile.ZipFile(file, "w") as z:
        for info, content in items:
            z.writestr(info, replace.pop(info.filename.split("/", 1)[1], content))
        for name, content in replace.items():
            z.writestr(f"{root}/{name}", content)


def model_folder(name: str, version: str = "1") -> Path:
    """Where the artifact store keeps the files of a registered version (a local store)."""
    client = MlflowClient()
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    return Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))


@pytest.fixture()
def victim(store, cli):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "victim")
    assert status == 0, err
    return model_folder("victim")


def test_a_model_file_carrying_a_pickle_payload_runs_nothing_anywhere(victim, cli, tmp_path):
    proof = tmp_path / "payload-ran"
    network = victim / "artifacts" / "network.pt2"
    rewrite_zip(network, {"data/sample_inputs/model.pt": pickled_payload(proof)})

    # the stages and predict: the changed file is not the registered one
    for args in (("teach", "--student", "victim", "--epochs", "1"),
                 ("distill", "--teacher", "victim", "--epochs", "1"),
                 ("predict", "--model", "victim", "--images", str(tmp_path))):
        status, _, err = cli(*args)
        assert status == 1 and err.count("\n") == 1, err
        assert "models:/victim/1: its file artifacts/network.pt2 is not the one registered" in err, err
    # the served model (MLflow runs the model's own serving.py, which reads the network safely)
    with pytest.raises(Exception, match=r"network.pt2 holds a pickled object \(posix.system\) that only the full"):
        mlflow.pyfunc.load_model("models:/victim/1")
    # with the registry's digest rewritten to match (an attacker who can write both),
    # predict still unpickles nothing
    digests = tracking.file_digests({"artifacts/network.pt2": network, "artifacts/weights.safetensors":
                                     victim / "artifacts" / "weights.safetensors", "serving.py": victim / "serving.py"})
    MlflowClient().set_model_version_tag("victim", "1", tracking.TAG_DIGESTS, json.dumps(digests))
    status, _, err = cli("predict", "--model", "victim", "--images", str(tmp_path))
    assert status == 1 and "model models:/victim/1: network.pt2 holds a pickled object (posix.system)" in err, err
    assert not proof.exists()
    assert len(mlflow.search_runs(["0"])) == 1  # nothing opened a run


def test_the_network_loader_takes_only_the_parts_ttkd_writes(tmp_path):
    net = models.build("cnn", 10, 1, image_size=8).eval()
    program = torch.export.export(net, (torch.zeros(2, 1, 8, 8),))
    good = tmp_path / "network.pt2"
    torch.export.save(program, good)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(serving.load_network(str(good))(x), net(x))
    proof = tmp_path / "payload-ran"
    cases = {  # name -> (parts to replace or add, the refusal)
        "compiled library": ({"data/aotinductor/model/model.so": b"\x7fELF"}, "(data/aotinductor/model/model.so)"),
        "opaque object": ({"data/constants/opaque_obj_0": pickled_payload(proof)}, "(data/constants/opaque_obj_0)"),
        "pickled weight": ({"data/weights/model_weights_config.json": json.dumps({"config": {"w": {
            "path_name": "weight_0", "is_param": True, "use_pickle": True, "tensor_meta": None}}}).encode()},
            "(data/weights/model_weights_config.json: w)"),
        "payload in the example inputs": ({"data/sample_inputs/model.pt": pickled_payload(proof)},
                                          "holds a pickled object (posix.system)"),
    }
    for name, (parts, refusal) in cases.items():
        bad = tmp_path / f"{name}.pt2"
        bad.write_bytes(good.read_bytes())
        rewrite_zip(bad, dict(parts))
        with pytest.raises(serving.UnsafeModelFile) as exc:
            serving.load_network(str(bad))
        assert refusal in str(exc.value) and "\n" not in str(exc.value), (name, exc.value)
    not_a_zip = tmp_path / "plain.pt2"
    not_a_zip.write_bytes(b"not an archive")
    with pytest.raises(serving.UnsafeModelFile, match="plain.pt2 is not a torch.export archive"):
        serving.load_network(str(not_a_zip))
    assert not proof.exists()


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_on_resume(store, cli, tmp_path, monkeypatch):
    from tests.test_resume import poison
    from ttkd.kd.logits import CrossEntropy
    poison(monkeypatch, CrossEntropy)
    cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false")  # fails in epoch 2, leaving epoch 1's checkpoint
    run = mlflow.search_runs(output_format="list")[0]
    proof = tmp_path / "payload-ran"
    (Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "last.pt").write_bytes(pickled_payload(proof))
    status, _, err = cli("baseline", "--resume", run.info.run_id)
    assert status == 1 and err.count("\n") == 1
    assert (f"checkpoint last.pt of run {run.info.run_id} is damaged or not a ttkd checkpoint (it holds a "
            f"pickled posix.system, which only the full unpickler would load)") in err
    assert not proof.exists()


def make_folder(root: Path, classes, shift: int = 0) -> str:
    for split, n in (("train", 4), ("val", 2)):
        for i, c in enumerate(classes):
            for j in range(n):
                write_image(root / split / c / f"{j}.png", (8, 8), False, (40 * i + 7 * j + shift) % 256)
    return str(root)


def test_a_partner_trained_on_other_data_is_refused_unless_asked_for(store, cli, tmp_path):
    # another data set of the same shape and class count as digits
    status, _, err = cli("baseline", "--dataset", "synthetic-1x8x8-10", "--epochs", "1", "--register_as", "syn")
    assert status == 0, err
    for stage, role in (("distill", "teacher"), ("teach", "student")):
        status, _, err = cli(stage, f"--{role}", "syn", "--epochs", "1")
        assert status == 1 and err.count("\n") == 1
        assert (f"{role} models:/syn/1 was trained on synthetic-1x8x8-10 (classes 0..9, digest ") in err
        assert f"this stage trains on digits (digest {tracking.training_digest(data.load('digits'))[:8]}); " \
               f"pick a {role} trained on digits, or pass partner_data=any to distil across data sets" in err
    assert len(mlflow.search_runs(["0"])) == 1  # refused before any run opened
    status, out, err = cli("distill", "--teacher", "syn", "--epochs", "1", "--partner_data", "any",
                           "--register_as", "across")
    assert status == 0, err
    assert "partner_data=any: teacher models:/syn/1 was trained on synthetic-1x8x8-10" in out
    version = MlflowClient().get_model_version("across", "1")
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["ttkd.partner_data"] == version.tags["ttkd.partner_data"] == "foreign"
    assert run.data.params["partner_data"] == "any"

    # image folders: another folder with the same classes, and the same folder with classes renamed
    first = make_folder(tmp_path / "a", ("cat", "dog", "emu"))
    other = make_folder(tmp_path / "b", ("cat", "dog", "emu"), shift=3)
    renamed = make_folder(tmp_path / "c", ("ant", "bee", "cow"))
    status, _, err = cli("baseline", "--dataset", "imagefolder", "--data_dir", first, "--epochs", "1",
                         "--batch_size", "4", "--register_as", "folder-a")
    assert status == 0, err
    for folder, why in ((other, "(classes cat, dog, emu, digest "),
                        (renamed, "(classes cat, dog, emu; here ant, bee, cow, digest ")):
        status, _, err = cli("teach", "--student", "folder-a", "--dataset", "imagefolder", "--data_dir", folder,
                             "--epochs", "1", "--batch_size", "4")
        assert status == 1 and "student models:/folder-a/1 was trained on imagefolder " + why in err, err
    status, _, err = cli("teach", "--student", "folder-a", "--dataset", "imagefolder", "--data_dir", first,
                         "--epochs", "1", "--batch_size", "4")
    assert status == 0, err  # its own folder


def test_the_same_classes_in_another_order_are_named_as_such():
    digits = data.load("digits")
    meta = {"dataset": "digits", "classes": [str(i) for i in (1, 0, *range(2, 10))],
            "train_digest": tracking.training_digest(digits)}
    foreign, unchecked = tracking.task_difference("teacher models:/t/1", meta, None, digits)
    assert unchecked is None
    assert foreign.startswith("teacher models:/t/1 was trained on digits (the same classes in another order "
                              "(1, 0, 2, 3, 4, 5, … (10 in all); here 0..9), digest ")


def test_a_partner_registered_without_a_record_of_its_data_gets_a_warning_and_serves(store, cli):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "old")
    assert status == 0, err
    folder = model_folder("old")  # as an older ttkd registered it: no data record, weights in the checkpoint only
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    for key in ("dataset", "train_digest", "files", "arch"):
        mlmodel["metadata"].pop(key)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (folder / "artifacts" / "weights.safetensors").unlink()
    status, out, err = cli("distill", "--teacher", "old", "--epochs", "1")
    assert status == 0, err
    assert "warning: teacher models:/old/1 was registered without a record of its training data; " \
           "it could not be checked" in err
    assert "teacher models:/old/1: val_acc" in out

    # its run's checkpoint damaged: the message names the model, the run and the whole reason
    run_id = MlflowClient().get_model_version("old", "1").run_id
    checkpoint = Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    status, _, err = cli("distill", "--teacher", "old", "--epochs", "1")
    assert status == 1 and err.count("\n") == 1, err
    refusal = err.strip()
    assert f"checkpoint last.pt of teacher models:/old/1 (run {run_id}) is damaged or not a ttkd checkpoint (" in refusal
    assert refusal.endswith("); register that model again from a run whose checkpoint is whole, or use another teacher")
