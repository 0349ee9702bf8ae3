"""Contrastive representation distillation (Tian et al., ICLR 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ttkd.config import Param
from ttkd.kd.base import Batch, Context, register


@register("crd", params=(
    Param("crd_beta", "float", 0.8, "crd: weight β of the contrastive loss", "a number >= 0",
          lambda v: v >= 0),
    Param("crd_dim", "int", 128, "crd: width of the projected embeddings", "an integer >= 1",
          lambda v: v >= 1),
    Param("crd_k", "int", 16384, "crd: negatives per sample, drawn from the memory bank",
          "an integer >= 1", lambda v: v >= 1),
    Param("crd_tau", "float", 0.07, "crd: temperature τ of the contrastive scores", "a number > 0",
          lambda v: v > 0),
    Param("crd_momentum", "float", 0.5, "crd: momentum μ of the memory-bank update", "a number in [0, 1)",
          lambda v: 0 <= v < 1),
), features=True)
class CRD(nn.Module):
    """CRD (Tian et al., ICLR 2020): loss = CE(z_s, y) + β · (L(s ← t) + L(t ← s)).

    Both embeddings are projected by a learned linear layer each to ``dim`` and
    L2-normalised: v_s, v_t. A memory bank keeps one vector per training sample and
    network (m_s, m_t, N x dim). For sample i, the positive is its own index and the K
    negatives are drawn uniformly from the samples of other classes. With
    h(v, m) = exp(⟨v, m⟩ / τ) / Z (Z fixed at the first step to N times the mean of the
    exp term) and P_n = 1/N, the NCE loss of v_s against the teacher's memory is

        L(s ← t) = −mean_i [ log(h_i⁺ / (h_i⁺ + K·P_n)) + Σ_k log(K·P_n / (h_ik⁻ + K·P_n)) ],

    and symmetrically L(t ← s). After each step the memory rows of the batch move toward
    the new vectors, m ← normalize(μ·m + (1 − μ)·v). Defaults β = 0.8, dim = 128,
    K = 16384, τ = 0.07, μ = 0.5. K is capped at N minus the largest class (the fewest
    other-class samples any sample has): on a small data set more draws would only repeat
    the same negatives (digits: K = 1,290). Needs the sample indices. Parts: ce, crd.
    """

    def __init__(self, context: Context, crd_beta: float, crd_dim: int, crd_k: int, crd_tau: float,
                 crd_momentum: float):
        super().__init__()
        self.beta, self.tau, self.momentum = crd_beta, crd_tau, crd_momentum
        self.embed_s = nn.Linear(context.model.embedding, crd_dim)
        self.embed_t = nn.Linear(context.partner.embedding, crd_dim)
        labels = context.train_labels.long()
        n = len(labels)
        stdv = 1.0 / math.sqrt(crd_dim / 3)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", (torch.rand(n, crd_dim, generator=generator) * 2 - 1) * stdv)
        self.register_buffer("memory_t", (torch.rand(n, crd_dim, generator=generator) * 2 - 1) * stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of both directions, set at the first step
        # samples sorted by class, so that "any sample of another class" is one integer draw
        counts = torch.bincount(labels, minlength=context.num_classes)
        self.k = min(crd_k, n - int(counts.max()))
        self.register_buffer("by_class", torch.argsort(labels, stable=True))
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts)
        self.register_buffer("class_count", counts)

    def negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` indices of samples of another class than each label, uniformly drawn."""
        n = len(self.by_class)
        others = (n - self.class_count[labels]).float()[:, None]  # (B, 1)
        r = (torch.rand(len(labels), self.k, device=labels.device) * others).long()
        start = self.class_start[labels][:, None]
        r = torch.where(r >= start, r + self.class_count[labels][:, None], r)  # skip the own class
        return self.by_class[r]

    def contrast(self, v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, z: torch.Tensor):
        """NCE loss of ``v`` (B, dim) against ``memory`` rows ``idx`` (B, 1+K), positive first."""
        h = torch.exp(torch.bmm(memory[idx], v[:, :, None]).squeeze(2) / self.tau)  # (B, 1+K)
        z = torch.where(z < 0, h.detach().mean() * len(memory), z)
        h = h / z
        m_pn = self.k / len(memory)
        eps = 1e-7
        log_pos = torch.log(h[:, 0] / (h[:, 0] + m_pn + eps))
        log_neg = torch.log(m_pn / (h[:, 1:] + m_pn + eps)).sum(1)
        return -(log_pos + log_neg).mean(), z

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        v_s = F.normalize(self.embed_s(b.embedding), dim=1)
        v_t = F.normalize(self.embed_t(b.partner_embedding), dim=1)
        idx = torch.cat([b.index[:, None], self.negatives(b.labels)], 1)
        loss_s, z_s = self.contrast(v_s, self.memory_t, idx, self.z[0])
        loss_t, z_t = self.contrast(v_t, self.memory_s, idx, self.z[1])
        with torch.no_grad():
            self.z.copy_(torch.stack([z_s, z_t]))
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                moved = memory[b.index] * self.momentum + v.detach() * (1 - self.momentum)
                memory[b.index] = F.normalize(moved, dim=1)
        crd = loss_s + loss_t
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce + self.beta * crd, "ce": ce, "crd": crd}
