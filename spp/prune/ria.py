"""RIA: relative importance and activations, a drop-in score for Wanda's (pure tensor function).

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language
Models" (ICLR 2024), §3.1–3.2, eq. 3 with a = 0.5:

    S_ij = ( |W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj| ) · ‖X_j‖₂^a

the first term relative to row i (its output), the second to column j (its input). The comparison
group follows the reference code: for unstructured sparsity the whole layer shares one threshold
(Wanda compares within each row); for N:M each group of M inputs of a row, as Wanda. The paper's
channel permutation for N:M (§3.3, reordering input channels before choosing groups) is `spp.prune.permute`,
applied where it folds exactly (o_proj, down_proj) with --permute-channels.
A row or column of |W| that sums to 0 contributes 0 instead of 0/0.

Shapes: W (out, in); sq_norm (in,) = Σ_t X_tj² from `spp.prune.wanda.accumulate_sq_norms`.
"""

from __future__ import annotations

import torch

RIA_A = 0.5  # the paper's exponent of the activation norm


def _relative(A: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A / total, broadcast, with 0 where total is 0 (an all-zero row or column)."""
    return torch.where(total > 0, A / total.clamp_min(torch.finfo(A.dtype).tiny), torch.zeros((), dtype=A.dtype))


def ria_scores(W: torch.Tensor, sq_norm: torch.Tensor, a: float = RIA_A) -> torch.Tensor:
    """S = (|W|/Σ_row|W| + |W|/Σ_col|W|) · ‖X_j‖₂^a.

    Args:
        W: (out, in) weight.
        sq_norm: (in,) Σ_t X_tj² over the calibration tokens.
        a: the activation exponent (0.5 in the paper).

    Returns:
        (out, in) float32 scores; lower is pruned first.
    """
    A = W.detach().float().abs()  # (out, in)
    row = A.sum(dim=1, keepdim=True)  # (out, 1): Σ_k |W_ik|
    col = A.sum(dim=0, keepdim=True)  # (1, in): Σ_k |W_kj|
    return (_relative(A, row) + _relative(A, col)) * sq_norm.float().sqrt().pow(a)[None, :]
