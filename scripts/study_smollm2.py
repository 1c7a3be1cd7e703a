"""The real-model study: SmolLM2-135M from its GGUF file, pruned, recovered and evaluated through the real CLI.

    python scripts/study_smollm2.py                          # about 90 minutes on 2 CPU cores (see docs/smollm2.md)
    python scripts/study_smollm2.py --work /tmp/s --out /tmp/s.md --steps 2 --limit 4 --windows 2 --only dense,wanda-2:4
                                                             # a smoke run

Every cell is `spp prune` / `spp train` / `spp merge` / `spp verify` / `spp eval` on the command line, from
`--model FILE.gguf` (dequantized once by spp, `spp.io.gguf`), except the dense reference PEFT LoRA, which is
trained in this process on the exact examples, order, schedule and optimizer settings `spp train` uses
(`scripts/common.train_peft`). Cells run in `CELLS` order, most important first; each finished cell
is kept in `WORK/cells/NAME.json`, so a second call redoes nothing and the report can be written from a partial
study (`--report-only`). Evaluation of every model: WikiText-2 perplexity on the protocol text (seqlen 512, the
first `--windows` windows) and lm-eval zero-shot on the local copies of eight tasks (the first `--limit` items of
each; stderr as lm-eval reports it). Every merged model is checked against the pruned model's mask file: pruned
entries bitwise +0.0.
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

from common import DATA, REPO, cli_train_config, run, save_merged, saved_zeros, spp_cli, train_peft
TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "hellaswag", "openbookqa", "rte")
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "boolq": 0.5, "winogrande": 0.5, "hellaswag": 0.25,
          "openbookqa": 0.25, "rte": 0.5}
CONFIG = "smollm2.yaml"  # the recovery settings and per-kind rates (not swept on this model: see the file)
LORA_RATE = 1e-3  # PEFT LoRA's, as masked LoRA's in the config
PRUNES = {"wanda-2:4": ("wanda", "2:4", None), "sparsegpt-2:4": ("sparsegpt", "2:4", None),
          "wanda-50%": ("wanda", "unstructured", 0.5), "sparsegpt-50%": ("sparsegpt", "unstructured", 0.5),
          "wanda-70%": ("wanda", "unstructured", 0.7)}
# (cell name, pruned model, recovery kind or None, training data "c4"/"alpaca", distillation weight), in run order
CELLS = (
    ("dense", None, None, None, 0.0),
    ("wanda-2:4", "wanda-2:4", None, None, 0.0),
    ("wanda-2:4+full+kd/c4", "wanda-2:4", "full", "c4", 1.0),
    ("wanda-2:4+spp+kd/c4", "wanda-2:4", "spp", "c4", 1.0),
    ("wanda-2:4+lora/c4", "wanda-2:4", "lora", "c4", 0.0),
    ("sparsegpt-2:4", "sparsegpt-2:4", None, None, 0.0),
    ("wanda-2:4+full+kd/alpaca", "wanda-2:4", "full", "alpaca", 1.0),
    ("sparsegpt-2:4+full+kd/c4", "sparsegpt-2:4", "full", "c4", 1.0),
    ("wanda-50%", "wanda-50%", None, None, 0.0),
    ("sparsegpt-50%", "sparsegpt-50%", None, None, 0.0),
    ("wanda-70%", "wanda-70%", None, None, 0.0),
)


def prepare_data(work: Path, c4: Path) -> dict[str, Path]:
    """C4 documents 200.. as the recovery text (the calibration windows are drawn from the whole sample)."""
    docs = [json.loads(line)["text"] for line in c4.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = work / "c4_train.txt"
    text = "\n\n".join(docs[200:])
    if not train.is_file() or train.read_text(encoding="utf-8") != text:
        train.write_text(text, encoding="utf-8")
    return {"c4": train, "alpaca": DATA / "alpaca" / "alpaca_small.json"}


def evaluate(spp: str, model: Path | str, args, out: Path, log: list[str]) -> dict:
    """WikiText-2 perplexity and the zero-shot tasks of one model, from `spp eval`'s results.json."""
    run([spp, "eval", "--model", str(model), "--ppl", f"wikitext2:{DATA / 'wikitext-2-raw' / 'wikitext-test.txt'}",
         "--seqlen", "512", "--max-windows", str(args.windows), "--tasks", ",".join(TASKS),
         "--task-data", str(DATA / "eval"), "--limit", str(args.limit), "--batch-size", "16", "--device", "cpu",
         "--dtype", "float32", "--output", str(out), "--overwrite"], log)
    results = json.loads((out / "results.json").read_text())
    (ppl,) = results["perplexity"].values()
    return {"ppl": ppl["ppl"], "ppl_windows": ppl["windows"], "zeroshot": results["zeroshot"]["tasks"],
            "mean_acc": results["zeroshot"]["mean_acc"], "source": results.get("source")}


def train_settings(kind: str, data: str, steps: int) -> list[str]:
    """The `spp train --config smollm2.yaml` --set list of a recovery cell (also the PEFT LoRA reference's)."""
    sets = [f"save_steps={steps}", f"eval_steps={steps}"] + ([] if kind == "lora" else [f"adapter={kind}"])
    return sets + (["data_format=alpaca"] if data == "alpaca" else [])


def run_cell(name: str, pruned_name: str | None, kind: str | None, data: str | None, kd: float, args, spp: str,
             work: Path, texts: dict[str, Path], log: list[str]) -> dict:
    from spp.config import read_yaml

    t0 = time.perf_counter()
    if pruned_name is None:
        return {**evaluate(spp, args.model, args, work / "eval-dense", log), "minutes": (time.perf_counter() - t0) / 60}
    pruned = work / f"pruned-{pruned_name}".replace(":", "-").replace("%", "pct")
    if not (pruned / "spp_manifest.json").is_file():
        method, pattern, sparsity = PRUNES[pruned_name]
        cmd = [spp, "prune", "--model", args.model, "--method", method, "--pattern", pattern,
               "--calib", str(DATA / "c4" / "c4_sample.jsonl"), "--nsamples", str(args.nsamples), "--seqlen", "512",
               "--device", "cpu", "--output", str(pruned), "--overwrite"]
        run(cmd + (["--sparsity", str(sparsity)] if sparsity else []), log)
    slug = name.replace(":", "-").replace("%", "pct").replace("/", "-").replace("+", "_")
    if kind is None:
        return {**evaluate(spp, pruned, args, work / f"eval-{slug}", log), "pruned_dir": str(pruned),
                "minutes": (time.perf_counter() - t0) / 60}
    merged = work / f"merged-{slug}"
    sets = train_settings(kind, data, args.steps)
    if kind == "lora":
        cfg = cli_train_config(CONFIG, {"base_model": str(pruned), "data_path": str(texts[data]),
                                        "output_dir": "unused", "max_steps": args.steps}, sets)
        model, peft_log = train_peft("lora", dataclasses.replace(cfg, learning_rate=LORA_RATE))
        extra = {"final_loss": peft_log["losses"][-1], "trainable": sum(p.numel() for p in model.parameters()
                                                                          if p.requires_grad)}
        save_merged(model, pruned, merged)
        log.append(f"PEFT LoRA r=8 alpha=16 at {LORA_RATE:g}, {args.steps} steps, {' '.join(sets)} -> {merged}")
    else:
        train_dir = work / f"train-{slug}"
        cmd = [spp, "train", "--config", CONFIG, "--model", str(pruned), "--data", str(texts[data]), "--output", str(train_dir),
               "--max-steps", str(args.steps), "--overwrite"]
        if kd:
            cmd += ["--teacher", args.model, "--set", f"kd_weight={kd}"]
        run(cmd + [a for s in sets for a in ("--set", s)], log)
        run([spp, "merge", "--adapter", str(train_dir), "--output", str(merged), "--overwrite"], log)
        verify = subprocess.run([spp, "verify", str(merged)], capture_output=True, text=True)
        log.append(f"{spp} verify {merged}   -> exit {verify.returncode}")
        extra = {"verify_exit": verify.returncode}
    result = evaluate(spp, merged, args, work / f"eval-{slug}", log)
    return {**result, **extra, **saved_zeros(merged, pruned), "kind": kind, "data": data, "kd_weight": kd,
            "lr": LORA_RATE if kind == "lora" else read_yaml(work / f"train-{slug}" / "spp_config.yaml")["learning_rate"],
            "steps": args.steps, "minutes": (time.perf_counter() - t0) / 60}


def markdown(cells: dict[str, dict], meta: dict) -> str:
    """The results table (one row per finished cell) and how it was made."""
    lines = [f"# SmolLM2-135M-Instruct: dense → pruned → recovered ({meta['machine']})", "",
             f"From `{meta['model']}` (GGUF Q4_1, dequantized by `spp` to float32). WikiText-2 perplexity: protocol "
             f"text, seqlen 512, first {meta['windows']} windows. Zero-shot: lm-eval {meta['versions'].get('lm_eval')}"
             f" on the local task copies, first {meta['limit']} items per task, 0-shot, `acc` (± lm-eval's stderr). "
             f"Recovery: {meta['steps']} steps of 8 × 256 tokens (C4 documents 200–999, or the Alpaca sample). "
             "Sparsity is of the decoder linears, counted after merge.", "",
             "| model | sparsity | wiki ppl | " + " | ".join(TASKS) + " | mean acc |",
             "|---|---:|---:|" + "---:|" * (len(TASKS) + 1)]
    for name, c in cells.items():
        accs = " | ".join(f"{c['zeroshot'][t]['acc']:.3f} ± {c['zeroshot'][t].get('acc_stderr', 0):.3f}"
                          for t in TASKS)
        sparsity = f"{c['sparsity']:.1%}" if "sparsity" in c else ("0%" if name == "dense" else "as pruned")
        lines.append(f"| {name} | {sparsity} | {c['ppl']:.2f} | {accs} | {c['mean_acc']:.3f} |")
    lines += ["", "Recovery cells: " + "; ".join(
        f"{n}: rate {c['lr']:g}, {c['minutes']:.1f} min, pruned entries not +0.0 after merge: "
        f"{c['pruned_not_plus_zero']}" + (f", spp verify exit {c['verify_exit']}" if 'verify_exit' in c else "")
        for n, c in cells.items() if "kind" in c), "",
        f"Chance: {', '.join(f'{t} {p:.2f}' for t, p in CHANCE.items())}. HellaSwag is approximate (see "
        "`spp eval`'s note on the local copy).", "",
        f"Report written {meta['started']}; the cells took {meta['minutes']:.0f} min in all; versions {meta['versions']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--work", default="/tmp/spp_smollm2")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "smollm2.md"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--limit", type=int, default=100, help="zero-shot items per task")
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--only", default="", help="comma list of cell names (default: all, in order)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished cells")
    args = parser.parse_args(argv)

    from spp.io.manifest import library_versions

    spp, work, log = spp_cli(), Path(args.work), []
    (work / "cells").mkdir(parents=True, exist_ok=True)
    texts = prepare_data(work, DATA / "c4" / "c4_sample.jsonl")
    wanted = [c for c in CELLS if not args.only or c[0] in args.only.split(",")]
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cells = {}
    for name, pruned_name, kind, data, kd in wanted:
        path = work / "cells" / (name.replace("/", "_") + ".json")
        key = {"steps": args.steps, "limit": args.limit, "windows": args.windows, "nsamples": args.nsamples}
        if path.is_file() and json.loads(path.read_text())["key"] == key:
            cells[name] = json.loads(path.read_text())["result"]
            continue
        if args.report_only:
            continue
        print(f"== {name}", flush=True)
        cells[name] = run_cell(name, pruned_name, kind, data, kd, args, spp, work, texts, log)
        path.write_text(json.dumps({"key": key, "result": cells[name], "commands": log}, indent=1))
        log = []
    import torch

    meta = {"model": Path(args.model).name, "windows": args.windows, "limit": args.limit, "steps": args.steps,
            "started": started, "minutes": sum(c.get("minutes", 0) for c in cells.values()) or
            (time.perf_counter() - t0) / 60, "versions": library_versions(),
            "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads, {platform.machine()}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(cells, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    print(out.read_text())
    return cells


if __name__ == "__main__":
    main()
