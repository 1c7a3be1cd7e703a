"""The layer-wise reconstruction objective: its value for a pruned weight, and its minimiser on a fixed support.

Every one-shot method approximates the same problem (SparseGPT §2, ALPS §3.1): with X the (T, in) calibration
inputs of a linear layer and H = 2XᵀX/T (`spp.prune.sparsegpt.hessian_from_sum`),

    ‖X(W − Ŵ)ᵀ‖²_F · 2/T = tr((W − Ŵ) H (W − Ŵ)ᵀ) = Σ_i (w_i − ŵ_i)ᵀ H (w_i − ŵ_i),

a sum of independent terms, one per output row i. This module owns the relative error (what the manifest records)
and `resolve_on_support`, which finds the best kept weights for a given keep-mask: ALPS's refinement step and the
re-solve after a DSnoT mask refinement. Pure tensor functions; no modules, no hooks.

Shapes: W, Ŵ, keep (out, in); H (in, in).
"""

from __future__ import annotations

import torch


def row_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """e_i = (w_i − ŵ_i)ᵀ H (w_i − ŵ_i) for every output row, in H's dtype (at least float32). Returns (out,)."""
    dtype = torch.promote_types(H.dtype, torch.float32)
    Delta = (W.detach().to(dtype) - W_hat.detach().to(dtype))  # (out, in)
    return ((Delta @ H.to(dtype)) * Delta).sum(dim=1)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer-wise reconstruction error tr((W − Ŵ)H(W − Ŵ)ᵀ) / tr(WHWᵀ) = ‖X(W − Ŵ)ᵀ‖²_F / ‖XWᵀ‖²_F.

    Args:
        W: (out, in) dense weight.
        W_hat: (out, in) pruned (and possibly updated) weight.
        H: (in, in) undamped Hessian ∝ XᵀX (any positive scale: it cancels).

    Returns:
        The ratio as a Python float; 0.0 when W·X is identically zero (nothing to reconstruct).
    """
    return relative_errors(W, H, [row_errors(W, W_hat, H).sum()])[0]


def relative_errors(W: torch.Tensor, H: torch.Tensor, squared: list) -> list[float]:
    """Each numerator tr((W − Ŵ)H(W − Ŵ)ᵀ) in `squared` (already computed, e.g. from DSnoT's guard, which keeps
    (W − Ŵ)H) over tr(WHWᵀ), computed once; 0.0 each when W·X is identically zero."""
    total = row_errors(W, torch.zeros_like(W), H).sum()
    return [0.0 if total <= 0 else float(value / total) for value in squared]


def resolve_on_support(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    W0: torch.Tensor | None = None,
    steps: int = 10,
    rtol: float = 1e-4,
) -> tuple[torch.Tensor, int]:
    """The kept weights that minimise the reconstruction error on a fixed support, by batched preconditioned CG.

    For each row i with support S = {j : keep_ij}, the optimum solves H_SS ŵ_S = (H w_i)_S (ŵ = 0 off S), i.e. the
    gradient 2(ŵ − w)H of the objective vanishes on S. All rows are solved together, as ALPS Algorithm 2 does:
    residual R = ((W − Ŵ)H) ⊙ keep, Jacobi preconditioner Z = R / diag(H), search directions masked to the
    support, step α_i = (r_i·z_i) / (p_i H p_iᵀ) per row. It stops after `steps` iterations or once every row has
    ‖r_i‖ ≤ rtol · ‖((WH) ⊙ keep)_i‖. Each step costs one (out, in) × (in, in) product.

    Args:
        W: (out, in) dense target weight (float32 or float64).
        H: (in, in) positive definite Hessian, dampened by the caller if needed; same dtype as W.
        keep: (out, in) bool support.
        W0: (out, in) warm start (masked here); W ⊙ keep when None.
        steps: the most CG iterations (ALPS uses 10; more approaches the exact solve).
        rtol: relative residual at which every row counts as solved.

    Returns:
        (Ŵ (out, in) in W's dtype, exactly zero off the support; the number of CG iterations run).
    """
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    X = torch.where(keep, W if W0 is None else W0, zero)  # (out, in)
    inv_diag = 1.0 / torch.diagonal(H)  # (in,) Jacobi preconditioner
    R = torch.where(keep, (W - X) @ H, zero)
    stop = rtol * torch.where(keep, W @ H, zero).norm(dim=1)  # (out,)
    P, rz_old, iters = None, None, 0
    while iters < steps and not (R.norm(dim=1) <= stop).all():
        Z = R * inv_diag
        rz = (R * Z).sum(dim=1)  # (out,)
        if P is None:
            P = Z
        else:
            beta = torch.where(rz_old > 0, rz / rz_old.clamp_min(torch.finfo(W.dtype).tiny), zero)
            P = Z + beta[:, None] * P
        Q = torch.where(keep, P @ H, zero)  # (out, in): (PH) restricted to the support
        pHp = (P * Q).sum(dim=1)
        alpha = torch.where(pHp > 0, rz / pHp.clamp_min(torch.finfo(W.dtype).tiny), zero)
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * Q
        rz_old, iters = rz, iters + 1
    return X, iters
