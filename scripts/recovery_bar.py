"""Issue 10's quality bar, measured in one run through the real CLI; writes `docs/results/recovery_bar.md`.

    python scripts/recovery_bar.py                      # about 10 minutes on 2 CPU cores
    python scripts/recovery_bar.py --work /tmp/bar --out /tmp/bar.md --steps 4 --windows 4   # a smoke run

The setup, exactly as the issue states it:

1. TRAIN = the first half (by characters) of `tinystories_val.txt`, written to a file; HELDOUT = the second half.
2. `spp prune --model stories260K-hf --method wanda --pattern 2:4 --calib TRAIN --nsamples 64 --seqlen 256`.
3. For each adapter kind: `spp train --config tinystories.yaml --data TRAIN --max-steps 150 --set batch_size=8
   --set micro_batch_size=8 --set cutoff_len=256 --set val_set_size=0 --set adapter=KIND` (the config's default
   learning rate for that kind), `spp merge`, `spp verify` of the merged model.
4. `spp eval --ppl HELDOUT --seqlen 256 --max-windows 200` of the dense, pruned and every merged model.
5. PEFT LoRA (r=8, alpha 16, all seven projections) trained on the same windows (the `spp train` run's own
   resolved config and `spp.train.build_examples`), the same steps, data order (`global_batch` with the
   config's seed), schedule (`lr_factor`), AdamW settings and gradient clipping, at each rate of
   `--lora-rates`; merged with `merge_and_unload`, saved, and evaluated with the same `spp eval` call.
   Its best is taken.

Recovered = (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense). Pruned entries are checked
bitwise (+0.0) in every merged model against the pruned model's mask file, and kept entries that are zero
(`kept_zero`) are counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from common import REPO, cli_train_config, run, save_merged, saved_zeros, spp_cli, train_peft

KINDS = ("spp", "masked_lora", "full")
LORA_RATES = (4e-3, 1e-2, 2e-2, 4e-2)
BARS = {"spp": 0.75, "masked_lora": 0.78}  # adapter: KIND at the config's default rate must recover at least this


def perplexity(spp: str, model: Path, heldout: Path, windows: int, out: Path, log: list[str]) -> float:
    """`spp eval --ppl HELDOUT --seqlen 256 --max-windows N` of `model`; its perplexity from results.json."""
    run([spp, "eval", "--model", str(model), "--ppl", str(heldout), "--seqlen", "256", "--max-windows", str(windows),
         "--batch-size", "16", "--device", "cpu", "--dtype", "float32", "--output", str(out), "--overwrite"], log)
    (entry,) = json.loads((out / "results.json").read_text())["perplexity"].values()
    return float(entry["ppl"])


def train_config(config: str, pruned: Path, train_txt: Path, steps: int, kind: str):
    """The `TrainConfig` the bar's `spp train` command builds (config file, flags, --set), as the CLI does."""
    return cli_train_config(config, {"base_model": str(pruned), "data_path": str(train_txt), "output_dir": "unused",
                                     "max_steps": steps},
                            ["batch_size=8", "micro_batch_size=8", "cutoff_len=256", "val_set_size=0", f"adapter={kind}"])


def train_peft_lora(pruned: Path, cfg, lr: float, output: Path) -> dict:
    """PEFT LoRA (`common.train_peft`) with `cfg`'s data, order, schedule and optimizer at rate `lr`; merged, saved."""
    start = time.perf_counter()
    model, log = train_peft("lora", dataclasses.replace(cfg, learning_rate=lr))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_merged(model, pruned, output)
    return {"final_loss": log["losses"][-1], "train_s": time.perf_counter() - start, "trainable": trainable}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/data/stories260K-hf")
    parser.add_argument("--text", default="../shared/data/tinystories/tinystories_val.txt")
    parser.add_argument("--config", default="tinystories.yaml")
    parser.add_argument("--work", default="/tmp/spp_recovery_bar")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "recovery_bar.md"))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--lora-rates", default=",".join(f"{r:g}" for r in LORA_RATES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--windows", type=int, default=200, help="held-out perplexity windows of 256 tokens")
    args = parser.parse_args(argv)

    import torch

    from spp.io.manifest import library_versions
    from spp.report import gap_recovered

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    spp, work, log = spp_cli(), Path(args.work), []
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "bar_cache.json"  # finished steps, so a second call (e.g. new config rates) redoes only what changed
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def remember(key: str, value):
        cache[key] = value
        cache_path.write_text(json.dumps(cache, indent=1))
        return value

    text = Path(args.text).read_text(encoding="utf-8")
    middle = len(text) // 2
    train_txt, heldout_txt = work / "train_first_half.txt", work / "heldout_second_half.txt"
    for path, part in ((train_txt, text[:middle]), (heldout_txt, text[middle:])):
        if not path.is_file() or path.read_text(encoding="utf-8") != part:
            path.write_text(part, encoding="utf-8")
            cache.clear()
    pruned = work / "pruned"
    prune_cmd = [spp, "prune", "--model", args.model, "--method", "wanda", "--pattern", "2:4", "--calib",
                 str(train_txt), "--nsamples", "64", "--seqlen", "256", "--output", str(pruned), "--overwrite"]
    if cache.get("prune") != prune_cmd[1:]:
        cache.clear()
        run(prune_cmd, log)
        remember("prune", prune_cmd[1:])
    else:
        log.append(" ".join(prune_cmd) + "   (done in an earlier call of this script)")
    key = f"windows={args.windows}"
    ppl = {name: cache.get(f"ppl:{name}:{key}") or remember(f"ppl:{name}:{key}", perplexity(
        spp, model, heldout_txt, args.windows, work / f"eval-{name}", log))
        for name, model in (("dense", Path(args.model)), ("pruned", pruned))}
    rows = []
    for kind in filter(None, args.kinds.split(",")):
        lr = train_config(args.config, pruned, train_txt, args.steps, kind).learning_rate
        cached_row = cache.get(f"spp:{kind}:{lr:g}:{args.steps}:{key}")
        if cached_row:
            rows.append(cached_row)
            log.append(f"spp train/merge/verify/eval adapter={kind} at {lr:g}   (done in an earlier call)")
            continue
        train_dir, merged = work / f"train-{kind}", work / f"merged-{kind}"
        run([spp, "train", "--config", args.config, "--model", str(pruned), "--data", str(train_txt),
             "--output", str(train_dir), "--max-steps", str(args.steps), "--set", "batch_size=8",
             "--set", "micro_batch_size=8", "--set", "cutoff_len=256", "--set", "val_set_size=0",
             "--set", f"adapter={kind}", "--overwrite"], log)
        from spp.config import read_yaml

        assert read_yaml(train_dir / "spp_config.yaml")["learning_rate"] == lr, "spp train resolved another rate"
        run([spp, "merge", "--adapter", str(train_dir), "--output", str(merged), "--overwrite"], log)
        verify = subprocess.run([spp, "verify", str(merged)], capture_output=True, text=True)
        log.append(f"{spp} verify {merged}   -> exit {verify.returncode}")
        p = perplexity(spp, merged, heldout_txt, args.windows, work / f"eval-{kind}", log)
        rows.append(remember(f"spp:{kind}:{lr:g}:{args.steps}:{key}", {
            "recovery": f"spp train adapter={kind}", "kind": kind, "lr": lr, "ppl": p,
            "recovered": gap_recovered(ppl["dense"], ppl["pruned"], p), "verify_exit": verify.returncode,
            **saved_zeros(merged, pruned)}))
    for lr in (float(r) for r in args.lora_rates.split(",") if r):
        cached_row = cache.get(f"lora:{lr:g}:{args.steps}:{key}")
        if cached_row:
            rows.append(cached_row)
            log.append(f"PEFT LoRA at {lr:g}   (done in an earlier call)")
            continue
        out_dir = work / f"lora-{lr:g}"
        info = train_peft_lora(pruned, train_config(args.config, pruned, train_txt, args.steps, "spp"), lr, out_dir)
        log.append(f"PEFT LoRA r=8 alpha=16 at {lr:g}: {args.steps} steps in this process -> {out_dir} (merged)")
        p = perplexity(spp, out_dir, heldout_txt, args.windows, work / f"eval-lora-{lr:g}", log)
        rows.append(remember(f"lora:{lr:g}:{args.steps}:{key}", {
            "recovery": "PEFT LoRA (merged)", "kind": "lora", "lr": lr, "ppl": p,
            "recovered": gap_recovered(ppl["dense"], ppl["pruned"], p), "verify_exit": None, **info,
            **saved_zeros(out_dir, pruned)}))
    calls = remember("calls", cache.get("calls", []) + [{"started": started, "minutes": (time.perf_counter() - t0) / 60,
                                                          "commands": log}])
    result = {"started": calls[0]["started"], "minutes": sum(c["minutes"] for c in calls), "calls": len(calls),
              "ppl": ppl, "rows": rows, "commands": [line for c in calls for line in c["commands"]], "machine": {"platform": platform.platform(), "cpu_cores": os.cpu_count(),
                                           "torch_threads": torch.get_num_threads(),
                                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                                           "load_avg_1min_end": os.getloadavg()[0]},
              "versions": library_versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(result, args))
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(Path(args.out).read_text())
    return result


def markdown(result: dict, args) -> str:
    rows, ppl = result["rows"], result["ppl"]
    sparse = [r for r in rows if r["kind"] in KINDS]
    lora = [r for r in rows if r["kind"] == "lora"]
    best_sparse = max(sparse, key=lambda r: r["recovered"], default=None)
    best_lora = max(lora, key=lambda r: r["recovered"], default=None)
    lines = ["| recovery | lr | PPL (held-out) | recovered | sparsity after merge | pruned entries ≠ +0.0 | kept_zero "
             "| spp verify |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
             f"| dense | – | {ppl['dense']:.3f} | – | – | – | – | – |",
             f"| Wanda 2:4, no recovery | – | {ppl['pruned']:.2f} | 0.00 | – | – | – | – |"]
    for r in rows:
        verify = "–" if r["verify_exit"] is None else ("passes" if r["verify_exit"] == 0 else f"exit {r['verify_exit']}")
        lines.append(f"| {r['recovery']} | {r['lr']:g} | {r['ppl']:.3f} | {r['recovered']:.3f} | "
                     f"{100 * r['sparsity']:.1f}% | {r['pruned_not_plus_zero']:,} | {r['kept_zero']:,} | {verify} |")

    def verdict(ok: bool) -> str:
        return "**pass**" if ok else "**FAIL**"
    bullets = []
    if best_sparse and best_lora:
        bullets.append(f"- Best sparsity-preserving recipe ≥ PEFT LoRA's best: {best_sparse['recovery']} recovers "
                       f"{best_sparse['recovered']:.3f}, PEFT LoRA's best ({best_lora['lr']:g}) "
                       f"{best_lora['recovered']:.3f}: {verdict(best_sparse['recovered'] >= best_lora['recovered'])}.")
    kept = all(r["pruned_not_plus_zero"] == 0 for r in sparse)
    if sparse:
        bullets.append(f"- Every entry the mask marks pruned is +0.0 after `spp merge`, for every kind: {verdict(kept)} "
                       "(kept_zero: " + ", ".join(f"{r['kind']} {r['kept_zero']:,}" for r in sparse) + ")"
                       + (f"; PEFT LoRA's merge leaves {lora[0]['pruned_not_plus_zero']:,} pruned entries non-zero."
                          if lora else "."))
    for kind, bar in BARS.items():
        r = next((x for x in sparse if x["kind"] == kind), None)
        if r:
            bullets.append(f"- `adapter: {kind}` at the config's default rate ({r['lr']:g}) recovers ≥ {bar}: "
                           f"{r['recovered']:.3f}, {verdict(r['recovered'] >= bar)}.")
    m = result["machine"]
    return "\n".join([
        "# Recovery bar (issue 10), measured in one run",
        "",
        f"Generated by `python scripts/recovery_bar.py` on {result['started']} in {result['minutes']:.1f} minutes"
        + (f" over {result['calls']} calls (later calls reuse the finished steps)" if result["calls"] > 1 else
           " (one call, from scratch)") + ": "
        f"{m['platform']}, {m['cpu_cores']} CPU cores shared with other work (1-minute load {m['load_avg_1min_end']:.1f} "
        f"at the end), OMP_NUM_THREADS={m['OMP_NUM_THREADS']} for the script and every `spp` command it ran (torch "
        f"threads in the script: {m['torch_threads']}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"Setup: TRAIN is the first half by characters of `{args.text}`, the held-out text its second half; "
        f"Wanda 2:4 calibrated on TRAIN (64 × 256 tokens); every recovery trains {args.steps} steps of 8 × 256 "
        "tokens from TRAIN with the config's schedule (5 warmup steps, linear decay, clip 1.0, seed 42); "
        f"perplexity over the first {args.windows} windows of 256 tokens of the held-out half (`spp eval`). "
        "The `spp` rows are the real CLI at `configs/tinystories.yaml`'s default learning rate for the kind; "
        "PEFT LoRA (r = 8, alpha 16, the seven projections) trains on the same windows in the same order with "
        "the same schedule, at each rate listed. Recovered = share of the log-perplexity gap won back.",
        "",
        *lines,
        "",
        "## The bar",
        "",
        *bullets,
        "",
        "## Commands",
        "",
        "```",
        *result["commands"],
        "```",
        "",
    ])


if __name__ == "__main__":
    main()
