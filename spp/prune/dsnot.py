"""DSnoT: training-free refinement of a keep-mask by swapping one pruned and one kept weight per row (pure functions).

Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (ICLR 2024), §3, with the
defaults and tie rules of the authors' code (github.com/zyxxmu/DSnoT). With μ_j = E[x_j] and σ²_j = Var[x_j] over
the calibration tokens, and Ŵ = W ⊙ keep, the expected reconstruction error of output row i is

    ε_i = Σ_j (W_ij − Ŵ_ij) μ_j = Σ_{j pruned} c_ij,    c_ij = W_ij μ_j.

Each cycle, for every row still active, one pruned weight j is regrown and one kept weight k is pruned:

- grow: among the initially pruned j with sign(c_ij) = sign(ε_i) (regrowing moves ε toward 0), in order of
  |c_ij| / σ²_j (large expected effect, stable input), each candidate tried once;
- prune (per row): among the initially kept k with sign(c_ik) = −sign(ε_i), in ascending Wanda score
  |W_ik|·‖X_k‖₂, each tried once;
- prune (in groups of width g: N:M with g = M, or SparseGPT's column blocks): the kept, initially kept k of lowest
  Wanda score in j's group, so every group keeps its count; the swap must keep sign(ε_i) as it was at the start
  (the authors' rule) and, a departure from their code, must lower |ε_i|: their rule alone accepts a k whose c_ik
  outweighs c_ij, and on stories260K's q_proj at 2:4 that tripled mean |ε| and the squared error rose 8×.

A row stops for good once |ε_i| ≤ `threshold`, its candidates run out, or (groups) a swap would flip the sign of
ε_i; all stop after `max_cycles`. Every swap is inside one row (and one group), so the count of kept weights in
every row, every group of g, every column block of g and the layer is exactly unchanged.

A regrown weight takes its dense value W_ij (mask-only methods). After SparseGPT or ALPS, whose kept weights were
fitted to the old mask, refit them on the new one with `spp.prune.reconstruction.resolve_on_support`.

Guard (a departure from the paper, off by default): ε is the *expected* error, so a swap can raise the squared
error tr(ΔW H ΔWᵀ), ΔW = W − Ŵ. With `guard`, a swap is skipped (the row goes on) unless its change in that error,
for row i with g = ΔW_i H,

    W_ij² H_jj + W_ik² H_kk − 2 W_ij g_j + 2 W_ik g_k − 2 W_ij W_ik H_jk  ≤ 0,

exact for a full H; with only diag H (a 1-D `H`, or none: 2‖X_j‖²/T) it is W_ik² H_kk ≤ W_ij² H_jj, i.e. the pruned
weight's squared Wanda score must not exceed the regrown one's. The mask-only error is then non-increasing per row.

Shapes: W, keep (out, in); x_sum, sq_norm (in,); H (in, in) or (in,).
"""

from __future__ import annotations

import torch

MAX_CYCLES = 50  # the paper's maximum number of cycles
# The authors' update threshold is 0.1 on their metric W_ij · Σ_t x_tj / (windows), the error summed over the
# tokens of one 2048-token calibration window; per token (ε_i here) that is 0.1 / 2048.
UPDATE_THRESHOLD = 0.1 / 2048


def accumulate_input_sums(state: tuple | None, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Add one batch to the running (Σ_t x_t, Σ_t x_t², T) per input channel, in float32.

    Args:
        state: the previous (x_sum (in,), sq_norm (in,), n_tokens), or None for the first batch.
        X: (..., in) layer inputs.
    """
    X = X.reshape(-1, X.shape[-1]).float()  # (tokens, in)
    batch = (X.sum(dim=0), (X * X).sum(dim=0), X.shape[0])
    if state is None:
        return batch
    return state[0] + batch[0], state[1] + batch[1], state[2] + batch[2]


class _Queue:
    """Per-row candidate lists in a fixed order (a stable sort of `key`), with one read pointer per row.

    A pointer moves at most once a cycle, so only the first `depth` (= max_cycles) places are ever read: a top-k
    finds them several times faster than sorting whole rows. Top-k leaves the order of equal keys open, so when a
    real key repeats among them or just past them, the rows are sorted in full (stable: lower column first).
    """

    def __init__(self, key: torch.Tensor, valid: torch.Tensor, descending: bool, depth: int):
        fill = float("-inf") if descending else float("inf")
        key = torch.where(valid, key, fill)
        self.count = valid.sum(dim=1)  # (out,)
        self.ptr = torch.zeros_like(self.count)
        if 0 < depth < key.shape[1]:
            top, self.order = key.topk(depth, dim=1, largest=descending)  # (out, depth), best first
            last = top[:, -1:]
            repeats = ((top[:, 1:] == top[:, :-1]) & (top[:, 1:] != fill)).any()
            cut = ((last != fill) & ((key == last).sum(1, keepdim=True) > (top == last).sum(1, keepdim=True))).any()
            if not (repeats or cut or top.isnan().any()):
                return
        self.order = torch.sort(key, dim=1, descending=descending, stable=True).indices

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column at each row's pointer (out,), whether that row still has a candidate (out,))."""
        at = self.ptr.clamp(max=self.order.shape[1] - 1)[:, None]
        return self.order.gather(1, at)[:, 0], self.ptr < self.count

    def advance(self, rows: torch.Tensor) -> None:
        self.ptr += rows.long()


def dsnot_refine(
    W: torch.Tensor,
    keep: torch.Tensor,
    x_sum: torch.Tensor,
    sq_norm: torch.Tensor,
    n_tokens: int,
    group: int | None = None,
    *,
    max_cycles: int = MAX_CYCLES,
    threshold: float = UPDATE_THRESHOLD,
    var_power: float = 1.0,
    guard: bool = False,
    H: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Refine a keep-mask by DSnoT's grow-and-prune cycles (see the module docstring).

    Args:
        W: (out, in) dense weight (before pruning); computed in float32 (float64 if W is).
        keep: (out, in) bool keep-mask from the base method.
        x_sum: (in,) Σ_t x_tj; sq_norm: (in,) Σ_t x_tj²; n_tokens: T (`accumulate_input_sums`).
        group: None to swap anywhere in a row (per-row or per-layer methods); M for N:M; SparseGPT's column block
            width b for its unstructured masks, so that each block keeps its count.
        max_cycles: the most grow-and-prune cycles (the paper's 50). More cycles fix more rows but cost time.
        threshold: rows with |ε_i| at or below this stop, in output units per token (the authors' 0.1 per 2048-token
            window, `UPDATE_THRESHOLD`).
        var_power: exponent of σ² in the grow order (the paper's 1; 0 orders by |c_ij| alone).
        guard: skip swaps that raise the row's squared reconstruction error (a departure from the paper).
        H: for the guard: (in, in) undamped 2XᵀX/T (exact), or (in,) its diagonal; None uses 2·sq_norm/T.

    Returns:
        (refined keep-mask (out, in) bool, info) with info `cycles`, `swaps` (accepted, over all rows),
        `rows_changed`, `expected_error_before` and `expected_error_after` (mean |ε_i|), and with the guard on a
        full H, `squared_error`: tr(ΔW H ΔWᵀ) of the mask-only weights before and after, from the guard's ΔW H.
    """
    dtype = torch.promote_types(W.dtype, torch.float32)
    W = W.detach().to(dtype)
    T = max(n_tokens, 1)
    mu, mean_sq = x_sum.to(dtype) / T, sq_norm.to(dtype) / T  # (in,)
    var = (mean_sq - mu * mu).clamp_min(torch.finfo(dtype).tiny)
    c = W * mu  # (out, in): expected contribution of each weight to its output
    wanda = W.abs() * mean_sq.sqrt()  # the order of sqrt(sq_norm) within a row
    pruned0, keep = ~keep, keep.clone()
    eps = torch.where(pruned0, c, 0.0).sum(dim=1)  # (out,)
    eps0 = eps.clone()
    rows = torch.arange(W.shape[0], device=W.device)
    ratio = c / var**var_power
    grow_pos = _Queue(ratio, pruned0 & (c > 0), descending=True, depth=max_cycles)
    grow_neg = _Queue(ratio, pruned0 & (c < 0), descending=False, depth=max_cycles)
    if group is None:
        prune_pos = _Queue(wanda, ~pruned0 & (c > 0), descending=False, depth=max_cycles)
        prune_neg = _Queue(wanda, ~pruned0 & (c < 0), descending=False, depth=max_cycles)
    else:
        offsets = torch.arange(group, device=W.device)
    if guard:
        if H is None:
            H = 2.0 * sq_norm.to(dtype) / T
        H = H.to(device=W.device, dtype=dtype)
        G = None
        if H.dim() == 2:
            delta = torch.where(pruned0, W, 0.0)  # (out, in): ΔW of the base mask
            G = delta @ H  # ΔW H, kept up to date
            squared_before = (G * delta).sum(dim=1).sum()
    active = torch.ones_like(eps, dtype=torch.bool)
    swaps = torch.zeros_like(eps, dtype=torch.long)
    cycles = 0
    while cycles < max_cycles and active.any():
        cycles += 1
        up = eps > 0
        j_pos, has_pos = grow_pos.head()
        j_neg, has_neg = grow_neg.head()
        j, has_j = torch.where(up, j_pos, j_neg), torch.where(up, has_pos, has_neg)
        active &= has_j & (eps.abs() > threshold)
        if group is None:
            k_pos, ok_pos = prune_pos.head()
            k_neg, ok_neg = prune_neg.head()
            k, has_k = torch.where(up, k_neg, k_pos), torch.where(up, ok_neg, ok_pos)
            active &= has_k
            prune_neg.advance(active & up)
            prune_pos.advance(active & ~up)
        else:
            cols = (j - j % group)[:, None] + offsets  # (out, g): the columns of j's group
            inside = cols < W.shape[1]
            cols = cols.clamp(max=W.shape[1] - 1)
            prunable = inside & keep.gather(1, cols) & ~pruned0.gather(1, cols)
            score = torch.where(prunable, wanda.gather(1, cols), float("inf"))
            k, has_k = cols.gather(1, score.argmin(dim=1, keepdim=True))[:, 0], prunable.any(dim=1)
        grow_pos.advance(active & up)
        grow_neg.advance(active & ~up)
        eps_after = eps + c[rows, k] - c[rows, j]
        accept = active & has_k
        if group is not None:  # the authors' N:M rule: a swap must not flip the sign of ε; ours: nor raise |ε|
            active &= ~has_k | (torch.sign(eps_after) == torch.sign(eps0))
            accept &= active & (eps_after.abs() < eps.abs())
        if guard:
            Wj, Wk = W[rows, j], W[rows, k]
            if G is None:
                rise = Wk**2 * H[k] - Wj**2 * H[j]
            else:
                rise = (Wj**2 * H[j, j] + Wk**2 * H[k, k] - 2 * Wj * G[rows, j] + 2 * Wk * G[rows, k]
                        - 2 * Wj * Wk * H[j, k])
            accept &= rise <= 0
            if G is not None:  # only the accepted rows change: a fraction of them after the first cycles
                at = accept.nonzero()[:, 0]
                G[at] += Wk[at, None] * H[k[at]] - Wj[at, None] * H[j[at]]
        keep[rows[accept], j[accept]] = True
        keep[rows[accept], k[accept]] = False
        eps = torch.where(accept, eps_after, eps)
        swaps += accept.long()
    info = {
        "cycles": cycles,
        "swaps": int(swaps.sum()),
        "rows_changed": int((swaps > 0).sum()),
        "expected_error_before": float(eps0.abs().mean()),
        "expected_error_after": float(eps.abs().mean()),
    }
    if guard and G is not None:
        info["squared_error"] = (float(squared_before), float((G * torch.where(keep, 0.0, W)).sum(dim=1).sum()))
    return keep, info
