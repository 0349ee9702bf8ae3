"""Every objective against a hand computation or an independent formulation."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ttkd import kd
from ttkd.errors import TTKDError
from ttkd.kd import Batch, Context, Shapes, soft_kl
from ttkd.kd.logits import DIST, DKD, KD, TrainedTeacher


def teacher_loss(zt, zs, y, w, t):
    parts = TrainedTeacher(None, w, t)(Batch(logits=zt, labels=y, epoch=1, partner_logits=zs))
    return parts["loss"], parts["ce"], parts["kl"]


def distill_loss(zs, zt, y, alpha, t):
    parts = KD(None, alpha, t)(Batch(logits=zs, labels=y, epoch=1, partner_logits=zt))
    return parts["loss"], parts["ce"], parts["kl"]


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
        got = soft_kl(torch.tensor([zt]), torch.tensor([zs]), t).item()
        assert got == pytest.approx(hand_kl(zt, zs, t), rel=1e-5)


def test_soft_kl_is_batch_mean_and_matches_kl_div():
    torch.manual_seed(0)
    zt, zs = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3
    reference = F.kl_div(F.log_softmax(zs / 4, 1), F.log_softmax(zt / 4, 1),
                         log_target=True, reduction="batchmean") * 16
    assert soft_kl(zt, zs, 4.0).item() == pytest.approx(reference.item(), rel=1e-5)
    rows = [hand_kl(a.tolist(), b.tolist(), 4.0) for a, b in zip(zt, zs)]
    assert soft_kl(zt, zs, 4.0).item() == pytest.approx(sum(rows) / 8, rel=1e-4)


def test_soft_kl_is_zero_for_equal_and_positive_otherwise():
    z = torch.randn(4, 10)
    assert soft_kl(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_kl(z, z.flip(1), 4.0).item() > 0


def test_teacher_loss_is_ce_plus_weighted_kl():
    zt, zs, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([0])
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    kl = hand_kl([2.0, 0.0, -1.0], [0.5, 1.0, 0.0], 4.0)
    for w in (0.005, 0.0, -0.1):
        loss, ce_part, kl_part = teacher_loss(zt, zs, y, w, 4.0)
        assert ce_part.item() == pytest.approx(ce, rel=1e-5)
        assert kl_part.item() == pytest.approx(kl, rel=1e-5)
        assert loss.item() == pytest.approx(ce + w * kl, rel=1e-5)


def test_distill_loss_gives_alpha_to_the_kl_term():
    zs, zt, y = torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
    ce = -math.log(math.exp(1) / (math.exp(0.5) + math.exp(1) + 1))
    kl = hand_kl([2.0, 0.0, -1.0], [0.5, 1.0, 0.0], 4.0)  # KL(teacher ‖ student)
    for alpha in (0.0, 0.9, 1.0):
        loss, _, _ = distill_loss(zs, zt, y, alpha, 4.0)
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
        loss, _, _ = teacher_loss(zt, zs, y, w, 4.0)
        loss.backward()
        with torch.no_grad():
            return soft_kl(zt - 0.1 * zt.grad, zs, 4.0).item()

    assert (kl_after_step(weight) < kl_after_step(0.0)) is closer
    assert (kl_after_step(weight) < soft_kl(start, zs, 4.0).item()) is closer


def test_distill_gradient_reaches_only_the_student():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    loss, _, _ = distill_loss(zs, zt.detach(), torch.zeros(4, dtype=torch.long), 0.9, 4.0)
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


# --- DKD ---------------------------------------------------------------------------------

def dkd_reference(zs, zt, y, t):
    """TCKD and NCKD as the DKD paper writes them, row by row with Python floats."""
    tckd = nckd = 0.0
    for s_row, t_row, target in zip(zs.tolist(), zt.tolist(), y.tolist()):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        bs, bt = (ps[target], 1 - ps[target]), (pt[target], 1 - pt[target])
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        others = [k for k in range(len(ps)) if k != target]
        qs = [ps[k] / (1 - ps[target]) for k in others]
        qt = [pt[k] / (1 - pt[target]) for k in others]
        nckd += sum(a * math.log(a / b) for a, b in zip(qt, qs))
    n = len(y)
    return t * t * tckd / n, t * t * nckd / n


def test_dkd_parts_match_the_paper_and_the_warm_up_ramps():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5) * 2, torch.randn(6, 5) * 2, torch.randint(0, 5, (6,))
    tckd, nckd = dkd_reference(zs, zt, y, 4.0)
    ce = F.cross_entropy(zs, y).item()
    dkd = DKD(None, dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20, temperature=4.0)
    for epoch, ramp in ((1, 1 / 20), (10, 0.5), (20, 1.0), (30, 1.0)):
        parts = dkd(Batch(logits=zs, labels=y, epoch=epoch, partner_logits=zt))
        assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-4)
        assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-4)
        assert parts["loss"].item() == pytest.approx(ce + ramp * (tckd + 8 * nckd), rel=1e-4)


def test_dkd_gradients_stay_finite_with_confident_logits():
    zs = (torch.randn(4, 10) * 30).requires_grad_(True)
    zt = torch.randn(4, 10) * 30
    parts = DKD(None, 1.0, 8.0, 0, 4.0)(Batch(logits=zs, labels=torch.arange(4), epoch=1, partner_logits=zt))
    parts["loss"].backward()
    assert torch.isfinite(zs.grad).all()


# --- DIST --------------------------------------------------------------------------------

def test_dist_is_one_minus_pearson_over_rows_and_columns():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    tau = 2.0
    ps, pt = F.softmax(zs / tau, 1).double().numpy(), F.softmax(zt / tau, 1).double().numpy()
    inter = 1 - np.mean([stats.pearsonr(a, b).statistic for a, b in zip(ps, pt)])
    intra = 1 - np.mean([stats.pearsonr(a, b).statistic for a, b in zip(ps.T, pt.T)])
    parts = DIST(None, dist_beta=2.0, dist_gamma=3.0, dist_tau=tau)(
        Batch(logits=zs, labels=y, epoch=1, partner_logits=zt))
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-4)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-4)
    ce = F.cross_entropy(zs, y).item()
    assert parts["loss"].item() == pytest.approx(ce + tau**2 * (2 * inter + 3 * intra), rel=1e-4)


def test_dist_is_zero_for_identical_predictions():
    z = torch.randn(8, 5)
    parts = DIST(None, 1.0, 1.0, 4.0)(Batch(logits=z, labels=torch.zeros(8, dtype=torch.long), epoch=1,
                                            partner_logits=z))
    assert parts["inter"].item() == pytest.approx(0, abs=1e-5)
    assert parts["intra"].item() == pytest.approx(0, abs=1e-5)


# --- feature methods ---------------------------------------------------------------------

def features_context(student_stages, teacher_stages, s_emb=8, t_emb=8, labels=None):
    labels = torch.arange(20) % 4 if labels is None else labels
    return Context(4, labels, Shapes(tuple(student_stages), s_emb), Shapes(tuple(teacher_stages), t_emb),
                   "student", "teacher")


def feature_batch(context, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = lambda shapes: [torch.randn(b, *s, generator=g) for s in shapes.stages]  # noqa: E731
    return Batch(logits=torch.randn(b, 4, generator=g), labels=torch.arange(b) % 4, epoch=1,
                 index=torch.arange(b), partner_logits=torch.randn(b, 4, generator=g),
                 stages=maps(context.model), partner_stages=maps(context.partner),
                 embedding=torch.randn(b, context.model.embedding, generator=g),
                 partner_embedding=torch.randn(b, context.partner.embedding, generator=g))


def test_fitnet_hint_is_the_mse_of_the_connected_middle_maps():
    ctx = features_context([(3, 8, 8), (5, 4, 4), (7, 2, 2)], [(6, 8, 8), (6, 4, 4)])
    fitnet = kd.build("fitnet", ctx, fitnet_beta=100.0).eval()  # BN in eval: an identity at init
    b = feature_batch(ctx)
    # the middle of 3 student stages is the 2nd (5x4x4); of 2 teacher stages the 2nd (6x4x4)
    conv = fitnet.connector[0].weight[:, :, 0, 0]  # (6, 5)
    mapped = torch.einsum("oc,bchw->bohw", conv, b.stages[1])
    bn = fitnet.connector[1]
    mapped = mapped / math.sqrt(1 + bn.eps)
    expected = ((mapped - b.partner_stages[1]) ** 2).mean()
    parts = fitnet(b)
    assert parts["hint"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(b.logits, b.labels).item()
                                                 + 100 * expected.item(), rel=1e-5)
    assert sum(p.numel() for p in fitnet.parameters()) == 6 * 5 + 2 * 6  # 1x1 conv and BN


def test_fitnet_pools_the_larger_map_to_the_smaller():
    ctx = features_context([(3, 8, 8)], [(3, 4, 4)])
    fitnet = kd.build("fitnet", ctx, fitnet_beta=1.0)
    b = feature_batch(ctx)
    assert torch.isfinite(fitnet(b)["hint"])


def attention_reference(f, p):
    a = np.abs(f.numpy()) ** p
    a = a.mean(1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_at_pairs_the_deepest_stages_and_matches_the_formula():
    ctx = features_context([(3, 8, 8), (5, 4, 4), (7, 2, 2)], [(4, 8, 8), (6, 4, 4), (8, 2, 2), (9, 1, 1)])
    at = kd.build("at", ctx, at_beta=1000.0, at_p=2.0)
    # deepest with deepest: (7,2,2)~(9,1,1) is skipped (1x1), (5,4,4)~(8,2,2) pooled, (3,8,8)~(6,4,4) pooled
    assert at.pairs == [(0, 1), (1, 2)]
    b = feature_batch(ctx)
    expected = 0.0
    for i, j in at.pairs:
        s = F.adaptive_avg_pool2d(b.stages[i], b.partner_stages[j].shape[-2:])
        expected += ((attention_reference(s, 2) - attention_reference(b.partner_stages[j], 2)) ** 2).mean()
    assert at(b)["at"].item() == pytest.approx(expected, rel=1e-5)


def test_at_refuses_networks_without_spatial_maps():
    with pytest.raises(TTKDError, match="method at matches spatial attention maps.*no pair"):
        kd.build("at", features_context([(32, 1, 1)], [(8, 2, 2), (9, 1, 1)]), at_beta=1.0, at_p=2.0)


def rkd_reference(e_s, e_t):
    """Distance and angle terms with explicit loops over pairs and triples."""
    def huber(a, b):
        d = np.abs(a - b)
        return np.where(d < 1, 0.5 * d * d, d - 0.5).mean()

    def distances(e):
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = e[i] - e[j], e[k] - e[j]
            if i != j and k != j:
                out[j, i, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    e_s, e_t = e_s.double().numpy(), e_t.double().numpy()
    return huber(distances(e_s), distances(e_t)), huber(angles(e_s), angles(e_t))


def test_rkd_matches_loops_over_pairs_and_triples():
    ctx = features_context([(3, 2, 2)], [(3, 2, 2)], s_emb=6, t_emb=10)
    b = feature_batch(ctx, b=5)
    distance, angle = rkd_reference(b.embedding, b.partner_embedding)
    parts = kd.build("rkd", ctx, rkd_distance=25.0, rkd_angle=50.0)(b)
    assert parts["distance"].item() == pytest.approx(distance, rel=1e-4)
    assert parts["angle"].item() == pytest.approx(angle, rel=1e-4)
    ce = F.cross_entropy(b.logits, b.labels).item()
    assert parts["loss"].item() == pytest.approx(ce + 25 * distance + 50 * angle, rel=1e-4)


def test_crd_negatives_come_from_other_classes_only():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 12)
    crd = kd.build("crd", features_context([(3, 2, 2)], [(3, 2, 2)], labels=labels), crd_beta=0.8,
                   crd_dim=4, crd_k=16384, crd_tau=0.07, crd_momentum=0.5)
    assert crd.k == 20 - 12  # capped at the fewest other-class samples
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2] * 50)
    neg = crd.negatives(y)
    assert (labels[neg] != y[:, None]).all()
    assert set(neg[y == 2].flatten().tolist()) == set(range(8))  # every other-class sample drawn


def test_crd_loss_and_memory_update_match_the_formula():
    labels = torch.arange(12) % 3
    ctx = features_context([(3, 2, 2)], [(3, 2, 2)], s_emb=5, t_emb=7, labels=labels)
    crd = kd.build("crd", ctx, crd_beta=0.8, crd_dim=4, crd_k=6, crd_tau=0.5, crd_momentum=0.5)
    b = feature_batch(ctx, b=3)
    b.labels = labels[:3]
    memory_s, memory_t = crd.memory_s.clone(), crd.memory_t.clone()
    torch.manual_seed(1)
    negatives = crd.negatives(b.labels)
    torch.manual_seed(1)
    parts = crd(b)

    v_s = F.normalize(crd.embed_s(b.embedding), dim=1).detach()
    v_t = F.normalize(crd.embed_t(b.partner_embedding), dim=1).detach()
    idx = torch.cat([b.index[:, None], negatives], 1)
    n, k = 12, 6

    def nce(v, memory):
        h = torch.exp(torch.einsum("bkd,bd->bk", memory[idx], v) / 0.5)
        h = h / (h.mean() * n)
        total = 0.0
        for row in h.tolist():
            total += math.log(row[0] / (row[0] + k / n + 1e-7))
            total += sum(math.log((k / n) / (x + k / n + 1e-7)) for x in row[1:])
        return -total / len(h)

    expected = nce(v_s, memory_t) + nce(v_t, memory_s)
    assert parts["crd"].item() == pytest.approx(expected, rel=1e-4)
    moved = F.normalize(0.5 * memory_s[b.index] + 0.5 * v_s, dim=1)
    assert torch.allclose(crd.memory_s[b.index], moved, atol=1e-6)
    assert torch.equal(crd.memory_s[3:], memory_s[3:])


def test_registry_lists_the_methods_and_refuses_unknown_ones():
    assert kd.names() == ["kd", "dkd", "dist", "fitnet", "at", "rkd", "crd"]
    with pytest.raises(TTKDError, match="unknown method 'fitnets'; choose one of: kd, dkd, dist"):
        kd.get("fitnets")
    assert [n for n in kd.names() if kd.get(n).features] == ["fitnet", "at", "rkd", "crd"]


def test_every_method_parameter_is_a_checked_run_parameter_of_distill():
    from ttkd import config

    for name in kd.names():
        assert set(kd.get(name).params) <= set(config.PARAMS), name  # a parameter with no row could not be given
        assert set(kd.get(name).params) <= set(config.STAGE_PARAMS["distill"]), name
    assert "alpha" not in config.METHOD_PARAMS and "dkd_beta" in config.METHOD_PARAMS
