"""`AdapterConfig`: the settings of a sparsity-preserving adapter and their `adapter_config.json` form.

Three kinds (`kind`), all keeping every pruned entry +0.0:
  - `spp`: W ⊙ (1 + s·Â ⊙ β·1ᵀ) with r row groups (`spp_row_groups`), s = `lora_alpha` / `lora_r`;
  - `masked_lora`: W + M ⊙ (s·B·A) with rank `rank`, s = `lora_alpha` / `rank`;
  - `full`: the kept entries of W themselves (no scale).
It owns no tensors; `spp.adapter.model` applies it to a model and writes the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from spp.adapter import ADAPTERS
from spp.errors import SppError
from spp.typed import merge_into

ADAPTER_TYPE = "SPP"  # `peft_type` of every spp adapter, whatever its kind (PEFT cannot load any of them)
KINDS = tuple(ADAPTERS)


def check_kind(kind, source: str = "adapter config") -> None:
    """Raise a one-line SppError unless `kind` is one of KINDS (names it and the valid kinds)."""
    if kind not in KINDS:
        raise SppError(f"{source}: unknown adapter kind {kind!r} (valid kinds: {', '.join(KINDS)})")


@dataclass
class AdapterConfig:
    """Settings of one adapter.

    Attributes:
        kind: `spp` (Lu et al., ICML 2024), `masked_lora` (SQFT's SparsePEFT, LoSA) or
            `full` (masked full fine-tuning); see `spp.adapter` for the math of each.
        spp_row_groups: SPP only. r, the number of rows of α (r × in); row k of α is shared
            by the k-th contiguous block of output rows.
        rank: masked LoRA only. r, the rank of B (out × r) · A (r × in).
        lora_alpha: numerator of the scale: s = lora_alpha / lora_r (SPP) or lora_alpha / rank
            (masked LoRA).
        lora_r: SPP only, the denominator of its scale. In SPP `lora_alpha` and `lora_r` only
            set s (defaults 16 / 8 = 2, as in the reference code); `lora_r` is *not* a rank.
        lora_dropout: must be 0. Every kind computes its effective weight and does one matrix
            product, so there is no separate adapter branch whose input could be dropped out.
        target_modules: layer name patterns (`spp.patterns`, shared with `spp prune --targets`):
            fnmatch over the name relative to its decoder block (`self_attn.q_proj`, `*proj`,
            `mlp.*`) or the full name, or `re:REGEX`; `*` adapts every linear layer inside the
            decoder blocks.
        adapt_unpruned: also adapt target layers that have no entry in the keep-masks (layers
            `spp prune` left dense with --targets/--ignore). False: they stay as they are.
        base_model: the pruned model directory the adapter was trained on.
        mask_sha256: sha256 of that directory's `masks.safetensors` (merge refuses another base).
    """

    kind: Literal["spp", "masked_lora", "full"] = "spp"
    spp_row_groups: int = 16
    rank: int = 8
    lora_alpha: float = 16.0
    lora_r: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["*"])
    adapt_unpruned: bool = False
    base_model: str = ""
    mask_sha256: str = ""

    def __post_init__(self):
        check_kind(self.kind)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if self.spp_row_groups < 1:
            raise SppError(f"spp_row_groups={self.spp_row_groups} must be at least 1")
        if self.rank < 1:
            raise SppError(f"rank={self.rank} must be at least 1 (the rank of masked LoRA's B·A)")
        if self.lora_r <= 0:
            raise SppError(f"lora_r={self.lora_r} must be positive (it only sets SPP's scale lora_alpha / lora_r)")
        if self.lora_dropout != 0:
            raise SppError(
                f"lora_dropout={self.lora_dropout} is not supported: spp folds the adapter into the weight and "
                "does one matrix product, so there is no separate adapter branch to drop out; set lora_dropout: 0"
            )
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise SppError(f"target_modules={self.target_modules!r} must be a non-empty list of name patterns")
        from spp.patterns import compile_pattern

        for pattern in self.target_modules:
            compile_pattern(pattern, "target_modules")

    @property
    def scale(self) -> float:
        """s: lora_alpha / lora_r for SPP, lora_alpha / rank for masked LoRA, 1 for `full` (unused): the kind's."""
        return ADAPTERS[self.kind].scale(self)

    def describe(self, directory) -> str:
        """`adapter DIR (trained on BASE)` for messages that compare it with a base model."""
        return f"adapter {directory}" + (f" (trained on {self.base_model})" if self.base_model else "")

    def to_json(self) -> dict:
        """The `adapter_config.json` object: every field (`kind` among them), plus the adapter type and the scale."""
        return {"peft_type": ADAPTER_TYPE, **dataclasses.asdict(self), "scale": self.scale}

    @classmethod
    def from_json(cls, obj: dict, source: str = "adapter config") -> "AdapterConfig":
        """Inverse of `to_json`. A file without `kind` (written before there were kinds) is an SPP adapter.

        Raises:
            SppError: not an spp adapter, an unknown kind, an unknown key, or a value of the wrong
                type (names `source`).
        """
        peft_type = obj.get("peft_type")
        if peft_type != ADAPTER_TYPE:
            raise SppError(f"{source} is not an SPP adapter (peft_type={peft_type!r}, expected {ADAPTER_TYPE!r})")
        check_kind(obj.get("kind", "spp"), source)
        values = {k: v for k, v in obj.items() if k not in ("peft_type", "scale")}
        return merge_into(cls, [(source, values)])
