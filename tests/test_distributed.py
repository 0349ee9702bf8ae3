"""Several processes training one stage: torchrun, DistributedDataParallel over gloo on
this CPU, one run and one registered version, agreement with one process, a killed
process, two "machines" on 127.0.0.1, and the launch parameters' bad input."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.servers import free_port
from tests.test_data import make_imagefolder
from tests.test_resume import history
from ttkd import data, distributed, engine, kd, models
from ttkd.build import build_method
from ttkd.step import Objective, partner_outputs

REPO = Path(__file__).resolve().parents[1]
# compared across process counts: float32 on every CPU, since bf16 autocast rounds a half
# batch's products otherwise than a whole batch's (1e-3 relative, not 1e-5)
EPOCHS = ["--epochs", "2", "--deterministic", "true", "--amp", "false"]


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


def test_a_process_reads_only_its_shard_of_a_folder_on_disk(tmp_path):
    """Streamed from disk, a shard is the same images, labels and augmentation as the
    same slice of the whole batch held in memory."""
    make_imagefolder(tmp_path, classes=("a", "b", "c"), size=(12, 12))
    memory = data.load("imagefolder", str(tmp_path), stream=False)
    disk = data.load("imagefolder", str(tmp_path), stream=True)
    disk = dataclasses.replace(disk, train_x=data.ImageFiles(disk.train_x.paths, (12, 12), "RGB", 0))
    second = lambda n: slice(n // 2, n)  # noqa: E731  (process 1 of 2)
    whole = data.batches(memory, "train", 5, generator=torch.Generator().manual_seed(1))
    shard = data.batches(disk, "train", 5, generator=torch.Generator().manual_seed(1), part=second)
    pairs = list(zip(whole, shard, strict=True))
    assert pairs
    for (x, y), (xs, ys) in pairs:
        assert torch.equal(y[second(len(y))], ys)
        torch.testing.assert_close(x[second(len(y))], xs)


def test_a_batch_size_that_leaves_a_process_too_few_images_is_refused():
    engine.check_batch(1437, 360, 64, 2)  # last batches: 29 and 40 images
    engine.check_batch(100, 3, 2, 1)  # one process: anything goes
    with pytest.raises(engine.TTKDError, match="the last training batch \\(3 images\\)"):
        engine.check_batch(67, 64, 64, 2)
    with pytest.raises(engine.TTKDError, match="the last validation batch \\(1 images\\)"):
        engine.check_batch(128, 65, 64, 2)
    with pytest.raises(engine.TTKDError, match="each batch"):
        engine.check_batch(100, 100, 3, 2)


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
    objective = Objective(student, method, fast=False, features=True)
    x, y = next(data.batches(d, "train", 16))
    objective(x, y, epoch=1, **partner_outputs(teacher.eval(), x, False, True))["loss"].backward()
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


def test_the_process_killed_outright_is_named_not_the_one_torchrun_stopped_with_sigterm(monkeypatch):
    """torchrun reports the killed process and the others it then stopped with SIGTERM in one
    failure, with timestamps in whole seconds: the SIGKILL is the cause, whatever its rank."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fails(args):
        failures = {0: ProcessFailure(0, 100, -signal.SIGTERM, ""), 1: ProcessFailure(1, 101, -signal.SIGKILL, "")}
        for f in failures.values():
            f.timestamp = 1_000
        raise ChildFailedError("entry.baseline", failures)

    monkeypatch.setattr(torchrun, "main", fails)
    monkeypatch.setenv(distributed.LEADS, "")  # relaunch sets these for the processes: put back after
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    with pytest.raises(distributed.Lost, match=r"process 1 of 2 \(pid 101\) was killed by SIGKILL"):
        distributed.relaunch("entry.baseline", [], distributed.Launch(nproc=2))


@pytest.mark.slow
def test_a_rendezvous_endpoint_that_does_not_answer_fails_within_its_timeout(store):
    start = time.monotonic()
    status, out, err = launch(store, "--nnodes", "2", "--node_rank", "1", "--rdzv_timeout", "2",
                              "--rdzv_endpoint", f"127.0.0.1:{free_port()}")
    assert status == 1 and time.monotonic() - start < 60
    lines = [line for line in err.strip().splitlines() if line.startswith("ttkd")]
    assert lines and "could not meet at 127.0.0.1:" in lines[-1] and "within 2 s" in lines[-1]
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
def test_two_machines_on_127_0_0_1_run_a_sweep_whose_points_all_train_on_both(store):
    """Two launchers, as two machines would run them; the second gives only where it runs
    and takes everything else from node 0, point after point."""
    endpoint = f"127.0.0.1:{free_port()}"
    lead = launch(store, "--seeds", "7,", "--weights", "0", "--epochs", "1", "--register_as", "pair",
                  "--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", endpoint, module="sweep", wait=False)
    status, out, err = launch(store, "--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", endpoint,
                              module="sweep")
    lead_out, lead_err = lead.communicate(timeout=300)
    assert status == 0 and lead.returncode == 0, err + lead_err
    assert out == "" and "## Students: val_acc (%) over 1 seed" in lead_out
    points = [r for r in runs(store) if "world_size" in r.data.params]
    assert len(points) == 3 and {r.data.params["world_size"] for r in points} == {"2"}
    assert {r.data.params["seed"] for r in points} == {"7"}
    for name in ("pair-student", "pair-teacher", "pair-student-kd"):
        assert len(versions(store, name)) == 1


@pytest.mark.slow
def test_the_whole_study_with_two_processes_matches_one_with_one_run_and_version_per_stage(store):
    """The same global batch, seed and deterministic kernels. Without BatchNorm (the mlp
    student) two processes compute the same gradient as one, so every figure agrees up to
    float rounding (the all-reduce adds the two halves in another order): 1e-5 relative.
    The cnn teachers have BatchNorm, which normalises each process's half batch on its
    own, so they (and the students they teach) may differ by a few validation images:
    within 1.5 points (5 of the 360 images; one seed's spread is larger, see docs/how-to/several-gpus.md)."""
    one = launch(store, *EPOCHS, "--register_as", "one", module="main", wait=False)  # both at once
    status, out, err = launch(store, *EPOCHS, "--nproc", "2", "--register_as", "two", module="main")
    assert status == 0, err
    assert one.wait(timeout=600) == 0, one.communicate()[1]
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


def _after_epochs(store, proc, epochs: int) -> None:
    """Wait until the RUNNING run has logged ``epochs`` epochs."""
    client = MlflowClient(store)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        running = [r for r in runs(store) if r.info.status == "RUNNING"]
        if running and len(client.get_metric_history(running[0].info.run_id, "val_acc")) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError(f"the stage did not reach epoch {epochs} in time")


@pytest.mark.slow
def test_a_signal_or_a_kill_9_to_one_process_stops_all_and_resume_finishes(store):
    args = ["--nproc", "2", "--arch", "cnn", "--batch_size", "16", "--epochs", "4", "--deterministic", "true"]
    # SIGTERM to one follower: every process stops after the same step, the run is KILLED
    proc = launch(store, *args, wait=False)
    _after_epochs(store, proc, 1)
    os.kill(_worker(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    (run,) = runs(store)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM (sent to another process of this stage)" in err
    assert run.info.status == "KILLED" and versions(store, "digits-cnn") == []

    # resumed on two processes, then kill -9 of one mid-epoch: a clear message, the run FAILED
    proc = launch(store, "--nproc", "2", "--resume", "last", wait=False)
    _after_epochs(store, proc, 2)
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "was killed by SIGKILL" in err and f"resume={run.info.run_id}" in err, out + err
    assert runs(store)[0].info.status == "FAILED" and versions(store, "digits-cnn") == []

    # resumed again, on one process: another world size works
    status, out, err = launch(store, "--resume", "last")
    assert status == 0, err
    assert f"resuming run {run.info.run_id} after epoch" in out and "with 1 process instead of 2" in out
    assert [r.info.status for r in runs(store)] == ["FINISHED"] and len(versions(store, "digits-cnn")) == 1
    assert len(history(MlflowClient(store), run.info.run_id, "val_acc")) == 4
