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


def soft_targets(teacher_logits: torch.Tensor | list[torch.Tensor], temperature: float,
                 weights: list[float] | None = None) -> torch.Tensor:
    """The teachers' softened distributions, mixed: ``sum_k w_k softmax(z_k / T)``.

    ``teacher_logits``: one ``(N, C)`` tensor or a list of them (one per teacher, all ``(N, C)``);
    ``weights``: one non-negative weight per teacher (default equal), normalised to sum to 1.
    Returns ``(N, C)`` probabilities (rows sum to 1), detached.

    Several teachers are combined by averaging their distributions (the soft targets of Hinton
    et al. 2015, eq. 2, for an ensemble); the student then matches the mixture (see
    :func:`soft_target_loss`). Its gradient equals that of the weighted sum of per-teacher KL
    terms, ``sum_k w_k KL(p_k || q)``: the two losses differ by the constant
    ``H(mixture) - sum_k w_k H(p_k)`` only.

    Raises
    ------
    ValueError
        When the list is empty, the shapes differ, a weight is negative or all are zero.

    Examples
    --------
    >>> soft_targets([torch.tensor([[0.0, 0.0]]), torch.tensor([[9.0, -9.0]])], 1.0, [1, 3]).round(decimals=3)
    tensor([[0.8750, 0.1250]])
    """
    logits = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    if not logits:
        raise ValueError("soft_targets: no teacher logits")
    w = [1.0] * len(logits) if weights is None else [float(v) for v in weights]
    if len(w) != len(logits) or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"soft_targets: need one non-negative weight per teacher, not all zero; got {w}")
    for z in logits[1:]:
        if z.shape != logits[0].shape:
            raise ValueError(f"soft_targets: teacher logits of shapes {tuple(logits[0].shape)} and "
                             f"{tuple(z.shape)}; they must match")
    total = sum(w)
    mix = sum((wk / total) * F.softmax(z.detach().float() / temperature, dim=-1) for wk, z in zip(w, logits))
    return mix  # (N, C)


def soft_target_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p || softmax(z_s / T))`` averaged over the batch (Hinton et al. 2015, eq. 2).

    ``student_logits``: ``(N, C)``; ``target_probs``: ``(N, C)`` rows summing to 1 (e.g.
    :func:`soft_targets`); zero-probability classes contribute nothing. With one teacher this is
    the soft term of :func:`kd_loss`.

    Examples
    --------
    >>> float(soft_target_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), 2.0))
    0.0
    """
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = target_probs.detach().to(log_q.dtype)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p))
    return kl.sum() / student_logits.shape[0] * (temperature * temperature)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015, eq. 3) as a mean: ``mean((r(s) - t)^2)``.

    ``student``: the (already projected) student features ``r(v_g(x))``; ``teacher``: the
    teacher's hint ``u_h(x)``, same shape (``(N, C, H, W)``, ``(N, L, C)`` or ``(N, C)``).
    The paper's ``1/2 ||.||^2`` summed per example equals this times ``numel / (2 N)``; the
    mean keeps the scale independent of the layer size (the factor goes into the weight).

    Raises
    ------
    ValueError
        When the shapes differ.

    Examples
    --------
    >>> float(hint_loss(torch.ones(2, 3), torch.zeros(2, 3)))
    1.0
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hint_loss: student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} differ in shape")
    return (student - teacher.detach()).pow(2).mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis 2017, sec. 3.1):
    ``Q = sum_c |A_c|^p`` over the channels, flattened and L2-normalised per example.

    ``features``: ``(N, C, H, W)`` (any ``(N, C, ...)``); returns ``(N, H*W)`` with unit L2
    norm per row (an all-zero map stays zero).

    Examples
    --------
    >>> attention_map(torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]]))   # (1, 2, 1, 2): Q = [2, 0]
    tensor([[1., 0.]])
    """
    q = features.abs().pow(p).sum(dim=1).flatten(1)   # (N, H*W)
    return F.normalize(q, p=2.0, dim=1)


def at_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], beta: float = 1.0) -> torch.Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis 2017, eq. 2, without the CE term):
    ``beta / 2 * sum_j mean_n || Q_s^j / ||Q_s^j|| - Q_t^j / ||Q_t^j|| ||_2``.

    ``student_maps``, ``teacher_maps``: per layer pair ``j``, normalised maps ``(N, H*W)`` from
    :func:`attention_map` (same shape within a pair). The L2 norm of the difference is taken per
    example (not squared) and averaged over the batch. The authors' code uses the squared
    difference averaged over positions with ``beta = 1000``; the paper's form is kept here.

    Raises
    ------
    ValueError
        When the lists differ in length or a pair's shapes differ.

    Examples
    --------
    >>> float(at_loss([torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 1.0]])], beta=2.0))   # sqrt(2)
    1.4142135381698608
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"at_loss: {len(student_maps)} student maps for {len(teacher_maps)} teacher maps")
    total = student_maps[0].new_zeros(())
    for qs, qt in zip(student_maps, teacher_maps):
        if qs.shape != qt.shape:
            raise ValueError(f"at_loss: attention maps {tuple(qs.shape)} and {tuple(qt.shape)} differ in shape")
        total = total + (qs - qt.detach()).norm(p=2, dim=1).mean()
    return beta / 2 * total


def attention_probs_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                         eps: float = 1e-12) -> torch.Tensor:
    """Distance between attention probabilities of a student and a teacher layer.

    ``student``, ``teacher``: ``(N, H, L, L)`` softmax probabilities over the last axis (keys),
    as Hugging Face encoders return with ``output_attentions=True``. With different head counts
    both are averaged over heads first (``(N, 1, L, L)``). ``kind="kl"``: ``KL(teacher ||
    student)`` summed over keys and averaged over examples, heads and queries (MiniLM, Wang et
    al. 2020, eq. 2; student probabilities clamped at ``eps`` for the log); ``kind="mse"``: the
    mean squared difference of the probabilities (TinyBERT's attention loss, Jiao et al. 2020,
    eq. 7, applied to probabilities).

    Raises
    ------
    ValueError
        When batch or sequence sizes differ, or ``kind`` is unknown.

    Examples
    --------
    >>> p = torch.full((1, 2, 3, 3), 1 / 3)
    >>> float(attention_probs_loss(p, p)), float(attention_probs_loss(p, p, "mse"))
    (0.0, 0.0)
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention_probs_loss: attention of shapes {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}; need (N, heads, L, L) with equal N and L")
    teacher = teacher.detach()
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if kind == "kl":
        kl = teacher * (torch.log(teacher.clamp_min(eps)) - torch.log(student.clamp_min(eps)))
        return kl.sum(-1).mean()
    if kind == "mse":
        return (student - teacher).pow(2).mean()
    raise ValueError(f"attention_probs_loss: kind {kind!r}; accepted: kl, mse")


EMBEDDING_LOSSES = ("mse", "cosine", "mse+cosine")


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance of student embeddings from the teacher's, ``(..., D)`` each (same shape).

    ``mse``: the mean over every element of ``(s - t)^2`` (Reimers & Gurevych 2020, "Making
    Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", eq. 1, averaged
    over the batch and dimensions); ``cosine``: the mean over the embeddings of ``1 - cos(s, t)``
    (DistilBERT's cosine embedding loss, Sanh et al. 2019); ``mse+cosine``: their sum. The
    teacher is detached.

    Examples
    --------
    >>> s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    >>> float(embedding_loss(s, t, "mse")), round(float(embedding_loss(s, t, "cosine")), 4)
    (1.0, 0.04)
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
