"""The recovery study: prune, recover with every adapter at a swept learning rate, with and without
distillation from the dense model, measure, and write `docs/results/`.

    python scripts/study.py                                   # stories260K, Wanda 2:4
    python scripts/study.py --grid tiny --out /tmp/r --work /tmp/w   # a few cells, a few steps
    python scripts/study.py --pairs wanda-2:4,sparsegpt-2:4   # more pruned models
    python scripts/study.py --model PATH --device cuda        # any causal LM, e.g. a 7B on a GPU

What it does, for every cell (one pruned model, one recovery, one learning rate, one seed), through spp's own
stage entries, as the CLI runs them:

1. prune the model with `spp.prune.run_prune`, calibrated on the first half of the TinyStories text;
2. recover with one of: nothing; spp's sparsity-preserving adapters (`spp.train.run_train` with adapter `spp`,
   `masked_lora` or `full`, then `spp.merge.run_merge`); PEFT LoRA (evaluated unmerged, then merged with
   `merge_and_unload`); PEFT HiRA (merged). Each with the plain cross-entropy loss, or with logit distillation
   from the dense model added (`kd_weight` with the dense model as `teacher`). PEFT trains in
   `common.train_peft`, on the examples `spp train` builds from the same settings, in the same order, with the
   same loss, schedule, AdamW settings and seed;
3. measure, with `spp.eval.perplexity.perplexity`: the mean token NLL on a validation slice of the training text
   (the last `val_share` of the first half, never trained on) and the perplexity on the first `eval_windows`
   windows of `eval_seqlen` tokens of the second half of the TinyStories text and of WikiText-2; the sparsity of
   the weights the final model multiplies by, and whether every entry the mask marks pruned is +0.0
   (`common.zeros_check`, `spp.sparsity`); trainable parameters and the training-step time.

The learning rate of each (recovery, distillation) is chosen on the validation NLL of seed 0 over a
grid (`LR_GRIDS`); a grid whose best rate is at its edge is extended one rung of `LADDER` (at most
`MAX_EXTENSIONS` times). The chosen rate then runs with the other seeds. `plan` derives all cells
from the cache, so the study is a fixed point: run what is planned, plan again, until nothing is
missing.

Each finished cell is cached as JSON under `--work`, so an interrupted study resumes where it
stopped; the tables, `study.json` and the plots (`study_report.py`) are rebuilt from the cache. Pruned
checkpoints are cached there too. Nothing in the tables is typed in by hand: they come from the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import DATA, REPO, pruned_masks, split_halves, train_peft, zeros_check
from study_report import write_report

from spp.errors import SppError

PATTERNS = {"50%": ("unstructured", 0.5), "75%": ("unstructured", 0.75), "2:4": ("2:4", None)}
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSE_KINDS = ("spp", "masked_lora", "full")  # spp's own sparsity-preserving recoveries (spp.adapter)
PEFT_KINDS = ("lora", "hira")
KINDS = SPARSE_KINDS + PEFT_KINDS
DISTILL = ("", "kd")  # "": cross-entropy only; "kd": + kd_weight · logit KL(dense teacher ‖ student) at T
COMMON_RATE = 4e-3  # the SPP paper's rate, which the earlier study used for every adapter
# Rates are rungs of one ladder (about ×2 apart) so that an extension lands on a known rate.
LADDER = (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 1e-2, 2e-2, 4e-2, 8e-2, 1.6e-1, 3.2e-1)
LR_GRIDS = {  # the first grid of each recovery (every one holds COMMON_RATE); edges extend by `plan`
    "spp": (4e-3, 2e-2, 4e-2, 8e-2),
    "masked_lora": (4e-3, 1e-2, 2e-2, 4e-2),
    "full": (1e-3, 2e-3, 4e-3, 1e-2),
    "lora": (4e-3, 1e-2, 2e-2, 4e-2),
    "hira": (4e-3, 2e-2, 4e-2, 8e-2),
}
MAX_EXTENSIONS = 2  # per grid edge
HEADLINE_KINDS = ("spp", "masked_lora", "full", "lora")  # candidates of the answer table: these get 3 seeds


# --------------------------------------------------------------------------- settings and grid


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the numbers of a cell (its sha256 keys the cache).

    Training (`spp.train.TrainConfig`): `steps` AdamW steps of `batch_size` windows of `seqlen` tokens, peak rate
    from the cell (`learning_rate` when the cell has none) with linear warmup over `warmup_ratio` of the steps
    then linear decay, gradients clipped to `max_grad_norm`. Adapters: SPP with `spp_row_groups` row groups and
    scale `lora_alpha / lora_r`; masked LoRA, PEFT LoRA and HiRA rank `lora_r`, scale `lora_alpha / lora_r`.
    Distillation (cells with `distill` "kd"): loss = ce_weight · NLL/N + kd_weight · T²·KL(teacher ‖ student)/N
    at temperature `kd_temperature`, the teacher being the dense `model`. The last `val_share` of the first half
    (from a line break) is held out of training and chooses the learning rate.
    """

    model: str = str(DATA / "stories260K-hf")
    text: str = str(DATA / "tinystories" / "tinystories_val.txt")
    wikitext: str = str(DATA / "wikitext-2-raw" / "wikitext-test.txt")
    calib_nsamples: int = 64
    calib_seqlen: int = 256
    steps: int = 150
    batch_size: int = 8
    seqlen: int = 256
    learning_rate: float = COMMON_RATE
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    spp_row_groups: int = 16
    lora_r: int = 8
    lora_alpha: float = 16.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    val_share: float = 0.08
    eval_windows: int = 200
    eval_seqlen: int = 256
    eval_batch_size: int = 16
    device: str = "cpu"

    def sha256(self) -> str:
        from spp.io.manifest import settings_sha256

        return settings_sha256(asdict(self))


TINY = dict(calib_nsamples=4, calib_seqlen=128, steps=4, batch_size=2, seqlen=64, eval_windows=2, eval_seqlen=128,
            eval_batch_size=2)


@dataclass(frozen=True)
class Cell:
    """One pruned model, one way to recover it, one peak learning rate and one seed.

    `method` "dense" is the unpruned model; `lr` None means `StudySettings.learning_rate`;
    `distill` "kd" adds logit distillation from the dense model.
    """

    method: str
    pattern: str
    adapter: str = "none"
    seed: int = 0
    lr: float | None = None
    distill: str = ""

    @property
    def prune_key(self) -> str:
        return f"{self.method}-{self.pattern.replace(':', 'of').replace('%', 'pct')}-s{self.seed}"

    @property
    def key(self) -> str:
        return (f"{self.prune_key}-{self.adapter}" + (f"-lr{self.lr:g}" if self.lr is not None else "")
                + (f"-{self.distill}" if self.distill else ""))

    @property
    def recipe(self) -> tuple[str, str, str, str]:
        """(method, pattern, adapter, distill): what a learning rate is chosen for."""
        return (self.method, self.pattern, self.adapter, self.distill)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'wanda-2:4,sparsegpt-50%' -> [(wanda, 2:4), (sparsegpt, 50%)].

    Raises:
        SppError: an unknown method or pattern (names it).
    """
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        method, _, pattern = item.partition("-")
        if method not in METHODS or pattern not in PATTERNS:
            raise SppError(f"--pairs {item!r}: expected METHOD-PATTERN with METHOD in {', '.join(METHODS)} "
                           f"and PATTERN in {', '.join(PATTERNS)}")
        pairs.append((method, pattern))
    return pairs


def validation_nll(record: dict | None) -> float:
    """The cell's validation NLL (the first row's; LoRA's two rows are the same function), inf if diverged or missing."""
    if record is None or record.get("diverged") or not record.get("rows"):
        return math.inf
    value = record["rows"][0].get("val_nll")
    return math.inf if value is None or not math.isfinite(value) else value


def kd_grid(plain_best: float) -> tuple[float, ...]:
    """The first grid of a distillation recipe: the rate its cross-entropy twin chose and the rungs either side."""
    i = LADDER.index(plain_best)
    return LADDER[max(i - 1, 0): i + 2]


def sweep(recipe: tuple, records: dict[str, dict], seed: int, grid: tuple[float, ...] | None = None) -> dict:
    """The learning-rate sweep of one recipe at `seed`, as far as `records` allow.

    Starts from `grid` (default `LR_GRIDS[adapter]`); while every rate so far is recorded and the
    best validation NLL sits at an edge with a further rung of `LADDER`, adds that rung (at most
    MAX_EXTENSIONS per edge).

    Returns:
        {"rates": rates to run (sorted), "best": the chosen rate or None while some are missing,
         "edge": True when the best stayed at an edge of the final grid, "extended": rungs added,
         "grid": the first grid, "val_nll": by rate, once chosen}.
    """
    method, pattern, adapter, distill = recipe
    rates = sorted(LR_GRIDS[adapter] if grid is None else grid)
    first = list(rates)
    added = {"low": 0, "high": 0}
    while True:
        vals = {lr: validation_nll(records.get(Cell(method, pattern, adapter, seed, lr, distill).key))
                for lr in rates}
        if any(Cell(method, pattern, adapter, seed, lr, distill).key not in records for lr in rates):
            return {"rates": rates, "best": None, "edge": None, "extended": added, "grid": first}
        best = min(rates, key=lambda lr: (vals[lr], lr))  # ties: the smaller rate
        i = LADDER.index(best)
        if best == rates[-1] and i + 1 < len(LADDER) and added["high"] < MAX_EXTENSIONS:
            rates, added["high"] = rates + [LADDER[i + 1]], added["high"] + 1
        elif best == rates[0] and i > 0 and added["low"] < MAX_EXTENSIONS:
            rates, added["low"] = [LADDER[i - 1]] + rates, added["low"] + 1
        else:
            edge = best in (rates[0], rates[-1]) and math.isfinite(vals[best])
            return {"rates": rates, "best": best if math.isfinite(vals[best]) else None, "edge": edge,
                    "extended": added, "grid": first, "val_nll": {f"{lr:g}": vals[lr] for lr in rates}}


def plan(name: str, records: dict[str, dict], seeds: tuple[int, ...] = (0, 1, 2),
         pairs: list[tuple[str, str]] | None = None, kinds: tuple[str, ...] = KINDS,
         distills: tuple[str, ...] = DISTILL) -> tuple[list[Cell], dict]:
    """The cells of a grid that `records` (the cache) make known, and each recipe's sweep.

    `full`: the dense model; per (method, pattern) in `pairs` (default Wanda 2:4): the pruned
    model with every seed; every recovery in `kinds` at each rate of its sweep (`LR_GRIDS`,
    extended at an edge) with seeds[0]; with distillation, once the cross-entropy sweep of the
    same recovery has chosen a rate, the sweep starts from that rate and its two neighbours
    (`kd_grid`, also extended at an edge). The other seeds run at the chosen rate for the
    headline candidates only (`HEADLINE_KINDS`, cross-entropy; with KD where it beat its
    cross-entropy twin on validation). Cells run in priority order: cross-entropy sweeps, their
    seeds, KD sweeps of the headline kinds, their seeds, HiRA with KD, so a study cut short has
    the most important cells first. Cells the
    cache lacks are what the next run computes; running them may extend a sweep or choose a rate,
    which plans more cells (see `main`). `tiny`: dense, Wanda 50 % pruned, and every recovery at
    the settings' rate (SPP also with distillation), for the test.

    Returns:
        (cells in the order to run them, {recipe key: sweep} for `full`).
    """
    if name == "tiny":
        cells = [Cell("dense", "0%"), Cell("wanda", "50%")]
        cells += [Cell("wanda", "50%", a) for a in ("spp", "masked_lora", "full", "lora", "hira")]
        return cells + [Cell("wanda", "50%", "spp", distill="kd")], {}
    if name != "full":
        raise SppError(f"--grid {name!r} is not one of full, tiny")
    pairs = pairs or [("wanda", "2:4")]
    # 0: baselines and cross-entropy sweeps; 1: their seeds (headline kinds); 2: KD sweeps (headline kinds);
    # 3: KD seeds where KD beat its twin on validation; 4: HiRA with KD (one seed, like every non-headline cell)
    stages: list[list[Cell]] = [[Cell("dense", "0%")], [], [], [], []]
    sweeps = {}
    for method, pattern in pairs:
        stages[0] += [Cell(method, pattern, "none", s) for s in seeds]
        for adapter in kinds:
            for distill in distills:
                recipe = (method, pattern, adapter, distill)
                grid, plain = None, sweeps.get("/".join((method, pattern, adapter, "")))
                if distill:
                    if plain is None and "" not in distills:  # KD alone: the recovery's own grid
                        grid = LR_GRIDS[adapter]
                    elif plain is None or plain["best"] is None:
                        continue  # waits for its cross-entropy twin to choose a rate
                    else:
                        grid = kd_grid(plain["best"])
                found = sweep(recipe, records, seeds[0], grid)
                sweeps["/".join(recipe)] = found
                headline = adapter in HEADLINE_KINDS
                stage = 0 if not distill else 2 if headline else 4
                stages[stage] += [Cell(method, pattern, adapter, seeds[0], lr, distill) for lr in found["rates"]]
                if found["best"] is None or not headline:
                    continue
                if distill and plain is not None and plain["best"] is not None and (
                        found["val_nll"][f"{found['best']:g}"] >= plain["val_nll"][f"{plain['best']:g}"]):
                    continue  # KD did not beat cross-entropy on validation: not a headline candidate
                stages[3 if distill else 1] += [Cell(method, pattern, adapter, s, found["best"], distill)
                                                for s in seeds[1:]]
    return [c for stage in stages for c in stage], sweeps


# --------------------------------------------------------------------------- data


@dataclass
class StudyData:
    """What every cell shares: the text files spp reads, and the token ids each model is measured on."""

    calib_path: str  # the first half, for `run_prune --calib`
    train_path: str  # the first half without the validation slice, for `spp train` and PEFT
    eval_ids: dict[str, torch.Tensor]  # "val", "tinystories", "wikitext" -> (n,) ids
    split: dict  # where the text was cut, and token counts


def prepare_data(settings: StudySettings, work: Path) -> StudyData:
    """Split the text (calibration and training half, validation slice, evaluation half), write the files spp reads,
    tokenize the three measured texts."""
    from spp.eval.perplexity import local_text, set_ids, tokenize_text
    from spp.models import load_tokenizer

    path = Path(settings.text)
    if not path.is_file():
        raise SppError(f"--text {path} does not exist")
    first, second = split_halves(path.read_text(encoding="utf-8"))
    cut = first.find("\n", int(len(first) * (1 - settings.val_share)))
    train, val = (first, "") if cut < 0 else (first[: cut + 1], first[cut + 1:])
    work.mkdir(parents=True, exist_ok=True)
    files = {"calib": (work / "calib_first_half.txt", first), "train": (work / "train_text.txt", train)}
    for file, text in files.values():
        if not file.is_file() or file.read_text(encoding="utf-8") != text:
            file.write_text(text, encoding="utf-8")
    tokenizer = load_tokenizer(settings.model)
    eval_ids = {"val": tokenize_text(tokenizer, val), "tinystories": tokenize_text(tokenizer, second),
                "wikitext": set_ids(tokenizer, local_text(Path(settings.wikitext), "wikitext2"), settings.eval_seqlen)}
    if eval_ids["val"].numel() < 2 * settings.seqlen:
        raise SppError(f"the validation slice (--val-share {settings.val_share}) has {eval_ids['val'].numel()} tokens, "
                       f"fewer than two windows of {settings.seqlen}")
    for name in ("tinystories", "wikitext"):
        if eval_ids[name].numel() < settings.eval_seqlen * settings.eval_windows:
            raise SppError(f"the {name} evaluation text has {eval_ids[name].numel()} tokens, fewer than "
                           f"{settings.eval_windows} windows of {settings.eval_seqlen}")
    split = {"text_chars": len(first) + len(second), "cut_at_char": len(first), "val_at_char": len(train),
             "val_tokens": int(eval_ids["val"].numel()),
             "eval_tokens_used": {k: settings.eval_windows * settings.eval_seqlen for k in ("tinystories", "wikitext")},
             "eval_tokens_available": {k: int(eval_ids[k].numel()) for k in ("tinystories", "wikitext")}}
    return StudyData(calib_path=str(files["calib"][0]), train_path=str(files["train"][0]), eval_ids=eval_ids,
                     split=split)


# --------------------------------------------------------------------------- one cell


def evaluate(model, data: StudyData, settings: StudySettings) -> dict:
    """Validation NLL (every `seqlen` window of the slice), perplexity on each set (the first `eval_windows`
    windows of `eval_seqlen`) and the time the forward passes took."""
    from spp.eval.perplexity import perplexity

    device = next(model.parameters()).device
    out, seconds = {}, 0.0
    for name, ids in data.eval_ids.items():
        seqlen, windows = (settings.seqlen, None) if name == "val" else (settings.eval_seqlen, settings.eval_windows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out[name] = perplexity(model, ids, seqlen, settings.eval_batch_size, windows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    sets = {k: {"ppl": r.ppl, "nll_sum": r.nll_sum, "predicted_tokens": r.predicted_tokens, "windows": r.windows}
            for k, r in out.items() if k != "val"}
    tokens = sum(r.predicted_tokens for r in out.values())
    return {"val_nll": out["val"].nll_sum / out["val"].predicted_tokens, "ppl": {k: v["ppl"] for k, v in sets.items()},
            "sets": sets, "infer_s": seconds, "infer_tokens_per_s": tokens / seconds}


def train_config(cell: Cell, settings: StudySettings, data: StudyData, pruned: Path, output: Path, lr: float):
    """The `spp train` settings of a cell (the PEFT reference trains with the same)."""
    from spp.config import TrainConfig

    kd = cell.distill == "kd"
    return TrainConfig(base_model=str(pruned), data_path=data.train_path, output_dir=str(output), data_format="text",
                       cutoff_len=settings.seqlen, val_set_size=0, micro_batch_size=settings.batch_size,
                       batch_size=settings.batch_size, max_steps=settings.steps, learning_rate=lr,
                       warmup_ratio=settings.warmup_ratio, max_grad_norm=settings.max_grad_norm, seed=cell.seed,
                       logging_steps=1, save_steps=settings.steps, eval_steps=settings.steps,
                       adapter=cell.adapter if cell.adapter in SPARSE_KINDS else "spp",
                       spp_row_groups=settings.spp_row_groups, rank=settings.lora_r, lora_alpha=settings.lora_alpha,
                       lora_r=settings.lora_r, teacher=settings.model if kd else "", ce_weight=settings.ce_weight,
                       kd_weight=settings.kd_weight if kd else 0.0, kd_temperature=settings.kd_temperature,
                       overwrite=True)


def train_sparse(cfg, pruned: Path, merged: Path) -> tuple[dict, int]:
    """`run_train` then `run_merge` into `merged`. Returns (the training log, trainable parameters); a
    non-finite loss is a result of the sweep, recorded as `diverged_at`, not an error."""
    from spp.config import MergeConfig
    from spp.io.checkpoint import TRAIN_LOG_FILE
    from spp.merge import run_merge
    from spp.train import run_train

    try:
        report = run_train(cfg)
    except SppError as exc:
        found = re.match(r"the training loss is \S+ at step (\d+)", str(exc))
        if not found:
            raise
        shutil.rmtree(cfg.output_dir + ".partial", ignore_errors=True)
        return {"losses": [], "kd_losses": [], "step_times": [], "diverged_at": int(found[1])}, 0
    records = [json.loads(line) for line in (Path(cfg.output_dir) / TRAIN_LOG_FILE).read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip([{"tokens_seen": 0}] + records, records)]
    run_merge(MergeConfig(model=str(pruned), adapter=cfg.output_dir, output=str(merged), overwrite=True))
    return {"losses": [r.get("ce", r["loss"]) for r in records], "kd_losses": [r["kd"] for r in records if "kd" in r],
            "step_times": [n / r["tokens_per_s"] for n, r in zip(tokens, records)], "diverged_at": None}, \
        report.trainable_params


def run_cell(cell: Cell, settings: StudySettings, data: StudyData, work: Path) -> dict:
    """Prune (from the cache), recover and measure one cell. Returns its JSON record.

    Records one row per final model: `none`, `spp` / `masked_lora` / `full` (merged),
    `lora-unmerged` and `lora-merged`, `hira` (merged). A diverged cell has no rows, only `diverged`.
    """
    from spp.models import load_model, resolve_device

    start = time.perf_counter()
    device = resolve_device(settings.device)
    pruned = pruned_dir(work, cell, settings)
    source = settings.model if cell.method == "dense" else str(pruned)
    masks = {} if cell.method == "dense" else pruned_masks(pruned, device)
    base = load_model(source, "float32", device)
    lr = settings.learning_rate if cell.lr is None else cell.lr
    record = {"key": cell.key, "cell": asdict(cell), "settings_sha256": settings.sha256(), "rows": [],
              "model_params": sum(p.numel() for p in base.parameters()), "learning_rate": lr}
    base_zeros = zeros_check(base, masks)

    def row(name: str, final, trainable: int, zeros: dict | None = None, **extra) -> None:
        record["rows"].append({"recovery": name, **evaluate(final, data, settings), "trainable": trainable,
                               **(zeros or zeros_check(final, masks)), **extra})

    scratch = work / "scratch" / cell.key  # training output and merged model: measured, then removed
    if cell.adapter == "none":
        row("none", base, 0, base_zeros)
    elif cell.adapter in SPARSE_KINDS:
        cfg = train_config(cell, settings, data, pruned, scratch / "train", lr)
        log, trainable = train_sparse(cfg, pruned, scratch / "merged")
        if log["diverged_at"] is None:
            row(cell.adapter, load_model(str(scratch / "merged"), "float32", device), trainable)
    else:
        del base
        teacher = load_model(settings.model, "float32", device).requires_grad_(False).eval() if cell.distill else None
        cfg = train_config(cell, settings, data, pruned, scratch / "train", lr)
        model, log = train_peft(cell.adapter, cfg, device, teacher)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if log["diverged_at"] is None and cell.adapter == "lora":
            # unmerged: the sparse base runs as pruned, plus a dense rank-r branch of `trainable` weights
            row("lora-unmerged", model, trainable, base_zeros, dense_adapter_params=trainable)
            row("lora-merged", model.merge_and_unload(), trainable)
        elif log["diverged_at"] is None:
            row("hira", model.merge_and_unload(), trainable)  # W + W ⊙ (B·A): the zeros of W survive the merge
    shutil.rmtree(scratch, ignore_errors=True)
    if cell.adapter != "none":
        times = log.pop("step_times")
        log["step_s"] = statistics.median(times[1:] or times) if times else math.nan
        log["learning_rate"] = lr
        record.update(train=log, trainable=trainable)
        if log["diverged_at"] is not None:
            record["diverged"] = log["diverged_at"]
    record["base_sparsity"] = base_zeros["sparsity"]
    record["wall_s"] = time.perf_counter() - start
    return record


def prune_one(cell: Cell, settings: StudySettings, data: StudyData, work: Path) -> None:
    """`run_prune` for the cell's (method, pattern, seed) into `work/pruned/` unless it is there already."""
    from spp.config import PruneConfig
    from spp.io.checkpoint import MANIFEST_FILE
    from spp.prune import run_prune

    output = pruned_dir(work, cell, settings)
    if not (output / MANIFEST_FILE).is_file():
        pattern, sparsity = PATTERNS[cell.pattern]
        run_prune(PruneConfig(model=settings.model, output=str(output), method=cell.method, pattern=pattern,
                              sparsity=sparsity, calib=data.calib_path, nsamples=settings.calib_nsamples,
                              seqlen=settings.calib_seqlen, seed=cell.seed, device=settings.device, dtype="float32",
                              overwrite=True))


# --------------------------------------------------------------------------- the grid, cached


def pruned_dir(work: Path, cell: Cell, settings: StudySettings) -> Path:
    """Where the cell's pruned model is cached: named by (method, pattern, seed) and the calibration size."""
    return work / "pruned" / f"{cell.prune_key}-c{settings.calib_nsamples}x{settings.calib_seqlen}"


def cell_path(work: Path, cell: Cell) -> Path:
    return work / "cells" / f"{cell.key}.json"


def cached_records(work: Path, settings: StudySettings) -> dict[str, dict]:
    """Every cell record under `work/cells` computed with these settings, by key (a torn write is skipped)."""
    out = {}
    for path in sorted((work / "cells").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if record.get("settings_sha256") == settings.sha256():
            out[record["key"]] = record
    return out


def save_record(work: Path, cell: Cell, record: dict) -> None:
    """Write a cell's record atomically (temporary file, then rename)."""
    path = cell_path(work, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def run_grid(cells: list[Cell], settings: StudySettings, work: Path, data: StudyData, log=print) -> dict:
    """Prune what the cells need, then run every cell, one after another; each record is cached as it finishes.

    Returns:
        This run's timing: wall seconds, cells computed, threads, load, the data split.
    """
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    prunes = list({c.prune_key: c for c in cells if c.method != "dense"}.values())
    log(f"running {len(cells)} cells (pruning up to {len(prunes)} models), {torch.get_num_threads()} thread(s)")
    for cell in prunes:
        prune_one(cell, settings, data, work)
    for cell in cells:
        record = run_cell(cell, settings, data, work)
        save_record(work, cell, record)
        if record.get("diverged"):
            log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  diverged at step {record['diverged']}")
            continue
        ppl = ", ".join(f"{r['recovery']} {r['ppl']['tinystories']:.3f}/{r['ppl']['wikitext']:.1f}"
                        for r in record["rows"])
        log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  val {record['rows'][0]['val_nll']:.4f}  "
            f"ppl tinystories/wikitext: {ppl}")
    return {"wall_s": time.perf_counter() - start, "cells_computed": len(cells), "prunes": len(prunes),
            "threads": torch.get_num_threads(), "settings_sha256": settings.sha256(),
            "load_avg_1min_start": load_start, "load_avg_1min_end": os.getloadavg()[0], "device": settings.device,
            "split": data.split}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, run the grid to its fixed point (resuming from `--work`), and write the report into `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="full", choices=["full", "tiny"])
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="where tables, JSON and plots go")
    parser.add_argument("--work", default=str(REPO / "runs" / "study"), help="cache of pruned models and cells")
    parser.add_argument("--pairs", default="wanda-2:4", help="pruned models to recover: METHOD-PATTERN, comma-separated")
    parser.add_argument("--kinds", default=",".join(KINDS), help="recoveries, comma-separated")
    parser.add_argument("--distill", default="none,kd", help="'none' and/or 'kd', comma-separated")
    parser.add_argument("--only", default=None, help="comma-separated globs over cell keys (e.g. 'dense*,*-spp-*')")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached cells only")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's caveats (repeatable)")
    for f in dataclasses.fields(StudySettings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)
                 if getattr(args, f.name) is not None}
    settings = StudySettings(**{**(TINY if args.grid == "tiny" else {}), **overrides})
    if settings.device == "auto":
        settings = dataclasses.replace(settings, device="cuda" if torch.cuda.is_available() else "cpu")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    kinds = tuple(k for k in args.kinds.split(",") if k)
    distills = tuple("" if d == "none" else d for d in args.distill.split(",") if d)
    if bad := [k for k in kinds if k not in KINDS] + [d for d in distills if d not in DISTILL]:
        print(f"error: unknown --kinds/--distill {bad} (kinds: {', '.join(KINDS)}; distill: none, kd)", file=sys.stderr)
        raise SystemExit(1)
    work = Path(args.work)

    def planned(records):
        cells, sweeps = plan(args.grid, records, seeds, pairs, kinds, distills)
        if args.only:
            from fnmatch import fnmatchcase

            cells = [c for c in cells if any(fnmatchcase(c.key, p) for p in args.only.split(","))]
        return cells, sweeps

    runs_path = work / "runs.json"
    try:
        pairs = parse_pairs(args.pairs)
        data = prepare_data(settings, work)
        records = cached_records(work, settings)
        cells, sweeps = planned(records)
        runs = json.loads(runs_path.read_text()) if runs_path.is_file() else []
        # --report-only: tables from whatever the cache holds; the cells not run are listed in the report
        while not args.report_only and (todo := [c for c in cells if c.key not in records]):
            timing = run_grid(todo, settings, work, data)
            records = cached_records(work, settings)
            runs.append({**timing, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "grid_cells": len(cells)})
            runs_path.write_text(json.dumps(runs, indent=1))
            cells, sweeps = planned(records)  # finished sweeps choose rates, edges extend: plan again
    except SppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    records = {c.key: records[c.key] for c in cells if c.key in records}
    span = {"span_minutes": sum(r["wall_s"] for r in runs) / 60 + 0.0,
            "cell_minutes": sum(r["wall_s"] for r in records.values()) / 60,
            "missing": [c.key for c in cells if c.key not in records], "split": data.split}
    return write_report(Path(args.out), settings, cells, records, runs, span, sweeps, args.note, grids=LR_GRIDS,
                        common_rate=COMMON_RATE)


if __name__ == "__main__":
    main()
