"""A team's ttkd: experiments that keep people's runs apart, and a tracking server on a
real PostgreSQL database."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests import servers
from tests.test_resume import poison
from ttkd.errors import TTKDError
from ttkd.kd.logits import CrossEntropy
from ttkd.tracking import registry

REPO = Path(__file__).resolve().parents[1]


def experiment_of(run_id: str) -> str:
    return MlflowClient().get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def test_runs_go_in_the_experiment_given_and_resume_last_looks_only_there(store, cli, monkeypatch):
    undo = poison(monkeypatch, CrossEntropy)
    status, _, err = cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false", "--experiment", "alice")  # fails in epoch 2
    assert status == 1, err
    undo()
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert experiment_of(run.info.run_id) == "alice" and run.info.status == "FAILED"

    # bob's resume=last does not pick alice's run, even though it is the newest unfinished one
    status, _, err = cli("baseline", "--resume", "last", "--experiment", "bob")
    assert status == 1 and ("no unfinished baseline run to resume in experiment 'bob'; start one without "
                            "resume, or give the experiment it ran in (experiment=NAME)") in err
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alice")  # the environment names it as well
    status, out, err = cli("baseline", "--resume", "last")
    assert status == 0, err
    assert f"resume=last: run {run.info.run_id} (baseline mlp, FAILED, started " in out
    assert "in experiment 'alice'" in out
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"

    # MLflow's UI opens both experiments in its model-training view; a kind set by hand is kept
    client = MlflowClient()
    kinds = {e.name: e.tags.get("mlflow.experimentKind") for e in client.search_experiments()}
    assert kinds["alice"] == kinds["bob"] == "custom_model_development"
    client.set_experiment_tag(client.get_experiment_by_name("bob").experiment_id, "mlflow.experimentKind",
                              "genai_development")
    assert cli("baseline", "--resume", "last", "--experiment", "bob")[0] == 1
    assert client.get_experiment_by_name("bob").tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_opened_by_mlflow_run_in_the_same_experiment_is_the_stages_run(store, cli, monkeypatch):
    team = MlflowClient().create_experiment("team")
    launcher = MlflowClient().create_run(team).info.run_id  # as `mlflow run --experiment-name team` does
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    status, _, err = cli("baseline", "--epochs", "1", "--experiment", "team")
    assert status == 0, err
    [run] = mlflow.search_runs([team], output_format="list")
    assert run.info.run_id == launcher and run.data.tags["ttkd.stage"] == "baseline"


def test_a_deleted_experiment_is_one_line_saying_how_to_restore_it(store, cli):
    gone = MlflowClient().create_experiment("gone")
    MlflowClient().delete_experiment(gone)
    status, _, err = cli("baseline", "--epochs", "1", "--experiment", "gone")
    assert status == 1 and err.count("\n") == 1
    assert (f"experiment 'gone' is deleted (MLflow keeps it in its trash, and its name taken): restore it "
            f"with `mlflow experiments restore --experiment-id {gone}`, or give another experiment name") in err
    assert MlflowClient().search_runs([gone]) == []


# ---- a real PostgreSQL, and a real tracking server in front of it ------------------------------

@pytest.fixture(scope="module")
def database(tmp_path_factory):
    with servers.postgres(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg


@pytest.fixture(scope="module")
def server(database, tmp_path_factory):
    with servers.mlflow_server(database.create_database("mlflow"), tmp_path_factory.mktemp("artifacts")) as url:
        yield url


@pytest.fixture()
def tracking(monkeypatch, tmp_path):
    """Point ttkd (in this process and the ones it starts) at ``uri``."""
    monkeypatch.chdir(tmp_path)

    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return uri
    yield use
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def test_a_database_store_that_cannot_be_used_is_one_line_naming_the_fix(database, tracking):
    cases = [
        (database.uri("postgres", password="wrong"), 'password authentication failed for user "ttkd"'),
        (database.uri("missing"), 'database "missing" does not exist'),
        (f"postgresql://ttkd:x@127.0.0.1:{servers.free_port()}/mlflow", "Connection refused"),  # a server that is down
    ]
    for uri, reason in cases:
        tracking(uri)
        with pytest.raises(TTKDError) as exc:
            registry.prepare_store()
        shown = uri.replace(":wrong@", ":***@").replace(f":{servers.PASSWORD}@", ":***@").replace(":x@", ":***@")
        assert str(exc.value).startswith(f"cannot connect to the tracking database {shown} (")
        assert reason in str(exc.value) and "\n" not in str(exc.value)
    tracking(database.uri("mlflow").replace("postgresql://", "postgresql+pg8000://"))
    with pytest.raises(TTKDError, match=r"needs a database driver that is not installed \(No module named "
                                        r"'pg8000'\); for PostgreSQL: pip install -e '\.\[server\]'$"):
        registry.prepare_store()


@pytest.mark.slow
def test_processes_that_start_on_a_fresh_postgresql_database_at_once_create_its_tables_once(database, tracking):
    uri = tracking(database.create_database("fresh"))
    prepare = "from ttkd.tracking import registry; registry.prepare_store()"
    procs = [subprocess.Popen([sys.executable, "-c", prepare], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]


@pytest.mark.slow
def test_the_stages_and_promote_run_through_a_tracking_server_on_postgresql(server, tracking, cli):
    tracking(server)
    steps = [("baseline", "--register_as", "pg-student"),
             ("teach", "--student", "pg-student", "--register_as", "pg-teacher"),
             ("distill", "--teacher", "pg-teacher@champion", "--register_as", "pg-kd")]
    for name, *args in steps:
        status, _, err = cli(name, "--epochs", "1", "--experiment", "pg-team", *args)
        assert status == 0, f"{name}: {err}"
        if name != "distill":
            assert cli("promote", "--model", args[-1])[0] == 0
    status, out, err = cli("promote", "--model", "pg-kd")
    assert status == 0 and "pg-kd" in out, err
    client = MlflowClient(server)
    kd = client.get_model_version_by_alias("pg-kd", "champion")
    assert kd.tags["ttkd.partner_model"] == "models:/pg-teacher/1"
    assert client.get_model_version("pg-teacher", "1").tags["ttkd.partner_model"] == "models:/pg-student/1"
    run = client.get_run(kd.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "pg-team" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # the server keeps the artifacts
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(kd.run_id, "checkpoints")}

    # two stages registering the same name at once, both through the server
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "entry.baseline", "--epochs", "1", "--register_as", "pg-both",
                               "--experiment", "pg-team"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'pg-both'")) == [1, 2]


def test_a_data_set_that_another_stage_records_at_the_same_moment_is_linked_not_a_failure(store, monkeypatch):
    from ttkd import data, tracking
    real, calls = mlflow.log_input, []

    def racing(dataset, context=None, **kw):  # the other stage inserted the same data set first
        calls.append(context)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                    "datasets.experiment_id, datasets.name, datasets.digest")
        return real(dataset, context=context, **kw)
    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        tracking.log_dataset(data.load("digits"))
    assert calls == ["training", "training", "validation"]
    assert {d.dataset.name for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs} == {
        "digits-training", "digits-validation"}
