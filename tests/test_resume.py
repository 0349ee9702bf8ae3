"""Faults: kill -9 and resume, SIGTERM, a NaN loss, parallel stages, damaged checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from ttkd import stages
from ttkd.errors import TTKDError
from ttkd.kd.logits import CrossEntropy, TrainedTeacher

REPO = Path(__file__).resolve().parents[1]


def poison(monkeypatch, cls, after: int = 30):
    """Make ``cls``'s loss NaN from its ``after``-th call on (digits at batch 64: 23 steps
    an epoch, so call 30 is epoch 2, step 7); returns a function that undoes it. The stage
    must run with amp=false and compile=false: the timed steps of auto before the first
    epoch call it too."""
    real, calls = cls.forward, []

    def poisoned(self, b):
        calls.append(1)
        parts = real(self, b)
        return parts | {"loss": parts["loss"] * float("nan")} if len(calls) >= after else parts
    monkeypatch.setattr(cls, "forward", poisoned)
    return lambda: monkeypatch.setattr(cls, "forward", real)


def env_for(store):
    # the same thread count in every process, so float sums add up in the same order
    return {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def stage(store, *args, wait=True, module="baseline"):
    cmd = [sys.executable, "-m", f"entry.{module}", *args]
    proc = subprocess.Popen(cmd, env=env_for(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def wait_for_epochs(store, epochs, proc):
    client = MlflowClient(store)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        runs = [r for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= epochs:
            return runs[0].info.run_id
        time.sleep(0.05)
    raise AssertionError("the stage did not reach the epoch in time")


def history(client, run_id, metric):
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


def final_weights(run_id, tmp):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt", dst_path=tmp)
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_kill_9_then_resume_ends_exactly_like_an_uninterrupted_run_even_with_a_memory_bank(store, tmp_path, cli):
    """Metrics and weights, exactly; CRD owns trained embeddings and a memory bank, which must
    come back from the checkpoint too."""
    status, _, err = cli("baseline", "--arch", "cnn", "--epochs", "1", "--register_as", "teacher")
    assert status == 0, err
    args = ["--teacher", "teacher", "--method", "crd", "--crd_k", "256", "--arch", "cnn", "--batch_size", "16",
            "--epochs", "3", "--deterministic", "true", "--amp", "false"]
    status, _, err = cli("distill", *args, "--register_as", "whole")  # here: 2 threads, as the others
    assert status == 0, err
    proc = stage(store, *args, "--register_as", "cut", wait=False, module="distill")
    run_id = wait_for_epochs(store, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody could mark it
    status, out, err = stage(store, "--resume", "last", module="distill")
    assert status == 0, err
    assert f"resuming run {run_id} after epoch" in out
    client = MlflowClient()
    whole = client.get_model_version("whole", "1").run_id
    assert client.get_model_version("cut", "1").run_id == run_id  # the same run, continued
    assert client.get_run(run_id).info.status == "FINISHED"
    for metric in ("train_loss", "train_crd", "val_loss", "val_acc", "lr"):
        assert history(client, run_id, metric) == history(client, whole, metric), metric
    a, b = final_weights(whole, tmp_path / "a"), final_weights(run_id, tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_then_resume_with_the_step_compiled_ends_exactly_like_an_uninterrupted_run(store, tmp_path, cli):
    """torch.compile (inductor's CPU code) through kill -9 and resume in a new process: the
    same metrics and weights as an uninterrupted compiled run."""
    args = ["--arch", "cnn", "--batch_size", "16", "--epochs", "3", "--deterministic", "true", "--amp", "false",
            "--compile", "true"]
    status, out, err = cli("baseline", *args, "--register_as", "whole")  # here: 2 threads, as the others
    assert status == 0, err
    assert "compile: on, default (compile=true)" in out
    proc = stage(store, *args, "--register_as", "cut", wait=False)
    run_id = wait_for_epochs(store, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    status, out, err = stage(store, "--resume", "last")
    assert status == 0, err
    assert f"resuming run {run_id} after epoch" in out and f"compile: on, default (as run {run_id} started)" in out
    client = MlflowClient()
    whole = client.get_model_version("whole", "1").run_id
    assert client.get_run(run_id).data.tags["ttkd.compile"] == "default"
    for metric in ("train_loss", "val_loss", "val_acc", "lr"):
        assert history(client, run_id, metric) == history(client, whole, metric), metric
    a, b = final_weights(whole, tmp_path / "a"), final_weights(run_id, tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_run_marked_killed(store, cli):
    # cnn with small batches: epochs long enough that the signal lands during training
    proc = stage(store, "--arch", "cnn", "--batch_size", "8", "--epochs", "4", "--register_as", "t", wait=False)
    run_id = wait_for_epochs(store, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1].startswith("ttkd baseline: error: stopped by SIGTERM in epoch")
    assert f"resume={run_id}" in err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert MlflowClient().search_registered_models() == []
    status, out, err = cli("baseline", "--resume", run_id)
    assert status == 0, err
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert len(history(MlflowClient(), run_id, "val_acc")) == 4


def test_nan_fails_the_run_registers_nothing_and_keeps_the_last_good_checkpoint(store, cli, monkeypatch, tmp_path):
    poison(monkeypatch, CrossEntropy)
    status, _, err = cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false", "--register_as", "never")
    assert status == 1
    assert "the training loss became NaN or infinite at epoch 2, step 7;" in err
    run = mlflow.search_runs(output_format="list")[0]
    assert run.info.status == "FAILED"
    assert MlflowClient().search_registered_models() == []
    state = torch.load(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path)), weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_accepts_the_interrupted_command_and_names_each_value_that_differs(store, cli, monkeypatch):
    undo = poison(monkeypatch, CrossEntropy)
    command = ("baseline", "--epochs", "3", "--lr", "0.05", "--register_as", "again", "--amp", "false", "--compile", "false")
    status, _, err = cli(*command)
    assert status == 1 and "NaN or infinite at epoch 2" in err
    undo()
    status, _, err = cli(*command[:2], "4", *command[3:4], "0.1", *command[5:], "--resume", "last")
    run = mlflow.search_runs(output_format="list")[0]
    assert status == 1 and err.count("\n") == 1
    assert (f"resume continues run {run.info.run_id} with the values it started with, and these differ: "
            f"epochs=4 (the run has epochs=3); lr=0.1 (the run has lr=0.05); drop them") in err
    # the same command again; the run keeps the precision it chose, without measuring again
    monkeypatch.setattr(stages, "choose_step", lambda *a: pytest.fail("measured again"))
    status, out, err = cli(*command, "--resume", "last")
    assert status == 0, err
    assert f"resuming run {run.info.run_id} after epoch 1" in out
    assert f"precision: {run.data.tags['ttkd.precision']} (as run {run.info.run_id} started)" in out
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert [v.version for v in MlflowClient().search_model_versions("name = 'again'")] == [1]


def test_two_stages_register_into_one_fresh_sqlite_store_at_once(tmp_path):
    store = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [stage(store, "--epochs", "1", "--register_as", name, wait=False) for name in ("left", "right")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    names = {m.name for m in MlflowClient(store).search_registered_models()}
    assert names == {"left", "right"}


def test_resume_errors(store, cli, monkeypatch):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "done")
    assert status == 0, err
    finished = mlflow.search_runs(output_format="list")[0].info.run_id
    cases = [
        (("baseline", "--resume", "0" * 32), f"no run with id '{'0' * 32}'"),
        (("baseline", "--resume", finished), f"run {finished} has finished; there is nothing to resume"),
        (("teach", "--resume", finished), f"run {finished} is a baseline run; resume it with its own entry point"),
        (("baseline", "--resume", "last"), "no unfinished baseline run to resume"),
    ]
    for args, message in cases:
        got, _, err = cli(*args)
        assert got == 1 and message in err, (args, err)


def test_damaged_checkpoint_is_refused(store, cli, monkeypatch):
    poison(monkeypatch, CrossEntropy)
    cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false")  # fails in epoch 2, leaving epoch 1's checkpoint
    run = mlflow.search_runs(output_format="list")[0]
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "last.pt"
    artifact.write_bytes(artifact.read_bytes()[:1000])  # truncated
    status, _, err = cli("baseline", "--resume", "last")
    assert status == 1 and err.count("\n") == 1, err
    assert (f"checkpoint last.pt of run {run.info.run_id} is damaged or was changed after its run wrote it (its "
            f"SHA-256 is not the one the run recorded); start the stage again; resume=last skips this run from now on"
            in err)
    status, _, err = cli("baseline", "--resume", "last")  # the damaged run is not picked again
    assert status == 1 and "no unfinished baseline run to resume" in err


def test_unreachable_tracking_server_fails_fast_with_its_uri(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        status, _, err = cli("baseline", "--epochs", "1")
        assert status == 1
        assert err.strip() == ("ttkd baseline: error: cannot reach the tracking server http://127.0.0.1:9 "
                               "(ConnectionError); start it (mlflow server) or set MLFLOW_TRACKING_URI "
                               "to a reachable store")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("where", ["under a file", "a file that is not a database"])
def test_a_sqlite_store_that_cannot_be_one_is_one_line_before_anything_trains(cli, monkeypatch, tmp_path, where):
    (tmp_path / "plain").write_text("not a folder, not a database\n")
    path = tmp_path / "plain" / "mlflow.db" if where == "under a file" else tmp_path / "plain"
    uri = f"sqlite:///{path}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        status, _, err = cli("baseline", "--epochs", "1")
    finally:
        mlflow.set_tracking_uri(None)
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith(f"ttkd baseline: error: cannot use the tracking store {uri} (")
    assert (tmp_path / "plain").read_text() == "not a folder, not a database\n"
    assert not list(tmp_path.glob("mlruns"))


@pytest.mark.slow
def test_a_failed_study_resumes_reusing_its_finished_stages(store, cli, monkeypatch):
    undo = poison(monkeypatch, TrainedTeacher)  # the first teacher fails in its second epoch
    status, _, err = cli("main", "--epochs", "2", "--amp", "false", "--compile", "false", "--register_as", "st")
    assert status == 1 and "NaN or infinite at epoch 2" in err and "4 of 5 stages did not finish" in err
    parent = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'main'")[0]
    assert parent.info.status == "FAILED"
    assert {m.name for m in MlflowClient().search_registered_models()} == {"st-student"}

    undo()
    status, out, err = cli("main", "--epochs", "2", "--amp", "false", "--compile", "false", "--register_as", "st",
                           "--resume", "last")  # as it ran
    assert status == 0, err
    assert "resuming run" in out and "| student, KD from trained teacher |" in out
    children = mlflow.search_runs(output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["ttkd.role"] for c in finished) == sorted(
        ["student", "teacher_normal", "teacher_trained", "kd_normal", "kd_trained"])  # no duplicates
    # the normal teacher (failed in epoch 2) resumed in its own run; the trained one, which
    # went on after it and failed in epoch 1 with no checkpoint, started again in a new run
    teachers = [c for c in children if c.data.tags["ttkd.role"] == "teacher_normal"]
    assert len(teachers) == 1 and teachers[0].data.tags.get("ttkd.resumed_after_epoch") == "1"
    assert sorted(c.info.status for c in children if c.data.tags["ttkd.role"] == "teacher_trained") == [
        "FAILED", "FINISHED"]
    assert MlflowClient().get_model_version("st-student", "1")  # reused, not retrained
    assert [v.version for v in MlflowClient().search_model_versions("name = 'st-student'")] == [1]
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_run_whose_process_died_after_registering_is_resumed_without_registering_twice(store, cli):
    """The attempt that registered died before it tagged its run: the next attempt finds the
    first one's claim and its version, and registers nothing."""
    from ttkd.tracking import attempts

    status, _, err = cli("baseline", "--epochs", "2", "--amp", "false", "--compile", "false", "--register_as", "once")
    assert status == 0, err
    client = MlflowClient()
    run = mlflow.search_runs(output_format="list")[0]
    first = run.data.params[attempts.REGISTRATION]
    client.delete_tag(run.info.run_id, "ttkd.registered_model")
    client.set_terminated(run.info.run_id, "KILLED")
    status, out, err = cli("baseline", "--resume", run.info.run_id)
    assert status == 0, err
    assert [str(v.version) for v in client.search_model_versions("name = 'once'")] == ["1"]
    assert "registered models:/once/1" in out
    again = client.get_run(run.info.run_id)
    assert again.data.tags["ttkd.registered_model"] == "models:/once/1" and again.info.status == "FINISHED"
    assert again.data.params[attempts.REGISTRATION] == first  # the first attempt's claim stands
    assert first.startswith(f"{run.info.run_id} 1.0") and "ttkd.attempt.2.0" in again.data.params  # resumed: 2.0
    # a claim by another attempt that has registered nothing (yet): this one registers nothing either
    other = client.create_run(run.info.experiment_id).info.run_id
    client.log_param(other, attempts.PREFIX + "1.0", f"{other} 0123abcd")  # attempt 1.0 claimed, then died
    client.log_param(other, attempts.REGISTRATION, f"{other} 1.0")
    this = attempts.begin(other)  # 2.0
    with pytest.raises(TTKDError, match=f"claimed for registration by attempt 1.0 of run {other}, which has "
                                        "registered nothing; if it is dead, start the stage again"):
        attempts.register_once(this, "models:/nothing", "none", {})
    assert client.search_registered_models("name = 'none'") == []
