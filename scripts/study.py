"""spp's studies, one machinery: a grid of cells, each pruned, recovered, merged, verified and measured through the
`spp` command line, every finished cell cached, then one results page written from the cache.

    python scripts/study.py                              # stories: the recovery study (docs/results/study.md)
    python scripts/study.py --preset bar                 # issue 10's bar, about 10 minutes (recovery_bar.md)
    python scripts/study.py --preset smollm2             # SmolLM2-135M from GGUF, issue 28: ~22 CPU-hours (smollm2.md)
    python scripts/study.py --preset owl_ria --bench docs/results/bench_owl.json --machine "..."   # owl_ria.md
    python scripts/study.py --preset NAME --grid tiny --out DIR --work DIR   # a few cells of a few steps
    python scripts/study.py --pairs wanda-2:4,sparsegpt-2:4  # stories: more pruned models
    python scripts/study.py --model PATH --device cuda   # any causal LM, e.g. a 7B on a GPU

The presets (`PRESETS`):

- `stories`: stories260K pruned (Wanda 2:4 by default), recovered by every adapter kind at a swept learning rate,
  with and without distillation from the dense model, 3 seeds for the headline recipes; `spp train` runs the
  study's own config (`train_config_yaml`, written into `--work`). The learning rate of each (recovery,
  distillation) is chosen on the validation NLL of seed 0 over a grid (`LR_GRIDS`); a grid whose best rate is at
  its edge is extended one rung of `LADDER` (at most `MAX_EXTENSIONS` times); the chosen rate then runs with the
  other seeds. `plan` derives all cells from the cache, so the study is a fixed point: run what is planned, plan
  again, until nothing is missing. Writes study.md, study.json and three plots.
- `bar`: issue 10's bar as the issue states it: Wanda 2:4 of stories260K calibrated on the first half (by
  characters) of the TinyStories text, each sparsity-preserving kind at `tinystories.yaml`'s default rate for it
  (150 steps of 8 × 256 tokens), PEFT LoRA at four rates; perplexity over 200 windows of 256 tokens of the
  second half. Writes recovery_bar.md and .json.
- `smollm2`: issue 28's study of SmolLM2-135M-Instruct from its GGUF file (`plan_smollm2`): Wanda, SparseGPT and
  ALPS at 2:4, 70% and 50%; the best-pruned base of 70% and 2:4 (from the cache) recovered with `smollm2.yaml` by
  full / SPP / masked LoRA + KD and PEFT LoRA + KD, each at the best of 3 rates (`SMOLLM2_RECIPES`, extended
  along `SMOLLM2_LADDER`) on a validation slice of the C4 recovery text, and block-wise `full` at one rate; the Alpaca
  cell. WikiText-2 perplexity of every model; the zero-shot suite (8 local tasks, 500 items) as a cell of its own
  on dense, the pruned models and each recipe's chosen rate only (rate-selection runs keep their merge in
  `--work/kept` until a rate is chosen). Writes smollm2.md and .json, whose `summary` the README's headline block
  is rendered from (`study_report.smollm2_headline`). Its cost and the commands that start and resume it in the
  background: docs/real-model.md.
- `owl_ria`: issue 14's bar: Wanda+OWL vs uniform Wanda at 70%, RIA 2:4 vs Wanda 2:4 and context rows
  (`OWL_CELLS`), each for three calibration seeds, four of them recovered with `tinystories.yaml`. Writes
  owl_ria.md and .json (with `--bench`, `scripts/bench_prune.py --owl`'s timing records).

Every cell is `spp prune` (cached per pruned model), then nothing, or `spp train`, `spp merge`, `spp verify`, or the
PEFT reference (LoRA, HiRA), which `spp train` does not train: `common.train_peft` on the examples, order, loss,
schedule and optimizer settings that the same `spp train` command resolves, merged with `merge_and_unload`; then
`spp eval` of the final model. LoRA unmerged (stories) is measured in this process on the ids `spp eval` builds.
Every final model is checked against the pruned model's mask file: entries the mask prunes are bitwise +0.0.
The commands run in this process (`common.run`), each logged in its cell's record with the process's CPU seconds.
Each finished cell is cached as JSON under `--work`, keyed by the settings' sha256, and the grid is planned again
from the cache after every cell (`run_grid`), so an interrupted study resumes where it stopped, in priority order,
and `--report-only` writes the page from a partial study. Several processes may share one `--work` (one per core,
say): each locks the cell it runs (`claim`) and takes the first cell no other holds. Nothing in the pages is typed in
by hand.
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

import study_report
from common import DATA, REPO, cli_train_config, run, save_merged, saved_zeros, split_halves, train_peft

from spp.errors import SppError
from spp.io.checkpoint import lock_path, release_lock, take_lock, write_json

METHODS = ("magnitude", "wanda", "sparsegpt", "ria")
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
CLAIM_POLL_S = 60  # a worker whose missing cells are all claimed by others plans again this often
HEADLINE_KINDS = ("spp", "masked_lora", "full", "lora")  # candidates of the answer table: these get 3 seeds
BAR_LORA_RATES = (4e-3, 1e-2, 2e-2, 4e-2)  # PEFT LoRA's rates in the bar; its best is taken
SMOLLM2_TASKS = "piqa,arc_easy,arc_challenge,boolq,winogrande,hellaswag,openbookqa,rte"
# (method, pattern, owl): the bar's cells first, then context rows; OWL_RECOVERED also train and merge
OWL_CELLS = (("wanda", "70%", False), ("wanda", "70%", True), ("wanda", "2:4", False), ("ria", "2:4", False),
             ("ria", "70%", False), ("sparsegpt", "70%", False), ("sparsegpt", "70%", True),
             ("magnitude", "70%", False), ("magnitude", "70%", True), ("wanda", "50%", False),
             ("wanda", "50%", True), ("ria", "50%", False))
OWL_RECOVERED = OWL_CELLS[:4]
# smollm2 (issue 28): every method at every pattern; the best-pruned base of each recovered pattern (in run order)
# recovered by each recipe at its best of 3 rates on the validation slice of the C4 recovery text
SMOLLM2_METHODS = ("wanda", "sparsegpt", "alps")
SMOLLM2_PATTERNS = ("2:4", "70%", "50%")
SMOLLM2_RECOVERED = ("70%", "2:4")
SMOLLM2_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 4e-3, 1.2e-2, 4e-2, 1.2e-1)  # about x3 apart, through the defaults
SMOLLM2_RECIPES = {  # (adapter, distill, objective): its first grid, whose middle rung is the default rate
    ("full", "kd", ""): (3e-5, 1e-4, 3e-4),  # smollm2.yaml's rates: full 1e-4, spp 4e-3, masked LoRA 1e-3
    ("spp", "kd", ""): (1e-3, 4e-3, 1.2e-2),
    ("masked_lora", "kd", ""): (3e-4, 1e-3, 4e-3),
    # block-wise: one rate, the best block-wise `full` rate on stories260K (recovery.md), not swept: issue 28 asks
    # for block-wise recovery, not a sweep of it, and a cell costs 2.5x an end-to-end one here (about 3,500 CPU s)
    ("full", "", "blockwise"): (1e-3,),
    ("lora", "kd", ""): (3e-4, 1e-3, 4e-3),  # PEFT LoRA, as masked LoRA; the same distillation as the others
}
ALPACA_SHRINK = ("precision=fp32", "batch_size=16", "micro_batch_size=16", "val_set_size=100")  # alpaca.yaml's note
ALPACA_STEPS = 20  # x 16 examples: the 320 sequences of 40 x 8 windows


# --------------------------------------------------------------------------- settings and cells


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the numbers of a cell (its sha256 keys the cache); each preset overrides some.

    Data: `text` is cut in two (`split` "line": at the first line break after the middle; "middle": at the middle
    character); the first half calibrates pruning (`calib_nsamples` windows of `calib_seqlen` tokens; `calib` names
    another file) and is the recovery text, less its last `val_share` (from a line break), the validation slice.
    Training: `spp train --config CONFIG` with `train_sets` (`{steps}` filled in) and `--max-steps steps` (0: the
    config's epochs); `config` "" is the study's own config written from these fields (`train_config_yaml`):
    `steps` AdamW steps of `batch_size` windows of `seqlen` tokens, peak rate from the cell (`learning_rate` when
    it has none), linear warmup over `warmup_ratio` then linear decay, clip `max_grad_norm`; SPP with
    `spp_row_groups` row groups; masked LoRA, PEFT LoRA and HiRA rank `lora_r`, scale `lora_alpha / lora_r`;
    distillation: loss = ce_weight · NLL/N + kd_weight · T²·KL(teacher ‖ student)/N at T = `kd_temperature`, the
    teacher being the dense `model`. Measuring (`spp eval`): the `eval_sets` ("tinystories": the second half;
    "wikitext": WikiText-2) over the first `eval_windows` windows of `eval_seqlen`, and `tasks` zero-shot on the
    first `limit` items; the validation slice in every `seqlen` window.
    """

    model: str = str(DATA / "stories260K-hf")
    text: str = str(DATA / "tinystories" / "tinystories_val.txt")
    wikitext: str = str(DATA / "wikitext-2-raw" / "wikitext-test.txt")
    split: str = "line"
    calib: str = ""
    calib_nsamples: int = 64
    calib_seqlen: int = 256
    config: str = ""
    train_sets: tuple[str, ...] = ()
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
    eval_sets: str = "tinystories,wikitext"
    eval_windows: int = 200
    eval_seqlen: int = 256
    eval_batch_size: int = 16
    tasks: str = ""
    limit: int = 0
    device: str = "cpu"

    def sha256(self) -> str:
        from spp.io.manifest import settings_sha256

        return settings_sha256(asdict(self))


@dataclass(frozen=True)
class Cell:
    """One pruned model, one way to recover it, one peak learning rate and one seed.

    `method` "dense" is the unpruned model; `pattern` "N:M" or "P%" (unstructured), `owl` with OWL's layerwise
    sparsity; `lr` None means the settings' rate (the study's config) or the config's rate for the kind;
    `distill` "kd" adds logit distillation from the dense model; `data` names the recovery text ("" the first half);
    `objective` "blockwise" trains block by block (`spp train --set objective=blockwise`); `zeroshot` is the zero-shot
    suite (`StudySettings.tasks`) on the final model of the same cell without it, which a study with tasks keeps.
    """

    method: str
    pattern: str
    adapter: str = "none"
    seed: int = 0
    lr: float | None = None
    distill: str = ""
    owl: bool = False
    data: str = ""
    objective: str = ""
    zeroshot: bool = False

    @property
    def prune_key(self) -> str:
        return (f"{self.method}{'-owl' if self.owl else ''}-{self.pattern.replace(':', 'of').replace('%', 'pct')}"
                f"-s{self.seed}")

    @property
    def key(self) -> str:
        return (f"{self.prune_key}-{self.adapter}" + (f"-lr{self.lr:g}" if self.lr is not None else "")
                + (f"-{self.distill}" if self.distill else "") + (f"-{self.data}" if self.data else "")
                + (f"-{self.objective}" if self.objective else "") + ("-zeroshot" if self.zeroshot else ""))

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
        if method not in METHODS or not re.fullmatch(r"\d+:\d+|\d+(\.\d+)?%", pattern):
            raise SppError(f"--pairs {item!r}: expected METHOD-PATTERN with METHOD in {', '.join(METHODS)} "
                           "and PATTERN N:M or P%")
        pairs.append((method, pattern))
    return pairs


# --------------------------------------------------------------------------- the stories grid


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


def sweep(recipe: tuple, records: dict[str, dict], seed: int, grid: tuple[float, ...] | None = None, *,
          ladder: tuple[float, ...] = LADDER, base: Cell | None = None, max_extensions: int = MAX_EXTENSIONS) -> dict:
    """The learning-rate sweep of one recipe at `seed`, as far as `records` allow.

    Starts from `grid` (default `LR_GRIDS[adapter]`); while every rate so far is recorded and the
    best validation NLL sits at an edge with a further rung of `ladder`, adds that rung (at most
    `max_extensions` per edge). The sweep's cells are `base` (default the recipe's plain cell at
    `seed`) at each rate.

    Returns:
        {"rates": rates to run (sorted), "best": the chosen rate or None while some are missing,
         "edge": True when the best stayed at an edge of the final grid, "extended": rungs added,
         "grid": the first grid, "val_nll": by rate, once chosen}.
    """
    method, pattern, adapter, distill = recipe
    base = base or Cell(method, pattern, adapter, seed, None, distill)
    rates = sorted(LR_GRIDS[adapter] if grid is None else grid)
    first = list(rates)
    added = {"low": 0, "high": 0}
    while True:
        vals = {lr: validation_nll(records.get(dataclasses.replace(base, lr=lr).key)) for lr in rates}
        if any(dataclasses.replace(base, lr=lr).key not in records for lr in rates):
            return {"rates": rates, "best": None, "edge": None, "extended": added, "grid": first}
        best = min(rates, key=lambda lr: (vals[lr], lr))  # ties: the smaller rate
        i = ladder.index(best)
        if best == rates[-1] and i + 1 < len(ladder) and added["high"] < max_extensions:
            rates, added["high"] = rates + [ladder[i + 1]], added["high"] + 1
        elif best == rates[0] and i > 0 and added["low"] < max_extensions:
            rates, added["low"] = [ladder[i - 1]] + rates, added["low"] + 1
        else:
            edge = len(rates) > 1 and best in (rates[0], rates[-1]) and math.isfinite(vals[best])  # one rate: no grid
            return {"rates": rates, "best": best if math.isfinite(vals[best]) else None, "edge": edge,
                    "extended": added, "grid": first, "val_nll": {f"{lr:g}": vals[lr] for lr in rates}}


def plan(name: str, records: dict[str, dict], seeds: tuple[int, ...] = (0, 1, 2),
         pairs: list[tuple[str, str]] | None = None, kinds: tuple[str, ...] = KINDS,
         distills: tuple[str, ...] = DISTILL) -> tuple[list[Cell], dict]:
    """The cells of the stories grid that `records` (the cache) make known, and each recipe's sweep.

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


# --------------------------------------------------------------------------- the other presets' grids


def plan_bar(grid: str, kinds: tuple[str, ...], seeds: tuple[int, ...], records: dict) -> tuple[list[Cell], dict]:
    """Dense, Wanda 2:4, each of spp's kinds at the config's rate for it, PEFT LoRA at each of `BAR_LORA_RATES`."""
    cells = [Cell("dense", "0%"), Cell("wanda", "2:4")] + [Cell("wanda", "2:4", k) for k in kinds if k in SPARSE_KINDS]
    return cells + [Cell("wanda", "2:4", "lora", lr=lr) for lr in BAR_LORA_RATES if "lora" in kinds], {}


def best_pruned(records: dict[str, dict], pattern: str, methods: tuple[str, ...] = SMOLLM2_METHODS) -> str | None:
    """The method whose pruned model at `pattern` has the lowest WikiText-2 perplexity before recovery (ties: the
    first in `methods`), from the cached cells; None while one of them is not recorded."""
    found = [records.get(Cell(m, pattern).key) for m in methods]
    if any(r is None or not r.get("rows") for r in found):
        return None
    return min(zip(methods, found), key=lambda x: x[1]["rows"][0]["ppl"]["wikitext"])[0]


def plan_smollm2(grid: str, kinds: tuple[str, ...], seeds: tuple[int, ...], records: dict) -> tuple[list[Cell], dict]:
    """Issue 28's SmolLM2 grid, as far as the cache (`records`) makes it known, most valuable first.

    0: dense and every `SMOLLM2_METHODS` x `SMOLLM2_PATTERNS` pruned model (perplexities); 1: the best-pruned base
    (`best_pruned`) of each `SMOLLM2_RECOVERED` pattern recovered by every `SMOLLM2_RECIPES` recipe (of `kinds`) at
    its default rate; 2: the zero-shot suite of dense and of those bases; 3: the zero-shot suite of each recipe at the
    rate its sweep chose (`sweep` on `SMOLLM2_LADDER`, extended at an edge at most `MAX_EXTENSIONS` times); 4: the
    other rates of the sweeps; 5: the Alpaca cell (`alpaca.yaml` shrunk: SPP on the best 2:4 base) and its zero-shot
    suite; 6: the zero-shot suite of the other pruned models. `tiny`: Wanda and SparseGPT at 2:4 only, each recipe
    at its default rate alone (no sweep), for the test.

    Returns:
        (cells in the order to run them, {"PATTERN/adapter/distill/objective": sweep}).
    """
    tiny = grid == "tiny"
    methods, patterns = (("wanda", "sparsegpt"), ("2:4",)) if tiny else (SMOLLM2_METHODS, SMOLLM2_PATTERNS)
    stages: list[list[Cell]] = [[] for _ in range(7)]
    stages[0] = [Cell("dense", "0%")] + [Cell(m, p) for p in patterns for m in methods]
    stages[2].append(Cell("dense", "0%", zeroshot=True))
    sweeps, bases = {}, {}
    for pattern in [p for p in SMOLLM2_RECOVERED if p in patterns]:
        if (best := bases.setdefault(pattern, best_pruned(records, pattern, methods))) is None:
            continue
        stages[2].append(Cell(best, pattern, zeroshot=True))
        for (adapter, distill, objective), rates in SMOLLM2_RECIPES.items():
            if adapter not in kinds:
                continue
            base = Cell(best, pattern, adapter, seeds[0], None, distill, data="c4", objective=objective)
            middle = rates[len(rates) // 2]
            found = sweep((best, pattern, adapter, distill), records, seeds[0], (middle,) if tiny else rates,
                          ladder=SMOLLM2_LADDER, base=base,
                          max_extensions=0 if tiny or len(rates) == 1 else MAX_EXTENSIONS)
            sweeps["/".join((pattern, adapter, distill, objective))] = found
            stages[1].append(dataclasses.replace(base, lr=middle))
            stages[4] += [dataclasses.replace(base, lr=lr) for lr in found["rates"] if lr != middle]
            if found["best"] is not None:
                stages[3].append(dataclasses.replace(base, lr=found["best"], zeroshot=True))
    if bases.get("2:4") and "spp" in kinds and not tiny:
        alpaca = Cell(bases["2:4"], "2:4", "spp", seeds[0], data="alpaca")
        stages[5] += [alpaca, dataclasses.replace(alpaca, zeroshot=True)]
    stages[6] = [Cell(m, p, zeroshot=True) for p in patterns for m in methods if bases.get(p) != m]
    return [c for stage in stages for c in stage], sweeps


def plan_owl_ria(grid: str, kinds: tuple[str, ...], seeds: tuple[int, ...], records: dict) -> tuple[list[Cell], dict]:
    """Every `OWL_CELLS` pruned model per calibration seed, then `OWL_RECOVERED` recovered by each of `kinds`."""
    cells = [Cell("dense", "0%")] + [Cell(m, p, seed=s, owl=o) for s in seeds for m, p, o in OWL_CELLS]
    return cells + [Cell(m, p, k, s, owl=o) for s in seeds for m, p, o in OWL_RECOVERED for k in kinds], {}


# --------------------------------------------------------------------------- data


@dataclass
class StudyData:
    """The text files every cell shares, and where the text was cut."""

    calib: str  # `spp prune --calib`
    train: dict[str, str]  # recovery texts by `Cell.data`
    val: str | None  # the validation slice (stories), measured at every `seqlen` window
    eval_sets: dict[str, str]  # set name -> `spp eval --ppl` spec
    split: dict


def prepare_data(s: StudySettings, work: Path) -> StudyData:
    """Cut the text, write the files spp reads, and check the validation and evaluation texts are long enough.

    Raises:
        SppError: `--text` is missing; the validation slice holds fewer than two windows, or an evaluation set fewer
            than `eval_windows`.
    """
    from spp.eval.perplexity import ppl_text, set_ids
    from spp.io.reader import local_directory
    from spp.models import load_tokenizer

    path = Path(s.text)
    if not path.is_file():
        raise SppError(f"--text {path} does not exist")
    text = path.read_text(encoding="utf-8")
    first, second = split_halves(text) if s.split == "line" else (text[: len(text) // 2], text[len(text) // 2:])

    def less_val(part: str) -> tuple[str, str]:  # (training text, its last `val_share` from a line break on)
        cut = part.find("\n", int(len(part) * (1 - s.val_share))) if s.val_share else -1
        return (part, "") if cut < 0 else (part[: cut + 1], part[cut + 1:])

    train, val = less_val(first)
    files = {"calib_first_half.txt": first, "train_text.txt": train, "heldout_second_half.txt": second}
    if s.calib.endswith(".jsonl"):  # C4 documents: the calibration sample; from document 200 on, the recovery text,
        docs = [json.loads(line)["text"] for line in Path(s.calib).read_text(encoding="utf-8").splitlines() if line]
        files["c4_train.txt"], val = less_val("\n\n".join(docs[200:]))  # whose last share is the validation slice
    files["val_text.txt"] = val
    work.mkdir(parents=True, exist_ok=True)
    for name, part in files.items():
        if part and (not (work / name).is_file() or (work / name).read_text(encoding="utf-8") != part):
            (work / name).write_text(part, encoding="utf-8")
    sets = {"tinystories": str(work / "heldout_second_half.txt"), "wikitext": f"wikitext2:{s.wikitext}"}
    data = StudyData(calib=s.calib or str(work / "calib_first_half.txt"),
                     train={"": str(work / "train_text.txt"), "c4": str(work / "c4_train.txt"),
                            "alpaca": str(DATA / "alpaca" / "alpaca_small.json")},
                     val=str(work / "val_text.txt") if val else None,
                     eval_sets={name: sets[name] for name in s.eval_sets.split(",")},
                     split={"text_chars": len(text), "cut_at_char": len(first), "val_at_char": len(train)})
    if not val:
        return data
    tokenizer = load_tokenizer(str(local_directory(s.model)))  # a .gguf: its dequantized directory
    val_tokens = set_ids(tokenizer, ppl_text(data.val), s.seqlen).numel()
    if val_tokens < 2 * s.seqlen:
        raise SppError(f"the validation slice (--val-share {s.val_share}) has {val_tokens} tokens, fewer than two "
                       f"windows of {s.seqlen}")
    available = {k: int(set_ids(tokenizer, ppl_text(v), s.eval_seqlen).numel()) for k, v in data.eval_sets.items()}
    for name, n in available.items():
        if n < s.eval_seqlen * s.eval_windows:
            raise SppError(f"the {name} evaluation text has {n} tokens, fewer than {s.eval_windows} windows of "
                           f"{s.eval_seqlen}")
    data.split.update(val_tokens=int(val_tokens), eval_tokens_available=available,
                      eval_tokens_used={k: s.eval_windows * s.eval_seqlen for k in available})
    return data


def train_config_yaml(s: StudySettings, work: Path) -> str:
    """The study's own `spp train` config (stories), written from the settings; the cell adds adapter, rate, seed."""
    path = work / "study_train.yaml"
    values = dict(data_format="text", cutoff_len=s.seqlen, val_set_size=0, micro_batch_size=s.batch_size,
                  batch_size=s.batch_size, max_steps=s.steps, learning_rate=s.learning_rate,
                  warmup_ratio=s.warmup_ratio, max_grad_norm=s.max_grad_norm, logging_steps=1, save_steps=s.steps,
                  eval_steps=s.steps, spp_row_groups=s.spp_row_groups, rank=s.lora_r, lora_alpha=s.lora_alpha,
                  lora_r=s.lora_r, ce_weight=s.ce_weight, kd_weight=0.0, kd_temperature=s.kd_temperature)
    path.write_text("".join(f"{k}: {v!r}\n" for k, v in values.items()))
    return str(path)


# --------------------------------------------------------------------------- one cell


def prune_dir(work: Path, cell: Cell, s: StudySettings) -> Path:
    """Where the cell's pruned model is cached: named by (method, pattern, OWL, seed) and the calibration size."""
    return work / "pruned" / f"{cell.prune_key}-c{s.calib_nsamples}x{s.calib_seqlen}"


def prune(cell: Cell, s: StudySettings, data: StudyData, work: Path, log: list[str]) -> Path:
    """`spp prune` for the cell's (method, pattern, OWL, seed) unless its output is cached already."""
    output = prune_dir(work, cell, s)
    if not (output / "spp_manifest.json").is_file():
        pattern = cell.pattern if ":" in cell.pattern else "unstructured"
        sparsity = ["--sparsity", f"{float(cell.pattern[:-1]) / 100:g}"] if cell.pattern.endswith("%") else []
        run(["prune", "--model", s.model, "--method", cell.method, "--pattern", pattern, *sparsity,
             *(["--owl"] if cell.owl else []), "--calib", data.calib, "--nsamples", str(s.calib_nsamples),
             "--seqlen", str(s.calib_seqlen), "--seed", str(cell.seed), "--device", s.device, "--dtype", "float32",
             "--output", str(output), "--overwrite"], log)
    return output


def measure(model, s: StudySettings, data: StudyData, out: Path, log: list[str]) -> dict:
    """`spp eval` perplexities of a saved model and mean NLL per set (`val`: the validation slice at every `seqlen`
    window; the others at the first `eval_windows` of `eval_seqlen`). A model in memory (PEFT LoRA unmerged) is
    measured in this process, on the ids `spp eval` builds (`ppl_text`, `set_ids`). The zero-shot tasks are a cell
    of their own (`zeroshot_scores`)."""
    from spp.eval.perplexity import perplexity, ppl_text, set_ids
    from spp.io.reader import local_directory
    from spp.models import load_tokenizer

    groups = ([({"val": data.val}, s.seqlen, None)] if data.val else []) + [(data.eval_sets, s.eval_seqlen,
                                                                            s.eval_windows)]
    found = {"ppl": {}, "nll": {}}
    for i, (sets, seqlen, windows) in enumerate(groups):
        if not isinstance(model, (str, Path)):
            tokenizer = load_tokenizer(str(local_directory(s.model)))  # a .gguf: its dequantized directory
            entries = {name: dataclasses.asdict(perplexity(model, set_ids(tokenizer, ppl_text(spec), seqlen), seqlen,
                                                           s.eval_batch_size, windows)) for name, spec in sets.items()}
        else:
            run(["eval", "--model", str(model), *[a for spec in sets.values() for a in ("--ppl", spec)],
                 "--seqlen", str(seqlen), *(["--max-windows", str(windows)] if windows else []),
                 "--batch-size", str(s.eval_batch_size), "--device", s.device, "--dtype", "float32",
                 "--output", str(out / f"eval{i}"), "--overwrite"], log)
            results = json.loads((out / f"eval{i}" / "results.json").read_text())
            entries = dict(zip(sets, results["perplexity"].values()))
        for name, entry in entries.items():
            found["ppl"][name], found["nll"][name] = entry["ppl"], entry["nll_sum"] / entry["predicted_tokens"]
    return found


def zeroshot_scores(model: Path | str, s: StudySettings, out: Path, log: list[str]) -> dict:
    """`spp eval --tasks` of a saved model on the local task copies, the first `limit` items of each, at `spp eval`'s
    own batch size for the device. Returns results.json's `zeroshot` (per task acc, stderr, item_acc, baseline)."""
    run(["eval", "--model", str(model), "--tasks", s.tasks, "--task-data", str(DATA / "eval"),
         *(["--limit", str(s.limit)] if s.limit else []), "--device", s.device, "--dtype", "float32",
         "--output", str(out), "--overwrite"], log)
    return json.loads((out / "results.json").read_text())["zeroshot"]


def train_command(cell: Cell, s: StudySettings, data: StudyData, pruned: Path, output: Path, config: str) -> list[str]:
    """The cell's `spp train` arguments (the PEFT reference resolves the same, with its own rate)."""
    sets = [x.format(steps=s.steps) for x in s.train_sets]
    sets.append(f"adapter={cell.adapter if cell.adapter in SPARSE_KINDS else 'spp'}")
    if cell.lr is not None:
        sets.append(f"learning_rate={cell.lr:g}")
    if not s.config:  # the study's own config: the cell's seed also seeds training (a bundled config keeps its own)
        sets.append(f"seed={cell.seed}")
    if cell.distill:
        sets.append(f"kd_weight={s.kd_weight:g}")
    steps = s.steps
    if cell.objective == "blockwise":  # the end-to-end cells' windows (steps x batch_size), drawn from the same text
        sets += ["objective=blockwise", f"nsamples={s.steps * s.batch_size}"]
        steps = 0  # block_epochs passes per block instead
    if cell.data == "alpaca":  # alpaca.yaml, shrunk as its header says (fp32, global batch 16, 100 held out)
        config, steps, sets = "alpaca.yaml", ALPACA_STEPS, sets + list(ALPACA_SHRINK)
    return (["train", "--config", config, "--model", str(pruned), "--data", data.train[cell.data],
             "--output", str(output)] + (["--max-steps", str(steps)] if steps else [])
            + (["--teacher", s.model] if cell.distill or cell.objective else [])
            + [a for x in sets for a in ("--set", x)])


def train_log(output: Path) -> dict:
    """Cross-entropy, KD term and seconds per logged step, from `spp train`'s log."""
    from spp.io.checkpoint import TRAIN_LOG_FILE

    records = [json.loads(line) for line in (output / TRAIN_LOG_FILE).read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip([{"tokens_seen": 0}] + records, records)]
    return {"losses": [r.get("ce", r["loss"]) for r in records], "kd_losses": [r["kd"] for r in records if "kd" in r],
            "step_times": [n / r["tokens_per_s"] for n, r in zip(tokens, records)], "diverged_at": None}


def run_cell(cell: Cell, s: StudySettings, data: StudyData, work: Path, config: str) -> dict:
    """Prune (cached), recover and measure one cell. Returns its JSON record.

    Records one row per final model: `none`, `spp` / `masked_lora` / `full` (merged, with `verify_exit`),
    `lora-unmerged` (stories) and `lora-merged`, `hira` (merged). A diverged cell has no rows, only `diverged`.
    """
    from spp.config import read_yaml

    if cell.zeroshot:
        return score_cell(cell, s, work)
    start, cpu, log = time.perf_counter(), time.process_time(), []
    lr = s.learning_rate if cell.lr is None and not s.config else cell.lr
    record = {"key": cell.key, "cell": asdict(cell), "settings_sha256": s.sha256(), "rows": [], "learning_rate": lr}
    pruned = None if cell.method == "dense" else prune(cell, s, data, work, log)
    base = Path(s.model) if pruned is None else pruned
    if pruned is not None:
        manifest = json.loads((pruned / "spp_manifest.json").read_text())
        record["prune"] = {k: manifest["details"][k] for k in ("achieved_sparsity", "blocks", "owl")}
        record["prune"]["seconds"] = manifest["wall_time_s"]
    zeros = saved_zeros(base, pruned) if pruned else {"pruned_not_plus_zero": 0, "kept_zero": 0, "pruned": 0,
                                                       "sparsity": 0.0}
    scratch = work / "scratch" / cell.key  # training output and final models: measured, then removed
    shutil.rmtree(scratch, ignore_errors=True)

    def row(name: str, model, trainable: int, **extra) -> None:
        """Measure a final model (a directory, or LoRA unmerged in memory: the pruned base's zeros) into a row."""
        found = measure(model, s, data, scratch / name, log)
        row_zeros = saved_zeros(model, pruned) if isinstance(model, Path) and model != base else zeros
        record["rows"].append({"recovery": name, **found, "val_nll": found["nll"].get("val"), "trainable": trainable,
                               **row_zeros, **extra})

    train_dir, merged = scratch / "train", scratch / "merged"
    args = train_command(cell, s, data, base, train_dir, config)
    if cell.adapter == "none":
        row("none", base, 0)
    elif cell.adapter in SPARSE_KINDS:
        try:
            run(args + ["--overwrite"], log)
        except SppError as exc:  # a non-finite loss is a result of the sweep, recorded as `diverged_at`, not an error
            if not (found := re.search(r"the training loss is \S+ at step (\d+)", str(exc))):
                raise
            train = {"losses": [], "kd_losses": [], "step_times": [], "diverged_at": int(found[1])}, 0
        else:
            lr = record["learning_rate"] = read_yaml(train_dir / "spp_config.yaml")["learning_rate"]
            details = json.loads((train_dir / "spp_manifest.json").read_text())["details"]
            train = {**train_log(train_dir), "steps": details["steps"]}, details["trainable_params"]
            run(["merge", "--adapter", str(train_dir), "--output", str(merged), "--overwrite"], log)
            verify_exit = run(["verify", str(merged)], log, check=False)
            row(cell.adapter, merged, train[1], verify_exit=verify_exit)
    else:
        teacher = None
        if cell.distill:
            from spp.models import load_model

            teacher = load_model(s.model, "float32", s.device).requires_grad_(False).eval()
        flags = {"base_model": str(base), "data_path": data.train[cell.data], "output_dir": "unused",
                 "max_steps": s.steps or None, "teacher": s.model if cell.distill else None}
        cfg = cli_train_config(config, {k: v for k, v in flags.items() if v is not None}, args[args.index("--set"):][1::2])
        lr = record["learning_rate"] = cfg.learning_rate
        model, peft_log = train_peft(cell.adapter, cfg, s.device, teacher)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.append(f"PEFT {cell.adapter} r={cfg.rank} alpha={cfg.lora_alpha:g} at {lr:g}: {len(peft_log['losses'])} "
                   f"steps in this process (common.train_peft, resolved as `spp {' '.join(args)}`) -> {merged} (merged)")
        train = {**peft_log, "steps": len(peft_log["losses"])}, trainable
        if peft_log["diverged_at"] is None:
            if cell.adapter == "lora" and data.val and not s.tasks:  # (stories; a zero-shot study scores the merge)
                # unmerged: the sparse base runs as pruned, plus a dense rank-r branch of `trainable` weights
                row("lora-unmerged", model, trainable, dense_adapter_params=trainable)
            save_merged(model, base, merged)  # HiRA: W + W ⊙ (B·A), the zeros of W survive the merge; LoRA: they don't
            row("lora-merged" if cell.adapter == "lora" else "hira", merged, trainable)
    if s.tasks and merged.is_dir():  # its zero-shot cell scores it, if its rate is chosen (`tidy_kept`)
        shutil.rmtree(kept_dir(work, cell), ignore_errors=True)
        kept_dir(work, cell).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(merged), kept_dir(work, cell))
    shutil.rmtree(scratch, ignore_errors=True)
    if cell.adapter != "none":
        trained, trainable = train
        times = trained.pop("step_times")
        trained.update(step_s=statistics.median(times[1:] or times) if times else math.nan, learning_rate=lr)
        record.update(train=trained, trainable=trainable)
        if trained["diverged_at"] is not None:
            record["diverged"] = trained["diverged_at"]
    record.update(base_sparsity=zeros["sparsity"], wall_s=time.perf_counter() - start,
                  cpu_s=time.process_time() - cpu, commands=log)
    return record


def kept_dir(work: Path, cell: Cell) -> Path:
    """Where a recovered cell's merged model waits for its zero-shot cell (a study with `tasks`)."""
    return work / "kept" / cell.key


def score_cell(cell: Cell, s: StudySettings, work: Path) -> dict:
    """A `zeroshot` cell: the zero-shot suite on its twin's final model (the dense model, the cached pruned model,
    or the kept merge). Its record has no rows; the report joins it to the twin's (`of`).

    Raises:
        SppError: the twin's kept model is gone (its record is there, so the study would not train it again).
    """
    start, cpu, log = time.perf_counter(), time.process_time(), []
    twin = dataclasses.replace(cell, zeroshot=False)
    model = (Path(s.model) if cell.method == "dense" else prune_dir(work, cell, s) if cell.adapter == "none"
             else kept_dir(work, twin))
    if not model.exists():
        raise SppError(f"{model} is gone: remove {work / 'cells' / twin.key}.json to compute {twin.key} again")
    out = work / "scratch" / cell.key
    found = zeroshot_scores(model, s, out, log)
    shutil.rmtree(out, ignore_errors=True)
    return {"key": cell.key, "cell": asdict(cell), "settings_sha256": s.sha256(), "of": twin.key, "rows": [],
            "zeroshot": found, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "commands": log}


def tidy_kept(work: Path, records: dict[str, dict]) -> None:
    """Remove the kept merged models no zero-shot cell will need: of each recipe (a cell less its rate) all but the
    one of lowest validation NLL so far (ties: the smaller rate, as `sweep` chooses), and those already scored."""
    if not (work / "kept").is_dir():
        return
    best: dict[str, tuple] = {}
    for record in records.values():
        cell = Cell(**record["cell"])
        if cell.zeroshot or cell.adapter == "none":
            continue
        rank = (validation_nll(record), cell.lr or 0.0)
        family = dataclasses.replace(cell, lr=None).key
        if family not in best or rank < best[family][0]:
            best[family] = (rank, cell)
    keep = {c.key for _, c in best.values() if dataclasses.replace(c, zeroshot=True).key not in records}
    for path in (work / "kept").iterdir():
        if path.name not in keep and path.name in records:  # no record yet: another worker's cell, still running
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the grid, cached


def cached_records(work: Path, s: StudySettings) -> dict[str, dict]:
    """Every cell record under `work/cells` computed with these settings, by key (a torn write is skipped)."""
    out = {}
    for path in sorted((work / "cells").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if record.get("settings_sha256") == s.sha256():
            out[record["key"]] = record
    return out


def save_record(work: Path, cell: Cell, record: dict) -> None:
    """Write a cell's record atomically (temporary file, then rename)."""
    path = work / "cells" / f"{cell.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def claim(work: Path, cell: Cell) -> Path | None:
    """Take the cell's lock under `work/claims` (`spp.io.checkpoint.take_lock`), so that each of several `study.py`
    processes on one `--work` runs other cells; None: a live process holds it."""
    try:
        return take_lock(work / "claims" / cell.key)
    except SppError:
        if not lock_path(work / "claims" / cell.key).is_file():  # not a held lock: an unwritable --work
            raise
        return None


def run_grid(planned, s: StudySettings, work: Path, data: StudyData, config: str, log=print) -> dict:
    """Run the first planned cell the cache lacks, cache its record, plan again from the cache, until none is
    missing. Planning after every cell keeps the plan's priority order while sweeps choose rates, edges extend and
    the best-pruned bases become known, so a study cut short has its most valuable cells.

    Args:
        planned: cache records -> (cells in run order, sweeps).

    Returns:
        This run's timing: wall seconds, cells computed, threads, load, the data split, the final plan's size.
    """
    import torch

    start, load_start, computed = time.perf_counter(), os.getloadavg()[0], 0
    records = cached_records(work, s)
    log(f"{torch.get_num_threads()} thread(s)")
    while True:
        cells = planned(records)[0]
        if not (todo := [c for c in cells if c.key not in records]):
            break
        cell, lock = next(((c, lock) for c in todo if (lock := claim(work, c))), (None, None))
        if cell is None:  # every missing cell is another worker's: wait for theirs to plan again
            time.sleep(CLAIM_POLL_S)
            records = cached_records(work, s)
            continue
        try:
            if cell.key in (records := cached_records(work, s)):  # another worker saved it just now
                continue
            log(f"  {len(todo)} planned cells to run; next: {cell.key}")
            record = run_cell(cell, s, data, work, config)
            save_record(work, cell, record)
        finally:
            release_lock(lock)
        records, computed = cached_records(work, s), computed + 1
        tidy_kept(work, records)
        if cell.zeroshot:
            log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  mean acc {record['zeroshot']['mean_acc']:.4f}")
            continue
        if record.get("diverged"):
            log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  diverged at step {record['diverged']}")
            continue
        ppl = ", ".join(f"{r['recovery']} " + "/".join(f"{v:.3f}" for k, v in r["ppl"].items() if k != "val")
                        for r in record["rows"])
        log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  ppl {'/'.join(data.eval_sets)}: {ppl}")
    return {"wall_s": time.perf_counter() - start, "cells_computed": computed, "threads": torch.get_num_threads(),
            "settings_sha256": s.sha256(), "load_avg_1min_start": load_start, "load_avg_1min_end": os.getloadavg()[0],
            "device": s.device, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "split": data.split,
            "grid_cells": len(cells)}


# --------------------------------------------------------------------------- presets and main

TINY = dict(calib_nsamples=4, calib_seqlen=128, steps=4, batch_size=2, seqlen=64, eval_windows=2, eval_seqlen=128,
            eval_batch_size=2)
PRESETS = {  # name: (settings, settings of --grid tiny, default --kinds, default --seeds, the cells)
    "stories": ({}, TINY, ",".join(KINDS), "0,1,2", None),
    "bar": (dict(split="middle", val_share=0.0, config="tinystories.yaml", eval_sets="tinystories",
                 train_sets=("batch_size=8", "micro_batch_size=8", "cutoff_len=256", "val_set_size=0")),
            dict(calib_nsamples=4, calib_seqlen=128, steps=2, eval_windows=2), "spp,masked_lora,full,lora", "0",
            plan_bar),
    "smollm2": (dict(model=str(DATA / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                     calib=str(DATA / "c4" / "c4_sample.jsonl"), calib_nsamples=32, calib_seqlen=512, val_share=0.02,
                     config="smollm2.yaml", train_sets=("save_steps={steps}", "eval_steps={steps}"), steps=40,
                     eval_sets="wikitext", eval_windows=40, eval_seqlen=512, tasks=SMOLLM2_TASKS, limit=500),
                dict(calib_nsamples=4, steps=2, eval_windows=2, limit=4), "full,spp,masked_lora,lora", "0",
                plan_smollm2),
    "owl_ria": (dict(val_share=0.0, config="tinystories.yaml", steps=0, eval_sets="tinystories", eval_batch_size=8),
                dict(calib_nsamples=4, calib_seqlen=128, steps=2, eval_windows=2, eval_seqlen=128), "full,spp",
                "0,1,2", plan_owl_ria),
}


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, run the preset's grid to its fixed point (resuming from `--work`), write its page into `--out`."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stories", choices=list(PRESETS))
    parser.add_argument("--grid", default="full", choices=["full", "tiny"])
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="where the page, JSON and plots go")
    parser.add_argument("--work", default=None, help="cache of pruned models and cells (default runs/PRESET)")
    parser.add_argument("--pairs", default="wanda-2:4", help="stories: pruned models, METHOD-PATTERN, comma-separated")
    parser.add_argument("--kinds", default=None, help="recoveries, comma-separated (default: the preset's)")
    parser.add_argument("--distill", default="none,kd", help="stories: 'none' and/or 'kd', comma-separated")
    parser.add_argument("--only", default=None, help="comma-separated globs over cell keys (e.g. 'dense*,*-spp-*')")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached cells only")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the preset's)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's caveats (repeatable)")
    parser.add_argument("--bench", help="owl_ria: `scripts/bench_prune.py --owl` records to include")
    parser.add_argument("--machine", default="unstated", help="owl_ria: the machine, in words, for the report")
    for f in dataclasses.fields(StudySettings):
        if f.name != "train_sets":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = parser.parse_args(argv)
    preset, tiny, kinds_default, seeds_default, cells_of = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)
                 if getattr(args, f.name, None) is not None}
    settings = StudySettings(**{**preset, **(tiny if args.grid == "tiny" else {}), **overrides})
    if settings.device == "auto":
        settings = dataclasses.replace(settings, device="cuda" if torch.cuda.is_available() else "cpu")
    seeds = tuple(int(x) for x in (args.seeds or seeds_default).split(","))
    kinds = tuple(k for k in (args.kinds if args.kinds is not None else kinds_default).split(",") if k)
    distills = tuple("" if d == "none" else d for d in args.distill.split(",") if d)
    if bad := [k for k in kinds if k not in KINDS] + [d for d in distills if d not in DISTILL]:
        print(f"error: unknown --kinds/--distill {bad} (kinds: {', '.join(KINDS)}; distill: none, kd)", file=sys.stderr)
        raise SystemExit(1)
    work = Path(args.work or REPO / "runs" / args.preset)

    def planned(records):
        cells, sweeps = (plan(args.grid, records, seeds, pairs, kinds, distills) if cells_of is None
                         else cells_of(args.grid, kinds, seeds, records))
        if args.only:
            from fnmatch import fnmatchcase

            cells = [c for c in cells if any(fnmatchcase(c.key, p) for p in args.only.split(","))]
        return cells, sweeps

    runs_path = work / "runs.json"
    try:
        pairs = parse_pairs(args.pairs)
        data = prepare_data(settings, work)
        config = settings.config or train_config_yaml(settings, work)
        # --report-only: tables from whatever the cache holds; the cells not run are listed in the report
        if not args.report_only and (timing := run_grid(planned, settings, work, data, config))["cells_computed"]:
            runs = json.loads(runs_path.read_text()) if runs_path.is_file() else []  # (read now: other workers')
            runs.append({**timing, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            write_json(runs_path, runs)
        runs = json.loads(runs_path.read_text()) if runs_path.is_file() else []
        records = cached_records(work, settings)
        cells, sweeps = planned(records)
    except SppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    records = {c.key: records[c.key] for c in cells if c.key in records}
    span = {"span_minutes": sum(r["wall_s"] for r in runs) / 60 + 0.0,
            "cell_minutes": sum(r["wall_s"] for r in records.values()) / 60,
            "missing": [c.key for c in cells if c.key not in records], "split": data.split}
    if args.preset != "stories":
        bench = json.loads(Path(args.bench).read_text()) if args.bench else None
        return study_report.write_page(args.preset, Path(args.out), settings, records, runs, span, bench, args.machine,
                                       sweeps)
    return study_report.write_report(Path(args.out), settings, cells, records, runs, span, sweeps, args.note,
                                     grids=LR_GRIDS, common_rate=COMMON_RATE)


if __name__ == "__main__":
    main()
