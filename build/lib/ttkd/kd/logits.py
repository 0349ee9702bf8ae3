"""Objectives on logits alone: cross-entropy, the trained-teacher term, and the KD
methods KD, DKD and DIST."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttkd.config import Param
from ttkd.kd.base import Batch, Context, register, soft_kl


@register("ce", role="baseline")
class CrossEntropy(nn.Module):
    """Cross-entropy alone: loss = CE(z, y)."""

    def __init__(self, context: Context):
        super().__init__()

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce, "ce": ce}


@register("teach", params=("weight", "temperature"), role="teach")
class TrainedTeacher(nn.Module):
    """The Trained-Teacher objective: loss = CE(z_t, y) + w · T² · KL(p_t^T ‖ p_s^T).

    The student is frozen, so the gradient flows into the teacher only. w > 0 pulls
    the teacher's softened predictions toward what the student can imitate (trained
    teacher); w = 0 is plain CE (normal teacher); w < 0 pushes them away (the "nasty
    teacher" of Ma et al., ICLR 2021). Parts: ce, kl (unweighted).
    """

    def __init__(self, context: Context, weight: float, temperature: float):
        super().__init__()
        self.weight, self.temperature = weight, temperature

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(b.logits, b.labels)
        kl = soft_kl(b.logits, b.partner_logits, self.temperature)
        return {"loss": ce + self.weight * kl, "ce": ce, "kl": kl}


@register("kd", params=("alpha", "temperature"))
class KD(nn.Module):
    """KD (Hinton et al., 2015): loss = (1 − α) · CE(z_s, y) + α · T² · KL(p_t^T ‖ p_s^T).

    α weights the KL term, as in the Trained-Teacher and Nasty-Teacher code
    (torchdistill's ``KDLoss`` gives α to the CE term instead). Parts: ce, kl (unweighted).
    """

    def __init__(self, context: Context, alpha: float, temperature: float):
        super().__init__()
        self.alpha, self.temperature = alpha, temperature

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(b.logits, b.labels)
        kl = soft_kl(b.partner_logits, b.logits, self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kl, "ce": ce, "kl": kl}


@register("dkd", params=(
    Param("dkd_alpha", "float", 1.0, "dkd: weight α of TCKD (target vs. rest)", "a number >= 0",
          lambda v: v >= 0),
    Param("dkd_beta", "float", 8.0, "dkd: weight β of NCKD (among non-target classes)", "a number >= 0",
          lambda v: v >= 0),
    Param("dkd_warmup", "int", 20, "dkd: epochs over which the KD term ramps up linearly from 0",
          "an integer >= 0", lambda v: v >= 0),
    "temperature",
))
class DKD(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022): loss = CE(z_s, y) + r · (α · TCKD + β · NCKD),
    r = min(epoch / warmup, 1).

    With y the target class and p^T the softened predictions:
    TCKD = T² · KL(b_t ‖ b_s), b = (p_y, 1 − p_y), the binary target-vs-rest split;
    NCKD = T² · KL(p̂_t ‖ p̂_s), p̂ = softmax over the non-target classes only
    (p̂_k = p_k / (1 − p_y), k ≠ y). Defaults α = 1, β = 8, T = 4, 20 warm-up epochs.
    Parts: ce, tckd, nckd (unweighted).
    """

    def __init__(self, context: Context, dkd_alpha: float, dkd_beta: float, dkd_warmup: int,
                 temperature: float):
        super().__init__()
        self.alpha, self.beta, self.warmup, self.temperature = dkd_alpha, dkd_beta, dkd_warmup, temperature

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        t = self.temperature
        target = F.one_hot(b.labels, b.logits.shape[1]).bool()
        log_s, log_t = F.log_softmax(b.logits / t, 1), F.log_softmax(b.partner_logits / t, 1)
        tckd = t * t * _kl(_binary(log_t, target), _binary(log_s, target))
        # non-target distribution: the target logit pushed 1000 below the others, so its
        # probability is exactly 0 in float32 while every term stays finite
        nt_s = F.log_softmax(b.logits / t - 1000.0 * target, 1)
        nt_t = F.log_softmax(b.partner_logits / t - 1000.0 * target, 1)
        nckd = t * t * _kl(nt_t, nt_s)
        # a tensor op, not Python's min: the engine passes the epoch as a 0-d tensor, so that a
        # compiled step is one graph for every epoch instead of one per epoch
        ramp = (torch.as_tensor(b.epoch, dtype=torch.float32, device=b.logits.device) / self.warmup).clamp(
            max=1.0) if self.warmup > 0 else 1.0
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce + ramp * (self.alpha * tckd + self.beta * nckd), "ce": ce,
                "tckd": tckd, "nckd": nckd}


def _binary(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` log-probabilities of the target class and of all the others together."""
    log_target = log_p.masked_fill(~target, float("-inf")).logsumexp(1)
    log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(1)
    return torch.stack([log_target, log_rest], 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p ‖ q) from ``(B, C)`` log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


@register("dist", params=(
    Param("dist_beta", "float", 2.0, "dist: weight β of the inter-class relation", "a number >= 0",
          lambda v: v >= 0),
    Param("dist_gamma", "float", 2.0, "dist: weight γ of the intra-class relation", "a number >= 0",
          lambda v: v >= 0),
    Param("dist_tau", "float", 4.0, "dist: temperature τ", "a number > 0", lambda v: v > 0),
))
class DIST(nn.Module):
    """DIST (Huang et al., NeurIPS 2022): loss = CE(z_s, y) + β · τ² · inter + γ · τ² · intra.

    With P = softmax(z / τ) as a ``(B, K)`` matrix and ρ the Pearson correlation,
    inter = 1 − mean_i ρ(P_s[i, :], P_t[i, :]) (each sample's ranking of the classes) and
    intra = 1 − mean_k ρ(P_s[:, k], P_t[:, k]) (each class's ranking of the samples).
    Parts: ce, inter, intra (unweighted, without τ²).
    """

    def __init__(self, context: Context, dist_beta: float, dist_gamma: float, dist_tau: float):
        super().__init__()
        self.beta, self.gamma, self.tau = dist_beta, dist_gamma, dist_tau

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        p_s = F.softmax(b.logits / self.tau, 1)
        p_t = F.softmax(b.partner_logits / self.tau, 1)
        inter = 1 - _pearson(p_s, p_t).mean()
        intra = 1 - _pearson(p_s.T, p_t.T).mean()
        ce = F.cross_entropy(b.logits, b.labels)
        t2 = self.tau**2
        return {"loss": ce + t2 * (self.beta * inter + self.gamma * intra), "ce": ce,
                "inter": inter, "intra": intra}


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two ``(R, C)`` matrices: ``(R,)``."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
