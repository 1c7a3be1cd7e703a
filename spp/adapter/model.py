"""Put SPP adapters into a model, save and load them, and merge them in memory.

`add_spp` wraps the chosen linear layers of the decoder blocks in `SPPLinear` and
freezes everything else; `save_adapter` / `load_adapter` write and read
`adapter_model.safetensors` (only α and β) and `adapter_config.json`. The streaming
merge of a saved checkpoint is `spp.merge`; the layer math is `spp.adapter.layer`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from spp.adapter.config import AdapterConfig
from spp.adapter.layer import SPPLinear
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, read_json, write_json
from spp.models import find_decoder_blocks, find_linear_layers
from spp.prune.masks import pruned_is_positive_zero

ADAPTER_PARAMS = ("spp_alpha", "spp_beta")


def target_layers(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """The linear layers inside the decoder blocks whose block-relative name matches a pattern.

    Returns:
        full module name (e.g. `model.layers.0.self_attn.q_proj`) -> layer, in model order.

    Raises:
        SppError: no layer matches (names the patterns and the available names).
    """
    prefix, blocks = find_decoder_blocks(model)
    found, names = {}, set()
    for i, block in enumerate(blocks):
        for name, layer in find_linear_layers(block).items():
            names.add(name)
            if any(fnmatchcase(name, p) for p in patterns):
                found[f"{prefix}.{i}.{name}"] = layer
    if not found:
        raise SppError(f"target_modules {patterns} match no linear layer in the decoder blocks "
                       f"(their names are: {', '.join(sorted(names))})")
    return found


def _check_pruned_zeros(name: str, layer: nn.Module, keep: torch.Tensor) -> None:
    weight = layer.weight
    if tuple(keep.shape) != tuple(weight.shape):
        raise SppError(f"{name}: mask shape {tuple(keep.shape)} does not match weight shape {tuple(weight.shape)}")
    bad = ~pruned_is_positive_zero(weight, keep.to(weight.device))
    if bad.any():
        raise SppError(f"{name}: {int(bad.sum())} entries the mask marks pruned are not +0.0 in the base weight; "
                       "this base is not the pruned model the mask belongs to (spp never re-masks it)")


def add_spp(model: nn.Module, cfg: AdapterConfig, masks: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Wrap every target linear layer in `SPPLinear` (in place) and freeze all other parameters.

    Args:
        model: a Hugging Face causal LM without SPP layers.
        cfg: row groups, scale and target patterns.
        masks: optional keep-masks keyed by in-memory parameter name (`<module>.weight`,
            stored layout, as from `io.checkpoint.masks_by_parameter`). Each target weight
            must be bitwise +0.0 wherever its mask says pruned.

    Returns:
        The adapted module names, in model order.

    Raises:
        SppError: the model already has SPP layers, no layer matches, or a base weight
            breaks its mask (names the module).
    """
    if any(isinstance(m, SPPLinear) for m in model.modules()):
        raise SppError("the model already has SPP adapters")
    targets = target_layers(model, cfg.target_modules)
    if masks is not None:
        for name, layer in targets.items():
            if f"{name}.weight" in masks:
                _check_pruned_zeros(name, layer, masks[f"{name}.weight"])
    model.requires_grad_(False)
    for name, layer in targets.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SPPLinear(layer, cfg.spp_row_groups, cfg.scale))
    return list(targets)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter parameters, keyed `<module path>.spp_alpha` / `.spp_beta` (detached)."""
    return {
        name: param.detach()
        for name, param in model.named_parameters()
        if name.rpartition(".")[2] in ADAPTER_PARAMS
    }


def save_adapter(model: nn.Module, cfg: AdapterConfig, directory: Path) -> None:
    """Write `adapter_model.safetensors` (α and β) and `adapter_config.json` into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    if not state:
        raise SppError("the model has no SPP adapters to save")
    save_file(state, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "spp-adapter"})
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
    """Read `adapter_model.safetensors` into CPU tensors.

    Raises:
        SppError: missing, truncated or corrupt (names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise SppError(f"adapter weights {path} do not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"adapter weights {path} are corrupt or truncated: {exc}") from exc


def load_adapter(model: nn.Module, adapter_dir: Path, masks: dict[str, torch.Tensor] | None = None) -> AdapterConfig:
    """Add SPP layers to `model` as `adapter_dir` describes and load their α and β.

    Args:
        model: the base (pruned) model, without SPP layers.
        adapter_dir: an `spp train` output (or a checkpoint inside one).
        masks: optional keep-masks to check the base against, as in `add_spp`.

    Returns:
        The adapter's config.

    Raises:
        SppError: missing or corrupt files, or weights that do not fit the model (names the
            file and the tensor).
    """
    cfg = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)  # read before touching the model
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    add_spp(model, cfg, masks)
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


def merge_spp(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every `SPPLinear` by its base layer holding the merged weight (in place).

    Args:
        masks: optional keep-masks by parameter name (`<module>.weight`, stored layout);
            without them every zero of W stays +0.0.

    Returns:
        The same model, with plain linear layers.
    """
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, SPPLinear)]
    for name, module in wrapped:
        keep = None if masks is None else masks.get(f"{name}.weight")
        base = module.base_layer
        with torch.no_grad():
            base.weight.copy_(module.merged_weight(keep))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    return model


def count_trainable(model: nn.Module) -> int:
    """The number of trainable parameters (α and β after `add_spp`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
