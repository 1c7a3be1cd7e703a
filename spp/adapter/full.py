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
import torch.nn.functional as F
from torch import nn

from spp.adapter.common import keep_mask, mask_multiply_, zero_outside_
from spp.models import is_conv1d, weight_out_in


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


class FullFunction(torch.autograd.Function):
    """y = x·(M ⊙ W)ᵀ + b, in one matrix product (`full_effective_weight`).

    Forward keeps x, W (the master) and M, not M ⊙ W, which backward rebuilds. Backward:
    dx = dy·(M ⊙ W), dW = (dyᵀ·x) ⊙ M in the master's dtype.
    """

    @staticmethod
    def forward(ctx, x, master, keep, bias, dtype):
        ctx.dtype = dtype
        ctx.save_for_backward(x, master, keep)
        ctx.has_bias = bias is not None
        return F.linear(x, full_effective_weight(master, keep, dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, master, keep = ctx.saved_tensors
        needs_x, needs_master, _, needs_bias, _ = ctx.needs_input_grad
        out_features, in_features = master.shape
        grad_x = grad_master = grad_bias = None
        if needs_x:
            W_eff = full_effective_weight(master, keep, ctx.dtype).to(grad_y.dtype)
            grad_x = (grad_y @ W_eff).to(x.dtype)
            del W_eff
        dy = grad_y.reshape(-1, out_features)  # (N, out)
        if needs_master:
            G = dy.t() @ x.reshape(-1, in_features).to(dy.dtype)  # dL/dW_eff, (out, in)
            grad_master = full_gradient(G, keep, master.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = dy.sum(0)
        return grad_x, grad_master, None, grad_bias, None


class FullLinear(nn.Module):
    """A pruned linear layer whose kept weights are trained: y = (M ⊙ W)·x + b, dW = (dyᵀ·x) ⊙ M.

    The trainable tensor ("master") is the base weight itself for fp32/fp64 bases and a float32
    copy (`full_master`, storage layout) for bf16/fp16 bases, whose own weight then stays as it
    was until merged. The bias stays frozen. M is stored once as a uint8 tensor in the weight's
    storage layout (not a buffer: not saved in state dicts nor broadcast by DDP every step).

    Args:
        base_layer: the layer to train (`nn.Linear` or GPT-2's `Conv1D`, kept as `base_layer`).
        keep: keep-mask (bool or uint8, True = keep) in the weight's storage layout.
        name: the layer's name in the model, for error messages.
    """

    kind = "full"

    def __init__(self, base_layer: nn.Module, keep: torch.Tensor, name: str = ""):
        super().__init__()
        weight = base_layer.weight
        self.base_layer = base_layer.requires_grad_(False)
        self.keep = keep_mask(keep, name, self.kind, tuple(weight.shape)).to(weight.device)
        self.base_dtype = weight.dtype
        if weight.dtype in (torch.float32, torch.float64):
            self.full_master = None
            weight.requires_grad_(True)  # the base weight is the master: no copy
        else:
            self.full_master = nn.Parameter(weight.detach().to(torch.float32))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.keep = fn(self.keep)  # `.to(device)` moves the mask; dtype casts leave integer tensors alone
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (the master itself for fp32 bases), for code that inspects it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def master(self) -> torch.Tensor:
        """The trained weight in the (out, in) view (a view of the parameter, not a copy)."""
        W = self.base_layer.weight if self.full_master is None else self.full_master
        return W.t() if is_conv1d(self.base_layer) else W

    def keep_out_in(self) -> torch.Tensor:
        """M in the (out, in) view."""
        return self.keep.t() if is_conv1d(self.base_layer) else self.keep

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors `adapter_model.safetensors` holds for this layer: the master, (out, in), detached."""
        return {"full_weight": self.master().detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FullFunction.apply(x, self.master(), self.keep_out_in(), self.base_layer.bias, self.base_dtype)

    @torch.no_grad()
    def merged_weight(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """M ⊙ W in the base layer's storage layout and dtype (`keep`: the layer's own mask)."""
        conv1d = is_conv1d(self.base_layer)
        keep = self.keep_out_in() if keep is None else (keep.t() if conv1d else keep).to(self.keep.device)
        weight = zero_outside_(keep, full_effective_weight(self.master(), keep, self.base_dtype))
        return weight.t().contiguous() if conv1d else weight

    def extra_repr(self) -> str:
        out_features, in_features = self.master().shape
        return f"in={in_features}, out={out_features}, master={str(self.master().dtype).removeprefix('torch.')}"


# ------------------------------------------------------------------ the table's uniform entry points


def tensor_shapes(out_features: int, in_features: int, cfg) -> dict[str, tuple[int, ...]]:
    """The saved tensors of one adapted (out, in) layer and their shapes."""
    return {"full_weight": (out_features, in_features)}


def make_layer(name: str, base_layer: nn.Module, cfg, keep: torch.Tensor | None) -> FullLinear:
    return FullLinear(base_layer, keep, name=name)


def effective(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """M ⊙ full_weight in W's dtype (W, the base weight, only gives the dtype)."""
    return full_effective_weight(tensors["full_weight"], keep, W.dtype)


def merged(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """The forward's weight, then `torch.where(M, ·, +0.0)`."""
    return zero_outside_(keep, effective(W, keep, tensors, scale))


def gradients(G, W, keep, tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    return {"full_weight": full_gradient(G, keep, tensors["full_weight"].dtype)}

