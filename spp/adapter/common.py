"""Small pieces every adapter kind uses: the compute dtype and the +0.0 fill outside the keep-mask."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (so float64 checks stay exact)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def zero_outside_(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x with every entry where `keep` is False set to +0.0 (in place, bitwise +0.0, never -0.0); returns x."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=x)


def keep_mask(keep: torch.Tensor | None, name: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's keep-mask as a bool tensor of `shape`, or a one-line SppError naming the layer.

    Raises:
        SppError: no mask (the kind needs one) or a mask of another shape.
    """
    from spp.errors import SppError

    if keep is None:
        raise SppError(f"{name or 'the layer'} has no entry in the keep-masks (masks.safetensors); adapter kind "
                       f"{kind!r} needs the mask of every target layer")
    if tuple(keep.shape) != tuple(shape):
        raise SppError(f"{name or 'the layer'}: mask shape {tuple(keep.shape)} does not match weight shape {tuple(shape)}")
    return keep.to(torch.bool)
