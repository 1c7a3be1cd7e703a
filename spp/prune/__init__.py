"""`spp prune`: check inputs, calibrate, prune block by block, and write a checkpoint with its mask file.

`run_prune(cfg)` reads top to bottom: input checks (before loading any weights), the
calibration windows, the model as a skeleton on the meta device (`spp.io.stream`), then `prune_model`: a plain
loop over `sequential.walk_blocks` (each block read from the checkpoint, on the device with its statistics and
routed tokens, released once kept) that prunes each block's layers with the method picked from `METHODS`, then
one atomic output directory holding the `save_pretrained` files (written from the kept blocks, byte for byte
what `save_pretrained` writes), `spp/masks.safetensors`, the resolved config and the manifest. Every finished
block is persisted in `OUTPUT.partial/` (`spp.io.progress`), so `--resume` continues a killed or interrupted run
at its first unfinished block, with the same result bit for bit (it refuses other run conditions,
`spp.io.conditions`). Which layers are
pruned, and at what sparsity, is `plan.plan_layers` (--targets, --ignore, sparsity_overrides; a
mixture-of-experts block's fused expert weights among them, pruned per saved tensor by `experts`); with
--owl a statistics pass over the dense model (`owl_block_sparsities`) sets each block's sparsity
first, kept in the progress so --resume does not redo it. The math lives in `masks`, `wanda`, `ria`,
`owl` and `sparsegpt`, the writing of the output in `output`; this module only wires it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from spp.config import PruneConfig, to_dict
from spp.errors import SppError, SppInterrupted
from spp.faults import fault_point
from spp.prune.alps import alps_prune, default_iters
from spp.prune.dsnot import accumulate_input_sums, dsnot_refine
from spp.prune.experts import check_expert_weights, prune_expert_weights, saved_pieces
from spp.prune.masks import apply_mask, select_mask
from spp.prune.output import PruneReport, input_hashes, write_output
from spp.prune.owl import outlier_share, owl_sparsities
from spp.prune.permute import permute_block
from spp.prune.plan import LayerPlan, plan_layers
from spp.prune.reconstruction import reconstruction_error, relative_errors, resolve_on_support, row_errors
from spp.prune.ria import ria_scores
from spp.prune.sparsegpt import accumulate_hessian, dampening_retry, hessian_from_sum, sparsegpt_prune
from spp.prune.wanda import accumulate_sq_norms, magnitude_scores, wanda_scores
from spp.sparsity import sparsity_stats
from spp.typed import field_defaults


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """How one method prunes a layer: statistics from its inputs (None: no calibration) and the pruning
    (W (out, in), statistics, config, this layer's sparsity) -> (new W, keep-mask, record). The record's
    `percdamp_used` (only when the Cholesky or eigendecomposition needed more dampening) is a dampening retry; its
    other keys go into the layer's manifest entry. `refits`: the method updates the kept weights from H =
    `_accumulate_hessian`'s state, so its reconstruction error is free and a DSnoT mask is refit
    (`_refine_dsnot`)."""

    accumulate: Callable[[Any, torch.Tensor], Any] | None
    prune: Callable[[torch.Tensor, Any, PruneConfig, float], tuple[torch.Tensor, torch.Tensor, dict]]
    refits: bool = False

    def prune_in_place(self, W: torch.Tensor, state, cfg: PruneConfig, sparsity: float,
                       name: str) -> tuple[torch.Tensor, dict]:
        """Prune the weight view W (out, in) in place; (keep-mask (out, in), record). A failure names `name`."""
        try:
            W_new, keep, info = self.prune(W, state, cfg, sparsity)
        except SppError as exc:
            raise SppError(f"{name}: {exc}") from exc
        with torch.no_grad():
            W.copy_(W_new)
        return keep, info


def _accumulate_hessian(state, X):
    H, n_tokens = state if state is not None else (None, 0)
    H, n_batch = accumulate_hessian(H, X)
    return H, n_tokens + n_batch


def _prune_magnitude(W, state, cfg, sparsity):
    keep = select_mask(magnitude_scores(W), cfg.n_m, sparsity, per_row=False)
    return apply_mask(W, keep), keep, {}


def _prune_wanda(W, sq_norm, cfg, sparsity):
    keep = select_mask(wanda_scores(W, sq_norm), cfg.n_m, sparsity, per_row=True)
    return apply_mask(W, keep), keep, {}


def _prune_ria(W, sq_norm, cfg, sparsity):
    # unstructured: one threshold over the whole layer, as RIA's reference code (Wanda compares per row)
    keep = select_mask(ria_scores(W, sq_norm), cfg.n_m, sparsity, per_row=False)
    return apply_mask(W, keep), keep, {}


def _prune_sparsegpt(W, state, cfg, sparsity):
    H = hessian_from_sum(*state)
    W_new, keep, damp = sparsegpt_prune(W, H, cfg.n_m, sparsity, cfg.blocksize, cfg.percdamp)
    retry = {"percdamp_used": damp} if damp != cfg.percdamp else {}
    return W_new, keep, {**retry, "reconstruction_error": reconstruction_error(W, W_new, H)}


def _prune_alps(W, state, cfg, sparsity):
    H = hessian_from_sum(*state)
    W_new, keep, info = alps_prune(W, H, cfg.n_m, sparsity, percdamp=cfg.percdamp, rho0=cfg.alps_rho,
                                   max_iter=cfg.alps_iters or default_iters(cfg.n_m), pcg_steps=cfg.alps_pcg_steps)
    damp = info.pop("percdamp_used")
    retry = {"percdamp_used": damp} if damp != cfg.percdamp else {}
    return W_new, keep, {**retry, "reconstruction_error": reconstruction_error(W, W_new, H), "alps": info}


METHODS: dict[str, Method] = {
    "magnitude": Method(accumulate=None, prune=_prune_magnitude),
    "wanda": Method(accumulate=accumulate_sq_norms, prune=_prune_wanda),
    "sparsegpt": Method(accumulate=_accumulate_hessian, prune=_prune_sparsegpt, refits=True),
    "ria": Method(accumulate=accumulate_sq_norms, prune=_prune_ria),
    "alps": Method(accumulate=_accumulate_hessian, prune=_prune_alps, refits=True),
}
REFIT_STEPS = 10  # PCG steps refitting SparseGPT's or ALPS's kept weights on a DSnoT mask (ALPS's own count)


def layer_method(cfg: PruneConfig) -> Method:
    """The method as `prune_model` runs it on every layer: `cfg.method`, then (`cfg.refine`) DSnoT, and the
    reconstruction error where H is held (SparseGPT, ALPS, or any method with `cfg.record_error`).

    Its statistics are those of the method plus, in the same calibration pass, DSnoT's per-channel sums
    (`spp.prune.dsnot.accumulate_input_sums`) and, for `record_error` or DSnoT's guard, the Hessian sum of a
    mask-only method (in² float32 per layer).
    """
    base = METHODS[cfg.method]
    parts = {"base": base.accumulate} if base.accumulate is not None else {}
    if cfg.refine == "dsnot":
        parts["sums"] = accumulate_input_sums
        if base.accumulate is accumulate_sq_norms:  # the sums hold the same Σx²: fold it once (`base_statistics`)
            del parts["base"]
    if (cfg.record_error or cfg.refine == "dsnot" and cfg.dsnot_guard) and not base.refits:
        parts["hessian"] = _accumulate_hessian  # DSnoT's guard is exact with the full H (its diagonal rejects any swap
        # after Wanda: every pruned weight's score is below every kept one's in its row)
    if set(parts) <= {"base"}:
        return base

    def accumulate(state, X):
        state = state or {}
        return {key: fn(state.get(key), X) for key, fn in parts.items()}

    def prune(W, state, cfg, sparsity):
        W_new, keep, record = base.prune(W, base_statistics(state), cfg, sparsity)
        held = state["base"] if base.refits else state.get("hessian")
        H = None if held is None else hessian_from_sum(*held)
        if "sums" not in state:
            if H is not None and not base.refits:
                record["reconstruction_error"] = reconstruction_error(W, W_new, H)
            return W_new, keep, record
        damp = record.get("percdamp_used", cfg.percdamp)
        W_out, keep, refined = _refine_dsnot(W, W_new, keep, state["sums"], H, base.refits, damp, cfg)
        squared = refined.pop("squared_error", None)  # the full-H guard's, for the mask-only weights
        if H is not None:
            if base.refits:
                errors = record["reconstruction_error"], reconstruction_error(W, W_out, H)
            else:
                errors = relative_errors(W, H, squared or [row_errors(W, W_new, H).sum(),
                                                           row_errors(W, W_out, H).sum()])
            refined["reconstruction_error_before"], record["reconstruction_error"] = errors
        record["refine"] = refined
        return W_out, keep, record

    return Method(accumulate=accumulate, prune=prune, refits=base.refits)


def base_statistics(state):
    """The base method's statistics within a layer's state: the state itself, or, in `layer_method`'s composite, its
    "base" entry, or DSnoT's Σx² (`accumulate_input_sums`' second entry), which is Wanda's and RIA's statistics
    bit for bit (the same float32 sums); None for magnitude."""
    if not isinstance(state, dict):
        return state
    return state["base"] if "base" in state else state["sums"][1] if "sums" in state else None


def dsnot_group(cfg: PruneConfig) -> int | None:
    """The width of the column groups inside which DSnoT swaps, so the base method's comparison group keeps its
    count: M for N:M; SparseGPT's column block (it prunes floor(out·b·s) per block of b columns); None (anywhere
    in the row) for Wanda (per row), magnitude, RIA and ALPS (per layer): a swap inside a row keeps both counts."""
    if cfg.n_m is not None:
        return cfg.n_m[1]
    return cfg.blocksize if cfg.method == "sparsegpt" else None


def _refine_dsnot(W, W_new, keep, sums, H, refits: bool, percdamp: float, cfg: PruneConfig):
    """DSnoT on the base method's mask (`spp.prune.dsnot.dsnot_refine`, from the dense W); returns (new W, new
    keep-mask, record).

    A regrown weight of a mask-only method takes its dense value. After SparseGPT or ALPS, whose kept weights were
    fitted to the old mask, the kept weights are refit on the new mask (`resolve_on_support`, H dampened by the
    `percdamp` the method used, from the method's weights with regrown entries at their dense value), and each row
    keeps the better of the method's (weights, mask) and the refit, by its error (w − ŵ)ᵀH(w − ŵ): a row never gets
    worse, and `rows_refit` counts those that took the refit.
    """
    new_keep, record = dsnot_refine(W, keep, *sums, dsnot_group(cfg), threshold=cfg.dsnot_threshold,
                                    guard=cfg.dsnot_guard, H=H)
    if not refits:
        return apply_mask(W, new_keep), new_keep, record
    W32 = W.detach().float()
    H_damped = H.clone()
    H_damped.diagonal().add_(percdamp * torch.diagonal(H).mean())
    W_fit, _ = resolve_on_support(W32, H_damped, new_keep, W0=torch.where(keep, W_new.float(), W32), steps=REFIT_STEPS)
    better = row_errors(W32, W_fit, H) < row_errors(W32, W_new, H)  # (out,)
    keep = torch.where(better[:, None], new_keep, keep)
    W_out = torch.where(better[:, None], W_fit.to(W.dtype), W_new)
    return apply_mask(W_out, keep), keep, {**record, "rows_refit": int(better.sum())}


def needs_calibration(cfg: PruneConfig) -> bool:
    """The method uses layer inputs, or OWL, DSnoT or the recorded error does (OWL's outlier shares are Wanda
    scores, even for magnitude)."""
    return METHODS[cfg.method].accumulate is not None or cfg.owl or cfg.refine != "none" or cfg.record_error


# --------------------------------------------------------------------------- input checks


@dataclass
class _Checked:
    seqlen: int
    device: torch.device
    tokenizer: Any
    windows: torch.Tensor | None
    blocks_done: int = 0  # finished blocks of the interrupted run that --resume continues
    conditions: dict = field(default_factory=dict)  # spp.io.conditions.run_conditions of this run
    inputs: dict = field(default_factory=dict)  # input file -> sha256 (output.input_hashes), once per run
    checkpoint: Any = None  # the input model, resolved once (spp.io.reader.Checkpoint)
    plan: LayerPlan | None = None  # which layers are pruned, at which sparsity (before OWL)


def _check_inputs(cfg: PruneConfig) -> _Checked:
    """Every check that can fail on the user's input, before any weights are loaded."""
    from spp.data import calibration_windows, check_calib_source
    from spp.io.checkpoint import check_not_an_input, check_output_dir
    from spp.io.reader import read_checkpoint
    from spp.models import check_seqlen, context_length, load_tokenizer, resolve_device, resolve_dtype

    if cfg.method not in METHODS:
        raise SppError(f"--method {cfg.method!r} is not one of {', '.join(sorted(METHODS))}")
    if needs_calibration(cfg):
        check_calib_source(cfg.calib)  # offline, a hub set fails here in a second, before any model is read
    calib = cfg.calib if needs_calibration(cfg) else None
    check_not_an_input(Path(cfg.output), [("--model", cfg.model), ("--calib", calib)], in_place="--model",
                       overwrite=cfg.overwrite)
    check_output_dir(Path(cfg.output), cfg.overwrite)
    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype)
    checkpoint = read_checkpoint(cfg.model)  # names as transformers resolves them, shapes, shards, manifest, masks
    model_config = checkpoint.config
    context = context_length(model_config)
    check_seqlen(cfg.seqlen, context)
    seqlen = cfg.seqlen or min(2048, context or 2048)
    plan = plan_layers(checkpoint.model, cfg)
    check_expert_weights(checkpoint.model, plan, checkpoint.pieces, cfg.owl)
    tokenizer = load_tokenizer(str(checkpoint.directory))
    windows = None
    if needs_calibration(cfg):
        windows = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    blocks_done = 0
    conditions = prune_conditions(cfg, device, model_config)
    inputs = input_hashes(cfg.model, checkpoint, calib)  # reads the model's files once: the progress and the manifest record it
    if cfg.resume:
        from spp.io.checkpoint import partial_path
        from spp.io.progress import check_resumable

        blocks_done = check_resumable(partial_path(Path(cfg.output)), resume_settings(cfg, windows), conditions, inputs,
                                      defaults=field_defaults(cfg))
    return _Checked(seqlen=seqlen, device=device, tokenizer=tokenizer, windows=windows, blocks_done=blocks_done,
                    conditions=conditions, checkpoint=checkpoint, plan=plan, inputs=inputs)


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


def run_prune(cfg: PruneConfig, on_module: Callable[[int, int, str], None] | None = None,
              streaming: bool = True) -> PruneReport:
    """Prune `cfg.model` with `cfg.method` at `cfg.pattern` and write the checkpoint to `cfg.output`.

    Streaming (the default) holds one decoder block's weights at a time (`spp.io.stream`): the model is a skeleton on
    the meta device; the embeddings are read for the calibration capture, each block when it is processed, and the
    output is written from the finished blocks kept for --resume. Peak memory: the embeddings (or one block, the
    larger), plus the calibration activations. `streaming=False` loads the whole model first (the same bytes out;
    the tests compare the two).

    Args:
        cfg: the resolved settings.
        on_module: progress callback (block index, number of blocks, module name) before each layer.
        streaming: hold one block at a time (see above).

    Returns:
        The report: sparsity per block and in total, kept zeros, wall time, dampening retries.

    Raises:
        SppError: any bad input (checked before the weights are loaded), a NaN or ±inf weight (checked right
            after they are, before calibration), or a singular Hessian.
    """
    from spp.io import stream
    from spp.io.checkpoint import partial_path
    from spp.io.finite import check_finite_model
    from spp.io.progress import progress_dir, start_progress
    from spp.models import find_decoder_blocks, load_model, resolve_dtype

    start = time.perf_counter()
    checked = _check_inputs(cfg)
    if streaming:  # each tensor is checked for NaN and ±inf as it is read (`stream.load`)
        model = stream.skeleton(checked.checkpoint, resolve_dtype(cfg.dtype))
        unreadable = stream.unreadable(model, checked.checkpoint)
        if unreadable is not None:
            print(f"note: transformers builds {unreadable} of {checked.checkpoint.directory} with a weight conversion "
                  "spp cannot read tensor by tensor; the whole model is loaded instead of streamed", file=sys.stderr)
            streaming = False
    if not streaming:
        model = load_model(str(checked.checkpoint.directory), cfg.dtype, "cpu")
        check_finite_model(model, f"model {checked.checkpoint.directory}")  # SparseGPT would spread a NaN along its row
    try:
        with _workdir(cfg) as tmp:
            if not checked.blocks_done:
                start_progress(tmp, resume_settings(cfg, checked.windows), len(find_decoder_blocks(model)[1]),
                               checked.conditions, checked.inputs)
            pruned = prune_model(model, checked.windows, cfg, checked.device, on_module, partial=tmp,
                                 blocks_done=checked.blocks_done, pieces=checked.checkpoint.pieces, plan=checked.plan,
                                 checkpoint=checked.checkpoint if streaming else None)
            if streaming:
                save_streamed_output(model, checked, cfg, tmp)
            shutil.rmtree(progress_dir(tmp))
            return write_output(cfg, checked, None if streaming else model, pruned, start, tmp)
    except KeyboardInterrupt:
        raise SppInterrupted(f"interrupted; the finished blocks are kept in {partial_path(Path(cfg.output))}") from None


@contextlib.contextmanager
def _workdir(cfg: PruneConfig):
    """`OUTPUT.partial/`: a stale one is removed (once this run holds the output's lock) unless resuming an
    interrupted run's progress; it is kept after an interrupt or a kill (for --resume) and removed after any other
    error (nothing half-written stays)."""
    from spp.io.checkpoint import PRUNE_PROGRESS_FILE, atomic_dir, partial_path
    from spp.io.progress import progress_dir

    resuming = cfg.resume and (progress_dir(partial_path(Path(cfg.output))) / PRUNE_PROGRESS_FILE).is_file()
    with atomic_dir(Path(cfg.output), overwrite=cfg.overwrite, resume=True, keep_partial=resuming) as tmp:
        try:
            yield tmp
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _holding(model: nn.Module, checkpoint, blocks_name: str):
    """`walk_blocks`'s `hold` for a streamed model: block i's tensors read from the checkpoint (on the CPU) for the
    time it is processed, then released (after the caller has persisted it)."""
    from spp.io import stream

    @contextlib.contextmanager
    def hold(index: int):
        stream.load(model, checkpoint, f"{blocks_name}.{index}.")
        try:
            yield
        finally:
            stream.release(model.get_submodule(f"{blocks_name}.{index}"))

    return hold


def save_streamed_output(model: nn.Module, checked, cfg: PruneConfig, tmp: Path) -> None:
    """Write what `spp.io.checkpoint.save_model` writes for the pruned model into `tmp`, byte for byte, from the
    pruned blocks `prune_model` kept in `tmp`'s progress and the unchanged rest of the input checkpoint, one part at
    a time (`spp.io.stream.save_streamed`)."""
    from spp.io import stream
    from spp.io.checkpoint import follow_umask, save_tokenizer
    from spp.io.progress import load_block
    from spp.models import find_decoder_blocks

    checkpoint = checked.checkpoint
    blocks_name, blocks = find_decoder_blocks(model)
    parts = {f"{blocks_name}.{i}.": i for i in range(len(blocks))}
    outside = [name for name in model.state_dict() if not name.startswith(f"{blocks_name}.")]  # one part each

    def read_part(prefix: str) -> dict[str, torch.Tensor]:
        if prefix in parts:
            return {prefix + name: tensor for name, tensor in load_block(tmp, parts[prefix]).items()}
        stream.load(model, checkpoint, prefix, skip=(f"{blocks_name}.",))  # one tensor outside the blocks, or all
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{blocks_name}.") and not v.is_meta}
        stream.release(model)
        return state

    stream.save_streamed(model, tmp, cfg.max_shard_size, read_part, list(parts) + outside)
    save_tokenizer(checked.tokenizer, tmp)
    follow_umask(*(p for p in tmp.iterdir() if p.is_file()))


@dataclass
class PrunedModel:
    """What `prune_model` changed: keep-masks (out, in) by parameter name ((E, out, in) for a fused expert weight),
    bit-packed along `in` (`spp.io.maskfile.pack_bits`),
    layouts, counts, dampening retries, the layer plan it followed (OWL's block sparsities in it) and OWL's record
    (None without --owl)."""

    masks: dict[str, torch.Tensor]
    layouts: dict[str, str]
    module_stats: dict[str, dict]
    retries: list[dict]
    plan: LayerPlan | None = None
    owl: dict | None = None

    def add_block(self, masks: dict[str, torch.Tensor], record, targets) -> None:
        """Take in one finished block: its keep-masks by block-relative name, its `spp.io.progress.BlockRecord`,
        and its targets by block-relative name (`spp.models.block_targets`), whose `param` keys each mask."""
        from spp.io.maskfile import pack_bits

        for name, keep in masks.items():  # packed, 1 bit a weight: held for every block until the mask file
            self.masks[targets[name].param] = pack_bits(keep)
        self.layouts.update(record.layouts)
        self.module_stats.update(record.module_stats)
        self.retries.extend(record.retries)


def prune_model(
    model: nn.Module,
    windows: torch.Tensor | None,
    cfg: PruneConfig,
    device: torch.device,
    on_module: Callable[[int, int, str], None] | None = None,
    partial: Path | None = None,
    blocks_done: int = 0,
    pieces: dict | None = None,
    plan: LayerPlan | None = None,
    checkpoint=None,
) -> PrunedModel:
    """Prune `model` in place, block by block: the in-memory half of `run_prune`.

    Args:
        model: a causal LM on the CPU.
        windows: (nsamples, seqlen) calibration ids, or None for magnitude without OWL.
        cfg: method, pattern, sparsity, layer choice, OWL, SparseGPT settings, batch size, offloading.
        device: where each block is pruned.
        on_module: progress callback (block index, number of blocks, module name).
        partial: where to persist each finished block and OWL's ratios (`spp.io.progress`), or None to keep nothing.
        blocks_done: blocks an interrupted run already finished in `partial` (restored, not redone).
        pieces: fused expert weight -> its saved per-expert tensors (`spp.io.reader.Checkpoint.pieces`), needed
            when expert weights are pruned (each piece is pruned as its own matrix).
        plan: the layer plan (`plan.plan_layers`) when the caller already made it, before OWL.
        checkpoint: stream `model` from this `spp.io.reader.Checkpoint`: `model` is its `spp.io.stream.skeleton`;
            the embeddings are read for the capture, each block while it is processed (`partial` then holds the
            pruned blocks, for `save_streamed_output`).
    """
    from spp.io.progress import BlockRecord, load_owl, restore_blocks, save_block, save_owl
    from spp.models import decoder_targets, find_decoder_blocks
    from spp.prune.experts import expert_targets
    from spp.prune.sequential import capture_block_inputs, walk_blocks

    if checkpoint is not None and partial is None:
        raise ValueError("a streamed prune_model needs `partial`: the pruned blocks are kept only there")
    method = layer_method(cfg)
    blocks_name, blocks = find_decoder_blocks(model)
    plan = plan or plan_layers(model, cfg)
    storage = torch.device("cpu") if cfg.offload_activations else device
    hold = None if checkpoint is None else _holding(model, checkpoint, blocks_name)
    inputs = None
    if windows is not None and needs_calibration(cfg):
        from spp.io.stream import outside_blocks

        with contextlib.nullcontext() if checkpoint is None else outside_blocks(model, checkpoint, blocks_name):
            inputs = capture_block_inputs(model, blocks, windows, cfg.batch_size, storage)
    if inputs is None and (cfg.refine != "none" or cfg.record_error):
        flag = f"--refine {cfg.refine}" if cfg.refine != "none" else "--record-error"
        raise SppError(f"{flag} needs calibration windows (it uses each layer's inputs), even with --method "
                       f"{cfg.method}; give --calib")
    owl = None
    if cfg.owl:
        owl = load_owl(partial) if partial is not None else None  # a resumed run reuses the ratios it computed
        if owl is None:
            if inputs is None:
                raise SppError("--owl needs calibration windows (its outlier shares are Wanda scores)")
            owl = owl_block_sparsities(model, inputs, plan, cfg, device, hold)
            if partial is not None:
                save_owl(partial, owl)
        plan = plan.with_block_sparsities({i: s for i, s in enumerate(owl["sparsity"]) if s is not None})
    calibrated = inputs if method.accumulate is not None else None  # magnitude + OWL: no propagation needed
    result = PrunedModel(masks={}, layouts={}, module_stats={}, retries=[], plan=plan, owl=owl)
    targets = decoder_targets(model)
    if partial is not None and blocks_done:
        restored = restore_blocks(partial, blocks, blocks_done, calibrated is not None, storage,
                                  load_weights=checkpoint is None)  # streamed: written from `partial` at the end
        if restored.hidden is not None:
            calibrated.hidden = restored.hidden
        for index, (masks, record) in enumerate(zip(restored.masks, restored.records)):
            result.add_block(masks, record, targets[index])
    chosen = [{name: t for name, t in block.items() if t.name in plan.sparsity} for block in targets]
    for block in walk_blocks(blocks, calibrated, method.accumulate, device, chosen,
                             start=blocks_done if partial is not None else 0, hold=hold):
        experts = expert_targets(block.targets)
        if cfg.permute_channels:  # before any of the block's weights is pruned; its function is unchanged
            permute_block(block.module, block.targets, block.stats, cfg.method, cfg.n_m, base_statistics)
        pruned = {}  # block-relative name -> (keep-mask on the CPU, its statistics, its dampening retries)
        for name, target in block.targets.items():
            if on_module is not None:
                on_module(block.index, len(blocks), target.name)
            if name not in experts:
                keep, info = prune_layer(target, block.stats.pop(name, None), method, cfg, plan.sparsity[target.name])
                retries = dampening_retry(info, cfg.percdamp)
                stats = {**sparsity_stats(target.out_in().detach().cpu(), keep.cpu()), **info}
                pruned[name] = keep.cpu(), stats, retries
        if experts:
            done = prune_expert_weights(experts, block.routes, method, METHODS["magnitude"], cfg,
                                        {name: plan.sparsity[t.name] for name, t in experts.items()},
                                        {name: saved_pieces(pieces, t.param) for name, t in experts.items()}, device)
            pruned.update((name, (d.keep, d.stats, d.retries)) for name, d in done.items())
        masks, record = {}, BlockRecord(layouts={}, module_stats={}, retries=[])
        for name, (keep, stats, retries) in pruned.items():
            target = block.targets[name]
            masks[name] = keep
            record.layouts[target.param], record.module_stats[target.param] = target.layout, stats
            record.retries.extend({"module": target.name, **r} for r in retries)
        next_inputs = block.finish()  # the pruned block's outputs
        result.add_block(masks, record, block.targets)
        if partial is not None:
            save_block(partial, block.index, block.module, masks, next_inputs, record)
            fault_point("prune_block", block.index)
    return result


def prune_layer(target, state, method: Method, cfg: PruneConfig, sparsity: float) -> tuple[torch.Tensor, dict]:
    """Prune one linear layer's weight (`spp.models.Target`) in place with `method` from its statistics `state`;
    returns (keep-mask (out, in), the method's extra record).

    Raises:
        SppError: the layer saw no calibration input, or the method failed (both naming the module).
    """
    if method.accumulate is not None and state is None:
        raise SppError(f"module {target.name} received no calibration input; spp cannot prune it with {cfg.method}")
    return method.prune_in_place(target.out_in(), state, cfg, sparsity, f"module {target.name}")


def owl_block_sparsities(model: nn.Module, inputs, plan: LayerPlan, cfg: PruneConfig, device: torch.device,
                         hold=None) -> dict:
    """OWL's statistics pass over the dense model and the block sparsities it gives (`spp.prune.owl`).

    Only the layers at the default sparsity take part (not ignored, not overridden); a block with none
    gets None. `hold`: as `walk_blocks`'s (a streamed model: each block read for its pass, then released).
    Returns {"m", "lmbda", "outlier_share": [D_l or None], "sparsity": [s_l or None]}.

    Raises:
        SppError: a layer saw no calibration input, or a block sparsity falls outside [0, 1).
    """
    from spp.models import decoder_targets, find_decoder_blocks
    from spp.prune.sequential import walk_blocks

    blocks_name, blocks = find_decoder_blocks(model)
    voting = [{name: t for name, t in targets.items() if t.name in plan.in_block(i, default_only=True)}
              for i, targets in enumerate(decoder_targets(model))]
    shares: list[float | None] = []
    for block in walk_blocks(blocks, inputs, accumulate_sq_norms, device, voting, dense=True, hold=hold):
        missing = [t.name for name, t in block.targets.items() if name not in block.stats]
        if missing:
            raise SppError(f"module {missing[0]} received no calibration input; OWL needs it")
        scores = [wanda_scores(t.out_in(), block.stats[name]) for name, t in block.targets.items()]
        shares.append(outlier_share(scores, cfg.owl_m) if scores else None)
    voters = [i for i, d in enumerate(shares) if d is not None]
    n = torch.tensor([sum(plan.numel[f] for f in plan.in_block(i, default_only=True)) for i in voters])
    D = torch.tensor([shares[i] for i in voters], dtype=torch.float64)
    s_l = owl_sparsities(D, n, cfg.sparsity, cfg.owl_lmbda).tolist()
    sparsity: list[float | None] = [None] * len(blocks)
    for i, value in zip(voters, s_l):
        if not 0 <= value < 1:
            raise SppError(f"OWL sets block {blocks_name}.{i} to sparsity {value:.4f}, outside [0, 1) "
                           f"(--sparsity {cfg.sparsity:g} ± up to 2·λ = {2 * cfg.owl_lmbda:g}); lower --owl-lmbda")
        sparsity[i] = value
    return {"m": cfg.owl_m, "lmbda": cfg.owl_lmbda, "outlier_share": shares, "sparsity": sparsity}
