import copy
import math

import pytest
import torch

from ttkd import data, kd, models
from ttkd.config import TrainConfig
from ttkd.engine import fit, seed_everything
from ttkd.errors import TTKDError
from ttkd.kd.logits import KD, CrossEntropy
from ttkd.step import frozen

DIGITS = data.load("digits")


def build(arch):
    seed_everything(0)
    return models.build(arch, 10, 1, image_size=8)


def ce():
    return CrossEntropy(None)


def test_fit_learns_and_reports_every_metric():
    history = fit(build("mlp"), DIGITS, ce(), TrainConfig(epochs=3, amp=False, compile=False))
    assert [s.epoch for s in history] == [1, 2, 3]
    assert history[-1].train["loss"] < history[0].train["loss"]
    assert history[-1].val_acc > 80
    assert set(history[-1].metrics()) == {"train_loss", "train_ce", "val_loss", "val_acc", "lr",
                                          "epoch_time_s", "throughput"}
    assert history[0].lr == pytest.approx(0.05) and history[-1].lr < history[0].lr


def test_frozen_partner_gets_no_gradient_and_does_not_change():
    partner = build("cnn").eval()
    before = {k: v.clone() for k, v in partner.state_dict().items()}
    seen = []

    class Spy(KD):
        def forward(self, b):
            seen.append(b.partner_logits)
            return super().forward(b)

    history = fit(build("mlp"), DIGITS, Spy(None, 0.9, 4.0), TrainConfig(epochs=1, amp=False, compile=False), partner=partner)
    assert all(p is not None and not p.requires_grad for p in seen)
    assert all(p.grad is None for p in partner.parameters())
    assert all(torch.equal(before[k], v) for k, v in partner.state_dict().items())
    assert not partner.training
    stats = history[0]
    assert list(stats.train) == ["loss", "ce", "kl"] and stats.agreement is not None
    assert stats.train["loss"] == pytest.approx(0.1 * stats.train["ce"] + 0.9 * stats.train["kl"], rel=1e-4)
    assert {"train_loss", "train_ce", "train_kl", "agreement"} <= set(stats.metrics())


def test_frozen_partner_is_a_bf16_copy_that_predicts_like_the_original():
    partner = build("cnn").eval()
    fast = frozen(partner, fast=True)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert all(p.dtype == torch.float32 for p in partner.parameters())  # the caller's is untouched
    x = next(data.batches(DIGITS, "val", 512))[0]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as fit runs it
        agree = (fast(x).argmax(1) == partner(x).argmax(1)).float().mean().item()
    assert agree > 0.97
    plain = frozen(partner, fast=False)
    assert plain is not partner and all(p.dtype == torch.float32 for p in plain.parameters())


def test_same_seed_same_result():
    a = fit(build("mlp"), DIGITS, ce(), TrainConfig(epochs=1, seed=5, amp=False, compile=False))[-1]
    b = fit(build("mlp"), DIGITS, ce(), TrainConfig(epochs=1, seed=5, amp=False, compile=False))[-1]
    assert a.train == b.train and a.val_acc == b.val_acc


def test_non_finite_loss_stops_with_the_epoch():
    class Broken(CrossEntropy):
        def forward(self, b):
            parts = super().forward(b)
            return parts | {"loss": parts["loss"] * float("nan")}
    with pytest.raises(TTKDError, match="became NaN or infinite at epoch 1, step 1;"):
        fit(build("mlp"), DIGITS, Broken(None), TrainConfig(epochs=2, amp=False, compile=False))


def test_non_finite_watch_names_the_first_bad_step_every_25_steps_and_at_the_end():
    from ttkd.engine import _NonFiniteWatch
    watch = _NonFiniteWatch(torch.device("cpu"))
    reported = {}
    for step in range(1, 61):
        loss = torch.tensor(float("nan") if step in (30, 41) else 1.0)
        seen = watch.step(loss, step)
        if seen >= 0:
            reported.setdefault(step, seen)
    assert reported == {50: 30}  # checked at step 50 (a multiple of 25), naming step 30
    assert watch.first_bad_step(wait=True) == 30
    late = _NonFiniteWatch(torch.device("cpu"))
    assert all(late.step(torch.tensor(float("inf") if s == 55 else 0.5), s) < 0 for s in range(1, 61))
    assert late.first_bad_step(wait=True) == 55


@pytest.mark.parametrize("amp", [True, False])
def test_mixed_precision_on_and_off_both_learn(amp):
    model = build("cnn")
    history = fit(model, DIGITS, ce(), TrainConfig(epochs=2, amp=amp, compile=False))
    assert history[-1].val_acc > 60 and history[-1].train["loss"] < history[0].train["loss"]
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous() for p in weights)  # back in the usual layout for export
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


@pytest.mark.parametrize("native", [True, False])
def test_amp_true_trains_in_bf16_on_every_cpu_and_false_in_float32(monkeypatch, native):
    """amp=true forces bf16 (emulated where the CPU has none), so the bf16 path is tested on
    any machine; amp=false is float32 whatever the CPU has."""
    from ttkd import choice
    monkeypatch.setattr(choice, "bf16_supported", lambda device: native)
    for amp, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        model, seen = build("mlp"), []
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        fit(model, DIGITS, ce(), TrainConfig(epochs=1, amp=amp, compile=False))
        assert seen and set(seen) == {dtype}


@pytest.mark.slow
def test_compile_true_compiles_the_whole_step_of_a_feature_method_and_the_partner(monkeypatch):
    """FitNets reads the student's and the teacher's stage maps: the compiled step is the
    objective (network, connector and loss) and the partner's forward, and it trains."""
    from ttkd.build import build_method
    from ttkd.step import Objective
    compiled, real = [], torch.compile
    # captured and trained through dynamo and AOTAutograd; inductor's code generation, the slow part, is
    # exercised by the compiled kill -9 test and the speed benchmark
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real(
        fn, **{k: v for k, v in kw.items() if k != "mode"}, backend="aot_eager"))
    teacher, student = build("cnn").eval(), build("resnet8")
    method = build_method("fitnet", "distill", DIGITS, student, teacher, {"fitnet_beta": 100.0})
    history = fit(student, DIGITS, method, TrainConfig(epochs=1, amp=False, compile=True), partner=teacher)
    assert history[-1].val_acc > 30 and all(map(math.isfinite, history[-1].train.values()))
    objective, partner_forward = compiled
    assert isinstance(objective, Objective) and objective.method is method and objective.model is student
    assert partner_forward.func.__name__ == "partner_outputs" and partner_forward.keywords["features"] is True


def test_a_method_with_parameters_and_buffers_is_trained_and_resumed_exactly():
    """FitNets' connector is optimised with the student; CRD's memory bank travels in the
    engine state, and resuming from epoch 1's state repeats epoch 2 exactly."""
    data8 = DIGITS
    teacher = build("cnn").eval()

    def method():
        from ttkd.build import shapes
        torch.manual_seed(0)
        student = build("resnet8")
        context = kd.Context(10, data8.train_y, shapes(student, (1, 8, 8)), shapes(teacher, (1, 8, 8)))
        return student, kd.build("crd", context, crd_beta=0.8, crd_dim=16, crd_k=64, crd_tau=0.07,
                                 crd_momentum=0.5)

    config = TrainConfig(epochs=2, deterministic=True, amp=False, compile=False)
    states = []
    student, crd = method()
    before = crd.embed_s.weight.detach().clone(), crd.memory_s.clone()
    whole = fit(student, data8, crd, config, partner=teacher, on_epoch=lambda s, st: states.append(
        (copy.deepcopy(st), {k: v.clone() for k, v in student.state_dict().items()})))
    assert not torch.equal(crd.embed_s.weight, before[0])  # trained with the student
    assert not torch.equal(crd.memory_s, before[1])         # the bank moved
    assert list(whole[-1].train) == ["loss", "ce", "crd"]

    student2, crd2 = method()
    student2.load_state_dict(states[0][1])
    again = fit(student2, data8, crd2, config, partner=teacher, resume=states[0][0])
    assert again[-1].train == whole[-1].train and again[-1].val_acc == whole[-1].val_acc
    assert torch.equal(crd2.memory_t, crd.memory_t)


def test_fit_runs_the_step_it_is_given_and_never_decides():
    """amp=auto and compile=auto are requests that choose_step answers; fit refuses to guess."""
    from ttkd.errors import TTKDError
    from ttkd.step import Step
    with pytest.raises(TTKDError, match="decided by choose_step"):
        fit(build("mlp"), DIGITS, ce(), TrainConfig(epochs=1, compile=False))
    assert Step.forced(TrainConfig(amp=True, compile=True)) == Step(True, "default")
    assert Step.forced(TrainConfig(amp=False, compile="reduce-overhead")).describe() == "float32+reduce-overhead"
