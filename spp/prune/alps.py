"""ALPS: layer-wise pruning by ADMM with an increasing penalty, then a conjugate-gradient refit of the kept weights.

Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language
Models" (NeurIPS 2024), §3 and Algorithms 1–2; defaults from the authors' code (github.com/mazumder-lab/ALPS).

Problem. min_Ŵ ½ tr((W − Ŵ) H (W − Ŵ)ᵀ) subject to Ŵ in the sparsity set S: at most k non-zeros in the whole
layer (unstructured; the paper projects per layer, not per row) or at most N per group of M inputs (N:M).

Scaling (the authors' code). H is dampened, H_λ = H + λI with λ = percdamp · mean diag H, and normalised to unit
diagonal: d = sqrt(diag H_λ), H̃ = D⁻¹ H_λ D⁻¹, B = W D (D = diag d). The penalty ρ is therefore on a fixed scale
for every layer, and the projection compares |W_ij|·d_j, a Wanda-like score.

ADMM (operator splitting B = D_s, D_s ∈ S, dual V), from B = D_s = P_S(B₀), V = 0:

    B   ← (B₀H̃ − V + ρ D_s) (H̃ + ρI)⁻¹          least squares; (H̃ + ρI)⁻¹ = Q diag(1/(L + ρ)) Qᵀ from one eigh
    D_s ← P_S(B + V/ρ)                            keep the largest |·| per layer (or per group of M)
    V   ← V + ρ (B − D_s)

Penalty schedule (Algorithm 1's ρ-update). Every `update_every` iterations, with s the number of entries whose
membership in the support changed since the last check and k the number kept: ρ × 1.3 if s > 0.1k; × 1.2 if
s > 0.005k; × 1.1 if s ≥ 1; stop if s = 0. Before the support first moves (ρ₀ too large for this layer) ρ is divided
by 5 instead, restarting from B₀. ρ is capped at 10⁶; after `min_iter` iterations a change below 3·10⁻⁴ k also stops.
A larger ρ ties B to the sparse D_s: a fast increase settles the support sooner and explores less.

Refinement (Algorithm 2). The support of P_S(B) is fixed and the kept weights are refit by preconditioned conjugate
gradient (`spp.prune.reconstruction.resolve_on_support`; the unit diagonal of H̃ makes this the Jacobi
preconditioner of the original problem): `pcg_steps` iterations from P_S(B). Finally Ŵ = B D⁻¹.

Cost: one eigh of (in, in), then one (out, in) × (in, in) product per ADMM iteration and one (in, in) × (in, in)
product per ρ change (every `update_every` iterations): each ADMM iteration costs about one SparseGPT pass.

Shapes: W (out, in); H (in, in) = 2XᵀX/T from `spp.prune.sparsegpt.hessian_from_sum`.
"""

from __future__ import annotations

import torch

from spp.errors import SppError
from spp.prune.masks import nm_mask, pruned_count, unstructured_mask
from spp.prune.reconstruction import resolve_on_support
from spp.prune.sparsegpt import with_dampening

# Default iteration caps, measured on SmolLM2-135M (docs/results/pruning_methods.md): 15 keep unstructured ALPS near
# 8x SparseGPT's time and below its perplexity at 60-70%; N:M supports settle more slowly and need 30 to beat it (8.4x).
ITERS_UNSTRUCTURED, ITERS_NM = 15, 30
RHO_MAX = 1e6
STALL = 3e-4  # a support change below this fraction of k after min_iter iterations ends ADMM


def _project(scores: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
    """Support of the projection onto S: keep-mask of the largest scores per layer (or N per group of M).

    Equal to `unstructured_mask(scores, sparsity, per_row=False)`; when no score ties the threshold (the usual case
    for real-valued iterates) the mask is just scores > t, which skips the tie bookkeeping run every iteration.
    """
    if pattern is not None:
        return nm_mask(scores, *pattern)
    k = pruned_count(scores.numel(), sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = scores > scores.reshape(-1).kthvalue(k).values
    return keep if int(keep.sum()) == scores.numel() - k else unstructured_mask(scores, sparsity, per_row=False)


def default_iters(pattern: tuple[int, int] | None) -> int:
    """The ADMM iteration cap `spp prune` uses when `--alps-iters` is not given."""
    return ITERS_NM if pattern is not None else ITERS_UNSTRUCTURED


def _normalised_eigh(H: torch.Tensor, percdamp: float):
    """(d, H̃, L, Q, percdamp used) with H̃ = D⁻¹(H + λI)D⁻¹ = Q diag(L) Qᵀ positive definite; 10× λ on each retry.

    The eigendecomposition runs once per layer, in H's dtype.

    Raises:
        SppError: H has non-finite entries, or H̃ is not positive definite at percdamp · 10^MAX_DAMPENING_RETRIES.
    """
    if not torch.isfinite(H).all():
        raise SppError("the calibration Hessian has non-finite entries (NaN or inf); "
                       "check the model's activations on the calibration windows")

    def factor(H_damped: torch.Tensor):
        diag = torch.diagonal(H_damped)
        if not (diag > 0).all():
            return None
        d = diag.sqrt()
        H_tilde = H_damped / d[:, None] / d[None, :]
        L, Q = torch.linalg.eigh(H_tilde)
        return (d, H_tilde, L, Q) if torch.isfinite(L).all() and L.min() > 0 else None

    (d, H_tilde, L, Q), damp = with_dampening(H, percdamp, factor)
    return d, H_tilde, L, Q, damp


def alps_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: tuple[int, int] | None,
    sparsity: float,
    *,
    percdamp: float = 0.01,
    rho0: float = 0.1,
    max_iter: int = 300,
    update_every: int = 3,
    min_iter: int = 30,
    pcg_steps: int = 10,
    pcg_rtol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune W by ALPS: ADMM under an increasing penalty for the support, then PCG for the kept weights.

    Args:
        W: (out, in) weight, any float dtype; computed in H's dtype (float32, or float64 when H is float64) on W's
            device.
        H: (in, in) Hessian 2XᵀX/T from `hessian_from_sum`, undamped.
        pattern: (N, M), or None for unstructured.
        sparsity: s for unstructured: exactly floor(out · in · s) pruned in the whole layer (ignored for N:M).
        percdamp: λ as a fraction of mean diag H (the paper's 1%); retried at 10× like SparseGPT.
        rho0: initial penalty ρ on the unit-diagonal scale (0.1). Smaller explores more supports, larger settles
            sooner; the schedule corrects a ρ₀ that is too large.
        max_iter: the most ADMM iterations (300). The schedule usually stops far earlier; a lower cap trades
            support quality for time (each iteration ≈ one SparseGPT pass).
        update_every: iterations between ρ updates (3). Larger grows ρ more slowly: more iterations, finer support.
        min_iter: iterations before the "support nearly settled" stop may fire (30).
        pcg_steps: PCG iterations on the final support (10). 0 keeps ADMM's B; more approach the exact refit.
        pcg_rtol: relative residual at which PCG stops early.

    Returns:
        (Ŵ in W's dtype with +0.0 at pruned entries, bool keep-mask (out, in), info) where info has `percdamp_used`,
        `admm_iterations`, `rho` (final) and `pcg_iterations`.

    Raises:
        SppError: H is unusable (non-finite, or not positive definite after the dampening retries), or the input
            dimension is not divisible by M.
    """
    dtype = torch.promote_types(H.dtype, torch.float32)
    W0 = W.detach().to(dtype, copy=True)  # a copy even in H's dtype: the dead columns are zeroed below
    H = H.to(device=W.device, dtype=dtype).clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: their weights are free to drop
    H[dead, dead] = 1.0
    W0[:, dead] = 0.0
    d, H_tilde, L, Q, damp_used = _normalised_eigh(H, percdamp)
    B0 = W0 * d  # (out, in): the weights in normalised coordinates
    Y = B0 @ H_tilde  # (out, in), fixed right-hand side B₀H̃
    kept = W.numel() - pruned_count(W.numel(), sparsity) if pattern is None else W.numel() // pattern[1] * pattern[0]

    def inverse(rho: float) -> torch.Tensor:  # (H̃ + ρI)⁻¹, (in, in)
        return (Q / (L + rho)) @ Q.t()

    rho, started = rho0, False
    support0 = _project(B0**2, pattern, sparsity)
    B, Ds, V = B0, torch.where(support0, B0, 0.0), torch.zeros_like(B0)
    support_prev, Inv, iters = support0, inverse(rho), 0
    for iters in range(1, max_iter + 1):
        B = (Y - V + rho * Ds) @ Inv
        U = B + V / rho  # (out, in)
        support = _project(U * U, pattern, sparsity)
        Ds = torch.where(support, U, 0.0)
        V = rho * (U - Ds)  # = V + ρ(B − D_s)
        if iters % update_every:
            continue
        change = int((support != support_prev).sum())
        support_prev = support
        if change == 0 and started:
            break
        if change > 0.1 * kept:
            rho, started = rho * 1.3, True
        elif change > 0.005 * kept:
            rho, started = rho * 1.2, True
        elif started:
            rho *= 1.1
        else:  # the support has not moved yet: ρ₀ is too large for this layer
            rho /= 5
            if change:
                B, Ds, V = B0, torch.where(support0, B0, 0.0), torch.zeros_like(B0)
        rho = min(rho, RHO_MAX)
        Inv = inverse(rho)
        if iters >= min_iter and change < STALL * kept:
            break
    keep = _project(B**2, pattern, sparsity)
    B, pcg_iters = resolve_on_support(B0, H_tilde, keep, W0=B, steps=pcg_steps, rtol=pcg_rtol)
    W_hat = (B / d).to(W.dtype)
    W_hat = torch.where(keep, W_hat, torch.zeros((), dtype=W.dtype, device=W.device))
    info = {"percdamp_used": damp_used, "admm_iterations": iters, "rho": rho, "pcg_iterations": pcg_iters}
    return W_hat, keep, info
