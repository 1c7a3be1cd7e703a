"""`AdaptedWeight`: one module and one autograd function that adapt any weight by any kind of `spp.adapter.ADAPTERS`.

A weight is a 2-D linear weight (`nn.Linear`, or GPT-2's `Conv1D`, stored (in, out)) or a fused expert weight
(E, out, in) of a transformers 5 experts module (Mixtral's `gate_up_proj` (E, 2·I, H), `down_proj` (E, H, I);
expert e's (out, in) matrix at [e]); the 2-D case is the same with E absent. `AdaptedWeight` wraps the module that
owns the weight (kept frozen as `base_layer`) and holds, for each adapted parameter p, the kind's tensors
(a linear layer's as its own `spp_alpha`, `lora_A`, ..., named as the adapter file names them; an expert weight's
as `adapted.<p>.<tensor>`, stacked along a leading expert axis, so expert e is adapted exactly as a linear layer
with weight p[e] would be) and the kind's per-weight state (`state`: masked LoRA's kept-zero
indices, `full`'s uint8 keep-mask, in the weight's storage layout; SPP keeps none).

`AdaptedFunction` is the one backward skeleton every kind shares:

    forward:  W_eff = kind.effective_weight(W, M, tensors, s), matrix by matrix; y = x·W_effᵀ + b (2-D) or W_eff
    backward: dx = dy·W_eff (W_eff rebuilt, never saved); G = dyᵀ·x (2-D) or the incoming dL/dW_eff;
              then the kind's gradients of its tensors from G, matrix by matrix.

A linear layer does one matrix product and keeps no (out, in) tensor between forward and backward (x, W, the
state and the kind's small tensors are saved; M is rebuilt from W and the state). An experts module is run with
`torch.func.functional_call` and W_eff per adapted parameter, so every experts kernel of transformers (`grouped_mm`,
`batched_mm`, `eager`) works unchanged; that kernel keeps W_eff (E, out, in) for its own backward, one extra copy
of a block's expert weights in the base dtype (activation checkpointing bounds that to one block at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spp.adapter import ADAPTERS, AdapterKind
from spp.models import Target, is_conv1d


def _matrices(W: torch.Tensor, keep: torch.Tensor | None, tensors: dict[str, torch.Tensor]):
    """(W[e], M[e], {t: T_t[e]}) for each expert of an (E, out, in) weight; the one (W, M, tensors) of a 2-D one."""
    if W.dim() == 2:
        yield W, keep, tensors
        return
    for e in range(W.shape[0]):
        yield W[e], None if keep is None else keep[e], {t: v[e] for t, v in tensors.items()}


def per_matrix(fn, W: torch.Tensor, keep: torch.Tensor | None, tensors: dict[str, torch.Tensor],
               scale: float) -> torch.Tensor:
    """`fn(W, M, tensors, s)` (a kind's effective or merged weight) of a 2-D weight, or of each expert of an
    (E, out, in) one written into one (E, out, in) tensor (one (out, in) temporary at a time)."""
    if W.dim() == 2:
        return fn(W, keep, tensors, scale)
    result = torch.empty_like(W)
    for e, (w, k, t) in enumerate(_matrices(W, keep, tensors)):
        result[e] = fn(w, k, t, scale)
    return result


class AdaptedFunction(torch.autograd.Function):
    """y = x·W_effᵀ + b in one matrix product (x given), or W_eff itself (x None: an expert weight), with the kind's
    gradients. See the module docstring.

    Inputs: x (..., in) or None; W the frozen weight in its storage layout; state the kind's per-weight state
    (storage layout) or None; bias (out,) or None; kind an `AdapterKind`; scale s; conv1d: W is stored (in, out);
    names the kind's tensor names, then the tensors themselves ((E?, ...); the master of `full` in the (out, in)
    view, which for an fp32/fp64 base is W itself and gets its gradient there). W gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, W, state, bias, kind: AdapterKind, scale, conv1d, names, *tensors):
        ctx.kind, ctx.scale, ctx.conv1d, ctx.names, ctx.has_bias = kind, scale, conv1d, names, bias is not None
        ctx.save_for_backward(x, W, state, *tensors)
        W_eff = per_matrix(kind.effective_weight, *_inputs(kind, W, state, conv1d, names, tensors), scale)
        return W_eff if x is None else F.linear(x, W_eff, bias)

    @staticmethod
    def backward(ctx, grad):
        x, W, state, *tensors = ctx.saved_tensors
        kind, needs = ctx.kind, ctx.needs_input_grad
        W, keep, named = _inputs(kind, W, state, ctx.conv1d, ctx.names, tensors)
        grad_x = grad_bias = None
        if x is None:
            G = grad  # dL/dW_eff, (E, out, in), from the experts kernel
        else:
            out_features, in_features = W.shape
            if needs[0]:
                W_eff = kind.effective_weight(W, keep, named, ctx.scale).to(grad.dtype)
                grad_x = (grad @ W_eff).to(x.dtype)
                del W_eff
            dy = grad.reshape(-1, out_features)  # (N, out)
            if any(needs[8:]):
                x2 = x.reshape(-1, in_features).to(dy.dtype)
                # masked LoRA on Conv1D: G in W's storage layout, as M is, so its elementwise passes match strides
                G = (x2.t() @ dy).t() if kind.gradient_in_weight_layout and ctx.conv1d else dy.t() @ x2  # (out, in)
            if needs[3] and ctx.has_bias:
                grad_bias = dy.sum(0)
        grads = [None] * len(tensors)
        if any(needs[8:]):
            if W.dim() == 2:
                computed = kind.gradients(G, W, keep, named, ctx.scale)
                grads = [computed[t] for t in ctx.names]
            else:
                grads = [torch.empty_like(t) if need else None for t, need in zip(tensors, needs[8:])]
                for e, (w, k, t) in enumerate(_matrices(W, keep, named)):
                    # a copy: the kinds' gradient functions may mask G in place, and G is autograd's buffer
                    computed = kind.gradients(G[e].clone(), w, k, t, ctx.scale)
                    for name, g in zip(ctx.names, grads):
                        if g is not None:
                            g[e] = computed[name]
        return (grad_x, None, None, grad_bias, None, None, None, None, *grads)


def _inputs(kind: AdapterKind, W, state, conv1d: bool, names, tensors):
    """W and the kind's keep-mask M (rebuilt from W and the state) in the (E?, out, in) view, and the tensors by name."""
    keep = kind.keep(W, state)
    if conv1d:
        W, keep = W.t(), None if keep is None else keep.t()
    return W, keep, dict(zip(names, tensors))


class AdaptedWeight(nn.Module):
    """A frozen module whose weights (a linear layer's `weight`, or an experts module's fused (E, out, in) weights)
    are adapted by one kind: each adapted p is replaced by W_eff(p) = the kind's effective weight of p, matrix by
    matrix (SPP: W ⊙ (1 + s·Â ⊙ β·1ᵀ); masked LoRA: W + M ⊙ (s·B·A); full: M ⊙ W_trained; see `spp.adapter`).

    Shapes: p (E?, out, in) in the (E?, out, in) view (Conv1D stores (in, out)); the kind's tensors
    (E?, *tensor_shapes(out, in)); the state in p's storage layout. Every matrix is initialised by the kind's
    `init` in model order (expert by expert), so a fused weight draws the same random numbers as E separate layers,
    and at init the module equals the base (β = 0, B = 0, master = W). The kind's tensors are float32 for
    bf16/fp16/fp32 bases (W_eff is computed in float32 and cast to the base dtype). `full` trains the weight itself
    ("master"): the base parameter for fp32/fp64 bases (no copy), a float32 copy in its storage layout otherwise.

    Args:
        base_layer: the module owning the weights (frozen here, except a `full` fp32/fp64 master).
        cfg: the `AdapterConfig` (its kind, sizes and scale s).
        keeps: keep-masks by parameter name in the storage layout, bool (needed by `masked_lora` and `full`).
        params: the names of the parameters to adapt (`weight`; `gate_up_proj`, `down_proj`).
        name: the module's name in the model, for error messages.

    Raises:
        SppError: a layer too small for the kind, or (masked LoRA) a base that is not zero where its mask prunes.
    """

    def __init__(self, base_layer: nn.Module, cfg, keeps: dict[str, torch.Tensor] | None = None,
                 params=("weight",), name: str = ""):
        super().__init__()
        kind = ADAPTERS[cfg.kind]
        self.base_layer = base_layer.requires_grad_(False)
        self.kind, self.scale, self.conv1d = cfg.kind, float(kind.scale(cfg)), is_conv1d(base_layer)
        self.params = [p for p, _ in base_layer.named_parameters(recurse=False) if p in params]  # the model's order
        self.fused = getattr(base_layer, self.params[0]).dim() == 3  # expert weights (E, out, in)
        if self.fused:
            self.adapted = nn.ModuleDict()  # `adapted.<p>.<tensor>`; a linear layer's are its own (`spp_alpha`, ...)
        self.names: dict[str, list[str]] = {}  # the kind's tensors each weight holds, in order
        self.state: dict[str, torch.Tensor | None] = {}
        for p in self.params:
            W = getattr(base_layer, p)
            keep = (keeps or {}).get(p)
            keep = None if keep is None else keep.to(device=W.device, dtype=torch.bool)
            weight = self.target(name, p).name
            self.state[p] = kind.state(W.detach(), keep, weight or "the layer")
            inits = [kind.init(w, cfg, weight + (f" (expert {e})" if self.fused else ""))
                     for e, (w, _, _) in enumerate(_matrices(self._out_in(W.detach()), None, {}))]
            tensors = {t: torch.stack([i[t] for i in inits]) if self.fused else inits[0][t] for t in inits[0]}
            if kind.master and W.dtype in (torch.float32, torch.float64):
                W.requires_grad_(True)  # the base weight is the master: no copy
            elif kind.master:
                tensors[kind.master] = W.detach().to(torch.float32)  # storage layout
            self.names[p] = list(tensors)
            if self.fused:
                self.adapted[p] = nn.ParameterDict()
            for t, v in tensors.items():
                self._holder(p).register_parameter(t, nn.Parameter(v))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if isinstance(self.state, dict):  # `.to(device)` moves the state; dtype casts leave integer tensors alone
            self.state = {p: None if s is None else fn(s) for p, s in self.state.items()}
        return self

    def _out_in(self, t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in the (E?, out, in) view from its storage layout, or back (a view, not a copy)."""
        return t.t() if self.conv1d else t

    def _holder(self, p: str) -> nn.Module:
        return self.adapted[p] if self.fused else self

    def _held(self, p: str) -> dict[str, nn.Parameter]:
        """The kind's tensors this module holds for p (not `full`'s master where it is the base weight)."""
        return {t: getattr(self._holder(p), t) for t in self.names[p]}

    def _state(self, p: str) -> torch.Tensor | None:
        return self.state.get(p) if isinstance(self.state, dict) else getattr(self.state, p, None)

    def target(self, module_name: str, p: str) -> Target:
        """Adapted parameter p as a `spp.models.Target`, this module being `module_name` in the model: named as
        `adapter_model.safetensors` keys its tensors (the module's name for a linear layer, the parameter's own for
        an expert weight, `model.layers.0.mlp.experts.gate_up_proj`), its keep-mask keyed `<module_name>.<p>`."""
        param = f"{module_name}.{p}"
        return Target(param if self.fused else module_name, param, self.base_layer, p)

    def tensors(self, p: str) -> dict[str, torch.Tensor]:
        """The kind's tensors of parameter p, (E?, ...) each, by short name (parameters, not detached); `full`'s
        master in the (E?, out, in) view."""
        return self._with_master(self._held(p), getattr(self.base_layer, p))

    def _with_master(self, held: dict[str, torch.Tensor], W: torch.Tensor) -> dict[str, torch.Tensor]:
        """`held` with `full`'s master (W itself where no copy is held) in the (E?, out, in) view."""
        master = ADAPTERS[self.kind].master
        if master and master not in held:
            held[master] = W
        return {t: self._out_in(v) if t == master else v for t, v in held.items()}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What `adapter_model.safetensors` holds for this module, detached: `<tensor>` for a linear layer,
        `<param>.<tensor>` ((E, ...) each) for expert weights, in the order of the module's trainable parameters."""
        return {(f"{p}.{t}" if self.fused else t): v.detach() for p in self.params for t, v in self.tensors(p).items()}

    def weights(self, module_name: str, gather=lambda t: t):
        """Per adapted weight: (its `target`, W in its storage layout, {tensor: (E?, ...)} as `tensors` gives them),
        detached and passed through `gather` (which makes a sharded tensor whole; a `full` master that is the base
        weight itself is gathered once, as W)."""
        for p in self.params:
            W = gather(getattr(self.base_layer, p).detach())
            held = {t: gather(v.detach()) for t, v in self._held(p).items()}
            yield self.target(module_name, p), W, self._with_master(held, W)

    def forward(self, *args, **kwargs):
        kind = ADAPTERS[self.kind]

        def apply(x, p, bias=None):
            tensors = self.tensors(p)
            return AdaptedFunction.apply(x, getattr(self.base_layer, p), self._state(p), bias, kind, self.scale,
                                         self.conv1d, tuple(tensors), *tensors.values())

        if not self.fused:
            return apply(args[0], self.params[0], self.base_layer.bias)
        weights = {p: apply(None, p) for p in self.params}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    @torch.no_grad()
    def effective_weight(self, W: torch.Tensor, keep: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """W_eff of a (whole) weight W in its storage layout, with the keep-mask `keep` (storage layout) and the
        tensors of `weights`: the forward's weight, in W's storage layout."""
        fn = ADAPTERS[self.kind].effective_weight
        return self._out_in(per_matrix(fn, self._out_in(W), self._out_in(keep), tensors, self.scale))

    @torch.no_grad()
    def merged_weight(self, p: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight of parameter p in its storage layout and dtype, +0.0 bitwise where `keep` is False.

        Args:
            keep: keep-mask in the storage layout; default the module's own (masked_lora, full) or `W != 0` (spp),
                so every zero of W (in particular every pruned entry) comes out +0.0.
        """
        kind = ADAPTERS[self.kind]
        W = getattr(self.base_layer, p).detach()
        if keep is None:
            keep = kind.keep(W, self._state(p))
            keep = W != 0 if keep is None else keep
        tensors = {t: v.detach() for t, v in self.tensors(p).items()}
        merged = per_matrix(kind.merged_weight, self._out_in(W), self._out_in(keep.to(W.device)), tensors, self.scale)
        return self._out_in(merged).contiguous()

    def register_state(self, as_parameter) -> int:
        """Register the per-weight state so FSDP2 handles it (in place): a kind whose state is a mask in the weight's
        layout (`full`) gets frozen parameters `as_parameter(state)`, sharded as the weights are; any other state
        (masked LoRA's kept-zero indices) becomes non-persistent buffers, moved to the device with the block.

        Returns:
            The number of masks turned into parameters.
        """
        if not isinstance(self.state, dict):
            return 0
        held, shard = self.state, ADAPTERS[self.kind].shard_state
        del self.state  # a plain attribute; `nn.Module.__setattr__` would otherwise keep both
        self.state = nn.Module()
        for p, s in held.items():
            if s is not None and shard:
                self.state.register_parameter(p, as_parameter(s))
            elif s is not None:
                self.state.register_buffer(p, s, persistent=False)
        return len(list(self.state.parameters()))

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}.{t} {tuple(v.shape)}" for p in self.params for t, v in self.tensors(p).items())
        return f"kind={self.kind}, scale={self.scale:g}, {shapes}"
