"""MoE adapter benchmark: forward + backward of one fused experts module, frozen vs. adapted by `spp`.

One transformers experts module (Mixtral's or Qwen3-MoE's `*Experts`, the `grouped_mm` kernel by default,
float32, random weights 2:4 magnitude-pruned), a few hundred tokens routed top-k by random router logits.
Each step is `(experts(x, top_k_index, top_k_weights) * probe).sum().backward()` with x requiring grad (as
in a model, where earlier layers train). Variants, timed side by side in one process, the order rotated
every round, median over rounds after warm-up:

  frozen    the experts module itself (x gets a gradient, the weights none)
  adapted   the module adapted by spp (kind `spp`, both fused weights), as `spp train` adapts a MoE model

(A batched candidate for the adapted weight, measured against the expert-by-expert loop and not landed, is
described in docs/benchmarks.md; it is in git history.)

Shapes (scaled down for a CPU so the experts, not the routing, dominate):
  mixtral   E=8,   H=1024, I=3584, top-2   (Mixtral-8x7B's I/H ratio of 3.5, H / 4)
  qwen3     E=128, H=512,  I=192,  top-8   (Qwen3-MoE-30B-A3B's E, I/H and top-k, H / 4)

"ms/step" is the median wall time, "best ms" the fastest step (on a shared machine the least disturbed),
"CPU ms/step" the median of the process's CPU time over all threads.
"saved MiB" is what autograd keeps for backward beyond the parameters (a saved-tensors hook sums the
distinct storages that are not a parameter's): the adapter's excess over `frozen` is W_eff, which the
experts kernel keeps, E·out·in elements of the base dtype per adapted weight (3·E·H·I for gate_up and
down). Never run by tests.

    python scripts/bench_moe_adapter.py                     # both shapes, 2 threads
    python scripts/bench_moe_adapter.py --shapes qwen3 --threads 1 --rounds 9
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
    """The adapted experts module (`AdaptedWeight`) of kind spp on both fused weights, β moved off zero (so nothing
    is trivially zero)."""
    from spp.adapter.config import AdapterConfig
    from spp.adapter.weight import AdaptedWeight

    cfg = AdapterConfig(kind="spp", spp_row_groups=row_groups)
    torch.manual_seed(2)
    experts = AdaptedWeight(module, cfg, {}, ["gate_up_proj", "down_proj"])
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


def bench_shape(shape: str, args) -> list[dict]:
    """Both variants of one shape, rounds rotated: median and best wall time, median CPU time, saved bytes."""
    dtype = getattr(torch, args.dtype)
    base, config = experts_module(shape, args.kernel, dtype)
    inputs = routed_inputs(config, args.tokens, dtype)
    modules = {"frozen": base, "adapted": adapted(base, args.row_groups)}
    names = list(modules)
    for _ in range(args.warmup):
        for name in names:
            step(modules[name], inputs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % 2:] + names[:round_index % 2]:
            times[name].append(step(modules[name], inputs))
    return [dict(variant=name, ms=1e3 * statistics.median(t for t, _ in times[name]),
                 best_ms=1e3 * min(t for t, _ in times[name]),
                 cpu_ms=1e3 * statistics.median(c for _, c in times[name]), saved=saved_bytes(modules[name], inputs))
            for name in names]


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, kernel {args.kernel}, "
          f"{args.tokens} tokens, r={args.row_groups}, {args.rounds} rounds after {args.warmup} warm-up\n")
    print("| shape (E, H, I, top-k) | variant | ms/step | best ms | × frozen | overhead ms | CPU ms/step | saved MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        rows = {row["variant"]: row for row in bench_shape(shape, args)}
        cfg = SHAPES[shape]
        dims = (f"{shape} ({cfg.get('num_local_experts') or cfg['num_experts']}, {cfg['hidden_size']}, "
                f"{cfg.get('moe_intermediate_size') or cfg['intermediate_size']}, {cfg['num_experts_per_tok']})")
        frozen = rows["frozen"]
        for name, row in rows.items():
            overhead = "" if name == "frozen" else f"{row['ms'] - frozen['ms']:.0f}"
            print(f"| {dims} | {name} | {row['ms']:.0f} | {row['best_ms']:.0f} | {row['ms'] / frozen['ms']:.2f} | "
                  f"{overhead} | {row['cpu_ms']:.0f} | {row['saved'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
