import pytest
import torch

from ttkd import data, losses, models
from ttkd.errors import TTKDError
from ttkd.train import TrainConfig, fit, frozen, seed_everything

DIGITS = data.load("digits")


def build(arch):
    seed_everything(0)
    return models.build(arch, 10, 1, image_size=8)


def ce(z, _, y):
    return losses.cross_entropy(z, y)


def test_fit_learns_and_reports_every_metric():
    history = fit(build("mlp"), DIGITS, ce, TrainConfig(epochs=3))
    assert [s.epoch for s in history] == [1, 2, 3]
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_acc > 80
    assert set(history[-1].metrics()) == {"train_loss", "train_ce", "val_loss", "val_acc", "lr",
                                          "epoch_time_s", "throughput"}
    assert history[0].lr == pytest.approx(0.05) and history[-1].lr < history[0].lr


def test_frozen_partner_gets_no_gradient_and_does_not_change():
    partner = build("cnn").eval()
    before = {k: v.clone() for k, v in partner.state_dict().items()}
    seen = []

    def loss(z, p, y):
        seen.append(p)
        return losses.distill_loss(z, p, y, 0.9, 4.0)

    history = fit(build("mlp"), DIGITS, loss, TrainConfig(epochs=1), partner=partner)
    assert all(p is not None and not p.requires_grad for p in seen)
    assert all(p.grad is None for p in partner.parameters())
    assert all(torch.equal(before[k], v) for k, v in partner.state_dict().items())
    assert not partner.training
    stats = history[0]
    assert stats.train_kl is not None and stats.agreement is not None
    assert stats.train_loss == pytest.approx(0.1 * stats.train_ce + 0.9 * stats.train_kl, rel=1e-4)


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
    a = fit(build("mlp"), DIGITS, ce, TrainConfig(epochs=1, seed=5))[-1]
    b = fit(build("mlp"), DIGITS, ce, TrainConfig(epochs=1, seed=5))[-1]
    assert a.train_loss == b.train_loss and a.val_acc == b.val_acc


def test_non_finite_loss_stops_with_the_epoch():
    def broken(z, _, y):
        loss, ce_, kl = losses.cross_entropy(z, y)
        return loss * float("nan"), ce_, kl
    with pytest.raises(TTKDError, match="became NaN or infinite at epoch 1, step 1;"):
        fit(build("mlp"), DIGITS, broken, TrainConfig(epochs=2))


def test_non_finite_watch_names_the_first_bad_step_every_25_steps_and_at_the_end():
    from ttkd.train import _NonFiniteWatch
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
    history = fit(model, DIGITS, ce, TrainConfig(epochs=2, amp=amp))
    assert history[-1].val_acc > 60 and history[-1].train_loss < history[0].train_loss
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous() for p in weights)  # back in the usual layout for export
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_bf16_is_used_where_supported():
    from ttkd.train import autocast, bf16_supported
    cpu = torch.device("cpu")
    with autocast(cpu, True):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if bf16_supported(cpu) else torch.float32)
    with autocast(cpu, False):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.slow
def test_compile_option_trains():
    history = fit(build("mlp"), DIGITS, ce, TrainConfig(epochs=1, compile=True))
    assert history[-1].val_acc > 50
