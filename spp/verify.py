"""`spp verify DIR`: check a checkpoint against its mask file and manifest, one shard at a time.

Checks, in order: the directory reads as a checkpoint (`spp.io.reader.read_checkpoint`: the
manifest, names and shapes as transformers resolves them, whole shards, the mask file's sha256
equal to the manifest's `mask_sha256`, every mask naming a saved tensor of its shape); every
file the manifest lists exists with the recorded sha256; every saved weight, masked or not, is
finite (no NaN, no ±inf: `spp.io.finite`); each entry the mask marks pruned is +0.0 bitwise
(-0.0 fails); N:M masks keep at most N in every group of M inputs when the manifest says
N:M; a mixture-of-experts weight has a mask for every saved expert tensor or for none; and the
pruned counts agree with the manifest's per-module record. Weights are read
one tensor at a time from each shard, so memory stays at one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spp.errors import SppError


@dataclass
class VerifyReport:
    """What `verify_checkpoint` checked: sparsity per block (name, numel, pruned) and in total."""

    directory: Path
    pattern: str
    tensors_checked: int
    files_checked: int
    blocks: list[tuple[str, int, int]]
    total_sparsity: float
    kept_zero: int
    requested_blocks: dict[str, float] = field(default_factory=dict)  # the manifest's per-block requested sparsity
    # the manifest's per-block mean relative reconstruction error, and over all layers, where `spp prune` recorded it
    block_errors: dict[str, float] = field(default_factory=dict)
    mean_error: float | None = None


def _check_files(directory: Path, outputs: dict[str, str]) -> int:
    from spp.io.checkpoint import safetensors_files, sha256_file

    for rel, expected in outputs.items():
        path = directory / rel
        if not path.is_file():
            raise SppError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise SppError(f"{path} has sha256 {actual[:12]}… but the manifest records {expected[:12]}…")
    for shard in safetensors_files(directory):
        if shard.relative_to(directory).as_posix() not in outputs:
            raise SppError(f"{shard} is a weight shard the manifest does not list")
    return len(outputs)


def _check_tensor(name: str, weight, keep, layout: str, n_m) -> None:
    """Raise naming `name` if a pruned entry is not +0.0 or the N:M pattern is broken."""
    from spp.prune.masks import is_nm_valid
    from spp.sparsity import check_pruned_zero

    if tuple(weight.shape) != tuple(keep.shape):
        raise SppError(f"{name}: the mask has shape {tuple(keep.shape)} but the weight has {tuple(weight.shape)}")
    check_pruned_zero(weight, keep, lambda count, first: (
        f"{name}: {count} entries the mask marks pruned are not +0.0 (first at {first}: {weight[first].item()!r})"))
    if n_m is not None:
        keep_out_in = keep.t() if layout == "conv1d" else keep
        if not is_nm_valid(keep_out_in, *n_m):
            raise SppError(f"{name}: the mask keeps more than {n_m[0]} in some group of {n_m[1]} inputs")


def verify_checkpoint(directory: Path) -> VerifyReport:
    """Check an `spp` checkpoint directory; see the module docstring for the list.

    Raises:
        SppError: the first violation, naming the file or tensor.
    """
    from safetensors import safe_open

    from spp.io.finite import check_finite
    from spp.io.reader import read_checkpoint
    from spp.io.text import natural_key
    from spp.prune.masks import parse_pattern
    from spp.sparsity import block_tallies, sparsity_stats, tally

    directory = Path(directory)
    if not directory.is_dir():
        raise SppError(f"{directory} is not a directory")
    checkpoint = read_checkpoint(directory, need_manifest=True)  # the mask its manifest records, names, shapes
    manifest = checkpoint.manifest
    checkpoint.check_mask_hash(manifest.mask_sha256, "the manifest")  # a mask file is required here
    files = _check_files(directory, manifest.outputs)
    masks, layouts = checkpoint.read_masks()  # each entry names a saved tensor of its shape
    checkpoint.masks_by_parameter()  # refuses a fused expert weight masked for some experts only
    pattern = manifest.details.get("pattern", "unstructured")
    n_m = parse_pattern(pattern)
    recorded = manifest.details.get("modules", {})
    index = {name: saved.shard for name, saved in checkpoint.tensors.items()}
    stats: dict[str, dict] = {}
    for shard in checkpoint.shards:  # every shard, not only those with masked tensors: any weight may be non-finite
        with safe_open(str(shard), "pt") as f:
            for name in sorted(n for n in index if index[n] == shard):
                weight = f.get_tensor(name)
                check_finite(weight, name, str(shard))
                if name not in masks:
                    continue
                keep = masks[name]
                _check_tensor(name, weight, keep, layouts[name], n_m)
                stats[name] = sparsity_stats(weight, keep)
                pruned = stats[name]["pruned"]
                if name in recorded and recorded[name].get("pruned") != pruned:
                    raise SppError(f"{name}: the mask prunes {pruned} entries but the manifest records {recorded[name]['pruned']}")
    blocks, total = block_tallies(stats), tally(stats.values())
    return VerifyReport(directory=directory, pattern=pattern, tensors_checked=len(masks), files_checked=files,
                        blocks=[(b, r["numel"], r["pruned"]) for b, r in sorted(blocks.items(), key=lambda kv: natural_key(kv[0]))],
                        total_sparsity=total["sparsity"], kept_zero=total["kept_zero"],
                        requested_blocks=_requested_blocks(manifest.details, blocks),
                        block_errors={b: r["reconstruction_error"] for b, r in manifest.details.get("blocks", {}).items()
                                      if "reconstruction_error" in r},
                        mean_error=manifest.details.get("reconstruction_error"))


def _requested_blocks(details: dict, blocks: dict[str, dict]) -> dict[str, float]:
    """Per block, the sparsity the manifest says was requested (OWL, overrides); its achieved count must agree.

    Raises:
        SppError: the manifest's per-block pruned count differs from the mask's.
    """
    recorded = details.get("blocks") or {}
    for name, row in recorded.items():
        if name in blocks and row.get("pruned") != blocks[name]["pruned"]:
            raise SppError(f"block {name}: the mask prunes {blocks[name]['pruned']} entries but the manifest records {row.get('pruned')}")
    return {name: row["requested"] for name, row in recorded.items() if "requested" in row}
