"""The `spp` kind: SPP's pure weight functions and the table's entry points.

SPP (Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large
Language Models", ICML 2024) adapts a frozen pruned weight W by *multiplying* it:

    W_eff = W ⊙ (1 + s·Â ⊙ β·1ᵀ)

so every zero of W stays zero. This module owns the math of the `spp` kind (`spp.adapter.ADAPTERS`; its
uniform entry points are at the end, as in `masked_lora.py` and `full.py`); `spp.adapter.weight` applies them
to a model's weights.

At init α is Kaiming-uniform (a = √5) and β = 0, so the adapted weight equals the base exactly; α and β are
float32 for bf16/fp16/fp32 bases. s = lora_alpha / lora_r (in SPP `lora_r` only sets the scale).

Shapes: W (out, in) in the (out, in) view (GPT-2's Conv1D stores it (in, out));
α (r, in); β (out,); Â (out, in) is α with row k repeated over the k-th of r nearly
equal contiguous blocks of output rows (the first out mod r blocks have one row more).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spp.adapter.common import compute_dtype
from spp.errors import SppError


def row_blocks(out_features: int, r: int) -> list[tuple[int, int, int, int]]:
    """Split `out_features` rows into r nearly equal contiguous groups, as at most two uniform runs.

    Returns:
        [(first_row, first_group, n_groups, rows_per_group), ...]: groups of q + 1 rows first
        (out mod r of them), then groups of q rows, with q = out // r. Empty runs are left out.
    """
    q, m = divmod(out_features, r)
    runs = [(0, 0, m, q + 1), (m * (q + 1), m, r - m, q)]
    return [run for run in runs if run[2] > 0 and run[3] > 0]


def expand_rows(alpha: torch.Tensor, out_features: int) -> torch.Tensor:
    """Â: repeat row k of α over the k-th contiguous block of output rows.

    Args:
        alpha: α, (r, in).
        out_features: out.

    Returns:
        Â, (out, in). Equals `alpha.repeat_interleave(out // r, 0)` when r divides out (not tiling).
    """
    q, m = divmod(out_features, alpha.shape[0])
    return torch.cat([alpha[:m].repeat_interleave(q + 1, 0), alpha[m:].repeat_interleave(q, 0)])


def spp_delta(W: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s·W ⊙ (Â ⊙ β·1ᵀ), the naive reference form (allocates Â).

    Args:
        W: (out, in). alpha: α, (r, in). beta: β, (out,). scale: s.

    Returns:
        (out, in) in the promoted dtype of the inputs.
    """
    return scale * W * (expand_rows(alpha, W.shape[0]) * beta[:, None])


@torch.no_grad()
def effective_weight(W: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float) -> torch.Tensor:
    """W_eff = W ⊙ (1 + s·Â ⊙ β·1ᵀ), evaluated as W + (s·β·1ᵀ ⊙ W) ⊙ Â in float32 and cast to W's dtype.

    Two elementwise passes into one (out, in) buffer, broadcasting α over each group's rows
    instead of building Â. The evaluated form keeps every +0.0 of W at +0.0 whatever the
    signs of α and β (+0.0 + (±0.0) = +0.0), so pruned entries stay +0.0 exactly. Computed in
    float64 when W or α is float64 (so float64 checks are exact). Not tracked by autograd:
    `spp.adapter.weight.AdaptedFunction` supplies the gradients (`spp_delta` is the differentiable reference).

    Args:
        W: (out, in), any float dtype (a transposed view for Conv1D is fine).
        alpha: α, (r, in). beta: β, (out,). scale: s.

    Returns:
        (out, in), dtype of W, with W's strides.
    """
    out_features, in_features = W.shape
    dtype = compute_dtype(W, alpha)
    alpha32, beta32 = alpha.to(dtype), beta.to(dtype) * scale
    W_eff = torch.empty_like(W, dtype=dtype)  # same strides as W: Conv1D's (in, out) storage stays so
    for row0, group0, n_groups, rows in row_blocks(out_features, alpha.shape[0]):
        rows_end = row0 + n_groups * rows
        w = W[row0:rows_end].view(n_groups, rows, in_features)  # (g, p, in); bf16/fp16 upcast per element
        e = W_eff[row0:rows_end].view(n_groups, rows, in_features)  # (g, p, in)
        torch.mul(w, beta32[row0:rows_end].view(n_groups, rows, 1), out=e)  # s·β ⊙ W
        torch.addcmul(w, e, alpha32[group0 : group0 + n_groups, None, :], out=e)  # W + (s·β ⊙ W) ⊙ Â
    return W_eff.to(W.dtype)


def spp_merge_weight(
    W: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The merged weight W ⊙ (1 + s·Â ⊙ β·1ᵀ) in float32, cast back, entries outside `keep` set to +0.0.

    Bitwise equal to the weight the training forward uses (same function, same order of
    operations), so a merged model reproduces the adapter model.

    Args:
        W: (out, in). alpha: α, (r, in). beta: β, (out,). scale: s.
        keep: optional bool keep-mask, (out, in); where False the result is +0.0.

    Returns:
        (out, in), dtype of W.
    """
    merged = effective_weight(W, alpha, beta, scale)
    if keep is None:
        return merged
    return torch.where(keep, merged, torch.zeros((), dtype=merged.dtype, device=merged.device))


def _group_grads(G: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float):
    """dα and dβ from G = dL/dW_eff ⊙ W, by batched reductions over the row groups.

    dα[k, i] = s·Σ_{o in block k} β[o]·G[o, i];  dβ[o] = s·Σ_i Â[o, i]·G[o, i].

    Args:
        G: (out, in). alpha: α, (r, in). beta: β, (out,).

    Returns:
        (dα (r, in), dβ (out,)) in the dtypes of α and β.
    """
    out_features, in_features = G.shape
    acc = compute_dtype(G, alpha)
    d_alpha = torch.zeros_like(alpha, dtype=acc)
    d_beta = torch.zeros_like(beta, dtype=acc)
    a, b = alpha.to(G.dtype), beta.to(G.dtype)
    for row0, group0, n_groups, rows in row_blocks(out_features, alpha.shape[0]):
        rows_end, groups_end = row0 + n_groups * rows, group0 + n_groups
        g = G[row0:rows_end].reshape(n_groups, rows, in_features)  # (g, p, in)
        b_run = b[row0:rows_end].view(n_groups, 1, rows)  # (g, 1, p)
        a_run = a[group0:groups_end].unsqueeze(-1)  # (g, in, 1)
        d_alpha[group0:groups_end] = torch.bmm(b_run, g).squeeze(1).to(acc)  # (g, in)
        d_beta[row0:rows_end] = torch.bmm(g, a_run).flatten().to(acc)  # (g·p,)
    return (d_alpha * scale).to(alpha.dtype), (d_beta * scale).to(beta.dtype)


# ------------------------------------------------------------------ the table's uniform entry points

LABEL = "SPP"


def scale(cfg) -> float:
    """s = lora_alpha / lora_r."""
    return cfg.lora_alpha / cfg.lora_r


def size(cfg) -> dict:
    """The adapter's size for a manifest."""
    return {"row_groups": cfg.spp_row_groups}


def tensor_shapes(out_features: int, in_features: int, cfg) -> dict[str, tuple[int, ...]]:
    """The saved tensors of one adapted (out, in) matrix and their shapes."""
    return {"spp_alpha": (cfg.spp_row_groups, in_features), "spp_beta": (out_features,)}


def init(W: torch.Tensor, cfg, name: str) -> dict[str, torch.Tensor]:
    """α (r, in) Kaiming-uniform (a = √5), β (out,) zero, for the (out, in) matrix W (float32 for bf16/fp16 W).

    Raises:
        SppError: r is above out (names the weight).
    """
    out_features, in_features = W.shape
    r = cfg.spp_row_groups
    if r > out_features:
        raise SppError(f"{name or 'the layer'} has {out_features} output rows, fewer than spp_row_groups={r}")
    dtype = torch.promote_types(W.dtype, torch.float32)
    alpha = torch.empty(r, in_features, dtype=dtype, device=W.device)
    beta = torch.zeros(out_features, dtype=dtype, device=W.device)
    nn.init.kaiming_uniform_(alpha, a=math.sqrt(5))
    return {"spp_alpha": alpha, "spp_beta": beta}


def state(W, keep, name: str) -> None:
    """SPP keeps no per-weight state and needs no mask: W_eff multiplies W, so every zero of W stays zero."""
    return None


def keep(W, state) -> None:
    return None


def effective(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    return effective_weight(W, tensors["spp_alpha"], tensors["spp_beta"], scale)


def gradients(G, W, keep, tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    """dα, dβ from G = dL/dW_eff (out, in): the group reductions of G ⊙ W (G is overwritten when it is already in
    the compute dtype)."""
    alpha = tensors["spp_alpha"]
    d_alpha, d_beta = _group_grads(G.to(compute_dtype(G, alpha)).mul_(W), alpha, tensors["spp_beta"], scale)
    return {"spp_alpha": d_alpha, "spp_beta": d_beta}


def merged(W, keep, tensors: dict, scale: float) -> torch.Tensor:
    return spp_merge_weight(W, tensors["spp_alpha"], tensors["spp_beta"], scale, keep)
