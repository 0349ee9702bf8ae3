"""Each entry point end to end on digits, one epoch, in an isolated store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ttkd import cost, data, engine, models, tracking
from ttkd.step import bf16_supported
from ttkd.tracking import modelstore, registry

REPO = Path(__file__).resolve().parents[1]
EPOCH_METRICS = {"train_loss", "train_ce", "val_acc", "val_loss", "lr", "epoch_time_s", "throughput"}


def registry_state():
    """Every registered model's versions, tags and aliases: compared before and after."""
    client = MlflowClient()
    return {m.name: (m.aliases, sorted((str(v.version), tuple(sorted(v.tags.items())))
                                       for v in client.search_model_versions(f"name = '{m.name}'")))
            for m in client.search_registered_models()}


def run_of(ref: str):
    name, version = ref.removeprefix("models:/").split("/")
    return mlflow.get_run(MlflowClient().get_model_version(name, version).run_id)


@pytest.mark.slow
def test_stages_by_hand(store, cli, tmp_path):
    status, out, err = cli("baseline", "--epochs", "2", "--register_as", "stu")
    assert status == 0, err
    assert "registered models:/stu/1" in out
    native = bf16_supported(torch.device("cpu"))
    assert ("precision: float32 (amp=auto: this CPU has no native bf16)" in out) != native
    status, out, err = cli("teach", "--student", "stu", "--epochs", "1", "--amp", "true")
    assert status == 0, err
    assert "registered models:/digits-cnn-trained/1" in out
    assert "precision: bf16 (amp=true" in out and ("emulated" in out) != native
    status, out, err = cli("distill", "--teacher", "digits-cnn-trained", "--epochs", "1")
    assert status == 0, err
    status, out, err = cli("promote", "--model", "digits-mlp-kd")
    assert status == 0 and "digits-mlp-kd@champion: (unset) -> version 1" in out

    client = MlflowClient()
    teacher_version = client.get_model_version("digits-cnn-trained", "1")
    assert teacher_version.tags["ttkd.partner_model"] == "models:/stu/1"
    assert teacher_version.tags["ttkd.stage"] == "teach"
    kd_version = client.get_model_version("digits-mlp-kd", "1")
    assert kd_version.tags["ttkd.partner_model"] == "models:/digits-cnn-trained/1"
    kd_run = run_of("models:/digits-mlp-kd/1")
    assert kd_run.data.tags["ttkd.stage"] == "distill"
    assert kd_run.data.tags["ttkd.partner_model"] == "models:/digits-cnn-trained/1"
    assert EPOCH_METRICS | {"train_kl", "partner_val_acc", "agreement"} <= set(kd_run.data.metrics)
    assert kd_run.data.params["alpha"] == "0.9" and kd_run.data.params["teacher"] == "digits-cnn-trained"
    assert {d.dataset.name for d in kd_run.inputs.dataset_inputs} == {"digits-training", "digits-validation"}
    base_run = run_of("models:/stu/1")
    tags, metrics = base_run.data.tags, base_run.data.metrics
    assert base_run.data.params["amp"] == "auto"
    if native:  # measured: both rates logged, the faster one (bf16 by a 5% margin) kept
        assert tags["ttkd.precision_reason"] in ("measured", "cached")
        fast = metrics["calibration_bf16_img_s"] > 1.05 * metrics["calibration_float32_img_s"]
        assert tags["ttkd.precision"] == ("bf16" if fast else "float32")
    else:
        assert tags["ttkd.precision"] == "float32" and tags["ttkd.precision_reason"] == "no native bf16"
    assert run_of("models:/digits-cnn-trained/1").data.tags["ttkd.precision"] == "bf16"
    assert len(client.get_metric_history(base_run.info.run_id, "val_acc")) == 2
    assert "train_kl" not in base_run.data.metrics

    # what the served network costs: measured on the served ONNX network, as metrics and version tags
    assert metrics["params"] == float(base_run.data.params["num_params"]) == cost.parameters(
        models.build("mlp", 10, 1, image_size=8))
    assert metrics["macs"] == cost.macs(models.build("mlp", 10, 1, image_size=8), (1, 8, 8)) > 0
    served = mlflow.artifacts.download_artifacts(f"runs:/{base_run.info.run_id}/model/artifacts/network.onnx",
                                                 dst_path=str(tmp_path / "served"))
    assert metrics["model_bytes"] == os.path.getsize(served)
    assert metrics["latency_ms_b1_cpu"] > 0 and metrics["throughput_b256_cpu"] > 0 and metrics["cost_threads"] == 1
    teacher_run = run_of("models:/digits-cnn-trained/1")
    assert teacher_version.tags["ttkd.params"] == str(int(teacher_run.data.metrics["params"]))
    assert float(teacher_version.tags["ttkd.latency_ms_b1_cpu"]) == pytest.approx(
        teacher_run.data.metrics["latency_ms_b1_cpu"], rel=1e-5)
    assert client.search_model_versions("tags.`ttkd.params` = '" + teacher_version.tags["ttkd.params"] + "'")

    # the checkpoint (our class, weights_only) and the registered model, which takes raw
    # pixels and normalises them itself, agree in eval mode, in both layouts
    path = mlflow.artifacts.download_artifacts(f"runs:/{base_run.info.run_id}/checkpoints/last.pt",
                                               dst_path=str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and state["arch"] == "mlp"
    net = models.build("mlp", 10, 1, image_size=8)
    net.load_state_dict(state["model"])
    digits = data.load("digits")
    x, pixels = next(data.batches(digits, "val", 16))[0], digits.val_x[:16].numpy()
    registered = mlflow.pyfunc.load_model("models:/stu/1")
    for layout in (pixels, pixels.transpose(0, 2, 3, 1)):
        answer = registered.predict(layout)
        expected = torch.softmax(net.eval()(x), dim=1).detach()
        assert torch.allclose(torch.tensor(np.stack(answer["probabilities"])), expected, atol=1e-5)
        assert list(answer["class"]) == expected.argmax(1).tolist()
        assert list(answer["name"]) == [str(i) for i in expected.argmax(1).tolist()]


def test_a_study_reads_its_data_set_once_for_its_five_stages(store, cli, monkeypatch):
    loads = []
    real = data.LOADERS["digits"]
    monkeypatch.setitem(data.LOADERS, "digits", lambda *a: loads.append(a) or real(*a))
    status, out, err = cli("main", "--epochs", "1", "--register_as", "once")
    assert status == 0, err
    assert "| student, KD from trained teacher |" in out
    assert len(loads) == 1
    runs = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.role` = 'kd_trained'")
    assert len(runs) == 1 and {d.dataset.name for d in runs[0].inputs.dataset_inputs} == {
        "digits-training", "digits-validation"}


@pytest.mark.slow
def test_every_method_distils_from_a_registered_teacher_rebuilt_from_its_weights(store, cli, monkeypatch):
    status, _, err = cli("baseline", "--arch", "cnn", "--epochs", "1", "--register_as", "teacher")
    assert status == 0, err

    def no_pt2(*args, **kwargs):
        raise AssertionError("the partner must be rebuilt from its weights, not loaded from pt2")
    monkeypatch.setattr(mlflow.pytorch, "load_model", no_pt2)
    parts = {"kd": {"ce", "kl"}, "dkd": {"ce", "tckd", "nckd"}, "dist": {"ce", "inter", "intra"},
             "fitnet": {"ce", "hint"}, "at": {"ce", "at"}, "rkd": {"ce", "distance", "angle"},
             "crd": {"ce", "crd"}}
    assert set(parts) == set(kd_names())
    for method, names in parts.items():
        status, out, err = cli("distill", "--teacher", "teacher", "--method", method, "--arch", "resnet8",
                               "--epochs", "1")
        assert status == 0, f"{method}: {err}"
        version = MlflowClient().get_model_version(f"digits-resnet8-{method}", "1")
        assert version.tags["ttkd.method"] == method
        assert version.tags["ttkd.partner_model"] == "models:/teacher/1"
        run = mlflow.get_run(version.run_id)
        assert run.data.tags["ttkd.method"] == run.data.params["method"] == method
        logged = {m.removeprefix("train_") for m in run.data.metrics if m.startswith("train_")}
        assert logged == names | {"loss"}, method
        assert len(MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == 1
    assert mlflow.get_run(version.run_id).data.params["crd_k"] == "16384"


def kd_names():
    from ttkd import kd
    return kd.names()


@pytest.mark.slow
def test_a_study_with_another_method_registers_its_students_by_method(store, cli):
    status, out, err = cli("main", "--method", "dkd", "--epochs", "1", "--register_as", "d")
    assert status == 0, err
    assert "| student, DKD from trained teacher |" in out
    names = {m.name for m in MlflowClient().search_registered_models()}
    assert {"d-student-dkd-normal", "d-student-dkd-trained"} <= names
    version = MlflowClient().get_model_version("d-student-dkd-trained", "1")
    assert version.tags["ttkd.method"] == "dkd"
    run = mlflow.get_run(version.run_id)
    assert run.data.params["dkd_beta"] == "8.0" and "alpha" not in run.data.params


@pytest.mark.slow
def test_mlflow_run_main_study(tmp_path):
    """The real `mlflow run` of the default entry point, as a user starts it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
         "-P", "epochs=1", "-P", "register_as=tiny", "-P", "experiment=team"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| student, KD from trained teacher |" in done.stdout

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        client = MlflowClient()
        # `mlflow run` opened its run in Default; the study went to the experiment it was given
        team = client.get_experiment_by_name("team").experiment_id
        [launcher] = client.search_runs(["0"])
        assert launcher.info.status == "FINISHED" and launcher.data.tags["ttkd.ran_in_experiment"] == "team"
        names = {m.name: m.aliases for m in client.search_registered_models()}
        assert names == {f"tiny-{n}": {"champion": 1} for n in
                         ("student", "teacher-normal", "teacher-trained", "student-kd-normal",
                          "student-kd-trained")}
        expected_partner = {"tiny-teacher-normal": "models:/tiny-student/1",
                            "tiny-teacher-trained": "models:/tiny-student/1",
                            "tiny-student-kd-normal": "models:/tiny-teacher-normal/1",
                            "tiny-student-kd-trained": "models:/tiny-teacher-trained/1"}
        for name, partner in expected_partner.items():
            assert client.get_model_version(name, "1").tags["ttkd.partner_model"] == partner
        parent = client.search_runs([team], filter_string="tags.`ttkd.stage` = 'main'")[0]
        children = client.search_runs(
            [team], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(c.data.tags["ttkd.stage"] for c in children) == \
            ["baseline", "distill", "distill", "teach", "teach"]
        assert {c.data.params["weight"] for c in children if "weight" in c.data.params} == {"0.0", "0.005"}
        table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/comparison.md")
        assert table.count("models:/tiny-") == 5
        assert parent.data.metrics.keys() >= {"val_acc_student", "val_acc_kd_trained"}
    finally:
        mlflow.set_tracking_uri(None)


def register_foreign(shape, num_classes, name):
    """Register a model for another image shape (like a CIFAR teacher)."""
    c, h, _ = shape
    fake = data.ImageData("fake", torch.zeros(4, *shape, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                          torch.zeros(4, *shape, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                          num_classes, (0.5,) * c, (0.25,) * c)
    with mlflow.start_run():
        mlflow.log_metric("val_acc", 50.0)
        info, digests = modelstore.log_model(models.build("mlp", num_classes, c, image_size=h), fake, "mlp")
    registry.register(info.model_uri, name, {"ttkd.stage": "baseline", modelstore.TAG_DIGESTS: json.dumps(digests)})


@pytest.fixture(scope="module")
def populated_template(tmp_path_factory):
    """A store with three registered models, made once per module (registering costs seconds)."""
    root = tmp_path_factory.mktemp("populated")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the models' artifacts stay here, read by every test that copies the store
        mlflow.set_tracking_uri(uri)
        try:
            register_foreign((1, 8, 8), 10, "digits-mlp")
            register_foreign((3, 32, 32), 10, "cifar-teacher")
            register_foreign((1, 8, 8), 5, "five-class")
        finally:
            mlflow.set_tracking_uri(None)
    return root / "mlflow.db"


@pytest.fixture()
def populated(store, populated_template):
    """A copy of the three-model store, as this test's own."""
    shutil.copyfile(populated_template, store.removeprefix("sqlite:///"))


BAD_INPUTS = [
    (("teach", "--student", "nope"), 1, "no registered model named 'nope'; registered models: cifar-teacher, digits-mlp"),
    (("teach", "--student", "digits-mlp@gold"), 1, "model 'digits-mlp' has no alias 'gold'"),
    (("teach", "--student", "digits-mlp/9"), 1, "model 'digits-mlp' has no version '9'; its versions are: 1"),
    (("teach",), 1, "missing student"),
    (("distill",), 1, "missing teacher"),
    (("baseline", "--dataset", "imagenet"), 1, "invalid dataset: 'imagenet'; dataset must be one of cifar10, cifar100, digits"),
    (("baseline", "--arch", "resnet-18"), 1, "invalid arch: 'resnet-18'; arch must be a registered architecture: cnn, densenet121"),
    (("distill", "--teacher", "cifar-teacher"), 1,
     "teacher models:/cifar-teacher/1 takes 3x32x32 images and predicts 10 classes, but dataset 'digits' has 1x8x8"),
    (("distill", "--teacher", "five-class"), 1, "predicts 5 classes, but dataset 'digits' has 1x8x8 images and 10 classes"),
    (("teach", "--student", "cifar-teacher"), 1, "pick a student trained on digits"),
    (("baseline", "--epochs", "0"), 1, "invalid epochs: '0'; epochs must be an integer >= 1"),
    (("baseline", "--epochs", "two"), 1, "invalid epochs: 'two'; epochs must be an integer >= 1"),
    (("baseline", "--epochs", "2.5"), 1, "invalid epochs: '2.5'"),
    (("baseline", "--lr", "0"), 1, "invalid lr: '0'; lr must be a number > 0"),
    (("baseline", "--lr", "fast"), 1, "invalid lr: 'fast'"),
    (("baseline", "--batch_size", "0"), 1, "batch_size must be an integer >= 1"),
    (("baseline", "--optimizer", "rmsprop"), 1, "optimizer must be sgd or adam"),
    (("baseline", "--schedule", "step"), 1, "schedule step needs milestones, such as milestones=80,120"),
    (("baseline", "--milestones", "120,80"), 1, "invalid milestones: '120,80'"),
    (("teach", "--student", "digits-mlp", "--temperature", "0"), 1, "temperature must be a number > 0"),
    (("distill", "--teacher", "digits-mlp", "--alpha", "1.5"), 1, "alpha must be a number in [0, 1]"),
    (("baseline", "--register_as", "a/b"), 1, "invalid model name 'a/b'"),
    (("baseline", "--device", "cuda"), 1, "no CUDA GPU is visible; use device=cpu"),
    (("baseline", "--preset", "nope"), 1, "unknown preset 'nope'; presets: cifar10-baseline-cnn"),
    (("teach", "--preset", "cifar10-baseline-cnn"), 1,
     "preset 'cifar10-baseline-cnn' is for the baseline stage; run it with -e baseline"),
    (("main", "--preset", "cifar10-baseline-cnn", "--alpha", "0.5"), 1, "the baseline stage does not take alpha"),
    (("main", "--weight", "0"), 1, "the study's trained teacher needs weight > 0"),
    (("distill", "--teacher", "digits-mlp", "--method", "fitnets"), 1,
     "invalid method: 'fitnets'; method must be one of kd, dkd, dist, fitnet, at, rkd, crd"),
    (("distill", "--teacher", "digits-mlp", "--method", "dkd", "--dkd_beta", "-1"), 1,
     "invalid dkd_beta: '-1'; dkd_beta must be a number >= 0"),
    (("distill", "--teacher", "digits-mlp", "--method", "crd", "--crd_k", "0"), 1,
     "crd_k must be an integer >= 1"),
    (("distill", "--teacher", "digits-mlp", "--method", "dist", "--alpha", "0.5"), 1,
     "method dist does not use alpha; it takes dist_beta, dist_gamma, dist_tau"),
    (("distill", "--teacher", "digits-mlp", "--dkd_beta", "4"), 1, "method kd does not use dkd_beta"),
    (("distill", "--teacher", "digits-mlp"), 1,
     "teacher models:/digits-mlp/1 was trained on fake (classes 0..9, digest "),
    (("distill", "--teacher", "digits-mlp", "--partner_data", "all"), 1,
     "invalid partner_data: 'all'; partner_data must be same or any"),
    (("baseline", "--lr", "inf"), 1, "invalid lr: 'inf'; lr must be a number > 0, and finite"),
    (("distill", "--teacher", "digits-mlp", "--alpha", "nan"), 1, "invalid alpha: 'nan'"),
    (("teach", "--student", "digits-mlp", "--weight", "-inf"), 1, "invalid weight: '-inf'; weight must be a number"),
    (("baseline", "--batch_size", "100000"), 1,
     "batch_size 100000 is larger than the training split (1437 images); choose a batch_size of at most 1437"),
    (("baseline", "--experiment", ""), 1, "invalid experiment: ''; give an experiment name"),
    (("baseline", "--experiment", "e" * 300), 1, "experiment must be a name of at most 256 characters"),
    (("baseline", "--register_as", "m" * 300), 1,
     "(300 characters): the registry keeps names of at most 256 characters; choose a shorter register_as"),
    (("main", "--register_as", "m" * 240), 1, "characters): the registry keeps names of at most 256 characters"),
    (("promote", "--model", "digits-mlp", "--alias", "a" * 300), 1, "the registry keeps aliases of at most 256"),
    (("main", "--method", "at"), 1, "method at matches spatial attention maps, but mlp and cnn have no pair"),
    (("main", "--method", "dkd", "--alpha", "0.5"), 1, "method dkd does not use alpha"),
    (("promote", "--model", "nope"), 1, "no registered model named 'nope'"),
    (("promote", "--model", "digits-mlp", "--force", "maybe"), 2, "invalid force"),
    (("baseline", "--seed", "99999999999999999999"), 1, "seed must be an integer from 0 to 4294967295"),
    (("baseline", "--dataset", "synthetic-1x100000x100000-10"), 1,
     "dataset must be one of cifar10, cifar100, digits"),
    (("baseline", "--register_as", "q'x"), 1, "invalid model name \"q'x\": use a non-empty name without"),
    (("main", "--register_as", 'q"x'), 1, "quotes, backslashes or control characters"),
    (("teach", "--student", "digits-mlp", "--weight", "1e308"), 1, "weight must be a number from -100 to 100"),
    (("sweep", "--weights", "0,1e308"), 1, "weights must be a comma-separated list of distinct numbers from -100"),
]


@pytest.mark.parametrize("args, status, message", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_one_line_and_registry_untouched(populated, cli, args, status, message):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here, so device=cuda is valid")
    before = registry_state()
    runs_before = len(mlflow.search_runs(["0"]))
    got, out, err = cli(*args)
    assert got == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ttkd {args[0]}: error: "), err
    assert message in lines[0]
    assert registry_state() == before
    assert len(mlflow.search_runs(["0"])) == runs_before  # no run was opened either


@pytest.mark.slow
def test_baseline_trains_on_a_users_image_folder_left_on_disk(store, cli, tmp_path):
    from tests.test_data import make_imagefolder
    make_imagefolder(tmp_path / "pets", classes=("cat", "dog", "fox"), size=(16, 16))
    status, out, err = cli("baseline", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "pets"),
                           "--arch", "preresnet20", "--epochs", "1", "--batch_size", "4", "--stream", "true")
    assert status == 0, err
    assert "registered models:/imagefolder-preresnet20/1" in out
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.params["stream"] == "true" and run.data.params["streamed"] == "True"
    assert run.data.metrics["throughput"] > 0
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["imagefolder-training",
                                                                       "imagefolder-validation"]
    meta = mlflow.models.get_model_info("models:/imagefolder-preresnet20/1").metadata
    assert meta["image_shape"] == [3, 16, 16] and meta["classes"] == ["cat", "dog", "fox"]


@pytest.mark.slow
def test_seed_presets_start_and_chain_through_the_registry(store, cli, tmp_path, monkeypatch):
    """baseline CNN -> trained ResNet-18 against it -> KD PreResNet-20 from that teacher,
    each from its preset (one epoch, on generated CIFAR-10 files), as `mlflow run . -P preset=...`."""
    import torchvision.datasets.cifar

    from tests.test_data import write_cifar10
    write_cifar10(tmp_path / "cifar", n_train=20, n_test=10)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    quick = ("--epochs", "1", "--batch_size", "10", "--data_dir", str(tmp_path / "cifar"))
    for preset in ("cifar10-baseline-cnn", "cifar10-trained-resnet18", "cifar10-kd-trained-resnet18-preresnet20"):
        status, out, err = cli("main", "--preset", preset, *quick)
        assert status == 0, f"{preset}: {err}"
    client = MlflowClient()
    teacher = client.get_model_version("cifar10-resnet18-trained", "1")
    assert teacher.tags["ttkd.partner_model"] == "models:/cifar10-cnn/1"
    kd = client.get_model_version("cifar10-preresnet20-kd-trained-resnet18", "1")
    assert kd.tags["ttkd.partner_model"] == "models:/cifar10-resnet18-trained/1"
    run = mlflow.get_run(kd.run_id)
    # the preset's values are what the run records; the command line's override them
    assert run.data.params["lr"] == "0.1" and run.data.params["epochs"] == "1"
    assert run.data.params["milestones"] == "(80, 120)" and run.data.params["temperature"] == "4.0"
    assert run.data.params["num_params"] == str(models.num_parameters(models.build("preresnet20", 10, 3)))


def test_the_library_logs_and_only_an_entry_point_shows_it_as_lines_and_warnings(capsys, monkeypatch):
    import contextlib
    import io
    import logging

    from entry.options import show_log

    logger = logging.getLogger("ttkd")
    for name, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True)):
        monkeypatch.setattr(logger, name, value)  # as a program importing ttkd finds it
    stage_log = logging.getLogger("ttkd.stages")
    stage_log.info("epoch 1/2 val_acc 50.00%")
    assert capsys.readouterr() == ("", "")  # the library alone prints nothing
    show_log()
    show_log()  # (every entry point calls it; one handler)
    stage_log.info("epoch 1/2 val_acc 50.00%")
    stage_log.warning("the cached calibration was dropped")
    assert capsys.readouterr() == ("epoch 1/2 val_acc 50.00%\n", "warning: the cached calibration was dropped\n")
    with contextlib.redirect_stdout(io.StringIO()) as quiet:  # a sweep's quiet worker redirects its output
        stage_log.info("registered models:/x/1")
    assert quiet.getvalue() == "registered models:/x/1\n" and capsys.readouterr() == ("", "")


def test_a_callback_sees_each_epoch_after_its_metrics_and_can_stop_the_stage(store):
    """The hook a search prunes with: called after the stage's own callbacks (the epoch's
    checkpoint and metrics are written); raising stops training, the run ends FAILED and
    nothing is registered."""
    from ttkd import stages

    class Pruned(Exception):
        pass

    seen = []

    def prune(stats, state):
        run = mlflow.active_run().info.run_id
        seen.append((stats.epoch, state["epoch"], tracking.logged_steps(run, "val_acc")))
        raise Pruned(f"epoch {stats.epoch}")

    with pytest.raises(Pruned, match="epoch 1"):
        stages.baseline(arch="mlp", train=engine.TrainConfig(epochs=3, amp=False, compile=False),
                        register_as="pruned", callbacks=[prune])
    assert seen == [(1, 1, {1})]
    [run] = mlflow.search_runs(output_format="list", search_all_experiments=True)
    assert run.info.status == "FAILED" and "ttkd.registered_model" not in run.data.tags
    assert registry_state() == {}
