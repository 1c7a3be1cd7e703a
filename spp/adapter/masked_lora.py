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
import torch.nn.functional as F
from torch import nn

from spp.adapter.common import compute_dtype, keep_mask, mask_multiply_, zero_outside_
from spp.models import is_conv1d, weight_out_in
from spp.sparsity import check_pruned_zero


@torch.no_grad()
def masked_lora_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """W_eff = W + M ⊙ (s·B·A), evaluated as (B·(s·A)) ⊙ M + W in float32 and cast to W's dtype.

    One (out, r)·(r, in) product and two elementwise passes into one (out, in) buffer. Outside
    M the update is ±0.0 and W is +0.0 (the mask invariant `add_adapter` checks), so the sum is
    +0.0 bitwise (+0.0 + (±0.0) = +0.0) for finite A and B; kept entries may become zero. A
    non-finite A or B makes the loss non-finite and training stops, and `spp merge` masks with
    `torch.where`, so no merged pruned entry can be anything but +0.0. Computed in float64 when
    W or A is float64. Not tracked by autograd: `MaskedLoRAFunction` supplies the gradients.

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

    Exact because `MaskedLoRALinear` checks at construction that every entry the mask file prunes
    is zero in W, and records every kept entry that is zero (`kept_zero`, usually none); W never
    changes while the adapter trains. Costs one elementwise pass per use and nothing between steps.

    Args:
        W: (out, in). kept_zero: (k, 2) int64 (row, column) of the kept entries that are zero.
    """
    keep = W != 0
    if kept_zero.numel():
        keep[kept_zero[:, 0], kept_zero[:, 1]] = True
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


class MaskedLoRAFunction(torch.autograd.Function):
    """y = x·W_effᵀ + b with W_eff = W + M ⊙ (s·B·A), in one matrix product.

    Forward keeps x, W, A, B and the kept-zero indices (not W_eff nor M, which backward rebuilds
    from W: no (out, in) tensor is kept between forward and backward). Backward: dx = dy·W_eff,
    G = dyᵀ·x, then dA, dB from G ⊙ M (`masked_lora_gradients`). W is frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, W, A, B, kept_zero, bias, scale):
        ctx.scale = scale
        ctx.save_for_backward(x, W, A, B, kept_zero)
        ctx.has_bias = bias is not None
        return F.linear(x, masked_lora_weight(W, A, B, scale, derived_keep(W, kept_zero)), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, W, A, B, kept_zero = ctx.saved_tensors
        needs_x, _, needs_A, needs_B, _, needs_bias, _ = ctx.needs_input_grad
        out_features, in_features = W.shape
        keep = derived_keep(W, kept_zero)
        grad_x = d_A = d_B = grad_bias = None
        if needs_x:
            W_eff = masked_lora_weight(W, A, B, ctx.scale, keep).to(grad_y.dtype)
            grad_x = (grad_y @ W_eff).to(x.dtype)
            del W_eff
        dy = grad_y.reshape(-1, out_features)  # (N, out)
        if needs_A or needs_B:
            x2 = x.reshape(-1, in_features).to(dy.dtype)
            transposed = W.stride(0) == 1 and W.stride(1) != 1  # Conv1D: G in W's layout, as M is
            G = (x2.t() @ dy).t() if transposed else dy.t() @ x2  # dL/dW_eff, (out, in)
            d_A, d_B = masked_lora_gradients(G, A, B, ctx.scale, keep)
        if needs_bias and ctx.has_bias:
            grad_bias = dy.sum(0)
        return grad_x, None, d_A, d_B, None, grad_bias, None


class MaskedLoRALinear(nn.Module):
    """A frozen (pruned) linear layer with a masked LoRA adapter: y = (W + M ⊙ (s·B·A))·x + b.

    A (r, in) and B (out, r) are learnable, float32 for bf16/fp16/fp32 bases (W_eff is computed
    in float32 and cast to the base dtype); W is frozen. The keep-mask M is the one given (from
    `masks.safetensors`), not `W != 0`, but it is not stored: the layer checks that W is zero
    wherever M prunes, records the kept entries that are zero (`kept_zero`, (k, 2) indices,
    usually k = 0) and rebuilds M = (W != 0) ∪ kept_zero when it needs it (`derived_keep`), so the
    adapter costs no memory per weight between steps. The base may be `nn.Linear` or GPT-2's
    `Conv1D`; it is kept as `base_layer`, as in PEFT.

    Args:
        base_layer: the layer to adapt (its parameters are frozen here).
        keep: keep-mask (bool or uint8, True = keep) in the weight's storage layout (Conv1D: (in, out)).
        rank: r. scale: s = lora_alpha / r.
        name: the layer's name in the model, for error messages.
    """

    kind = "masked_lora"

    def __init__(self, base_layer: nn.Module, keep: torch.Tensor, rank: int, scale: float, name: str = ""):
        super().__init__()
        out_features, in_features = weight_out_in(base_layer).shape
        self.base_layer = base_layer.requires_grad_(False)
        device = base_layer.weight.device
        keep = keep_mask(keep, name, self.kind, tuple(base_layer.weight.shape)).to(device).bool()
        W = weight_out_in(base_layer).detach()
        keep = keep.t() if is_conv1d(base_layer) else keep  # (out, in)
        check_pruned_zero(W, keep, lambda count, _: (
            f"{name or 'the layer'}: {count} entries the mask marks pruned are not zero in the "
            "base weight; this base is not the pruned model the mask belongs to"), signed=False)
        self.kept_zero = ((W == 0) & keep).nonzero()  # (k, 2): kept entries that are zero, (out, in) indices
        self.scale = float(scale)
        dtype = torch.promote_types(base_layer.weight.dtype, torch.float32)  # fp32 for bf16/fp16 bases
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.kept_zero = fn(self.kept_zero)  # `.to(device)` moves it; dtype casts leave integer tensors alone
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (frozen) weight, for code that inspects `layer.weight`."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def keep_out_in(self) -> torch.Tensor:
        """M in the (out, in) view, uint8 (rebuilt from W: see `derived_keep`)."""
        return derived_keep(weight_out_in(self.base_layer).detach(), self.kept_zero)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors `adapter_model.safetensors` holds for this layer (detached, sharing storage)."""
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = weight_out_in(self.base_layer)
        return MaskedLoRAFunction.apply(x, W, self.lora_A, self.lora_B, self.kept_zero, self.base_layer.bias,
                                        self.scale)

    @torch.no_grad()
    def merged_weight(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """W + M ⊙ (s·B·A) in the base layer's storage layout and dtype, +0.0 outside M (`keep`: default the
        layer's own mask)."""
        conv1d = is_conv1d(self.base_layer)
        keep = self.keep_out_in() if keep is None else (keep.t() if conv1d else keep).to(self.lora_A.device)
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        weight = merged(weight_out_in(self.base_layer), keep, tensors, self.scale)
        return weight.t().contiguous() if conv1d else weight

    def extra_repr(self) -> str:
        r, in_features = self.lora_A.shape
        return f"rank={r}, in={in_features}, out={self.lora_B.shape[0]}, scale={self.scale:g}"


# ------------------------------------------------------------------ the table's uniform entry points


def tensor_shapes(out_features: int, in_features: int, cfg) -> dict[str, tuple[int, ...]]:
    """The saved tensors of one adapted (out, in) layer and their shapes."""
    return {"lora_A": (cfg.rank, in_features), "lora_B": (out_features, cfg.rank)}


def make_layer(name: str, base_layer: nn.Module, cfg, keep: torch.Tensor | None) -> MaskedLoRALinear:
    return MaskedLoRALinear(base_layer, keep, cfg.rank, cfg.scale, name=name)


def effective(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    return masked_lora_weight(W, tensors["lora_A"], tensors["lora_B"], scale, keep)


def merged(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    """The forward's weight, then `torch.where(M, ·, +0.0)`: bitwise the same for finite tensors, and +0.0
    outside M whatever they hold."""
    return zero_outside_(keep, effective(W, keep, tensors, scale))


def gradients(G, W, keep, tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    d_A, d_B = masked_lora_gradients(G, tensors["lora_A"], tensors["lora_B"], scale, keep)
    return {"lora_A": d_A, "lora_B": d_B}

