"""Masked LoRA: a low-rank update restricted to the kept entries, W_eff = W + M ⊙ (s·B·A).

The sparsity-preserving LoRA of SQFT ("SparsePEFT": Muñoz et al., "SQFT: Low-cost Model
Adaptation in Low-precision Sparse Foundation Models", EMNLP Findings 2024) and of LoSA
(Huang et al., "Dynamic Low-Rank Sparse Adaptation for Large Language Models", ICLR 2025):
the LoRA product is multiplied by the keep-mask before it is added, so every pruned entry
stays +0.0 and the merged model is exactly as sparse as the pruned one.

Shapes: W (out, in) in the (out, in) view (GPT-2's Conv1D stores it (in, out)); A (r, in),
Kaiming-uniform (a = √5) at init as in PEFT; B (out, r), zero at init (so the layer starts
equal to the base); M (out, in), the keep-mask from `masks.safetensors` (not `W != 0`:
a kept weight that happens to be zero may still move); s = lora_alpha / r.

Gradients, with G = dL/dW_eff = dyᵀ·x (out, in):  dB = s·(G ⊙ M)·Aᵀ,  dA = s·Bᵀ·(G ⊙ M).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spp.adapter.common import compute_dtype, mask_multiply_, zero_outside_
from spp.sparsity import check_pruned_zero


@torch.no_grad()
def masked_lora_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """W_eff = W + M ⊙ (s·B·A), evaluated as (B·(s·A)) ⊙ M + W in float32 and cast to W's dtype.

    One (out, r)·(r, in) product and two elementwise passes into one (out, in) buffer. Outside
    M the update is ±0.0 and W is +0.0 (the mask invariant `add_adapter` checks), so the sum is
    +0.0 bitwise (+0.0 + (±0.0) = +0.0) for finite A and B; kept entries may become zero. A
    non-finite A or B makes the loss non-finite and training stops, and `spp merge` masks with
    `torch.where`, so no merged pruned entry can be anything but +0.0. Computed in float64 when
    W or A is float64. Not tracked by autograd: `spp.adapter.weight.AdaptedFunction` supplies the gradients.

    Args:
        W: (out, in), any float dtype (a transposed view for Conv1D is fine).
        A: (r, in). B: (out, r). scale: s. keep: M, bool or uint8 (out, in).

    Returns:
        (out, in), laid out in memory as W is, dtype of W.
    """
    dtype = compute_dtype(W, A)
    W_eff = mask_multiply_(_low_rank(A.to(dtype) * scale, B.to(dtype), W), keep).add_(W)  # W + M ⊙ (B·(s·A))
    return W_eff.to(W.dtype)


def _low_rank(A: torch.Tensor, B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """B·A, (out, in), laid out in memory as `like` (a Conv1D weight's (out, in) view is transposed), so
    the elementwise passes that follow run over matching strides."""
    if like.dim() == 2 and like.stride(0) == 1 and like.stride(1) != 1:
        return torch.mm(A.t(), B.t()).t()
    return torch.mm(B, A)


def derived_keep(W: torch.Tensor, kept_zero: torch.Tensor) -> torch.Tensor:
    """M rebuilt from the frozen W: (W != 0) plus the kept entries that are zero, as uint8 (W's layout).

    Exact because `state` checks, when the adapter is built, that every entry the mask file prunes is zero in W,
    and records every kept entry that is zero (`kept_zero`, usually none); W never changes while the adapter
    trains. Costs one elementwise pass per use and nothing between steps.

    Args:
        W: any shape ((out, in), Conv1D's (in, out), (E, out, in)). kept_zero: (k, W.dim()) int64 indices of the
            kept entries that are zero.
    """
    keep = W != 0
    if kept_zero.numel():
        keep[tuple(kept_zero.t())] = True
    return keep.view(torch.uint8)


def masked_lora_gradients(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                          keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dA and dB from G = dL/dW_eff (out, in): G_M = G ⊙ M, dA = s·Bᵀ·G_M, dB = s·G_M·Aᵀ.

    Args:
        G: (out, in) (overwritten: masked in place when it is already in the compute dtype).
        A: (r, in). B: (out, r). keep: M, bool or uint8 (out, in).

    Returns:
        (dA (r, in), dB (out, r)) in the dtypes of A and B.
    """
    dtype = compute_dtype(G, A)
    G = mask_multiply_(G.to(dtype), keep)  # ±0.0 outside M: only summed in the products below
    a, b = A.to(dtype), B.to(dtype)
    d_A = torch.mm(b.t(), G).mul_(scale)
    d_B = torch.mm(G, a.t()).mul_(scale)
    return d_A.to(A.dtype), d_B.to(B.dtype)


# ------------------------------------------------------------------ the table's uniform entry points

LABEL = "masked LoRA"


def scale(cfg) -> float:
    """s = lora_alpha / rank."""
    return cfg.lora_alpha / cfg.rank


def size(cfg) -> dict:
    """The adapter's size for a manifest."""
    return {"rank": cfg.rank}


def tensor_shapes(out_features: int, in_features: int, cfg) -> dict[str, tuple[int, ...]]:
    """The saved tensors of one adapted (out, in) matrix and their shapes."""
    return {"lora_A": (cfg.rank, in_features), "lora_B": (out_features, cfg.rank)}


def init(W: torch.Tensor, cfg, name: str) -> dict[str, torch.Tensor]:
    """A (rank, in) Kaiming-uniform (a = √5), B (out, rank) zero, for the (out, in) matrix W (float32 for bf16/fp16 W)."""
    out_features, in_features = W.shape
    dtype = torch.promote_types(W.dtype, torch.float32)
    A = torch.empty(cfg.rank, in_features, dtype=dtype, device=W.device)
    B = torch.zeros(out_features, cfg.rank, dtype=dtype, device=W.device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return {"lora_A": A, "lora_B": B}


def state(W: torch.Tensor, keep: torch.Tensor, name: str) -> torch.Tensor:
    """The kept entries of W that are zero, (k, W.dim()) indices: with W they rebuild M (`derived_keep`), so the
    mask costs no memory per weight between steps.

    Raises:
        SppError: W is not zero where M prunes (this base is not the pruned model the mask belongs to).
    """
    check_pruned_zero(W, keep, lambda count, _: (
        f"{name}: {count} entries the mask marks pruned are not zero in the "
        "base weight; this base is not the pruned model the mask belongs to"), signed=False)
    return ((W == 0) & keep).nonzero()


def keep(W: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return derived_keep(W, state)


def effective(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    return masked_lora_weight(W, tensors["lora_A"], tensors["lora_B"], scale, keep)


def merged(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """The forward's weight, then `torch.where(M, ·, +0.0)`: bitwise the same for finite tensors, and +0.0
    outside M whatever they hold."""
    return zero_outside_(keep, effective(W, keep, tensors, scale))


def gradients(G, W, keep, tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    d_A, d_B = masked_lora_gradients(G, tensors["lora_A"], tensors["lora_B"], scale, keep)
    return {"lora_A": d_A, "lora_B": d_B}
