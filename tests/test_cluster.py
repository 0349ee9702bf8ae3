"""Sweeps on a Ray cluster: a real cluster of two nodes on 127.0.0.1 (each `ray start` in a
process group of its own) in front of a real MLflow server, against the same sweep run
on this machine's pool."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ttkd import presets, stages
from ttkd.errors import TTKDError

from . import servers
from .test_resume import REPO
from .test_sweep import SMALL, accuracy_tables

EPOCHS = 4  # a point's epochs, of batches of 32: a node can be killed in the middle of one


def small(prefix: str) -> list[str]:
    """The sweep tests' small sweep, with EPOCHS epochs, registering under ``prefix``."""
    args = [prefix if a == "sw" else a for a in SMALL]
    args[args.index("--epochs") + 1] = str(EPOCHS)
    return args + ["--batch_size", "32"]


def mid_run(client: MlflowClient, run, at_most: int = EPOCHS - 2) -> bool:
    """A running point with a checkpoint and at most ``at_most`` epochs done (more to train)."""
    done = len(client.get_metric_history(run.info.run_id, "val_acc"))
    return run.info.status == "RUNNING" and 1 <= done <= at_most


def sweep_env(uri: str) -> dict[str, str]:
    return {**os.environ, **servers.RAY_ENV, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}


def start_sweep(uri: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "entry.sweep", *args], env=sweep_env(uri),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(client: MlflowClient, parent_id: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def sweeps(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`ttkd.stage` = 'sweep'", order_by=["attributes.start_time DESC"])


def ttkd_lines(err: str) -> list[str]:
    """stderr without the lines MLflow logs when it creates a fresh SQLite store."""
    return [line for line in err.splitlines() if " INFO mlflow." not in line]


def report_of(out: str) -> str:
    return accuracy_tables(out)


# ---- bad input: one line, nothing started -------------------------------------------------------

@pytest.mark.parametrize("given, message", [
    ({"cluster": "auto", "jobs": "2"}, "cluster=auto with jobs=2: on a cluster Ray decides how many points"),
    ({"cluster": "auto", "nproc": "2"}, "cluster=auto with nproc=2: each point of a cluster sweep is one process"),
    ({"cluster": "auto", "cpus_per_point": "0"}, "invalid cpus_per_point: '0'; cpus_per_point must be a number > 0"),
    ({"cluster": "auto", "gpus_per_point": "1.5"}, "invalid gpus_per_point: '1.5'; gpus_per_point must be 0, a fraction up to 1"),
    ({"cluster": "somewhere"}, "invalid cluster: 'somewhere'"),
    ({"gpus_per_point": "0.25"}, "gpus_per_point places points on a Ray cluster, and no cluster is given"),
])
def test_bad_cluster_input_is_refused_before_anything_starts(given, message):
    with pytest.raises(TTKDError) as exc:
        presets.resolve("sweep", given)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cluster_without_ray_installed_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(TTKDError, match=r"^cluster= needs Ray, an optional extra: pip install -e '\.\[cluster\]'$"):
        presets.resolve("sweep", {"cluster": "auto"})


def test_a_store_only_this_machine_reads_is_refused_with_a_cluster(store, cli):
    status, _, err = cli("sweep", "--seeds", "1", "--epochs", "1", "--cluster", "127.0.0.1:6379")
    assert status == 1 and err.count("\n") == 1, err
    assert ("cluster=127.0.0.1:6379 needs a tracking server every node can reach, and the tracking store is "
            f"{store}") in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-server")
    with servers.mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts") as url:
        yield url


def test_an_address_that_does_not_answer_is_one_line_naming_it(server, tmp_path):
    address = f"127.0.0.1:{servers.free_port()}"
    start = time.time()
    proc = start_sweep(server, "--seeds", "1", "--epochs", "1", "--cluster", address, "--experiment", "nobody")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith(f"ttkd sweep: error: cannot join the Ray cluster at {address} (")
    assert "Connection refused" in err
    assert time.time() - start < 30 + 15  # the answer's own limit, plus starting Python
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("nobody")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_more_gpus_per_point_than_any_node_has_is_one_line_naming_the_nodes(store, cli):
    status, _, err = cli("sweep", "--seeds", "1", "--epochs", "1", "--cluster", "local", "--gpus_per_point", "1")
    assert status == 1 and len(ttkd_lines(err)) == 1, err
    assert "no node of the cluster has cpus_per_point=1 and gpus_per_point=1 free for one point" in err
    assert f"its 1 node has: {os.cpu_count()} CPU, 0 GPU" in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert MlflowClient().search_registered_models() == []


# ---- a real two-node cluster ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small sweep on this machine, one job, never interrupted: its report and each point's val_acc."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('local') / 'one.db'}"
    proc = start_sweep(uri, *small("cl"), "--jobs", "1")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    client = MlflowClient(uri)
    parent = sweeps(client)[0]
    points = {r.data.tags["ttkd.point"]: r.data.metrics["val_acc"] for r in children(client, parent.info.run_id)}
    return report_of(out), points


EPOCH_DELAY_S = 0.5  # each epoch of a point on the cluster waits this long, so that a point is
                     # mid-run for seconds (EPOCHS of them), far longer than the tests take to act


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    freeze = tmp_path_factory.mktemp("partition") / "freeze"  # made by a test: the worker's point stops itself
    with servers.ray_cluster((1, 1), env={stages.TEST_EPOCH_DELAY: str(EPOCH_DELAY_S)},
                             worker_env={stages.TEST_FREEZE_FILE: str(freeze)}) as cluster:
        cluster.freeze = freeze
        yield cluster


@pytest.mark.slow  # starts the two-node cluster
def test_the_test_cluster_and_cluster_local_refuse_a_process_without_their_token(nodes, monkeypatch):
    import ray

    from ttkd.studies.schedulers import ray as scheduler

    assert not scheduler.accepts_unauthenticated(nodes.address)  # (the sweeps below join with the token)
    for key in scheduler.AUTH_ENV:
        monkeypatch.delenv(key, raising=False)
    with scheduler.RayCluster(scheduler.Placement("local")):
        address = ray.get_runtime_context().gcs_address
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) >= 32
        assert not scheduler.accepts_unauthenticated(address)
    assert not any(key in os.environ for key in scheduler.AUTH_ENV)  # this process's settings, as they were


@pytest.mark.slow  # starts a cluster of its own
def test_a_cluster_that_runs_jobs_without_a_token_is_refused_unless_cluster_auth_none(monkeypatch):
    import ray

    from ttkd.studies.schedulers import ray as scheduler

    with servers.ray_cluster((1, 1), env={"RAY_AUTH_MODE": "disabled"}, workers=0) as open_cluster:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        with pytest.raises(TTKDError) as exc:
            scheduler.RayCluster(scheduler.Placement(open_cluster.address)).__enter__()
        assert str(exc.value).startswith(f"the Ray cluster at {open_cluster.address} (")
        assert "runs jobs for anyone who reaches its ports, without Ray's token authentication" in str(exc.value)
        assert str(exc.value).endswith("or pass cluster_auth=none to use it as it is")
        assert not ray.is_initialized()
        with scheduler.RayCluster(scheduler.Placement(open_cluster.address, auth="none")):
            assert len(ray.nodes()) == 1


def snapshot(client: MlflowClient, run_id: str) -> dict:
    """All a run holds and what the registry holds: what a cut-off attempt must leave alone."""
    run = client.get_run(run_id)
    return {"info": (run.info.status, run.info.end_time), "params": run.data.params, "tags": run.data.tags,
            "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics},
            "files": sorted((f.path, f.file_size) for f in client.list_artifacts(run_id, "checkpoints")),
            "versions": sorted((v.name, v.version, v.run_id) for v in client.search_model_versions())}


@pytest.mark.slow
def test_a_node_cut_off_mid_sweep_writes_nothing_once_its_point_is_retried_and_loses_nothing(
        server, nodes, reference):
    """A partition, then the node's loss: the worker node's point freezes itself right after an
    epoch's writes, the rest of the node is frozen until the head declares it dead and the sweep
    finishes with the point retried on the head; thawed, the old attempt must stop at its next write."""
    import psutil

    client = MlflowClient(server)
    head = next(n["id"] for n in nodes.alive() if n["head"] == "1")
    proc = subprocess.Popen([sys.executable, "-m", "entry.sweep", *small("cl"), "--cluster", nodes.address,
                             "--experiment", "cluster-cut"], env=sweep_env(server),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def on_worker() -> list:
        found = sweeps(client)
        runs = children(client, found[0].info.run_id) if found else []
        return [r for r in runs if r.data.tags.get("ttkd.node", head) != head]

    def frozen() -> list:
        found = []
        for p in psutil.Process(nodes.worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() == psutil.STATUS_STOPPED:
                    found.append(p)
        return found

    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if any(r.info.status == "FINISHED" for r in on_worker()):  # the worker has trained a point
            nodes.freeze.touch()  # its next epoch to end freezes its process after the epoch's writes
            break
        time.sleep(0.3)
    while time.time() < deadline and proc.poll() is None and not frozen():
        time.sleep(0.1)
    assert len(frozen()) == 1, proc.communicate(timeout=60)
    task = frozen()[0]
    for node_proc in [psutil.Process(nodes.worker.pid), *psutil.Process(nodes.worker.pid).children(recursive=True)]:
        node_proc.suspend()  # the whole node is cut off: raylet, its `ray start`, every worker
    try:
        victims = [r for r in on_worker() if r.info.status == "RUNNING"]
        assert len(victims) == 1 and client.get_metric_history(victims[0].info.run_id, "val_acc")
        out, err = proc.communicate(timeout=600)  # the head declares the node dead; Ray retries the point
        assert proc.returncode == 0, err
        victim = victims[0].info.run_id
        before = snapshot(client, victim)
        assert before["tags"]["ttkd.node"] == head and "ttkd.resumed_after_epoch" in before["tags"]

        task.resume()  # the cut-off attempt goes on: its next write is where it must stop
        logs = []
        deadline = time.time() + 120
        while time.time() < deadline and not any("warning: attempt" in f.read_text() for f in logs):
            time.sleep(0.5)
            logs = list((nodes.root / "session_latest" / "logs").glob(f"worker-*-{task.pid}.err"))
        said = [line for f in logs for line in f.read_text().splitlines() if line.startswith("warning: ")]
        assert said == [f"warning: attempt 1.0 at run {victim} of point '{before['tags']['ttkd.point']}' was "
                        f"superseded by attempt 1.1 (the same run), a retry elsewhere; it writes nothing more"]
        assert snapshot(client, victim) == before
    finally:
        nodes.kill(nodes.worker)

    parent = sweeps(client)[0]
    runs = children(client, parent.info.run_id)
    assert {r.info.status for r in runs} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert len({r.data.tags["ttkd.node"] for r in runs}) == 2  # both nodes trained points
    assert sorted(r.data.tags["ttkd.point"] for r in runs) == sorted(reference[1])  # one run per point
    models = {m.name: len(client.search_model_versions(f"name = '{m.name}'")) for m in client.search_registered_models()}
    assert models == {"cl-student": 2, "cl-teacher": 4, "cl-student-kd": 4}  # every model registered once
    assert {r.data.tags["ttkd.point"]: r.data.metrics["val_acc"] for r in runs} == reference[1]
    assert report_of(out) == reference[0]


@pytest.mark.slow
def test_sigterm_stops_a_cluster_sweep_and_resume_finishes_it_on_the_cluster(server, nodes, reference):
    client = MlflowClient(server)
    if len(nodes.alive()) < 2:  # the worker was killed by the test before: a new one joins
        nodes.add_worker()
    experiment = "cluster-term"
    proc = start_sweep(server, *small("ct"), "--cluster", nodes.address, "--experiment", experiment)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:  # half-way: once some point is mid-run
        found = [s for s in sweeps(client) if client.get_experiment(s.info.experiment_id).name == experiment]
        runs = children(client, found[0].info.run_id) if found else []
        if any(mid_run(client, r) for r in runs):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM with" in err and "is marked KILLED" in err
    parent = sweeps(client)[0]
    assert parent.info.status == "KILLED"
    runs = children(client, parent.info.run_id)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and "KILLED" in {r.info.status for r in runs}

    resumed = start_sweep(server, "--resume", "last", "--experiment", experiment, "--cluster", nodes.address)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    runs = children(client, parent.info.run_id)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert {r.data.tags["ttkd.point"]: r.data.metrics["val_acc"] for r in runs if r.info.status == "FINISHED"} \
        == reference[1]
    assert all(r.info.status != "RUNNING" for r in runs)
    assert report_of(out) == reference[0]



@pytest.mark.slow
def test_a_search_on_the_cluster_nests_every_trial_under_its_run_and_tells_one_study(server, nodes, tmp_path):
    import optuna

    from ttkd.studies import trials
    from ttkd.studies.schedulers.ray import TAG_NODE

    client = MlflowClient(server)
    if len(nodes.alive()) < 2:  # the worker was killed by a test before: a new one joins
        nodes.add_worker()
    storage = tmp_path / "optuna.log"  # one file both nodes reach, as a shared file system would be
    proc = subprocess.Popen([sys.executable, "-m", "entry.search", "--space", "lr=0.01:0.3:log;batch_size=32,64",
                             "--trials", "8", "--epochs", "1", "--amp", "false", "--compile", "false",
                             "--cluster", nodes.address, "--storage", str(storage), "--experiment", "cluster-search"],
                            env=sweep_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    experiment = client.get_experiment_by_name("cluster-search").experiment_id
    [parent] = client.search_runs([experiment], "tags.`ttkd.stage` = 'search'")
    runs = children(client, parent.info.run_id)
    assert sorted(int(r.data.tags["ttkd.trial"]) for r in runs) == list(range(8))
    assert all(r.info.status == "FINISHED" and "holdout_acc" in r.data.metrics for r in runs)
    assert len({r.data.tags[TAG_NODE] for r in runs}) == 2  # both nodes trained trials
    study = optuna.load_study(study_name=parent.info.run_id, storage=trials.storage(str(storage)))
    assert len(study.trials) == 8 and all(t.state.is_finished() for t in study.trials)
    assert out.count("] trial ") == 8 and "best: trial " in out


def test_a_node_without_the_data_set_or_with_another_ttkd_fails_its_point_naming_itself(monkeypatch, tmp_path):
    import ray

    from ttkd.studies.plan import Point, Task
    from ttkd.studies.schedulers import ray as scheduler

    class Context:
        def get_node_id(self):
            return "ab12cd34ef56" + "0" * 44
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    missing = tmp_path / "cifar100"
    task = Task(Point("student", 0), "baseline", {"data_dir": str(missing), "tags": {}})
    outcome = scheduler.train_on_node(task, 1, "http://127.0.0.1:1", {}, scheduler.VERSION)
    assert outcome.result is None and outcome.error == (
        f"node {os.uname().nodename} (ab12cd34ef56) has no data set at {missing}; put it at that path on "
        f"every node (or on a file system they share)")
    outcome = scheduler.train_on_node(task, 1, "http://127.0.0.1:1", {}, "0.0.1")
    assert outcome.error.startswith(f"node {os.uname().nodename} (ab12cd34ef56) runs ttkd {scheduler.VERSION} "
                                    f"and the sweep ttkd 0.0.1; install the same ttkd on every node")
