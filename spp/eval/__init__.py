"""`spp eval`: perplexity (Wanda/SparseGPT protocol) and lm-eval zero-shot accuracy of one model.

`run_eval(cfg)` checks every input before loading the model (context length, data
files, task names and task files, the adapter's base), then loads the model (and an
unmerged SPP adapter on top when asked), measures, and writes `results.json` and the
manifest atomically. `compare_results(paths)` lines several results up side by side.
The math is in `spp.eval.perplexity`; lm-eval plumbing in `spp.eval.zeroshot`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spp import __version__
from spp.config import EvalConfig, to_dict
from spp.errors import SppError
from spp.eval.perplexity import check_ppl_source, ppl_text, set_ids
from spp.eval.zeroshot import check_hub_tasks, evaluate_tasks, prepare_tasks
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, RESULTS_FILE, atomic_dir, check_not_an_input, check_output_dir, read_json, write_json
from spp.io.conditions import run_conditions
from spp.io.finite import check_finite_model
from spp.io.manifest import Manifest, library_versions, peak_memory_bytes, write_manifest
from spp.io.reader import read_checkpoint
from spp.io.text import markdown_table
from spp.models import check_seqlen, context_length, load_model, load_tokenizer, resolve_device, resolve_dtype
from spp.patterns import decoder_weights
from spp.sparsity import fraction, mask_stats, tally

MAX_DEFAULT_SEQLEN = 4096
HEADLINE_ROW = "tasks above baseline by 2 stderr"
HEADLINE_MEAN_ROW = "mean acc over those tasks"
PROTOCOL = "wanda-sparsegpt: non-overlapping windows, partial tail dropped, exp(summed NLL / predicted tokens)"


@dataclass
class EvalReport:
    """What `run_eval` measured; `results` is exactly what `results.json` holds."""

    results: dict
    output: Path | None = None
    rows: list[tuple[str, str]] = field(default_factory=list)  # (metric, value) for the terminal table


def resolve_seqlen(requested: int | None, context: int | None) -> int:
    """The perplexity window: `requested`, or the model's context capped at 4096.

    Raises:
        SppError: `requested` exceeds the context, or neither is known.
    """
    if requested is not None:
        check_seqlen(requested, context)
        return requested
    if context is None:
        raise SppError("the model's config does not state its context length; pass --seqlen")
    return min(context, MAX_DEFAULT_SEQLEN)


def mask_sparsity(checkpoint) -> dict | None:
    """Sparsity recorded by the mask file of an `spp prune`/`merge` output, or None without one.

    `sparsity` is over every weight prune could have pruned (the decoder blocks' linear layers and expert
    weights): layers left dense (--ignore, --targets) count as kept, so pruning attention alone at 2:4 is not
    reported as 50%. `masked_sparsity` is over the masked weights only.
    """
    if checkpoint.mask_sha256 is None:
        return None
    masks, _ = checkpoint.read_masks()
    counts = tally(mask_stats(m) for m in masks.values())
    masked, pruned = counts["numel"], counts["pruned"]
    dense = [name for name in decoder_weights(checkpoint) if name not in masks]
    total = masked + sum(math.prod(checkpoint.tensors[name].shape) for name in dense)
    return {"sparsity": fraction(pruned, total), "masked_sparsity": counts["sparsity"],
            "masked_weights": masked, "decoder_weights": total, "tensors": len(masks), "dense_tensors": len(dense),
            "mask_sha256": checkpoint.mask_sha256}


def _check_adapter(cfg: EvalConfig, checkpoint):
    """Read the adapter's config and refuse it unless it was trained on this base (mask hash)."""
    from spp.adapter.model import read_adapter_config

    adapter_cfg = read_adapter_config(Path(cfg.adapter))
    if not Path(cfg.model).is_dir():
        raise SppError(f"--adapter needs --model to be the local pruned directory it was trained on, not {cfg.model}")
    checkpoint.check_adapter_base(adapter_cfg.mask_sha256 or None, Path(cfg.adapter) / ADAPTER_WEIGHTS_FILE,
                                  adapter_cfg.describe(cfg.adapter))
    return adapter_cfg


def _prepare_ppl(cfg: EvalConfig, tokenizer, seqlen: int) -> list[tuple[str, object, object]]:
    """(key, PplText, ids) for every --ppl entry, each checked to hold at least one window."""
    out, seen = [], set()
    for spec in cfg.ppl:
        text = ppl_text(spec)
        ids = set_ids(tokenizer, text, seqlen)
        if ids.numel() < seqlen:
            raise SppError(f"--ppl {spec}: the text has {ids.numel()} tokens, fewer than one window of "
                           f"--seqlen {seqlen}")
        key = text.name if text.name not in seen else spec
        seen.add(key)
        out.append((key, text, ids))
    return out


def _load(cfg: EvalConfig, checkpoint, device):
    """The model on `device`, its adapter loaded when asked.

    Raises:
        SppError: a weight or an adapter tensor is NaN or ±inf (`spp.io.finite`), or the adapter does not fit.
    """
    model = load_model(str(checkpoint.directory), cfg.dtype, device)
    check_finite_model(model, f"model {checkpoint.directory}")  # its perplexity would be `nan`, and mean nothing
    if cfg.adapter:
        from spp.adapter.model import load_adapter

        load_adapter(model, Path(cfg.adapter), checkpoint.masks_by_parameter())
        model.eval()
    return model


def run_eval(cfg: EvalConfig) -> EvalReport:
    """Evaluate one model: perplexity sets, then zero-shot tasks; write results when `cfg.output` is set.

    Raises:
        SppError: any bad input, detected before the model is loaded where possible; a NaN or ±inf weight; a
            perplexity that is not finite (never reported as a number).
    """
    from spp.eval.perplexity import perplexity  # here, not at the top, where it would hide the submodule's name

    start = time.time()
    check_hub_sources(cfg)  # offline, a hub set or task fails here in a second, before any model is read
    if cfg.output:
        ppl = [("--ppl", path) for spec in cfg.ppl for path in (spec, spec.partition(":")[2])]  # PATH or NAME:PATH
        check_not_an_input(Path(cfg.output), [("--model", cfg.model), ("--adapter", cfg.adapter), *ppl,
                                              ("--task-data", cfg.task_data)])
    checkpoint = read_checkpoint(cfg.model)  # names as transformers resolves them, shapes, shards, manifest, masks
    seqlen = resolve_seqlen(cfg.seqlen, context_length(checkpoint.config))
    device, _ = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.output:
        check_output_dir(Path(cfg.output), cfg.overwrite)
    adapter_cfg = _check_adapter(cfg, checkpoint) if cfg.adapter else None
    kernel_masks = None
    if cfg.sparse_kernels:
        from spp.eval.sparse_kernels import apply_sparse_kernels, check_sparse_kernels

        kernel_masks = check_sparse_kernels(checkpoint, cfg.dtype, cfg.adapter, device)
    tokenizer = load_tokenizer(str(checkpoint.directory))
    ppl_inputs = _prepare_ppl(cfg, tokenizer, seqlen)
    with tempfile.TemporaryDirectory(prefix="spp-tasks-") as workdir:
        setup = prepare_tasks(cfg.tasks, cfg.task_data, Path(workdir)) if cfg.tasks else None
        model = _load(cfg, checkpoint, device)
        sparse_kernels = None
        if kernel_masks is not None:  # dense speed, conversion, logits check, sparse speed; then evaluate sparse
            sparse_kernels = apply_sparse_kernels(model, kernel_masks, model.config.get_text_config().vocab_size)
        ppl_results = {}
        for key, text, ids in ppl_inputs:
            res = perplexity(model, ids, seqlen, cfg.batch_size or 1, cfg.max_windows)
            _check_finite_ppl(key, res, model)
            ppl_results[key] = {
                "ppl": res.ppl, "seqlen": res.seqlen, "windows": res.windows, "max_windows": cfg.max_windows,
                "predicted_tokens": res.predicted_tokens, "total_tokens": res.total_tokens, "nll_sum": res.nll_sum,
                "source": text.source, "text_sha256": text.text_sha256, "file_sha256": text.file_sha256,
                "truncated_to_windows": text.max_tokens_per_seqlen, "protocol": PROTOCOL,
                # the set named (wikitext2/c4/ptb) and whether the text is that set's text (see PROTOCOL_SHA256)
                "set": text.protocol, "label": text.name, "protocol_verified": text.verified, "text_note": text.note,
            }
        zeroshot = None
        if setup is not None:
            zeroshot = evaluate_tasks(model, tokenizer, setup, cfg.limit, cfg.batch_size, cfg.num_fewshot)
            zeroshot.update(limit=cfg.limit, num_fewshot=cfg.num_fewshot, task_data=cfg.task_data)
    results = {
        "model": cfg.model,
        "source": checkpoint.source,  # a GGUF file's record (sha256, tensor types) when the weights were dequantized
        "adapter": cfg.adapter,
        "adapter_mask_sha256": adapter_cfg.mask_sha256 if adapter_cfg else None,
        "sparsity": mask_sparsity(checkpoint),
        "seqlen": seqlen,
        "perplexity": ppl_results,
        "zeroshot": zeroshot,
        "sparse_kernels": sparse_kernels,
        "lm_eval_version": library_versions().get("lm_eval"),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "run_conditions": run_conditions(device, next(model.parameters()).dtype),  # what changes the numbers
        "spp_version": __version__,
        "wall_time_s": round(time.time() - start, 3),
    }
    output = _write(cfg, results, start) if cfg.output else None
    return EvalReport(results=results, output=output, rows=results_rows(results))


def _check_finite_ppl(key: str, res, model) -> None:
    """A NaN or infinite perplexity is a failure, not a result: nothing is written and eval exits non-zero.

    Raises:
        SppError: `res.ppl` is not finite (names the set, the summed NLL and the dtype the model ran in).
    """
    if math.isfinite(res.ppl):
        return
    dtype = next(model.parameters()).dtype
    # the weights were checked finite on loading, so what overflowed is an activation or a logit
    hint = " (try --dtype float32)" if dtype != torch.float32 else ""
    raise SppError(f"--ppl {key}: the perplexity is not finite ({res.ppl}; summed NLL {res.nll_sum} over "
                   f"{res.predicted_tokens} predicted tokens): the weights are finite, so the model's activations or "
                   f"logits overflow {str(dtype).removeprefix('torch.')}{hint}")


def check_hub_sources(cfg: EvalConfig) -> None:
    """Each `--ppl` hub set, and `--tasks` without task data, needs the hub: offline they fail at once."""
    for spec in cfg.ppl:
        check_ppl_source(spec)
    if cfg.tasks and cfg.task_data is None:
        check_hub_tasks(cfg.tasks)


def _write(cfg: EvalConfig, results: dict, start: float) -> Path:
    inputs = {}
    if results["source"]:
        inputs[results["source"]["file"]] = results["source"]["sha256"]
    for entry in (results["perplexity"] or {}).values():
        if entry["file_sha256"]:
            inputs[entry["source"]] = entry["file_sha256"]
    for task in ((results["zeroshot"] or {}).get("tasks") or {}).values():
        inputs.update(task.get("files", {}))
    output = Path(cfg.output)
    with atomic_dir(output, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / RESULTS_FILE, results)
        write_manifest(tmp, Manifest(
            stage="eval", settings=to_dict(cfg), inputs=inputs,
            mask_sha256=(results["sparsity"] or {}).get("mask_sha256"), conditions=results["run_conditions"],
            details={"seqlen": results["seqlen"], "summary": dict(results_rows(results))},
            wall_time_s=round(time.time() - start, 3), peak_memory=peak_memory_bytes(),
        ))
    return output


# --------------------------------------------------------------------------- tables


def results_rows(results: dict) -> list[tuple[str, str]]:
    """(metric, formatted value) rows of one results dict, in a stable order."""
    rows = []
    sparsity = results.get("sparsity")
    if sparsity:
        rows.append(("sparsity", f"{sparsity['sparsity']:.4f}"))
        if sparsity.get("dense_tensors"):  # some layers were left dense: also the sparsity of those pruned
            rows.append((f"sparsity of the masked weights ({sparsity['dense_tensors']} tensors dense)",
                         f"{sparsity['masked_sparsity']:.4f}"))
    for name, entry in (results.get("perplexity") or {}).items():
        rows.append((f"ppl {name} @{entry['seqlen']}", f"{entry['ppl']:.4f}"))
    zeroshot = results.get("zeroshot") or {}
    for name, task in (zeroshot.get("tasks") or {}).items():
        label = name + (" (approx.)" if task.get("approximate") else "")
        for metric in ("acc", "acc_norm"):
            if metric in task:
                err = task.get(f"{metric}_stderr")
                rows.append((f"{label} {metric}", f"{task[metric]:.4f}" + (f" ± {err:.4f}" if err is not None else "")))
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            if metric in task:
                rows.append((f"{label} {metric} (lm-eval; not token ppl)", f"{task[metric]:.4f}"))
    if zeroshot.get("mean_acc") is not None:
        rows.append(("mean acc", f"{zeroshot['mean_acc']:.4f}"))
    if zeroshot.get("headline_tasks") is not None:
        rows.append((HEADLINE_ROW, ", ".join(zeroshot["headline_tasks"]) or "none"))
        if zeroshot["headline_mean_acc"] is not None:
            rows.append((HEADLINE_MEAN_ROW, f"{zeroshot['headline_mean_acc']:.4f}"))
    kernels = results.get("sparse_kernels")
    if kernels:
        for phase in ("prefill", "decode"):
            rows.append((f"2:4 kernels {phase} speed-up", f"{kernels[f'{phase}_speedup']:.3f}x"))
    return rows


def compare_results(paths: list[str]) -> str:
    """Line up several `spp eval` outputs (directories or results JSON files) side by side.

    Returns:
        A GitHub/Markdown pipe table, ready to paste into a paper draft or an issue: rows = metrics, columns =
        runs; a missing metric is "—". With two runs or more, a second table gives each later run's paired
        difference from the first on the same items (`paired_rows`).

    Raises:
        SppError: fewer than one path, or a path that holds no results.
    """
    if not paths:
        raise SppError("--compare needs at least one results directory or JSON file")
    columns, per_run, runs = [], [], []
    for p in paths:
        path = Path(p)
        file = path / RESULTS_FILE if path.is_dir() else path
        if not file.exists():
            raise SppError(f"--compare {path}: no {RESULTS_FILE} there (is it an `spp eval --output` directory?)")
        results = read_json(file, what="results")
        label = path.name if path.is_dir() else (path.parent.name if path.name == "results.json" else path.stem)
        columns.append(label if label not in columns else str(path))
        per_run.append(dict(results_rows(results)))
        runs.append(results)
    metrics: list[str] = []
    for run in per_run:
        metrics += [m for m in run if m not in metrics]
    rows = [[m, *(run.get(m, "—") for run in per_run)] for m in metrics]
    table = markdown_table(["metric", *columns], rows, "-" + "r" * len(columns), pad=True)
    paired = paired_rows(runs)
    if not paired:
        return table
    note = (f"\nPaired difference from {columns[0]} on the same items, with its 95% interval (Miller 2024; "
            f"`spp.eval.uncertainty`); \"noise\" when the interval holds 0. The mean is over the tasks where "
            f"{columns[0]} is above its baseline by 2 stderr.\n\n")
    return table + note + markdown_table(["task", *columns[1:]], paired, "-" + "r" * (len(columns) - 1), pad=True)


def paired_rows(runs: list[dict], headline_of: dict | None = None) -> list[list[str]]:
    """One row per accuracy task of the first run, then the headline mean: each later run's paired difference
    from the first, "+0.012 [−0.020, +0.044] noise"; "—" where a run lacks that task's items (or has others).
    The mean runs over the tasks where `headline_of` (default: the first run) is above its baseline by 2 stderr."""
    from spp.eval.uncertainty import headline_tasks, mean_difference, paired_difference

    reference = ((runs[0].get("zeroshot") or {}).get("tasks") or {}) if runs else {}
    names = [name for name, task in reference.items() if task.get("item_acc")]
    if len(runs) < 2 or not names:
        return []
    chooser = reference if headline_of is None else (headline_of.get("zeroshot") or {}).get("tasks") or {}
    headline = [name for name in headline_tasks(chooser) if name in names]
    rows, per_run = [], []
    for run in runs[1:]:
        tasks = (run.get("zeroshot") or {}).get("tasks") or {}
        diffs = {}
        for name in names:
            ours, theirs = reference[name], tasks.get(name, {})
            same_data = sorted((theirs.get("files") or {}).values()) == sorted((ours.get("files") or {}).values())
            if len(theirs.get("item_acc") or []) == len(ours["item_acc"]) > 1 and same_data:  # same items, by hash
                diffs[name] = paired_difference(ours["item_acc"], theirs["item_acc"])
        per_run.append(diffs)
    for name in names:
        rows.append([f"{name} acc", *(_interval(diffs.get(name)) for diffs in per_run)])
    label = f"mean acc over {', '.join(headline)}" if headline else "mean acc (no task above baseline)"
    rows.append([label, *(_interval(mean_difference([d[n] for n in headline]))
                          if headline and all(n in d for n in headline) else "—" for d in per_run)])
    return rows


def _interval(diff) -> str:
    if diff is None:
        return "—"
    return f"{diff.diff:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]" + (" noise" if diff.within_noise else "")
