"""Adapters on mixture-of-experts weights: any kind of `spp.adapter.ADAPTERS`, batched over the experts.

transformers 5 keeps each MoE block's experts fused in one module (`mlp.experts`) with 3-D parameters,
Mixtral's `gate_up_proj` (E, 2·I, H) and `down_proj` (E, H, I), expert e's (out, in) matrix at [e].
`AdaptedExperts` wraps that module (kept frozen as `base_layer`) and, for each adapted parameter p,
holds the kind's tensors of every expert stacked along a leading expert axis (SPP: α (E, r, in),
β (E, out); masked LoRA: A (E, rank, in), B (E, out, rank); full: the (E, out, in) master), so expert e
is adapted exactly as a linear layer with weight p[e] would be. Its forward builds each adapted
parameter's effective weight, W_eff[e] = kind.effective_weight(p[e], M[e], tensors[e], s), through
`ExpertsWeightFunction` and runs the base module with it (`torch.func.functional_call`), so every
experts kernel of transformers (`grouped_mm`, `batched_mm`, `eager`) works unchanged.

Cost, honestly: W_eff (E, out, in) is materialised for every adapted parameter on every forward and
the experts kernel keeps it for backward, one extra copy of a block's expert weights in the base dtype
(activation checkpointing bounds that to one block at a time). Kinds that need the keep-mask
(`masked_lora`, `full`) keep it as uint8 (E, out, in), 1 byte per expert weight (the 2-D masked-LoRA
layer derives its mask from W instead). The router (`mlp.gate`) is not a linear layer and is never adapted.
"""

from __future__ import annotations

import torch
from torch import nn

from spp.adapter import ADAPTERS
from spp.models import ExpertWeight


class ExpertsWeightFunction(torch.autograd.Function):
    """W_eff (E, out, in) of one fused expert weight, expert by expert, with the kind's own gradients.

    Forward: W_eff[e] = kind.effective_weight(W[e], M[e], {t: T_t[e]}, s) for e < E.
    Backward, from G = dL/dW_eff (E, out, in): dT_t[e] = kind.gradients(G[e], W[e], M[e], {t: T_t[e]}, s)[t].
    W (the frozen base) gets no gradient; for `full` on an fp32 base the trained tensor is W itself,
    passed again among `tensors`, and gets its gradient there. Saves W, M and the tensors (not W_eff).
    """

    @staticmethod
    def forward(ctx, W, keep, kind, names, scale, *tensors):
        ctx.kind, ctx.names, ctx.scale = kind, names, scale
        ctx.save_for_backward(W, keep, *tensors)
        fns = ADAPTERS[kind]
        W_eff = torch.empty_like(W)
        for e in range(W.shape[0]):  # one (out, in) temporary at a time, written into W_eff
            W_eff[e] = fns.effective_weight(W[e], None if keep is None else keep[e],
                                            {n: t[e] for n, t in zip(names, tensors)}, scale)
        return W_eff

    @staticmethod
    def backward(ctx, G):
        W, keep, *tensors = ctx.saved_tensors
        fns = ADAPTERS[ctx.kind]
        grads = [torch.empty_like(t) if need else None for t, need in zip(tensors, ctx.needs_input_grad[5:])]
        for e in range(W.shape[0]):
            # a copy: the kinds' gradient functions may mask G in place, and G is autograd's buffer
            per_expert = fns.gradients(G[e].clone(), W[e], None if keep is None else keep[e],
                                       {n: t[e] for n, t in zip(ctx.names, tensors)}, ctx.scale)
            for name, grad in zip(ctx.names, grads):
                if grad is not None:
                    grad[e] = per_expert[name]
        return (None, None, None, None, None, *grads)


class _ExpertLinear(nn.Module):
    """A linear layer without bias whose weight is one expert's (out, in) matrix (a view), so a kind's
    `make_layer` initialises and checks that expert exactly as it would a plain linear layer."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None


class AdaptedExperts(nn.Module):
    """A frozen experts module whose fused weights are adapted by one kind, expert by expert.

        experts(x, top_k_index, top_k_weights) with every adapted p replaced by W_eff(p), where
        W_eff(p)[e] = effective weight of the kind for W = p[e] (SPP: W ⊙ (1 + s·Â ⊙ β·1ᵀ);
        masked LoRA: W + M ⊙ (s·B·A); full: M ⊙ W_trained), as in `spp.adapter`.

    Shapes: p (E, out, in); the kind's tensors (E, *tensor_shapes(out, in)); M (E, out, in) uint8.
    Every expert is initialised by the kind's own `make_layer` on a stand-in linear layer holding p[e]
    (same random draws, in expert order, as E separate layers; the same checks), so at init the model
    equals the base (β = 0, B = 0, master = W). A tensor the 2-D layer keeps as the base weight itself
    (`full` on an fp32/fp64 base) stays the base parameter here: no copy.

    Args:
        base_layer: the experts module (its parameters are frozen, except a `full` fp32 master).
        params: the names of the fused parameters to adapt (`gate_up_proj`, `down_proj`).
        cfg: the `AdapterConfig` (its kind, sizes and scale s).
        keeps: keep-masks by parameter name, (E, out, in) bool or uint8 (needed by `masked_lora`, `full`).
        name: the module's name in the model, for error messages.
    """

    def __init__(self, base_layer: nn.Module, params: list[str], cfg, keeps: dict[str, torch.Tensor], name: str = ""):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.kind, self.scale = cfg.kind, float(cfg.scale)
        fns = ADAPTERS[cfg.kind]
        self.params = [p for p, _ in base_layer.named_parameters(recurse=False) if p in params]  # the model's order
        self.adapted = nn.ModuleDict()
        self.masters: dict[str, list[str]] = {}  # tensor names that are the base parameter itself
        self.keeps: dict[str, torch.Tensor] = {}
        for p in self.params:
            W = getattr(base_layer, p)
            keep = keeps.get(p)
            stacked: dict[str, torch.Tensor] = {}
            for e in range(W.shape[0]):
                layer = fns.make_layer(f"{name}.{p} (expert {e})", _ExpertLinear(W.detach()[e]), cfg,
                                       None if keep is None else keep[e].to(W.device))
                for t, value in layer.adapter_tensors().items():
                    if value.data_ptr() == W[e].data_ptr():  # the 2-D layer trains the base weight itself
                        stacked[t] = W
                        continue
                    if t not in stacked:
                        stacked[t] = value.new_empty((W.shape[0], *value.shape))
                    stacked[t][e] = value
            self.masters[p] = [t for t, value in stacked.items() if value is W]
            if self.masters[p]:
                W.requires_grad_(True)
            self.adapted[p] = nn.ParameterDict({t: nn.Parameter(v) for t, v in stacked.items() if v is not W})
            if fns.needs_mask:
                self.keeps[p] = keep.to(device=W.device, dtype=torch.uint8)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.keeps = {p: fn(k) for p, k in self.keeps.items()}  # `.to(device)` moves them; dtype casts leave uint8 alone
        return self

    def tensors(self, p: str) -> dict[str, torch.Tensor]:
        """The kind's tensors of parameter p, (E, ...) each, by short name (parameters, not detached)."""
        W = getattr(self.base_layer, p)
        return {**{t: W for t in self.masters[p]}, **dict(self.adapted[p].items())}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What `adapter_model.safetensors` holds: `<param>.<tensor>` -> (E, ...), detached, in the order
        of the module's trainable parameters."""
        return {f"{p}.{t}": v.detach() for p in self.params for t, v in self.tensors(p).items()}

    def effective_weight(self, p: str) -> torch.Tensor:
        """W_eff of parameter p, (E, out, in), differentiable in the kind's tensors (`ExpertsWeightFunction`)."""
        tensors = self.tensors(p)
        return ExpertsWeightFunction.apply(getattr(self.base_layer, p), self.keeps.get(p), self.kind,
                                           tuple(tensors), self.scale, *tensors.values())

    def forward(self, *args, **kwargs):
        weights = {p: self.effective_weight(p) for p in self.params}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    @torch.no_grad()
    def merged_weight(self, p: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The merged (E, out, in) weight of parameter p, +0.0 bitwise where `keep` is False.

        Args:
            keep: (E, out, in) bool keep-mask; default the module's own (masked_lora, full) or `W != 0` (spp).
        """
        W = getattr(self.base_layer, p).detach()
        if keep is None:
            keep = self.keeps.get(p, W != 0)
        keep = keep.to(W.device)
        tensors = {t: v.detach() for t, v in self.tensors(p).items()}
        merged = torch.empty_like(W)
        for e in range(W.shape[0]):
            merged[e] = ADAPTERS[self.kind].merged_weight(W[e], keep[e], {t: v[e] for t, v in tensors.items()},
                                                          self.scale)
        return merged

    def extra_repr(self) -> str:
        return f"kind={self.kind}, params={self.params}, scale={self.scale:g}"


def adapt_experts(model: nn.Module, targets: dict[str, ExpertWeight], cfg,
                  masks: dict[str, torch.Tensor]) -> dict[str, AdaptedExperts]:
    """One `AdaptedExperts` per experts module that has a target weight (not yet put into the model).

    Args:
        targets: fused parameter name (`model.layers.0.mlp.experts.gate_up_proj`) -> its ExpertWeight.
        masks: keep-masks by parameter name ((E, out, in) for a fused one).

    Returns:
        experts module name -> the adapted module wrapping it.
    """
    by_module: dict[str, list[str]] = {}
    for full in targets:
        module, _, param = full.rpartition(".")
        by_module.setdefault(module, []).append(param)
    return {module: AdaptedExperts(model.get_submodule(module), params, cfg,
                                   {p: masks[f"{module}.{p}"] for p in params if f"{module}.{p}" in masks}, name=module)
            for module, params in by_module.items()}
