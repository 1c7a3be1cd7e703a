"""A sparse checkpoint stored compressed: each masked weight as its kept values only, indexed by the mask file.

A pruned or merged directory already holds the bit-packed keep-mask of every pruned tensor
(`spp/masks.safetensors`, `spp.io.maskfile`), so the zeros need not be stored: a weight W with
keep-mask M is written as `W[M]`, its kept entries in row-major order of the stored tensor
(kept entries that happen to be zero included), and restored as zeros with `W[M]` scattered
back. Every pruned entry of an spp output is +0.0 (`spp verify`), so the restore is bit-exact.
Bytes per weight at sparsity s: (1 − s)·b for the values plus 1/8 for the mask, against b
dense (fp32, s = 0.5: 2.125 / 4 = 0.53×).

Layout of a compressed directory: for each weight shard `NAME.safetensors` of the source, a
file `NAME.spz` in safetensors format (masked tensors as 1-D value vectors, every other tensor
as it is; its metadata records the compressed names with their shapes and the shard's own
metadata); the source's shard index and manifest parked as `NAME.source` (they describe the restored files);
the mask file at `spp/masks.safetensors` (an older source's top-level `masks.safetensors` moved there), every
other file (config, tokenizer) unchanged. transformers cannot load it: restore
it first (`spp export --dense`), which gives back the source directory file for file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spp.errors import SppError
from spp.io.finite import cast_weight, check_finite
from spp.sparsity import check_pruned_zero

FORMAT = "spp-compressed"
VERSION = "1"
SUFFIX = ".spz"
PARKED = ".source"  # the source's shard index and manifest are kept as NAME.source: they describe the restored files


def compress_weight(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept entries of `weight` (any shape, `keep` bool of the same shape), 1-D in row-major order."""
    if weight.shape != keep.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(keep.shape)} differ in shape")
    return weight[keep].contiguous()


def decompress_weight(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of `compress_weight`: +0.0 everywhere, `values` at the kept positions (row-major).

    Raises:
        ValueError: `values` does not have one entry per kept position.
    """
    n_kept = int(keep.sum())
    if values.dim() != 1 or values.numel() != n_kept:
        raise ValueError(f"{values.numel()} values for a mask with {n_kept} kept entries")
    out = torch.zeros(keep.shape, dtype=values.dtype)
    out[keep] = values
    return out


def compress_shard(shard: Path, destination: Path, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Write `shard` compressed to `destination` (`*.spz`); returns bytes {dense, values} of its masked tensors.

    Raises:
        SppError: a tensor holds a NaN or ±inf (`spp.io.finite`), or a pruned entry is not +0.0 (its value would
            be lost: the restore could not be exact).
    """
    tensors = load_file(str(shard))
    with safe_open(str(shard), "pt") as f:
        shard_metadata = f.metadata() or {}
    out, shapes, dense, values_bytes = {}, {}, 0, 0
    for name, tensor in tensors.items():
        check_finite(tensor, name, str(shard))
        if name in masks:
            check_pruned_zero(tensor, masks[name], lambda lost, _: (
                f"{shard}: {name} has {lost} pruned entries that are not +0.0, so it cannot be "
                "restored exactly from its kept values (run `spp verify` on it)"))
            out[name] = compress_weight(tensor, masks[name])
            shapes[name] = list(tensor.shape)
            dense += tensor.numel() * tensor.element_size()
            values_bytes += out[name].numel() * out[name].element_size()
        else:
            out[name] = tensor
    metadata = {"format": FORMAT, "version": VERSION, "compressed": json.dumps(shapes, sort_keys=True),
                "source_metadata": json.dumps(shard_metadata, sort_keys=True)}
    save_file(out, str(destination), metadata=metadata)
    return {"dense": dense, "values": values_bytes}


def decompress_shard(packed: Path, destination: Path, masks: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> None:
    """Restore one `*.spz` file to the safetensors shard it was made from (same tensors, same metadata; with
    `dtype`, every floating tensor cast to it, `spp.io.finite.cast_weight`).

    Raises:
        SppError: not an spp compressed file, a compressed tensor without a matching mask entry, or a tensor
            holding a NaN or ±inf (`spp.io.finite`; compressing refuses them, so the file changed since).
    """
    with safe_open(str(packed), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise SppError(f"{packed} is not an spp compressed file (metadata format={metadata.get('format')!r})")
    shapes = json.loads(metadata["compressed"])
    tensors = load_file(str(packed))
    for name, tensor in tensors.items():  # the kept values of a masked tensor, 1-D: checked before the scatter
        check_finite(tensor, name, str(packed))
    for name, shape in shapes.items():
        keep = masks.get(name)
        if keep is None or list(keep.shape) != shape:
            raise SppError(f"{packed}: {name} is compressed but the mask file has no entry of shape {shape} for it")
        try:
            tensors[name] = decompress_weight(tensors[name], keep)
        except ValueError as exc:
            raise SppError(f"{packed}: {name}: {exc}") from exc
    if dtype is not None:
        tensors = {name: cast_weight(tensor, dtype, name, str(packed)) for name, tensor in tensors.items()}
    save_file(tensors, str(destination), metadata=json.loads(metadata["source_metadata"]) or None)
