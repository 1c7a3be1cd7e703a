"""2:4 semi-structured matmul against dense, measured so that the answer can be trusted. Needs a CUDA GPU.

    python scripts/bench_sparse24.py --out /tmp/sparse24.json            # full grid, about 5 minutes on an H100/H200
    python scripts/bench_sparse24.py --quick --out /tmp/sparse24.json    # 7B shapes, 16 and 2048 tokens

For each linear shape of LLaMA-7B/8B and 70B (q/o, k/v, gate/up, down), token count (1, 16, 128, 2048, 8192) and
dtype (float16, bfloat16), one weight W is 2:4-pruned (magnitude) and, OUTSIDE the timed region, converted once
per path:

  dense      F.linear(x, W)
  subclass   F.linear(x, to_sparse_semi_structured(W))            -- what `spp eval --sparse-kernels` runs
  direct     torch._cslt_sparse_mm(packed, xᵀ, alg_id=best, transpose_result=True), packed = torch._cslt_compress(W)
             and best = torch._cslt_sparse_mm_search(...) chosen once per (shape, tokens, dtype)
  compiled   torch.compile of the subclass path (only where --compile; it can take minutes)

Each is timed with CUDA events over enough repetitions to run ≥ 50 ms, after warm-up. A path slower than dense is
profiled (torch.profiler, one more warm call): the ops that ran and their CUDA and CPU time are recorded beside the
row, so every "slower" has its explanation (e.g. padding the input to a multiple of 8 rows, a plan created per
call, host-side overhead of the Python custom op). Output: a JSON file (results + machine) and a Markdown table
printed to stdout for docs/results/bench.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # (out, in) of nn.Linear weights
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "8B k/v": (1024, 4096), "8B gate/up": (14336, 4096), "8B down": (4096, 14336),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}
TOKENS = (1, 16, 128, 2048, 8192)
DTYPES = ("float16", "bfloat16")


def prune_24(weight):
    """Magnitude 2:4 along the input axis (keep the 2 largest |w| of every 4)."""
    import torch

    out_features, in_features = weight.shape
    groups = weight.abs().view(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return weight * keep.view(out_features, in_features)


def cuda_ms(fn, min_ms: float = 50.0) -> float:
    """Mean milliseconds per call, CUDA events, after warm-up, over enough calls to run at least `min_ms`."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 10
    while True:
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        total = start.elapsed_time(end)
        if total >= min_ms or repeats >= 10000:
            return total / repeats
        repeats *= 4


def profile_ops(fn, top: int = 6) -> list[dict]:
    """The ops one call ran, by self CUDA time: name, calls, CUDA µs, CPU µs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key, "calls": e.count, "cuda_us": round(getattr(e, "self_device_time_total", 0.0), 1),
                     "cpu_us": round(e.self_cpu_time_total, 1)})
    rows.sort(key=lambda r: (r["cuda_us"], r["cpu_us"]), reverse=True)
    return rows[:top]


def measure(name: str, shape: tuple[int, int], tokens: int, dtype_name: str, compile_: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    weight = prune_24(torch.randn(shape, device="cuda", dtype=dtype))
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
    sparse_weight = to_sparse_semi_structured(weight)  # converted once, outside every timed region
    packed = torch._cslt_compress(weight)
    xt = x.t()
    alg_id = torch._cslt_sparse_mm_search(packed, xt, transpose_result=True)
    paths = {
        "dense": lambda: F.linear(x, weight),
        "subclass": lambda: F.linear(x, sparse_weight),
        "direct": lambda: torch._cslt_sparse_mm(packed, xt, transpose_result=True, alg_id=alg_id),
    }
    if compile_:
        compiled = torch.compile(lambda inp: F.linear(inp, sparse_weight))
        paths["compiled"] = lambda: compiled(x)
    reference = paths["dense"]().float()
    row = {"shape_name": name, "shape": list(shape), "tokens": tokens, "dtype": dtype_name, "alg_id": alg_id}
    for path, fn in paths.items():
        try:
            out = fn().float()
            row[f"{path}_ms"] = cuda_ms(fn)
            if path != "dense":
                row[f"{path}_rel_error"] = float((out - reference).abs().max() / reference.abs().max())
                row[f"{path}_speedup"] = row["dense_ms"] / row[f"{path}_ms"]
                if row[f"{path}_speedup"] < 1:
                    row[f"{path}_profile"] = profile_ops(fn)
        except (RuntimeError, NotImplementedError) as exc:
            row[f"{path}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    row["dense_profile"] = profile_ops(paths["dense"], top=3) if any(k.endswith("_profile") for k in row) else None
    return row


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [f"2:4 semi-structured matmul vs dense, {machine['gpu']}, torch {machine['torch']} "
             f"(CUDA events, converted outside the timed region; speed-up = dense ms / 2:4 ms)", "",
             "| shape | tokens | dtype | dense ms | subclass | direct (alg searched) | compiled |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = []
        for path in ("subclass", "direct", "compiled"):
            if f"{path}_speedup" in r:
                cells.append(f"{r[f'{path}_ms']:.3f} ms ({r[f'{path}_speedup']:.2f}×)")
            else:
                cells.append(r.get(f"{path}_error", "–"))
        lines.append(f"| {r['shape_name']} {tuple(r['shape'])} | {r['tokens']} | {r['dtype']} | {r['dense_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    slow = [(r, p) for r in rows for p in ("subclass", "direct", "compiled") if r.get(f"{p}_profile")]
    if slow:
        lines += ["", "Slower than dense — the ops that ran (self CUDA µs / CPU µs per call):", ""]
        for r, p in slow:
            ops = "; ".join(f"{o['op']} ×{o['calls']} {o['cuda_us']}/{o['cpu_us']}" for o in r[f"{p}_profile"])
            lines.append(f"- {r['shape_name']}, {r['tokens']} tokens, {r['dtype']}, {p}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="7B shapes, 16 and 2048 tokens only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the subclass path")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: 2:4 semi-structured kernels need a CUDA GPU; this machine has none")
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("7B")}
    tokens = (16, 2048) if args.quick else TOKENS
    rows = [measure(name, shape, t, d, args.compile) for name, shape in shapes.items() for t in tokens for d in DTYPES]
    machine = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
               "torch": torch.__version__, "cuda": torch.version.cuda}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(markdown(rows, machine))
    return {"machine": machine, "rows": rows}


if __name__ == "__main__":
    main()
