"""One benchmark entry: prune, train step, merge and evaluation, side by side, in one run.

Runs the stage benchmarks as child processes (`bench_prune.py`, `bench_train.py`, `bench_eval.py`, each with
its JSON output) and measures the merge here (`bench_merge`: the streaming `spp merge` against loading,
merging in memory and saving). Every comparison is a ratio of two measurements taken in the same run, so it
holds on a busy machine even when the absolute numbers do not. Sections that cannot run here (a missing
package, a failure) are reported with the reason, never left out silently. Every CUDA path, 2:4 matmul speed
among them, is measured by `scripts/gpu_check.py` (report: docs/results/gpu.md).

    python scripts/bench.py                       # CPU (and CUDA when present); writes docs/results/bench.*
    python scripts/bench.py --quick               # smaller models, fewer steps: a look in a few minutes
    python scripts/bench.py --device cuda --out DIR --sections eval,train,prune
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import DATA, REPO, proc_status, random_llama

from spp.io.text import markdown_table

HERE = Path(__file__).resolve().parent
SECTIONS = ("prune", "train", "merge", "eval")


# --------------------------------------------------------------------------- merge


def _run_child(spec: dict, timeout: float = 1800) -> dict:
    """Run one merge measurement of this file in a fresh interpreter, so its peak memory is its own."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec['kind']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_merge_inputs(root: Path, layers: int, tokenizer_dir: str, max_shard_size: str = "100MB") -> tuple[Path, Path]:
    """A 2:4 magnitude-pruned random LLaMA (`spp prune`, sharded) and an SPP adapter for it (`spp train`, one step
    at a high rate, so that β is not zero and the merge is not a copy).

    Returns:
        (pruned directory, adapter directory).
    """
    from spp.config import PruneConfig, TrainConfig
    from spp.models import load_tokenizer
    from spp.prune import run_prune
    from spp.train import run_train

    dense, pruned, adapter = root / "dense", root / "pruned", root / "adapter"
    random_llama(layers).save_pretrained(str(dense), max_shard_size=max_shard_size)
    load_tokenizer(tokenizer_dir).save_pretrained(str(dense))  # run_prune wants one; magnitude never uses it
    run_prune(PruneConfig(model=str(dense), output=str(pruned), method="magnitude", pattern="2:4", device="cpu",
                          max_shard_size=max_shard_size))
    run_train(TrainConfig(base_model=str(pruned), data_path=str(DATA / "tinystories" / "tinystories_val.txt"),
                          output_dir=str(adapter), cutoff_len=32, batch_size=1, micro_batch_size=1, max_steps=1,
                          learning_rate=0.1, warmup_ratio=0.0, lr_scheduler="constant"))
    return pruned, adapter


def measure_merge(impl: str, pruned: str, adapter: str, output: str) -> dict:
    """One merge in this process: `spp` = `run_merge` (shard by shard); `in_memory` = load the whole model,
    `load_adapter`, `merge_adapter`, `save_pretrained` (what a script without streaming does).

    Memory: the peak resident set, and its increase over the resident set after the imports."""
    import torch  # noqa: F401  (imported before the baseline reading, as both paths need it)

    from spp.adapter.model import load_adapter, merge_adapter
    from spp.config import MergeConfig
    from spp.io.checkpoint import save_model
    from spp.io.reader import read_checkpoint
    from spp.merge import run_merge
    from spp.models import load_model

    before = proc_status("VmRSS") / 2**20
    start = time.perf_counter()
    if impl == "spp":
        run_merge(MergeConfig(model=pruned, adapter=adapter, output=output))
    else:
        model = load_model(pruned)
        masks = read_checkpoint(pruned).masks_by_parameter()
        load_adapter(model, Path(adapter), masks)
        merge_adapter(model, masks)
        save_model(model, None, Path(output), max_shard_size="100MB")
    seconds = time.perf_counter() - start
    peak = proc_status("VmHWM") / 2**20  # not ru_maxrss, which carries a parent's peak into a child
    return {"impl": impl, "seconds": seconds, "peak_rss_mb": peak, "increase_mb": peak - before}


def _max_abs_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    from spp.io.checkpoint import safetensors_files

    left = {k: v for f in safetensors_files(a) for k, v in load_file(str(f)).items()}
    right = {k: v for f in safetensors_files(b) for k, v in load_file(str(f)).items()}
    if set(left) != set(right):
        return float("inf")
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def bench_merge(layers: int = 12, repeats: int = 2, tokenizer_dir: str | None = None) -> list[dict]:
    """Time and peak memory of the streaming merge and the in-memory merge on the same inputs.

    Each measurement is a child process; the two alternate for `repeats` rounds and the best
    time and the lowest peak of each are kept. The outputs are compared tensor by tensor.

    Returns:
        Records {impl, seconds, peak_rss_mb, params, layers, max_abs_diff}.
    """
    tokenizer_dir = tokenizer_dir or str(DATA / "stories260K-hf")
    with tempfile.TemporaryDirectory(prefix="spp-bench-merge-") as tmp:
        root = Path(tmp)
        pruned, adapter = prepare_merge_inputs(root, layers, tokenizer_dir)
        best: dict[str, dict] = {}
        for round_index in range(repeats):
            for impl in (("spp", "in_memory") if round_index % 2 == 0 else ("in_memory", "spp")):
                output = root / f"{impl}-{round_index}"
                r = _run_child({"kind": "merge", "impl": impl, "pruned": str(pruned), "adapter": str(adapter),
                                "output": str(output)})
                old = best.get(impl)
                best[impl] = r if old is None else {key: min(r[key], old[key]) if key != "impl" else r[key] for key in r}
        diff = _max_abs_difference(root / "spp-0", root / "in_memory-0")
        from spp.io.checkpoint import safetensors_files

        params = sum(p.stat().st_size for p in safetensors_files(pruned)) // 4
    return [{**best[i], "layers": layers, "params": params, "max_abs_diff": diff} for i in ("spp", "in_memory")]


# --------------------------------------------------------------------------- composing the stage benchmarks


def _bench_child(script: str, args: list[str]) -> list | dict:
    """Run `scripts/SCRIPT` in a child process with `--json FILE`; its records."""
    with tempfile.TemporaryDirectory(prefix="spp-bench-") as tmp:
        out = Path(tmp) / "records.json"
        proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def run_section(name: str, args) -> dict:
    """Run one section; returns {"records": [...]} or {"skipped": reason}."""
    device, gpu = args.device, args.device.startswith("cuda")
    if name == "prune":
        argv = ["--device", device, "--layers", str(args.layers),
                "--methods", "wanda,sparsegpt" if args.quick else "magnitude,wanda,sparsegpt",
                "--patterns", "2:4" if args.quick and gpu else "unstructured,2:4"]
        return {"records": _bench_child("bench_prune.py", argv + (["--nsamples", "32"] if args.quick and gpu else []))}
    if name == "train":
        import peft

        variants = ["spp", "lora", "hira", "naive_spp"] if hasattr(peft, "HiraConfig") else ["spp", "lora", "naive_spp"]
        argv = ["--device", device, "--rounds", "1" if args.quick else "2", "--steps", "3" if args.quick else "5",
                "--variants", ",".join(variants)] + ([] if gpu else ["--small"])  # the full model: seconds per CPU step
        note = None if "hira" in variants else f"peft {peft.__version__} has no HiraConfig: HiRA not measured"
        return {"records": _bench_child("bench_train.py", argv)["summary"], "dims": "full" if gpu else "small",
                "note": note}
    if name == "merge":
        if gpu:
            return {"skipped": "the merge streams shards on the CPU; it is measured in the CPU run"}
        return {"records": bench_merge(layers=args.layers, repeats=1 if args.quick else 2)}
    if name == "eval":
        argv = ["--seqlens", "512" if args.quick else "512,2048", "--windows", "4", "--batch-size", "2",
                "--layers", str(args.layers), "--repeats", "2", "--device", device]
        return {"records": _bench_child("bench_eval.py", argv)}
    raise ValueError(name)


def summary_rows(results: dict) -> list[list[str]]:
    """The one table: [area, comparison, device, measured, ratio (> 1 favours spp / the sparse kernel)]."""
    rows = []
    for device, sections in results.items():
        for name, section in sections.items():
            if "skipped" in section or "error" in section:
                rows.append([name, "–", device, section.get("skipped") or section.get("error"), "–"])
                continue
            rows += _section_rows(name, device, section)
    return rows


def _section_rows(name: str, device: str, section: dict) -> list[list[str]]:
    records, rows = section["records"], []
    if name == "prune":
        mem = "peak_cuda_mb" if "peak_cuda_mb" in records[0] else "peak_rss_mb"
        by = {(r["method"], r["pattern"], r["impl"]): r for r in records}
        for (method, pattern, impl), s in by.items():
            b = by.get((method, pattern, "baseline"))
            if impl == "spp" and b:
                rows.append(["prune", f"{method} {pattern}: reference-style loop / spp", device,
                             f"{b['seconds']:.1f} s / {s['seconds']:.1f} s; {b[mem]:.0f} / {s[mem]:.0f} MiB",
                             f"time {b['seconds'] / s['seconds']:.2f}×, memory {b[mem] / s[mem]:.2f}×"])
    elif name == "train":
        ref = next((r for r in records if r["variant"] == "lora"), None)
        for r in records:
            if ref and r["variant"] != "lora":
                rows.append(["train step", f"{r['variant']} / LoRA ({section['dims']} LLaMA)", device,
                             f"{1000 * r['step_s']:.0f} ms vs {1000 * ref['step_s']:.0f} ms; "
                             f"{r['peak_bytes'] / 2**20:.0f} vs {ref['peak_bytes'] / 2**20:.0f} MiB",
                             f"time {r['step_s'] / ref['step_s']:.2f}×, memory {r['peak_bytes'] / ref['peak_bytes']:.2f}×"])
    elif name == "merge":
        s, m = records
        rows.append(["merge", f"in-memory / streaming spp merge ({s['params'] / 1e6:.0f}M params; outputs differ by "
                     f"at most {s['max_abs_diff']:.1e})", device,
                     f"{m['seconds']:.1f} s / {s['seconds']:.1f} s; peak {m['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} MiB, "
                     f"added over the imports {m['increase_mb']:.0f} / {s['increase_mb']:.0f} MiB",
                     f"time {m['seconds'] / s['seconds']:.2f}×, added memory {m['increase_mb'] / max(s['increase_mb'], 1):.2f}×"])
    elif name == "eval":
        for r in records:
            rows.append(["eval", f"spp perplexity / plain loop, seqlen {r['seqlen']} ({r['params_m']}M)", device,
                         f"{r['spp_tok_s']:.0f} vs {r['plain_tok_s']:.0f} tokens/s", f"{r['speedup']:.2f}×"])
    return rows


def markdown(results: dict, meta: dict) -> str:
    rows = summary_rows(results)
    lines = ["# Benchmarks", "",
             f"Generated by `python scripts/bench.py{' --quick' if meta.get('quick') else ''}` on {meta['when']}; "
             f"{meta['where']}"
             + "".join(f"; the {', '.join(m['devices'])} rows come from a run on {m['when']}, {m['where']}"
                       f"{' (--quick)' if m.get('quick') else ''}" for m in meta.get("included", []))
             + ". Each ratio compares two measurements from the same run; above 1 favours spp.", "",
             markdown_table(["area", "comparison", "device", "measured", "ratio"], rows, "----r")]
    lines += ["", "Raw records: `bench.json`. Each stage benchmark also runs on its own: "
              "`scripts/bench_prune.py`, `scripts/bench_train.py`, `scripts/bench_eval.py`; every CUDA path, 2:4 "
              "matmul speed among them: `scripts/gpu_check.py` (docs/results/gpu.md).", ""]
    return "\n".join(lines)


def _where(device: str) -> str:
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cores} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto: the CPU, then CUDA when present")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps, smaller models")
    parser.add_argument("--layers", type=int, default=None, help="layers of the random LLaMA (default 12; quick 2)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="writes bench.md and bench.json here")
    parser.add_argument("--include", action="append", default=[], help="bench.json of another run to add (e.g. a GPU's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_merge(spec["impl"], spec["pruned"], spec["adapter"], spec["output"])))
        return {}
    import torch

    args.layers = args.layers or (2 if args.quick else 12)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "where": _where(devices[-1]),
            "quick": args.quick, "layers": args.layers, "devices": devices, "included": []}
    for extra in args.include:  # e.g. the bench.json a GPU machine wrote
        other = json.loads(Path(extra).read_text())
        results.update(other["results"])
        meta["included"].append({**{k: v for k, v in other["meta"].items() if k != "included"},
                                 "devices": other["meta"].get("devices", list(other["results"]))})
    for device in devices:
        args.device = device
        results[device] = {}
        for name in args.sections.split(","):
            print(f"[{device}] {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                results[device][name] = run_section(name, args)
            except Exception as exc:  # one broken section must not hide the others
                results[device][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                         "traceback": traceback.format_exc()[-3000:]}
            results[device][name]["seconds"] = time.perf_counter() - start
            _write(out, results, meta)  # after every section, so a cut-off run keeps what it measured
    text = _write(out, results, meta)
    print(text)
    return {"meta": meta, "results": results}


def _write(out: Path, results: dict, meta: dict) -> str:
    text = markdown(results, meta)
    for name, content in (("bench.json", json.dumps({"meta": meta, "results": results}, indent=1)), ("bench.md", text)):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(out / name)
    return text


if __name__ == "__main__":
    main()
