"""Sparsity-preserving adapters: one small file per kind, one table mapping a config's `adapter:` to it.

Every kind keeps each entry the mask marks pruned at +0.0 bitwise, in training and after merging:

| kind          | file            | effective weight (out, in)  | trained tensors             |
|---------------|-----------------|-----------------------------|-----------------------------|
| `spp`         | `layer.py`      | W ⊙ (1 + s·Â ⊙ β·1ᵀ)        | α (r, in), β (out,)         |
| `masked_lora` | `masked_lora.py`| W + M ⊙ (s·B·A)             | A (rank, in), B (out, rank) |
| `full`        | `full.py`       | M ⊙ W (W trained)           | W (out, in)                 |

Each file has the same entry points, which `ADAPTERS` lists for the shared code in
`spp.adapter.model` (wrapping, saving, loading, in-memory merge), `spp.merge` (streaming merge)
and `spp.train` (the invariant check); that code knows no kind. All of them take W and M in the
(out, in) view (M bool, or None where the kind needs no mask) and the layer's saved tensors by
name (`tensors`, as in `adapter_model.safetensors` without the module prefix). Mixture-of-experts
weights, fused (E, out, in), are adapted by any kind through `spp.adapter.experts`, which applies these
same entry points expert by expert.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from spp.adapter import full, layer, masked_lora


class AdapterKind(NamedTuple):
    """What the shared code needs of one kind (a record, not a framework).

    Attributes:
        layer: the layer class (has `kind`, `base_layer`, `adapter_tensors()`, `merged_weight(keep)`).
        make_layer: (name, base_layer, AdapterConfig, keep in storage layout or None) -> layer.
        tensor_shapes: (out, in, AdapterConfig) -> {tensor name: shape} of one layer's saved tensors.
        effective_weight: (W, keep, tensors, scale) -> the forward's weight, (out, in), W's dtype.
        gradients: (G = dL/dW_eff, W, keep, tensors, scale) -> {tensor name: gradient}.
        merged_weight: (W, keep, tensors, scale) -> the merged weight, (out, in), W's dtype,
            +0.0 bitwise wherever keep is False.
        needs_mask: every target layer must have a keep-mask (`masks.safetensors` entry).
    """

    layer: type
    make_layer: Callable
    tensor_shapes: Callable
    effective_weight: Callable
    gradients: Callable
    merged_weight: Callable
    needs_mask: bool


ADAPTERS: dict[str, AdapterKind] = {
    "spp": AdapterKind(layer.SPPLinear, layer.make_layer, layer.tensor_shapes, layer.effective, layer.gradients,
                       layer.merged, needs_mask=False),
    "masked_lora": AdapterKind(masked_lora.MaskedLoRALinear, masked_lora.make_layer, masked_lora.tensor_shapes,
                               masked_lora.effective, masked_lora.gradients, masked_lora.merged, needs_mask=True),
    "full": AdapterKind(full.FullLinear, full.make_layer, full.tensor_shapes, full.effective, full.gradients,
                        full.merged, needs_mask=True),
}

# The learning rate `spp train` uses when the config gives none (AdamW, 7B-class models, Alpaca-style data).
# Tiny models want far larger rates (docs/recovery.md; configs/tinystories.yaml carries its own per kind).
DEFAULT_LEARNING_RATE: dict[str, float] = {
    "spp": 4e-3,  # the SPP paper and reference code (Lu et al., ICML 2024: LLaMA 7B-70B on Alpaca)
    "masked_lora": 3e-4,  # LoRA's usual rate on LLaMA-7B: tloen/alpaca-lora finetune.py (learning_rate=3e-4)
    "full": 2e-5,  # full fine-tuning of LLaMA-7B on Alpaca: tatsu-lab/stanford_alpaca README (--learning_rate 2e-5)
}
