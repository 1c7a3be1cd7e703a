"""Load Hugging Face causal LMs and find their decoder blocks and linear layers, for any family.

Nothing here is specific to one architecture: decoder blocks are the longest
`nn.ModuleList` whose entries are the model's no-split modules (or, failing that,
all of one class), and linear layers are found by type (`nn.Linear` and GPT-2's
`Conv1D`, whose weight is stored (in, out)).
"""

from __future__ import annotations

import torch
from torch import nn

from spp.errors import SppError

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


def load_config(name_or_path: str):
    """Load a model's config (cheap). A stage reads its model with `spp.io.reader.read_checkpoint`, which calls this."""
    from transformers import AutoConfig

    from spp.io.reader import local_directory

    path = local_directory(name_or_path)
    if not (path / "config.json").is_file():
        raise SppError(f"model {name_or_path} holds no model (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SppError(f"cannot load a model config from {name_or_path}: {str(exc).splitlines()[0]}") from exc


def load_model(name_or_path: str, dtype: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM in eval mode on `device` (prune keeps it on the CPU and moves one block at a time).

    Stages pass the directory of a `Checkpoint` (`spp.io.reader`), already checked; weights are read from
    safetensors only.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from spp.io.reader import local_directory

    try:
        model = AutoModelForCausalLM.from_pretrained(local_directory(name_or_path), dtype=resolve_dtype(dtype),
                                                     use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: a corrupt shard
        raise SppError(f"cannot load a causal LM from {name_or_path}: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()


def load_tokenizer(name_or_path: str):
    """Load the model's tokenizer; a model without one is an error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise SppError(f"cannot load a tokenizer from {name_or_path}: {str(exc).splitlines()[0]}") from exc


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
    no_split = set(getattr(model, "_no_split_modules", None) or [])
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


def find_linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """All linear layers (nn.Linear and Conv1D) inside a block, by name relative to the block.

    Raises:
        SppError: the block holds fused 3-D expert parameters (mixture of experts), which spp does not prune yet.
    """
    layers = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            layers[name] = module
    for name, param in block.named_parameters():
        if param.dim() == 3 and "expert" in name.lower():
            raise SppError(
                f"{name} is a fused mixture-of-experts parameter of shape {tuple(param.shape)}; "
                "spp does not prune fused expert weights yet"
            )
    return layers


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight viewed as (out, in), whatever its storage layout (a view, not a copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def layer_layout(module: nn.Module) -> str:
    """`conv1d` for weights stored (in, out), else `linear`."""
    return "conv1d" if is_conv1d(module) else "linear"
