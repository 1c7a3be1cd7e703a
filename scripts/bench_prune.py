"""Prune benchmark: `spp`'s pruners against straightforward implementations of the published algorithms.

Each measurement runs in its own child process (so peak memory is its own): peak RSS on
the CPU, `torch.cuda.max_memory_allocated` on CUDA. The model is a random LLaMA config of
about 100M parameters; calibration is 16x256 tokens on the CPU and 128x2048 on a GPU.

The baselines are written the way the reference research scripts are: block 0's inputs
caught one window at a time, every block run one window at a time, statistics as running
means, and N:M masks chosen in a Python loop over groups of columns. `bench_prune` returns
one record per measurement; `main` prints them side by side with ratios (baseline / spp).

    python scripts/bench_prune.py                 # all methods, both patterns, auto device
    python scripts/bench_prune.py --layers 4      # a smaller model
    python scripts/bench_prune.py --owl --methods wanda --patterns unstructured --sparsity 0.7
                                                  # spp with OWL against spp without (ratio = OWL / plain)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import LLAMA_100M, format_owl_table, random_llama
from reference import baseline_prune

SETUPS = {"cpu": dict(nsamples=16, seqlen=256), "cuda": dict(nsamples=128, seqlen=2048)}
METHOD_NAMES = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")


# --------------------------------------------------------------------------- one measurement (child process)


def measure(impl: str, method: str, pattern: str, device: str, nsamples: int, seqlen: int, layers: int,
            threads: int | None = None, sparsity: float | None = None) -> dict:
    """Prune a fresh random LLaMA once and return a record with wall time and peak memory.

    `impl` is `baseline`, `spp`, or `spp+owl` (spp with OWL's statistics pass and block sparsities)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from spp.config import PruneConfig
    from spp.prune import prune_model
    from spp.prune.masks import parse_pattern

    model = random_llama(layers)
    params = sum(p.numel() for p in model.parameters())
    windows = torch.randint(0, LLAMA_100M["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    dev = torch.device(device)
    cfg = PruneConfig(model="-", output="-", method=method, pattern=pattern, calib="-", nsamples=nsamples,
                      seqlen=seqlen, sparsity=sparsity, owl=impl == "spp+owl")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if impl in ("spp", "spp+owl"):
        prune_model(model, windows if method != "magnitude" or cfg.owl else None, cfg, dev)
    else:
        baseline_prune(model, windows, method, parse_pattern(pattern), cfg.sparsity, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    weights = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    achieved = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    record = dict(impl=impl, method=method, pattern=pattern, device=device, nsamples=nsamples, seqlen=seqlen,
                  params=params, layers=layers, threads=torch.get_num_threads(), seconds=seconds, sparsity=achieved,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if dev.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _run_child(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_prune(methods=METHOD_NAMES, patterns=PATTERNS, device: str = "auto", nsamples: int | None = None,
                seqlen: int | None = None, layers: int = 12, threads: int | None = None, repeats: int = 1,
                timeout: float = 1800, owl: bool = False, sparsity: float | None = None) -> list[dict]:
    """Measure spp and the baseline for every method and pattern, each run in its own child process.

    The two implementations alternate (baseline, spp, baseline, spp, ...) `repeats` times, so
    a load change on a shared machine hits both alike. With `owl` the pair is spp and spp+owl instead.

    Returns:
        One record per run: impl, method, pattern, device, nsamples, seqlen, params, layers,
        threads, seconds, achieved sparsity, peak_rss_mb (and peak_cuda_mb on CUDA).
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = SETUPS["cuda" if device.startswith("cuda") else "cpu"]
    nsamples, seqlen = nsamples or setup["nsamples"], seqlen or setup["seqlen"]
    records = []
    for method in methods:
        for pattern in patterns:
            for _ in range(repeats):
                for impl in (("spp", "spp+owl") if owl else ("baseline", "spp")):
                    spec = dict(impl=impl, method=method, pattern=pattern, device=device, nsamples=nsamples,
                                seqlen=seqlen, layers=layers, threads=threads, sparsity=sparsity)
                    records.append(_run_child(spec, timeout))
                    print(f"  {impl:8s} {method:9s} {pattern:12s} {records[-1]['seconds']:8.2f} s", file=sys.stderr)
    return records


def format_table(records: list[dict]) -> str:
    """A Markdown table per method and pattern: the fastest run of each implementation and its largest
    peak memory over the repeats, side by side, with ratios baseline / spp."""
    mem = "peak_cuda_mb" if "peak_cuda_mb" in records[0] else "peak_rss_mb"
    label = "peak CUDA MiB" if mem == "peak_cuda_mb" else "peak RSS MiB"
    lines = [f"| method | pattern | baseline s | spp s | time ratio | baseline {label} | spp {label} | memory ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r["method"], r["pattern"], r["impl"]), []).append(r)
    for method, pattern, impl in runs:
        if impl != "spp" or (method, pattern, "baseline") not in runs:
            continue
        b, s = runs[(method, pattern, "baseline")], runs[(method, pattern, "spp")]
        bt, st = min(r["seconds"] for r in b), min(r["seconds"] for r in s)
        bm, sm = max(r[mem] for r in b), max(r[mem] for r in s)
        lines.append(f"| {method} | {pattern} | {bt:.2f} | {st:.2f} | {bt / st:.2f}x | {bm:.0f} | {sm:.0f} | {bm / sm:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's choice)")
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each implementation")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--owl", action="store_true", help="compare spp with and without OWL (unstructured only)")
    parser.add_argument("--sparsity", type=float, help="unstructured sparsity (default 0.5)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    records = bench_prune(args.methods.split(","), args.patterns.split(","), args.device, args.nsamples, args.seqlen,
                          args.layers, args.threads, args.repeats, owl=args.owl, sparsity=args.sparsity)
    r = records[0]
    ratio = ("ratio = OWL / plain (the cost of OWL's statistics pass)" if args.owl
             else "ratio = baseline / spp (above 1: spp is faster / smaller)")
    print(f"random LLaMA, {r['layers']} layers, {r['params'] / 1e6:.0f}M parameters, {r['nsamples']}x{r['seqlen']} "
          f"calibration tokens, device {r['device']}, {r['threads']} threads, best of {args.repeats}; {ratio}")
    print(format_owl_table(records) if args.owl else format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
