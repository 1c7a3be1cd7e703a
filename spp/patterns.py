r"""Layer name patterns: the one language `spp prune --targets/--ignore` and `spp train`'s `target_modules` share.

A pattern selects linear layers inside the decoder blocks, and a mixture-of-experts block's fused
expert weights by their parameter names (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; the router is
neither): the targets of `spp.models.block_targets`. It is tried against both the layer's
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
from fnmatch import fnmatchcase

from torch import nn

from spp.errors import SppError
from spp.io.reader import Checkpoint
from spp.models import Target, decoder_targets, find_decoder_blocks

REGEX_PREFIX = "re:"


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


def decoder_weights(checkpoint: Checkpoint) -> list[str]:
    """The saved tensors of every weight `spp prune` could prune (`spp.models.decoder_targets`), in model order."""
    return [saved for targets in decoder_targets(checkpoint.model) for target in targets.values()
            for saved in checkpoint.saved_tensors_of(target.param)]


def _outside_blocks(model: nn.Module) -> list[str]:
    """Names of the modules with their own weight outside the decoder blocks (embeddings, norms, lm_head)."""
    prefix, _ = find_decoder_blocks(model)
    return [name for name, module in model.named_modules()
            if name and not (name == prefix or name.startswith(prefix + "."))
            and getattr(module, "weight", None) is not None]


def match_layers(model: nn.Module, patterns: list[str], source: str, each: bool = True) -> dict[str, Target]:
    """The decoder-block targets that any of `patterns` selects (full name -> `spp.models.Target`), in model order.

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
    named = [(relative, target) for targets in decoder_targets(model) for relative, target in targets.items()]
    predicates = [(p, compile_pattern(p, source)) for p in patterns]
    chosen: set[str] = set()
    for pattern, matches in predicates:
        hits = {target.name for relative, target in named if matches(relative) or matches(target.name)}
        if not hits and each:
            _raise_no_match(model, named, [(pattern, matches)], source)
        chosen |= hits
    if not chosen:
        _raise_no_match(model, named, predicates, source)
    return {target.name: target for _, target in named if target.name in chosen}


def _raise_no_match(model, named, predicates, source) -> None:
    shown = [p for p, _ in predicates]
    what = repr(shown[0]) if len(shown) == 1 else str(shown)
    outside = [name for name in _outside_blocks(model) if any(m(name) for _, m in predicates)]
    if outside:
        raise SppError(f"{source} {what} names {outside[0]}, which is outside the decoder blocks; spp prunes and "
                       "adapts only the linear layers inside them (embeddings and lm_head stay dense)")
    names = sorted({relative for relative, _ in named})
    raise SppError(f"{source} {what} match no linear layer in the decoder blocks (their names are: {', '.join(names)})")
