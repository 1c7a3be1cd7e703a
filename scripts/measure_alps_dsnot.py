"""Layer-wise comparison of magnitude, Wanda, SparseGPT, ALPS and DSnoT on the same inputs (not a test; issue 25).

For a few linear layers of a real model (dense activations from C4 windows) and of synthetic correlated inputs, prints
the relative reconstruction error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of each method at 50/60/70% unstructured and 2:4, and the
CPU time of ALPS at several iteration caps (--iters) against SparseGPT, side by side in one process, per layer and
summed over the layers.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/measure_alps_dsnot.py --model ../shared/data/stories260K-hf
    # SmolLM2-135M's layers (the timing in docs/results/pruning_methods.md): 56 layers, every projection of 8 blocks
    python scripts/measure_alps_dsnot.py --model ../shared/data/smollm2-135m \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --blocks 0,4,8,12,16,20,24,29 \
        --names q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --windows 8 --seqlen 512 \
        --synthetic "" --iters 15,30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spp.prune.alps import alps_prune
from spp.prune.dsnot import accumulate_input_sums, dsnot_refine
from spp.prune.masks import select_mask
from spp.prune.reconstruction import reconstruction_error, resolve_on_support
from spp.prune.sparsegpt import accumulate_hessian, hessian_from_sum, sparsegpt_prune
from spp.prune.wanda import magnitude_scores, wanda_scores

CELLS = [(None, 0.5), (None, 0.6), (None, 0.7), ((2, 4), 0.5)]
ITERS = (15, 30, 300)  # ALPS's iteration caps timed against SparseGPT (--iters)


def real_layers(model_dir: str, gguf: str | None, blocks: list[int], windows: int, seqlen: int, names: list[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    lines = Path("../shared/data/c4/c4_sample.jsonl").open().readlines()[:400]
    text = "\n".join(json.loads(line)["text"] for line in lines)
    ids = tok(text, return_tensors="pt").input_ids[0][: windows * seqlen].reshape(windows, seqlen)
    H_sums, input_sums, weights, hooks = {}, {}, {}, []
    for b in blocks:
        for name, mod in model.model.layers[b].named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in names:
                key = f"{b}.{name}"
                weights[key] = mod.weight.detach().clone()

                def hook(module, inputs, output, key=key):
                    H_sums[key] = accumulate_hessian(H_sums.get(key), inputs[0])[0]
                    input_sums[key] = accumulate_input_sums(input_sums.get(key), inputs[0])

                hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for window in ids:
            model(window[None])
    for h in hooks:
        h.remove()
    out = []
    for key, W in weights.items():
        sums = input_sums[key]
        out.append((key, W, hessian_from_sum(H_sums[key], sums[2]), sums))
    return out


def synthetic_layers(seed: int, shapes: list[tuple[int, int]], tokens: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for o, i in shapes:
        mix = torch.eye(i) + 0.5 * torch.randn(i, i, generator=g) / i**0.5  # correlated channels
        X = torch.randn(tokens, i, generator=g) @ mix + 0.3 * torch.randn(i, generator=g)
        X[:, torch.randperm(i, generator=g)[:4]] *= 20.0  # a few heavy channels
        W = torch.randn(o, i, generator=g) / i**0.5
        H, n = accumulate_hessian(None, X)
        out.append((f"synthetic {o}x{i}", W, hessian_from_sum(H, n), accumulate_input_sums(None, X)))
    return out


def run_cell(W, H, sums, pattern, sparsity, iters=ITERS):
    row, t = {}, {}
    keep = select_mask(magnitude_scores(W), pattern, sparsity, per_row=False)
    row["magnitude"] = reconstruction_error(W, W * keep, H)
    t0 = time.perf_counter()
    keep_w = select_mask(wanda_scores(W, sums[1]), pattern, sparsity, per_row=True)
    t["wanda"] = time.perf_counter() - t0
    row["wanda"] = reconstruction_error(W, W * keep_w, H)
    t0 = time.process_time()
    W_s, keep_s, _ = sparsegpt_prune(W, H, pattern, sparsity)
    t["sparsegpt"] = time.process_time() - t0
    row["sparsegpt"] = reconstruction_error(W, W_s, H)
    for n in iters:
        label = f"alps/{n}"
        t0 = time.process_time()
        W_a, keep_a, info = alps_prune(W, H, pattern, sparsity, max_iter=n)
        t[label] = time.process_time() - t0
        row[label] = reconstruction_error(W, W_a, H)
        row[label + " iters"] = info["admm_iterations"]
    group = pattern[1] if pattern else None
    for guard in (False, True):
        t0 = time.perf_counter()
        keep_d, info = dsnot_refine(W, keep_w, *sums, group, guard=guard, H=H)
        t["wanda+dsnot" + ("/g" if guard else "")] = time.perf_counter() - t0
        row["wanda+dsnot" + ("/g" if guard else "")] = reconstruction_error(W, W * keep_d, H)
    # SparseGPT + DSnoT: refine SparseGPT's mask on the dense weights, then refit the kept weights on the new mask
    H_d = H.clone()
    H_d.diagonal().add_(0.01 * torch.diagonal(H).mean())
    keep_sd, _ = dsnot_refine(W, keep_s, *sums, group or 128, guard=True, H=H)
    W_sd, _ = resolve_on_support(W, H_d, keep_sd, W0=torch.where(keep_s, W_s, W), steps=10)
    row["sparsegpt+dsnot/g+refit"] = reconstruction_error(W, W_sd, H)
    W_refit, _ = resolve_on_support(W, H_d, keep_s, W0=W_s, steps=10)
    row["sparsegpt+refit"] = reconstruction_error(W, W_refit, H)
    return row, t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/data/stories260K-hf")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--blocks", default="0,2")
    ap.add_argument("--names", default="q_proj,o_proj,up_proj,down_proj")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--synthetic", default="256x512,512x256")
    ap.add_argument("--iters", default=",".join(map(str, ITERS)), help="ALPS iteration caps to time")
    ap.add_argument("--patterns", default="0.5,0.6,0.7,2:4", help="sparsities and N:M patterns, in CELLS")
    args = ap.parse_args()
    layers = []
    if args.model:
        layers += real_layers(args.model, args.gguf, [int(b) for b in args.blocks.split(",")], args.windows,
                              args.seqlen, args.names.split(","))
    if args.synthetic:
        layers += synthetic_layers(0, [tuple(int(v) for v in s.split("x")) for s in args.synthetic.split(",")], 4096)
    for pattern, sparsity in CELLS:
        cell = "2:4" if pattern else f"{int(sparsity * 100)}%"
        if ("2:4" if pattern else f"{sparsity:g}") not in args.patterns.split(","):
            continue
        print(f"\n## {cell}")
        totals: dict[str, float] = {}
        at_most: dict[str, int] = {}  # layers where a method's error is at most SparseGPT's
        for key, W, H, sums in layers:
            row, t = run_cell(W, H, sums, pattern, sparsity, [int(n) for n in args.iters.split(",")])
            for k, v in t.items():
                totals[k] = totals.get(k, 0.0) + v
            for k, v in row.items():
                if isinstance(v, float):
                    at_most[k] = at_most.get(k, 0) + (v <= row["sparsegpt"])
            print(f"{key:28s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()))
            print(f"{'':28s} time(s) " + " ".join(f"{k}={v:.3f}" for k, v in t.items()))
        print(f"{'all layers':28s} CPU time / SparseGPT's: "
              + " ".join(f"{k}={v / totals['sparsegpt']:.2f}x" for k, v in totals.items()))
        print(f"{'all layers':28s} error at most SparseGPT's on: "
              + " ".join(f"{k}={n}/{len(layers)}" for k, n in at_most.items()))


if __name__ == "__main__":
    main()
