"""`spp merge`: fold a trained adapter of any kind into its pruned base, one safetensors shard at a time.

The adapter's `kind` (`adapter_config.json`) picks the merged weight from `spp.adapter.ADAPTERS`:
W ⊙ (1 + s·Â ⊙ β·1ᵀ) for SPP, W + M ⊙ (s·B·A) for masked LoRA, M ⊙ W_trained for `full`, each
computed in float32 and cast once, back to the base's dtype or to `--dtype`, with every pruned entry
+0.0 bitwise. A mixture-of-experts adapter keys each fused weight (`mlp.experts.gate_up_proj`, (E, ...)
tensors) while the base saves it per expert (Mixtral's `w1`/`w3`/`w2`): each saved piece is merged with
its expert's tensors, found through the checkpoint reader's `pieces` (transformers' own name mapping),
never by suffix. Only one shard and one merged tensor are in memory at a time, so peak memory is about
the largest shard plus one tensor. The output is a plain Hugging Face directory with the same shard
names and index, the unchanged mask file (at `spp/masks.safetensors`, whichever name the base has it
under) and a manifest, built atomically. Nothing here trains or loads a whole model.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spp.adapter import ADAPTERS
from spp.adapter.config import AdapterConfig
from spp.adapter.model import find_targets, read_adapter_config, read_adapter_weights
from spp.config import MergeConfig, to_dict
from spp.errors import SppError
from spp.io.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LEGACY_MASK_FILE, MANIFEST_FILE, MASK_FILE,
                               RESOLVED_CONFIG_FILE, RESULTS_FILE, atomic_dir, check_output_dir,
                               drop_tokenizer_load_options, safetensors_files, save_tensors, set_config_dtype,
                               sha256_file)
from spp.io.conditions import run_conditions
from spp.io.finite import cast_weight
from spp.io.manifest import Manifest, peak_memory_bytes, write_manifest
from spp.io.reader import Checkpoint, read_checkpoint
from spp.models import resolve_dtype
from spp.sparsity import check_base_weight, check_pruned_zero, sparsity_stats

NOT_COPIED = {MANIFEST_FILE, RESOLVED_CONFIG_FILE, RESULTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
              LEGACY_MASK_FILE}  # an older base's mask file is copied to MASK_FILE


@dataclass
class MergeTarget:
    """One adapted saved weight: where it is saved, its layout, and the adapter's tensors for it (by short name).

    A piece of a fused expert weight (`rows` set) is rows [rows[0], rows[1]) of an (out_features, in) expert
    matrix; `tensors` are that expert's (the adapter's (E, ...) tensors at its index).
    """

    module: str
    tensor: str
    conv1d: bool
    tensors: dict[str, torch.Tensor]
    rows: tuple[int, int] | None = None
    out_features: int = 0


@dataclass
class MergeReport:
    output: Path
    model: Path
    adapter: Path
    n_modules: int
    n_shards: int
    mask_sha256: str
    kept_zero: int  # kept entries (mask True) that are zero in the merged weights
    wall_time_s: float
    peak_memory: dict


def resolve_base(cfg: MergeConfig, adapter_cfg: AdapterConfig) -> Path:
    """`--model`, or else the base model the adapter config records."""
    if cfg.model:
        return Path(cfg.model).expanduser()
    if not adapter_cfg.base_model:
        raise SppError(f"{Path(cfg.adapter) / ADAPTER_CONFIG_FILE} records no base model; pass --model PRUNED_DIR")
    return Path(adapter_cfg.base_model).expanduser()


def merge_targets(base: Checkpoint, adapter_dir: Path, adapter_cfg: AdapterConfig) -> list[MergeTarget]:
    """Match the adapter's tensors to the base's saved weights, checking names and shapes for its kind
    (the base's mask file through `base.masks_by_parameter`).

    Raises:
        SppError: the adapter does not fit the base (names the module, file and shapes).
    """
    weights = read_adapter_weights(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    model_dir = base.directory
    kind = ADAPTERS[adapter_cfg.kind]
    by_weight: dict[str, dict[str, torch.Tensor]] = {}  # the adapted weights, as the adapter's tensors name them
    for key, value in weights.items():
        name, _, short = key.rpartition(".")
        by_weight.setdefault(name, {})[short] = value
    # they must be the weights `add_adapter` chose in training (by default, layers left dense were not adapted)
    chosen = find_targets(base.model, adapter_cfg, None if adapter_cfg.adapt_unpruned else base.masks_by_parameter())
    if set(by_weight) != set(chosen):
        extra = sorted(set(by_weight) - set(chosen)) or sorted(set(chosen) - set(by_weight))
        raise SppError(f"adapter weights {weights_path} do not fit the model in {model_dir} "
                       f"(first mismatched module: {extra[0]})")
    targets = []
    for name, tensors in by_weight.items():
        target = chosen[name]
        shape = tuple(target.out_in().shape)  # (E?, out, in); the adapter's tensors are (E?, ...)
        fused = len(shape) == 3
        what = (f"{name} ((E, out, in) = {shape})" if fused
                else f"{base.saved_name(target.param)} ((out, in) = {shape})")  # the name transformers loads it from
        expected = {short: (*shape[:-2], *size) for short, size in kind.tensor_shapes(*shape[-2:], adapter_cfg).items()}
        got = {short: tuple(t.shape) for short, t in tensors.items()}
        if got != expected:
            raise SppError(f"adapter weights {weights_path}: {name} has {_shapes(got)}, but a {adapter_cfg.kind} "
                           f"adapter of {what} needs {_shapes(expected)}")
        if fused and target.param not in base.pieces:
            raise SppError(f"{model_dir} saves {name} in a layout spp cannot map to per-expert tensors, so an "
                           "adapter of it cannot be merged")
        for piece in base.pieces.get(target.param) or [None]:  # each saved tensor, through the reader's mapping
            if piece is None:
                targets.append(MergeTarget(name, base.saved_name(target.param), target.layout == "conv1d", tensors))
            else:
                expert = {short: t[piece.expert] for short, t in tensors.items()}
                targets.append(MergeTarget(name, piece.saved, False, expert, piece.rows, shape[-2]))
    return targets


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in sorted(shapes.items()))


def merge_shard(shard: Path, destination: Path, targets: dict[str, MergeTarget], masks: dict,
                adapter_cfg: AdapterConfig, dtype: torch.dtype | None = None) -> None:
    """Write `shard` to `destination` with every target weight merged; other tensors copied as they are, and with
    `dtype` every floating tensor cast to it (a merged weight computed in float32 and cast once).

    Raises:
        SppError: a tensor of `shard` holds a NaN or ±inf, or a merged weight overflows its dtype (`spp.io.finite`).
    """
    from safetensors import safe_open

    from spp.io.finite import check_finite

    kind = ADAPTERS[adapter_cfg.kind]
    tensors = {}
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            tensor = f.get_tensor(name)
            check_finite(tensor, name, str(shard))
            target = targets.get(name)
            if target is not None:
                keep = masks.get(name)
                W = tensor.t() if target.conv1d else tensor  # (out, in)
                if dtype is not None and dtype != W.dtype:  # exact; the float32 merge below is then cast once
                    W = W.to(torch.promote_types(W.dtype, torch.float32))
                if keep is None:
                    keep = W != 0  # no mask (SPP only; checked before): keep every zero of W at +0.0
                else:
                    keep = keep.t() if target.conv1d else keep
                    check_base_weight(name, W, keep)  # as training checks it: merge never re-masks a base
                if target.rows is None:
                    merged = kind.merged_weight(W, keep, target.tensors, adapter_cfg.scale)
                else:
                    merged = _merged_rows(kind, W, keep, target, adapter_cfg.scale)
                tensor = (merged.t() if target.conv1d else merged).contiguous()
                # finite inputs can still overflow when the float32 merge is cast back (float16 ends at 65504)
                check_finite(tensor, name, f"merging {shard}",
                             advice="the adapter's update takes this weight past what its dtype holds")
            tensors[name] = cast_weight(tensor, dtype, name, f"merging {shard}")
    save_tensors(tensors, destination, metadata=metadata)


def _merged_rows(kind, W: torch.Tensor, keep: torch.Tensor, target: MergeTarget, scale: float) -> torch.Tensor:
    """The merged rows of one saved piece of a fused expert weight (Mixtral's `w1` = the gate rows of
    `gate_up_proj[e]`): the piece is put at its rows of an (out, in) matrix that is zero (and pruned)
    elsewhere, merged with the expert's tensors, and its rows taken back. Every kind's merged weight is
    row-wise (row o depends on W[o], M[o] and the tensors only; SPP's row groups need the full `out`),
    so this equals the rows of the in-memory merge of the whole expert bitwise.

    Args:
        W: the piece, (rows, in). keep: its mask, (rows, in) bool.
    """
    start, stop = target.rows
    W_full = W.new_zeros((target.out_features, W.shape[1]))  # (out, in)
    keep_full = torch.zeros(W_full.shape, dtype=torch.bool)
    W_full[start:stop], keep_full[start:stop] = W, keep
    return kind.merged_weight(W_full, keep_full, target.tensors, scale)[start:stop]


def check_invariant(directory: Path, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Every entry a mask marks pruned is bitwise +0.0 in the written shards.

    Returns:
        (the number of tensors checked, the number of kept entries that are zero).

    Raises:
        RuntimeError: a pruned entry is not +0.0 (a bug in merge, not a user error).
    """
    from safetensors import safe_open

    checked = kept_zero = 0
    for shard in safetensors_files(directory):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name in masks:
                    weight = f.get_tensor(name)
                    check_pruned_zero(weight, masks[name], lambda count, _: (
                        f"merged {name} has {count} pruned entries that are not +0.0"), error=RuntimeError)
                    kept_zero += sparsity_stats(weight, masks[name])["kept_zero"]
                    checked += 1
    if checked != len(masks):
        raise RuntimeError(f"the merged checkpoint holds {checked} of the {len(masks)} masked tensors")
    return checked, kept_zero


def _base_details(base: Checkpoint) -> dict:
    """The base's pruning method and pattern, carried over so `spp verify` checks N:M on the merged model."""
    if base.manifest is None:
        return {}
    details = base.manifest.details
    return {key: details[key] for key in ("method", "pattern") if key in details}


def run_merge(cfg: MergeConfig) -> MergeReport:
    """Merge the adapter in `cfg.adapter` into the pruned model and write `cfg.output`.

    Raises:
        SppError: a missing or corrupt adapter or base, an adapter trained on another base
            (mask hash mismatch), an adapter that does not fit, a NaN or ±inf in a base weight, an adapter
            tensor or a merged weight, or an existing output.
    """
    start = time.perf_counter()
    dtype = resolve_dtype(cfg.dtype)
    dtype = None if dtype == "auto" else dtype
    adapter_dir, output = Path(cfg.adapter).expanduser(), Path(cfg.output).expanduser()
    adapter_cfg = read_adapter_config(adapter_dir)
    model_dir = resolve_base(cfg, adapter_cfg)
    from spp.io.checkpoint import check_not_an_input

    base_label = "--model" if cfg.model else "the base the adapter records"
    check_not_an_input(output, [(base_label, model_dir), ("--adapter", adapter_dir)], in_place="--model",
                       overwrite=cfg.overwrite)
    check_output_dir(output, cfg.overwrite)
    if not model_dir.is_dir():
        raise SppError(f"base model {model_dir} does not exist (pass --model PRUNED_DIR)")
    if not adapter_cfg.mask_sha256:
        raise SppError(f"{adapter_dir / ADAPTER_CONFIG_FILE} records no mask_sha256, so its base cannot be checked")
    base = read_checkpoint(model_dir)  # names as transformers resolves them, whole shards, mask = manifest's
    mask_sha256 = base.check_adapter_base(adapter_cfg.mask_sha256, adapter_dir / ADAPTER_WEIGHTS_FILE,
                                          adapter_cfg.describe(adapter_dir))
    masks, _ = base.read_masks()  # keyed by saved name, each naming a saved tensor of its shape
    shards = base.shards
    targets = {t.tensor: t for t in merge_targets(base, adapter_dir, adapter_cfg)}
    n_modules = len({t.module for t in targets.values()})  # a fused expert weight counts once, not per piece
    unmasked = [t.module for t in targets.values() if t.tensor not in masks]
    if unmasked and ADAPTERS[adapter_cfg.kind].needs_mask:
        raise SppError(f"{unmasked[0]} has no entry in {base.mask_file}; adapter kind {adapter_cfg.kind!r} "
                       "needs the mask of every target layer")
    inputs = {str(p): sha256_file(p) for p in [*shards, adapter_dir / ADAPTER_WEIGHTS_FILE, adapter_dir / ADAPTER_CONFIG_FILE]}
    inputs[str(base.mask_file)] = mask_sha256

    with atomic_dir(output, overwrite=cfg.overwrite) as tmp:
        for shard in shards:
            merge_shard(shard, tmp / shard.name, targets, masks, adapter_cfg, dtype)
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in NOT_COPIED and not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)  # config, index, tokenizer, generation config
        (tmp / MASK_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base.mask_file, tmp / MASK_FILE)  # byte for byte: mask_sha256 is unchanged
        if dtype is not None:
            set_config_dtype(tmp, cfg.dtype)
        drop_tokenizer_load_options(tmp)  # a base written by an older spp may carry them
        checked, kept_zero = check_invariant(tmp, masks)
        settings = {**to_dict(cfg), "model": str(model_dir)}
        details = {**_base_details(base), "adapter": adapter_cfg.kind, "adapted_modules": n_modules,
                   **ADAPTERS[adapter_cfg.kind].size(adapter_cfg), "scale": adapter_cfg.scale, "shards": len(shards),
                   "invariant_tensors_checked": checked, "kept_zero": kept_zero}
        write_manifest(tmp, Manifest(stage="merge", settings=settings, inputs=inputs, details=details,
                                     conditions=run_conditions("cpu", "float32"),  # the merge math: fp32 on the CPU
                                     wall_time_s=time.perf_counter() - start, peak_memory=peak_memory_bytes()))
    return MergeReport(output=output, model=model_dir, adapter=adapter_dir, n_modules=n_modules,
                       n_shards=len(shards), mask_sha256=mask_sha256, kept_zero=kept_zero, wall_time_s=time.perf_counter() - start,
                       peak_memory=peak_memory_bytes())
