"""The recovery study: prune, recover with every adapter at a swept learning rate, with and without
distillation from the dense model, measure, and write `docs/results/`.

One command re-runs it (about 45 minutes on 2 shared CPU cores for the full grid, see `plan`):

    python scripts/study.py                                   # stories260K, Wanda 2:4, 2 workers
    python scripts/study.py --grid tiny --out /tmp/r --work /tmp/w   # a few cells, a few steps
    python scripts/study.py --pairs wanda-2:4,sparsegpt-2:4   # more pruned models
    python scripts/study.py --model PATH --device cuda --jobs 1      # any causal LM, e.g. a 7B on a GPU

What it does, for every cell (one pruned model, one recovery, one learning rate, one seed):

1. prune the model with `spp.prune.run_prune`, calibrated on the first half of the TinyStories text;
2. recover with one of: nothing; spp's sparsity-preserving adapters (`spp.adapter.model.add_adapter`
   with kind `spp`, `masked_lora` or `full`, then `merge_adapter`); PEFT LoRA (evaluated unmerged,
   then merged with `merge_and_unload`); PEFT HiRA (merged). Each with the plain cross-entropy loss,
   or with logit distillation from the dense model added (`spp.train.losses.kd_kl_sum`). Every
   adapter trains in the same loop (`train_adapter`): the same windows of the first half in the same
   order (`spp.train.loop.global_batch`), AdamW with the same schedule, the same seed;
3. measure the mean token NLL on a validation slice of the training text (the last `val_windows`
   windows of the first half, never trained on), perplexity with `spp.eval.perplexity.perplexity`
   on the first `eval_windows` windows of `eval_seqlen` tokens of the second half of the TinyStories
   text and of WikiText-2, the sparsity of the weights the final model multiplies by (and whether
   every entry the mask marks pruned is +0.0), trainable parameters and the training-step time.

The learning rate of each (recovery, distillation) is chosen on the validation NLL of seed 0 over a
grid (`LR_GRIDS`); a grid whose best rate is at its edge is extended one rung of `LADDER` (at most
`MAX_EXTENSIONS` times). The chosen rate then runs with the other seeds. `plan` derives all cells
from the cache, so the study is a fixed point: run what is planned, plan again, until nothing is
missing.

Each finished cell is cached as JSON under `--work`, so an interrupted study resumes where it
stopped; the tables, `study.json` and the plots are rebuilt from the cache. Pruned checkpoints
are cached there too. Nothing in the tables is typed in by hand: they come from the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # spp from this checkout; study_report beside us

from spp.errors import SppError  # noqa: E402

PATTERNS = {"50%": ("unstructured", 0.5), "75%": ("unstructured", 0.75), "2:4": ("2:4", None)}
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSE_KINDS = ("spp", "masked_lora", "full")  # spp's own sparsity-preserving recoveries (spp.adapter)
PEFT_KINDS = ("lora", "hira")
KINDS = SPARSE_KINDS + PEFT_KINDS
DISTILL = ("", "kd")  # "": cross-entropy only; "kd": + kd_weight · logit KL(dense teacher ‖ student) at T
SETS = ("tinystories", "wikitext")
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

    Training: `steps` AdamW steps of `batch_size` windows of `seqlen` tokens, peak rate from the
    cell (`learning_rate` when the cell has none) with linear warmup over `warmup_ratio` of the
    steps then linear decay, gradients clipped to `max_grad_norm`. Adapters: SPP with
    `spp_row_groups` row groups and scale `lora_alpha / lora_r`; masked LoRA and PEFT LoRA rank
    `lora_r`, scale `lora_alpha / lora_r`; HiRA rank `hira_r`. Distillation (cells with `distill`
    "kd"): loss = ce_weight · NLL/N + kd_weight · T²·KL(teacher ‖ student)/N at temperature
    `kd_temperature`, the teacher being the dense `model`. The last `val_windows` windows of the
    first half are held out of training and choose the learning rate.
    """

    model: str = "../shared/data/stories260K-hf"
    text: str = "../shared/data/tinystories/tinystories_val.txt"
    wikitext: str = "../shared/data/wikitext-2-raw/wikitext-test.txt"
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
    hira_r: int = 8
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    val_windows: int = 64
    eval_windows: int = 200
    eval_seqlen: int = 256
    eval_batch_size: int = 16
    device: str = "cpu"

    def sha256(self) -> str:
        from spp.io.manifest import settings_sha256

        return settings_sha256(asdict(self))


TINY = dict(calib_nsamples=4, calib_seqlen=128, steps=4, batch_size=2, seqlen=64, val_windows=4, eval_windows=2,
            eval_seqlen=128, eval_batch_size=2)


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
    """Token ids every cell shares: training and validation windows, and the two evaluation streams."""

    train: list[tuple[list[int], list[int]]]  # (ids, labels) windows of the first half, minus the validation slice
    val: list[tuple[list[int], list[int]]]  # the last `val_windows` windows of the first half (never trained on)
    eval_ids: dict[str, torch.Tensor]  # set name -> (n,) ids
    pad_id: int
    calib_path: str  # the first half as a file, for `run_prune --calib`
    split: dict  # where the text was cut, and token counts


def split_halves(text: str) -> tuple[str, str]:
    """Cut `text` at the first line break at or after its middle character: (first half, second half)."""
    middle = text.find("\n", len(text) // 2)
    middle = len(text) // 2 if middle < 0 else middle + 1
    return text[:middle], text[middle:]


def check_row_groups(model: str, cells: list[Cell], row_groups: int) -> None:
    """SPP needs r ≤ the output rows of every adapted layer; check it on the weightless model before any work.

    Raises:
        SppError: `row_groups` above the smallest layer's output rows (names both).
    """
    from transformers import AutoModelForCausalLM

    from spp.io.reader import load_config
    from spp.models import find_decoder_blocks, find_linear_layers, weight_out_in

    if not any(c.adapter == "spp" for c in cells):
        return
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(load_config(model))
    smallest = min(weight_out_in(layer).shape[0] for block in find_decoder_blocks(meta)[1]
                   for layer in find_linear_layers(block).values())
    if row_groups > smallest:
        raise SppError(f"SPP row groups {row_groups} exceed the {smallest} output rows of {model}'s smallest "
                       f"linear layer; use --spp-row-groups of at most {smallest}")


def prepare_data(settings: StudySettings, work: Path) -> StudyData:
    """Read and split the text, write the calibration half, tokenize training/validation windows and evaluation sets."""
    from spp.data import text_windows
    from spp.eval.perplexity import local_text, set_ids, tokenize_text
    from spp.models import load_tokenizer

    path = Path(settings.text)
    if not path.is_file():
        raise SppError(f"--text {path} does not exist")
    first, second = split_halves(path.read_text(encoding="utf-8"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib_first_half.txt"
    if not calib.is_file() or calib.read_text(encoding="utf-8") != first:
        calib.write_text(first, encoding="utf-8")
    tokenizer = load_tokenizer(settings.model)
    windows = text_windows(tokenizer, [first], settings.seqlen)
    windows = [w for w in windows if len(w[0]) == settings.seqlen]  # full windows only: every step sees B·T tokens
    if len(windows) <= settings.val_windows:
        raise SppError(f"the first half has {len(windows)} windows of {settings.seqlen} tokens, not more than "
                       f"--val-windows {settings.val_windows}")
    train, val = windows[: len(windows) - settings.val_windows], windows[len(windows) - settings.val_windows:]
    eval_ids = {"tinystories": tokenize_text(tokenizer, second),
                "wikitext": set_ids(tokenizer, local_text(Path(settings.wikitext), "wikitext2"), settings.eval_seqlen)}
    for name, ids in eval_ids.items():
        if ids.numel() < settings.eval_seqlen * settings.eval_windows:
            raise SppError(f"the {name} evaluation text has {ids.numel()} tokens, fewer than "
                           f"{settings.eval_windows} windows of {settings.eval_seqlen}")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    split = {"text_chars": len(first) + len(second), "cut_at_char": len(first),
             "train_windows": len(train), "train_tokens": len(train) * settings.seqlen,
             "val_windows": len(val), "val_tokens": len(val) * settings.seqlen,
             "eval_tokens_used": {k: settings.eval_windows * settings.eval_seqlen for k in eval_ids},
             "eval_tokens_available": {k: int(v.numel()) for k, v in eval_ids.items()}}
    return StudyData(train=train, val=val, eval_ids=eval_ids, pad_id=pad_id, calib_path=str(calib), split=split)


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_now(device: torch.device) -> int:
    """Bytes in use: allocated CUDA memory, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's counter, or VmHWM through /proc/self/clear_refs. False where impossible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> int:
    """Peak bytes since `reset_peak_memory`: CUDA max allocated, or VmHWM."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def weight_sparsity(model, masks: dict | None = None) -> dict:
    """Exact zeros in the decoder-block linear weights: {zeros, numel, sparsity}; with the keep-masks
    also `pruned_not_plus_zero` (entries the mask marks pruned that are not bitwise +0.0) and
    `kept_zero` (kept entries that are exactly zero)."""
    from spp.models import find_decoder_blocks, find_linear_layers, weight_out_in
    from spp.sparsity import pruned_is_positive_zero

    zeros = numel = 0
    for block in find_decoder_blocks(model)[1]:
        for layer in find_linear_layers(block).values():
            W = weight_out_in(layer)
            zeros += int((W == 0).sum())
            numel += W.numel()
    out = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}
    if masks:
        params = dict(model.named_parameters())
        bad = kept_zero = 0
        for name, keep in masks.items():
            W = params[name].detach()
            bad += int((~pruned_is_positive_zero(W, keep)).sum())
            kept_zero += int(((W == 0) & keep).sum())
        out.update(pruned_not_plus_zero=bad, kept_zero=kept_zero)
    return out


def mean_nll(model, windows: list, pad_id: int, batch_size: int) -> float:
    """Mean token NLL of `model` over `windows` ((ids, labels) pairs), in batches."""
    from spp.data import pad_batch
    from spp.train.losses import summed_nll, target_count

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(windows[i: i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            total += float(summed_nll(logits, batch["labels"]))
            count += target_count(batch["labels"])
    return total / max(count, 1)


def evaluate(model, data: StudyData, settings: StudySettings) -> dict:
    """Validation NLL, perplexity on each set (first `eval_windows` windows) and the time the forward passes took."""
    from spp.eval.perplexity import perplexity

    device = next(model.parameters()).device
    model.eval()
    first = next(iter(data.eval_ids.values()))[: settings.eval_seqlen][None].to(device)
    with torch.inference_mode():
        model(input_ids=first, use_cache=False)  # warm-up: allocator and kernel selection stay out of the timing
    out, seconds = {}, 0.0
    for name, ids in data.eval_ids.items():
        sync(device)
        start = time.perf_counter()
        result = perplexity(model, ids, settings.eval_seqlen, settings.eval_batch_size, settings.eval_windows)
        sync(device)
        seconds += time.perf_counter() - start
        out[name] = {"ppl": result.ppl, "nll_sum": result.nll_sum, "predicted_tokens": result.predicted_tokens,
                     "windows": result.windows}
    tokens = sum(v["windows"] * settings.eval_seqlen for v in out.values())
    return {"val_nll": mean_nll(model, data.val, data.pad_id, settings.eval_batch_size),
            "ppl": {k: v["ppl"] for k, v in out.items()}, "sets": out, "infer_s": seconds,
            "infer_tokens_per_s": tokens / seconds}


# --------------------------------------------------------------------------- the shared training loop


@dataclass
class TrainLog:
    """What `train_adapter` measured: losses per step, step times, and memory added during training.

    `losses` is the cross-entropy (token-mean NLL) of every step, whatever the objective;
    `kd_losses` the KD term (T²·KL per target token) when distilling. `diverged_at` is the
    1-based step whose loss was not finite (training stopped there), else None.
    """

    losses: list[float]
    kd_losses: list[float]
    step_s: float  # median seconds per optimizer step (the first step is excluded when there are more)
    peak_increase_bytes: int
    peak_bytes: int
    tokens: int
    learning_rate: float
    diverged_at: int | None = None


def train_adapter(model, data: StudyData, settings: StudySettings, seed: int, learning_rate: float,
                  teacher=None) -> TrainLog:
    """The one loop every adapter trains in: AdamW on the trainable parameters.

    Step t takes windows `global_batch(n, B, seed, t)` (the same order for every adapter); the
    loss is ce_weight · Σ NLL / N (+ kd_weight · Σ T²·KL(teacher ‖ student) / N with a `teacher`),
    N the batch's target count (`spp.train.losses`); the rate is `learning_rate · lr_factor(t)`
    (linear warmup, linear decay); gradients are clipped. A non-finite loss stops training and
    is reported in `diverged_at` (a learning rate too high for the recovery is a result of the sweep).
    """
    from spp.data import pad_batch
    from spp.train.loop import global_batch, lr_factor
    from spp.train.losses import kd_kl_sum, summed_nll, target_count

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = math.ceil(settings.warmup_ratio * settings.steps)
    model.train()
    before = memory_now(device)
    reset_peak_memory(device)
    losses, kd_losses, times, diverged = [], [], [], None
    for step in range(settings.steps):
        start = time.perf_counter()
        ids = global_batch(len(data.train), settings.batch_size, seed, step)
        batch = {k: v.to(device) for k, v in pad_batch([data.train[i] for i in ids], data.pad_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        n = max(target_count(batch["labels"]), 1)
        logits = model(**inputs).logits
        ce = summed_nll(logits, batch["labels"]) / n
        loss = settings.ce_weight * ce
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            kd = kd_kl_sum(logits, teacher_logits, batch["labels"], settings.kd_temperature) / n
            loss = loss + settings.kd_weight * kd
            kd_losses.append(kd.item())
        if not math.isfinite(loss.item()):
            diverged = step + 1
            optimizer.zero_grad(set_to_none=True)
            break
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * lr_factor(step, settings.steps, warmup, "linear")
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(ce.item())
    peak = peak_memory(device)
    model.eval()
    timed = times[1:] if len(times) > 1 else times
    return TrainLog(losses=losses, kd_losses=kd_losses, step_s=statistics.median(timed) if timed else math.nan,
                    peak_increase_bytes=max(peak - before, 0), peak_bytes=peak,
                    tokens=len(losses) * settings.batch_size * settings.seqlen, learning_rate=learning_rate,
                    diverged_at=diverged)


# --------------------------------------------------------------------------- one cell


def peft_targets(model) -> list[str]:
    """Full names of every linear layer in the decoder blocks (what spp's `*` adapts), for PEFT."""
    from spp.adapter.model import target_layers

    return list(target_layers(model, ["*"]))


def add_adapter(model, cell: Cell, settings: StudySettings, masks: dict):
    """Wrap `model` with the cell's adapter (seeded init). Returns (model, trainable parameter count)."""
    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_adapter as add_spp_adapter
    from spp.adapter.model import count_trainable

    torch.manual_seed(cell.seed)
    if cell.adapter in SPARSE_KINDS:
        cfg = AdapterConfig(kind=cell.adapter, spp_row_groups=settings.spp_row_groups, rank=settings.lora_r,
                            lora_alpha=settings.lora_alpha, lora_r=settings.lora_r, target_modules=["*"])
        add_spp_adapter(model, cfg, masks)
        return model, count_trainable(model)
    from peft import HiraConfig, LoraConfig, get_peft_model

    targets = peft_targets(model)
    if cell.adapter == "lora":
        config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=targets)
    else:
        config = HiraConfig(r=settings.hira_r, hira_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, config)
    return model, count_trainable(model)


def load_teacher(settings: StudySettings, device):
    """The dense model, frozen, in evaluation mode (one per worker process, see `_teacher`)."""
    from spp.models import load_model

    teacher = load_model(settings.model, "float32", device)
    teacher.requires_grad_(False)
    return teacher.eval()


def run_cell(cell: Cell, settings: StudySettings, data: StudyData, work: Path, teacher=None) -> dict:
    """Prune (from the cache), recover and measure one cell. Returns its JSON record.

    Records one row per final model: `none`, `spp` / `masked_lora` / `full` (merged),
    `lora-unmerged` and `lora-merged`, `hira` (merged). A diverged cell has no rows, only `diverged`.
    """
    from spp.adapter.model import merge_adapter
    from spp.io.reader import read_checkpoint
    from spp.models import load_model, resolve_device

    start = time.perf_counter()
    device = resolve_device(settings.device)
    source = settings.model if cell.method == "dense" else str(pruned_dir(work, cell, settings))
    model = load_model(source, "float32", device)
    masks = {} if cell.method == "dense" else {k: v.to(device) for k, v in read_checkpoint(source).masks_by_parameter().items()}
    base_sparsity = weight_sparsity(model, masks)
    lr = settings.learning_rate if cell.lr is None else cell.lr
    record = {"key": cell.key, "cell": asdict(cell), "settings_sha256": settings.sha256(), "rows": [],
              "model_params": sum(p.numel() for p in model.parameters()), "learning_rate": lr}

    def row(name: str, final, trainable: int, sparsity: dict, **extra) -> None:
        record["rows"].append({"recovery": name, **evaluate(final, data, settings), "trainable": trainable,
                               **sparsity, **extra})

    if cell.adapter == "none":
        row("none", model, 0, base_sparsity)
    else:
        model, trainable = add_adapter(model, cell, settings, masks)
        log = train_adapter(model, data, settings, cell.seed, lr, teacher if cell.distill else None)
        record["train"] = asdict(log)
        record["trainable"] = trainable
        if log.diverged_at is not None:
            record["diverged"] = log.diverged_at
        elif cell.adapter in SPARSE_KINDS:
            merge_adapter(model, masks)
            after = weight_sparsity(model, masks)
            if after["pruned_not_plus_zero"]:
                raise RuntimeError(f"{cell.key}: {after['pruned_not_plus_zero']} pruned entries are not +0.0 after merge")
            row(cell.adapter, model, trainable, after)
        elif cell.adapter == "lora":
            # unmerged: the sparse base runs as pruned, plus a dense rank-r branch of `trainable` weights
            row("lora-unmerged", model, trainable, base_sparsity, dense_adapter_params=trainable)
            merged = model.merge_and_unload()
            row("lora-merged", merged, trainable, weight_sparsity(merged, masks))
        else:
            merged = model.merge_and_unload()  # HiRA: W + W ⊙ (B·A), so the zeros of W survive the merge
            row("hira", merged, trainable, weight_sparsity(merged, masks))
    record["base_sparsity"] = base_sparsity["sparsity"]
    record["wall_s"] = time.perf_counter() - start
    return record


def prune_one(cell: Cell, settings: StudySettings, data: StudyData, work: Path) -> dict:
    """`run_prune` for the cell's (method, pattern, seed) into `work/pruned/` unless it is there already."""
    from spp.config import PruneConfig
    from spp.io.checkpoint import MANIFEST_FILE, read_json
    from spp.prune import run_prune

    output = pruned_dir(work, cell, settings)
    if not (output / MANIFEST_FILE).is_file():
        pattern, sparsity = PATTERNS[cell.pattern]
        cfg = PruneConfig(model=settings.model, output=str(output), method=cell.method, pattern=pattern,
                          sparsity=sparsity, calib=data.calib_path, nsamples=settings.calib_nsamples,
                          seqlen=settings.calib_seqlen, seed=cell.seed, device=settings.device, dtype="float32",
                          overwrite=True)
        run_prune(cfg)
    manifest = read_json(output / MANIFEST_FILE, what="prune manifest")
    return {"prune_key": cell.prune_key, "wall_time_s": manifest["wall_time_s"],
            "sparsity": manifest["details"]["achieved_sparsity"]}


# --------------------------------------------------------------------------- the grid, cached


def pruned_dir(work: Path, cell: Cell, settings: StudySettings) -> Path:
    """Where the cell's pruned model is cached: named by (method, pattern, seed) and the calibration size."""
    return work / "pruned" / f"{cell.prune_key}-c{settings.calib_nsamples}x{settings.calib_seqlen}"


def cell_path(work: Path, cell: Cell) -> Path:
    return work / "cells" / f"{cell.key}.json"


def cached(work: Path, cell: Cell, settings: StudySettings) -> dict | None:
    """The cell's record if it was computed with these settings, else None."""
    path = cell_path(work, cell)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from an older run: compute it again
    return record if record.get("settings_sha256") == settings.sha256() else None


def save_record(work: Path, cell: Cell, record: dict) -> None:
    """Write a cell's record atomically (temporary file, then rename)."""
    path = cell_path(work, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


_WORKER: dict = {}


def _init_worker(settings: StudySettings, data: StudyData, work: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(settings=settings, data=data, work=work)


def _teacher():
    """This worker's dense teacher, loaded on first use."""
    if "teacher" not in _WORKER:
        from spp.models import resolve_device

        _WORKER["teacher"] = load_teacher(_WORKER["settings"], resolve_device(_WORKER["settings"].device))
    return _WORKER["teacher"]


def _worker(kind: str, cell: Cell) -> dict:
    settings, data, work = _WORKER["settings"], _WORKER["data"], _WORKER["work"]
    if kind == "prune":
        return prune_one(cell, settings, data, work)
    return run_cell(cell, settings, data, work, _teacher() if cell.distill else None)


def run_grid(cells: list[Cell], settings: StudySettings, work: Path, jobs: int = 1, threads: int | None = None,
             log=print, data: StudyData | None = None) -> tuple[dict[str, dict], dict]:
    """Prune what the cells need, then run every cell not in the cache, `jobs` at a time.

    Returns:
        (key -> record for every cell, this run: wall seconds, cells computed, workers, threads, load, data split).
    """
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    check_row_groups(settings.model, cells, settings.spp_row_groups)
    data = data or prepare_data(settings, work)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or max(1, cores // jobs)
    records = {c.key: r for c in cells if (r := cached(work, c, settings)) is not None}
    todo = [c for c in cells if c.key not in records]
    prunes = list({c.prune_key: c for c in todo if c.method != "dense"}.values())
    log(f"{len(cells)} cells, {len(records)} cached; pruning up to {len(prunes)} models, running {len(todo)} cells "
        f"with {jobs} worker(s) × {threads} thread(s)")
    if jobs == 1 or len(todo) == 1:
        _init_worker(settings, data, work, threads)
        for cell in prunes:
            _worker("prune", cell)
        for cell in todo:
            records[cell.key] = _finish(work, cell, _worker("cell", cell), log)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork after torch and tokenizers started threads
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(settings, data, work, threads)) as pool:
            for future in as_completed([pool.submit(_worker, "prune", c) for c in prunes]):
                future.result()
            futures = {pool.submit(_worker, "cell", c): c for c in todo}  # submitted in plan order
            try:
                for future in as_completed(futures):
                    cell = futures[future]
                    records[cell.key] = _finish(work, cell, future.result(), log)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure; finished cells stay cached
                raise
    timing = {"wall_s": time.perf_counter() - start, "cells_computed": len(todo), "prunes": len(prunes),
              "jobs": jobs, "threads_per_job": threads, "settings_sha256": settings.sha256(),
              "cpu_cores": cores, "load_avg_1min_start": load_start, "load_avg_1min_end": os.getloadavg()[0],
              "device": settings.device, "split": data.split}
    return {c.key: records[c.key] for c in cells}, timing


def _finish(work: Path, cell: Cell, record: dict, log) -> dict:
    save_record(work, cell, record)
    if record.get("diverged"):
        log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  diverged at step {record['diverged']}")
        return record
    ppl = ", ".join(f"{r['recovery']} {r['ppl']['tinystories']:.3f}/{r['ppl']['wikitext']:.1f}" for r in record["rows"])
    log(f"  {cell.key:44s} {record['wall_s']:6.1f} s  val {record['rows'][0]['val_nll']:.4f}  "
        f"ppl tinystories/wikitext: {ppl}")
    return record


def record_timing(work: Path, timing: dict, cells: list[Cell]) -> list[dict]:
    """Append this run's timing to `work/runs.json` (one entry per round) and return them all."""
    path = work / "runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({**timing, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "grid_cells": len(cells)})
    path.write_text(json.dumps(runs, indent=1))
    return runs


def cached_records(work: Path, settings: StudySettings) -> dict[str, dict]:
    """Every cell record under `work/cells` computed with these settings, by key."""
    out = {}
    for path in sorted((work / "cells").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if record.get("settings_sha256") == settings.sha256():
            out[record["key"]] = record
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, run the grid to its fixed point (resuming from `--work`), and write the report into `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="full", choices=["full", "tiny"])
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="where tables, JSON and plots go")
    parser.add_argument("--work", default=str(REPO / "runs" / "study"), help="cache of pruned models and cells")
    parser.add_argument("--jobs", type=int, default=None, help="cells run in parallel (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / jobs)")
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
    base = TINY if args.grid == "tiny" else {}
    settings = StudySettings(**{**base, **overrides})
    if settings.device == "auto":
        settings = dataclasses.replace(settings, device="cuda" if torch.cuda.is_available() else "cpu")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    kinds = tuple(k for k in args.kinds.split(",") if k)
    distills = tuple("" if d == "none" else d for d in args.distill.split(",") if d)
    if bad := [k for k in kinds if k not in KINDS] + [d for d in distills if d not in DISTILL]:
        print(f"error: unknown --kinds/--distill {bad} (kinds: {', '.join(KINDS)}; distill: none, kd)", file=sys.stderr)
        raise SystemExit(1)
    try:
        pairs = parse_pairs(args.pairs)
    except SppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    work = Path(args.work)
    jobs = args.jobs or (1 if settings.device.startswith("cuda") else 2)

    def planned(records):
        cells, sweeps = plan(args.grid, records, seeds, pairs, kinds, distills)
        if args.only:
            from fnmatch import fnmatchcase

            cells = [c for c in cells if any(fnmatchcase(c.key, p) for p in args.only.split(","))]
        return cells, sweeps

    records = cached_records(work, settings)
    cells, sweeps = planned(records)
    runs = json.loads((work / "runs.json").read_text()) if (work / "runs.json").is_file() else []
    if not args.report_only:  # else: tables from whatever the cache holds; the cells not run are listed in the report
        data = None
        try:
            while todo := [c for c in cells if c.key not in records]:
                data = data or prepare_data(settings, work)
                done, timing = run_grid(todo, settings, work, jobs, args.threads, data=data)
                records.update(done)
                runs = record_timing(work, timing, cells)
                cells, sweeps = planned(records)  # finished sweeps choose rates, edges extend: plan again
        except SppError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    from study_report import write_report  # scripts/study_report.py: tables and plots

    records = {c.key: records[c.key] for c in cells if c.key in records}
    span = grid_span(work, cells, records, settings)
    span["split"] = prepare_data(settings, work).split  # cheap: tokenizing the two texts again
    return write_report(Path(args.out), settings, cells, records, runs, span, sweeps, args.note, grids=LR_GRIDS,
                        common_rate=COMMON_RATE)


def grid_span(work: Path, cells: list[Cell], records: dict[str, dict], settings: StudySettings) -> dict:
    """Time the cache itself records, so it holds across interruptions and resumes:

    span = (last cell file written) − (earliest start: a pruned model's manifest time − its
    prune time, or a cell file's time − its compute time), the sum of the cells' compute times,
    and the most cells whose compute intervals overlap (the parallelism actually used).
    """
    from spp.io.checkpoint import MANIFEST_FILE

    ends, starts = [], []
    for cell in cells:
        if cell.key in records:
            mtime = cell_path(work, cell).stat().st_mtime
            ends.append(mtime)
            starts.append(mtime - records[cell.key]["wall_s"])
    for cell in {c.prune_key: c for c in cells if c.method != "dense"}.values():
        manifest = pruned_dir(work, cell, settings) / MANIFEST_FILE
        if manifest.is_file():
            starts.append(manifest.stat().st_mtime - json.loads(manifest.read_text())["wall_time_s"])
    intervals = [(end - records[c.key]["wall_s"], end) for c in cells if c.key in records
                 for end in [cell_path(work, c).stat().st_mtime]]
    concurrent = max((sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals), default=0)
    return {"span_minutes": (max(ends) - min(starts)) / 60 if ends else 0.0,
            "cell_minutes": sum(r["wall_s"] for r in records.values()) / 60, "max_concurrent": concurrent,
            "missing": [c.key for c in cells if c.key not in records]}


if __name__ == "__main__":
    main()
