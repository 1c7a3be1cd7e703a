r"""Layer name patterns: the one language `spp prune --targets/--ignore` and `spp train`'s `target_modules` share.

A pattern selects linear layers inside the decoder blocks, and a mixture-of-experts block's fused
expert weights by their parameter names (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`:
`spp.models.ExpertWeight`; the router is neither). It is tried against both the layer's
name relative to its block (`self_attn.q_proj`, `mlp.*`) and its full module name
(`model.layers.0.mlp.down_proj`, so one block can be named). A plain pattern is an fnmatch pattern
(`*`, `?`, `[...]`) over the whole name; a pattern starting with `re:` is a Python regular
expression that must match the whole name (`re:.*\.(q|k)_proj`, `re:model\.layers\.(0|5)\..*`), as
llm-compressor marks them. Nothing outside the decoder blocks (embeddings, final norm, `lm_head`)
is ever selected: a pattern naming only such a module is an error that says so. This module
knows modules and names only; what is done to the chosen layers is the caller's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from spp.errors import SppError
from spp.io.reader import Checkpoint
from spp.models import find_decoder_blocks, find_expert_weights, find_linear_layers, weight_name

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer (or fused expert weight) of a decoder block: block index, name relative to the block,
    the module (or `spp.models.ExpertWeight`)."""

    block: int
    name: str
    module: nn.Module


def compile_pattern(pattern: str, source: str):
    """A predicate name -> bool for one pattern.

    Raises:
        SppError: an invalid regular expression or an empty pattern (names `source`).
    """
    body = pattern[len(REGEX_PREFIX):] if isinstance(pattern, str) and pattern.startswith(REGEX_PREFIX) else pattern
    if not isinstance(body, str) or not body:
        raise SppError(f"{source}: {pattern!r} is not a layer name pattern (use fnmatch such as 'mlp.*', or 're:REGEX')")
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as exc:
            raise SppError(f"{source}: {pattern!r} is not a valid regular expression ({exc})") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatchcase(name, pattern)


def linear_layers(model: nn.Module) -> dict[str, LinearLayer]:
    """Every linear layer and expert weight inside the decoder blocks, by full name, in model order."""
    prefix, blocks = find_decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": LinearLayer(i, name, layer)
            for i, block in enumerate(blocks)
            for name, layer in {**find_linear_layers(block), **find_expert_weights(block)}.items()}


def decoder_weights(checkpoint: Checkpoint) -> list[str]:
    """The saved tensors of every weight `spp prune` could prune (the linear layers and expert weights of the
    decoder blocks, `linear_layers`), in model order."""
    return [saved for full, layer in linear_layers(checkpoint.model).items()
            for saved in checkpoint.saved_tensors_of(weight_name(full, layer.module))]


def _outside_blocks(model: nn.Module) -> list[str]:
    """Names of the modules with their own weight outside the decoder blocks (embeddings, norms, lm_head)."""
    prefix, _ = find_decoder_blocks(model)
    return [name for name, module in model.named_modules()
            if name and not (name == prefix or name.startswith(prefix + "."))
            and getattr(module, "weight", None) is not None]


def match_layers(model: nn.Module, patterns: list[str], source: str, each: bool = True) -> dict[str, LinearLayer]:
    """The decoder-block linear layers that any of `patterns` selects (full name -> layer), in model order.

    Args:
        model: a causal LM (weights may be on the meta device).
        patterns: fnmatch or `re:` patterns (see the module docstring).
        source: the flag or key the patterns came from, for messages (`--ignore`, `target_modules`).
        each: every pattern must select a layer (else only the union must be non-empty).

    Raises:
        SppError: an invalid pattern; a pattern (each=True) or all of them (each=False) selecting no
            layer, naming the module outside the decoder blocks it names if it does (embeddings,
            lm_head), else the available block-relative names.
    """
    layers = linear_layers(model)
    predicates = [(p, compile_pattern(p, source)) for p in patterns]
    chosen: dict[str, LinearLayer] = {}
    for pattern, matches in predicates:
        hits = [full for full, layer in layers.items() if matches(layer.name) or matches(full)]
        if not hits and each:
            _raise_no_match(model, layers, [(pattern, matches)], source)
        chosen.update((full, layers[full]) for full in hits)
    if not chosen:
        _raise_no_match(model, layers, predicates, source)
    return {full: layer for full, layer in layers.items() if full in chosen}


def _raise_no_match(model, layers, predicates, source) -> None:
    shown = [p for p, _ in predicates]
    what = repr(shown[0]) if len(shown) == 1 else str(shown)
    outside = [name for name in _outside_blocks(model) if any(m(name) for _, m in predicates)]
    if outside:
        raise SppError(f"{source} {what} names {outside[0]}, which is outside the decoder blocks; spp prunes and "
                       "adapts only the linear layers inside them (embeddings and lm_head stay dense)")
    names = sorted({layer.name for layer in layers.values()})
    raise SppError(f"{source} {what} match no linear layer in the decoder blocks (their names are: {', '.join(names)})")
