"""Masked full fine-tuning: train the kept entries of each target weight, with the gradient masked.

W_eff = M ⊙ W, dL/dW = (dyᵀ·x) ⊙ M. The recipe of the wanda repository's sparse fine-tuning
(Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
`lora_ft/` and its dense-update-with-mask variant) and of Neural Magic's published sparse Llama
models (SparseGPT 2:4, then full fine-tuning of the kept weights; "Sparse Llama 3.1 8B", 2024).
More capacity than any adapter, at the memory of full fine-tuning.

Shapes: W (out, in) in the (out, in) view (GPT-2's Conv1D stores it (in, out)); M (out, in)
(uint8, 1 = keep), the keep-mask from `masks.safetensors`. The trained weight ("master") is
float32 for bf16/fp16 bases (a copy) and the base weight itself for fp32/fp64 bases (no copy);
the forward uses M ⊙ W + 0.0 cast to the base dtype, so pruned entries are +0.0 bitwise
whatever finite values the master holds there, and the merge adds torch.where(M, ·, +0.0). They
also stay +0.0 in the master: their gradient is exactly +0.0, AdamW then keeps its moments at
+0.0 and its decoupled decay multiplies +0.0 by (1 − lr·wd) > 0.

Memory per target parameter, with AdamW (see docs/recovery.md): fp32 base: 4 (weight = master)
+ 4 (gradient) + 8 (two dense moments) = 16 bytes; bf16/fp16 base: 2 (base) + 4 (master) + 4 + 8
= 18 bytes; plus 1 byte for the mask. An adapter directory holds the float32 master of every
target weight (4 bytes per target parameter), `full_weight`, (out, in), in the spirit of PEFT's
`modules_to_save`.
"""

from __future__ import annotations

import torch

from spp.adapter.common import mask_multiply_, zero_outside_


@torch.no_grad()
def full_effective_weight(master: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M ⊙ W + 0.0, cast to `dtype` (the base dtype): +0.0 bitwise outside M for a finite master.

    Two elementwise passes (multiplying by M gives ±0.0 outside it; adding +0.0 makes that +0.0).
    `merged` adds a `torch.where(M, ·, +0.0)` for the merged weight, bitwise the same for a finite
    master and +0.0 outside M whatever it holds.

    Args:
        master: the trained weight, (out, in) (a transposed view for Conv1D is fine).
        keep: M, bool or uint8 (out, in). dtype: the base weight's dtype.

    Returns:
        (out, in), `dtype`.
    """
    return mask_multiply_(master.to(dtype=master.dtype, copy=True), keep).add_(0.0).to(dtype)


def full_gradient(G: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dW = G ⊙ M in `dtype` (the master's), from G = dL/dW_eff (out, in); +0.0 bitwise outside M
    for a finite G (so AdamW's moments stay +0.0 there). G is overwritten when it is already in `dtype`."""
    return mask_multiply_(G.to(dtype), keep).add_(0.0)


# ------------------------------------------------------------------ the table's uniform entry points

LABEL = "full sparse FT"


def scale(cfg) -> float:
    """`full` has no scale: 1 (unused)."""
    return 1.0


def size(cfg) -> dict:
    """`full` has no size beyond the model's."""
    return {}


def tensor_shapes(out_features: int, in_features: int, cfg) -> dict[str, tuple[int, ...]]:
    """The saved tensors of one adapted (out, in) matrix and their shapes."""
    return {"full_weight": (out_features, in_features)}


def init(W, cfg, name: str) -> dict:
    """No tensors of its own: `full` trains the weight itself (its master, `full_weight`; see the module docstring)."""
    return {}


def state(W: torch.Tensor, keep: torch.Tensor, name: str) -> torch.Tensor:
    """M as uint8 in W's storage layout (1 byte per weight; multiplying a float tensor by it is about 3× faster
    than by a bool one)."""
    return keep.to(torch.uint8)


def keep(W, state: torch.Tensor) -> torch.Tensor:
    return state


def effective(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """M ⊙ full_weight in W's dtype (W, the base weight, only gives the dtype)."""
    return full_effective_weight(tensors["full_weight"], keep, W.dtype)


def merged(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """The forward's weight, then `torch.where(M, ·, +0.0)`."""
    return zero_outside_(keep, effective(W, keep, tensors, scale))


def gradients(G, W, keep, tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    return {"full_weight": full_gradient(G, keep, tensors["full_weight"].dtype)}
