"""Distillation losses on tensors only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.

    ``student_logits``, ``teacher_logits``: ``(N, C)``; ``targets``: ``(N,)`` class indices (may be
    None when ``alpha == 1``); ``label_smoothing`` applies to the CE term. KL is averaged over the batch (``batchmean``); the ``T^2`` factor
    keeps the soft-target gradients on the scale of the hard-target ones.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    if alpha >= 1.0 or targets is None:
        return soft
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


EMBEDDING_LOSSES = ("mse", "cosine", "mse+cosine")


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance of student embeddings from the teacher's, ``(..., D)`` each (same shape).

    ``mse``: the mean over every element of ``(s - t)^2`` (Reimers & Gurevych 2020, "Making
    Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", eq. 1, averaged
    over the batch and dimensions); ``cosine``: the mean over the embeddings of ``1 - cos(s, t)``
    (DistilBERT's cosine embedding loss, Sanh et al. 2019); ``mse+cosine``: their sum. The
    teacher is detached.
    """
    t = teacher.detach()
    if kind not in EMBEDDING_LOSSES:
        raise ValueError(f"embedding loss {kind!r}: accepted {', '.join(EMBEDDING_LOSSES)}")
    total = student.new_zeros(())
    if kind in ("mse", "mse+cosine"):
        total = total + F.mse_loss(student, t)
    if kind in ("cosine", "mse+cosine"):
        total = total + (1.0 - F.cosine_similarity(student, t, dim=-1)).mean()
    return total
