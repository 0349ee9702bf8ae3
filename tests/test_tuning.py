"""The fair verdict (a sweep with tune=): the arms, what each point trains with, the checks, and
one tuned sweep on digits with its tuning read back on resume."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from ttkd import presets
from ttkd.errors import TTKDError
from ttkd.parsing import parse_space
from ttkd.studies import sweep_name, trials, tuning
from ttkd.studies.plan import Grid, Plan, Point

from .test_resume import env_for


def plan_for(given: dict) -> Plan:
    kw = presets.resolve("sweep", given).stage_kwargs()
    grid = Grid(kw["seeds"], kw["weights"], kw["methods"])
    return Plan(grid, "mlp", "cnn", kw["student_train"], kw["teacher_train"], kw["temperature"],
                kw["method_params"], {"dataset": "digits"},
                name=lambda p: sweep_name("g", p))


def test_each_arm_searches_what_its_stage_reads_the_student_without_kd_only_with_a_student_parameter():
    grid = Grid((0, 1), (0.0, 0.005), ("kd", "dkd"))
    kd_only = tuning.arms(grid, parse_space("alpha=0.1:0.99;kd_temperature=1:16:log"))
    assert [a.key for a in kd_only] == ["kd w=0", "dkd w=0", "kd w=0.005", "dkd w=0.005"]
    assert [n for n, _ in kd_only[0].space] == ["alpha", "kd_temperature"]
    assert [n for n, _ in kd_only[1].space] == ["kd_temperature"]  # dkd does not read alpha
    both = tuning.arms(grid, parse_space("student.lr=0.01:0.2:log;dkd_beta=1:8"))
    assert [(a.key, [n for n, _ in a.space]) for a in both][:3] == [
        ("student", ["student.lr"]), ("kd w=0", ["student.lr"]), ("dkd w=0", ["student.lr", "dkd_beta"])]
    with pytest.raises(TTKDError, match=r"^tune= gives each arm .* this sweep has one arm \(kd w=0\); add a teacher"):
        tuning.check(Grid((0,), (0.0,), ("kd",)), parse_space("alpha=0.1:0.99"))
    with pytest.raises(TTKDError, match=r"^tune: the arm kd w=0 reads none of dkd_beta"):
        tuning.check(Grid((0,), (0.0, 0.005), ("kd", "dkd")), parse_space("dkd_beta=1:8"))
    grid_space = parse_space("alpha=0.5,0.9;dkd_beta=2,8")  # 4 combinations, and each arm reads 2 of them
    tuning.check(Grid((0,), (0.0, 0.005), ("kd", "dkd")), grid_space, "grid", 2)
    with pytest.raises(TTKDError, match=r"^sampler=grid: the arm kd w=0 reads 2 combinations .* and trials=3"):
        tuning.check(Grid((0,), (0.0, 0.005), ("kd", "dkd")), grid_space, "grid", 3)


def test_each_point_trains_its_arms_choice_and_nothing_of_another_arm():
    plan = plan_for({"seeds": "2", "weights": "0,0.005", "methods": "kd,dkd"})
    tuned = plan.__class__(**{**plan.__dict__, "tuned": {
        "student": {"student.lr": 0.2}, "kd w=0.005": {"alpha": 0.3, "kd_temperature": 2.0, "student.lr": 0.01},
        "dkd w=0": {"dkd_beta": 2.0}}})
    call = lambda p: tuned.task(p, {}, "", partner_of=False).kwargs  # noqa: E731
    kd, other = call(Point("kd", 1, 0.005, "kd")), call(Point("kd", 1, 0.0, "kd"))
    assert (kd["method_params"]["alpha"], kd["method_params"]["temperature"], kd["train"].lr) == (0.3, 2.0, 0.01)
    assert (other["method_params"]["alpha"], other["method_params"]["temperature"], other["train"].lr) == (
        0.9, 4.0, 0.05)  # an arm with no choice trains the sweep's own values
    assert call(Point("kd", 0, 0.0, "dkd"))["method_params"]["dkd_beta"] == 2.0
    assert call(Point("kd", 0, 0.005, "dkd"))["method_params"]["dkd_beta"] == 8.0
    assert call(Point("student", 1))["train"].lr == 0.2 and call(Point("student", 1))["train"].seed == 1
    teacher = call(Point("teacher", 1, 0.005))
    assert teacher["train"].lr == 0.05 and teacher["temperature"] == 4.0  # a teacher is never tuned


def test_trial_0_is_the_sweeps_own_configuration_when_the_space_holds_it():
    plan = plan_for({"seeds": "1", "weights": "0,0.005", "alpha": "0.7", "lr": "0.1"})
    [arm, _] = tuning.arms(plan.grid, parse_space("alpha=0.1:0.99;kd_temperature=1:16:log;student.lr=0.01:0.2"))[1:]
    assert tuning.untuned(arm, plan) == {"alpha": 0.7, "kd_temperature": 4.0, "student.lr": 0.1}
    [_, narrow] = tuning.arms(plan.grid, parse_space("kd_temperature=6:16"))
    assert tuning.untuned(narrow, plan) == {}  # T = 4 lies outside: no rise to measure
    assert tuning.tuning_seed((0, 1, 2, 3, 4)) == 5 and tuning.tuning_seed((7, 3)) == 8


def test_the_tuning_section_states_the_budget_and_each_arms_rise():
    t = tuning.Tuning(parse_space("alpha=0.1:0.99"), 20, "tpe", "median", 0.1, "/s", 5, "g")
    summaries = [{"arm": "kd w=0", "space": "alpha=0.1:0.99", "chosen": {"alpha": 0.5}, "chosen_trial": 7, "holdout_acc": 95.0,
                  "untuned_holdout_acc": 93.5, "untuned_state": "complete", "rise": 1.5, "trials": {"complete": 12, "pruned": 8, "fail": 0}},
                 {"arm": "kd w=0.005", "space": "alpha=0.1:0.99;kd_temperature=1:16:log", "chosen": {"alpha": 0.25}, "chosen_trial": 3, "holdout_acc": 96.0,
                  "untuned_holdout_acc": None, "untuned_state": "not in space", "rise": None, "trials": {"complete": 20, "pruned": 0, "fail": 0}}]
    text = tuning.markdown(t, summaries, (0, 1, 2, 3, 4))
    assert "Every arm had 20 trials of `alpha=0.1:0.99` (tpe sampler, pruner median), each trained with seed 5 " \
           "(the verdict's seeds are 0, 1, 2, 3, 4)" in text
    assert "| kd w=0 | alpha | 12 / 8 / 0 | 93.50 | 95.00 | +1.50 | alpha=0.5 (trial 7) |" in text
    assert "| kd w=0.005 | alpha, kd_temperature | 20 / 0 / 0 | not in space | 96.00 |  | alpha=0.25 (trial 3) |" in text
    assert tuning.metrics(summaries) == {"kd.w0.holdout_acc": 95.0, "kd.w0.tuning_rise": 1.5,
                                         "kd.w0.005.holdout_acc": 96.0}


@pytest.mark.parametrize("given, message", [
    ({"tune": "temperature=1:8"}, "tune: temperature feeds the teachers, and the verdict tunes the students'"),
    ({"tune": "lr=0.01:0.1"}, "tune: lr feeds the teachers, and the verdict tunes the students' parameters (name "
                              "the student's: student.lr)"),
    ({"tune": "method=kd,dkd"}, "tune: method is an arm of the verdict, not a parameter to tune"),
    ({"tune": "alpha=0.1:0.9", "alpha": "0.5"}, "alpha is both in tune and a parameter (alpha=)"),
    ({"tune": "dkd_beta=1:8"}, "tune: dkd_beta is read by none of the methods kd"),
    ({"tune": "alpha=0.1:0.9", "axes": "kd_temperature=2,8"}, "tune= with axes= is not supported"),
    ({"tune": "alpha=0.1:0.9", "weights": "0"}, "this sweep has one arm (kd w=0)"),
    ({"tune": "alpha=0.1:0.9", "trials": "0"}, "invalid trials: '0'; trials must be an integer >= 1"),
    ({"tune": "alpha=0.1:0.9", "holdout": "0.5"}, "invalid holdout: '0.5'"),
    ({"tune": "alpha=0.9:0.1"}, "a range goes from its low end to a higher one"),
    ({"tune": "alpha=0.1:0.9", "sampler": "grid"}, "sampler=grid tries every combination of values, and alpha"),
    ({"tune": "temprature=1:8"}, "invalid space: 'temprature=1:8'"),
    ({"trials": "8"}, "trials tunes a sweep's arms, and no tune= is given"),
])
def test_bad_tune_input_is_one_line_and_opens_nothing(store, cli, given, message):
    status, out, err = cli("sweep", *[a for k, v in given.items() for a in (f"--{k}", v)], "--epochs", "1")
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert MlflowClient().search_registered_models() == []


def test_a_tuned_sweep_without_optuna_names_the_extra(store, cli, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    status, _, err = cli("sweep", "--tune", "alpha=0.1:0.9")
    assert status == 1 and "a search needs Optuna, an optional extra: pip install -e '.[search]'" in err


def runs_under(parent_id: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_a_tuned_sweep_killed_mid_search_resumes_to_the_same_trials_per_arm_and_trains_each_choice(store, cli):
    args = ["--seeds", "1", "--weights", "0,0.005", "--epochs", "1", "--jobs", "1",
            "--tune", "alpha=0.1:0.99;kd_temperature=1:16:log", "--trials", "3"]
    env = env_for(store) | {"TTKD_TEST_EPOCH_DELAY_S": "0.3"}  # time to see the second arm's first trial
    proc = subprocess.Popen([sys.executable, "-m", "entry.sweep", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill -9 once the second arm has a trial's figure
        arm = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.arm` = 'kd w=0.005'")
        if arm and any("holdout_acc" in t.data.metrics for t in runs_under(arm[0].info.run_id)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    [sweep] = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'sweep'")
    assert sweep.info.status == "RUNNING" and len(runs_under(arm[0].info.run_id)) < 3, err

    status, out, err = cli("sweep", *args, "--resume", "last")  # the command, resume=last added
    assert status == 0, err
    assert out.count("(reused)") == 3  # the tuning's student and teachers; the first arm's search is read back
    children = runs_under(sweep.info.run_id)
    arms = {r.data.tags["ttkd.arm"]: r for r in children if r.data.tags.get("ttkd.stage") == "tune"}
    assert sorted(arms) == ["kd w=0", "kd w=0.005"] and all(r.info.status == "FINISHED" for r in arms.values())
    sweep = mlflow.get_run(sweep.info.run_id)
    storage = trials.storage(sweep.data.params["storage"])
    chosen = json.loads(open(mlflow.artifacts.download_artifacts(run_id=sweep.info.run_id,
                                                                 artifact_path="tuning.json")).read())
    for s in chosen:
        arm = arms[s["arm"]]
        runs = runs_under(arm.info.run_id)
        study = optuna.load_study(study_name=f"{sweep.info.run_id} {s['arm']}", storage=storage)
        assert len(runs) == len(study.trials) == 3  # the same budget for every arm, none counted twice
        assert all(t.state.name == "COMPLETE" for t in study.trials) and all(
            r.info.status == "FINISHED" for r in runs)
        assert study.trials[0].params == {"alpha": 0.9, "kd_temperature": 4.0}  # trial 0: the untuned sweep
        assert s["rise"] == pytest.approx(study.best_value - study.trials[0].value)
        assert s["chosen"] == study.best_params
        for t in runs:  # a trial trains on seed 1, beside the tuning's teacher, and never sees the test split
            assert "val_acc" not in t.data.metrics and "holdout_acc" in t.data.metrics
            assert t.data.params["seed"] == "1"
            assert t.data.tags["ttkd.partner_model"].startswith("models:/digits-tuning-teacher/")
        weight = s["arm"].split("w=")[1]
        [kd] = [r for r in children if r.data.tags.get("ttkd.point") == f"kd seed=0 w={weight} method=kd"]
        assert float(kd.data.params["alpha"]) == pytest.approx(s["chosen"]["alpha"])  # the verdict trains the choice
        assert float(kd.data.params["temperature"]) == pytest.approx(s["chosen"]["kd_temperature"])
        assert sweep.data.metrics[f"kd.w{weight}.tuning_rise"] == pytest.approx(s["rise"])
    partners = [r for r in children if r.data.tags.get("ttkd.tuning") == "partner"]
    assert sorted(r.data.tags["ttkd.point"] for r in partners) == ["student seed=1", "teacher seed=1 w=0",
                                                                   "teacher seed=1 w=0.005"]
    assert "## Tuning: 3 trials per arm, chosen on the holdout" in out
    assert "| kd w=0.005 | alpha, kd_temperature | 3 / 0 / 0 |" in out
    assert out.index("## Tuning") < out.index("## Students") and sweep.info.status == "FINISHED"
