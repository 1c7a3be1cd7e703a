"""Perplexity benchmark: `spp.eval.perplexity` against a plain transformers loop, side by side in one run.

The model is a seeded random LLaMA of about 110M parameters (hidden 768, 12 layers,
vocab 32000, tied head), float32. The plain loop is what most scripts do: one window
per forward, `model(x, labels=x).loss` under `torch.no_grad()` (transformers shifts the
labels and upcasts the logits itself). spp runs `--batch-size` windows per forward under
`torch.inference_mode()` and sums the NLL over a flat view of the logits. Both see the
same windows; each timing is the best of `repeats`, the two methods interleaved so a
busy machine slows both alike. `bench_eval` returns one record per seqlen; `main`
prints them with the ratio spp / plain (above 1 = spp faster).

    python scripts/bench_eval.py                          # seqlen 512 and 2048, 2 windows each, auto device
    python scripts/bench_eval.py --layers 4 --windows 2   # smaller and quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import random_llama
from reference import plain_loop_ppl

VOCAB = 32000  # the random LLaMA of `common.random_llama` with this vocabulary and a 4096-token context


def _timed(fn, device: str) -> tuple[float, float]:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def bench_eval(seqlens=(512, 2048), windows: int = 2, batch_size: int = 2, layers: int = 12, repeats: int = 2,
               device: str = "auto") -> list[dict]:
    """Tokens/s of spp's perplexity and of the plain loop on the same random windows, per seqlen.

    Returns:
        One record per seqlen: tokens/s of each, the ratio spp / plain, and both perplexities.
    """
    import torch

    from spp.eval.perplexity import perplexity, perplexity_windows

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = random_llama(layers, vocab_size=VOCAB, max_position_embeddings=4096).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    records = []
    for seqlen in seqlens:
        ids = torch.randint(0, VOCAB, (windows * seqlen,), generator=torch.Generator().manual_seed(seqlen))
        win = perplexity_windows(ids, seqlen)
        perplexity(model, ids[: 2 * seqlen], seqlen, batch_size=1)  # warm-up (allocator, kernels)
        best = {"spp": float("inf"), "plain": float("inf")}
        values = {}
        for _ in range(repeats):
            t, res = _timed(lambda: perplexity(model, ids, seqlen, batch_size=batch_size), device)
            best["spp"], values["spp"] = min(best["spp"], t), res.ppl
            t, ppl = _timed(lambda: plain_loop_ppl(model, win), device)
            best["plain"], values["plain"] = min(best["plain"], t), ppl
        tokens = windows * seqlen
        records.append({
            "device": device, "params_m": round(n_params / 1e6, 1), "layers": layers, "seqlen": seqlen,
            "windows": windows, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "spp_tok_s": tokens / best["spp"], "plain_tok_s": tokens / best["plain"],
            "speedup": best["plain"] / best["spp"], "ppl_spp": values["spp"], "ppl_plain": values["plain"],
        })
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="512,2048")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the records to this file")
    args = parser.parse_args(argv)
    records = bench_eval(tuple(int(s) for s in args.seqlens.split(",")), args.windows, args.batch_size, args.layers,
                         args.repeats, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print("| device | params | seqlen | windows | batch | spp tok/s | plain tok/s | spp / plain | ppl spp | ppl plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['device']} ({r['threads']} threads) | {r['params_m']}M | {r['seqlen']} | {r['windows']} | "
              f"{r['batch_size']} | {r['spp_tok_s']:.0f} | {r['plain_tok_s']:.0f} | {r['speedup']:.2f}x | "
              f"{r['ppl_spp']:.2f} | {r['ppl_plain']:.2f} |")


if __name__ == "__main__":
    main()
