"""MoE adapter benchmark: forward + backward of one fused experts module, frozen vs. adapted by `spp`.

One transformers experts module (Mixtral's or Qwen3-MoE's `*Experts`, the `grouped_mm` kernel by default,
float32, random weights 2:4 magnitude-pruned), a few hundred tokens routed top-k by random router logits.
Each step is `(experts(x, top_k_index, top_k_weights) * probe).sum().backward()` with x requiring grad (as
in a model, where earlier layers train). Variants, timed side by side in one process, the order rotated
every round, median over rounds after warm-up:

  frozen    the experts module itself (x gets a gradient, the weights none)
  loop      `AdaptedExperts` kind `spp` as shipped: `ExpertsWeightFunction` builds W_eff and dα, dβ
            expert by expert, calling the 2-D entry points (`spp.adapter.layer`) in a Python loop
  batched   a candidate written here, not shipped (`BatchedSppWeight`): the same elementwise ops and
            row-group `bmm` reductions with a leading expert axis, on chunks of `CHUNK_ENTRIES` = 2^22
            weight entries, G not copied. W_eff is bitwise the loop's; dα, dβ too, except dβ of a run of
            a single row group (torch's CPU `bmm` of batch 1 sums in another order). Checked each run.
  batched 2^k   the candidate with chunks of 2^k entries (`--chunk-powers`)

Shapes (scaled down for a CPU so the experts, not the routing, dominate):
  mixtral   E=8,   H=1024, I=3584, top-2   (Mixtral-8x7B's I/H ratio of 3.5, H / 4)
  qwen3     E=128, H=512,  I=192,  top-8   (Qwen3-MoE-30B-A3B's E, I/H and top-k, H / 4)

"ms/step" is the median wall time, "best ms" the fastest step (on a shared machine the least disturbed),
"CPU ms/step" the median of the process's CPU time over all threads.
"saved MiB" is what autograd keeps for backward beyond the parameters (a saved-tensors hook sums the
distinct storages that are not a parameter's): the adapter's excess over `frozen` is W_eff, which the
experts kernel keeps, E·out·in elements of the base dtype per adapted weight (3·E·H·I for gate_up and
down), the same for every spp variant. Transient on top of that: one expert's float32 temporaries at a
time in the loop, one chunk's (at most 2^22 entries, 16 MiB each) in the candidate. Never run by tests.

    python scripts/bench_moe_adapter.py                     # both shapes, 2 threads
    python scripts/bench_moe_adapter.py --shapes qwen3 --threads 1 --rounds 9 --chunk-powers 18,24
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=8, hidden_size=1024, intermediate_size=3584,
                    num_experts_per_tok=2),
    "qwen3": dict(model_type="qwen3_moe", num_experts=128, hidden_size=512, moe_intermediate_size=192,
                  num_experts_per_tok=8),
}


def experts_module(shape: str, kernel: str, dtype: torch.dtype, seed: int = 0):
    """A random experts module of `SHAPES[shape]` with its fused weights 2:4 magnitude-pruned (+0.0)."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from spp.prune.masks import apply_mask, nm_mask

    kwargs = dict(SHAPES[shape])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._experts_implementation = kernel
    torch.manual_seed(seed)
    module = (MixtralExperts if shape == "mixtral" else Qwen3MoeExperts)(config)
    with torch.no_grad():
        for W in (module.gate_up_proj, module.down_proj):  # (E, out, in)
            W.normal_(0, 0.02)
            keep = nm_mask(W.abs().reshape(-1, W.shape[-1]), 2, 4).reshape(W.shape)
            W.copy_(apply_mask(W, keep))
    return module.to(dtype).requires_grad_(False), config


def routed_inputs(config, tokens: int, dtype: torch.dtype, seed: int = 1):
    """x (T, H) requiring grad, top-k expert indices and weights from random router logits, and a probe (T, H)."""
    gen = torch.Generator().manual_seed(seed)
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    x = torch.randn(tokens, config.hidden_size, generator=gen).to(dtype).requires_grad_(True)
    top_w, top_k = torch.randn(tokens, n_experts, generator=gen).softmax(-1).topk(config.num_experts_per_tok, -1)
    probe = torch.randn(tokens, config.hidden_size, generator=gen).to(dtype)
    return x, top_k, (top_w / top_w.sum(-1, keepdim=True)).to(dtype), probe


def adapted(module, row_groups: int):
    """`AdaptedExperts` of kind spp on both fused weights, β moved off zero (so nothing is trivially zero)."""
    from spp.adapter.config import AdapterConfig
    from spp.adapter.experts import AdaptedExperts

    cfg = AdapterConfig(kind="spp", spp_row_groups=row_groups)
    torch.manual_seed(2)
    experts = AdaptedExperts(module, ["gate_up_proj", "down_proj"], cfg, {})
    with torch.no_grad():
        for p in experts.params:
            experts.adapted[p]["spp_beta"].normal_(0, 0.1)
    return experts


def step(module, inputs) -> tuple[float, float]:
    """One forward + backward; returns its wall time and the process's CPU time (all threads) in seconds."""
    x, top_k, top_w, probe = inputs
    for t in (x, *module.parameters()):
        t.grad = None
    start, start_cpu = time.perf_counter(), time.process_time()
    (module(x, top_k, top_w) * probe).sum().backward()
    return time.perf_counter() - start, time.process_time() - start_cpu


def saved_bytes(module, inputs) -> int:
    """Bytes autograd saves for backward in one forward, distinct storages, parameters' storages excluded."""
    x, top_k, top_w, probe = inputs
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x, top_k, top_w)
    del y
    return sum(storages.values())


CHUNK_ENTRIES = 2**22  # weight entries per chunk of the candidate (at least one expert)


def batched_effective_weight(W, alpha, beta, scale):
    """`spp.adapter.layer.effective_weight` with a leading expert axis: W (E, out, in), α (E, r, in), β (E, out)."""
    from spp.adapter.common import compute_dtype
    from spp.adapter.layer import row_blocks

    E, out_features, in_features = W.shape
    dtype = compute_dtype(W, alpha)
    alpha32, beta32 = alpha.to(dtype), beta.to(dtype) * scale
    W_eff = torch.empty_like(W, dtype=dtype)
    for row0, group0, n_groups, rows in row_blocks(out_features, alpha.shape[-2]):
        rows_end = row0 + n_groups * rows
        w = W[:, row0:rows_end].view(E, n_groups, rows, in_features)  # (E, g, p, in)
        e = W_eff[:, row0:rows_end].view(E, n_groups, rows, in_features)  # (E, g, p, in)
        torch.mul(w, beta32[:, row0:rows_end].view(E, n_groups, rows, 1), out=e)  # s·β ⊙ W
        torch.addcmul(w, e, alpha32[:, group0:group0 + n_groups, None, :], out=e)  # W + (s·β ⊙ W) ⊙ Â
    return W_eff.to(W.dtype)


def batched_gradients(G, W, alpha, beta, scale):
    """`spp.adapter.layer.gradients` with a leading expert axis: (dα (E, r, in), dβ (E, out)) from G (E, out, in)."""
    from spp.adapter.common import compute_dtype
    from spp.adapter.layer import row_blocks

    G = G.to(compute_dtype(G, alpha)) * W  # G ⊙ W, (E, out, in)
    E, out_features, in_features = G.shape
    d_alpha, d_beta = torch.zeros_like(alpha, dtype=G.dtype), torch.zeros_like(beta, dtype=G.dtype)
    a, b = alpha.to(G.dtype), beta.to(G.dtype)
    for row0, group0, n_groups, rows in row_blocks(out_features, alpha.shape[-2]):
        rows_end, groups_end = row0 + n_groups * rows, group0 + n_groups
        g = G[:, row0:rows_end].reshape(-1, rows, in_features)  # (E·g, p, in)
        b_run = b[:, row0:rows_end].reshape(-1, 1, rows)  # (E·g, 1, p)
        a_run = a[:, group0:groups_end].reshape(-1, in_features, 1)  # (E·g, in, 1)
        d_alpha[:, group0:groups_end] = torch.bmm(b_run, g).view(E, n_groups, in_features)
        d_beta[:, row0:rows_end] = torch.bmm(g, a_run).view(E, n_groups * rows)
    return (d_alpha * scale).to(alpha.dtype), (d_beta * scale).to(beta.dtype)


class BatchedSppWeight(torch.autograd.Function):
    """The candidate: W_eff (E, out, in) of kind spp by chunks of experts; backward dα, dβ by chunks."""

    @staticmethod
    def forward(ctx, W, alpha, beta, scale):
        ctx.scale = scale
        ctx.save_for_backward(W, alpha, beta)
        W_eff = torch.empty_like(W)
        for i in expert_chunks(W.shape):
            W_eff[i] = batched_effective_weight(W[i], alpha[i], beta[i], scale)
        return W_eff

    @staticmethod
    def backward(ctx, G):
        W, alpha, beta = ctx.saved_tensors
        d_alpha, d_beta = torch.empty_like(alpha), torch.empty_like(beta)
        for i in expert_chunks(W.shape):
            d_alpha[i], d_beta[i] = batched_gradients(G[i], W[i], alpha[i], beta[i], ctx.scale)  # G only read
        return None, d_alpha, d_beta, None


def expert_chunks(shape) -> list[slice]:
    """Slices of as many experts of W (E, out, in) as fit `CHUNK_ENTRIES` weight entries (at least one)."""
    n_experts, out_features, in_features = shape
    step = max(1, CHUNK_ENTRIES // (out_features * in_features))
    return [slice(e, min(e + step, n_experts)) for e in range(0, n_experts, step)]


class BatchedSppExperts(torch.nn.Module):
    """The adapted experts of `adapted()` (same base, same α, β) run through the candidate."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, *args):
        experts = self.experts
        weights = {p: BatchedSppWeight.apply(getattr(experts.base_layer, p), experts.adapted[p]["spp_alpha"],
                                             experts.adapted[p]["spp_beta"], experts.scale) for p in experts.params}
        return torch.func.functional_call(experts.base_layer, weights, args)


def check_candidate(loop, candidate, inputs) -> str:
    """Loop vs candidate on W_eff (bitwise) and dα, dβ (bitwise or max relative difference), as a note."""
    x, top_k, top_w, probe = inputs
    notes = []
    for p in loop.params:
        W, (alpha, beta) = getattr(loop.base_layer, p), loop.adapted[p].values()
        with torch.no_grad():
            W_loop, W_cand = loop.effective_weight(p), BatchedSppWeight.apply(W, alpha, beta, loop.scale)
        bits = {2: torch.int16, 4: torch.int32}[W_loop.element_size()]  # compare bits: -0.0 != +0.0
        if not torch.equal(W_loop.view(bits), W_cand.view(bits)):
            raise AssertionError(f"{p}: the candidate's W_eff differs from the loop's")
    grads = []
    for module in (loop, candidate):
        step(module, inputs)
        grads.append([t.grad.clone() for t in loop.parameters() if t.requires_grad])
    for got, expected in zip(*grads):
        if not torch.equal(got, expected):
            notes.append(f"{float((got - expected).abs().max() / expected.abs().max()):.1e}")
    return "W_eff bitwise; gradients " + (f"max rel. diff {', '.join(notes)}" if notes else "bitwise")


def run_variant(name: str, modules: dict, inputs) -> tuple[float, float]:
    """One step of a variant (`batched 2^k` with `CHUNK_ENTRIES` = 2^k for the step)."""
    global CHUNK_ENTRIES

    shipped = CHUNK_ENTRIES
    if name.startswith("batched 2^"):
        CHUNK_ENTRIES = 2 ** int(name.removeprefix("batched 2^"))
    try:
        return step(modules[name.split()[0]], inputs)
    finally:
        CHUNK_ENTRIES = shipped


def bench_shape(shape: str, args) -> tuple[list[dict], str]:
    """Every variant of one shape, rounds rotated: median and best wall time, median CPU time, saved bytes;
    and the candidate's agreement with the loop."""
    dtype = getattr(torch, args.dtype)
    base, config = experts_module(shape, args.kernel, dtype)
    inputs = routed_inputs(config, args.tokens, dtype)
    loop = adapted(base, args.row_groups)
    modules = {"frozen": base, "loop": loop, "batched": BatchedSppExperts(loop)}
    check = check_candidate(loop, modules["batched"], inputs)
    names = ["frozen", "loop", "batched"] + [f"batched 2^{k}" for k in args.chunk_powers.split(",") if k]
    for _ in range(args.warmup):
        for name in names:
            run_variant(name, modules, inputs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            times[name].append(run_variant(name, modules, inputs))
    saved = {name: saved_bytes(module, inputs) for name, module in modules.items()}
    return [dict(variant=name, ms=1e3 * statistics.median(t for t, _ in times[name]),
                 best_ms=1e3 * min(t for t, _ in times[name]),
                 cpu_ms=1e3 * statistics.median(c for _, c in times[name]), saved=saved[name.split()[0]])
            for name in names], check


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,qwen3", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--row-groups", type=int, default=16, help="spp_row_groups r")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant (order rotated each round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", default="grouped_mm", help="experts kernel: grouped_mm, batched_mm, eager")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-powers", default="", help="also time the candidate with chunks of 2^k entries, "
                                                            "e.g. 18,24")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, kernel {args.kernel}, "
          f"{args.tokens} tokens, r={args.row_groups}, {args.rounds} rounds after {args.warmup} warm-up; "
          f"batched = chunks of 2^{CHUNK_ENTRIES.bit_length() - 1} entries\n")
    print("| shape (E, H, I, top-k) | variant | ms/step | best ms | × frozen | loop / variant | overhead ms | "
          "CPU ms/step | loop / variant (CPU) | saved MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    checks = []
    for shape in args.shapes.split(","):
        results, check = bench_shape(shape, args)
        checks.append(f"{shape}: {check}")
        rows = {row["variant"]: row for row in results}
        cfg = SHAPES[shape]
        dims = (f"{shape} ({cfg.get('num_local_experts') or cfg['num_experts']}, {cfg['hidden_size']}, "
                f"{cfg.get('moe_intermediate_size') or cfg['intermediate_size']}, {cfg['num_experts_per_tok']})")
        frozen, loop = rows["frozen"], rows["loop"]
        for name, row in rows.items():
            overhead = "" if name == "frozen" else f"{row['ms'] - frozen['ms']:.0f}"
            print(f"| {dims} | {name} | {row['ms']:.0f} | {row['best_ms']:.0f} | {row['ms'] / frozen['ms']:.2f} | "
                  f"{loop['ms'] / row['ms']:.2f} | {overhead} | {row['cpu_ms']:.0f} | "
                  f"{loop['cpu_ms'] / row['cpu_ms']:.2f} | {row['saved'] / 2**20:.0f} |")

    print("\ncandidate vs loop: " + "; ".join(checks))


if __name__ == "__main__":
    main()
