"""Load Hugging Face causal LMs and find their decoder blocks and the weights spp prunes and adapts, for any family.

Nothing here is specific to one architecture: decoder blocks are the longest
`nn.ModuleList` whose entries are the model's no-split modules (or, failing that,
all of one class), linear layers are found by type (`nn.Linear` and GPT-2's
`Conv1D`, whose weight is stored (in, out)), and a mixture-of-experts block's fused
expert weights (transformers 5: 3-D parameters (E, out, in) of an experts module, e.g.
Mixtral's `mlp.experts.gate_up_proj`) by shape. A router is neither (it stays dense). Each weight found is a
`Target` (`block_targets`, `decoder_targets`), the one record every stage loops over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spp import hf
from spp.errors import SppError, first_line
from spp.io.reader import local_directory, refuse_incomplete_load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. An explicit `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SppError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise SppError(f"--device {device!r} is not a device (use auto, cpu or cuda)") from exc


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """`auto` keeps the checkpoint's dtype; otherwise one of float32, bfloat16, float16."""
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise SppError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str, dtype: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM in eval mode on `device` (prune keeps it on the CPU and moves one block at a time).

    Stages pass the directory of a `Checkpoint` (`spp.io.reader`), already checked; weights are read from
    safetensors only, and transformers' own loading report is checked again after the load.

    Raises:
        SppError: transformers cannot load it, or reports a weight missing, unexpected or of another shape.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    directory = local_directory(name_or_path)
    try:
        model, info = hf.from_pretrained(AutoModelForCausalLM, directory, dtype=resolve_dtype(dtype),
                                         use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: a corrupt shard
        raise SppError(f"cannot load a causal LM from {name_or_path}: {first_line(exc)}") from exc
    refuse_incomplete_load(directory, info)  # never run on weights transformers initialised randomly
    return model.to(device).eval()


def load_tokenizer(name_or_path: str):
    """Load the model's tokenizer; a model without one is an error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise SppError(f"cannot load a tokenizer from {name_or_path}: {first_line(exc)}") from exc


def enable_checkpointing(model) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def context_length(config) -> int | None:
    """The model's context window from its config, or None if it does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(seqlen: int | None, context: int | None) -> None:
    """Refuse a `--seqlen` longer than the model's context (prune and eval share this one message).

    Raises:
        SppError: `seqlen` is above `context`.
    """
    if seqlen is not None and context is not None and seqlen > context:
        raise SppError(f"--seqlen {seqlen} is above the model's context of {context} tokens")


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks and its dotted name (e.g. `model.layers`).

    Prefers a ModuleList whose entries are the model's `_no_split_modules` classes
    (every HF decoder declares its block there); otherwise the longest ModuleList of
    one class.

    Raises:
        SppError: no such list exists.
    """
    no_split = hf.no_split_module_classes(model)
    best, best_name, best_score = None, "", (-1, -1)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m).__name__ for m in module}
        if len(classes) != 1:
            continue
        score = (int(classes.pop() in no_split), len(module))
        if score > best_score:
            best, best_name, best_score = module, name, score
    if best is None:
        raise SppError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of blocks)")
    return best_name, best


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_moe_gate(name: str) -> bool:
    """A linear layer of an MoE block that scores experts rather than transforming the hidden states: its name
    ends in `gate` (a router kept as nn.Linear, `mlp.gate`; Qwen2-MoE's `shared_expert_gate`, (1, H)), not
    `gate_proj`. Like the routers, these stay dense and are never adapted: a pruned router changes which experts
    every token reaches."""
    return name.rsplit(".", 1)[-1].endswith("gate")


@dataclass(frozen=True, eq=False)
class Target:
    """One weight spp prunes or adapts, whatever its shape: a linear layer's (out, in) weight (GPT-2's Conv1D
    stores it (in, out)) or a fused expert weight (E, out, in); the 2-D case is the fused one with E absent.

    Attributes:
        name: the weight's name: its linear layer's (`model.layers.0.self_attn.q_proj`), or a fused expert
            weight's own (`model.layers.0.mlp.experts.gate_up_proj`); adapters key their tensors `<name>.<tensor>`.
        param: its parameter's name in the model, which keys its keep-mask: `<layer>.weight`, or the fused name.
        module: the module that owns the parameter (the linear layer, or the experts module).
        attr: the parameter's attribute on `module` (`weight`, `gate_up_proj`).
    """

    name: str
    param: str
    module: nn.Module
    attr: str

    @property
    def weight(self) -> nn.Parameter:
        """The parameter, in its storage layout."""
        return getattr(self.module, self.attr)

    @property
    def module_name(self) -> str:
        return self.param.rpartition(".")[0]

    @property
    def layout(self) -> str:
        """`conv1d` for a weight stored (in, out), else `linear` (an expert weight's is `linear`)."""
        return "conv1d" if is_conv1d(self.module) else "linear"

    def out_in(self) -> torch.Tensor:
        """The weight viewed (E?, out, in), whatever its storage layout (a view, not a copy)."""
        return self.weight.t() if is_conv1d(self.module) else self.weight


def block_targets(block: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Every weight spp may prune or adapt inside one decoder block, by name relative to the block: its linear
    layers (nn.Linear and Conv1D), except the gates of a mixture-of-experts block (`is_moe_gate`), then its fused
    expert weights (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Each target's `name` and `param` are
    `prefix` (`model.layers.3.`) followed by the block-relative ones.

    A fused expert weight is a 3-D floating-point parameter (E, out, in) of a module whose name says `expert`
    (transformers 5's experts modules: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-style); its name is the parameter's
    own (no `.weight`). Biases and transposed layouts are refused.

    Raises:
        SppError: an experts module stores its weights (E, in, out) (`is_transposed`, e.g. GPT-OSS) or has
            expert biases, which spp does not handle.
    """
    fused = {}
    for module_name, module in block.named_modules():
        if "expert" not in module_name.rsplit(".", 1)[-1].lower():
            continue
        params = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
        if not params:
            continue
        if getattr(module, "is_transposed", False) or any(p.dim() == 2 for p in module.parameters(recurse=False)):
            raise SppError(f"{module_name} ({type(module).__name__}) stores its expert weights transposed or with "
                           "biases; spp prunes (E, out, in) expert weights without biases only")
        for param in params:
            name = f"{prefix}{module_name}.{param}"
            fused[f"{module_name}.{param}"] = Target(name, name, module, param)
    linear = {name: Target(prefix + name, f"{prefix}{name}.weight", module, "weight")
              for name, module in block.named_modules()
              if (isinstance(module, nn.Linear) or is_conv1d(module)) and not (fused and is_moe_gate(name))}
    return {**linear, **fused}


def decoder_targets(model: nn.Module) -> list[dict[str, Target]]:
    """Per decoder block, in order, its targets by block-relative name (`block_targets`), with full names."""
    prefix, blocks = find_decoder_blocks(model)
    return [block_targets(block, f"{prefix}.{i}.") for i, block in enumerate(blocks)]
