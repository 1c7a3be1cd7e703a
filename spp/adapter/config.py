"""`AdapterConfig`: the SPP adapter's settings and their `adapter_config.json` form.

The adapter has r row groups (`spp_row_groups`) and a scale s = `lora_alpha` / `lora_r`.
It owns no tensors; `spp.adapter.model` applies it to a model and writes the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from spp.errors import SppError

ADAPTER_TYPE = "SPP"


@dataclass
class AdapterConfig:
    """Settings of the SPP adapter (Lu et al., ICML 2024).

    Attributes:
        spp_row_groups: r, the number of rows of α (r × in); row k of α is shared by the
            k-th contiguous block of output rows.
        lora_alpha: numerator of the scale s = lora_alpha / lora_r.
        lora_r: denominator of the scale. In SPP `lora_alpha` and `lora_r` only set s
            (defaults 16 / 8 = 2, as in the reference code); `lora_r` is *not* a rank.
        lora_dropout: must be 0. SPP computes W ⊙ (1 + s·Â ⊙ β) in one matrix product, so
            there is no separate adapter branch whose input could be dropped out.
        target_modules: fnmatch patterns over a linear layer's name relative to its decoder
            block (`self_attn.q_proj`, `*proj`, `mlp.*`); `*` adapts every linear layer
            inside the decoder blocks.
        base_model: the pruned model directory the adapter was trained on.
        mask_sha256: sha256 of that directory's `masks.safetensors` (merge refuses another base).
    """

    spp_row_groups: int = 16
    lora_alpha: float = 16.0
    lora_r: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["*"])
    base_model: str = ""
    mask_sha256: str = ""

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if self.spp_row_groups < 1:
            raise SppError(f"spp_row_groups={self.spp_row_groups} must be at least 1")
        if self.lora_r <= 0:
            raise SppError(f"lora_r={self.lora_r} must be positive (it only sets the scale lora_alpha / lora_r)")
        if self.lora_dropout != 0:
            raise SppError(
                f"lora_dropout={self.lora_dropout} is not supported: SPP folds the adapter into the weight and "
                "does one matrix product, so there is no separate adapter branch to drop out; set lora_dropout: 0"
            )
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise SppError(f"target_modules={self.target_modules!r} must be a non-empty list of name patterns")

    @property
    def scale(self) -> float:
        """s = lora_alpha / lora_r."""
        return self.lora_alpha / self.lora_r

    def to_json(self) -> dict:
        """The `adapter_config.json` object: every field, plus the adapter type and the scale."""
        return {"peft_type": ADAPTER_TYPE, **dataclasses.asdict(self), "scale": self.scale}

    @classmethod
    def from_json(cls, obj: dict, source: str = "adapter config") -> "AdapterConfig":
        """Inverse of `to_json`.

        Raises:
            SppError: not an SPP adapter, an unknown key, or a value of the wrong type (names `source`).
        """
        from spp.config import merge_into

        kind = obj.get("peft_type")
        if kind != ADAPTER_TYPE:
            raise SppError(f"{source} is not an SPP adapter (peft_type={kind!r}, expected {ADAPTER_TYPE!r})")
        values = {k: v for k, v in obj.items() if k not in ("peft_type", "scale")}
        return merge_into(cls, [(source, values)])
