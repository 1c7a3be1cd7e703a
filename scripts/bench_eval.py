"""Evaluation benchmarks, each side by side in one run: perplexity (default) and zero-shot (`--zeroshot`).

Perplexity: `spp.eval.perplexity` against a plain transformers loop.

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

Zero-shot (`bench_zeroshot`): a real model (SmolLM2-135M from its GGUF file) on the 8 local tasks, `--limit`
items each. Per task, interleaved so that a busy machine slows all alike: (1) lm-eval's `HFLM` at
`batch_size=1` (spp's default before `spp.eval.loglikelihood`) on the first `--old-items` items, its time
(2) a plain forward pass (`logits_to_keep=1`, the same batch
size) over the tokens spp's path runs, on the same first items: the model's own speed on this machine;
(3) spp's default (`SharedContextLM`) on the same first items. Both (1) and (3) are extrapolated to all `--limit`
items by the tokens each runs there (counted exactly by tokenizing every request), since a full run of either
takes hours on a busy shared CPU; with `--full`, (3) runs every item and its time is measured. Answers of (1) and
(3) on the shared items are compared
item by item: log-likelihood differences, greedy flags, and answers that change (near ties, < 1e-4 nats,
counted apart). `--sweep` first times spp's path at several batch sizes on a fixed subset.

    taskset -c 0 python scripts/bench_eval.py --zeroshot --json docs/results/eval_speed.json
    python scripts/bench_eval.py --zeroshot --full --old-items 25 --json docs/results/eval_speed.json \
        --md docs/results/eval_speed.md    # the issue's bar: spp's whole run on both cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import DATA, random_llama
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


def _task_instances(setup, limit: int | None) -> dict[str, list]:
    """lm-eval's log-likelihood requests of each prepared task, first `limit` items."""
    out = {}
    for name, lm_name in setup.lm_eval_names.items():
        task = setup.loaded[lm_name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out[name] = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return out


def bench_zeroshot(model_path: str, task_data: str, limit: int | None = 500, old_items: int = 40,
                   batch_size: int | None = None, sweep: tuple[int, ...] = (), progress=lambda line, partial: print(line),
                   full: bool = False) -> dict:
    """Seconds, tokens and tokens/s of lm-eval's batch_size=1, a plain forward and spp's default, per task.

    Returns:
        {"tasks": [one record per task], "sweep": [{batch_size, tok_s}], "threads", "batch_size"}.
    """
    import tempfile

    import torch
    from lm_eval.models.huggingface import HFLM

    from spp.eval.loglikelihood import CPU_BATCH, SharedContextLM, chosen_answers, context_groups
    from spp.eval.zeroshot import LOCAL_TASKS, prepare_tasks
    from spp.io.reader import read_checkpoint
    from spp.models import load_model, load_tokenizer
    from spp.quiet import quiet_output

    batch_size = batch_size or CPU_BATCH
    directory = str(read_checkpoint(model_path).directory)  # a GGUF file: its cached safetensors directory
    model = load_model(directory, "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(directory)
    out = {"model": model_path, "threads": torch.get_num_threads(), "batch_size": batch_size, "limit": limit,
           "old_items": old_items, "full": full, "tasks": [], "sweep": [], "torch": torch.__version__,
           "load_average_start": os.getloadavg()[0], "affinity": sorted(os.sched_getaffinity(0)),
           "vocab": model.config.get_text_config().vocab_size, "cpu": _vector_units()}
    with tempfile.TemporaryDirectory() as workdir, quiet_output(lm_eval=True):
        setup = prepare_tasks(list(LOCAL_TASKS), task_data, Path(workdir))
        instances = _task_instances(setup, limit)
        old = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        new = SharedContextLM(model, tokenizer, batch_size)

        def encoded(insts):
            """(requests as HFLM tokenizes them, context groups, tokens lm-eval's bs=1 runs, tokens spp runs)."""
            pairs = []
            for inst in insts:
                context, continuation = inst.args
                pairs.append(new._encode_pair(context, continuation))
            groups = context_groups(pairs, new.max_length)
            ran_old = sum(len(c) + len(y) - 1 for c, y in
                          {tuple(c + y[:-1]): (c, y) for c, y in pairs}.values())  # HFLM runs one-token twins once
            ran_new = sum(len(ctx) + sum(len(pairs[i][1]) - 1 for i in members) for ctx, members in groups)
            return pairs, groups, ran_old, ran_new

        for size in sweep:
            subset = [inst for name in ("boolq", "arc_challenge", "hellaswag") for inst in instances[name]
                      if inst.doc_id < 12]
            _, _, _, ran = encoded(subset)
            lm = SharedContextLM(model, tokenizer, size)
            seconds, _ = _timed(lambda: lm.loglikelihood(subset), "cpu")
            out["sweep"].append({"batch_size": size, "seconds": seconds, "tokens": ran, "tok_s": ran / seconds})
            progress(f"sweep batch {size}: {ran / seconds:.0f} tok/s", out)
        for name, insts in instances.items():
            _, _, old_all, new_all = encoded(insts)
            shared = [inst for inst in insts if inst.doc_id < old_items]
            _, groups, old_shared, new_shared = encoded(shared)
            t_old, scores_old = _timed(lambda: old.loglikelihood(shared, disable_tqdm=True), "cpu")
            pairs = encoded(shared)[0]
            t_plain, _ = _timed(lambda: _plain_forward(model, groups, pairs, batch_size), "cpu")
            t_new, ours = _timed(lambda: new.loglikelihood(insts if full else shared), "cpu")
            if full:  # spp timed on every item; its answers compared on the shared ones
                ours = [score for inst, score in zip(insts, ours) if inst.doc_id < old_items]
            a, b = chosen_answers(shared, scores_old), chosen_answers(shared, ours)
            changed = [doc for doc in a if a[doc][0] != b[doc][0]]
            near = [doc for doc in changed if min(a[doc][1], b[doc][1]) < 1e-4]
            record = {
                "task": name, "items": len({inst.doc_id for inst in insts}), "requests": len(insts),
                "shared_items": len(a), "old_seconds_shared": t_old, "old_tokens_shared": old_shared,
                "old_tokens_all": old_all, "old_seconds_all_extrapolated": t_old * old_all / old_shared,
                "plain_seconds_shared": t_plain, "plain_tok_s": new_shared / t_plain,
                "new_tokens_shared": new_shared, "new_tokens_all": new_all,
                "new_seconds_all": t_new if full else t_new * new_all / new_shared,
                "new_tok_s": (new_all if full else new_shared) / t_new,
                "old_tok_s": old_shared / t_old,
                "max_abs_ll_diff": max(abs(x[0] - y[0]) for x, y in zip(scores_old, ours)),
                "greedy_equal": all(x[1] == y[1] for x, y in zip(scores_old, ours)),
                "answers_changed": len(changed), "answers_changed_near_tie": len(near),
            }
            out["tasks"].append(record)
            out["load_average_end"] = os.getloadavg()[0]
            progress(json.dumps(record), out)
    return out


def _vector_units() -> str:
    """The CPU's widest vector instructions, from /proc/cpuinfo's flags (empty elsewhere)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)


def _plain_forward(model, groups, pairs, batch_size: int) -> None:
    """One forward per `batch_size` sequences, each a context followed by its continuations' tokens (the tokens
    spp's path runs), right-padded, `logits_to_keep=1`: no cache, no mask, no lm-eval."""
    import torch

    sequences = [list(ctx) + [t for i in members for t in pairs[i][1][:-1]] for ctx, members in groups]
    sequences.sort(key=len, reverse=True)
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)


def zeroshot_table(result: dict) -> str:
    """The markdown table of `bench_zeroshot`'s result (seconds, tokens/s, answers)."""
    lines = [f"| task | items | lm-eval bs=1 s (extrap.) | spp s ({'measured' if result.get('full') else 'extrap.'}) | speed-up | spp tok/s | plain tok/s | spp / plain "
             "| max \\|Δ log p\\| | answers changed (near ties) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total_old = total_new = 0.0
    for r in result["tasks"]:
        total_old += r["old_seconds_all_extrapolated"]
        total_new += r["new_seconds_all"]
        lines.append(f"| {r['task']} | {r['items']} | {r['old_seconds_all_extrapolated']:.0f} | {r['new_seconds_all']:.0f} | "
                     f"{r['old_seconds_all_extrapolated'] / r['new_seconds_all']:.2f}x | {r['new_tok_s']:.0f} | "
                     f"{r['plain_tok_s']:.0f} | {r['new_tok_s'] / r['plain_tok_s']:.2f} | {r['max_abs_ll_diff']:.1e} | "
                     f"{r['answers_changed']} of {r['shared_items']} ({r['answers_changed_near_tie']}) |")
    lines.append(f"| **all** | {sum(r['items'] for r in result['tasks'])} | {total_old:.0f} | {total_new:.0f} | "
                 f"{total_old / total_new:.2f}x | | | | | |")
    return "\n".join(lines)


def zeroshot_page(result: dict, command: str) -> str:
    """docs/results/eval_speed.md: the machine, the command, the table and the totals, from `bench_zeroshot`."""
    tasks = result["tasks"]
    old_total = sum(r["old_seconds_all_extrapolated"] for r in tasks)
    new_total = sum(r["new_seconds_all"] for r in tasks)
    new_tokens, old_tokens = sum(r["new_tokens_all"] for r in tasks), sum(r["old_tokens_all"] for r in tasks)
    plain = sum(r["new_tokens_shared"] for r in tasks) / sum(r["plain_seconds_shared"] for r in tasks)
    changed = sum(r["answers_changed"] for r in tasks)
    sweep = ("- Batch size (`--sweep`, 12 items each of BoolQ, ARC-Challenge and HellaSwag"
             + (f", {result['sweep_note']}" if result.get("sweep_note") else "") + "): "
             + ", ".join(f"{r['batch_size']}: {r['tok_s']:.0f} tokens/s" for r in result["sweep"]) + ".\n"
             if result["sweep"] else "")
    extrapolated = ("extrapolated to all items by the tokens it runs there (counted exactly by tokenizing every\n"
                    "request): a full run of lm-eval's path did not fit in the time of this session.")
    timing = " and is " + extrapolated
    if result.get("full"):
        timing = (", except spp's, which ran every item: its seconds are measured. lm-eval's batch_size=1 time is\n"
                  + extrapolated)
    return f"""# Zero-shot evaluation speed: spp's default against lm-eval's batch_size=1

Written by `{command}` (`scripts/bench_eval.py`, `bench_zeroshot`). Machine: the shared 2-core x86-64 CPU VM
({platform.machine()}, {result.get('cpu', '')}), torch {result['torch']}, {result['threads']} torch thread(s), pinned to core(s)
{result['affinity']}; load average {result['load_average_start']:.1f} at the start,
{result.get('load_average_end', float('nan')):.1f} at the end. The three methods alternate task by task, so a busy
machine slows all alike.

Model: {result['model']} (SmolLM2-135M-Instruct, dequantized to float32). Tasks: {', '.join(r['task'] for r in tasks)}
({len(tasks)} of the 8 local tasks), the first {result['limit']} items of each (all of RTE's 277 and OpenBookQA's 500). Each method ran on the first
{result['old_items']} items of every task{timing}
spp ran `--batch-size` {result['batch_size']} (its CPU default); plain = one forward per {result['batch_size']} sequences of the
same tokens spp runs (each context followed by its answers), `logits_to_keep=1`, no lm-eval: this model's own
speed on this machine.

{zeroshot_table(result)}

- Tokens run for all items: lm-eval batch_size=1 {old_tokens:,}; spp {new_tokens:,} ({old_tokens / new_tokens:.2f}x fewer).
- All {len(tasks)} tasks: lm-eval batch_size=1 ≈ {old_total / 60:.0f} min, spp ≈ {new_total / 60:.0f} min ({old_total / new_total:.2f}x);
  the issue's bar is 15 min, which needs {new_tokens / 900:.0f} tokens/s; spp ran {new_tokens / new_total:.0f} tokens/s here and the
  plain forward {plain:.0f}.
{sweep}- spp / plain below 1: the plain forward sends no scored position through the output head and pads one
  sequence per item; spp scores every answer token through the head (a {result.get('vocab', 'full')}-way log-softmax each)
  and pads each batch's answers to the longest. On BoolQ and RTE (one-token answers, no second pass) the two match.
- Answers: {changed} of {sum(r['shared_items'] for r in tasks)} compared items changed answer
  ({sum(r['answers_changed_near_tie'] for r in tasks)} of them near ties, < 1e-4 nats); greedy flags equal: {all(r['greedy_equal'] for r in tasks)};
  largest log-likelihood difference {max(r['max_abs_ll_diff'] for r in tasks):.1e} nats.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="512,2048")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--zeroshot", action="store_true", help="the zero-shot benchmark instead (module docstring)")
    parser.add_argument("--model", default=str(DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--task-data", default=str(DATA / "eval"))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--old-items", type=int, default=40)
    parser.add_argument("--md", help="with --zeroshot: also write the results page here (docs/results/eval_speed.md)")
    parser.add_argument("--sweep", default="", help="comma list of batch sizes to time first, e.g. 1,4,8,16,32")
    parser.add_argument("--full", action="store_true", help="time spp's path on every item instead of extrapolating")
    args = parser.parse_args(argv)
    if args.zeroshot:
        def progress(line: str, partial: dict) -> None:  # each task's record as it ends, on screen and on disk
            print(line, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(partial, indent=1))

        result = bench_zeroshot(args.model, args.task_data, args.limit, args.old_items, None,
                                tuple(int(s) for s in args.sweep.split(",") if s), progress, args.full)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        print(zeroshot_table(result))
        if args.md:
            Path(args.md).write_text(zeroshot_page(result, "python scripts/bench_eval.py " + " ".join(argv or sys.argv[1:])))
        return
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
