"""Pruning a mixture-of-experts block's fused expert weights: each expert from its routed tokens, each saved tensor alone.

transformers 5 keeps the experts fused, `gate_up_proj` (E, 2·I, H) and `down_proj` (E, H, I), and its default
kernel (`grouped_mm`) reads the whole 3-D weight, so hooks on linear layers never see which tokens reached which
expert. `recording_routes` instead records what the experts module is called with, (hidden_states (T, H),
top_k_index (T, k)), while the *unpruned* block runs. Then, for one expert e at a time (SparseGPT's Hessians of
all experts together would not fit: Mixtral-8x7B's `w2` alone needs several GB per block):
X_e = the hidden states of the tokens routed to e (in any of the k slots) feed the gate and up rows, and
act(X_e·gateᵀ) ⊙ (X_e·upᵀ), from e's unpruned weights and the block's own gating, feeds `down_proj[e]`, each
through the method's `accumulate` as a linear layer's inputs would. Every *saved* tensor (a `spp.io.reader.Piece`:
Mixtral's w1 = rows [0, I) of gate_up_proj[e], w3 = rows [I, 2I), w2 = down_proj[e]) is then pruned as its own
(rows, in) matrix by the method's prune function, so its mask is the one the same matrix would get as a separate
linear layer (N:M along its input axis). An expert that received fewer than `expert_min_tokens` calibration tokens
is pruned by magnitude instead, and the record of each piece says how many tokens it saw and which method pruned
it. The router is not an expert weight and stays dense. The wiring into the block loop is `spp.prune.prune_model`;
OWL is refused for expert weights (`check_expert_weights`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spp.errors import SppError
from spp.hf import expert_gate_fn
from spp.models import Target, decoder_targets
from spp.prune.sparsegpt import dampening_retry
from spp.sparsity import sparsity_stats, tally

GATE_UP, DOWN = "gate_up_proj", "down_proj"  # the fused layout spp prunes (Mixtral, Qwen2/3-MoE, OLMoE)


# --------------------------------------------------------------------------- routed tokens (pure)


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Bool (T,): the tokens the router sent to `expert` in any of their k slots (top_k_index (T, k))."""
    return (top_k_index == expert).any(dim=-1)


def routed_inputs(hidden: torch.Tensor, top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """X_e: the rows of `hidden` (T, H) routed to `expert`, in token order; (T_e, H)."""
    return hidden[routed_tokens(top_k_index, expert)]


def default_apply_gate(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(T, 2I) -> (T, I): gate, up = the two halves; act(gate) ⊙ up (transformers' concatenated [gate; up] layout)."""

    def apply_gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return act_fn(gate) * up

    return apply_gate


def expert_down_inputs(X: torch.Tensor, gate_up: torch.Tensor,
                       apply_gate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The inputs of an expert's down projection: apply_gate(X·W_guᵀ) = act(X·gateᵀ) ⊙ (X·upᵀ).

    Args:
        X: (T_e, H) the expert's routed hidden states.
        gate_up: (2I, H) the expert's *unpruned* fused gate and up rows.
        apply_gate: the experts module's own gating, (T_e, 2I) -> (T_e, I).

    Returns:
        (T_e, I), in X's dtype (what the down projection multiplies in the block's forward).
    """
    return apply_gate(F.linear(X, gate_up))


# --------------------------------------------------------------------------- capture


def expert_targets(targets: dict[str, Target]) -> dict[str, Target]:
    """The fused expert weights (E, out, in) among `targets` (same keys): the ones pruned from routed tokens."""
    return {name: target for name, target in targets.items() if target.weight.dim() == 3}


@contextlib.contextmanager
def recording_routes(experts_modules: dict[str, nn.Module], storage: torch.device
                     ) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Forward pre-hooks on experts modules recording each call's (hidden_states (T, H), top_k_index (T, k)).

    Yields experts module name -> one (hidden, top_k_index) pair per call (a chunk of windows), on `storage`.
    """
    routes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in experts_modules}

    def hook(name):
        def fn(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
            if len(values) < 2:
                raise SppError(f"{name} ({type(module).__name__}) was called without (hidden_states, top_k_index); "
                               "spp cannot tell which tokens reached which expert")
            routes[name].append((values[0].detach().to(storage), values[1].detach().to(storage)))

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in experts_modules.items()]
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- checks


def check_expert_weights(model: nn.Module, plan, pieces: dict, owl: bool) -> None:
    """Refuse, before any weights are read, expert weights spp cannot prune as the files save them.

    Raises:
        SppError: an expert weight is not a `gate_up_proj`/`down_proj` pair of its experts module, its saved
            per-expert tensors are unknown (no `spp.io.reader.Piece` mapping), or --owl is asked for with
            expert weights in the plan.
    """
    targets = {target.name: target for targets in decoder_targets(model) for target in targets.values()}
    experts = expert_targets({full: targets[full] for full in plan.sparsity})
    if experts and owl:
        raise SppError(f"--owl does not support expert weights ({next(iter(experts))}): prune mixture-of-experts "
                       "models without --owl, or leave the experts dense with --ignore 'mlp.experts.*'")
    for full, target in experts.items():
        params = {n for n, p in target.module.named_parameters(recurse=False) if p.dim() == 3}
        if target.attr not in (GATE_UP, DOWN) or params != {GATE_UP, DOWN}:
            raise SppError(f"{full}: spp prunes experts made of {GATE_UP} and {DOWN} (Mixtral, Qwen-MoE, OLMoE); "
                           f"{type(target.module).__name__} has {', '.join(sorted(params))}")
        if full not in pieces:
            raise SppError(f"{full}: cannot tell which saved per-expert tensors make up this fused weight "
                           "(transformers' converters for it are not a stack of per-expert matrices)")


def saved_pieces(pieces: dict | None, param: str) -> list:
    """The saved per-expert tensors (`Piece`s) of fused weight `param`.

    Raises:
        SppError: the caller has no mapping for it (`prune_model` needs the checkpoint's `pieces`).
    """
    if not pieces or param not in pieces:
        raise SppError(f"{param}: no saved per-expert tensors are known for this fused expert weight; pass the "
                       "checkpoint's pieces (spp.io.reader.Checkpoint.pieces) to prune it")
    return pieces[param]


# --------------------------------------------------------------------------- pruning


@dataclass
class ExpertPruned:
    """One fused expert weight after pruning: its keep-mask (E, out, in) on the CPU, its totals (`sparsity_stats`
    plus `pieces`: one record per saved tensor with expert, rows, counts, routed `tokens` and the `method` used)
    and SparseGPT's dampening retries."""

    keep: torch.Tensor
    stats: dict
    retries: list[dict] = field(default_factory=list)


def prune_expert_weights(
    weights: dict[str, Any],
    routes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None,
    method,
    fallback,
    cfg,
    sparsity: dict[str, float],
    pieces: dict[str, list],
    device: torch.device,
) -> dict[str, ExpertPruned]:
    """Prune the chosen expert weights of one block, expert by expert, each saved piece as its own matrix.

    Args:
        weights: block-relative name (`mlp.experts.gate_up_proj`) -> its `spp.models.Target`, on `device`.
        routes: experts module name -> its recorded (hidden, top_k_index) per chunk (`recording_routes`), or
            None when the method uses no calibration.
        method: the `spp.prune.Method` (accumulate, prune); fallback: the magnitude `Method`.
        cfg: the `PruneConfig` (pattern, SparseGPT settings, `expert_min_tokens`).
        sparsity: block-relative name -> its requested sparsity; pieces: block-relative name -> its `Piece`s.
        device: where the block is.

    Returns:
        Block-relative name -> `ExpertPruned`.

    Raises:
        SppError: a Hessian stays singular (names the saved tensor).
    """
    by_module: dict[str, dict[str, Any]] = {}
    for name, weight in weights.items():
        by_module.setdefault(name.rsplit(".", 1)[0], {})[weight.attr] = (name, weight)
    done: dict[str, ExpertPruned] = {}
    for module_name, params in by_module.items():
        for name, weight in params.values():
            done[name] = ExpertPruned(keep=torch.ones(weight.weight.shape, dtype=torch.bool),
                                      stats={"pieces": []})
        experts = next(iter(params.values()))[1].module
        apply_gate = expert_gate_fn(experts) or default_apply_gate(experts.act_fn)
        chunks = None if routes is None else routes[module_name]
        for expert in range(next(iter(params.values()))[1].weight.shape[0]):
            # selected where the routes are kept (--offload-activations: the CPU), so only X_e moves to the device
            X = None if chunks is None else [x.to(device) for h, i in chunks if (x := routed_inputs(h, i, expert)).shape[0]]
            tokens = None if X is None else sum(x.shape[0] for x in X)
            inputs = {GATE_UP: X}
            if DOWN in params and X is not None:  # from the unpruned gate/up rows: computed before they are pruned
                gate_up = getattr(experts, GATE_UP)[expert].detach()
                inputs[DOWN] = [expert_down_inputs(x, gate_up, apply_gate) for x in X]
            for param in (GATE_UP, DOWN):
                if param in params:
                    name, weight = params[param]
                    _prune_one_expert(done[name], weight, expert, inputs.get(param), tokens, method, fallback, cfg,
                                      sparsity[name], pieces[name])
            del X, inputs  # one expert's inputs and statistics at a time
    for pruned in done.values():
        pruned.stats = {**tally(pruned.stats["pieces"]), "pieces": pruned.stats["pieces"]}
    return done


def _prune_one_expert(done: ExpertPruned, weight, expert: int, X: list[torch.Tensor] | None, tokens: int | None,
                      method, fallback, cfg, sparsity: float, pieces: list) -> None:
    """Statistics of expert `expert` from its inputs X (chunks of (T_e, in)), then each of its saved pieces pruned."""
    starved = tokens is not None and tokens < cfg.expert_min_tokens
    used = fallback if starved or method.accumulate is None else method
    state = None
    if used.accumulate is not None:
        for x in X:
            state = used.accumulate(state, x)
    W_all = weight.weight
    for piece in (p for p in pieces if p.expert == expert):
        W = W_all[expert, piece.rows[0]:piece.rows[1]]  # (rows, in) view of the saved tensor's values
        keep, info = used.prune_in_place(W, state, cfg, sparsity, piece.saved)
        done.keep[expert, piece.rows[0]:piece.rows[1]] = keep.cpu()
        done.retries.extend({"piece": piece.saved, **r} for r in dampening_retry(info, cfg.percdamp))
        done.stats["pieces"].append({
            "expert": expert, "rows": list(piece.rows), **sparsity_stats(W.detach().cpu(), keep.cpu()),
            "tokens": tokens, "method": "magnitude" if used is fallback else cfg.method, **info,
        })


# --------------------------------------------------------------------------- output records


def module_records(written, module_stats: dict[str, dict], requested: dict[str, float],
                   layouts: dict[str, str]) -> dict[str, dict]:
    """The manifest's `modules`: saved tensor name -> requested and achieved sparsity, counts and layout; a fused
    expert weight (its stats carry `pieces`) gives one entry per saved tensor, with its routed tokens and method."""
    out = {}
    for param, s in module_stats.items():
        if "pieces" in s:
            out.update(expert_records(written, param, s, requested[param]))
        else:
            out[written.saved_name(param)] = {"requested": requested[param], "achieved": s["sparsity"],
                                              "numel": s["numel"], "pruned": s["pruned"], "kept_zero": s["kept_zero"],
                                              "layout": layouts[param], **layer_record(s)}
    return out


RECORD_KEYS = ("reconstruction_error", "alps", "refine")  # a method's per-layer record (spp.prune.Method)


def layer_record(stats: dict) -> dict:
    """The manifest's per-layer record of how it was pruned, where the method gave one: `reconstruction_error`
    (relative, tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)), ALPS's `alps` (ADMM iterations, final ρ, PCG iterations) and `refine`
    (DSnoT's swaps and its error reduction)."""
    return {key: stats[key] for key in RECORD_KEYS if key in stats}


def expert_records(written, param: str, stats: dict, requested: float) -> dict[str, dict]:
    """The manifest's `modules` entries of a pruned fused expert weight: one per saved tensor of the output.

    Args:
        written: the output's `spp.io.reader.Checkpoint` (its `pieces` name the tensors as just saved).
        param: the fused parameter (`model.layers.0.mlp.experts.gate_up_proj`).
        stats: its `ExpertPruned.stats`; requested: its requested sparsity.

    Raises:
        SppError: the saved model has no tensor for a pruned piece (the input and output name mappings differ).
    """
    saved = {(p.expert, tuple(p.rows)): p.saved for p in written.pieces.get(param, [])}
    out = {}
    for piece in stats["pieces"]:
        key = (piece["expert"], tuple(piece["rows"]))
        if key not in saved:
            raise SppError(f"{param}: {written.directory} saved no tensor for expert {key[0]}, rows {key[1]}")
        out[saved[key]] = {"requested": requested, "achieved": piece["sparsity"], "numel": piece["numel"],
                           "pruned": piece["pruned"], "kept_zero": piece["kept_zero"], "layout": "linear",
                           "tokens": piece["tokens"], "method": piece["method"], **layer_record(piece)}
    return out


