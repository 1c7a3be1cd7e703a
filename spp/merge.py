"""`spp merge`: fold a trained SPP adapter into its pruned base, one safetensors shard at a time.

Each adapted weight becomes W ⊙ (1 + s·Â ⊙ β·1ᵀ) (computed in float32, cast back, pruned
entries +0.0; see `spp.adapter.layer.spp_merge_weight`). Only one shard and one merged
tensor are in memory at a time, so peak memory is about the largest shard plus one tensor.
The output is a plain Hugging Face directory with the same shard names and index, the
unchanged `masks.safetensors` and a manifest, built atomically. Nothing here trains or
loads a whole model.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spp.adapter.config import AdapterConfig
from spp.adapter.layer import spp_merge_weight
from spp.adapter.model import ADAPTER_PARAMS, read_adapter_config, read_adapter_weights, target_layers
from spp.config import MergeConfig, to_dict
from spp.errors import SppError
from spp.io.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, MASK_FILE,
                               RESOLVED_CONFIG_FILE, RESULTS_FILE, atomic_dir, check_output_dir, safetensors_files,
                               safetensors_keys, sha256_file, shard_index)
from spp.io.integrity import check_model_dir
from spp.io.manifest import Manifest, check_mask_hash, peak_memory_bytes, read_manifest, write_manifest
from spp.io.maskfile import load_masks
from spp.models import is_conv1d, load_config
from spp.prune.masks import pruned_is_positive_zero

NOT_COPIED = {MANIFEST_FILE, RESOLVED_CONFIG_FILE, RESULTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}


@dataclass
class MergeTarget:
    """One adapted weight: where it is saved, its layout, and its α (r, in) and β (out,)."""

    module: str
    tensor: str
    conv1d: bool
    alpha: torch.Tensor
    beta: torch.Tensor


@dataclass
class MergeReport:
    output: Path
    model: Path
    adapter: Path
    n_modules: int
    n_shards: int
    mask_sha256: str
    wall_time_s: float
    peak_memory: dict


def resolve_base(cfg: MergeConfig, adapter_cfg: AdapterConfig) -> Path:
    """`--model`, or else the base model the adapter config records."""
    if cfg.model:
        return Path(cfg.model).expanduser()
    if not adapter_cfg.base_model:
        raise SppError(f"{Path(cfg.adapter) / ADAPTER_CONFIG_FILE} records no base model; pass --model PRUNED_DIR")
    return Path(adapter_cfg.base_model).expanduser()


def _meta_model(model_dir: Path):
    """The model's module tree on the meta device: names and layer types, no weights."""
    from transformers import AutoModelForCausalLM

    config = load_config(str(model_dir))
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise SppError(f"{model_dir} does not hold a causal language model spp can build: {exc}") from exc


def saved_weight_name(module: str, saved_names) -> str | None:
    """The saved name of `<module>.weight`: verbatim, or the unique saved name ending in its longest suffix.

    A family that renames on save keeps the block-relative tail (`layers.0.attention.dense.weight`).
    """
    wanted = f"{module}.weight"
    if wanted in saved_names:
        return wanted
    parts = wanted.split(".")
    for start in range(1, len(parts) - 2):
        tail = "." + ".".join(parts[start:])
        hits = [name for name in saved_names if name.endswith(tail)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None
    return None


def merge_targets(model_dir: Path, adapter_dir: Path, adapter_cfg: AdapterConfig) -> list[MergeTarget]:
    """Match the adapter's tensors to the base's saved weights, checking names and shapes.

    Raises:
        SppError: the adapter does not fit the base (names the module, file and shapes).
    """
    weights = read_adapter_weights(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    layers = target_layers(_meta_model(model_dir), adapter_cfg.target_modules)
    modules = {key.rpartition(".")[0] for key in weights}
    if modules != set(layers) or len(weights) != 2 * len(modules):
        extra = sorted(modules - set(layers)) or sorted(set(layers) - modules)
        raise SppError(f"adapter weights {weights_path} do not fit the model in {model_dir} "
                       f"(first mismatched module: {extra[0] if extra else 'a module lacks spp_alpha or spp_beta'})")
    index = shard_index(model_dir)
    shapes = {name: shape for shard in safetensors_files(model_dir) for name, (_, shape) in safetensors_keys(shard).items()}
    targets = []
    for module, layer in layers.items():
        alpha, beta = (weights[f"{module}.{p}"] for p in ADAPTER_PARAMS)
        tensor = saved_weight_name(module, index)
        if tensor is None:
            raise SppError(f"{model_dir} has no saved weight for the adapted module {module}")
        conv1d = is_conv1d(layer)
        out_in = shapes[tensor][::-1] if conv1d else shapes[tensor]
        if alpha.dim() != 2 or beta.dim() != 1 or [beta.shape[0], alpha.shape[1]] != list(out_in):
            raise SppError(f"adapter weights {weights_path}: {module} has α {tuple(alpha.shape)} and β "
                           f"{tuple(beta.shape)}, but {tensor} is (out, in) = {tuple(out_in)}")
        targets.append(MergeTarget(module, tensor, conv1d, alpha, beta))
    return targets


def merge_shard(shard: Path, destination: Path, targets: dict[str, MergeTarget], masks: dict, scale: float) -> None:
    """Write `shard` to `destination` with every target weight merged; other tensors copied as they are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            tensor = f.get_tensor(name)
            target = targets.get(name)
            if target is not None:
                keep = masks.get(name)
                W = tensor.t() if target.conv1d else tensor  # (out, in)
                if keep is None:
                    keep = W != 0  # no mask: keep every zero of W at +0.0
                elif target.conv1d:
                    keep = keep.t()
                merged = spp_merge_weight(W, target.alpha, target.beta, scale, keep)
                tensor = (merged.t() if target.conv1d else merged).contiguous()
            tensors[name] = tensor
    save_file(tensors, str(destination), metadata=metadata)


def check_invariant(directory: Path, masks: dict[str, torch.Tensor]) -> int:
    """Every entry a mask marks pruned is bitwise +0.0 in the written shards.

    Returns:
        The number of tensors checked.

    Raises:
        RuntimeError: a pruned entry is not +0.0 (a bug in merge, not a user error).
    """
    from safetensors import safe_open

    checked = 0
    for shard in safetensors_files(directory):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name in masks:
                    bad = ~pruned_is_positive_zero(f.get_tensor(name), masks[name])
                    if bad.any():
                        raise RuntimeError(f"merged {name} has {int(bad.sum())} pruned entries that are not +0.0")
                    checked += 1
    if checked != len(masks):
        raise RuntimeError(f"the merged checkpoint holds {checked} of the {len(masks)} masked tensors")
    return checked


def _base_details(model_dir: Path) -> dict:
    """The base's pruning method and pattern, carried over so `spp verify` checks N:M on the merged model."""
    if not (model_dir / MANIFEST_FILE).is_file():
        return {}
    details = read_manifest(model_dir).details
    return {key: details[key] for key in ("method", "pattern") if key in details}


def run_merge(cfg: MergeConfig) -> MergeReport:
    """Merge the adapter in `cfg.adapter` into the pruned model and write `cfg.output`.

    Raises:
        SppError: a missing or corrupt adapter or base, an adapter trained on another base
            (mask hash mismatch), an adapter that does not fit, or an existing output.
    """
    start = time.perf_counter()
    adapter_dir, output = Path(cfg.adapter).expanduser(), Path(cfg.output).expanduser()
    adapter_cfg = read_adapter_config(adapter_dir)
    model_dir = resolve_base(cfg, adapter_cfg)
    check_output_dir(output, cfg.overwrite)
    if not model_dir.is_dir():
        raise SppError(f"base model {model_dir} does not exist (pass --model PRUNED_DIR)")
    if not adapter_cfg.mask_sha256:
        raise SppError(f"{adapter_dir / ADAPTER_CONFIG_FILE} records no mask_sha256, so its base cannot be checked")
    mask_sha256 = check_mask_hash(model_dir, adapter_cfg.mask_sha256, who=f"adapter {adapter_dir}")
    check_model_dir(model_dir)  # whole shards, config.json agreeing with them, the mask its manifest records
    masks, _ = load_masks(model_dir / MASK_FILE)
    shards = safetensors_files(model_dir)
    if not shards:
        raise SppError(f"base model {model_dir} holds no safetensors weights")
    targets = {t.tensor: t for t in merge_targets(model_dir, adapter_dir, adapter_cfg)}
    unknown = sorted(set(masks) - set(shard_index(model_dir)))
    if unknown:
        raise SppError(f"{model_dir / MASK_FILE} names {unknown[0]}, which the shards in {model_dir} do not hold")
    inputs = {str(p): sha256_file(p) for p in [*shards, adapter_dir / ADAPTER_WEIGHTS_FILE, adapter_dir / ADAPTER_CONFIG_FILE]}
    inputs[str(model_dir / MASK_FILE)] = mask_sha256

    with atomic_dir(output, overwrite=cfg.overwrite) as tmp:
        for shard in shards:
            merge_shard(shard, tmp / shard.name, targets, masks, adapter_cfg.scale)
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in NOT_COPIED and not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)  # config, index, tokenizer, generation config, masks
        checked = check_invariant(tmp, masks)
        settings = {**to_dict(cfg), "model": str(model_dir)}
        details = {**_base_details(model_dir), "adapted_modules": len(targets), "row_groups": adapter_cfg.spp_row_groups,
                   "scale": adapter_cfg.scale, "shards": len(shards), "invariant_tensors_checked": checked}
        write_manifest(tmp, Manifest(stage="merge", settings=settings, inputs=inputs, details=details,
                                     wall_time_s=time.perf_counter() - start, peak_memory=peak_memory_bytes()))
    return MergeReport(output=output, model=model_dir, adapter=adapter_dir, n_modules=len(targets),
                       n_shards=len(shards), mask_sha256=mask_sha256, wall_time_s=time.perf_counter() - start,
                       peak_memory=peak_memory_bytes())
