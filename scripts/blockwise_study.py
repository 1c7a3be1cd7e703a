"""Block-wise recovery on a small real model: which loss, which teacher inputs, which rate and epochs (issue 26).

The text is cut in two at a line break: the first half calibrates `spp prune` and is block-wise recovery's
calibration text; the second half is held out, its first half for choosing settings (`val`), its second half for
reporting (`test`). Each cell prunes (once per pattern, cached), trains with `objective: blockwise` through
`spp.train.run_train`, and measures perplexity with the adapter unmerged (`spp eval --adapter`'s path). `recovered`
is the share of the log-perplexity gap won back: (log ppl_pruned − log ppl) / (log ppl_pruned − log ppl_dense).
Each finished cell is a JSON file under `--work`/cells, so a rerun skips it. Writes a Markdown table to `--report`.

    taskset -c 0 python scripts/blockwise_study.py --model ../shared/data/stories260K-hf \
        --text ../shared/data/tinystories/tinystories_val.txt --work /tmp/blockwise --report docs/results/blockwise.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

PATTERNS = {"wanda 2:4": dict(method="wanda", pattern="2:4"), "wanda 70%": dict(method="wanda", sparsity=0.7)}
BASE = dict(cutoff_len=128, nsamples=128, batch_size=8, micro_batch_size=8, warmup_ratio=0.0, lr_scheduler="linear",
            block_loss="normalized", block_target_inputs="dense")

# (label, settings): the loss and teacher-input comparison at one rate, then rate and epochs, then the other kinds
GRID = [
    *[(f"{loss}, {inputs} inputs", dict(block_loss=loss, block_target_inputs=inputs, learning_rate=3e-2, block_epochs=4))
      for loss in ("normalized", "mse") for inputs in ("dense", "sparse")],
    *[(f"lr {lr:g}, {e} epochs", dict(learning_rate=lr, block_epochs=e)) for lr in (1e-2, 1e-1) for e in (4,)],
    *[(f"lr {lr:g}, {e} epochs", dict(learning_rate=lr, block_epochs=e)) for lr in (3e-2,) for e in (2, 8)],
    *[(f"lr {lr:g}, {e} epochs", dict(learning_rate=lr, block_epochs=e)) for lr in (3e-1,) for e in (4,)],
    *[(f"lr {lr:g}, {e} epochs", dict(learning_rate=lr, block_epochs=e)) for lr in (1e-1,) for e in (8,)],
    ("normalized, sparse inputs, lr 0.1, 4 epochs", dict(block_target_inputs="sparse", learning_rate=1e-1, block_epochs=4)),
    *[(f"masked_lora lr {lr:g}", dict(adapter="masked_lora", rank=8, learning_rate=lr, block_epochs=4)) for lr in (3e-3, 1e-2)],
    *[(f"full lr {lr:g}", dict(adapter="full", learning_rate=lr, block_epochs=4)) for lr in (3e-4, 1e-3)],
    # end to end on the calibration half, 1 epoch, with logit distillation from the same teacher (for time and quality)
    *[(f"end-to-end {kind} + KD, lr {lr:g}", dict(objective="end_to_end", adapter=kind, learning_rate=lr, kd_weight=1.0,
                                                 batch_size=32, num_epochs=1, val_set_size=0))
      for kind, lr in (("spp", 8e-2), ("full", 4e-3))],
]


SETUP = """Written by `scripts/blockwise_study.py` (the command in its docstring, pinned to one core with `taskset -c 0`,
`OMP_NUM_THREADS=1`). Other jobs shared the machine, so wall times mean nothing; `CPU s` is the training process's
own (`time.process_time()` around `run_train`, loading included). What the numbers decided:
[recovery.md](../recovery.md#block-wise-recovery-objective-blockwise).

The text is cut at a line break: the first half calibrates `spp prune` (Wanda, 64 windows of 256 tokens) and is
the block-wise calibration text; the second half is held out, its first half for choosing settings (`val`), its
second half for reporting (`test`); perplexity at seqlen 256 over the first 40 windows of each. Block-wise cells:
`adapter: spp` unless named, 128 windows of 128 tokens, `batch_size: 8` windows per step in one micro-batch, the
rate decaying linearly over each block without warmup, AdamW without weight decay, `max_grad_norm: 1`;
`normalized` loss and `dense` teacher inputs unless the row names them. The end-to-end rows train on the whole
calibration half (1 epoch, 47 steps of 32 windows of 128 tokens: 12x the block-wise tokens) with cross-entropy +
logit distillation (`kd_weight: 1`) from the same teacher. `recovered` = (log ppl_pruned - log ppl) /
(log ppl_pruned - log ppl_dense). One seed."""


def split_text(text_path: Path, work: Path) -> dict[str, Path]:
    text = text_path.read_text(encoding="utf-8")
    half = text.find("\n", len(text) // 2) + 1
    rest = text[half:]
    quarter = rest.find("\n", len(rest) // 2) + 1
    files = {"calib": text[:half], "val": rest[:quarter], "test": rest[quarter:]}
    work.mkdir(parents=True, exist_ok=True)
    for name, part in files.items():
        (work / f"{name}.txt").write_text(part, encoding="utf-8")
    return {name: work / f"{name}.txt" for name in files}


def perplexities(model: Path, files: dict[str, Path], adapter: Path | None = None) -> dict[str, float]:
    from spp.config import EvalConfig
    from spp.eval import run_eval

    out = {}
    for split in ("val", "test"):
        cfg = EvalConfig(model=str(model), adapter=str(adapter) if adapter else None, ppl=[str(files[split])],
                         seqlen=256, max_windows=40, device="cpu", dtype="float32")
        (entry,) = run_eval(cfg).results["perplexity"].values()
        out[split] = entry["ppl"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()

    from spp.config import PruneConfig, TrainConfig, merge_into
    from spp.io.conditions import describe_conditions, run_conditions
    from spp.prune import run_prune
    from spp.train import run_train

    work = Path(args.work)
    files = split_text(Path(args.text), work)
    cells = work / "cells"
    cells.mkdir(exist_ok=True)
    dense = perplexities(Path(args.model), files)
    rows = []
    for pattern, prune in PATTERNS.items():
        pruned = work / pattern.replace(" ", "-").replace(":", "of").replace("%", "pct")
        if not pruned.is_dir():
            run_prune(PruneConfig(model=args.model, output=str(pruned), calib=str(files["calib"]), nsamples=64,
                                  seqlen=256, device="cpu", **prune))
        base = perplexities(pruned, files)
        for label, settings in GRID:
            cell = cells / f"{pruned.name}--{label.replace(' ', '_').replace(',', '')}.json"
            if not cell.is_file():
                out = work / "train"
                cfg = merge_into(TrainConfig, [("study", {**BASE, "base_model": str(pruned),
                                                          "teacher": args.model, "data_path": str(files["calib"]),
                                                          "output_dir": str(out), "objective": "blockwise",
                                                          "overwrite": True, **settings})])
                wall, cpu = time.perf_counter(), time.process_time()
                report = run_train(cfg)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                ppl = perplexities(pruned, files, out)
                cell.write_text(json.dumps({"ppl": ppl, "wall_s": wall, "cpu_s": cpu, "steps": report.steps,
                                            "train_loss": report.train_loss}))
            result = json.loads(cell.read_text())
            gap = {s: (math.log(base[s]) - math.log(result["ppl"][s])) / (math.log(base[s]) - math.log(dense[s]))
                   for s in ("val", "test")}
            rows.append((pattern, label, base, result, gap))
            print(pattern, label, result["ppl"], gap, flush=True)
    lines = ["# Block-wise recovery on stories260K (issue 26)", "", SETUP, "",
             f"machine: {describe_conditions(run_conditions('cpu', 'float32'))}; {platform.processor() or 'cpu'} "
             f"{platform.machine()}, {os.cpu_count()} cores", "",
             f"dense: val ppl {dense['val']:.3f}, test ppl {dense['test']:.3f}", "",
             "| pruned | block-wise setting (spp unless named) | pruned ppl (test) | ppl val | ppl test | "
             "recovered val | recovered test | final block loss | CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pattern, label, base, result, gap in rows:
        lines.append(f"| {pattern} | {label} | {base['test']:.3f} | {result['ppl']['val']:.3f} | "
                     f"{result['ppl']['test']:.3f} | {gap['val']:.3f} | {gap['test']:.3f} | {result['train_loss']:.4f} | "
                     f"{result['cpu_s']:.1f} |")
    Path(args.report).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
