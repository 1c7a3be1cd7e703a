"""RIA's channel permutation for N:M, applied only where it folds exactly into the weights around the layer.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models" (ICLR 2024),
§3.3: the groups of M are runs of consecutive inputs, so heavy input channels that happen to sit in one group
compete for its N places. Reordering the inputs by a permutation P before forming the groups spreads them out.
A layer y = W x equals y = W[:, P] x[P]; the saved checkpoint stays a plain one only if x[P] is what the layer
actually receives, i.e. if P is folded into the producer of x. Then the saved weight *is* W[:, P] with its mask
chosen in that order, so the mask is N:M in the saved layout (`spp verify`), and the block's function before
pruning is unchanged (the next block's calibration inputs too).

What folds, in a LLaMA-style block (`mlp.{gate,up,down}_proj`, `self_attn.{v,o}_proj`, nn.Linear):
- `down_proj`'s input is act(gate_proj x) ⊙ up_proj x, elementwise per channel: permuting the rows (and biases)
  of gate_proj and up_proj by P permutes it by P. Any permutation of the intermediate channels folds.
- `o_proj`'s input is, per query head h, A_h V_g(h) with V_g = x W_vgᵀ the head_dim value rows of kv head g and
  g(h) = h // (heads per kv head) (transformers' repeat_kv). A_h mixes tokens, never value dims, and RoPE and
  q/k norms touch q and k only; so permuting kv head g's rows of v_proj by π_g permutes the slice of o_proj's
  input of *every* query head reading g by the same π_g. The legal P are block-diagonal over heads: within
  head_dim only, one π_g per kv head shared by its query heads (one per head without GQA). π_g is chosen on
  o_proj's scores of those heads' slices stacked, (rows · heads per kv head, head_dim); head_dim must be a
  multiple of M so that no group straddles two heads.
- q/k/v/gate/up read the residual stream (through a per-channel norm shared by the layers that read it):
  permuting it means permuting the embeddings, every block's residual writes and norms and the head, one P for
  the whole model, not per layer; not done here. Nor are fused gate_up_proj, Conv1D layers and expert weights.

So P reaches o_proj and down_proj only: h² + h·i of a LLaMA block's 4·h² + 3·h·i weights without GQA (31% on
LLaMA-7B), 33% on stories260K (GQA).

Shapes: S (out, in) scores, higher kept first; P (in,) long with permuted input j = original input P[j].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spp.models import Target
from spp.prune.ria import ria_scores
from spp.prune.wanda import wanda_scores

SCORES = {"ria": ria_scores, "wanda": wanda_scores}  # (W, sq_norm) -> S: the methods whose scores choose P


def kept_score(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Σ over rows and groups of M consecutive inputs of the N largest scores: what an N:M mask keeps (float64)."""
    out_features, in_features = S.shape
    return S.double().reshape(out_features, in_features // m, m).topk(n, dim=-1).values.sum()


def channel_permutation(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """RIA's channel permutation (§3.3): the heuristic allocation, then one round of linear sum assignment; kept only
    where it raises the N:M kept score.

    Heuristic channel allocation: channel importance c_j = Σ_i S_ij; sorted ascending, the channels split into M
    runs of in/M (importance quantiles); run k fills position k of the in/M groups, in order for even k and
    reversed for odd k (the reference code's snake), so every group holds one channel of each quantile. Then
    `assignment_refinement` reassigns each position's channels to groups optimally, as the paper's LSA step.

    Args:
        S: (out, in) scores with in divisible by M.
        n, m: the N:M pattern.

    Returns:
        P (in,) long. The identity when the result keeps no more score than the original order (a departure: the
        reference code applies it unconditionally).
    """
    in_features = S.shape[1]
    S = S.double()
    order = torch.sort(S.sum(dim=0), stable=True).indices.cpu()  # ascending importance
    runs = order.reshape(m, in_features // m).clone()  # (M, in/M): run k = the k-th quantile
    runs[1::2] = runs[1::2].flip(-1)
    P = assignment_refinement(S, runs.t().reshape(-1), n, m)  # heuristic: group g, position k <- runs[k, g]
    identity = torch.arange(in_features)
    return P if kept_score(S[:, P.to(S.device)], n, m) > kept_score(S, n, m) else identity


def assignment_refinement(S: torch.Tensor, P: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The paper's linear sum assignment, one round over the M positions of the groups: with the other M − 1
    channels of every group fixed, the in/M channels at position k are reassigned to the in/M groups so that the
    kept score is maximal (exactly, by scipy's `linear_sum_assignment`). Adding a score x to a set T of M − 1
    scores raises its top-N sum by max(0, x − t_N), t_N the N-th largest of T, so channel i in group g is worth
    V_ig = Σ_rows max(0, S_ri − t_N(row, g)). Never lowers the kept score (the current assignment is feasible).

    Cost per position: V is (in/M)² · out operations, then an (in/M)² assignment.

    Args:
        S: (out, in) scores, float64.
        P: (in,) the starting permutation.

    Returns:
        The refined P (in,) long.
    """
    from scipy.optimize import linear_sum_assignment  # scipy comes with lm-eval (scikit-learn)

    G = P.numel() // m
    for k in range(m):
        groups = P.reshape(G, m).clone()  # (G, M) channel at position k of group g
        others = S[:, torch.cat([groups[:, :k], groups[:, k + 1:]], dim=1).to(S.device)]  # (out, G, M - 1)
        t_n = others.topk(n, dim=-1).values[..., -1]  # (out, G): the N-th largest of each group's others
        X = S[:, groups[:, k].to(S.device)]  # (out, G): the candidates
        V = torch.stack([(x[:, None] - t_n).clamp_min(0).sum(dim=0) for x in X.t()])  # (candidate, group)
        rows, cols = linear_sum_assignment(V.cpu().numpy(), maximize=True)
        candidates = groups[:, k].clone()
        groups[torch.from_numpy(cols), k] = candidates[torch.from_numpy(rows)]
        P = groups.reshape(-1)
    return P


def head_permutation(S: torch.Tensor, n: int, m: int, head_dim: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The legal P of o_proj's inputs (see the module docstring) and the matching permutation of v_proj's rows.

    Args:
        S: (out, heads · head_dim) scores of o_proj.
        head_dim: dims per head, a multiple of M.
        groups: query heads per kv head (1 without GQA).

    Returns:
        (P (heads · head_dim,) for o_proj's columns, R (kv heads · head_dim,) for v_proj's rows).
    """
    out_features, in_features = S.shape
    heads = in_features // head_dim
    kv_heads = heads // groups
    # per kv head, its query heads' slices stacked: (kv, groups · out, head_dim)
    stacked = S.reshape(out_features, kv_heads, groups, head_dim).permute(1, 2, 0, 3).reshape(kv_heads, -1, head_dim)
    pi = torch.stack([channel_permutation(s, n, m) for s in stacked]).cpu()  # (kv, head_dim)
    R = (pi + head_dim * torch.arange(kv_heads)[:, None]).reshape(-1)
    P = (pi.repeat_interleave(groups, dim=0) + head_dim * torch.arange(heads)[:, None]).reshape(-1)
    return P, R


@dataclass(frozen=True)
class Fold:
    """A legal pair: the consumer whose inputs are permuted and the producers whose rows carry the permutation
    (block-relative names); `head_dim` set means permutations within heads only, shared by `groups` query heads."""

    consumer: str
    producers: tuple[str, ...]
    head_dim: int | None = None
    groups: int = 1


_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}


def legal_folds(block: nn.Module) -> list[Fold]:
    """The LLaMA-style MLPs (children exactly gate_proj, up_proj, down_proj, act_fn) and attentions (children
    among q/k/v/o_proj and q/k_norm, with `head_dim` and `num_key_value_groups`) of `block`; anything else, e.g.
    a value norm or a fused gate_up_proj, is left alone."""
    folds = []
    for name, module in block.named_modules():
        children = dict(module.named_children())
        prefix = f"{name}." if name else ""
        linear = all(isinstance(c, nn.Linear) for key, c in children.items() if key.endswith("_proj"))
        if set(children) == {"gate_proj", "up_proj", "down_proj", "act_fn"} and linear:
            folds.append(Fold(f"{prefix}down_proj", (f"{prefix}gate_proj", f"{prefix}up_proj")))
        elif {"v_proj", "o_proj"} <= set(children) <= _ATTENTION and linear:
            head_dim, groups = getattr(module, "head_dim", None), getattr(module, "num_key_value_groups", None)
            if isinstance(head_dim, int) and isinstance(groups, int) and \
                    children["v_proj"].out_features * groups == children["o_proj"].in_features:
                folds.append(Fold(f"{prefix}o_proj", (f"{prefix}v_proj",), head_dim, groups))
    return folds


def fold_permutation(consumer: nn.Linear, producers: list[nn.Linear], P: torch.Tensor, R: torch.Tensor) -> None:
    """In place: consumer.weight ← consumer.weight[:, P]; each producer's weight ← weight[R] and bias ← bias[R].

    Exact (a gather, no arithmetic) in every dtype; the composition computes the same function when R permutes
    the producers' outputs into the order P gives the consumer's inputs (`legal_folds`).
    """
    with torch.no_grad():
        consumer.weight.copy_(consumer.weight[:, P.to(consumer.weight.device)])
        for producer in producers:
            rows = R.to(producer.weight.device)
            producer.weight.copy_(producer.weight[rows])
            if producer.bias is not None:
                producer.bias.copy_(producer.bias[rows])


def permute_block(block: nn.Module, targets: dict[str, Target], stats: dict, method: str, n_m: tuple[int, int],
                  sq_norm=lambda state: state) -> dict[str, torch.Tensor]:
    """Choose and fold P for each legal consumer among `targets` (the chosen weights, block-relative names), before
    any of the block's weights is pruned; `stats[consumer]` is replaced by its statistics with the input channels
    permuted to match (`permute_inputs`).

    Args:
        sq_norm: a layer's (in,) Σ_t X_tj² from its `stats` entry (by default the entry itself).

    Returns:
        consumer's full name -> its P, for the consumers whose P is not the identity.
    """
    n, m = n_m
    modules = dict(block.named_modules())
    done = {}
    for fold in legal_folds(block):
        if fold.consumer not in targets or fold.consumer not in stats or (fold.head_dim or m) % m:
            continue
        consumer = modules[fold.consumer]
        S = SCORES[method](consumer.weight, sq_norm(stats[fold.consumer]))
        if fold.head_dim is None:
            P = R = channel_permutation(S, n, m)
        else:
            P, R = head_permutation(S, n, m, fold.head_dim, fold.groups)
        if torch.equal(P, torch.arange(P.numel())):
            continue
        fold_permutation(consumer, [modules[p] for p in fold.producers], P, R)
        stats[fold.consumer] = permute_inputs(stats[fold.consumer], P)
        done[targets[fold.consumer].name] = P
    return done


def permute_inputs(state, P: torch.Tensor):
    """A layer's input statistics with its input channels in the order P (in,): each (in,) vector v[P], each
    (in, in) matrix H[P][:, P], tuples and dicts item by item, anything else (a token count) as it is."""
    if isinstance(state, torch.Tensor):
        P = P.to(state.device)
        return state[P][:, P] if state.dim() == 2 else state[P]
    if isinstance(state, dict):
        return {key: permute_inputs(value, P) for key, value in state.items()}
    if isinstance(state, tuple):
        return tuple(permute_inputs(value, P) for value in state)
    return state
