"""`spp prune`: check inputs, calibrate, prune block by block, and write a checkpoint with its mask file.

`run_prune(cfg)` reads top to bottom: input checks (before loading any weights), the
calibration windows, the model on the CPU, `sequential.capture_block_inputs` and
`sequential.prune_blocks` with the method picked from `METHODS`, then one atomic output
directory holding the `save_pretrained` files, `masks.safetensors`, the resolved config and
the manifest. Every finished block is persisted in `OUTPUT.partial/` (`spp.io.progress`),
so `--resume` continues a killed or interrupted run at its first unfinished block, with
the same result bit for bit (it refuses other run conditions, `spp.io.conditions`). The math lives in `masks`, `wanda` and `sparsegpt`; this
module only wires it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from spp.config import PruneConfig, to_dict, write_yaml
from spp.errors import SppError, SppInterrupted
from spp.faults import fault_point
from spp.prune.masks import apply_mask, parse_pattern, select_mask, sparsity_stats
from spp.prune.sparsegpt import accumulate_hessian, hessian_from_sum, sparsegpt_prune
from spp.prune.wanda import accumulate_sq_norms, magnitude_scores, wanda_scores


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """How one method prunes a layer: statistics from its inputs (None: no calibration) and the pruning."""

    accumulate: Callable[[Any, torch.Tensor], Any] | None
    prune: Callable[[torch.Tensor, Any, PruneConfig], tuple[torch.Tensor, torch.Tensor, dict]]


def _accumulate_hessian(state, X):
    H, n_tokens = state if state is not None else (None, 0)
    H, n_batch = accumulate_hessian(H, X)
    return H, n_tokens + n_batch


def _prune_magnitude(W, state, cfg):
    keep = select_mask(magnitude_scores(W), parse_pattern(cfg.pattern), cfg.sparsity, per_row=False)
    return apply_mask(W, keep), keep, {}


def _prune_wanda(W, sq_norm, cfg):
    keep = select_mask(wanda_scores(W, sq_norm), parse_pattern(cfg.pattern), cfg.sparsity, per_row=True)
    return apply_mask(W, keep), keep, {}


def _prune_sparsegpt(W, state, cfg):
    H_sum, n_tokens = state
    W_new, keep, damp = sparsegpt_prune(
        W, hessian_from_sum(H_sum, n_tokens), parse_pattern(cfg.pattern), cfg.sparsity, cfg.blocksize, cfg.percdamp
    )
    return W_new, keep, ({"percdamp_used": damp} if damp != cfg.percdamp else {})


METHODS: dict[str, Method] = {
    "magnitude": Method(accumulate=None, prune=_prune_magnitude),
    "wanda": Method(accumulate=accumulate_sq_norms, prune=_prune_wanda),
    "sparsegpt": Method(accumulate=_accumulate_hessian, prune=_prune_sparsegpt),
}


# --------------------------------------------------------------------------- report


@dataclass
class PruneReport:
    """What `run_prune` did: sparsity per block (name, numel, pruned) and in total."""

    output: Path
    method: str
    pattern: str
    requested_sparsity: float
    blocks: list[tuple[str, int, int]]
    total_sparsity: float
    kept_zero: int
    wall_time_s: float
    dampening_retries: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the pruned model, still in memory


# --------------------------------------------------------------------------- input checks


@dataclass
class _Checked:
    seqlen: int
    device: torch.device
    tokenizer: Any
    windows: torch.Tensor | None
    blocks_done: int = 0  # finished blocks of the interrupted run that --resume continues
    conditions: dict = field(default_factory=dict)  # spp.io.conditions.run_conditions of this run
    checkpoint: Any = None  # the input model, resolved once (spp.io.reader.Checkpoint)


def _check_layer_shapes(model: nn.Module, cfg: PruneConfig) -> None:
    from spp.models import find_decoder_blocks, find_linear_layers, weight_out_in

    n_m = parse_pattern(cfg.pattern)
    blocks_name, blocks = find_decoder_blocks(model)
    for index, block in enumerate(blocks):
        for name, layer in find_linear_layers(block).items():
            out_features, in_features = weight_out_in(layer).shape
            if n_m is not None and in_features % n_m[1]:
                raise SppError(
                    f"--pattern {cfg.pattern}: module {blocks_name}.{index}.{name} has weight (out, in) = "
                    f"({out_features}, {in_features}); its input dimension {in_features} is not divisible by M={n_m[1]}"
                )
    if n_m is not None and cfg.method == "sparsegpt" and cfg.blocksize % n_m[1]:
        raise SppError(f"--blocksize {cfg.blocksize} must be a multiple of M={n_m[1]} for --pattern {cfg.pattern}")


def _check_inputs(cfg: PruneConfig) -> _Checked:
    """Every check that can fail on the user's input, before any weights are loaded."""
    from spp.data import calibration_windows, check_calib_source
    from spp.io.checkpoint import check_output_dir
    from spp.io.reader import read_checkpoint
    from spp.models import check_seqlen, context_length, load_tokenizer, resolve_device, resolve_dtype

    if cfg.method not in METHODS:
        raise SppError(f"--method {cfg.method!r} is not one of {', '.join(sorted(METHODS))}")
    parse_pattern(cfg.pattern)
    if METHODS[cfg.method].accumulate is not None:
        check_calib_source(cfg.calib)  # offline, a hub set fails here in a second, before any model is read
    check_output_dir(Path(cfg.output), cfg.overwrite)
    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype)
    checkpoint = read_checkpoint(cfg.model)  # names as transformers resolves them, shapes, shards, manifest, masks
    model_config = checkpoint.config
    context = context_length(model_config)
    check_seqlen(cfg.seqlen, context)
    seqlen = cfg.seqlen or min(2048, context or 2048)
    _check_layer_shapes(checkpoint.model, cfg)
    tokenizer = load_tokenizer(str(checkpoint.directory))
    windows = None
    if METHODS[cfg.method].accumulate is not None:
        windows = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    blocks_done = 0
    conditions = prune_conditions(cfg, device, model_config)
    if cfg.resume:
        from spp.io.checkpoint import partial_path
        from spp.io.progress import check_resumable

        blocks_done = check_resumable(partial_path(Path(cfg.output)), resume_settings(cfg, windows), conditions)
    return _Checked(seqlen=seqlen, device=device, tokenizer=tokenizer, windows=windows, blocks_done=blocks_done,
                    conditions=conditions, checkpoint=checkpoint)


def prune_conditions(cfg: PruneConfig, device: torch.device, model_config) -> dict:
    """The run conditions of this prune (`spp.io.conditions`); dtype `auto` is the checkpoint's own."""
    from spp.io.conditions import run_conditions

    dtype = cfg.dtype if cfg.dtype != "auto" else (getattr(model_config, "dtype", None) or "auto")
    return run_conditions(device, dtype, world_size=1)


def resume_settings(cfg: PruneConfig, windows: torch.Tensor | None) -> dict:
    """What must not change between a run and its --resume: every setting but overwrite/resume, and the
    sha256 of the calibration token ids (so a changed calibration file is caught too)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "resume")}
    ids = b"" if windows is None else windows.to(torch.int64).contiguous().numpy().tobytes()
    return {**settings, "calibration_ids_sha256": hashlib.sha256(ids).hexdigest()}


# --------------------------------------------------------------------------- the stage


def run_prune(cfg: PruneConfig, on_module: Callable[[int, int, str], None] | None = None) -> PruneReport:
    """Prune `cfg.model` with `cfg.method` at `cfg.pattern` and write the checkpoint to `cfg.output`.

    Args:
        cfg: the resolved settings.
        on_module: progress callback (block index, number of blocks, module name) before each layer.

    Returns:
        The report: sparsity per block and in total, kept zeros, wall time, dampening retries.

    Raises:
        SppError: any bad input (checked before the weights are loaded), or a singular Hessian.
    """
    from spp.io.checkpoint import partial_path
    from spp.io.progress import progress_dir, start_progress
    from spp.models import find_decoder_blocks, load_model

    start = time.perf_counter()
    checked = _check_inputs(cfg)
    model = load_model(str(checked.checkpoint.directory), cfg.dtype, "cpu")
    try:
        with _workdir(cfg) as tmp:
            if not checked.blocks_done:
                start_progress(tmp, resume_settings(cfg, checked.windows), len(find_decoder_blocks(model)[1]),
                               checked.conditions)
            pruned = prune_model(model, checked.windows, cfg, checked.device, on_module,
                                 partial=tmp, blocks_done=checked.blocks_done)
            shutil.rmtree(progress_dir(tmp))
            return _write_output(cfg, checked, model, pruned, start, tmp)
    except KeyboardInterrupt:
        raise SppInterrupted(f"interrupted; the finished blocks are kept in {partial_path(Path(cfg.output))}: "
                             "run the same command with --resume to continue") from None


@contextlib.contextmanager
def _workdir(cfg: PruneConfig):
    """`OUTPUT.partial/`: a stale one is removed unless resuming; it is kept after an interrupt or a
    kill (for --resume) and removed after any other error (nothing half-written stays)."""
    from spp.io.checkpoint import atomic_dir, partial_path

    partial = partial_path(Path(cfg.output))
    if partial.exists() and not cfg.resume:
        shutil.rmtree(partial)
    with atomic_dir(Path(cfg.output), overwrite=cfg.overwrite, resume=True) as tmp:
        try:
            yield tmp
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@dataclass
class PrunedModel:
    """What `prune_model` changed: keep-masks (out, in) by parameter name, layouts, counts, dampening retries."""

    masks: dict[str, torch.Tensor]
    layouts: dict[str, str]
    module_stats: dict[str, dict]
    retries: list[dict]


def prune_model(
    model: nn.Module,
    windows: torch.Tensor | None,
    cfg: PruneConfig,
    device: torch.device,
    on_module: Callable[[int, int, str], None] | None = None,
    partial: Path | None = None,
    blocks_done: int = 0,
) -> PrunedModel:
    """Prune `model` in place, block by block: the in-memory half of `run_prune`.

    Args:
        model: a causal LM on the CPU.
        windows: (nsamples, seqlen) calibration ids, or None for magnitude.
        cfg: method, pattern, sparsity, SparseGPT settings, batch size, offloading.
        device: where each block is pruned.
        on_module: progress callback (block index, number of blocks, module name).
        partial: where to persist each finished block (`spp.io.progress`), or None to keep nothing.
        blocks_done: blocks an interrupted run already finished in `partial` (restored, not redone).
    """
    from spp.io.progress import BlockRecord, restore_blocks, save_block
    from spp.models import find_decoder_blocks, layer_layout, weight_out_in
    from spp.prune.sequential import capture_block_inputs, prune_blocks

    method = METHODS[cfg.method]
    blocks_name, blocks = find_decoder_blocks(model)
    storage = torch.device("cpu") if cfg.offload_activations else device
    inputs = None
    if windows is not None and method.accumulate is not None:
        inputs = capture_block_inputs(model, blocks, windows, cfg.batch_size, storage)
    result = PrunedModel(masks={}, layouts={}, module_stats={}, retries=[])
    restored_masks = []
    if partial is not None and blocks_done:
        restored = restore_blocks(partial, blocks, blocks_done, inputs is not None, storage)
        if restored.hidden is not None:
            inputs.hidden = restored.hidden
        for record in restored.records:
            result.layouts.update(record.layouts)
            result.module_stats.update(record.module_stats)
            result.retries.extend(record.retries)
        restored_masks = restored.masks

    def block_done(index: int, block: nn.Module, block_masks: dict, block_inputs) -> None:
        prefix = f"{blocks_name}.{index}."
        record = BlockRecord(layouts={k: v for k, v in result.layouts.items() if k.startswith(prefix)},
                             module_stats={k: v for k, v in result.module_stats.items() if k.startswith(prefix)},
                             retries=[r for r in result.retries if r["module"].startswith(prefix)])
        last = index + 1 == len(blocks)
        save_block(partial, index, block, block_masks, None if block_inputs is None or last else block_inputs.hidden,
                   record)
        fault_point("prune_block", index)

    def prune_layer(index: int, name: str, layer: nn.Module, state) -> torch.Tensor:
        full = f"{blocks_name}.{index}.{name}"
        if method.accumulate is not None and state is None:
            raise SppError(f"module {full} received no calibration input; spp cannot prune it with {cfg.method}")
        W = weight_out_in(layer)  # (out, in) view of the stored weight
        try:
            W_new, keep, info = method.prune(W, state, cfg)
        except SppError as exc:
            raise SppError(f"module {full}: {exc}") from exc
        with torch.no_grad():
            W.copy_(W_new)
        if info:
            result.retries.append({"module": full, "percdamp_requested": cfg.percdamp, **info})
        result.layouts[f"{full}.weight"] = layer_layout(layer)
        result.module_stats[f"{full}.weight"] = sparsity_stats(W.detach().cpu(), keep.cpu())
        return keep

    masks = prune_blocks(
        blocks, inputs, method.accumulate, prune_layer, device,
        on_module=(lambda i, name: on_module(i, len(blocks), f"{blocks_name}.{i}.{name}")) if on_module else None,
        on_block_done=block_done if partial is not None else None, start=len(restored_masks),
    )
    masks[: len(restored_masks)] = restored_masks
    for i, block_masks in enumerate(masks):
        for name, keep in block_masks.items():
            result.masks[f"{blocks_name}.{i}.{name}.weight"] = keep
    return result


def _write_output(cfg, checked, model, pruned: PrunedModel, start, tmp: Path) -> PruneReport:
    """Save the pruned model, masks (keyed by saved tensor name, in stored shape), config and manifest into
    `tmp` (the partial directory, renamed by the caller)."""
    from spp.io.checkpoint import RESOLVED_CONFIG_FILE, MASK_FILE, save_model
    from spp.io.reader import read_checkpoint
    from spp.io.manifest import Manifest, peak_memory_bytes, write_manifest
    from spp.io.maskfile import save_masks

    keep_by_param, layouts, module_stats, retries = pruned.masks, pruned.layouts, pruned.module_stats, pruned.retries
    blocks = _block_table(module_stats)
    total = sum(s["numel"] for s in module_stats.values())
    n_pruned = sum(s["pruned"] for s in module_stats.values())
    kept_zero = sum(s["kept_zero"] for s in module_stats.values())
    save_model(model, checked.tokenizer, tmp, cfg.max_shard_size)
    written = read_checkpoint(tmp)  # the mask file and manifest name tensors as they were just saved
    saved = {param: written.saved_name(param) for param in keep_by_param}
    stored = {}
    for param, keep in keep_by_param.items():
        stored[saved[param]] = keep.t() if layouts[param] == "conv1d" else keep  # mask in the stored shape
    save_masks(tmp / MASK_FILE, stored, {saved[p]: layouts[p] for p in keep_by_param})
    write_yaml(tmp / RESOLVED_CONFIG_FILE, cfg)
    details = {
        "method": cfg.method,
        "pattern": cfg.pattern,
        "requested_sparsity": cfg.sparsity,
        "achieved_sparsity": n_pruned / total if total else 0.0,
        "kept_zero": kept_zero,
        "modules": {
            saved[p]: {"requested": cfg.sparsity, "achieved": s["sparsity"], "numel": s["numel"],
                       "pruned": s["pruned"], "kept_zero": s["kept_zero"], "layout": layouts[p]}
            for p, s in module_stats.items()
        },
        "calibration": None if checked.windows is None else {
            "source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": checked.seqlen, "seed": cfg.seed,
        },
        "dampening_retries": retries,
        "source": checked.checkpoint.source,  # a GGUF file's record: the weights pruned were dequantized from it
    }
    wall = time.perf_counter() - start
    write_manifest(tmp, Manifest(stage="prune", settings=to_dict(cfg), inputs=_input_hashes(cfg, checked.checkpoint),
                                 conditions=checked.conditions,
                                 details=details, wall_time_s=wall, peak_memory=peak_memory_bytes()))
    return PruneReport(output=Path(cfg.output), method=cfg.method, pattern=cfg.pattern,
                       requested_sparsity=cfg.sparsity, blocks=blocks, total_sparsity=n_pruned / total if total else 0.0,
                       kept_zero=kept_zero, wall_time_s=time.perf_counter() - start, dampening_retries=retries,
                       model=model)


def block_name(tensor_name: str) -> str:
    """The decoder block a tensor belongs to: its name up to the first numeric component (`model.layers.3`)."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return tensor_name


def _block_table(module_stats: dict[str, dict]) -> list[tuple[str, int, int]]:
    table: dict[str, list[int]] = {}
    for name, s in module_stats.items():
        row = table.setdefault(block_name(name), [0, 0])
        row[0] += s["numel"]
        row[1] += s["pruned"]
    return [(name, numel, pruned) for name, (numel, pruned) in table.items()]


def _input_hashes(cfg: PruneConfig, checkpoint) -> dict[str, str]:
    """sha256 of the local model directory's files (of the file, for a GGUF file) and of a local calibration file
    (hub ids are recorded as such)."""
    from spp.io.checkpoint import sha256_file

    out = {}
    model_dir = Path(cfg.model)
    if checkpoint.source:
        out[checkpoint.source["file"]] = checkpoint.source["sha256"]
    elif model_dir.is_dir():
        for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
            out[str(path)] = sha256_file(path)
    else:
        out[cfg.model] = "hub"
    if cfg.method != "magnitude" and Path(cfg.calib).is_file():
        out[str(cfg.calib)] = sha256_file(Path(cfg.calib))
    return out
