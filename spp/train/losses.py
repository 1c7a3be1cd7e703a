"""Training losses as pure functions of tensors: cross-entropy and distillation from a dense teacher.

Every term is returned as a **sum over target positions**, never a mean, so the loop can
divide by the global batch's target count N (all-reduced over processes): per-token sums
split exactly over micro-batches and ranks, and one process, several processes and a
resumed run optimise the same number. The loop minimises

    ce_weight · Σ nll / N  +  kd_weight · Σ kl / N  +  squarehead_weight · Σ sq / N.

Target positions are the positions t whose label `labels[:, t]` is not IGNORE_INDEX;
position t is predicted from `logits[:, t - 1]` and from the hidden states at t - 1, so
every term here looks at `x[:, :-1]` selected by `labels[:, 1:] != IGNORE_INDEX`.
All terms are computed in float32 whatever the dtype of their inputs (bf16/fp16 logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spp.data import IGNORE_INDEX


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: which of `x[:, :-1]` predict a target, i.e. labels[:, 1:] ≠ IGNORE_INDEX."""
    return labels[:, 1:] != IGNORE_INDEX


def target_count(labels: torch.Tensor) -> int:
    """Number of target positions every sum here runs over: labels[:, 1:] ≠ IGNORE_INDEX."""
    return int(target_mask(labels).sum())


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(labels[t] | ids[:t]) over target positions (labels ≠ IGNORE_INDEX), in float32.

    Args:
        logits: (B, T, V). labels: (B, T); position t is predicted by logits[:, t - 1].

    Returns:
        A scalar: the summed NLL (not the mean).
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def kd_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation: Σ over target positions of T² · KL(softmax(t/T) ‖ softmax(s/T)), in float32.

    With p = softmax(teacher/T) and q = softmax(student/T) at one position,
    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v). The T² factor keeps the gradient's size
    independent of T (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
    Network"); the direction KL(teacher ‖ student) is the usual forward KL of KD.

    Args:
        student_logits, teacher_logits: (B, T, V), any float dtype (same V).
        labels: (B, T); the same positions as `summed_nll` are counted.
        temperature: T > 0.

    Returns:
        A float32 scalar, differentiable w.r.t. `student_logits` (the teacher's are constants).
    """
    keep = target_mask(labels)
    T = float(temperature)
    s = student_logits[:, :-1][keep].float()  # (N, V): only the target rows, so V-wide copies stay N rows
    t = teacher_logits[:, :-1][keep].float()
    if T != 1.0:
        s, t = s / T, t / T
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl * (T * T)


def squarehead_sum(student_hiddens: Sequence[torch.Tensor], teacher_hiddens: Sequence[torch.Tensor],
                   labels: torch.Tensor) -> torch.Tensor:
    """SquareHead feature distillation, summed over target tokens and averaged over blocks, in float32.

    For decoder block l (l = 1..L) and target position n, with h the block's output:
    r_{l,n} = ‖h^teacher_{l,n} − h^student_{l,n}‖² / ‖h^teacher_{l,n}‖², and this returns
    (1/L) Σ_l Σ_n r_{l,n}. Divided by the global target count N it is the SquareHead loss of
    Kurtic et al. 2023 ("Sparse Fine-tuning for Inference Acceleration of Large Language
    Models"): a per-layer MSE normalised by the teacher's feature size, so every layer weighs
    alike whatever its scale. Normalising per token (not by a batch sum of ‖h^teacher‖²) lets
    the sum split exactly over micro-batches and processes. A teacher row of norm 0 counts as
    norm 1 (the ratio would be undefined).

    Args:
        student_hiddens, teacher_hiddens: L tensors (B, T, H) each, block l's output, in order.
        labels: (B, T); hiddens at position t − 1 count when labels[:, t] is a target.

    Returns:
        A float32 scalar, differentiable w.r.t. the student's hiddens.
    """
    if len(student_hiddens) != len(teacher_hiddens) or not student_hiddens:
        raise ValueError(f"squarehead_sum: {len(student_hiddens)} student vs {len(teacher_hiddens)} teacher blocks")
    keep = target_mask(labels)
    total = None
    for hs, ht in zip(student_hiddens, teacher_hiddens):
        ratio = feature_error_sum(hs[:, :-1][keep], ht[:, :-1][keep])  # over (N, H) rows
        total = ratio if total is None else total + ratio
    return total / len(student_hiddens)


def feature_error_sum(student: torch.Tensor, teacher: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Σ_n e_n over the rows n of (..., H) features, in float32; the per-token term of SquareHead and of block-wise
    recovery (`spp.train.blockwise`).

    normalized: e_n = ‖t_n − s_n‖² / ‖t_n‖² (SquareHead's per-token form; a teacher row of norm 0 counts as
    norm 1). Otherwise e_n = ‖t_n − s_n‖² / H, so Σ_n e_n / N is the plain mean squared error over all N·H
    entries (EBFT's block reconstruction loss, Guo et al. 2024).

    Returns:
        A float32 scalar, differentiable w.r.t. `student`.
    """
    s = student.float()
    t = teacher.float()
    squared = (t - s).square().sum(-1)
    if not normalized:
        return squared.sum() / t.shape[-1]
    norm = t.square().sum(-1)
    return (squared / torch.where(norm > 0, norm, torch.ones_like(norm))).sum()
