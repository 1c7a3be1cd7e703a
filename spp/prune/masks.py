"""Sparsity patterns and keep-mask selection from scores: pure tensor functions.

Convention (NVIDIA's): **N:M keeps at most N non-zeros in every group of M
consecutive input weights of an output row**, so 2:4 and 4:8 are 50% sparse and
1:4 is 75%. (Some tools count N as the *pruned* weights; the readings agree only
at 2:4.) Masks are bool with True = keep. Ties are broken deterministically: on
equal scores the lower input index is pruned first (a stable ascending sort).

Shapes: scores and masks are (out, in), with `in` the input axis of the layer.
"""

from __future__ import annotations

import math
import re

import torch

from spp.errors import SppError

_PATTERN = re.compile(r"^(\d+):(\d+)$")
# _prune_lowest ranks by pairwise comparison (M(M-1)/2 of them) for groups of up to SMALL_GROUP, when there are at
# least PAIRWISE_MIN_GROUPS of them: the measured break-even on one CPU thread is 2-5K groups at M = 4, 5-9K at 8
SMALL_GROUP, PAIRWISE_MIN_GROUPS = 8, 8192


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`unstructured` -> None; `N:M` -> (N, M) with 0 < N < M.

    Raises:
        SppError: for anything else (`2:5x`, `0:4`, `5:4`, `4:4`).
    """
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern.strip()) if isinstance(pattern, str) else None
    if not match:
        raise SppError(f"--pattern {pattern!r} is neither 'unstructured' nor N:M (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SppError(f"--pattern {pattern}: N:M needs 0 < N < M (N = weights kept per group of M)")
    return n, m


def pruned_count(n: int, sparsity: float) -> int:
    """floor(n · s), robust to float error (0.5 · 10 must give 5, not 4)."""
    return int(math.floor(n * sparsity + 1e-9))


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last axis with the k lowest scores pruned (lower index first on ties).

    Equal to pruning the first k of a stable ascending sort, in O(n) rather than O(n log n):
    t = the k-th smallest score; prune everything below t, then the first (k − #below) entries
    equal to t in index order.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    m = scores.shape[-1]
    if m <= SMALL_GROUP and scores.numel() >= PAIRWISE_MIN_GROUPS * m and not scores.isnan().any():
        # Many small groups (N:M over a layer): an entry's place in that sort is how many entries precede it, counted
        # by one comparison per pair, several times faster than a kthvalue over that many length-M rows; on a few
        # groups (SparseGPT's M columns at a time) the M(M-1) small ops cost more. (NaN breaks the counting.)
        rank = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
        for i in range(1, m):
            for j in range(i):
                before = scores[..., j] <= scores[..., i]  # j precedes i: lower score, or equal at a lower index
                rank[..., i] += before
                rank[..., j] += ~before
        return rank >= k
    t = scores.kthvalue(k, dim=-1, keepdim=True).values  # (..., 1)
    below = scores < t
    ties = scores == t
    need = k - below.sum(-1, keepdim=True)  # how many entries equal to t are pruned, lowest index first
    return ~(below | (ties & (ties.cumsum(-1) <= need)))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the lowest-scoring weights.

    Args:
        scores: (out, in) importance; lower is pruned first.
        sparsity: fraction s in [0, 1) to prune.
        per_row: True prunes exactly floor(in · s) in every row (Wanda); False uses one
            threshold over the whole matrix, floor(out · in · s) in total (magnitude).

    Returns:
        bool keep-mask, (out, in).
    """
    if per_row:
        return _prune_lowest(scores, pruned_count(scores.shape[-1], sparsity))
    flat = scores.reshape(1, -1)
    return _prune_lowest(flat, pruned_count(flat.shape[-1], sparsity)).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs of each row.

    Args:
        scores: (out, in) with in divisible by M.

    Returns:
        bool keep-mask, (out, in), with exactly N True in every group.
    """
    out_features, in_features = scores.shape
    if in_features % m:
        raise SppError(f"input dimension {in_features} is not divisible by M={m}")
    groups = scores.reshape(out_features, in_features // m, m)  # (out, in/M, M)
    return _prune_lowest(groups, m - n).reshape(out_features, in_features)


def select_mask(scores: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float, per_row: bool = True):
    """Dispatch on the parsed pattern: N:M groups or unstructured at `sparsity`."""
    if pattern is None:
        return unstructured_mask(scores, sparsity, per_row=per_row)
    return nm_mask(scores, *pattern)


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries to +0.0 (`weight * mask` would give -0.0 for negative weights)."""
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def is_nm_valid(keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every row keeps at most N."""
    out_features, in_features = keep.shape
    if in_features % m:
        return False
    return bool((keep.reshape(out_features, -1, m).sum(-1) <= n).all())
