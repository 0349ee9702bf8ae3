import json

import pytest
import torch

from ttkd import calibration, choice, data, models
from ttkd.choice import StepChoice, choose_step, device_signature
from ttkd.config import TrainConfig
from ttkd.engine import fit, seed_everything
from ttkd.kd.logits import KD, CrossEntropy
from ttkd.step import compiler_available, device_name

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


def test_measure_times_each_path_once_and_caches_it(cache):
    clock, built = Clock(), []
    paths = {"float32": clock.path(0.02, built), "bf16": clock.path(0.01, built)}
    m = calibration.measure("k", paths, images=64, clock=clock)
    assert not m.cached and m.rates == pytest.approx({"float32": 64 / 0.02, "bf16": 64 / 0.01})
    assert m.setup_s == pytest.approx({"float32": 0.0, "bf16": 0.0})  # the first call cost one step
    assert json.loads(cache.read_text())["k"]["rates"] == m.rates
    built.clear()
    again = calibration.measure("k", paths, images=64, clock=clock)
    assert again.cached and again.rates == m.rates and built == []

    def slow_start(built):  # a compiled path: its first call compiles for 12 s
        def build():
            built.append("compiled")
            calls = []

            def step():
                clock.now += 0.005 + (12.0 if not calls else 0.0)
                calls.append(1)
            return step
        return build
    more = calibration.measure("k", paths | {"bf16+default": slow_start(built)}, images=64, clock=clock)
    assert built == ["compiled"] and not more.cached  # only the new path was measured
    assert more.rates["bf16+default"] == pytest.approx(64 / 0.005) and more.setup_s["bf16+default"] == pytest.approx(12)
    assert more.rates["bf16"] == m.rates["bf16"]
    assert calibration.measure("another key", paths, 64, clock=clock).cached is False


def test_a_broken_cache_is_measured_again(cache):
    clock = Clock()
    paths = {"float32": clock.path(0.01, [])}
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert not calibration.measure("a", paths, 64, clock=clock).cached
    cache.write_text(json.dumps({"a": {"rates": "nonsense"}}))
    assert not calibration.measure("a", paths, 64, clock=clock).cached


def build(arch):
    seed_everything(0)
    return models.build(arch, 10, 1, image_size=8)


def test_forced_and_without_native_bf16_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(calibration, "measure", lambda *a, **k: pytest.fail("measured"))
    model = build("mlp")
    forced = choose_step(model, DIGITS, CrossEntropy(None), TrainConfig(amp=True, compile=False))
    assert forced == StepChoice(True, "amp=true", {})
    assert choose_step(model, DIGITS, CrossEntropy(None), TrainConfig(amp=False, compile=False)).bf16 is False
    monkeypatch.setattr(choice, "bf16_supported", lambda device: False)
    p = choose_step(model, DIGITS, CrossEntropy(None), TrainConfig(amp="auto", compile=False))
    assert p == StepChoice(False, "no native bf16", {})
    det = choose_step(model, DIGITS, CrossEntropy(None), TrainConfig(compile="auto", deterministic=True))
    assert det.compile is None and det.compile_reason == "compile=auto: deterministic=true trains eagerly"


def test_auto_measures_on_copies_and_trains_as_the_chosen_step_would(monkeypatch):
    """The calibration runs real steps (bf16 emulated where the CPU has none), touches no
    network, method or random state, and is cached for the next stage with the same key.
    A digits stage lasts seconds: compiling cannot pay, so it is neither done nor measured."""
    monkeypatch.setattr(choice, "bf16_supported", lambda device: True)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    teacher, student = build("cnn").eval(), build("mlp")
    method = KD(None, 0.9, 4.0)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    config = TrainConfig(epochs=1, amp="auto", compile="auto")
    p = choose_step(student, DIGITS, method, config, teacher)
    assert p.reason == "measured" and set(p.rates) == {"float32", "bf16"} and min(p.rates.values()) > 0
    assert p.compile is None and p.compile_reason.startswith("compile=auto: a stage of about ")
    assert p.compile_reason.endswith(" s cannot repay compiling")
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = choose_step(student, DIGITS, method, config, teacher)
    assert (again.reason, again.bf16, again.rates) == ("cached", p.bf16, p.rates)

    auto = fit(student, DIGITS, method, config, partner=teacher, step=p.step)[-1]
    forced = fit(build("mlp"), DIGITS, KD(None, 0.9, 4.0), TrainConfig(epochs=1, amp=p.bf16, compile=False),
                 partner=teacher)[-1]
    assert auto.train == forced.train and auto.val_acc == forced.val_acc


def test_auto_compiles_a_stage_long_enough_to_repay_it_and_not_a_shorter_one(monkeypatch, cache):
    """The decision counts the compile time: from cached figures (eager 1,000 img/s; compiled
    2,000 img/s after 30 s of compiling), 10,000 and 1,000 steps of 64 images are compiled, 500
    are not; with a compiled step only 10% faster, 1,500 steps are not either."""
    model, method = build("mlp"), CrossEntropy(None)
    config = TrainConfig(amp=False, compile="auto", batch_size=64)
    monkeypatch.setattr(calibration, "cached", lambda key: calibration.Measured(
        {"float32": 1000.0, "float32+default": 2000.0}, {"float32": 0.0, "float32+default": 30.0}, True))
    long = choose_step(model, DIGITS, method, config, steps=10_000)  # 640 s eager, 30 + 320 s compiled
    assert long.compile == "default" and long.compile_s == 30.0
    assert "2,000 img/s compiled (default) after 30 s of compiling: about 350 s for the stage against 640 s" \
        in long.compile_reason
    barely = choose_step(model, DIGITS, method, config, steps=1_000)  # 64 s eager, 30 + 32 = 62 s compiled
    assert barely.compile == "default"
    short = choose_step(model, DIGITS, method, config, steps=500)  # 32 s eager: under MIN_COMPILE_STAGE_S
    assert short.compile is None and short.compile_reason == "compile=auto: a stage of about 32 s cannot repay compiling"
    monkeypatch.setattr(calibration, "cached", lambda key: calibration.Measured(
        {"float32": 1000.0, "float32+default": 1100.0}, {"float32": 0.0, "float32+default": 30.0}, True))
    slow = choose_step(model, DIGITS, method, config, steps=1_500)  # 96 s eager, 30 + 87 s compiled
    assert slow.compile is None and slow.compile_reason.endswith("; trained eagerly")


def test_without_a_cpp_compiler_compile_true_trains_eagerly_and_says_so(monkeypatch):
    from torch._inductor import config as inductor
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    with inductor.patch({"cpp.cxx": (None, "/nonexistent/g++")}):  # the compiler hidden
        c = choose_step(build("mlp"), DIGITS, CrossEntropy(None), TrainConfig(amp=False, compile=True))
        assert c.compile is None and c.compile_reason.startswith("compile=true: no C++ compiler found")
        history = fit(build("mlp"), DIGITS, CrossEntropy(None), TrainConfig(epochs=1, amp=False, compile=True),
                      step=c.step)
    assert history[-1].val_acc > 50
    assert compiler_available()  # found again


def test_figures_measured_under_load_are_dropped_once_an_epoch_trains_far_faster(cache):
    clock, built = Clock(), []
    slow = calibration.measure("k", {"float32": clock.path(1.0, built)}, images=64, clock=clock)  # 64 img/s
    calibration.measure("other", {"float32": clock.path(0.01, built)}, images=64, clock=clock)
    assert slow.rates["float32"] == pytest.approx(64)
    assert not calibration.recheck("k", "float32", observed=100)  # within STALE_FACTOR: an epoch's overheads
    assert not calibration.recheck("k", "bf16", observed=10_000)  # a path never measured: nothing to judge
    assert calibration.recheck("k", "float32", observed=10_000)
    assert set(json.loads(cache.read_text())) == {"other"}  # the next stage measures "k" again
    assert calibration.cached("k").rates == {}


def test_the_cache_tells_cpus_apart_by_instruction_sets_and_cores(monkeypatch):
    signature = device_signature(torch.device("cpu"))
    assert signature.startswith(device_name(torch.device("cpu")) + " [") and signature.endswith(
        f"] x{__import__('os').cpu_count()}")
    flags = open("/proc/cpuinfo").read()
    assert ("avx512_bf16" in signature) == (" avx512_bf16" in flags)
    monkeypatch.setattr("os.cpu_count", lambda: 96)
    assert device_signature(torch.device("cpu")) != signature


def test_a_stage_drops_cached_figures_that_its_first_epoch_shows_were_measured_under_load(store, cli, cache,
                                                                                            monkeypatch):
    monkeypatch.setattr(choice, "bf16_supported", lambda device: True)  # measured on every CPU, emulated or not
    args = ("baseline", "--epochs", "1", "--compile", "false")
    status, _, err = cli(*args)
    assert status == 0 and "warning: the cached calibration" not in err, err
    entries = json.loads(cache.read_text())
    [key] = entries
    entries[key]["rates"] = dict.fromkeys(entries[key]["rates"], 1.0)  # as if measured while the machine was busy
    cache.write_text(json.dumps(entries))
    status, _, err = cli(*args)
    assert status == 0, err
    assert "warning: the cached calibration of " in err and "(1 img/s) is far below what epoch 1 trained at" in err
    assert key not in json.loads(cache.read_text())


def test_a_long_stage_gets_a_longer_look_within_the_cap(cache):
    clock = Clock()
    timed = {}
    for key, stage_images in (("short", 64 * 200), ("medium", 64 * 10**6), ("long", 64 * 10**9)):
        start = clock.now
        measured = calibration.measure(key, {"float32": clock.path(0.01, [])}, 64, clock=clock,
                                       stage_images=stage_images)
        timed[key] = clock.now - start - 0.01  # less the untimed first call
        assert measured.rates["float32"] == pytest.approx(6400)
    assert timed["short"] == pytest.approx(calibration.ROUNDS * calibration.MIN_SECONDS, abs=0.02)  # a 2 s stage
    # a 2.8-hour stage: 0.2% of it, 20 s; a 2,800-hour one: the cap
    assert timed["medium"] == pytest.approx(calibration.MEASURE_SHARE * 10**6 / 100, abs=0.3)
    assert timed["long"] == pytest.approx(calibration.MAX_MEASURE_S, abs=0.3)
