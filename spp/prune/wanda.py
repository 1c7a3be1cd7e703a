"""Wanda importance scores: |W| scaled by the norm of each input channel over the calibration tokens.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024), §3:
S_ij = |W_ij| · ‖X_j‖₂, where X is (tokens, in) and the norm runs over all calibration tokens.
Scores are compared within each output row (unstructured) or each group of M inputs (N:M);
the selection itself lives in `spp.prune.masks`. The magnitude baseline's S = |W| sits here too, as
Wanda with every input norm equal. Pure tensor functions: no modules, no hooks.

Shapes: W (out, in); X (..., in); sq_norm (in,).
"""

from __future__ import annotations

import torch


def accumulate_sq_norms(sq_norm: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """Add one batch of inputs to the running per-channel sum of squares.

    sq_norm_j ← sq_norm_j + Σ_t X_tj², summed in float32 over every token t of the batch.

    Args:
        sq_norm: (in,) running sum, or None for the first batch.
        X: (..., in) layer inputs.

    Returns:
        (in,) float32.
    """
    X = X.reshape(-1, X.shape[-1]).float()  # (tokens, in)
    batch = (X * X).sum(dim=0)
    return batch if sq_norm is None else sq_norm + batch


def wanda_scores(W: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂ broadcast over rows.

    Args:
        W: (out, in) weight.
        sq_norm: (in,) Σ_t X_tj² from `accumulate_sq_norms`.

    Returns:
        (out, in) float32 scores; lower is pruned first.
    """
    return W.detach().float().abs() * sq_norm.float().sqrt()[None, :]


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """S = |W|, the published magnitude baseline (no calibration). Returns (out, in) float32."""
    return W.detach().float().abs()
