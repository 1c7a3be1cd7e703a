"""The prune-then-tune study: prune, recover with SPP / LoRA / HiRA, measure, and write `docs/results/`.

One command re-runs it (about an hour on 2 CPU cores for the full grid):

    python scripts/study.py                                   # stories260K, the full grid, 2 workers
    python scripts/study.py --grid tiny --out /tmp/r --work /tmp/w   # a couple of cells, a few steps
    python scripts/study.py --model PATH --device cuda --jobs 1      # any causal LM, e.g. a 7B on a GPU

What it does, for every cell of the grid (see `grid`):

1. prune the model with `spp.prune.run_prune` (magnitude, Wanda, SparseGPT at 50 % and 75 %
   unstructured and 2:4), calibrated on the first half of the TinyStories text;
2. recover with one of: nothing; SPP (`spp.adapter.add_spp`, then `merge_spp`); PEFT LoRA
   (evaluated unmerged, then merged with `merge_and_unload`); PEFT HiRA (merged). Every adapter
   trains in the same loop (`train_adapter`): the same windows of the first half in the same
   order (`spp.train.loop.global_batch`), AdamW with the same learning-rate schedule, the same seed;
3. measure perplexity with `spp.eval.perplexity.perplexity` on the first `eval_windows` windows of
   `eval_seqlen` tokens of the second half of the TinyStories text and of WikiText-2 (text mode),
   the sparsity of the weights the final model multiplies by, trainable parameters, the median
   training-step time and the memory added during training, and the evaluation time.

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
ADAPTERS = ("none", "spp", "lora", "hira")
SEEDED_METHODS = ("wanda", "sparsegpt")  # × SEEDED_PATTERNS × ADAPTERS run with every seed
SEEDED_PATTERNS = ("50%", "2:4")
SETS = ("tinystories", "wikitext")


# --------------------------------------------------------------------------- settings and grid


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the numbers of a cell (its sha256 keys the cache).

    Training: `steps` AdamW steps of `batch_size` windows of `seqlen` tokens, learning rate
    `learning_rate` with linear warmup over `warmup_ratio` of the steps then linear decay,
    gradients clipped to `max_grad_norm`. Adapters: SPP with `spp_row_groups` row groups and
    scale `lora_alpha / lora_r`; LoRA rank `lora_r`, scale `lora_alpha / lora_r`; HiRA rank `hira_r`.
    """

    model: str = "../shared/data/stories260K-hf"
    text: str = "../shared/data/tinystories/tinystories_val.txt"
    wikitext: str = "../shared/data/wikitext-2-raw/wikitext-test.txt"
    calib_nsamples: int = 128
    calib_seqlen: int = 512
    steps: int = 150
    batch_size: int = 8
    seqlen: int = 256
    learning_rate: float = 4e-3
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    spp_row_groups: int = 16
    lora_r: int = 8
    lora_alpha: float = 16.0
    hira_r: int = 8
    eval_windows: int = 64
    eval_seqlen: int = 512
    eval_batch_size: int = 8
    device: str = "cpu"

    def sha256(self) -> str:
        from spp.io.manifest import settings_sha256

        return settings_sha256(asdict(self))


TINY = dict(calib_nsamples=4, calib_seqlen=128, steps=4, batch_size=2, seqlen=64, eval_windows=2, eval_seqlen=128,
            eval_batch_size=2)


@dataclass(frozen=True)
class Cell:
    """One pruned model and one way to recover it. `method` "dense" is the unpruned model."""

    method: str
    pattern: str
    adapter: str = "none"
    seed: int = 0
    row_groups: int | None = None  # SPP only; None means `StudySettings.spp_row_groups`

    @property
    def prune_key(self) -> str:
        return f"{self.method}-{self.pattern.replace(':', 'of').replace('%', 'pct')}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.prune_key}-{self.adapter}" + (f"-r{self.row_groups}" if self.row_groups else "")


def grid(name: str, seeds: tuple[int, ...] = (0, 1, 2), row_groups: tuple[int, ...] = (1, 4, 32)) -> list[Cell]:
    """The cells of a grid.

    `full`: the dense model; every method × pattern × adapter with seed 0; seeds 1.. for
    SEEDED_METHODS × SEEDED_PATTERNS × ADAPTERS; SPP at each of `row_groups` (besides the
    default) for SEEDED_METHODS × SEEDED_PATTERNS with seed 0. Cells are listed in the order they
    run: every seed-0 cell at the default settings first, then the other seeds, then the row-group
    sweep, so a study cut short still has the whole first seed. `tiny`: dense and Wanda 50 %
    with no recovery, SPP and LoRA (what the test runs).
    """
    if name == "tiny":
        return [Cell("dense", "0%")] + [Cell("wanda", "50%", a) for a in ("none", "spp", "lora")]
    if name != "full":
        raise SppError(f"--grid {name!r} is not one of full, tiny")
    first, more_seeds, sweep = [Cell("dense", "0%")], [], []
    for method in METHODS:
        for pattern in PATTERNS:
            seeded = method in SEEDED_METHODS and pattern in SEEDED_PATTERNS
            first += [Cell(method, pattern, adapter, seeds[0]) for adapter in ADAPTERS]
            if seeded:
                more_seeds += [Cell(method, pattern, adapter, seed) for seed in seeds[1:] for adapter in ADAPTERS]
                sweep += [Cell(method, pattern, "spp", seeds[0], r) for r in row_groups]
    return first + more_seeds + sweep


# --------------------------------------------------------------------------- data


@dataclass
class StudyData:
    """Token ids every cell shares: training windows, and the two evaluation streams."""

    train: list[tuple[list[int], list[int]]]  # (ids, labels) windows of the first half
    eval_ids: dict[str, torch.Tensor]  # set name -> (n,) ids
    pad_id: int
    calib_path: str  # the first half as a file, for `run_prune --calib`
    split: dict  # where the text was cut, and token counts


def split_halves(text: str) -> tuple[str, str]:
    """Cut `text` at the first line break at or after its middle character: (first half, second half)."""
    middle = text.find("\n", len(text) // 2)
    middle = len(text) // 2 if middle < 0 else middle + 1
    return text[:middle], text[middle:]


def check_row_groups(model: str, cells: list[Cell], default: int) -> None:
    """SPP needs r ≤ the output rows of every adapted layer; check it on the weightless model before any work.

    Raises:
        SppError: a row-group setting above the smallest layer's output rows (names both).
    """
    from transformers import AutoModelForCausalLM

    from spp.models import find_decoder_blocks, find_linear_layers, load_config, weight_out_in

    wanted = {c.row_groups or default for c in cells if c.adapter == "spp"}
    if not wanted:
        return
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(load_config(model))
    smallest = min(weight_out_in(layer).shape[0] for block in find_decoder_blocks(meta)[1]
                   for layer in find_linear_layers(block).values())
    if max(wanted) > smallest:
        raise SppError(f"SPP row groups {max(wanted)} exceed the {smallest} output rows of {model}'s smallest "
                       f"linear layer; use --row-groups / --spp-row-groups of at most {smallest}")


def prepare_data(settings: StudySettings, work: Path) -> StudyData:
    """Read and split the text, write the calibration half, tokenize training windows and evaluation sets."""
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
    train = text_windows(tokenizer, [first], settings.seqlen)
    train = [w for w in train if len(w[0]) == settings.seqlen]  # full windows only: every step sees B·T tokens
    eval_ids = {"tinystories": tokenize_text(tokenizer, second),
                "wikitext": set_ids(tokenizer, local_text(Path(settings.wikitext), "wikitext2"), settings.eval_seqlen)}
    for name, ids in eval_ids.items():
        if ids.numel() < settings.eval_seqlen * settings.eval_windows:
            raise SppError(f"the {name} evaluation text has {ids.numel()} tokens, fewer than "
                           f"{settings.eval_windows} windows of {settings.eval_seqlen}")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    split = {"text_chars": len(first) + len(second), "cut_at_char": len(first),
             "train_windows": len(train), "train_tokens": len(train) * settings.seqlen,
             "eval_tokens_used": {k: settings.eval_windows * settings.eval_seqlen for k in eval_ids},
             "eval_tokens_available": {k: int(v.numel()) for k, v in eval_ids.items()}}
    return StudyData(train=train, eval_ids=eval_ids, pad_id=pad_id, calib_path=str(calib), split=split)


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


def weight_sparsity(model) -> dict:
    """Exact zeros in the decoder-block linear weights: {zeros, numel, sparsity}."""
    from spp.models import find_decoder_blocks, find_linear_layers, weight_out_in

    zeros = numel = 0
    for block in find_decoder_blocks(model)[1]:
        for layer in find_linear_layers(block).values():
            W = weight_out_in(layer)
            zeros += int((W == 0).sum())
            numel += W.numel()
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


def evaluate(model, data: StudyData, settings: StudySettings) -> dict:
    """Perplexity on each set (first `eval_windows` windows) and the time the forward passes took."""
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
    return {"ppl": {k: v["ppl"] for k, v in out.items()}, "sets": out, "infer_s": seconds,
            "infer_tokens_per_s": tokens / seconds}


# --------------------------------------------------------------------------- the shared training loop


@dataclass
class TrainLog:
    """What `train_adapter` measured: loss per step, step times, and memory added during training."""

    losses: list[float]
    step_s: float  # median seconds per optimizer step (the first step is excluded when there are more)
    peak_increase_bytes: int
    peak_bytes: int
    tokens: int


def train_adapter(model, data: StudyData, settings: StudySettings, seed: int) -> TrainLog:
    """The one loop every adapter trains in: AdamW on the trainable parameters, mean token NLL.

    Step t takes windows `global_batch(n, B, seed, t)` (the same order for every adapter),
    the loss is Σ NLL / #targets (`spp.train.loop.summed_nll`, `target_count`), the rate is
    `learning_rate · lr_factor(t)` (linear warmup, linear decay) and gradients are clipped.

    Raises:
        SppError: the loss became NaN or inf (names the step).
    """
    from spp.data import pad_batch
    from spp.train.loop import global_batch, lr_factor, summed_nll, target_count

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    warmup = math.ceil(settings.warmup_ratio * settings.steps)
    model.train()
    before = memory_now(device)
    reset_peak_memory(device)
    losses, times = [], []
    for step in range(settings.steps):
        start = time.perf_counter()
        ids = global_batch(len(data.train), settings.batch_size, seed, step)
        batch = {k: v.to(device) for k, v in pad_batch([data.train[i] for i in ids], data.pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = summed_nll(logits, batch["labels"]) / max(target_count(batch["labels"]), 1)
        if not math.isfinite(loss.item()):
            raise SppError(f"the training loss is {loss.item()} at step {step + 1}; lower --learning-rate")
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * lr_factor(step, settings.steps, warmup, "linear")
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = peak_memory(device)
    model.eval()
    timed = times[1:] if len(times) > 1 else times
    return TrainLog(losses=losses, step_s=statistics.median(timed), peak_increase_bytes=max(peak - before, 0),
                    peak_bytes=peak, tokens=settings.steps * settings.batch_size * settings.seqlen)


# --------------------------------------------------------------------------- one cell


def peft_targets(model) -> list[str]:
    """Full names of every linear layer in the decoder blocks (what SPP's `*` adapts), for PEFT."""
    from spp.adapter.model import target_layers

    return list(target_layers(model, ["*"]))


def add_adapter(model, cell: Cell, settings: StudySettings, masks: dict):
    """Wrap `model` with the cell's adapter (seeded init). Returns (model, trainable parameter count)."""
    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_spp, count_trainable

    torch.manual_seed(cell.seed)
    if cell.adapter == "spp":
        cfg = AdapterConfig(spp_row_groups=cell.row_groups or settings.spp_row_groups, lora_alpha=settings.lora_alpha,
                            lora_r=settings.lora_r, target_modules=["*"])
        add_spp(model, cfg, masks)
        return model, count_trainable(model)
    from peft import HiraConfig, LoraConfig, get_peft_model

    targets = peft_targets(model)
    if cell.adapter == "lora":
        config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=targets)
    else:
        config = HiraConfig(r=settings.hira_r, hira_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, config)
    return model, count_trainable(model)


def run_cell(cell: Cell, settings: StudySettings, data: StudyData, work: Path) -> dict:
    """Prune (from the cache), recover and measure one cell. Returns its JSON record.

    Records one row per final model: `none`, `spp`, `lora-unmerged` and `lora-merged`, `hira`.
    """
    from spp.adapter.model import merge_spp
    from spp.io.checkpoint import masks_by_parameter
    from spp.models import load_model, resolve_device

    start = time.perf_counter()
    device = resolve_device(settings.device)
    source = settings.model if cell.method == "dense" else str(work / "pruned" / cell.prune_key)
    model = load_model(source, "float32", device)
    masks = {} if cell.method == "dense" else {k: v.to(device) for k, v in masks_by_parameter(model, Path(source)).items()}
    base_sparsity = weight_sparsity(model)
    record = {"key": cell.key, "cell": asdict(cell), "settings_sha256": settings.sha256(), "rows": [],
              "model_params": sum(p.numel() for p in model.parameters())}

    def row(name: str, final, trainable: int, sparsity: dict, **extra) -> None:
        record["rows"].append({"recovery": name, **evaluate(final, data, settings), "trainable": trainable,
                               "sparsity": sparsity["sparsity"], "zeros": sparsity["zeros"], **extra})

    if cell.adapter == "none":
        row("none", model, 0, base_sparsity)
    else:
        model, trainable = add_adapter(model, cell, settings, masks)
        log = train_adapter(model, data, settings, cell.seed)
        record["train"] = asdict(log)
        if cell.adapter == "spp":
            merge_spp(model, masks)
            after = weight_sparsity(model)
            if after["zeros"] < base_sparsity["zeros"]:
                raise RuntimeError(f"{cell.key}: SPP merge lost zeros ({after['zeros']} < {base_sparsity['zeros']})")
            row("spp" + (f"-r{cell.row_groups}" if cell.row_groups else ""), model, trainable, after)
        elif cell.adapter == "lora":
            # unmerged: the sparse base runs as pruned, plus a dense rank-r branch of `trainable` weights
            row("lora-unmerged", model, trainable, base_sparsity, dense_adapter_params=trainable)
            merged = model.merge_and_unload()
            row("lora-merged", merged, trainable, weight_sparsity(merged))
        else:
            merged = model.merge_and_unload()  # HiRA: W + W ⊙ (B·A), so the zeros of W survive the merge
            row("hira", merged, trainable, weight_sparsity(merged))
    record["base_sparsity"] = base_sparsity["sparsity"]
    record["wall_s"] = time.perf_counter() - start
    return record


def prune_one(cell: Cell, settings: StudySettings, data: StudyData, work: Path) -> dict:
    """`run_prune` for the cell's (method, pattern, seed) into `work/pruned/` unless it is there already."""
    from spp.config import PruneConfig
    from spp.io.checkpoint import MANIFEST_FILE, read_json
    from spp.prune import run_prune

    output = work / "pruned" / cell.prune_key
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
    _WORKER.update(settings=settings, data=data, work=work)


def _worker(kind: str, cell: Cell) -> dict:
    run = prune_one if kind == "prune" else run_cell
    return run(cell, _WORKER["settings"], _WORKER["data"], _WORKER["work"])


def run_grid(cells: list[Cell], settings: StudySettings, work: Path, jobs: int = 1, threads: int | None = None,
             log=print) -> tuple[dict[str, dict], dict]:
    """Prune what the cells need, then run every cell not in the cache, `jobs` at a time.

    Returns:
        (key -> record for every cell, this run: wall seconds, cells computed, workers, threads, load, data split).
    """
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    check_row_groups(settings.model, cells, settings.spp_row_groups)
    data = prepare_data(settings, work)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or max(1, cores // jobs)
    records = {c.key: r for c in cells if (r := cached(work, c, settings)) is not None}
    todo = [c for c in cells if c.key not in records]
    prunes = list({c.prune_key: c for c in todo if c.method != "dense"}.values())
    log(f"{len(cells)} cells, {len(records)} cached; pruning {len(prunes)} models, running {len(todo)} cells "
        f"with {jobs} worker(s) × {threads} thread(s)")
    if jobs == 1:
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
            futures = {pool.submit(_worker, "cell", c): c for c in todo}  # submitted in grid order
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
    ppl = ", ".join(f"{r['recovery']} {r['ppl']['tinystories']:.3f}/{r['ppl']['wikitext']:.1f}" for r in record["rows"])
    log(f"  {cell.key:42s} {record['wall_s']:6.1f} s  ppl tinystories/wikitext: {ppl}")
    return record


def record_timing(work: Path, timing: dict, cells: list[Cell]) -> list[dict]:
    """Append this run's timing to `work/runs.json` (one entry per invocation) and return them all."""
    path = work / "runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({**timing, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "grid_cells": len(cells)})
    path.write_text(json.dumps(runs, indent=1))
    return runs


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, run the grid (resuming from `--work`), and write the report into `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="full", choices=["full", "tiny"])
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="where tables, JSON and plots go")
    parser.add_argument("--work", default=str(REPO / "runs" / "study"), help="cache of pruned models and cells")
    parser.add_argument("--jobs", type=int, default=None, help="cells run in parallel (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / jobs)")
    parser.add_argument("--only", default=None, help="comma-separated globs over cell keys (e.g. 'dense*,wanda-2of4-*')")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached cells only")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--row-groups", default="1,4,32", help="SPP row-group settings besides the default")
    for f in dataclasses.fields(StudySettings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)
                 if getattr(args, f.name) is not None}
    base = TINY if args.grid == "tiny" else {}
    settings = StudySettings(**{**base, **overrides})
    if settings.device == "auto":
        settings = dataclasses.replace(settings, device="cuda" if torch.cuda.is_available() else "cpu")
    cells = grid(args.grid, tuple(int(s) for s in args.seeds.split(",")),
                 tuple(int(r) for r in args.row_groups.split(",") if r))
    if args.only:
        from fnmatch import fnmatchcase

        cells = [c for c in cells if any(fnmatchcase(c.key, p) for p in args.only.split(","))]
    jobs = args.jobs or (1 if settings.device.startswith("cuda") else 2)
    work = Path(args.work)
    if args.report_only:  # tables from whatever the cache holds; the cells not run are listed in the report
        records = {c.key: r for c in cells if (r := cached(work, c, settings)) is not None}
        runs = json.loads((work / "runs.json").read_text()) if (work / "runs.json").is_file() else []
    else:
        try:
            records, timing = run_grid(cells, settings, work, jobs, args.threads)
        except SppError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        runs = record_timing(work, timing, cells)
    from study_report import write_report  # scripts/study_report.py: tables and plots

    span = grid_span(work, cells, records)
    span["split"] = prepare_data(settings, work).split  # cheap: tokenizing the two texts again
    return write_report(Path(args.out), settings, cells, records, runs, span)


def grid_span(work: Path, cells: list[Cell], records: dict[str, dict]) -> dict:
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
    for manifest in (work / "pruned").glob(f"*/{MANIFEST_FILE}"):
        if any(manifest.parent.name == c.prune_key for c in cells):
            starts.append(manifest.stat().st_mtime - json.loads(manifest.read_text())["wall_time_s"])
    intervals = [(end - records[c.key]["wall_s"], end) for c in cells if c.key in records
                 for end in [cell_path(work, c).stat().st_mtime]]
    concurrent = max((sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals), default=0)
    return {"span_minutes": (max(ends) - min(starts)) / 60 if ends else 0.0,
            "cell_minutes": sum(r["wall_s"] for r in records.values()) / 60, "max_concurrent": concurrent,
            "missing": [c.key for c in cells if c.key not in records]}


if __name__ == "__main__":
    main()
