"""Loss functions of the three stages, as pure functions of logits.

Notation: z_t teacher logits, z_s student logits, both ``(B, K)``; y labels ``(B,)``;
T the temperature; p^T = softmax(z / T) over the K classes; every loss is a batch mean.
Each stage's loss returns ``(loss, ce, kl)`` so the engine can log both parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(p_logits/T) ‖ softmax(q_logits/T)), averaged over the batch.

    KL(p ‖ q) = Σ_k p_k (log p_k − log q_k). The T² factor keeps the gradient's scale
    independent of T (Hinton et al., 2015). Returns a scalar.
    """
    log_p = F.log_softmax(p_logits / temperature, dim=1)
    log_q = F.log_softmax(q_logits / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return temperature**2 * kl


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """Baseline loss: CE(z, y). Returns ``(loss, ce, kl)`` with kl = None."""
    ce = F.cross_entropy(logits, labels)
    return ce, ce, None


def teacher_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float,
):
    """Trained-teacher loss: CE(z_t, y) + w · T² · KL(p_t^T ‖ p_s^T).

    The student is frozen, so the gradient flows into the teacher only. w > 0 pulls
    the teacher's softened predictions toward what the student can imitate (trained
    teacher); w = 0 is plain CE (normal teacher); w < 0 pushes them away (the "nasty
    teacher" of Ma et al., ICLR 2021). Returns ``(loss, ce, kl)``.
    """
    ce = F.cross_entropy(teacher_logits, labels)
    kl = soft_kl(teacher_logits, student_logits, temperature)
    return ce + weight * kl, ce, kl


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
):
    """Distillation loss: (1 − α) · CE(z_s, y) + α · T² · KL(p_t^T ‖ p_s^T).

    α weights the KL term, as in the Trained-Teacher and Nasty-Teacher code
    (torchdistill's ``KDLoss`` gives α to the CE term instead). The teacher is frozen,
    so the gradient flows into the student only. Returns ``(loss, ce, kl)``.
    """
    ce = F.cross_entropy(student_logits, labels)
    kl = soft_kl(teacher_logits, student_logits, temperature)
    return (1 - alpha) * ce + alpha * kl, ce, kl
