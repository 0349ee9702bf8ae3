"""Model files that try to run code, partners trained on other data: refused in one line."""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.test_data import write_image
from ttkd import data, models, tracking
from ttkd.errors import TTKDError
from ttkd.tracking import modelstore


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


@pytest.fixture(scope="module")
def registry_with_victim(tmp_path_factory):
    """One store for the attacks: ``victim`` (the model attacked, its costs untagged so that
    promote measure=true reads it) and ``other`` (an mlp trained otherwise, whose files an
    attacker swaps in). Each attack puts the victim's files and tags back afterwards."""
    from entry.baseline import main as baseline
    from entry.options import run

    root = tmp_path_factory.mktemp("attacks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        for name, seed in (("victim", "0"), ("other", "1")):
            run(baseline, ["--epochs", "1", "--seed", seed, "--register_as", name])
        client = MlflowClient()
        for key in [k for k in client.get_model_version("victim", "1").tags if k.startswith("ttkd.latency")]:
            client.delete_model_version_tag("victim", "1", key)
        yield root
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture()
def attack(registry_with_victim, monkeypatch, tmp_path):
    """``(victim's folder, other's folder, proof file)``; the victim's files and tags are
    put back after the test, and the proof that code ran must not exist."""
    uri = f"sqlite:///{registry_with_victim / 'mlflow.db'}"
    monkeypatch.chdir(registry_with_victim)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    victim, other = model_folder("victim"), model_folder("other")
    saved = tmp_path / "saved"
    shutil.copytree(victim, saved)
    tags = dict(MlflowClient().get_model_version("victim", "1").tags)
    yield victim, other, tmp_path / "payload-ran"
    shutil.rmtree(victim)
    shutil.copytree(saved, victim)
    client = MlflowClient()
    for key in set(client.get_model_version("victim", "1").tags) - set(tags):
        client.delete_model_version_tag("victim", "1", key)
    for key, value in tags.items():
        client.set_model_version_tag("victim", "1", key, value)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    assert not (tmp_path / "payload-ran").exists()


def every_reader(cli, images: Path, *, trust: bool = False) -> dict[str, tuple[int, str, str]]:
    """What each path that reads a registered model answers for ``victim``: teach, distill,
    predict, promote measure=true, and the serve entry point's check (in-process, up to the
    app it would listen with)."""
    from ttkd import predict
    from ttkd.tracking import registry

    images.mkdir(exist_ok=True)
    write_image(images / "a.png", (8, 8), False, 7)
    extra = ("--trust_unverified", "true") if trust else ()
    answers = {
        "teach": cli("teach", "--student", "victim", "--epochs", "1", *extra),
        "distill": cli("distill", "--teacher", "victim", "--epochs", "1", *extra),
        "predict": cli("predict", "--model", "victim", "--images", str(images), *extra),
        "promote": cli("promote", "--model", "victim/1", "--measure", "true", "--force", "true", *extra),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            predict.scoring_app(registry.resolve("victim"), tmp, trust)
        answers["serve"] = (0, "", "")
    except TTKDError as exc:
        answers["serve"] = (1, "", f"ttkd serve: error: {exc}\n")
    return answers


def assert_refused(answers: dict, *needles: str) -> None:
    for path, (status, _, err) in answers.items():
        assert status == 1 and err.count("\n") == 1, (path, err)
        for needle in needles:
            assert needle in err, (path, err)


def edit_mlmodel(folder: Path, change) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    change(mlmodel)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def relabel(mlmodel: dict) -> None:
    mlmodel["flavors"]["python_function"]["config"]["classes"] = [str((i + 1) % 10) for i in range(10)]


def repoint(other: Path):
    return lambda m: m["flavors"]["python_function"]["artifacts"]["network"].update(
        path=str(other / "artifacts/network.onnx"))


CHANGED = "someone changed the model's files after it was registered"
ATTACKS = {  # what an attacker with write access to the artifact store does -> the file named
    "the served network swapped for another model's": (lambda v, o, proof: shutil.copy(
        o / "artifacts/network.onnx", v / "artifacts/network.onnx"), "artifacts/network.onnx"),
    "the weights swapped for another model's": (lambda v, o, proof: shutil.copy(
        o / "artifacts/weights.safetensors", v / "artifacts/weights.safetensors"), "artifacts/weights.safetensors"),
    "MLmodel pointing the network at another file": (lambda v, o, proof: edit_mlmodel(v, repoint(o)), "MLmodel"),
    "MLmodel's classes relabelled": (lambda v, o, proof: edit_mlmodel(v, relabel), "MLmodel"),
    "MLmodel's run id changed": (lambda v, o, proof: edit_mlmodel(v, lambda m: m.update(run_id="0" * 32)),
                                 "MLmodel"),
    "the record's classes relabelled": (lambda v, o, proof: (v / "artifacts/network.json").write_text(
        (v / "artifacts/network.json").read_text().replace('"0"', '"zero"')), "artifacts/network.json"),
    "serving.py replaced by code": (lambda v, o, proof: (v / "serving.py").write_text(
        f"import pathlib\npathlib.Path({str(proof)!r}).touch()\n"), "serving.py"),
    "a torch.export program added whose symbolic size runs code": (lambda v, o, proof: (
        v / "artifacts/network.pt2").write_bytes(sympy_payload(proof)), "artifacts/network.pt2"),
    "a pickle payload added": (lambda v, o, proof: (v / "artifacts/model.pt").write_bytes(
        pickled_payload(proof)), "artifacts/model.pt"),
    "the weights cut short": (lambda v, o, proof: (v / "artifacts/weights.safetensors").write_bytes(
        (v / "artifacts/weights.safetensors").read_bytes()[:100]), "artifacts/weights.safetensors"),
    "the weights replaced by a zip bomb": (lambda v, o, proof: (v / "artifacts/weights.safetensors").write_bytes(
        zip_bomb()), "artifacts/weights.safetensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", ATTACKS)
def test_a_changed_model_file_is_refused_by_every_reader_before_it_is_read(attack, cli, tmp_path, what):
    victim, other, proof = attack
    change, file = ATTACKS[what]
    change(victim, other, proof)
    assert_refused(every_reader(cli, tmp_path / "images"), f"models:/victim/1: its file {file} is ", CHANGED)
    assert not proof.exists()
    assert not mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                                  output_format="list")
    assert MlflowClient().search_registered_models("name = 'digits-cnn-trained'") == []


def test_the_files_ttkd_writes_run_nothing_when_loaded_even_with_the_digest_forged_to_match(attack, cli, tmp_path):
    """An attacker who can write the registry too: ttkd's readers still read data only, and
    a network file that is not ttkd's ONNX graph is one line."""
    victim, _, proof = attack
    (victim / "artifacts/network.pt2").write_bytes(sympy_payload(proof))  # a program nobody loads
    (victim / "artifacts/weights.safetensors").write_bytes(b"\x00" * 64)
    (victim / "artifacts/network.onnx").write_bytes(pickled_payload(proof))
    forged = modelstore.folder_digests(victim)
    MlflowClient().set_model_version_tag("victim", "1", modelstore.TAG_DIGESTS, json.dumps(forged))
    answers = every_reader(cli, tmp_path / "images")
    assert_refused(answers, "models:/victim/1: its artifacts/weights.safetensors is damaged")
    with pytest.raises(Exception, match="network.onnx is not an ONNX network onnxruntime can run"):
        mlflow.pyfunc.load_model("models:/victim/1")  # the model's own serving.py, run by MLflow
    assert not proof.exists()


def sympy_payload(proof: Path) -> bytes:
    """A torch.export archive with no pickle in it whose symbolic batch size, read back by
    ``torch.export.load``, runs ``touch proof``: sympy evaluates the size's expression."""
    net = models.build("mlp", 10, 1, image_size=8).eval()
    program = torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as z:
        parts = {i.filename: z.read(i.filename) for i in z.infolist()}
    code = f"__import__('os').system('touch {proof}')".encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, content in parts.items():
            if name.endswith(".json"):
                content = re.sub(rb"Symbol\('(s\d+)', positive=True, integer=True\)",
                                 lambda m: b"(" + code + b", " + m[0] + b")[1]", content)
            z.writestr(name, content)
    return out.getvalue()


def zip_bomb() -> bytes:
    """A small zip (256 KiB) that unpacks to 256 MiB of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z, z.open("data.pkl", "w", force_zip64=True) as part:
        for _ in range(256):
            part.write(bytes(1 << 20))
    return out.getvalue()


def test_the_sympy_payload_is_real(tmp_path):
    """The attack the tests plant runs code when torch loads it: otherwise they prove nothing."""
    proof = tmp_path / "ran"
    archive = tmp_path / "network.pt2"
    archive.write_bytes(sympy_payload(proof))
    with contextlib.suppress(Exception):
        torch.export.load(archive)
    assert proof.exists()


@pytest.mark.slow
@pytest.mark.parametrize("record", ["missing", "{}", "not a mapping"])
def test_a_model_without_a_digest_record_is_refused_unless_trusted_knowingly(attack, cli, tmp_path, record):
    client = MlflowClient()
    if record == "missing":
        client.delete_model_version_tag("victim", "1", modelstore.TAG_DIGESTS)
    else:
        client.set_model_version_tag("victim", "1", modelstore.TAG_DIGESTS, "{}" if record == "{}" else "[]")
    assert_refused(every_reader(cli, tmp_path / "images"),
                   "models:/victim/1 has no record of its files' SHA-256 in the registry",
                   "pass trust_unverified=true to use it as it is")
    if record != "missing":
        return
    for path, (status, _, err) in every_reader(cli, tmp_path / "images", trust=True).items():
        assert status == 0 and ("warning: model" in err or "warning: student" in err or "warning: teacher" in err
                                or path == "serve"), (path, err)
    trusted = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string=f"tags.`{modelstore.TAG_TRUSTED}` = 'models:/victim/1'")
    assert {r.data.tags["ttkd.stage"] for r in trusted} == {"teach", "distill", "predict"}


def test_a_logged_model_reference_is_checked_against_its_source_run_not_its_mlmodel(attack, cli, tmp_path):
    victim, _, _ = attack
    model_id = MlflowClient().get_model_version("victim", "1").source.removeprefix("models:/")
    edit_mlmodel(victim, lambda m: m.update(run_id="0" * 32))
    status, _, err = cli("predict", "--model", f"models:/{model_id}", "--images", str(tmp_path))
    assert status == 1 and f"models:/{model_id}: its file MLmodel is not the one registered" in err, err


def test_a_checkpoint_changed_in_the_store_is_refused_and_never_names_what_resume_registers(
        store, cli, tmp_path, monkeypatch):
    from tests.test_resume import poison
    from ttkd.kd.logits import CrossEntropy
    undo = poison(monkeypatch, CrossEntropy)
    cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false", "--register_as", "own")  # fails in epoch 2
    undo()
    run = mlflow.search_runs(output_format="list")[0]
    checkpoint = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "last.pt"
    good = checkpoint.read_bytes()
    proof = tmp_path / "payload-ran"
    for bad in (pickled_payload(proof), zip_bomb(), good[:1000]):
        checkpoint.write_bytes(bad)
        status, _, err = cli("baseline", "--resume", run.info.run_id)
        assert status == 1 and err.count("\n") == 1, err
        assert f"checkpoint last.pt of run {run.info.run_id} is damaged or was changed after its run wrote it" in err
    # the weights-only loader beneath the digest refuses the payload on its own too
    checkpoint.write_bytes(pickled_payload(proof))
    with pytest.raises(tracking.DamagedCheckpoint, match=r"it holds a pickled posix.system, which only the full"):
        tracking.load_checkpoint(checkpoint)
    assert not proof.exists()

    # an attacker who also rewrites the run's digest tag: names and tags still come from the run
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["kwargs"] = {"register_as": "digits-student", "tags": {"ttkd.partner_model": "models:/forged/1"}}
    checkpoint.write_bytes(b"")
    torch.save(state, checkpoint)
    forged = {"last.pt": [modelstore.file_digests({"c": checkpoint})["c"]]}
    MlflowClient().set_tag(run.info.run_id, tracking.TAG_CHECKPOINTS, json.dumps(forged))
    MlflowClient().set_terminated(run.info.run_id, "KILLED")
    status, _, err = cli("baseline", "--resume", run.info.run_id)
    assert status == 0, err
    [version] = MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    assert version.name == "own" and "ttkd.partner_model" not in version.tags
    assert MlflowClient().search_registered_models("name = 'digits-student'") == []


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
        assert f"this stage trains on digits (digest {modelstore.training_digest(data.load('digits'))[:8]}); " \
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
            "train_digest": modelstore.training_digest(digits)}
    foreign, unchecked = modelstore.task_difference("teacher models:/t/1", meta, None, digits)
    assert unchecked is None
    assert foreign.startswith("teacher models:/t/1 was trained on digits (the same classes in another order "
                              "(1, 0, 2, 3, 4, 5, … (10 in all); here 0..9), digest ")


def test_a_partner_registered_by_an_older_ttkd_is_used_only_when_trusted_knowingly(store, cli):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "old")
    assert status == 0, err
    # as an older ttkd registered it: no data record, weights in its run's checkpoint only, no digest record
    folder = model_folder("old")
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    for key in ("dataset", "train_digest", "arch"):
        mlmodel["metadata"].pop(key)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (folder / "artifacts" / "weights.safetensors").unlink()
    (folder / "artifacts" / "network.json").unlink()
    MlflowClient().delete_model_version_tag("old", "1", modelstore.TAG_DIGESTS)
    status, _, err = cli("distill", "--teacher", "old", "--epochs", "1")
    assert status == 1 and err.count("\n") == 1
    assert "teacher models:/old/1 has no record of its files' SHA-256 in the registry" in err
    status, out, err = cli("distill", "--teacher", "old", "--epochs", "1", "--trust_unverified", "true")
    assert status == 0, err
    assert "used as it is, as trust_unverified=true asks" in err
    assert "warning: teacher models:/old/1 was registered without a record of its training data; " \
           "it could not be checked" in err
    assert "teacher models:/old/1: val_acc" in out
    [student] = MlflowClient().search_model_versions("name = 'digits-mlp-kd'")
    assert student.tags[modelstore.TAG_TRUSTED] == "models:/old/1"
    assert mlflow.get_run(student.run_id).data.tags[modelstore.TAG_TRUSTED] == "models:/old/1"

    # its run's checkpoint damaged: the message names the model, the run and the whole reason
    run_id = MlflowClient().get_model_version("old", "1").run_id
    checkpoint = Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    status, _, err = cli("distill", "--teacher", "old", "--epochs", "1", "--trust_unverified", "true")
    assert status == 1 and err.count("\n") == 1, err
    refusal = err.strip()
    assert f"checkpoint last.pt of teacher models:/old/1 (run {run_id}) is damaged or was changed" in refusal
    assert refusal.endswith("; register that model again from a run whose checkpoint is whole, or use another teacher")


def test_serve_refuses_a_network_file_that_is_not_onnx_in_one_line_with_the_digest_forged(attack):
    from ttkd import predict
    from ttkd.tracking import registry

    victim, _, proof = attack
    (victim / "artifacts/network.onnx").write_bytes(pickled_payload(proof))
    MlflowClient().set_model_version_tag("victim", "1", modelstore.TAG_DIGESTS,
                                         json.dumps(modelstore.folder_digests(victim)))
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(TTKDError) as exc:
        predict.scoring_app(registry.resolve("victim"), tmp)
    assert str(exc.value).startswith("model models:/victim/1: network.onnx is not an ONNX network onnxruntime can run")
    assert "\n" not in str(exc.value) and not proof.exists()
