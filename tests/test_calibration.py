import json

import pytest
import torch

from ttkd import calibration, data, engine, models
from ttkd.engine import Precision, TrainConfig, choose_precision, fit, seed_everything
from ttkd.kd.logits import KD, CrossEntropy

DIGITS = data.load("digits")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration.json"


class Clock:
    """A clock that each fake step moves on by that step's cost: timing without waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def path(self, cost, built):
        def build():
            built.append(cost)

            def step():
                self.now += cost
            return step
        return build


def test_choose_keeps_the_fastest_path_and_caches_it(cache):
    clock, built = Clock(), []
    paths = {"float32": clock.path(0.02, built), "bf16": clock.path(0.01, built)}
    choice = calibration.choose("k", paths, images=64, clock=clock)
    assert choice.path == "bf16" and not choice.cached
    assert choice.rates == pytest.approx({"float32": 64 / 0.02, "bf16": 64 / 0.01})
    assert json.loads(cache.read_text())["k"]["path"] == "bf16"
    built.clear()
    again = calibration.choose("k", paths, images=64, clock=clock)
    assert again.cached and again.path == "bf16" and again.rates == choice.rates and built == []
    other = calibration.choose("another key", paths, images=64, clock=clock)
    assert not other.cached and len(built) == 2  # another key is measured again


def test_a_margin_makes_a_path_win_clearly_and_a_broken_cache_is_measured_again(cache):
    clock = Clock()
    close = {"float32": clock.path(0.0102, []), "bf16": clock.path(0.0100, [])}  # bf16 2% faster
    assert calibration.choose("a", close, 64, margin={"bf16": 1.05}, clock=clock).path == "float32"
    assert calibration.choose("b", close, 64, margin={"bf16": 0.95}, clock=clock).path == "bf16"
    cache.write_text("{not json")
    assert not calibration.choose("a", close, 64, clock=clock).cached
    cache.write_text(json.dumps({"c": {"path": "bf16", "rates": {"bf16": 1.0}}}))  # other paths
    assert not calibration.choose("c", close, 64, clock=clock).cached


def build(arch):
    seed_everything(0)
    return models.build(arch, 10, 1, image_size=8)


def test_forced_and_without_native_bf16_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(calibration, "choose", lambda *a, **k: pytest.fail("measured"))
    model = build("mlp")
    assert choose_precision(model, DIGITS, CrossEntropy(None), TrainConfig(amp=True)) == Precision(True, "amp=true", {})
    assert choose_precision(model, DIGITS, CrossEntropy(None), TrainConfig(amp=False)).bf16 is False
    monkeypatch.setattr(engine, "bf16_supported", lambda device: False)
    p = choose_precision(model, DIGITS, CrossEntropy(None), TrainConfig(amp="auto"))
    assert p == Precision(False, "no native bf16", {})


def test_auto_measures_on_copies_and_trains_as_the_chosen_precision_would(monkeypatch):
    """The calibration runs real steps (bf16 emulated where the CPU has none), touches no
    network, method or random state, and is cached for the next stage with the same key."""
    monkeypatch.setattr(engine, "bf16_supported", lambda device: True)
    teacher, student = build("cnn").eval(), build("mlp")
    method = KD(None, 0.9, 4.0)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    config = TrainConfig(epochs=1, amp="auto")
    p = choose_precision(student, DIGITS, method, config, teacher)
    assert p.reason == "measured" and set(p.rates) == {"float32", "bf16"} and min(p.rates.values()) > 0
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert choose_precision(student, DIGITS, method, config, teacher) == Precision(p.bf16, "cached", p.rates)

    auto = fit(student, DIGITS, method, config, partner=teacher)[-1]
    forced = fit(build("mlp"), DIGITS, KD(None, 0.9, 4.0), TrainConfig(epochs=1, amp=p.bf16), partner=teacher)[-1]
    assert auto.train == forced.train and auto.val_acc == forced.val_acc
