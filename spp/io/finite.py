"""Refuse weights that hold a NaN or an infinity, wherever a stage reads them.

One NaN in a weight does not stay put: SparseGPT's error feedback spreads it along its row, a merge
copies it into the served model, and perplexity comes out `nan`. So every stage that reads weights
passes each tensor through `check_finite` as it reads it (`check_finite_model` for a model just
loaded): one `isfinite` pass per tensor, in chunks, no copy of the model, and the entries are counted only
when the check has already failed. A weight written in another dtype (`--dtype`) goes through
`cast_weight`, which refuses a finite value that the cast would turn into an infinity.
"""

from __future__ import annotations

import torch
from torch import nn

from spp.errors import SppError

# float8 types without an infinity: torch has no isfinite kernel for them, and NaN is their only non-finite value.
_NO_INF = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, name)}
DEFAULT_ADVICE = "spp does not run on NaN or infinite weights: use a copy saved before they appeared"
_CHUNK = 1 << 22  # entries checked at a time: `isfinite` makes |x| and two bool tensors (2.75x an fp32 tensor's
# size), which for a whole embedding matrix would set a streamed stage's peak memory


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(tensor) if tensor.dtype in _NO_INF else torch.isfinite(tensor)


def check_finite(tensor: torch.Tensor, name: str, where: str, advice: str = DEFAULT_ADVICE) -> None:
    """Refuse `tensor` if any entry is NaN or ±inf (integer and bool tensors always pass).

    Args:
        tensor: the weight as read (any shape, any device).
        name: what the user calls it (the saved tensor's or the parameter's name).
        where: the file or directory it was read from, first in the message.
        advice: what to do about it, last in the message.

    Raises:
        SppError: `WHERE: NAME (DTYPE SHAPE) has K non-finite entries (N NaN, K-N ±inf; first at INDEX); ADVICE`
            (and after INDEX, for an infinity in float16, that float16 ends at ±65504).
    """
    if not tensor.is_floating_point():
        return
    if all(bool(_finite(part).all()) for part in tensor.reshape(-1).split(_CHUNK)):
        return
    bad = ~_finite(tensor)
    count, nan = int(bad.sum()), int(torch.isnan(tensor).sum())
    first = tuple(int(i) for i in torch.unravel_index(bad.flatten().to(torch.uint8).argmax(), tensor.shape))
    dtype = str(tensor.dtype).removeprefix("torch.")
    # an infinity in float16 is often a finite value of a wider checkpoint, cast on loading: say so
    limit = ""
    if tensor.dtype == torch.float16 and nan < count:
        limit = "; float16 ends at ±65504, so a wider value cast to it overflows"
    raise SppError(f"{where}: {name} ({dtype} {tuple(tensor.shape)}) has {count} non-finite "
                   f"entr{'y' if count == 1 else 'ies'} ({nan} NaN, {count - nan} ±inf; first at {first}{limit}); "
                   f"{advice}")


def check_finite_model(model: nn.Module, where: str) -> None:
    """`check_finite` on every parameter of a loaded model (a tied weight once), named as the model names it.

    Raises:
        SppError: the first parameter with a NaN or ±inf entry.
    """
    for name, param in model.named_parameters():
        if not param.is_meta:
            check_finite(param.detach(), name, where)


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype | None, name: str, where: str) -> torch.Tensor:
    """A saved tensor as `spp merge/export --dtype` writes it: a floating tensor cast to `dtype` (None: unchanged),
    any other (integer buffers) unchanged. +0.0 stays +0.0 in every float dtype, so masks still hold.

    Raises:
        SppError: a finite value overflows `dtype` (float16 ends at ±65504), naming the tensor and the way out.
    """
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    overflow = torch.isinf(cast) & torch.isfinite(tensor)
    if bool(overflow.any()):
        name_of = str(dtype).removeprefix("torch.")
        raise SppError(f"{where}: {name} does not fit in {name_of}: {int(overflow.sum())} entries overflow to ±inf "
                       f"(largest |value| {float(tensor.abs().max()):.4g}); pass --dtype bfloat16 or float32")
    return cast
