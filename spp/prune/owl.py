"""OWL: outlier-weighted layerwise sparsity, the per-block ratios from outlier shares (pure tensor functions).

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs
to High Sparsity" (ICML 2024), §4, as its reference code and llm-compressor compute it:

    D_l = #{ S_ij > M · mean(S) } / #S        over every pruned weight of block l, S = |W|·‖X_j‖₂ (Wanda's)
    D̃_l = 2λ · (D_l − min D) / (max D − min D)
    s_l = s − (D̃_l − mean_n(D̃))

so a block with more outliers is pruned less. mean_n is the mean weighted by n_l, the number of
weights OWL sets the sparsity of in block l, so the weighted mean of s_l is exactly s (the paper's
blocks are equal in size, where this is its plain mean). There is no clipping: s_l − s lies in
[−2λ, 2λ] (max − min is exactly 2λ), so the paper's "within [s − λ, s + λ]" holds only when the
mean of D̃ is λ. Shapes: scores are any (out, in); D, n and s_l are (L,) over the L blocks.
"""

from __future__ import annotations

import torch


def outlier_share(scores: list[torch.Tensor], M: float) -> float:
    """D_l: the share of a block's scores above M times their mean (mean and count over all layers at once).

    Args:
        scores: one (out, in) Wanda score tensor per pruned layer of the block.
        M: the outlier threshold, in units of the block's mean score (OWL's M, default 5).

    Returns:
        A float in [0, 1].
    """
    flat = torch.cat([S.detach().float().reshape(-1) for S in scores])  # (Σ out·in,)
    if flat.numel() == 0:
        return 0.0
    return float((flat > M * flat.mean()).sum()) / flat.numel()


def owl_sparsities(D: torch.Tensor, n: torch.Tensor, s: float, lmbda: float) -> torch.Tensor:
    """s_l = s − (D̃_l − mean_n(D̃)) with D̃ = D min-max normalised to [0, 2λ] (see the module docstring).

    Args:
        D: (L,) outlier shares of the blocks.
        n: (L,) weights each block's ratio applies to (the weights of the mean); all positive.
        s: the target sparsity.
        lmbda: λ; the ratios span exactly 2λ unless every D_l is equal (then all are s).

    Returns:
        (L,) float64 block sparsities whose n-weighted mean is s.
    """
    D, n = D.double(), n.double()
    spread = D.max() - D.min()
    if spread <= 0:  # no block has more outliers than another: uniform
        return torch.full_like(D, s)
    D_tilde = (D - D.min()) / spread * (2 * lmbda)
    return s - (D_tilde - (n * D_tilde).sum() / n.sum())
