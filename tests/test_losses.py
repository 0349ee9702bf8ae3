import math

import pytest
import torch
import torch.nn.functional as F

from ttkd import losses


def hand_kl(p_logits, q_logits, t):
    """T² · Σ p (log p − log q) for one row, with plain Python floats."""
    def softmax(z):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]
    p, q = softmax(p_logits), softmax(q_logits)
    return t * t * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_soft_kl_matches_hand_computation():
    zt, zs = [2.0, 0.0, -1.0], [0.5, 1.0, 0.0]
    for t in (1.0, 4.0):
        got = losses.soft_kl(torch.tensor([zt]), torch.tensor([zs]), t).item()
        assert got == pytest.approx(hand_kl(zt, zs, t), rel=1e-5)


def test_soft_kl_is_batch_mean_and_matches_kl_div():
    torch.manual_seed(0)
    zt, zs = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3
    reference = F.kl_div(F.log_softmax(zs / 4, 1), F.log_softmax(zt / 4, 1),
                         log_target=True, reduction="batchmean") * 16
    assert losses.soft_kl(zt, zs, 4.0).item() == pytest.approx(reference.item(), rel=1e-5)
    rows = [hand_kl(a.tolist(), b.tolist(), 4.0) for a, b in zip(zt, zs)]
    assert losses.soft_kl(zt, zs, 4.0).item() == pytest.approx(sum(rows) / 8, rel=1e-4)


def test_soft_kl_is_zero_for_equal_and_positive_otherwise():
    z = torch.randn(4, 10)
    assert losses.soft_kl(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.soft_kl(z, z.flip(1), 4.0).item() > 0


def test_teacher_loss_is_ce_plus_weighted_kl():
    zt, zs, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([0])
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    kl = hand_kl([2.0, 0.0, -1.0], [0.5, 1.0, 0.0], 4.0)
    for w in (0.005, 0.0, -0.1):
        loss, ce_part, kl_part = losses.teacher_loss(zt, zs, y, w, 4.0)
        assert ce_part.item() == pytest.approx(ce, rel=1e-5)
        assert kl_part.item() == pytest.approx(kl, rel=1e-5)
        assert loss.item() == pytest.approx(ce + w * kl, rel=1e-5)


def test_distill_loss_gives_alpha_to_the_kl_term():
    zs, zt, y = torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
    ce = -math.log(math.exp(1) / (math.exp(0.5) + math.exp(1) + 1))
    kl = hand_kl([2.0, 0.0, -1.0], [0.5, 1.0, 0.0], 4.0)  # KL(teacher ‖ student)
    for alpha in (0.0, 0.9, 1.0):
        loss, _, _ = losses.distill_loss(zs, zt, y, alpha, 4.0)
        assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-5)


@pytest.mark.parametrize("weight, closer", [(1.0, True), (-1.0, False)])
def test_weight_sign_moves_teacher_toward_or_away_from_student(weight, closer):
    """A gradient step on the teacher logits with w > 0 lowers KL(teacher ‖ student);
    with w < 0 (nasty teacher) it raises it, relative to the same step with w = 0."""
    torch.manual_seed(1)
    zs, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    start = torch.randn(16, 10)

    def kl_after_step(w):
        zt = start.clone().requires_grad_(True)
        loss, _, _ = losses.teacher_loss(zt, zs, y, w, 4.0)
        loss.backward()
        with torch.no_grad():
            return losses.soft_kl(zt - 0.1 * zt.grad, zs, 4.0).item()

    assert (kl_after_step(weight) < kl_after_step(0.0)) is closer
    assert (kl_after_step(weight) < losses.soft_kl(start, zs, 4.0).item()) is closer


def test_distill_gradient_reaches_only_the_student():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    loss, _, _ = losses.distill_loss(zs, zt.detach(), torch.zeros(4, dtype=torch.long), 0.9, 4.0)
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None
