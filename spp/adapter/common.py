"""Small pieces the adapter kinds share: the compute dtype and +0.0 outside the keep-mask."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (so float64 checks stay exact)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def zero_outside_(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x with every entry where `keep` is 0 set to +0.0 by `torch.where` (in place; bitwise +0.0 whatever x
    holds there, NaN and inf included); returns x. For merging: on CPUs `where` is a branchy kernel, about
    20× slower than `mask_multiply_` on a random mask, so the training forward and backward use that."""
    keep = keep if keep.dtype == torch.bool else keep.bool()
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=x)


def mask_multiply_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x ⊙ M in place (M bool or uint8, 1 = keep); returns x. Outside M the result is ±0.0 for finite x
    (−0.0 where x < 0): add it to a tensor that is +0.0 there, or add +0.0, to get +0.0 bitwise
    (IEEE round-to-nearest: +0.0 + (±0.0) = +0.0)."""
    return x.mul_(keep)
