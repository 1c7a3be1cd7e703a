"""Put adapters of any kind into a model, save and load them, and merge them in memory.

`add_adapter` wraps the module owning each chosen weight of the decoder blocks (`spp.models.Target`: a linear
layer's weight, or an experts module's fused weights) in an `spp.adapter.weight.AdaptedWeight` of the config's
kind and freezes everything else; `save_adapter` / `load_adapter` write and read `adapter_model.safetensors`
(only the trained tensors) and `adapter_config.json` (with the `kind`). Nothing here knows a kind or a weight's
shape: the math is in `spp.adapter.layer` (SPP), `spp.adapter.masked_lora` and `spp.adapter.full`. The streaming
merge of a saved checkpoint is `spp.merge`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spp.adapter import ADAPTERS
from spp.adapter.config import AdapterConfig
from spp.adapter.weight import AdaptedWeight
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, read_json, write_json
from spp.models import Target
from spp.patterns import match_layers
from spp.sparsity import check_base_weight


def find_targets(model: nn.Module, cfg: AdapterConfig, masks=None) -> dict[str, Target]:
    """The weights `add_adapter` adapts (and `spp merge` expects an adapter of): those `cfg.target_modules` selects
    in the decoder blocks, less those without a keep-mask entry (left dense by `spp prune`) unless
    `cfg.adapt_unpruned` or there are no masks.

    Args:
        masks: keep-masks (or their names) keyed by parameter name, or None.

    Returns:
        weight name -> its target, in model order.

    Raises:
        SppError: an invalid pattern, or no layer matches (names the patterns and the available names,
            or the module outside the decoder blocks a pattern names).
    """
    found = match_layers(model, cfg.target_modules, "target_modules", each=False)
    if masks is None or cfg.adapt_unpruned:
        return found
    return {name: target for name, target in found.items() if target.param in masks}


def add_adapter(model: nn.Module, cfg: AdapterConfig, masks: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Wrap the module owning every target weight in an `AdaptedWeight` of `cfg.kind` (in place) and freeze all
    other parameters. An experts module's target fused weights (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)
    share one `AdaptedWeight`, which replaces that module.

    Args:
        model: a Hugging Face causal LM without adapter layers.
        cfg: the kind, its sizes and scale, and the target patterns.
        masks: keep-masks keyed by in-memory parameter name (`<module>.weight`, stored layout, or a
            fused expert weight's own name with an (E, out, in) mask, as from
            `io.reader.Checkpoint.masks_by_parameter`). Each target weight must be bitwise
            +0.0 wherever its mask says pruned. Optional for `spp` (its update multiplies W);
            `masked_lora` and `full` need the mask of every target layer. Given, a target layer
            without an entry (left dense by `spp prune`) is skipped unless `cfg.adapt_unpruned`.

    Returns:
        The adapted weights' names (an expert weight's is its parameter name), in model order.

    Raises:
        SppError: the model already has adapter layers, no layer matches, a base weight breaks
            its mask, a target layer has no mask where the kind needs one, or a layer is too
            small for the adapter (each names the module).
    """
    if any(isinstance(m, AdaptedWeight) for m in model.modules()):
        raise SppError("the model already has spp adapters")
    targets = find_targets(model, cfg, masks)
    masks = masks or {}
    for name, target in targets.items():
        if target.param in masks:
            check_base_weight(name, target.weight, masks[target.param])
        elif ADAPTERS[cfg.kind].needs_mask:
            raise SppError(f"{name} has no entry in the keep-masks (masks.safetensors); adapter kind {cfg.kind!r} "
                           "needs the mask of every target layer")
    model.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for target in targets.values():
        by_module.setdefault(target.module_name, []).append(target)
    # build every module before changing the model, so an error leaves it alone; in model order (an experts
    # module at its first target weight), so the random init does not depend on whether the model is adapted
    # whole or block by block (`spp.train.fsdp`)
    wrapped = {module: AdaptedWeight(group[0].module, cfg, {t.attr: masks[t.param] for t in group if t.param in masks},
                                     [t.attr for t in group], name=module) for module, group in by_module.items()}
    for name, new in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return list(targets)


class _OneBlock(nn.Module):
    """A stand-in model holding one decoder block as `layers.0`, so `add_adapter` can adapt one block at a time."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([block])


def add_block_adapter(block: nn.Module, prefix: str, targets: list[str], cfg: AdapterConfig,
                      masks: dict[str, torch.Tensor] | None) -> list[str]:
    """`add_adapter` on one decoder block, at the weights `find_targets` chose on the whole model (names only, so
    full-name patterns and layers left dense are decided once, as for the whole model). Adapting the blocks in
    order draws the same random init, in the same order, as adapting the whole model.

    Args:
        block: the decoder block whose full-name prefix is `prefix` (`model.layers.3.`).
        targets: the whole model's target names (`find_targets`); those under `prefix` are adapted.
        masks: keep-masks by full parameter name (those of other blocks are ignored), or None.

    Returns:
        The block's adapted weights' full names (empty when none is under `prefix`).

    Raises:
        SppError: as `add_adapter`, naming the layer as the model does.
    """
    import dataclasses

    names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
    if not names:
        return []
    block_cfg = dataclasses.replace(cfg, target_modules=names, adapt_unpruned=True)
    block_masks = {f"layers.0.{k[len(prefix):]}": m for k, m in (masks or {}).items() if k.startswith(prefix)}
    try:
        add_adapter(_OneBlock(block), block_cfg, block_masks)
    except SppError as exc:  # name the layer as the model does, not as the stand-in
        raise SppError(str(exc).replace("layers.0.", prefix)) from None
    return [prefix + name for name in names]


def adapter_layers(model: nn.Module) -> dict[str, AdaptedWeight]:
    """Every adapted module of the model, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedWeight)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, keyed `<module path>.<tensor>` (detached, sharing storage with the parameters).

    One entry per trainable parameter, in the order of `model.parameters()`: SPP's `spp_alpha`,
    `spp_beta`; masked LoRA's `lora_A`, `lora_B`; `full`'s `full_weight` ((out, in) view of the
    trained weight). An adapted experts module's are keyed by the fused parameter's name, each (E, ...):
    `model.layers.0.mlp.experts.gate_up_proj.spp_alpha` (E, r, H). Copying into an entry writes the parameter.
    """
    return {f"{name}.{key}": tensor for name, m in adapter_layers(model).items()
            for key, tensor in m.adapter_tensors().items()}


def save_adapter(model: nn.Module, cfg: AdapterConfig, directory: Path) -> None:
    """Write `adapter_model.safetensors` (the trained tensors) and `adapter_config.json` into `directory`."""
    from spp.io.checkpoint import save_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    if not state:
        raise SppError("the model has no spp adapters to save")
    save_tensors(state, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "spp-adapter"})
    write_json(directory / ADAPTER_CONFIG_FILE, cfg.to_json())


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """Read `adapter_config.json` from an adapter directory.

    Raises:
        SppError: the directory or file is missing, or the file is malformed (names it).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise SppError(f"adapter directory {adapter_dir} does not exist (is it an `spp train` output?)")
    path = adapter_dir / ADAPTER_CONFIG_FILE
    return AdapterConfig.from_json(read_json(path, what="adapter config"), source=str(path))


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` into CPU tensors (merge, eval --adapter and a training resume all read
    adapters here).

    Raises:
        SppError: missing, truncated or corrupt (names the file), or a tensor holds a NaN or ±inf (`spp.io.finite`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from spp.io.finite import check_finite

    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise SppError(f"adapter weights {path} do not exist")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"adapter weights {path} are corrupt or truncated: {exc}") from exc
    for name, tensor in weights.items():
        check_finite(tensor, name, str(path))
    return weights


def load_adapter(model: nn.Module, adapter_dir: Path, masks: dict[str, torch.Tensor] | None = None) -> AdapterConfig:
    """Add adapter layers to `model` as `adapter_dir` describes (its kind) and load their tensors.

    Args:
        model: the base (pruned) model, without adapter layers.
        adapter_dir: an `spp train` output (or a checkpoint inside one).
        masks: keep-masks, as in `add_adapter` (needed by `masked_lora` and `full`).

    Returns:
        The adapter's config.

    Raises:
        SppError: missing or corrupt files, or weights that do not fit the model (names the
            file and the tensor).
    """
    cfg = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)  # read before touching the model
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    add_adapter(model, cfg, masks)
    params = dict(adapter_state_dict(model))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model does not"
        raise SppError(f"adapter weights {path} do not fit this model: it {what} "
                       f"({len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(weights[name].shape) != tuple(param.shape):
                raise SppError(f"adapter weights {path}: {name} has shape {tuple(weights[name].shape)}, "
                               f"the model needs {tuple(param.shape)}")
            param.copy_(weights[name])
    return cfg


def merge_adapter(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every adapted module by its base holding the merged weights (in place).

    Args:
        masks: optional keep-masks by parameter name (`<module>.weight`, stored layout; a fused expert
            weight's own name, (E, out, in)); the entries they mark pruned come out +0.0. Without
            one, SPP keeps every zero of W at +0.0 and the other kinds use the mask they were built with.

    Returns:
        The same model, with plain linear layers (frozen).
    """
    for name, module in adapter_layers(model).items():
        base = module.base_layer
        with torch.no_grad():
            for p in module.params:  # masks keyed by parameter name: `<module>.weight`, or a fused weight's own
                keep = None if masks is None else masks.get(f"{name}.{p}")
                getattr(base, p).copy_(module.merged_weight(p, keep))
        base.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    return model


def count_trainable(model: nn.Module) -> int:
    """The number of trainable parameters (the adapter's, after `add_adapter`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
