"""Which linear layers `spp prune` prunes, and at what sparsity: --targets, --ignore, sparsity_overrides, OWL.

`plan_layers` resolves the patterns (`spp.patterns`) against the model once, before any weights
are read, and refuses bad choices with one line each. Every other linear layer of the decoder
blocks stays dense and gets no mask entry. A layer selected by a `sparsity_overrides` pattern is
pruned at that pattern's sparsity; the rest at `--sparsity`, or, with `--owl`, at their block's
OWL sparsity (`with_block_sparsities`). OWL's statistic and its mean count only those default
layers, so ignored and overridden layers neither vote nor move. Nothing here touches a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from spp.errors import SppError
from spp.models import decoder_targets
from spp.patterns import match_layers


@dataclass(frozen=True)
class LayerPlan:
    """The pruned layers (full module name -> requested sparsity, model order), their blocks, and the rest.

    Attributes:
        sparsity: full module name -> the sparsity it is pruned at.
        block: full module name -> decoder block index, for every pruned layer.
        overridden: pruned layers whose sparsity a `sparsity_overrides` pattern set (OWL leaves them).
        dense: linear layers of the decoder blocks that stay dense (not targeted, or ignored).
        numel: full module name -> its weight's number of entries, for every pruned layer.
        params: full module name -> its parameter's name (`spp.models.Target.param`), for every layer.
    """

    sparsity: dict[str, float]
    block: dict[str, int]
    overridden: frozenset[str] = frozenset()
    dense: tuple[str, ...] = ()
    numel: dict[str, int] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def in_block(self, index: int, default_only: bool = False) -> list[str]:
        """The pruned layers of block `index` (only those at the default sparsity when `default_only`)."""
        return [n for n, b in self.block.items() if b == index and not (default_only and n in self.overridden)]

    def with_block_sparsities(self, block_sparsity: dict[int, float]) -> "LayerPlan":
        """The plan with every default (not overridden) layer of block l at `block_sparsity[l]`."""
        sparsity = {n: (s if n in self.overridden or self.block[n] not in block_sparsity else block_sparsity[self.block[n]])
                    for n, s in self.sparsity.items()}
        return replace(self, sparsity=sparsity)


def plan_layers(model: nn.Module, cfg) -> LayerPlan:
    """Resolve the `PruneConfig`'s --targets, --ignore and sparsity_overrides against `model` (its weights may be on
    the meta device), at its --sparsity, and check each pruned weight fits its --pattern.

    Raises:
        SppError: an invalid pattern; a pattern that selects no layer (or names one outside the decoder
            blocks); --ignore leaving nothing to prune; an override pattern selecting only dense layers;
            two overrides giving one layer different sparsities; a pruned weight whose input dimension N:M's M
            does not divide.
    """
    targets, ignore = cfg.targets, cfg.ignore
    blocks = decoder_targets(model)
    every = {target.name: target for targets in blocks for target in targets.values()}
    targeted = match_layers(model, targets, "--targets")
    ignored = match_layers(model, ignore, "--ignore") if ignore else {}
    pruned = [full for full in targeted if full not in ignored]
    if not pruned:
        raise SppError(f"--targets {targets} and --ignore {ignore} leave no linear layer to prune")
    chosen: dict[str, tuple[str, float]] = {}  # layer -> (the override pattern, its sparsity)
    for pattern, value in cfg.sparsity_overrides.items():
        selected = match_layers(model, [pattern], "sparsity_overrides")  # invalid, matching nothing, or outside the blocks
        hits = [full for full in pruned if full in selected]
        if not hits:
            raise SppError(f"sparsity_overrides {pattern!r} selects only layers that --targets/--ignore leave dense")
        for full in hits:
            if full in chosen and chosen[full][1] != float(value):
                raise SppError(f"sparsity_overrides {chosen[full][0]!r} ({chosen[full][1]:g}) and {pattern!r} "
                               f"({float(value):g}) both select {full}; give each layer one sparsity")
            chosen[full] = (pattern, float(value))
    _check_shapes(cfg, {full: every[full] for full in pruned})
    return LayerPlan(sparsity={full: chosen[full][1] if full in chosen else cfg.sparsity for full in pruned},
                     block={t.name: i for i, targets in enumerate(blocks) for t in targets.values() if t.name in pruned},
                     overridden=frozenset(chosen), dense=tuple(full for full in every if full not in pruned),
                     numel={full: every[full].weight.numel() for full in pruned},
                     params={full: target.param for full, target in every.items()})


def _check_shapes(cfg, pruned: dict) -> None:
    n_m = cfg.n_m
    for full, target in pruned.items():
        out_features, in_features = target.out_in().shape[-2:]  # of each expert, for an expert weight
        if n_m is not None and in_features % n_m[1]:
            raise SppError(
                f"--pattern {cfg.pattern}: module {full} has weight (out, in) = "
                f"({out_features}, {in_features}); its input dimension {in_features} is not divisible by M={n_m[1]}"
            )
