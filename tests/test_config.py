import re
from pathlib import Path

import pytest
import yaml

from ttkd import config, data, models, parsing, presets
from ttkd.config import TrainConfig
from ttkd.errors import TTKDError

REPO = Path(__file__).resolve().parents[1]
SEED_SCHEDULES = {"cifar10": ((80, 120), 0.1, 160), "cifar100": ((60, 120, 160), 0.2, 200),
                  "tiny-imagenet": ((60, 120, 160), 0.2, 200)}


SEED_PRESETS = [n for n in presets.preset_names() if "-lit-" not in n]
LIT_PRESETS = [n for n in presets.preset_names() if "-lit-" in n and n != "cifar100-lit-schedule"]


def test_every_seed_experiment_has_a_preset():
    names = SEED_PRESETS
    assert len(names) == 63
    for dataset in ("cifar10", "cifar100", "tiny-imagenet"):
        assert f"{dataset}-study" in names and f"{dataset}-baseline-resnet18" in names
    assert "cifar100-trained-resnet50" in names and "tiny-imagenet-kd-trained-resnext29-shufflenetv2" in names


@pytest.mark.parametrize("name", SEED_PRESETS)
def test_every_preset_resolves_to_a_valid_run(name):
    stage, settings = presets.load_preset(name)
    cfg = presets.resolve(stage, {}, name)
    dataset = cfg.values["dataset"]
    assert dataset in data.LOADERS
    archs = ([cfg.values["student_arch"], cfg.values["teacher_arch"]] if stage == "main"
             else [cfg.values["arch"]])
    assert all(a in models.names() for a in archs)
    for role, train in cfg.train.items():
        arch = cfg.values[f"{role}_arch"] if role else cfg.values["arch"]
        if arch == "cnn":  # the seed's plain CNN: Adam, lr 1e-3, 100 epochs
            assert (train.optimizer, train.lr, train.epochs, train.schedule) == ("adam", 1e-3, 100, "constant")
        else:  # SGD 0.1, momentum 0.9, wd 5e-4, batch 128, the seed's step schedule
            milestones, gamma, epochs = SEED_SCHEDULES[dataset]
            assert (train.optimizer, train.lr, train.momentum, train.weight_decay, train.batch_size) == \
                ("sgd", 0.1, 0.9, 5e-4, 128)
            assert (train.milestones, train.gamma, train.epochs) == (milestones, gamma, epochs)
    if stage == "teach":
        assert (cfg.values["weight"], cfg.values["temperature"]) == (0.005, 4.0)
    if stage in ("distill", "main"):
        kd_t = cfg.values["temperature" if stage == "distill" else "kd_temperature"]
        assert cfg.values["alpha"] == 0.9 and kd_t == (4.0 if dataset == "cifar10" else 20.0)
    kwargs = cfg.stage_kwargs()  # what the entry point hands to ttkd.stages
    assert kwargs["dataset"] == dataset


@pytest.mark.parametrize("name", LIT_PRESETS)
def test_literature_presets_extend_the_shared_schedule_and_chain_by_name(name):
    stage, _ = presets.load_preset(name)
    cfg = presets.resolve(stage, {}, name)
    train = cfg.train[""]
    assert (train.epochs, train.batch_size, train.lr, train.milestones, train.gamma, train.weight_decay) == \
        (240, 64, 0.05, (150, 180, 210), 0.1, 5e-4)
    assert cfg.values["dataset"] == "cifar100" and cfg.values["arch"] in models.names()
    registered = {presets.resolve(s, {}, n).values["register_as"]: n
                  for n in LIT_PRESETS for s in [presets.load_preset(n)[0]]}
    partner = cfg.values.get("student") or cfg.values.get("teacher")
    if partner:  # the partner is what another literature preset registers
        assert partner in registered, partner
    if stage == "distill":
        assert name.split("-")[2] == cfg.values["method"]


def test_lit_preset_count_and_pairs():
    assert len(LIT_PRESETS) == 8 + 4 + 16
    for teacher, student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"),
                             ("vgg13", "vgg8")):
        assert f"cifar100-lit-trained-{teacher}" in LIT_PRESETS
        for method in ("kd", "dkd", "dist", "crd"):
            assert f"cifar100-lit-{method}-{teacher}-{student}" in LIT_PRESETS


def test_trained_resnet50_is_trained_against_the_resnet18_student():
    cfg = presets.resolve("teach", {}, "cifar100-trained-resnet50")
    assert (cfg.values["arch"], cfg.values["student"]) == ("resnet50", "cifar100-resnet18")
    assert cfg.values["register_as"] == "cifar100-resnet50-trained"


def test_command_line_beats_role_table_beats_preset_beats_default():
    cfg = presets.resolve("main", {"epochs": "3", "student_arch": "mlp"}, "cifar10-study")
    assert cfg.train["student"].epochs == 3 and cfg.train["teacher"].epochs == 3
    assert cfg.values["student_arch"] == "mlp" and cfg.values["teacher_arch"] == "resnet18"
    assert cfg.train["student"].optimizer == "adam" and cfg.train["teacher"].optimizer == "sgd"
    assert cfg.train["teacher"].seed == TrainConfig.seed  # nobody set it
    plain = presets.resolve("baseline", {})
    assert plain.train[""] == TrainConfig() and plain.values["arch"] == "mlp"
    assert presets.resolve("teach", {"student": "s"}).values["arch"] == "cnn"


def test_a_preset_file_path_works_and_its_values_are_checked(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('stage = "baseline"\narch = "preresnet20"\nmilestones = [2, 4]\nschedule = "step"\n')
    cfg = presets.resolve("baseline", {}, str(good))
    assert cfg.values["arch"] == "preresnet20" and cfg.train[""].milestones == (2, 4)
    bad = tmp_path / "bad.toml"
    bad.write_text('stage = "baseline"\nlr = -1\n')
    with pytest.raises(TTKDError, match="invalid lr: -1; lr must be a number > 0"):
        presets.resolve("baseline", {}, str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('stage = "baseline"\nlearning_rate = 0.1\n')
    with pytest.raises(TTKDError, match="sets learning_rate, which stage baseline does not take"):
        presets.load_preset(str(unknown))
    broken = tmp_path / "broken.toml"
    broken.write_text('stage = "baseline"\nlr = \n')
    with pytest.raises(TTKDError, match="cannot read preset"):
        presets.load_preset(str(broken))


@pytest.mark.parametrize("name, raw, value", [
    ("epochs", "30", 30), ("epochs", 30, 30), ("epochs", "30.0", 30), ("lr", "1e-3", 1e-3),
    ("milestones", "80, 120", (80, 120)), ("milestones", [60, 120], (60, 120)), ("milestones", "", ()),
    ("weight", "-0.04", -0.04), ("dataset", "cifar100", "cifar100"), ("dataset", "synthetic-1x8x8-3", "synthetic-1x8x8-3"),
    ("amp", "false", False), ("amp", "True", True), ("compile", True, True),
])
def test_parse_accepts(name, raw, value):
    assert parsing.parse(config.PARAMS[name], raw) == value


@pytest.mark.parametrize("name, raw", [
    ("epochs", "1.5"), ("epochs", True), ("lr", "nan"), ("lr", "-0.1"), ("alpha", "1.01"),
    ("momentum", "1"), ("milestones", "a,b"), ("dataset", 3), ("gamma", "0"), ("amp", "maybe"),
])
def test_parse_refuses(name, raw):
    with pytest.raises(TTKDError, match=f"invalid {name}: "):
        parsing.parse(config.PARAMS[name], raw)


def test_mlproject_has_every_entry_point_and_passes_parameters_through():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(spec["entry_points"]) == {"main", "baseline", "teach", "distill", "sweep", "search", "promote",
                                          "predict", "serve"}
    for stage in ("main", "baseline", "teach", "distill", "sweep", "search"):
        entry = spec["entry_points"][stage]
        assert "parameters" not in entry  # so MLflow passes -P values through as --NAME VALUE
        assert entry["command"] == f"python -m entry.{stage}"
    documented = re.findall(r"[a-z_]+", (REPO / "MLproject").read_text().split("entry_points")[0])
    assert set(config.PARAMS) <= set(documented)


def test_a_preset_extends_another_and_its_own_values_win(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('dataset = "digits"\nepochs = 7\nlr = 0.2\n')
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{base}"\nstage = "baseline"\nlr = 0.3\n')
    cfg = presets.resolve("baseline", {}, str(child))
    assert (cfg.train[""].epochs, cfg.train[""].lr) == (7, 0.3)
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\nstage = "baseline"\n')
    with pytest.raises(TTKDError, match="extends itself"):
        presets.resolve("baseline", {}, str(loop))


def test_resume_compares_only_the_given_values_with_the_runs_own_as_mlflow_logged_them():
    logged = {"seeds": "0,1,2", "weights": "0.0,0.005", "methods": "kd,dkd", "register_as": "digits",
              "student.lr": "0.05", "teacher.lr": "0.1", "student.milestones": "(30, 60)",
              "teacher.milestones": "(30, 60)", "student.amp": "False", "teacher.amp": "True",
              "dkd.dkd_beta": "8.0"}
    same = presets.resolve("sweep", {"resume": "last", "seeds": "3", "weights": "0.005", "methods": "kd,dkd",
                                    "milestones": "30,60", "dkd_beta": "8", "jobs": "1", "nproc": "2"})
    assert same.given == ("dkd_beta", "methods", "milestones", "seeds", "weights")  # jobs, nproc may change
    assert presets.resume_conflicts(same, logged) == []
    other = presets.resolve("sweep", {"resume": "last", "seeds": "2", "methods": "kd,dkd", "lr": "0.05",
                                     "amp": "true", "dkd_beta": "4", "stream": "false"})
    assert presets.resume_conflicts(other, logged) == [
        "amp=True (the run has student.amp=False)", "dkd_beta=4.0 (the run has dkd.dkd_beta=8.0)",
        "lr=0.05 (the run has teacher.lr=0.1)", "seeds=0,1 (the run has seeds=0,1,2)",
        "stream (the run did not record it)"]
    with pytest.raises(TTKDError, match=r"^resume continues run abc with the values it started with, and "
                                        r"these differ: amp=True \(the run has student.amp=False\); dkd_beta"):
        presets.check_resume(other, "abc", logged)
    one = presets.resolve("sweep", {"resume": "last", "seeds": "1"})  # one seed, 0: logged as "0", not a count
    assert presets.resume_conflicts(one, {"seeds": "0"}) == []
    assert presets.resume_conflicts(one, {"seeds": "7"}) == ["seeds=0 (the run has seeds=7)"]


def test_the_table_imports_nothing_heavier_than_the_standard_library():
    """config (and its parser) sits below the engine: importing it loads no torch, and no engine, data, kd or models;
    the registries fill in their names (and the methods their parameters) when a value is checked."""
    import subprocess
    import sys
    code = ("import sys, ttkd.config as c, ttkd.parsing; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'numpy', 'mlflow') or m in ('ttkd.engine', 'ttkd.data', 'ttkd.kd', 'ttkd.models', "
            "'ttkd.distributed')); print(heavy); import ttkd.presets as p; "
            "p.resolve('distill', {'method': 'dkd', 'teacher': 't'}); print('ttkd.kd' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True"]
