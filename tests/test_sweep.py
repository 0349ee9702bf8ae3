"""The sweep: grid parameters, paired statistics against scipy, the report, worker
processes, failures, resume after SIGTERM, and teachers promoted by their students."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from ttkd import config, presets, stages
from ttkd.errors import TTKDError
from ttkd.kd.logits import TrainedTeacher
from ttkd.studies import report
from ttkd.studies.plan import Grid, Point

from .test_resume import env_for

# ---- statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("values", [[97.2, 98.1, 96.9, 97.5, 98.0], [1.0, -2.5, 0.25], [0.5, 0.7]])
def test_interval_is_scipys_one_sample_t_interval(values):
    mine = report.interval(values)
    theirs = stats.ttest_1samp(values, 0.0)
    low, high = theirs.confidence_interval(0.95)
    assert mine.n == len(values) and mine.mean == pytest.approx(np.mean(values))
    assert mine.std == pytest.approx(np.std(values, ddof=1))
    assert (mine.low, mine.high) == (pytest.approx(low), pytest.approx(high))
    assert mine.p == pytest.approx(theirs.pvalue)


def test_paired_difference_is_scipys_paired_t_test_over_common_seeds():
    a = {0: 98.1, 1: 97.5, 2: 98.9, 3: 97.0, 7: 99.0}
    b = {0: 97.8, 1: 97.6, 2: 98.0, 3: 96.1, 5: 90.0}  # seeds 5 and 7 are not paired
    mine = report.paired(a, b)
    seeds = [0, 1, 2, 3]
    theirs = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    low, high = theirs.confidence_interval(0.95)
    assert mine.n == 4 and (mine.low, mine.high) == (pytest.approx(low), pytest.approx(high))
    assert mine.p == pytest.approx(theirs.pvalue)
    assert not mine.within_noise or low <= 0 <= high


def test_degenerate_samples_say_so_instead_of_inventing_an_interval():
    one = report.interval([97.0])
    assert one.n == 1 and one.mean == 97.0 and math.isnan(one.low) and math.isnan(one.std)
    same = report.interval([0.28, 0.28, 0.28])
    assert (same.low, same.high, same.p) == (pytest.approx(0.28), pytest.approx(0.28), 0.0)
    assert report.interval([]).n == 0


@pytest.mark.parametrize("n", range(6, 21))
def test_median_interval_is_scipys_distribution_free_interval_where_it_reaches_95_percent(n):
    values = list(np.random.default_rng(n).normal(90, 3, n))
    mine = report.robust(values)
    theirs = stats.quantile_test(values, q=0, p=0.5).confidence_interval(0.95)
    assert mine.median == pytest.approx(np.median(values)) and mine.level >= 0.95
    assert (mine.low, mine.high) == (pytest.approx(theirs.low), pytest.approx(theirs.high))


def test_with_fewer_than_six_seeds_the_median_interval_is_the_range_and_says_its_lower_coverage():
    r = report.robust([85.1, 85.3, 84.9, 44.85, 67.5])
    assert (r.median, r.low, r.high, r.n) == (84.9, 44.85, 85.3, 5) and r.level == pytest.approx(1 - 2 / 32)
    assert report.robust([97.0]).n == 1 and math.isnan(report.robust([97.0]).low)
    assert report.paired_robust({0: 2.0, 1: 3.0, 2: 1.0, 9: 50.0}, {0: 1.0, 1: 1.0, 2: 1.0}).median == 1.0


def test_far_off_seeds_are_collapses_not_the_weakest_of_close_seeds():
    assert report.outliers({0: 85.1, 1: 85.3, 2: 84.9, 3: 44.85, 4: 67.5}) == {3: 44.85, 4: 67.5}
    assert report.outliers({0: 98.6, 1: 98.7, 2: 98.7, 3: 98.8, 4: 98.3}) == {}
    assert report.outliers({0: 98.7, 1: 98.7, 2: 98.7, 3: 98.7, 4: 98.2}) == {}  # MAD 0: a 0.5 pp gap is not one
    assert report.outliers({0: 98.7, 1: 98.7, 2: 98.7, 3: 98.7, 4: 95.2}) == {4: 95.2}
    assert report.outliers({0: 90.0, 1: 10.0}) == {}  # two seeds: which one is off cannot be told


def test_a_planted_collapsed_seed_is_flagged_by_name_and_the_words_say_mean_and_median_disagree():
    grid = Grid((0, 1, 2, 3, 4), (0.0, 0.005), ("kd",))
    values = fake_values(grid, {0.0: 0.0, 0.005: 0.3})
    for seed, acc in ((3, 44.85), (4, 67.5)):  # DIST from a trained teacher, collapsed on 2 of 5 seeds
        p = Point("kd", seed, 0.005, "kd")
        values[p] = dataclasses.replace(values[p], val_acc=acc, run_id=f"run-{seed}")
    r = report.build(grid, values, {})
    assert [(f["point"], f["run_id"]) for f in r["far"]] == [("kd seed=3 w=0.005 method=kd", "run-3"),
                                                           ("kd seed=4 w=0.005 method=kd", "run-4")]
    row = next(x for x in r["students"] if x["weight"] == 0.005)
    assert row["median"]["median"] == pytest.approx(np.median([values[Point("kd", s, 0.005, "kd")].val_acc
                                                               for s in grid.seeds]))
    assert row["vs_normal"]["low"] <= 0 <= row["vs_normal"]["high"]  # the t-interval: within noise
    assert row["vs_normal"]["mean"] < -10 < 0 < row["vs_normal_median"]["median"]  # 3 of 5 seeds gained
    text = report.markdown(r)
    assert "| 0.005 (trained) | kd | 5 (2 far off) |" in text and "## Seeds far from the others" in text
    assert "- kd seed=3 w=0.005 method=kd: val_acc 44.85% against a median of" in text and "(run run-3)" in text
    assert ("kd from the w = 0.005 (trained) teacher against the normal teacher's student: the mean" in text
            and "they disagree (seeds far from the others pull the mean: see below)" in text)
    assert "seed 3 (44.85%), seed 4 (67.50%) lie far from the other seeds" in text
    json.dumps(r)


def test_a_mean_and_median_close_together_that_disagree_say_it_by_their_verdicts_not_their_gap():
    mean = {"n": 5, "mean": -0.50, "low": -0.95, "high": -0.05}           # worse, beyond noise
    median = {"median": -0.56, "low": -0.83, "high": 0.0, "level": 0.94}  # within noise
    words = report._disagreement(mean, median, [])
    assert words.endswith("within noise) give different verdicts: they disagree.") and "apart" not in words
    far = report._disagreement(mean | {"mean": -5.0, "low": -9.0, "high": 1.0}, median, [])
    assert "lie 4.44 pp apart: they disagree." in far
    assert report._disagreement(mean, median | {"high": -0.1}, []) is None  # both worse, close: they agree


def test_far_off_points_are_tagged_on_their_runs_and_named_on_the_sweeps_run(store):
    from ttkd import studies, tracking

    with mlflow.start_run() as parent:
        kids = {}
        for seed in range(3):
            kids[seed] = tracking.start_run(name=f"kd seed={seed}", parent_run_id=parent.info.run_id, nested=True)
            tracking.end_run("FINISHED")
        far = [{"point": "kd seed=1 w=0.005 method=kd", "run_id": kids[1].info.run_id, "seed": 1,
                "val_acc": 44.85, "median": 85.1, "n": 5}]
        studies.tag_far_off({"far": far})
    tags = {s: mlflow.get_run(r.info.run_id).data.tags for s, r in kids.items()}
    assert tags[1][studies.TAG_FAR_OFF] == "val_acc 44.85 against the median 85.10 of its 5 seeds"
    assert studies.TAG_FAR_OFF not in tags[0] and studies.TAG_FAR_OFF not in tags[2]
    assert mlflow.get_run(parent.info.run_id).data.tags[studies.TAG_FAR_OFF] == "kd seed=1 w=0.005 method=kd"


def fake_values(grid: Grid, gain: dict[float, float]) -> dict:
    """Every point of ``grid`` with an accuracy: KD students get ``gain[w]`` plus seed noise."""
    rng = np.random.default_rng(0)
    values = {}
    for p in grid.points():
        acc = 95.0 + (gain[p.weight] + rng.normal(0, 0.1) if p.role == "kd" else 0.0)
        cost = ({"params": 10_000, "macs": 50_000, "latency_ms_b1_cpu": 0.5} if p.role == "teacher" else
                {"params": 1_000, "macs": 2_000, "latency_ms_b1_cpu": 0.1 + 0.01 * p.seed})
        values[p] = report.PointValues(acc, 90.0, f"models:/m/{len(values) + 1}", "run",
                                       (80.0, acc) if p.role == "kd" else (), cost)
    return values


def test_report_calls_a_real_gain_beyond_noise_and_a_zero_gain_within_noise():
    grid = Grid((0, 1, 2, 3, 4), (-0.02, 0.0, 0.005), ("kd",))
    values = fake_values(grid, {-0.02: -2.0, 0.0: 0.0, 0.005: 0.0})
    failed = {Point("kd", 4, 0.005, "kd"): "the training loss became NaN"}
    del values[Point("kd", 4, 0.005, "kd")]
    r = report.build(grid, values, failed)
    rows = {row["weight"]: row for row in r["students"]}
    assert rows[-0.02]["vs_normal"]["high"] < 0 and rows[0.005]["vs_normal"]["n"] == 4
    assert r["far"] == [] and "far from" not in report.markdown(r)  # seed noise of 0.1 pp is no collapse
    text = report.markdown(r)
    assert "kd from the w = -0.02 (nasty) teacher: -2.0" in text and "worse, beyond noise" in text
    assert "kd from the w = 0.005 (trained) teacher" in text and "within noise" in text
    assert "kd seed=4 w=0.005 method=kd: the training loss became NaN" in text
    assert "| 0.005 (trained) | kd | 4 |" in text  # the failed seed is not counted
    json.dumps(r)  # report.json must be plain data
    metrics = report.headline_metrics(r)
    assert metrics["kd.w-0.02.vs_w0"] == pytest.approx(rows[-0.02]["vs_normal"]["mean"])
    assert "kd.w0.vs_w0" not in metrics and metrics["no_kd.val_acc"] == pytest.approx(95.0)
    costs = {(c["role"], c["weight"]): c for c in r["costs"]}
    kd = costs[("kd", 0.005)]
    assert (kd["vs_teacher"]["x_params"], kd["vs_teacher"]["x_macs"]) == (10.0, 25.0)
    assert kd["vs_teacher"]["x_faster"] == pytest.approx(0.5 / np.mean([0.1 + 0.01 * s for s in range(4)]))
    assert kd["vs_no_kd"]["delta"]["mean"] == pytest.approx(rows[0.005]["vs_no_kd"]["mean"])
    assert "## What the models cost" in text and "| teacher | 0.005 (trained) |  | 10,000 | 50,000 | 0.500 |" in text
    figs = report.figures(r)
    assert set(figs) == {"students_vs_weight.png", "teachers_vs_weight.png", "kd_curves.png",
                         "accuracy_vs_latency.png"}
    assert figs["accuracy_vs_latency.png"].axes[0].get_xscale() == "log"
    students = figs["students_vs_weight.png"].axes[0]
    assert [t.get_text() for t in students.get_xticklabels()] == ["-0.02\nnasty", "0\nnormal",
                                                                 "0.005\ntrained"]
    assert students.lines[0].get_ydata()[0] == pytest.approx(rows[-0.02]["val_acc"]["mean"])


# ---- parameters and bad input ----------------------------------------------------------

def test_sweep_parameters_seeds_as_count_or_list_and_zero_always_included():
    cfg = presets.resolve("sweep", {"seeds": "3", "weights": "-0.02,0.005", "methods": "kd,dkd"})
    kw = cfg.stage_kwargs()
    assert kw["seeds"] == (0, 1, 2) and kw["weights"] == (-0.02, 0.0, 0.005)
    assert set(kw["method_params"]) == {"kd", "dkd"}
    assert presets.resolve("sweep", {"seeds": "7,"}).values["seeds"] == (7,)
    study = presets.resolve("sweep", {}, "cifar10-study").stage_kwargs()
    assert study["weights"] == (0.0, 0.005) and study["methods"] == ("kd",)
    assert study["student_train"].epochs == presets.resolve("main", {}, "cifar10-study").train["student"].epochs


@pytest.mark.parametrize("given, message", [
    ({"weights": ""}, "invalid weights: ''"),
    ({"weights": "0.005,0.005"}, "invalid weights: '0.005,0.005'; weights must be a comma-separated list of distinct"),
    ({"weights": "0.005,x"}, "invalid weights"),
    ({"weights": "0.005,0.0050000001"}, "invalid weights"),  # two weights that print the same
    ({"seeds": "1,1"}, "invalid seeds: '1,1'"),
    ({"seeds": "100000000"}, "invalid seeds: '100000000'"),
    ({"seeds": "0"}, "invalid seeds: '0'"),
    ({"methods": ""}, "invalid methods: ''"),
    ({"methods": "kd,nope"}, "invalid methods: 'kd,nope'"),
    ({"seeds": "10", "weights": "-1,1,2", "methods": "kd,dkd"}, "this sweep would register 130 model versions"),
    ({"methods": "kd,dist", "dkd_beta": "2"}, "none of the methods kd, dist uses dkd_beta"),
    ({"axes": "kd_temprature=2,8"}, "invalid axes: 'kd_temprature=2,8'; write NAME=V1,V2;NAME=V3,V4 with each "
                                    "NAME one of student_arch, teacher_arch, temperature, alpha, kd_temperature"),
    ({"axes": "alpha=0.5,2"}, "invalid alpha: '2'; alpha must be a number in [0, 1]"),
    ({"axes": "alpha=0.5,0.5"}, "invalid axes: 'alpha=0.5,0.5'; give each NAME once"),
    ({"axes": "weights=0,0.005"}, "invalid axes: weights is a sweep's own axis; give it as weights=… instead"),
    ({"axes": "student.seed=1,2"}, "invalid axes: 'student.seed=1,2'"),
    ({"axes": "alpha=0.5,0.9", "alpha": "0.3"}, "alpha is both an axis and a parameter (alpha=); drop one of them"),
    ({"axes": "dkd_beta=2,8"}, "axis dkd_beta: none of the methods kd takes it"),
    ({"axes": "lr=0.1,0.01;alpha=0.1,0.5,0.9", "seeds": "10"}, "this sweep would register 180 model versions"),
])
def test_bad_sweep_input_is_one_line_and_opens_nothing(store, cli, given, message):
    args = [a for k, v in given.items() for a in (f"--{k}", v)]
    status, out, err = cli("sweep", *args)
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert MlflowClient().search_registered_models() == []


def test_an_axis_feeds_its_stage_and_everything_downstream_and_nothing_else():
    from ttkd.studies import sweep_name
    from ttkd.studies.plan import Plan

    cfg = presets.resolve("sweep", {"seeds": "2", "methods": "kd,dkd", "force": "true", "axes":
                                    "student_arch=mlp,cnn;teacher.lr=0.01,0.1;kd_temperature=2,8;alpha=0.5,0.9"})
    kw = cfg.stage_kwargs()
    grid = Grid(kw["seeds"], kw["weights"], kw["methods"], kw["axes"])
    points = grid.points()
    assert len(points) == len({p.key for p in points}) == presets.sweep_size(kw["seeds"], kw["weights"],
                                                                             kw["methods"], kw["axes"])
    by_role = {r: [p for p in points if p.role == r] for r in ("student", "teacher", "kd")}
    assert len(by_role["student"]) == 2 * 2 and len(by_role["teacher"]) == 2 * 2 * 2 * 2
    assert len(by_role["kd"]) == 2 * 2 * 2 * 2 * (4 + 2)  # kd reads T and alpha; dkd reads T only
    assert all(p.needs in set(points) and points.index(p.needs) < points.index(p) for p in points if p.needs)
    kd = Point("kd", 1, 0.005, "dkd", (("student_arch", "cnn"), ("teacher.lr", 0.1), ("kd_temperature", 8.0)))
    assert kd in set(points) and kd.key == "kd seed=1 w=0.005 method=dkd student_arch=cnn teacher.lr=0.1 kd_temperature=8"
    assert kd.needs == Point("teacher", 1, 0.005, values=(("student_arch", "cnn"), ("teacher.lr", 0.1)))
    assert kd.needs.needs == Point("student", 1, values=(("student_arch", "cnn"),))
    plan = Plan(grid, "mlp", "cnn", kw["student_train"], kw["teacher_train"], kw["temperature"],
                {m: stages.default_method_params(m) for m in kw["methods"]}, {"dataset": "digits"},
                name=lambda p: sweep_name("g", p))
    calls = {p.role: plan.task(p, {}, "", partner_of=False).kwargs for p in (kd, kd.needs, kd.needs.needs)}
    assert calls["kd"]["arch"] == calls["student"]["arch"] == "cnn" and calls["teacher"]["arch"] == "cnn"
    assert calls["teacher"]["train"].lr == 0.1 and calls["kd"]["train"].lr == calls["student"]["train"].lr == 0.05
    assert calls["kd"]["method_params"]["temperature"] == 8.0 and calls["teacher"]["temperature"] == 4.0
    assert calls["kd"]["register_as"] == "g-student-dkd-student_arch=cnn-teacher.lr=0.1-kd_temperature=8"


def test_the_report_groups_by_every_axis_and_compares_within_each_value():
    grid = Grid((0, 1, 2), (0.0, 0.005), ("kd",), (("kd_temperature", (2.0, 8.0)),))
    values = fake_values(grid, {0.0: 0.0, 0.005: 0.0})
    for p in values:  # T = 8 helps the trained teacher's students by 1 point, T = 2 changes nothing
        if p.role == "kd" and p.weight == 0.005 and dict(p.values)["kd_temperature"] == 8.0:
            values[p] = dataclasses.replace(values[p], val_acc=values[p].val_acc + 1.0)
    r = report.build(grid, values, {})
    rows = {(x["weight"], x["values"]["kd_temperature"]): x for x in r["students"]}
    assert set(rows) == {(w, t) for w in (0.0, 0.005) for t in (2.0, 8.0)} and len(r["no_kd"]) == 1
    assert rows[(0.005, 8.0)]["vs_normal"]["mean"] == pytest.approx(
        np.mean([values[Point("kd", s, 0.005, "kd", (("kd_temperature", 8.0),))].val_acc
                 - values[Point("kd", s, 0.0, "kd", (("kd_temperature", 8.0),))].val_acc for s in grid.seeds]))
    assert rows[(0.005, 8.0)]["vs_normal"]["low"] > 0 and rows[(0.005, 2.0)]["vs_normal"]["low"] < 0
    text = report.markdown(r)
    assert "| teacher w | method | kd_temperature | seeds |" in text and "| 0.005 (trained) | kd | 8 | 3 |" in text
    assert "kd from the w = 0.005 (trained) teacher (kd_temperature=8): +" in text
    metrics = report.headline_metrics(r)
    assert metrics["kd.w0.005.kd_temperature_8.vs_w0"] == pytest.approx(rows[(0.005, 8.0)]["vs_normal"]["mean"])
    figure = report.figures(r)["students_vs_kd_temperature.png"].axes[0]
    assert figure.get_xlabel() == "kd_temperature" and list(figure.lines[0].get_xdata()) == [2.0, 8.0]
    json.dumps(r)


def test_a_big_sweep_is_allowed_with_force():
    cfg = presets.resolve("sweep", {"seeds": "10", "weights": "-1,1,2", "methods": "kd,dkd", "force": "true"})
    kw = cfg.stage_kwargs()
    assert presets.sweep_size(kw["seeds"], kw["weights"], kw["methods"]) == 130 > config.MAX_MODELS


def test_a_sweep_preset_through_the_main_entry_point_is_one_line(store, cli, tmp_path):
    preset = tmp_path / "grid.toml"
    preset.write_text('stage = "sweep"\nseeds = 3\n')
    status, _, err = cli("main", "--preset", str(preset))
    assert status == 1 and err.strip().endswith("is for the sweep; run it with -e sweep")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_promote_by_students_refuses_a_non_teacher_and_a_teacher_without_students(store, cli):
    assert cli("baseline", "--epochs", "1", "--register_as", "plain")[0] == 0
    status, _, err = cli("promote", "--model", "plain", "--by", "students")
    assert status == 1
    assert "'plain' is not a teacher (its versions come from: baseline)" in err
    assert MlflowClient().get_registered_model("plain").aliases == {}
    assert cli("teach", "--student", "plain", "--epochs", "1", "--register_as", "lonely")[0] == 0
    for model in ("lonely", "lonely/1"):
        status, _, err = cli("promote", "--model", model, "--by", "students")
        assert status == 1 and "taught" in err and "distil one from it first" in err
        assert len(err.strip().splitlines()) == 1
    assert MlflowClient().get_registered_model("lonely").aliases == {}


# ---- end to end ------------------------------------------------------------------------

# compared across runs: float32 on every CPU (bf16 autocast rounds a batch's products otherwise)
SMALL = ["--seeds", "2", "--weights", "0.005", "--epochs", "2", "--deterministic", "true", "--amp", "false",
         "--threads", "1", "--register_as", "sw"]


def accuracy_tables(out: str) -> str:
    """The sweep's report from its first table on, less the cost table, whose timings differ run to run."""
    text = out[out.index("## Students"):]
    start = text.find("## What the models cost")
    return text if start < 0 else text[:start] + text[text.index("\n## ", start) + 1:]


def sweep_children(parent_id):
    return mlflow.search_runs(output_format="list", filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def point_metrics(parent_id) -> dict[str, float]:
    return {r.data.tags["ttkd.point"]: r.data.metrics["val_acc"] for r in sweep_children(parent_id)
            if r.info.status == "FINISHED"}


def sweep_run():
    return mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'sweep'")[0]


@pytest.mark.slow
def test_one_job_and_two_jobs_killed_by_sigterm_then_resumed_give_the_same_sweep(store, cli, tmp_path,
                                                                                monkeypatch):
    # the reference: one job, in this process, never interrupted, in a store of its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'one.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'one.db'}")
    status, out, err = cli("sweep", *SMALL, "--jobs", "1")
    assert status == 0, err
    one = sweep_run()
    assert "## In words" in out and "| 0.005 (trained) | kd | 2 |" in out
    assert one.data.metrics["kd.w0.005.val_acc"] > 0 and "kd.w0.005.vs_w0" in one.data.metrics
    arts = {a.path for a in MlflowClient().list_artifacts(one.info.run_id)}
    assert {"report.md", "report.json", "students_vs_weight.png", "teachers_vs_weight.png",
            "kd_curves.png", "sweep.json"} <= arts
    children = sweep_children(one.info.run_id)
    assert len(children) == 2 * (1 + 2 + 2) and all(c.info.status == "FINISHED" for c in children)
    kd = [c for c in children if c.data.tags["ttkd.point"] == "kd seed=1 w=0.005 method=kd"][0]
    assert (kd.data.tags["ttkd.seed"], kd.data.tags["ttkd.weight"], kd.data.tags["ttkd.method"]) == (
        "1", "0.005", "kd")
    [log] = [a.path for a in MlflowClient().list_artifacts(kd.info.run_id, "logs")]  # its lines, kept
    text = open(mlflow.artifacts.download_artifacts(run_id=kd.info.run_id, artifact_path=log)).read()
    assert "epoch   2/2" in text and f"run {kd.info.run_id})" in text and "registered models:/sw-" in text

    # lineage by tags: each teacher version names its student; each KD student its teacher
    client = MlflowClient()
    teachers = client.search_model_versions("name = 'sw-teacher'")
    assert sorted((v.tags["ttkd.seed"], v.tags["ttkd.weight"]) for v in teachers) == [
        ("0", "0.0"), ("0", "0.005"), ("1", "0.0"), ("1", "0.005")]
    taught = {v.version: mlflow.get_run(client.search_model_versions(
        f"tags.`ttkd.partner_model` = 'models:/sw-teacher/{v.version}'")[0].run_id).data.metrics["val_acc"]
        for v in teachers}
    champion = client.get_model_version_by_alias("sw-teacher", "champion").version
    assert taught[champion] == max(taught.values())
    assert "sw-teacher: each version judged by the val_acc of the students it taught" in out
    metrics = point_metrics(one.info.run_id)
    table = accuracy_tables(out)
    assert "## What the models cost" in out and "| KD student | 0.005 (trained) | kd |" in out

    # two worker processes, stopped by SIGTERM half-way, then resumed: the same sweep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    proc = subprocess.Popen([sys.executable, "-m", "entry.sweep", *SMALL, "--jobs", "2"], env=env_for(store),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # half-way: once some KD student is being trained
        if mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`ttkd.stage` = 'distill'"):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM with" in err and "is marked KILLED" in err
    parent = sweep_run()
    assert parent.info.status == "KILLED"
    finished = point_metrics(parent.info.run_id)
    assert 0 < len(finished) < 10
    assert all(r.info.status in ("FINISHED", "KILLED") for r in sweep_children(parent.info.run_id))

    status, out, err = cli("sweep", "--resume", "last")  # two jobs again, from sweep.json
    assert status == 0, err
    assert out.count("(reused)") == len(finished)
    assert point_metrics(parent.info.run_id) == metrics
    assert accuracy_tables(out) == table
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_failing_point_is_reported_the_others_go_on_and_an_axis_is_crossed_and_resumed(store, cli, monkeypatch):
    real = TrainedTeacher.forward

    def nasty_nan(self, b):
        parts = real(self, b)
        return parts | {"loss": parts["loss"] * float("nan")} if self.weight < 0 else parts
    monkeypatch.setattr(TrainedTeacher, "forward", nasty_nan)
    status, out, err = cli("sweep", "--seeds", "1", "--weights", "-0.02,0.005", "--epochs", "1",
                           "--axes", "kd_temperature=2,8",  # the KD students' T: twice as many of them
                           "--register_as", "nan", "--jobs", "1")  # in this process, where the NaN is
    assert status == 1
    assert "3 of 10 stages did not finish (teacher seed=0 w=-0.02: the training loss became NaN" in err
    assert "kd seed=0 w=-0.02 method=kd kd_temperature=8: skipped: teacher seed=0 w=-0.02 did not finish" in out
    assert "| teacher w | method | kd_temperature | seeds |" in out  # the report groups by the axis
    assert "| 0.005 (trained) | kd | 2 | 1 |" in out and "| 0.005 (trained) | kd | 8 | 1 |" in out
    for t in (2, 8):  # each value fed its KD student, registered under a name of its own
        [run] = mlflow.search_runs(output_format="list", filter_string=(
            f"tags.`ttkd.point` = 'kd seed=0 w=0.005 method=kd kd_temperature={t}'"))
        assert float(run.data.params["temperature"]) == t and run.data.tags["ttkd.registered_model"].startswith(
            f"models:/nan-student-kd-kd_temperature={t}/")  # a version per teacher weight, as without axes
    [teacher] = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.point` = 'teacher seed=0 w=0.005'")
    assert float(teacher.data.params["temperature"]) == 4.0  # the teach stage's T is another parameter
    assert sweep_run().info.status == "FAILED"
    [nasty] = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.point` = 'teacher seed=0 w=-0.02'")
    [log] = [a.path for a in MlflowClient().list_artifacts(nasty.info.run_id, "logs")]  # a failed point's lines too
    assert "precision: " in open(mlflow.artifacts.download_artifacts(run_id=nasty.info.run_id,
                                                                     artifact_path=log)).read()

    monkeypatch.setattr(TrainedTeacher, "forward", real)
    status, out, err = cli("sweep", "--resume", "last")
    assert status == 0, err
    assert out.count("(reused)") == 7 and "| -0.02 (nasty) | kd | 8 | 1 |" in out  # the axis, from sweep.json
    assert sweep_run().info.status == "FINISHED"


def test_a_preset_seed_is_refused_by_the_sweep(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('stage = "main"\nseed = 3\n')
    with pytest.raises(TTKDError, match="a sweep takes seeds instead"):
        presets.resolve("sweep", {}, str(preset))
    preset.write_text('stage = "main"\n[teacher]\nseed = 3\n')
    with pytest.raises(TTKDError, match="other than seed"):
        presets.resolve("main", {}, str(preset))
