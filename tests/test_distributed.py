"""Several processes training one stage: torchrun, DistributedDataParallel over gloo on
this CPU, one run and one registered version, agreement with one process, a killed
process, two "machines" on 127.0.0.1, and the launch parameters' bad input."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.test_resume import history
from ttkd import data, distributed, engine, kd, models
from ttkd.stages import build_method

REPO = Path(__file__).resolve().parents[1]
EPOCHS = ["--epochs", "2", "--deterministic", "true"]


def launch(store, *args, module="baseline", wait=True):
    """``python -m entry.MODULE ARGS`` as a user runs it, one CPU thread per process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", f"entry.{module}", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def runs(store, stage=None):
    found = MlflowClient(store).search_runs(["0"])
    return [r for r in found if stage is None or r.data.tags.get("ttkd.stage") == stage]


def versions(store, name):
    return MlflowClient(store).search_model_versions(f"name = '{name}'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the pieces, in one process ---------------------------------------------------------------

def test_shards_of_a_batch_are_that_batch_cut_in_order_with_the_same_augmentation():
    d = data.load("digits")
    whole = list(data.batches(d, "train", 50, generator=torch.Generator().manual_seed(3), indices=True))
    for size in (2, 3):
        parts = [list(data.batches(d, "train", 50, generator=torch.Generator().manual_seed(3), indices=True,
                                   part=lambda n, r=r: slice(r * n // size, (r + 1) * n // size)))
                 for r in range(size)]
        for step, (x, y, idx) in enumerate(whole):
            assert torch.equal(torch.cat([p[step][2] for p in parts]), idx)
            assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
            assert torch.equal(torch.cat([p[step][0] for p in parts]), x)  # same crops and flips


def test_a_batch_size_that_leaves_a_process_without_images_is_refused():
    engine.check_world(1437, 64, 2)  # last batch 29 images
    with pytest.raises(engine.TTKDError, match="the last batch \\(1 images\\)"):
        engine.check_world(65, 64, 2)
    with pytest.raises(engine.TTKDError, match="each batch"):
        engine.check_world(100, 2, 4)


def test_outside_a_process_group_the_helpers_change_nothing():
    assert distributed.world() is None and distributed.size() == 1
    assert distributed.agree(True, 7) == (True, 7)
    assert distributed.shard(10) == slice(0, 10)
    t = torch.tensor([1.0, 2.0])
    assert distributed.total(t) is t and t.tolist() == [1.0, 2.0]


def test_the_objective_module_trains_the_methods_own_parameters_too():
    """DDP averages the gradients of what runs in its module's forward: a FitNet regressor
    must be part of it, not a separate call."""
    d = data.load("digits")
    student = models.build("cnn", d.num_classes, d.in_channels, image_size=8)
    teacher = models.build("cnn", d.num_classes, d.in_channels, image_size=8, width=48)
    method = build_method("fitnet", "distill", d, student, teacher, {"fitnet_beta": 100.0}, "cnn", "cnn")
    objective = engine.Objective(student, method, fast=False, features=True)
    x, y = next(data.batches(d, "train", 16))
    objective(x, y, epoch=1, **engine.partner_outputs(teacher.eval(), x, False, True))["loss"].backward()
    own = [p for p in method.parameters() if p.requires_grad]
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert set(map(id, objective.parameters())) == set(map(id, [*student.parameters(), *method.parameters()]))
    assert kd.get("fitnet").features


# ---- bad input: one line, nothing started --------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "invalid nproc: '0'; nproc must be an integer >= 1"),
    (["--nnodes", "2"], "nnodes > 1 needs rdzv_endpoint=HOST:PORT"),
    (["--nnodes", "2", "--node_rank", "2", "--rdzv_endpoint", "h:1"], "node_rank 2 is not below nnodes 2"),
    (["--rdzv_endpoint", "nohost"], "invalid rdzv_endpoint: 'nohost'"),
])
def test_bad_launch_parameters_are_one_line_and_start_nothing(store, cli, args, message):
    status, out, err = cli("baseline", *args)
    assert status != 0 and message in err and len(err.strip().splitlines()) == 1
    assert runs(store) == []


def test_launch_parameters_that_do_not_fit_the_rest_are_refused(store, cli, tmp_path):
    status, _, err = cli("sweep", "--nproc", "2", "--jobs", "2")
    assert status == 1 and "runs its points one at a time; drop jobs" in err
    status, _, err = cli("distill", "--nproc", "2", "--teacher", "t", "--method", "crd")
    assert status == 1 and "run crd with nproc=1" in err
    preset = tmp_path / "p.toml"
    preset.write_text('stage = "baseline"\nnproc = 2\n')
    status, _, err = cli("baseline", "--preset", str(preset))
    assert status == 1 and "sets nproc: where a run trains is given on the command line" in err
    assert runs(store) == []


def test_more_processes_than_cores_is_a_warning_not_an_error():
    many = distributed.Launch(nproc=(os.cpu_count() or 1) + 1)
    assert "more than this machine's" in many.check("cpu")[0]
    assert distributed.Launch(nproc=1).check("cpu") == []


@pytest.mark.slow
def test_a_rendezvous_endpoint_that_does_not_answer_fails_within_its_timeout(store):
    start = time.monotonic()
    status, out, err = launch(store, "--nnodes", "2", "--node_rank", "1", "--rdzv_timeout", "5",
                              "--rdzv_endpoint", f"127.0.0.1:{free_port()}")
    assert status == 1 and time.monotonic() - start < 60
    lines = [line for line in err.strip().splitlines() if line.startswith("ttkd")]
    assert lines and "could not meet at 127.0.0.1:" in lines[-1] and "within 5 s" in lines[-1]
    assert runs(store) == []


# ---- end to end -----------------------------------------------------------------------------------

def _worker(launcher: int, local_rank: int) -> int:
    """The pid of the training process of ``local_rank`` that ``launcher`` started."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no process of local rank {local_rank} under {launcher}")


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_job_clearly_and_resume_finishes_it(store):
    args = ["--nproc", "2", "--arch", "cnn", "--batch_size", "8", "--epochs", "2", "--deterministic", "true"]
    proc = launch(store, *args, wait=False)
    client = MlflowClient(store)
    deadline = time.time() + 240
    while time.time() < deadline:
        running = [r for r in runs(store) if r.info.status == "RUNNING"]
        if running and client.get_metric_history(running[0].info.run_id, "val_acc"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage did not finish an epoch in time")
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    run = runs(store)[0]
    assert "was killed by SIGKILL" in err and f"resume={run.info.run_id}" in err
    assert run.info.status == "FAILED" and versions(store, "digits-cnn") == []

    status, out, err = launch(store, "--nproc", "2", "--resume", "last")
    assert status == 0, err
    assert f"resuming run {run.info.run_id}" in out
    assert [r.info.status for r in runs(store)] == ["FINISHED"]
    assert len(versions(store, "digits-cnn")) == 1
    assert len(history(client, run.info.run_id, "val_acc")) == 2


@pytest.mark.slow
def test_two_machines_on_127_0_0_1_train_one_model(store):
    """Two launchers, as two machines would run them; the second gives only where it runs."""
    endpoint = f"127.0.0.1:{free_port()}"
    lead = launch(store, *EPOCHS, "--register_as", "pair", "--nnodes", "2", "--node_rank", "0",
                  "--rdzv_endpoint", endpoint, wait=False)
    status, out, err = launch(store, "--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", endpoint)
    lead_out, lead_err = lead.communicate(timeout=300)
    assert status == 0 and lead.returncode == 0, err + lead_err
    assert out == "" and "registered models:/pair/1" in lead_out
    (run,) = runs(store)
    assert run.data.params["world_size"] == "2" and len(versions(store, "pair")) == 1


@pytest.mark.slow
def test_the_whole_study_with_two_processes_matches_one_with_one_run_and_version_per_stage(store):
    """The same global batch, seed and deterministic kernels. Without BatchNorm (the mlp
    student) two processes compute the same gradient as one, so every figure agrees up to
    float rounding (the all-reduce adds the two halves in another order): 1e-5 relative.
    The cnn teachers have BatchNorm, which normalises each process's half batch on its
    own, so they (and the students they teach) may differ by a few validation images:
    within 1.5 points (5 of the 360 images; one seed's spread is larger, see the README)."""
    status, out, err = launch(store, *EPOCHS, "--register_as", "one", module="main")
    assert status == 0, err
    status, out, err = launch(store, *EPOCHS, "--nproc", "2", "--register_as", "two", module="main")
    assert status == 0, err
    client = MlflowClient(store)
    roles = ("student", "teacher-normal", "teacher-trained", "student-kd-normal", "student-kd-trained")
    for role in roles:
        (a,), (b,) = versions(store, f"one-{role}"), versions(store, f"two-{role}")
        one, two = client.get_run(a.run_id), client.get_run(b.run_id)
        assert (one.data.params["world_size"], two.data.params["world_size"]) == ("1", "2")
        acc = [r.data.metrics["val_acc"] for r in (one, two)]
        assert abs(acc[0] - acc[1]) <= 1.5, (role, acc)
        if role == "student":
            for metric in ("train_loss", "val_loss", "val_acc"):
                a_, b_ = history(client, one.info.run_id, metric), history(client, two.info.run_id, metric)
                assert len(a_) == len(b_) == 2 and a_ == pytest.approx(b_, rel=1e-5), metric
    stage_runs = [r for r in runs(store) if "world_size" in r.data.params]
    assert len(stage_runs) == 10 and all(r.info.status == "FINISHED" for r in stage_runs)


@pytest.mark.slow
def test_a_signal_to_one_follower_stops_every_process_and_one_process_resumes(store):
    args = ["--nproc", "2", "--arch", "cnn", "--batch_size", "8", "--epochs", "2"]
    proc = launch(store, *args, wait=False)
    client = MlflowClient(store)
    deadline = time.time() + 240
    while time.time() < deadline:
        running = [r for r in runs(store) if r.info.status == "RUNNING"]
        if running and client.get_metric_history(running[0].info.run_id, "val_acc"):
            break
        time.sleep(0.1)
    os.kill(_worker(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    (run,) = runs(store)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM (sent to another process of this stage)" in err
    assert run.info.status == "KILLED" and versions(store, "digits-cnn") == []

    status, out, err = launch(store, "--resume", "last")  # another world size: one process
    assert status == 0, err
    assert f"resuming run {run.info.run_id} after epoch" in out and "with 1 process instead of 2" in out
    assert [r.info.status for r in runs(store)] == ["FINISHED"] and len(versions(store, "digits-cnn")) == 1
