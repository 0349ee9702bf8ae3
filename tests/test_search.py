"""Searches: the space, the holdout split a trial is evaluated on, Optuna's trials as nested
runs, pruning, and kill -9 then resume."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from math import nan

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from ttkd import data as datasets
from ttkd import engine, stages
from ttkd.engine import EpochStats
from ttkd.errors import TTKDError
from ttkd.kd.logits import TrainedTeacher
from ttkd.parsing import Dist, parse_space, space_text
from ttkd.studies import search, trials

from .test_resume import env_for

# ---- the space --------------------------------------------------------------------------------

def test_a_space_takes_ranges_log_ranges_integers_and_choices_checked_by_each_parameters_row():
    space = parse_space("alpha=0.1:0.99;kd_temperature=1:16:log;epochs=2:5;method=kd,dkd;dkd_beta=2,8")
    assert dict(space) == {"alpha": Dist(0.1, 0.99), "kd_temperature": Dist(1.0, 16.0, log=True),
                           "epochs": Dist(2, 5, integer=True), "method": Dist(choices=("kd", "dkd")),
                           "dkd_beta": Dist(choices=(2.0, 8.0))}
    assert parse_space(space_text(space)) == space  # what a search logs reads back as it was


@pytest.mark.parametrize("raw, message", [
    ("alpha=0.9:0.1", "invalid space: alpha=0.9:0.1; a range goes from its low end to a higher one"),
    ("lr=0:0.1:log", "invalid lr: '0'; lr must be a number > 0"),
    ("alpha=0:1:log", "a log range cannot reach 0 or below it"),
    ("alpha=0.1:1.5", "invalid alpha: '1.5'; alpha must be a number in [0, 1]"),
    ("temprature=1:4", "invalid space: 'temprature=1:4'; write NAME=LOW:HIGH"),
    ("method=kd:dkd", "method is a word: write method=V1,V2"),
    ("alpha=0.1:0.5;alpha=0.7,", "alpha is given twice"),
    ("lr=0.1:0.2:lin", "lr is a number: write lr=LOW:HIGH or lr=LOW:HIGH:log"),
    ("seed=0:4", "seed is not searched"),
])
def test_a_bad_space_is_one_line_naming_what_to_write(raw, message):
    with pytest.raises(TTKDError) as exc:
        parse_space(raw)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("given, message", [
    ({}, "missing space: what the search tunes"),
    ({"space": "lr=0.01:0.1", "weight": "0.01"}, "weight configures the teacher a search trains when it has none, "
                                                 "and the space holds no distillation parameter; drop it"),
    ({"space": "alpha=0.1:0.9", "teacher": "t", "teacher_arch": "cnn"}, "teacher_arch configures the teacher a "
                                                                         "search trains when it has none, and teacher="),
    ({"space": "alpha=0.1:0.9", "teacher_arch": "nope"}, "invalid teacher_arch: 'nope'"),
    ({"space": "weight=0:0.05"}, "space: weight feeds the teacher, which this search does not train; give student="),
    ({"space": "weight=0:0.05", "student": "s", "teacher": "t"}, "teacher= searches a KD student from that teacher, "
                                                                "student= searches the teacher"),
    ({"space": "weight=0:0.05", "student": "nope"}, "no registered model named 'nope'"),
    ({"space": "weight=0:0.05", "student": "s", "weight": "0.01"}, "weight is both in the space and a parameter"),
    ({"space": "weight=0:200", "student": "s"}, "invalid weight: '200'; weight must be a number from -100 to 100"),
    ({"space": "lr=0.01:0.1", "alpha": "0.5"}, "alpha configures distillation, and no teacher is given"),
    ({"space": "temperature=1:8", "teacher": "t"}, "space: temperature feeds the teacher"),
    ({"space": "dkd_beta=1:8", "teacher": "t"}, "space: dkd_beta is read by none of the methods kd"),
    ({"space": "alpha=0.1:0.9", "teacher": "t", "alpha": "0.5"}, "alpha is both in the space and a parameter"),
    ({"space": "lr=0.01:0.1", "sampler": "grid"}, "sampler=grid tries every combination of values, and lr is a range"),
    ({"space": "lr=0.01,0.1", "sampler": "grid", "trials": "3"}, "sampler=grid has 2 combinations and trials=3"),
    ({"space": "lr=0.01:0.1", "trials": "0"}, "invalid trials: '0'; trials must be an integer >= 1"),
    ({"space": "lr=0.01:0.1", "holdout": "0.5"}, "invalid holdout: '0.5'; holdout must be a number above 0 and below 0.5"),
    ({"space": "lr=0.01:0.1", "holdout": "0"}, "invalid holdout: '0'"),
    ({"space": "lr=0.01:0.1", "nproc": "2"}, "a search trains each trial as one process; drop nproc=2"),
    ({"space": "lr=0.01:0.1", "sampler": "bayes"}, "invalid sampler: 'bayes'; sampler must be tpe, random, cmaes or grid"),
    ({"space": "alpha=0.1:0.9", "teacher": "nope"}, "no registered model named 'nope'"),
    ({"space": "student_arch=mlp,resnet8", "teacher": "nope", "method": "fitnet"}, "no registered model named"),
])
def test_bad_search_input_is_one_line_and_opens_nothing(store, cli, given, message):
    status, out, err = cli("search", *[a for k, v in given.items() for a in (f"--{k}", v)], "--epochs", "1")
    assert status == 1 and err.count("\n") == 1 and message in err, err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_search_without_optuna_names_the_extra(store, cli, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    status, _, err = cli("search", "--space", "lr=0.01:0.1")
    assert status == 1 and err == "ttkd search: error: a search needs Optuna, an optional extra: " \
                                  "pip install -e '.[search]'\n"


def test_a_trial_asks_a_methods_own_parameters_only_when_it_trains_that_method():
    space = parse_space("alpha=0.1:0.9;dkd_beta=1:8;kd_temperature=1:8:log;method=kd,dkd")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    asked = [search.asked(study.ask(), space, "kd") for _ in range(12)]
    assert {v["method"] for v in asked} == {"kd", "dkd"}
    for values in asked:
        own = {"kd": {"alpha"}, "dkd": {"dkd_beta"}}[values["method"]]
        assert set(values) == {"method", "kd_temperature"} | own, values
    plan = search.Trials("distill", "mlp", engine.TrainConfig(lr=0.05), "t/1", "kd",
                         {"kd": {"alpha": 0.9, "temperature": 4.0}, "dkd": {"dkd_beta": 8.0, "temperature": 4.0,
                                                                            "dkd_alpha": 1.0, "dkd_warmup": 20}},
                         {"dataset": "digits", "data_dir": None, "stream": None}, 0.1)
    point = search.TrialPoint(3)
    kw = plan.kwargs({"method": "dkd", "dkd_beta": 2.0, "kd_temperature": 2.5, "lr": 0.2}, "parent", point)
    assert kw["method_params"] == {"dkd_beta": 2.0, "temperature": 2.5, "dkd_alpha": 1.0, "dkd_warmup": 20}
    assert (kw["train"].lr, kw["partner"], kw["holdout"], kw["tags"]["ttkd.trial"]) == (0.2, "t/1", 0.1, "3")


def test_each_sampler_and_pruner_is_optunas_own_seeded_by_the_question():
    space = parse_space("lr=0.01,0.1;batch_size=32,64")
    made = {name: trials.sampler(name, 7, space) for name in ("tpe", "random", "cmaes", "grid")}
    assert [type(s).__name__ for s in made.values()] == ["TPESampler", "RandomSampler", "CmaEsSampler", "GridSampler"]
    assert made["grid"]._search_space == {"batch_size": [32, 64], "lr": [0.01, 0.1]}
    assert [type(trials.pruner(n)).__name__ for n in ("median", "halving", "none")] == [
        "MedianPruner", "SuccessiveHalvingPruner", "NopPruner"]
    first = optuna.create_study(sampler=trials.sampler("random", 7, space)).ask().suggest_float("x", 0, 1)
    again = optuna.create_study(sampler=trials.sampler("random", 7, space)).ask().suggest_float("x", 0, 1)
    assert first == again  # one seed, one question


# ---- the holdout split ------------------------------------------------------------------------

def test_the_holdout_is_carved_from_training_stratified_and_fixed_and_the_validation_split_is_gone():
    data = datasets.load("digits")
    a, b = data.holdout(0.1), data.holdout(0.1)
    assert a.evaluated_on == "holdout" and len(a.val_y) == round(0.1 * len(data.train_y))
    assert len(a.train_y) + len(a.val_y) == len(data.train_y)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)  # the same cut every time
    rows = {bytes(x.numpy()) for x in data.train_x}
    assert all(bytes(x.numpy()) in rows for x in (*a.val_x, *a.train_x))  # both halves are training images
    assert torch.equal(torch.sort(torch.cat([a.train_y, a.val_y])).values, torch.sort(data.train_y).values)
    counts = np.bincount(a.val_y.numpy(), minlength=10) / len(a.val_y)
    whole = np.bincount(data.train_y.numpy(), minlength=10) / len(data.train_y)
    assert np.abs(counts - whole).max() < 0.01  # stratified: each class in its share


def test_a_holdout_that_leaves_a_class_empty_is_one_line():
    data = datasets.load("digits")
    few = data.__class__(**{**data.__dict__, "train_x": data.train_x[:40], "train_y": data.train_y[:40]})
    with pytest.raises(TTKDError, match=r"^holdout=0\.1 of 40 training images leaves a class of digits with no image"):
        few.holdout(0.1)
    with pytest.raises(TTKDError, match="holdout must be a fraction of the training split above 0 and below 0.5"):
        data.holdout(0.5)


def test_metrics_measured_on_the_holdout_are_named_by_it():
    s = EpochStats(2, {"loss": 1.0}, 0.5, 90.0, 0.1, 1.0, 100.0, 80.0)
    assert set(s.metrics("holdout")) == {"train_loss", "holdout_loss", "holdout_acc", "holdout_agreement", "lr",
                                         "epoch_time_s", "throughput"}
    assert {"val_acc", "val_loss", "agreement"} <= set(s.metrics())


# ---- the study's storage ----------------------------------------------------------------------

def test_the_study_lives_beside_a_local_store_and_never_in_mlflows_database(store, tmp_path):
    assert trials.storage_url("") == str(tmp_path / "optuna.log")
    with pytest.raises(TTKDError, match="holds MLflow's tracking tables, and Optuna and MLflow each keep an "
                                        "Alembic version table there; give the search a database of its own"):
        trials.check_storage(store)
    trials.check_storage(f"sqlite:///{tmp_path / 'optuna.db'}")  # a database of its own is fine


def test_a_search_on_a_tracking_server_says_where_its_study_should_live(monkeypatch):
    monkeypatch.setattr(trials.tracking, "tracking_uri", lambda: "http://10.0.0.1:5000")
    with pytest.raises(TTKDError, match=r"^a search keeps its Optuna study in a storage of its own, and the tracking "
                                        r"store is http://10\.0\.0\.1:5000: give storage= "):
        trials.storage_url("")
    assert trials.storage_url("postgresql://u:p@10.0.0.1/optuna") == "postgresql://u:p@10.0.0.1/optuna"


def test_two_searches_of_one_name_on_one_storage_are_one_line(store, cli, tmp_path):
    optuna.create_study(study_name="lr", storage=trials.storage(str(tmp_path / "optuna.log")))
    status, _, err = cli("search", "--space", "lr=0.01:0.1", "--name", "lr", "--epochs", "1")
    assert status == 1 and err.count("\n") == 1, err
    assert f"a search named 'lr' already lives in {tmp_path / 'optuna.log'}" in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


# ---- searches end to end ----------------------------------------------------------------------

KD_SPACE = "alpha=0.1:0.99;kd_temperature=1:16:log;method=kd,dkd"


def trials_of(client: MlflowClient, parent_id: str) -> list:
    return client.search_runs([client.get_run(parent_id).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_id}'")


def search_run():
    return mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'search'",
                              order_by=["attributes.start_time DESC"])[0]


@pytest.mark.slow
def test_a_kd_search_with_two_jobs_nests_its_trials_under_one_run_registers_nothing_and_logs_the_best(
        store, cli, tmp_path):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "t", "--amp", "false", "--compile", "false")
    assert status == 0, err
    status, out, err = cli("search", "--teacher", "t", "--space", KD_SPACE, "--trials", "8", "--jobs", "2",
                           "--epochs", "2", "--amp", "false", "--compile", "false")
    assert status == 0, err
    parent = search_run()
    client = MlflowClient()
    runs = trials_of(client, parent.info.run_id)
    assert sorted(int(r.data.tags["ttkd.trial"]) for r in runs) == list(range(8))
    assert all(r.info.status == "FINISHED" and r.info.run_name.startswith("trial ") for r in runs)
    for r in runs:  # evaluated on the holdout alone, and its values logged once under the study's names
        assert "holdout_acc" in r.data.metrics and not {"val_acc", "partner_val_acc"} & set(r.data.metrics)
        assert "kd_temperature" in r.data.params and "temperature" not in r.data.params
        assert ("alpha" in r.data.params) == (r.data.params["method"] == "kd")
        assert r.data.params["holdout"] == "0.1" and r.data.tags["ttkd.partner_model"] == "models:/t/1"
        assert r.data.tags["ttkd.trial_state"] in ("COMPLETE", "PRUNED")
        assert [i.tags[0].value for i in r.inputs.dataset_inputs] == ["training", "holdout"]
    assert [m.name for m in client.search_registered_models()] == ["t"]  # trials register nothing
    study = optuna.load_study(study_name=parent.info.run_id,
                              storage=trials.storage(str(tmp_path / "optuna.log")))
    assert len(study.trials) == 8 and all(t.state.is_finished() for t in study.trials)
    best = json.loads(open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                               artifact_path="best.json")).read())
    assert best["holdout_acc"] == study.best_value == parent.data.metrics["best_holdout_acc"]
    assert parent.data.params["best.method"] == study.best_params["method"]
    assert {"trials.md", "trials.csv", "optimization_history.png", "intermediate_values.png",
            "param_importances.png", "search.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert f"best: trial {study.best_trial.number}, holdout_acc {study.best_value:.2f}%" in out
    assert out.count("] trial ") == 8


def outcome(study) -> list:
    return [(t.number, t.params, t.state.name, t.value) for t in study.trials]


@pytest.mark.slow
def test_kill_9_mid_search_then_resume_gives_the_same_trials_as_an_uninterrupted_search_and_never_the_test_split(
        store, cli, tmp_path, monkeypatch):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "t", "--amp", "false", "--compile", "false")
    assert status == 0, err
    val = datasets.load("digits").val_x
    seen = []
    real = engine.batches
    monkeypatch.setattr(engine, "batches", lambda data, split, *a, **k: seen.append(
        (data.evaluated_on, split, data.val_x.data_ptr() if split == "val" else None)) or real(data, split, *a, **k))
    args = ["--teacher", "t", "--space", "alpha=0.1:0.99;kd_temperature=1:16:log", "--trials", "8",
            "--jobs", "1", "--epochs", "3", "--amp", "false", "--compile", "false", "--deterministic", "true"]
    status, out, err = cli("search", *args, "--name", "whole")  # in this process: its batches are seen
    assert status == 0, err
    assert seen and all(on == "holdout" for on, _, _ in seen) and val.data_ptr() not in {p for *_, p in seen}
    storage = trials.storage(str(tmp_path / "optuna.log"))
    whole = optuna.load_study(study_name="whole", storage=storage)

    env = env_for(store) | {"TTKD_TEST_EPOCH_DELAY_S": "0.3"}  # time to see trial 3 mid-way
    proc = subprocess.Popen([sys.executable, "-m", "entry.search", *args, "--name", "cut"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(), time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # once trial 3 of the new search has an epoch
        parent = search_run()
        trial = mlflow.search_runs(output_format="list", filter_string=(
            f"tags.`ttkd.trial` = '3' and tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
        if parent.data.params.get("name") == "cut" and trial and trial[0].data.metrics.get("holdout_acc"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    parent = search_run()
    assert parent.data.params["name"] == "cut" and parent.info.status == "RUNNING", err
    [cut_run] = mlflow.search_runs(output_format="list", filter_string=(
        f"tags.`ttkd.trial` = '3' and tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    assert cut_run.info.status == "RUNNING"  # killed mid-trial: nobody could close it
    status, out, err = cli("search", *args, "--name", "cut", "--resume", "last")  # the command, resume=last added
    assert status == 0, err
    cut = optuna.load_study(study_name="cut", storage=storage)
    assert len(cut.trials) == 8 and outcome(cut) == outcome(whole)
    assert cut.best_params == whole.best_params
    assert client.get_run(cut_run.info.run_id).info.status == "FINISHED"  # trial 3 continued in its own run
    assert len(trials_of(client, parent.info.run_id)) == 8
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_study_search_trains_its_own_teacher_first_and_resumes_past_a_teacher_that_failed(store, cli, monkeypatch):
    real = TrainedTeacher.forward
    monkeypatch.setattr(TrainedTeacher, "forward", lambda self, b: real(self, b) | {"loss": real(self, b)["loss"] * nan})
    args = ["--space", "alpha=0.1:0.99;method=kd,dkd", "--trials", "2", "--epochs", "1", "--jobs", "1",
            "--weight", "0.01"]
    status, out, err = cli("search", *args)  # no teacher=: the search trains one, in this process, where the NaN is
    assert status == 1 and err.count("\n") == 1
    assert "teacher seed=0 w=0.01, which the trials train beside, did not finish (the training loss became NaN" in err
    parent = search_run()
    assert parent.info.status == "FAILED" and parent.data.params["weight"] == "0.01"
    assert "teacher_pinned" not in parent.data.params and len(trials_of(MlflowClient(), parent.info.run_id)) == 2

    monkeypatch.setattr(TrainedTeacher, "forward", real)
    status, out, err = cli("search", *args, "--resume", "last")
    assert status == 0, err
    assert "student seed=0: val_acc" in out and "(reused)" in out  # its student, kept; its teacher, trained now
    teacher = search_run().data.params["teacher_pinned"]
    assert teacher.startswith("models:/digits-search-teacher/")
    runs = trials_of(MlflowClient(), parent.info.run_id)
    partners = {r.data.tags["ttkd.point"] for r in runs if r.data.tags.get("ttkd.tuning") == "partner"}
    assert partners == {"student seed=0", "teacher seed=0 w=0.01"}
    trial_runs = [r for r in runs if "ttkd.trial" in r.data.tags]
    assert len(trial_runs) == 2 and all(r.data.tags["ttkd.partner_model"] == teacher for r in trial_runs)
    assert search_run().info.status == "FINISHED"


@pytest.mark.slow
def test_a_teacher_search_trains_a_teacher_and_its_kd_student_per_trial_and_an_interrupted_one_starts_again(
        store, cli, tmp_path, monkeypatch):
    status, _, err = cli("baseline", "--epochs", "1", "--register_as", "s")
    assert status == 0, err
    real, stops = stages.run_stage, []

    def sigterm_in_first_kd_student(stage, **kw):  # as SIGTERM would, after the KD student's first epoch
        def stop(s, engine):
            stops.append(s.epoch)
            raise stages.StageInterrupted("stopped by SIGTERM", signal.SIGTERM)
        extra = (stop,) if stage == "distill" and not stops else ()
        return real(stage, **kw | {"callbacks": tuple(kw.get("callbacks", ())) + extra})
    monkeypatch.setattr(stages, "run_stage", sigterm_in_first_kd_student)
    args = ["--student", "s", "--space", "weight=-0.02:0.05;temperature=1:8:log", "--trials", "2", "--epochs", "1",
            "--jobs", "1", "--name", "teachers"]
    status, out, err = cli("search", *args)
    assert status == 143 and stops == [1], err
    status, out, err = cli("search", *args, "--resume", "last")
    assert status == 0, err
    study = optuna.load_study(study_name="teachers", storage=trials.storage(str(tmp_path / "optuna.log")))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(set(t.params) == {"weight", "temperature"} for t in study.trials)
    runs = trials_of(MlflowClient(), search_run().info.run_id)
    by_point = {}
    for r in runs:
        by_point.setdefault(r.data.tags["ttkd.point"], []).append(r)
    assert sorted(by_point) == ["trial 0", "trial 0 teacher", "trial 1", "trial 1 teacher"]
    assert sorted(r.info.status for r in by_point["trial 0"]) == ["FINISHED", "KILLED"]  # asked again, from its
    assert len(by_point["trial 0 teacher"]) == 2                                           # teacher, not continued
    for n, t in enumerate(study.trials):
        [kd] = [r for r in by_point[f"trial {n}"] if r.info.status == "FINISHED"]
        [teacher] = [r for r in by_point[f"trial {n} teacher"] if r.info.run_id == kd.data.tags["ttkd.trial_teacher"]]
        assert kd.data.metrics["holdout_acc"] == t.value and "val_acc" not in kd.data.metrics
        assert float(teacher.data.params["weight"]) == t.params["weight"]  # the trial's teacher, then its student
        assert float(teacher.data.params["temperature"]) == t.params["temperature"]
        assert teacher.data.tags["ttkd.partner_model"] == "models:/s/1" and "val_acc" not in teacher.data.metrics
    assert [m.name for m in MlflowClient().search_registered_models()] == ["s"]  # no trial registers anything
    assert search_run().info.status == "FINISHED"


def test_searches_of_two_seeds_share_no_question():
    first = [search.question_seed(0, n) for n in range(50)]
    second = [search.question_seed(1, n) for n in range(50)]
    assert not set(first) & set(second) and len(set(first)) == 50
    assert first == [search.question_seed(0, n) for n in range(50)]  # and a resumed search asks the same


def test_resuming_tells_the_study_what_finished_while_the_search_was_down_and_asks_the_interrupted_again(
        store, tmp_path):
    """The search died after trial 0's run finished but before it told the study, and in the middle of
    trial 1 and trial 2 (which had no run yet): trial 0 is told its holdout_acc, trial 1 continues in its
    run with its values, trial 2 starts with its values, and nothing new is asked of a study that is full."""
    import dataclasses

    from ttkd.config import TrainConfig

    study = optuna.create_study(study_name="s", storage=trials.storage(str(tmp_path / "optuna.log")),
                                direction="maximize")
    space = parse_space("alpha=0.1:0.9")
    asked = [study.ask() for _ in range(3)]
    for t in asked:
        t.suggest_float("alpha", 0.1, 0.9)
    client = MlflowClient()
    parent = client.create_run("0").info.run_id

    def child(number: int, status: str) -> str:
        run_id = client.create_run("0", tags={"mlflow.parentRunId": parent, "ttkd.point": f"trial {number}"}).info.run_id
        client.log_metric(run_id, "holdout_acc", 91.5)
        client.set_terminated(run_id, status)
        return run_id
    finished, killed = child(0, "FINISHED"), child(1, "KILLED")
    args = {"trials": 3, "space": [[n, dataclasses.asdict(d)] for n, d in space], "sampler": "tpe", "seed": 0,
            "storage": str(tmp_path / "optuna.log"), "name": "s", "prune": "none"}
    plan = search.Trials("baseline", "mlp", TrainConfig(epochs=3), None, "kd", {},
                         {"dataset": "digits", "data_dir": None, "stream": None}, 0.1)
    source = search.TrialSource(study, args, plan, space, parent, 2, print)
    source.recover()
    assert (study.trials[0].state.name, study.trials[0].value) == ("COMPLETE", 91.5)
    assert client.get_run(finished).data.tags["ttkd.trial_state"] == "COMPLETE"
    again = [source.ask(), source.ask()]
    assert [(t.point.number, t.resume_run, t.attempt) for t in again] == [(1, killed, (2, 0)), (2, None, (2, 0))]
    assert [dict(t.point.values) for t in again] == [asked[1].params, asked[2].params]
    assert source.ask() is None  # three trials asked already: the study is full


def test_a_continued_trial_reports_the_epochs_its_run_logged_before_it_was_stopped(store, tmp_path):
    """Stopped between epoch 2's metrics and its report to the study, then continued from epoch 2's
    checkpoint: its first report also gives the study epochs 1 and 2, as an uninterrupted trial's did."""
    storage = str(tmp_path / "optuna.log")
    study = optuna.create_study(study_name="s", storage=trials.storage(storage), direction="maximize")
    trial = study.ask()
    trial.report(80.0, 1)  # epoch 1 reached the study, epoch 2 did not
    with mlflow.start_run():
        for step, value in ((1, 80.0), (2, 85.0)):
            mlflow.log_metric("holdout_acc", value, step=step)
        report = trials.reporter(trials.Report(storage, "s", trial._trial_id, trial.number, "none", 4))
        report(EpochStats(3, {"loss": 1.0}, 0.5, 90.0, 0.1, 1.0, 100.0, None), {})
    assert study.trials[0].intermediate_values == {1: 80.0, 2: 85.0, 3: 90.0}


def test_a_search_whose_every_trial_fails_is_one_line_and_its_run_failed(store, cli, monkeypatch):
    from ttkd.kd.logits import CrossEntropy

    real = CrossEntropy.forward
    monkeypatch.setattr(CrossEntropy, "forward", lambda self, b: real(self, b) | {
        "loss": real(self, b)["loss"] * float("nan")})  # every trial's loss is NaN from its first step
    status, out, err = cli("search", "--space", "lr=0.01:0.1", "--trials", "2", "--jobs", "1", "--epochs", "1",
                           "--amp", "false", "--compile", "false")
    assert status == 1 and err.count("\n") == 1, err
    assert "none of the 2 trials completed (the training loss became NaN" in err and "is marked FAILED" in err
    assert search_run().info.status == "FAILED" and out.count(": FAILED: ") == 2


def test_a_trial_retried_after_its_run_finished_is_not_trained_again(store):
    """Ray runs a task again when its node died, even after the trial's run finished: the retry
    reads how the trial ended from its run instead of training it in a new one."""
    from ttkd.studies.plan import Task
    from ttkd.studies.runner import latest_attempt

    client = MlflowClient()
    parent = client.create_run("0").info.run_id
    for number, tags in ((0, {}), (1, {"ttkd.pruned": "2"})):
        run_id = client.create_run("0", tags={"mlflow.parentRunId": parent, "ttkd.point": f"trial {number}",
                                              "ttkd.trial": str(number), **tags}).info.run_id
        client.log_metric(run_id, "holdout_acc", 93.0 - number)
        client.set_terminated(run_id, "FINISHED")
    done, pruned = (latest_attempt(Task(search.TrialPoint(n), "trial", {"parent_run_id": parent})) for n in (0, 1))
    assert (done.result.val_acc, done.result.split, done.reused) == (93.0, "holdout", True)
    assert (pruned.result, pruned.pruned, pruned.reused) == (None, 2, True)
