"""Methods on intermediate features: FitNets hints, attention transfer and relational KD.

Stage maps come from ``forward_stages`` of both networks (see ``ttkd.models``). Where a
student map and a teacher map differ in resolution, the larger is average-pooled to
the smaller, as the public RepDistiller code does for attention transfer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttkd.config import Param
from ttkd.errors import TTKDError
from ttkd.kd.base import Batch, Context, register


def _same_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two ``(B, C, H, W)`` maps to the other's ``(H, W)``."""
    hs, ht = s.shape[-2:], t.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        s = F.adaptive_avg_pool2d(s, ht)
    elif ht[0] * ht[1] > hs[0] * hs[1]:
        t = F.adaptive_avg_pool2d(t, hs)
    return s, t


def middle(stages: tuple) -> int:
    """Index of the middle stage (of 3 stages the 2nd, of 4 the 3rd, of 1 the only one)."""
    return len(stages) // 2


@register("fitnet", params=(
    Param("fitnet_beta", "float", 100.0, "fitnet: weight β of the hint (MSE of middle-stage maps)",
          "a number >= 0", lambda v: v >= 0),
), features=True)
class FitNet(nn.Module):
    """FitNets hints (Romero et al., ICLR 2015): loss = CE(z_s, y) + β · mean (r(F_s) − F_t)².

    F_s, F_t are the middle stage maps of student and teacher (``middle``); r is a
    learned connector, a 1x1 convolution and BatchNorm from the student's channels to the
    teacher's, trained with the student. Maps of different resolution are pooled to the
    smaller one. Default β = 100. Parts: ce, hint (unweighted).
    """

    def __init__(self, context: Context, fitnet_beta: float):
        super().__init__()
        self.beta = fitnet_beta
        self.s_index, self.t_index = middle(context.model.stages), middle(context.partner.stages)
        cs = context.model.stages[self.s_index][0]
        ct = context.partner.stages[self.t_index][0]
        self.connector = nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        s, t = _same_size(self.connector(b.stages[self.s_index]), b.partner_stages[self.t_index])
        hint = F.mse_loss(s, t)
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce + self.beta * hint, "ce": ce, "hint": hint}


@register("at", params=(
    Param("at_beta", "float", 1000.0, "at: weight β of the attention-map loss", "a number >= 0",
          lambda v: v >= 0),
    Param("at_p", "float", 2.0, "at: power p of the attention map mean_c |F_c|^p", "a number > 0",
          lambda v: v > 0),
), features=True)
class AT(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017):
    loss = CE(z_s, y) + β · Σ_j mean (a(F_s^j) − a(F_t^j))²,
    a(F) = normalize(mean_c |F_c|^p) flattened over (H, W), an L2-normalised spatial map.

    The last min(n_s, n_t) stages of the two networks are paired, deepest with deepest;
    of each pair the larger map is pooled to the smaller, and pairs whose smaller map is
    1x1 (where a(F) is constant) are skipped. Defaults β = 1000, p = 2. Parts: ce, at.
    """

    def __init__(self, context: Context, at_beta: float, at_p: float):
        super().__init__()
        self.beta, self.p = at_beta, at_p
        n = min(len(context.model.stages), len(context.partner.stages))
        pairs = zip(range(len(context.model.stages) - n, len(context.model.stages)),
                    range(len(context.partner.stages) - n, len(context.partner.stages)))
        self.pairs = [(i, j) for i, j in pairs
                      if min(context.model.stages[i][1] * context.model.stages[i][2],
                             context.partner.stages[j][1] * context.partner.stages[j][2]) > 1]
        if not self.pairs:
            raise TTKDError(f"method at matches spatial attention maps, but {context.model_arch} and "
                            f"{context.partner_arch} have no pair of stage maps larger than 1x1; "
                            f"use convolutional networks (such as arch=resnet8) or another method")

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.abs().pow(self.p).mean(1).flatten(1), dim=1)

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        at = sum(F.mse_loss(*map(self.attention, _same_size(b.stages[i], b.partner_stages[j])))
                 for i, j in self.pairs)
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce + self.beta * at, "ce": ce, "at": at}


@register("rkd", params=(
    Param("rkd_distance", "float", 25.0, "rkd: weight of the distance term", "a number >= 0",
          lambda v: v >= 0),
    Param("rkd_angle", "float", 50.0, "rkd: weight of the angle term", "a number >= 0", lambda v: v >= 0),
), features=True)
class RKD(nn.Module):
    """Relational KD (Park et al., CVPR 2019), on the embeddings e (B, D):
    loss = CE(z_s, y) + w_d · distance + w_a · angle, where

    distance = Huber(ψ_D(e_s), ψ_D(e_t)), ψ_D(e)_ij = ‖e_i − e_j‖ / mean_{i≠j} ‖e_i − e_j‖;
    angle = Huber(ψ_A(e_s), ψ_A(e_t)), ψ_A(e)_ijk = ⟨u_ij, u_kj⟩ with u_ij = (e_i − e_j) / ‖e_i − e_j‖;
    Huber is the smooth L1 loss (δ = 1), a mean over all entries. The two embeddings
    may differ in width. Defaults w_d = 25, w_a = 50. Parts: ce, distance, angle.
    """

    def __init__(self, context: Context, rkd_distance: float, rkd_angle: float):
        super().__init__()
        self.w_d, self.w_a = rkd_distance, rkd_angle

    @staticmethod
    def distances(e: torch.Tensor) -> torch.Tensor:
        """ψ_D: ``(B, B)`` pairwise distances over their mean off the diagonal."""
        g = e @ e.T
        sq = g.diagonal()
        d = (sq[:, None] + sq[None, :] - 2 * g).clamp(min=1e-12).sqrt()
        d = d * (1 - torch.eye(len(e), device=e.device))  # exact zeros on the diagonal
        return d / d[d > 0].mean()

    @staticmethod
    def angles(e: torch.Tensor) -> torch.Tensor:
        """ψ_A: ``(B, B, B)`` cosines, [j, i, k] = ⟨e_i − e_j, e_k − e_j⟩ / (‖e_i − e_j‖ ‖e_k − e_j‖),
        0 where i = j or k = j. Computed from the Gram matrix G = e eᵀ, as
        G_ik − G_ij − G_jk + G_jj, in O(B²D + B³) instead of the O(B³D) of forming every
        difference vector."""
        g = e @ e.T
        sq = g.diagonal()
        d = (sq[:, None] + sq[None, :] - 2 * g).clamp(min=1e-12).sqrt()  # d[j, i] = ‖e_i − e_j‖
        dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + sq[:, None, None]
        eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
        off = ~(eye[:, :, None] | eye[:, None, :])  # i ≠ j and k ≠ j
        norms = torch.where(off, d[:, :, None] * d[:, None, :], torch.ones((), device=e.device))
        return torch.where(off, dot / norms, torch.zeros((), device=e.device)).flatten()

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        e_s, e_t = b.embedding, b.partner_embedding
        distance = F.smooth_l1_loss(self.distances(e_s), self.distances(e_t))
        angle = F.smooth_l1_loss(self.angles(e_s), self.angles(e_t))
        ce = F.cross_entropy(b.logits, b.labels)
        return {"loss": ce + self.w_d * distance + self.w_a * angle, "ce": ce,
                "distance": distance, "angle": angle}
