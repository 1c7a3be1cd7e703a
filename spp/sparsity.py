"""The rules of a sparse weight, stated once: every entry its keep-mask prunes is +0.0 bitwise, and how
sparsity is counted.

Pure tensor functions; nothing here reads files or knows a stage. `add_adapter` (and the masked-LoRA kind's `state`),
`spp train` (on the effective weights, gathered when sharded, expert by expert for fused expert weights),
`spp merge` (on the written shards), `spp verify` and `spp export` check the invariant with
`check_pruned_zero`; `spp prune`, `spp verify`, `spp merge` and `spp eval` count with `mask_stats`,
`sparsity_stats`, `tally` and `block_tallies`. Why +0.0 and not any zero: a −0.0 is what `W * M` leaves
where W < 0, and it breaks byte-identical restores and the +0.0 + (±0.0) = +0.0 argument the adapters rely on.

Shapes: a weight has any shape ((out, in), Conv1D's (in, out), a fused expert weight's (E, out, in)); its
keep-mask has the same shape, bool or uint8, 1 = keep.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from spp.errors import SppError


def pruned_is_positive_zero(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool, weight's shape: True where the entry is kept or is bitwise +0.0 (so -0.0 and NaN fail)."""
    w = weight.detach()
    plus_zero = (w == 0) & ~torch.signbit(w)
    return keep | plus_zero


def check_pruned_zero(weight: torch.Tensor, keep: torch.Tensor, message: Callable[[int, tuple[int, ...]], str],
                      error: type[Exception] = SppError, signed: bool = True) -> None:
    """Raise `error(message(count, first))` if an entry `keep` prunes is not +0.0 bitwise.

    Args:
        weight: any shape. keep: its keep-mask (moved to weight's device).
        message: (how many pruned entries break the rule, the index of the first in row-major order) -> the text.
        error: `SppError` where the input is at fault (a base or checkpoint that breaks its mask),
            `RuntimeError` where only a bug in spp could break it.
        signed: False accepts -0.0 (the value zero, not its sign): the masked-LoRA kind's own check, which
            `add_adapter` precedes with the bitwise one.

    Raises:
        error: as above.
    """
    keep = keep.to(device=weight.device, dtype=torch.bool)
    bad = ~pruned_is_positive_zero(weight, keep) if signed else (weight.detach() != 0) & ~keep
    if bool(bad.any()):
        raise error(message(int(bad.sum()), tuple(bad.nonzero()[0].tolist())))


def check_base_weight(name: str, weight: torch.Tensor, keep: torch.Tensor) -> None:
    """The rule an adapter's base must meet before training or merging: `keep` has weight's shape and every entry
    it prunes is +0.0 in weight. spp never re-masks a base, so one that breaks its mask is refused, not repaired.

    Raises:
        SppError: the shapes differ, or pruned entries are not +0.0 (how many, naming `name`).
    """
    if tuple(keep.shape) != tuple(weight.shape):
        raise SppError(f"{name}: mask shape {tuple(keep.shape)} does not match weight shape {tuple(weight.shape)}")
    check_pruned_zero(weight, keep, lambda count, _: (
        f"{name}: {count} entries the mask marks pruned are not +0.0 in the base weight; "
        "this base is not the pruned model the mask belongs to (spp never re-masks it)"))


def fraction(part: float, whole: float) -> float:
    """part / whole, 0.0 for an empty whole."""
    return part / whole if whole else 0.0


def mask_stats(keep: torch.Tensor) -> dict:
    """Counts of one keep-mask (bool): entries, pruned entries and their fraction."""
    total = keep.numel()
    pruned = int((~keep).sum())
    return {"numel": total, "pruned": pruned, "sparsity": fraction(pruned, total)}


def sparsity_stats(weight: torch.Tensor, keep: torch.Tensor) -> dict:
    """`mask_stats` plus `kept_zero`: the kept entries of `weight` that happen to be zero (counted, not pruned)."""
    return {**mask_stats(keep), "kept_zero": int(((weight == 0) & keep).sum())}


def tally(stats: Iterable[Mapping]) -> dict:
    """The sums of several tensors' stats (`mask_stats` or `sparsity_stats`) and their sparsity; `kept_zero`
    sums where the stats count it."""
    stats = list(stats)
    numel = sum(s["numel"] for s in stats)
    pruned = sum(s["pruned"] for s in stats)
    return {"numel": numel, "pruned": pruned, "sparsity": fraction(pruned, numel),
            "kept_zero": sum(s.get("kept_zero", 0) for s in stats)}


def block_name(tensor_name: str) -> str:
    """The decoder block a tensor belongs to: its name up to the first numeric component (`model.layers.3`)."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return tensor_name


def block_tallies(stats: Mapping[str, Mapping], keys: tuple[str, ...] = ("numel", "pruned")) -> dict[str, dict]:
    """Per decoder block (`block_name` of each tensor name), the sums of `keys` over its tensors' stats, in the
    order the blocks first appear."""
    blocks: dict[str, dict] = {}
    for name, s in stats.items():
        row = blocks.setdefault(block_name(name), dict.fromkeys(keys, 0))
        for key in keys:
            row[key] += s[key]
    return blocks
