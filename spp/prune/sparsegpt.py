"""SparseGPT: prune a weight matrix and update the kept weights to reconstruct its outputs (OBS).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), Algorithm 1. With H = 2XXᵀ/T from T calibration tokens (dampened by λ = percdamp ·
mean diag H), U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), columns are processed left to
right in blocks of width b. In each block the mask is chosen from the OBS saliency
w²/[U]_jj² (unstructured: jointly over the block, exactly floor(out·b·s) pruned; N:M: per
group of M on the *updated* weights when the group is reached); then column by column the
pruned entries are zeroed and the error (w − q)/[U]_jj is spread over the remaining columns
with row j of U. Pure tensor functions; the Hessian is accumulated by the caller's hooks.

Shapes: W (out, in); X (..., in); H (in, in); U (in, in) upper triangular.
"""

from __future__ import annotations

import torch

from spp.errors import SppError
from spp.prune.masks import nm_mask, unstructured_mask

MAX_DAMPENING_RETRIES = 4  # percdamp × 10 each time: 1% -> 10% -> 100% -> 1000% -> 10000%


GRAM_STRIPS = 4  # `gram`: 5/8 of a full product's multiply-adds
GRAM_MIN_WIDTH = 512  # narrower inputs take the plain product: their strips save little, and round differently


def gram(X: torch.Tensor, strips: int = GRAM_STRIPS) -> torch.Tensor:
    """XᵀX from the row strips of its lower triangle, mirrored: (strips + 1) / (2 · strips) of the multiply-adds of
    `X.t() @ X`, about 0.63× its CPU time at (8192, 1536).

    Each entry is the same dot product over the tokens as in `X.t() @ X`. With this project's CPU torch on one or
    two threads the result is bitwise equal to it (`test_gram_equals_the_full_product`); with more threads, or
    another BLAS, the library may split the token sum differently for the strips than for the whole, a difference
    in float rounding only (about 1e-6 relative, seen at 3+ threads on a (4096, 172) input). Below `GRAM_MIN_WIDTH`
    input channels it is `X.t() @ X` itself.

    Args:
        X: (tokens, in) float inputs.

    Returns:
        (in, in).
    """
    n = X.shape[1]
    if n < GRAM_MIN_WIDTH:
        return X.t() @ X
    edges = [n * i // strips for i in range(strips + 1)]
    out = X.new_empty(n, n)
    for a, b in zip(edges, edges[1:]):
        out[a:b, :b] = X[:, a:b].t() @ X[:, :b]
        out[:a, a:b] = out[a:b, :a].t()
    return out


def accumulate_hessian(H: torch.Tensor | None, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add one batch of inputs to the running Σ_t x_t x_tᵀ (float32, `gram`); returns (H_sum, tokens in batch).

    The caller divides by the token count T and multiplies by 2 (`hessian_from_sum`).

    Args:
        H: (in, in) running sum, or None for the first batch.
        X: (..., in) layer inputs.
    """
    X = X.reshape(-1, X.shape[-1]).float()  # (tokens, in)
    batch = gram(X)
    return (batch if H is None else H.add_(batch)), X.shape[0]


def hessian_from_sum(H_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """H = 2/T · Σ_t x_t x_tᵀ, the Hessian of the layer-wise squared error ‖WX − ŴX‖²."""
    return H_sum * (2.0 / max(n_tokens, 1))


def dampening_retry(record: dict, percdamp: float) -> list[dict]:
    """Take a method's `percdamp_used` out of its per-layer `record` (in place): [{percdamp_requested,
    percdamp_used}] when the factorisation needed more dampening than `percdamp`, else []."""
    if "percdamp_used" not in record:
        return []
    return [{"percdamp_requested": percdamp, "percdamp_used": record.pop("percdamp_used")}]


def with_dampening(H: torch.Tensor, percdamp: float, factor):
    """`factor(H + λI)` for λ = percdamp · mean(diag H), retried with 10× λ while it returns None.

    Args:
        H: (in, in). factor: the damped H -> a factorisation, or None where it failed.

    Returns:
        (the factorisation, the percdamp that worked).

    Raises:
        SppError: `factor` failed even at percdamp · 10^MAX_DAMPENING_RETRIES.
    """
    mean_diag = torch.diagonal(H).mean()
    for attempt in range(MAX_DAMPENING_RETRIES + 1):
        damp = percdamp * 10**attempt
        H_damped = H.clone()
        H_damped.diagonal().add_(damp * mean_diag)
        result = factor(H_damped)
        if result is not None:
            return result, damp
    raise SppError(
        f"the calibration Hessian is not positive definite even with dampening {damp:g} x mean diagonal; "
        "use more or longer calibration windows (--nsamples, --seqlen)"
    )


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """U with UᵀU = (H + λI)⁻¹, λ = percdamp · mean(diag H); retries with 10× dampening on failure.

    Returns:
        (U (in, in) upper triangular, the percdamp that worked).

    Raises:
        SppError: the factorisation failed even at percdamp · 10^MAX_DAMPENING_RETRIES.
    """

    def factor(H_damped: torch.Tensor) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(H_damped)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(torch.diagonal(U)).all():
                return U
        return None

    return with_dampening(H, percdamp, factor)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: tuple[int, int] | None,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W with OBS reconstruction (SparseGPT Algorithm 1).

    Args:
        W: (out, in) weight (any float dtype; computed in float32).
        H: (in, in) Hessian 2XXᵀ/T from `hessian_from_sum`.
        pattern: (N, M) or None for unstructured.
        sparsity: s for unstructured (ignored for N:M).
        blocksize: column block width b (a multiple of M for N:M).
        percdamp: dampening λ as a fraction of the mean diagonal of H.

    Returns:
        (pruned W in W's dtype with +0.0 at pruned entries, bool keep-mask (out, in), percdamp used).
        The percdamp used is larger than requested when the Cholesky factorisation needed retries.
    """
    if pattern is not None and blocksize % pattern[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern[1]}")
    out_features, in_features = W.shape
    W_new = W.detach().float().clone()
    H = H.float().clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any weight there is free to drop
    H[dead, dead] = 1.0
    W_new[:, dead] = 0.0
    U, damp_used = inverse_hessian_factor(H, percdamp)
    keep = torch.ones(out_features, in_features, dtype=torch.bool, device=W.device)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        W1 = W_new[:, i1:i2].clone()  # (out, b), contiguous: the column loop below is memory-bound
        U1 = U[i1:i2, i1:i2]  # (b, b)
        d = torch.diagonal(U1)  # (b,)
        Err1 = torch.empty_like(W1)
        if pattern is None:
            keep1 = unstructured_mask(W1**2 / d[None, :] ** 2, sparsity, per_row=False)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        prune1 = ~keep1
        for j in range(i2 - i1):
            if pattern is not None and j % pattern[1] == 0:
                m = pattern[1]
                keep1[:, j : j + m] = nm_mask(W1[:, j : j + m] ** 2 / d[None, j : j + m] ** 2, *pattern)
                prune1[:, j : j + m] = ~keep1[:, j : j + m]
            err = W1[:, j] * prune1[:, j] / d[j]  # (w − q)/[U]_jj with q = w on kept entries, 0 on pruned
            W1[:, j:] -= err[:, None] @ U1[None, j, j:]  # column j becomes q (up to rounding; zeroed below)
            Err1[:, j] = err
        W_new[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W_new[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    W_out = W_new.to(W.dtype)
    return torch.where(keep, W_out, torch.zeros((), dtype=W.dtype, device=W.device)), keep, damp_used
