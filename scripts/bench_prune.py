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

`--memory` (issue 26) measures the peak RSS of `spp prune --method sparsegpt` streamed (the default, one decoder block
in memory) beside the in-memory path (`run_prune(streaming=False)`), on two random LLaMA models of one width (hidden
1024, MLP 2816, vocab 32000, untied head, fp32) with 8 and 32 layers, saved under `--workdir`, 32 windows of 128
tokens; each run in its own child process (its `VmHWM`), run under `taskset -c 0` for one core:

    taskset -c 0 python scripts/bench_prune.py --memory --workdir /tmp/bench-stream

`--compare` (issue 25) instead runs the method comparison on a real model through the CLI, one cell (method +
refinement, sparsity or N:M) at a time: `spp prune` (CPU and wall time of the process), `spp verify`, `spp eval
--ppl`, and the manifest's achieved sparsity, mean layer reconstruction error and DSnoT totals. Each finished
cell is a JSON file under `--cells-dir`, so a rerun skips it (a killed prune continues with `--resume`), and the
pruned weights are deleted once evaluated (`--keep-models` keeps them). `--report FILE` writes the Markdown table:

    python scripts/bench_prune.py --compare --model ../shared/data/stories260K-hf --cells-dir /work/results-25/stories260K \
        --calib ../shared/data/c4/c4_sample.jsonl --nsamples 128 --seqlen 512 --report /work/results-25/stories260K.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import subprocess
import sys
import time

from common import LLAMA_100M, format_owl_table, proc_status, random_llama
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
                  peak_rss_mb=proc_status("VmHWM") / 2**20)
    if dev.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


MEMORY_WIDTH = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                    vocab_size=32000, tie_word_embeddings=False)


def measure_prune_memory(model: str, output: str, streaming: bool, calib: str, nsamples: int, seqlen: int) -> dict:
    """One `run_prune` of SparseGPT at 50% (streamed or in memory) in this process: wall time and peak RSS."""
    from spp.config import PruneConfig
    from spp.prune import run_prune

    cfg = PruneConfig(model=model, output=output, method="sparsegpt", sparsity=0.5, calib=calib, nsamples=nsamples,
                      seqlen=seqlen, device="cpu", overwrite=True)
    start = time.perf_counter()
    run_prune(cfg, streaming=streaming)
    # VmHWM, not ru_maxrss: Linux carries a parent's peak into ru_maxrss across fork and exec
    return dict(seconds=time.perf_counter() - start, peak_rss_mb=proc_status("VmHWM") / 2**20)


def bench_prune_memory(workdir: str, calib: str, layers=(8, 32), nsamples: int = 32, seqlen: int = 128,
                       timeout: float = 3 * 3600, parallel: bool = False, paths: str | None = None) -> list[dict]:
    """Peak RSS of streamed and in-memory SparseGPT prunes of random `MEMORY_WIDTH` LLaMAs of each depth, one child
    process each (`parallel`: all at once, for a busy machine; the wall times are then not comparable; `paths`:
    only "streamed" or only "in memory")."""
    import shutil
    from pathlib import Path

    from common import DATA

    records = []
    for n in layers:
        model = Path(workdir) / f"llama-{n}"
        if not (model / "config.json").is_file():
            random_llama(n, **MEMORY_WIDTH).save_pretrained(model)
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):  # ids < 512 fit vocab 32000
                shutil.copyfile(DATA / "stories260K-hf" / name, model / name)
    specs = [dict(model=str(Path(workdir) / f"llama-{n}"), output=str(Path(workdir) / f"out-{n}-{streaming}"),
                  streaming=streaming, calib=calib, nsamples=nsamples, seqlen=seqlen)
             for n in layers for streaming in (True, False) if paths is None or streaming == (paths == "streamed")]
    if parallel:  # one process each, started together: peak RSS is per process; wall times then share the cores
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            results = list(pool.map(lambda spec: _run_child({"memory": spec}, timeout), specs))
    else:
        results = [_run_child({"memory": spec}, timeout) for spec in specs]
    for spec, result in zip(specs, results):
        n = int(Path(spec["model"]).name.split("-")[1])
        weights = sum(p.stat().st_size for p in Path(spec["model"]).glob("*.safetensors"))
        records.append(dict(layers=n, weights_mb=weights / 2**20, path="streamed" if spec["streaming"] else "in memory",
                            parallel=parallel, **result))
        shutil.rmtree(spec["output"], ignore_errors=True)
    return records


def format_memory_table(records: list[dict]) -> str:
    rows = ["| layers | fp32 weights (MiB) | path | peak RSS (MiB) | peak RSS / weights | wall (s) |",
            "|---:|---:|---|---:|---:|---:|"]
    for r in records:
        rows.append(f"| {r['layers']} | {r['weights_mb']:.0f} | {r['path']} | {r['peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb'] / r['weights_mb']:.2f} | {r['seconds']:.0f} |")
    streamed = {r["layers"]: r["peak_rss_mb"] for r in records if r["path"] == "streamed"}
    if len(streamed) == 2:
        small, big = sorted(streamed)
        rows.append(f"\nstreamed peak RSS, {big} layers / {small} layers: {streamed[big] / streamed[small]:.3f}")
    return "\n".join(rows)


def write_memory_report(path: str, records: list[dict], machine: str) -> None:
    """docs/results/streaming.md: the table, the run's conditions and issue 26's bar, checked."""
    import platform

    import torch

    streamed = {r["layers"]: r for r in records if r["path"] == "streamed"}
    small, big = sorted(streamed)
    ratio = streamed[big]["peak_rss_mb"] / streamed[small]["peak_rss_mb"]
    half = streamed[big]["peak_rss_mb"] / streamed[big]["weights_mb"]
    lines = [
        "# Streaming prune: peak host memory against depth",
        "",
        "Written by `taskset -c 0 python scripts/bench_prune.py --memory --report docs/results/streaming.md` "
        "(issue 26). `spp prune --method sparsegpt --sparsity 0.5` on random LLaMA models of one width (hidden 1024, "
        "MLP 2816, 16 heads, vocab 32000, untied head, float32) with 8 and 32 decoder blocks, 32 calibration windows "
        "of 128 tokens of TinyStories, `--device cpu`; each run in its own process, peak RSS is its `VmHWM`. "
        "`streamed` is `spp prune` as shipped; `in memory` is the same prune with the whole model loaded first "
        "(`run_prune(streaming=False)`, the path before issue 26), which writes the same bytes.",
        "",
        f"Machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}, one thread.",
        "",
        format_memory_table(records),
        "",
        f"Bar: streamed peak RSS within 15% between {small} and {big} layers: {ratio:.3f} "
        f"({'met' if abs(ratio - 1) <= 0.15 else 'NOT met'}); {big} layers below half the fp32 weights: "
        f"{half:.2f} of them ({'met' if half < 0.5 else 'NOT met'}).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


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


# --------------------------------------------------------------------------- the method comparison (issue 25)

# cell -> spp prune flags; wanda's cells record their error (--record-error: its time includes gathering H)
COMPARE_CELLS = {
    "wanda": ["--method", "wanda", "--record-error"],
    "sparsegpt": ["--method", "sparsegpt"],
    "alps": ["--method", "alps"],  # the default cap: 15 iterations unstructured, 30 for N:M
    "wanda+dsnot": ["--method", "wanda", "--refine", "dsnot"],
    "wanda+dsnot/noguard": ["--method", "wanda", "--refine", "dsnot", "--no-dsnot-guard", "--record-error"],
    "sparsegpt+dsnot": ["--method", "sparsegpt", "--refine", "dsnot"],
    "alps/paper": ["--method", "alps", "--alps-iters", "300"],
    "alps/50": ["--method", "alps", "--alps-iters", "50"],
    "alps/15": ["--method", "alps", "--alps-iters", "15"],
    "alps/30": ["--method", "alps", "--alps-iters", "30"],
    "wanda/plain": ["--method", "wanda"],  # not run by default: Wanda's own time, without gathering H
}
COMPARE_PATTERNS = ("0.5", "0.6", "0.7", "2:4")


def _pattern_flags(pattern: str) -> list[str]:
    return ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]


def compare_cell(args, cell: str, pattern: str) -> dict:
    """Prune, verify and evaluate one cell (or read its finished record); returns the record."""
    from pathlib import Path

    cells = Path(args.cells_dir)
    key = f"{cell}@{pattern}".replace("/", "-").replace(":", "of")
    record_path = cells / f"{key}.json"
    out = cells / key
    if args.report_only and not record_path.is_file():
        return None
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if cell != "dense" and "stage_s" not in record:  # a record of an earlier version of this script
            record["stage_s"] = json.loads((out / "spp_manifest.json").read_text())["wall_time_s"]
        return record
    spp = str(Path(sys.executable).with_name("spp"))  # a child process: its CPU time is the stage's
    record: dict = {"cell": cell, "pattern": pattern}
    if cell != "dense":
        if not (out / "spp_manifest.json").is_file():
            cmd = [spp, "prune", "--model", args.model, "--calib", args.calib, "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--device", "cpu", "--output", str(out), "--resume",
                   *COMPARE_CELLS[cell], *_pattern_flags(pattern)]
            resumed = (out.parent / (out.name + ".partial")).exists()  # a killed run's blocks: its time is partial
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            (cells / f"{key}.prune-times.json").write_text(json.dumps({
                "wall_s": time.perf_counter() - start,
                "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                "resumed": resumed}))
        record.update(json.loads((cells / f"{key}.prune-times.json").read_text()))
        manifest = json.loads((out / "spp_manifest.json").read_text())
        details = manifest["details"]
        record["stage_s"] = manifest["wall_time_s"]  # inside the process: no interpreter start or imports
        record.update(sparsity=details["achieved_sparsity"], error=details.get("reconstruction_error"),
                      refine=details.get("refine"), verify=subprocess.run([spp, "verify", str(out)],
                                                                          capture_output=True).returncode)
    evaluated = cells / f"{key}.eval"
    if not (evaluated / "results.json").is_file():
        subprocess.run([spp, "eval", "--model", str(out) if cell != "dense" else args.model, "--ppl", args.ppl,
                        "--seqlen", str(args.ppl_seqlen), "--max-windows", str(args.max_windows), "--device", "cpu",
                        "--output", str(evaluated), "--overwrite"], check=True, capture_output=True)
    (ppl,) = json.loads((evaluated / "results.json").read_text())["perplexity"].values()
    record["ppl"] = ppl["ppl"]
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    if cell != "dense" and not args.keep_models:
        for path in out.glob("*.safetensors"):  # the weights; the manifest and the mask file (spp/) stay
            path.unlink()
    return record


def compare(args) -> list[dict]:
    records = [compare_cell(args, "dense", "dense")]
    print(f"  dense ppl {records[0]['ppl']:.2f}", file=sys.stderr, flush=True)
    for pattern in args.patterns.split(","):  # a column at a time: the first patterns given finish first
        for cell in args.cells.split(","):
            r = compare_cell(args, cell, pattern)
            if r is None:  # --report-only: a cell not run yet
                continue
            records.append(r)
            print(f"  {cell:22s} {pattern:4s} ppl {r['ppl']:9.2f}  error {r['error'] or float('nan'):.4f}  "
                  f"cpu {r['cpu_s']:7.1f} s  wall {r['wall_s']:7.1f} s  verify {r['verify']}", file=sys.stderr,
                  flush=True)
            if args.report:
                write_compare_report(args, records)
    return records


def write_compare_report(args, records: list[dict]) -> None:
    """The comparison as Markdown: perplexity, mean layer error, CPU time per cell, one row per method."""
    patterns = args.patterns.split(",")
    dense = next(r for r in records if r["cell"] == "dense")
    label = {p: (p if ":" in p else f"{float(p):.0%}") for p in patterns}
    lines = [f"Model `{args.model}`; calibration `{args.calib}`, {args.nsamples} × {args.seqlen} tokens; perplexity "
             f"`{args.ppl}` at seqlen {args.ppl_seqlen}, first {args.max_windows} windows; dense {dense['ppl']:.2f}. "
             "Each cell: perplexity / mean relative layer reconstruction error / CPU seconds of the `spp prune` "
             "process (user + system over its threads) / the stage's wall seconds in the manifest (no interpreter "
             "start); wanda's cells gather H for the error with --record-error, `wanda/plain` does not.", "",
             "| method | " + " | ".join(label[p] for p in patterns) + " |", "|---|" + "---:|" * len(patterns)]
    by = {(r["cell"], r["pattern"]): r for r in records}
    for cell in args.cells.split(","):
        row = []
        for p in patterns:
            r = by.get((cell, p))
            row.append("" if r is None else f"{r['ppl']:.2f} / {r['error'] if r['error'] is not None else float('nan'):.4f}"
                       f" / {r['cpu_s']:.1f} / {r['stage_s']:.1f}" + ("" if r["verify"] == 0 else " (verify failed)")
                       + (" (resumed)" if r.get("resumed") else ""))
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    with open(args.report, "w") as f:
        f.write("\n".join(lines) + "\n")


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
    parser.add_argument("--compare", action="store_true", help="the method comparison on --model (see above)")
    parser.add_argument("--model", help="--compare: a model directory or .gguf file")
    parser.add_argument("--cells-dir", help="--compare: where each cell's record and outputs live")
    parser.add_argument("--cells", default=",".join(c for c in COMPARE_CELLS if c not in ("wanda/plain", "alps/50")))
    parser.add_argument("--calib", default="../shared/data/c4/c4_sample.jsonl")
    parser.add_argument("--ppl", default="wikitext2:../shared/data/wikitext-2-raw/wikitext-test.txt")
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--keep-models", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="--compare: report the finished cells, run none")
    parser.add_argument("--report", help="--compare: write the Markdown table here after every cell; "
                        "--memory: write the results page here")
    parser.add_argument("--memory", action="store_true", help="streamed vs in-memory prune peak RSS (see above)")
    parser.add_argument("--workdir", default="/tmp/spp-bench-stream", help="--memory: where the models are saved")
    parser.add_argument("--machine", default="unnamed", help="--memory --report: the machine, in words")
    parser.add_argument("--parallel", action="store_true", help="--memory: run the four prunes at once")
    parser.add_argument("--paths", choices=["streamed", "in memory"], help="--memory: measure only this path")
    args = parser.parse_args(argv)
    if args.compare:
        import os

        os.makedirs(args.cells_dir, exist_ok=True)
        args.nsamples, args.seqlen = args.nsamples or 128, args.seqlen or 512
        args.patterns = args.patterns if args.patterns != ",".join(PATTERNS) else ",".join(COMPARE_PATTERNS)
        compare(args)
        return
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_prune_memory(**spec["memory"]) if "memory" in spec else measure(**spec)))
        return
    if args.memory:
        calib = args.calib if args.calib != parser.get_default("calib") else "../shared/data/tinystories/tinystories_val.txt"
        records = bench_prune_memory(args.workdir, calib, parallel=args.parallel, paths=args.paths)
        print(format_memory_table(records))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=2)
        if args.report:
            write_memory_report(args.report, records, args.machine)
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
