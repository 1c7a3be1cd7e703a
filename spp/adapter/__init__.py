"""Sparsity-preserving adapters: one small file of pure functions per kind, one table mapping a config's `adapter:`
to it, one module that applies any of them (`spp.adapter.weight.AdaptedWeight`).

Every kind keeps each entry the mask marks pruned at +0.0 bitwise, in training and after merging:

| kind          | file            | effective weight (out, in)  | trained tensors             |
|---------------|-----------------|-----------------------------|-----------------------------|
| `spp`         | `layer.py`      | W ⊙ (1 + s·Â ⊙ β·1ᵀ)        | α (r, in), β (out,)         |
| `masked_lora` | `masked_lora.py`| W + M ⊙ (s·B·A)             | A (rank, in), B (out, rank) |
| `full`        | `full.py`       | M ⊙ W (W trained)           | W (out, in)                 |

Each file has the same entry points, which `ADAPTERS` lists for the shared code in `spp.adapter.weight` (the one
module and autograd function), `spp.adapter.model` (wrapping, saving, loading, in-memory merge), `spp.merge`
(streaming merge), `spp.train` and `spp.report`; that code knows no kind. The weight functions take one (out, in)
matrix W and its mask M (bool or uint8, or None where the kind needs no mask) in the (out, in) view and the saved
tensors by name (`tensors`, as in `adapter_model.safetensors` without the weight's prefix); a fused expert weight
(E, out, in) is adapted by applying them expert by expert.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from spp.adapter import full, layer, masked_lora


class AdapterKind(NamedTuple):
    """What the shared code needs of one kind (a record, not a framework).

    Attributes:
        label: its name in reports (`SPP`, `masked LoRA`, `full sparse FT`).
        scale: AdapterConfig -> s, the scale of its update.
        size: AdapterConfig -> {name: value}, its size for a manifest (rank, row groups; empty for `full`).
        tensor_shapes: (out, in, AdapterConfig) -> {tensor name: shape} of one matrix's saved tensors.
        init: (W (out, in), AdapterConfig, weight name) -> {tensor name: initial value} for that matrix (the kind's
            random draws; raises SppError naming the weight where it does not fit).
        state: (W, keep or None, weight name) -> the per-weight state it keeps (or None), any shape of W, storage
            layout (masked LoRA: the kept zeros' indices; full: the uint8 mask).
        keep: (W, state) -> the keep-mask M rebuilt from W and the state (storage layout), or None.
        effective_weight: (W, keep, tensors, scale) -> the forward's weight, (out, in), W's dtype.
        gradients: (G = dL/dW_eff, W, keep, tensors, scale) -> {tensor name: gradient} (G may be overwritten).
        merged_weight: (W, keep, tensors, scale) -> the merged weight, (out, in), W's dtype,
            +0.0 bitwise wherever keep is False.
        needs_mask: every target weight must have a keep-mask (`masks.safetensors` entry).
        master: the name of the tensor that is the weight itself, trained (`full`), else None.
        shard_state: the state is a mask in the weight's layout, sharded with it under FSDP2.
        gradient_in_weight_layout: compute G = dyᵀ·x in W's storage layout (for its elementwise passes).
    """

    label: str
    scale: Callable
    size: Callable
    tensor_shapes: Callable
    init: Callable
    state: Callable
    keep: Callable
    effective_weight: Callable
    gradients: Callable
    merged_weight: Callable
    needs_mask: bool
    master: str | None = None
    shard_state: bool = False
    gradient_in_weight_layout: bool = False


def _kind(module, **flags) -> AdapterKind:
    return AdapterKind(module.LABEL, module.scale, module.size, module.tensor_shapes, module.init, module.state,
                       module.keep, module.effective, module.gradients, module.merged, **flags)


ADAPTERS: dict[str, AdapterKind] = {
    "spp": _kind(layer, needs_mask=False),
    "masked_lora": _kind(masked_lora, needs_mask=True, gradient_in_weight_layout=True),
    "full": _kind(full, needs_mask=True, master="full_weight", shard_state=True),
}

# The learning rate `spp train` uses when the config gives none (AdamW, 7B-class models, Alpaca-style data).
# Tiny models want far larger rates (docs/recovery.md; configs/tinystories.yaml carries its own per kind).
DEFAULT_LEARNING_RATE: dict[str, float] = {
    "spp": 4e-3,  # the SPP paper and reference code (Lu et al., ICML 2024: LLaMA 7B-70B on Alpaca)
    "masked_lora": 3e-4,  # LoRA's usual rate on LLaMA-7B: tloen/alpaca-lora finetune.py (learning_rate=3e-4)
    "full": 2e-5,  # full fine-tuning of LLaMA-7B on Alpaca: tatsu-lab/stanford_alpaca README (--learning_rate 2e-5)
}
