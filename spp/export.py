"""`spp export`: write a sparse checkpoint compressed (kept values + the mask file), or restore it.

`--compressed` (the default) takes an `spp prune` or `spp merge` output, checks that every pruned
entry is +0.0 (so the restore is exact), and writes `spp.io.compressed`'s layout; `--dense`
restores such a directory to the checkpoint it came from, file for file (its shards are
byte-identical to the source's, and the source's own manifest comes back, so `spp verify` passes
on the restored directory); `--dense --dtype` casts the restored weights (the manifest then records their
new hashes). The mask file is written at `spp/masks.safetensors` in both directions, whichever name the
input has it under (an older output's top-level `masks.safetensors`; the restored manifest then names
it so). What can be deployed: the restored (or any uncompressed) sparse
checkpoint loads anywhere as a dense one; the compressed form is for storage and transfer.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from spp.config import ExportConfig, to_dict
from spp.errors import SppError


@dataclass
class ExportReport:
    output: Path
    direction: str  # "compressed" or "dense"
    tensors: int  # masked tensors compressed or restored
    dense_bytes: int  # of the masked tensors, as stored dense
    compressed_bytes: int  # their kept values plus their share of the mask file
    total_bytes_in: int  # every file of the input directory
    total_bytes_out: int  # every file of the output directory

    @property
    def ratio(self) -> float:
        """Compressed bytes of the masked tensors over their dense bytes."""
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _mask_bytes(masks) -> int:
    """Bytes of the bit-packed masks: ceil(in / 8) per output row, as `spp.io.maskfile` stores them."""
    return sum(keep.shape[0] * -(-keep.shape[1] // 8) for keep in masks.values())


def run_export(cfg: ExportConfig) -> ExportReport:
    """Compress `cfg.model` into `cfg.output` (`cfg.compressed`), or restore a compressed directory.

    Raises:
        SppError: the input has no mask file, a pruned entry is not +0.0, a weight is NaN or ±inf
            (`spp.io.finite`), the input is not (or is already) compressed, or the output exists without `overwrite`.
    """
    from spp.io.checkpoint import atomic_dir, check_not_an_input, check_output_dir
    from spp.io.compressed import SUFFIX
    from spp.models import resolve_dtype

    start, source = time.perf_counter(), Path(cfg.model)
    dtype = resolve_dtype(cfg.dtype)
    if cfg.compressed and dtype != "auto":
        raise SppError(f"--dtype {cfg.dtype} applies to --dense (restoring); a compressed export keeps the "
                       "source's values: restore it with spp export --dense --dtype")
    if not source.is_dir():
        raise SppError(f"--model {source} is not a directory")
    check_not_an_input(Path(cfg.output), [("--model", source)], in_place="--model", overwrite=cfg.overwrite)
    check_output_dir(Path(cfg.output), cfg.overwrite)
    packed = sorted(source.glob("*" + SUFFIX))
    if cfg.compressed and packed:
        raise SppError(f"{source} is already compressed ({packed[0].name}); use --dense to restore it")
    if not cfg.compressed and not packed:
        raise SppError(f"{source} holds no {SUFFIX} files: it is not an `spp export --compressed` output")
    bytes_in = _directory_bytes(source)  # now: with --output equal to --model the output is renamed over it
    with atomic_dir(Path(cfg.output), overwrite=cfg.overwrite) as tmp:
        if cfg.compressed:
            tensors, dense, compressed = _compress(source, tmp)
        else:
            tensors, dense, compressed = _restore(source, tmp, None if dtype == "auto" else dtype)
        if cfg.compressed:
            _write_manifest(cfg, tmp, tensors, dense, compressed, start)
    return ExportReport(output=Path(cfg.output), direction="compressed" if cfg.compressed else "dense",
                        tensors=tensors, dense_bytes=dense, compressed_bytes=compressed,
                        total_bytes_in=bytes_in, total_bytes_out=_directory_bytes(cfg.output))


def _compress(source: Path, tmp: Path) -> tuple[int, int, int]:
    """Write the compressed form of `source` into `tmp`; (masked tensors, their dense bytes, values + mask bytes)."""
    from spp.io.checkpoint import LEGACY_MASK_FILE, MANIFEST_FILE, MASK_FILE, follow_umask, safetensors_files
    from spp.io.compressed import PARKED, SUFFIX, compress_shard
    from spp.io.reader import INDEX_SUFFIX, read_checkpoint

    checkpoint = read_checkpoint(source)
    masks, _ = checkpoint.read_masks()  # the checkpoint whole and its mask file valid
    shards = safetensors_files(source)
    dense = values = 0
    for shard in shards:
        sizes = compress_shard(shard, tmp / (shard.stem + SUFFIX), masks)
        dense, values = dense + sizes["dense"], values + sizes["values"]
    for path in sorted(source.iterdir()):
        if path.is_file() and path not in shards and path.name != LEGACY_MASK_FILE:
            parked = path.name == MANIFEST_FILE or path.name.endswith(INDEX_SUFFIX)
            shutil.copyfile(path, tmp / (path.name + PARKED if parked else path.name))
    (tmp / MASK_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint.mask_file, tmp / MASK_FILE)
    follow_umask(*(p for p in tmp.iterdir() if p.is_file()))
    return len(masks), dense, values + _mask_bytes(masks)


def _restore(source: Path, tmp: Path, dtype=None) -> tuple[int, int, int]:
    """Restore the compressed `source` into `tmp` (floating weights cast to `dtype` unless None); (masked tensors,
    restored shard bytes, .spz bytes)."""
    from spp.io.checkpoint import (LEGACY_MASK_FILE, MANIFEST_FILE, MASK_FILE, follow_umask, mask_path,
                                   safetensors_files, set_config_dtype)
    from spp.io.compressed import PARKED, SUFFIX, decompress_shard
    from spp.io.maskfile import load_masks

    masks, _ = load_masks(mask_path(source))
    packed = sorted(source.glob("*" + SUFFIX))
    for path in packed:
        decompress_shard(path, tmp / (path.stem + ".safetensors"), masks, dtype)
    for path in sorted(source.iterdir()):
        if path.is_file() and path not in packed and path.name not in (MANIFEST_FILE, LEGACY_MASK_FILE):
            shutil.copyfile(path, tmp / path.name.removesuffix(PARKED))  # not the export's own manifest
    (tmp / MASK_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mask_path(source), tmp / MASK_FILE)
    follow_umask(*(p for p in tmp.iterdir() if p.is_file()))
    if dtype is not None:
        set_config_dtype(tmp, str(dtype).removeprefix("torch."))
    _restored_manifest(tmp, dtype)
    dense = sum(p.stat().st_size for p in safetensors_files(tmp))
    return len(masks), dense, sum(p.stat().st_size for p in packed)


def _restored_manifest(tmp: Path, dtype) -> None:
    """Make the source's manifest, restored into `tmp`, name the restored files: an older source's mask file by its
    new name and, after a `--dtype` cast, every file's new sha256 (and the dtype, as `details.export_dtype`)."""
    from spp.io.checkpoint import LEGACY_MASK_FILE, MANIFEST_FILE, MASK_FILE, read_json, write_json
    from spp.io.manifest import hash_outputs

    path = tmp / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = read_json(path, what="manifest")
    outputs = manifest.get("outputs") or {}
    if dtype is not None:
        manifest["outputs"] = hash_outputs(tmp)
        manifest["details"] = {**(manifest.get("details") or {}), "export_dtype": str(dtype).removeprefix("torch.")}
    elif LEGACY_MASK_FILE in outputs:
        manifest["outputs"] = dict(sorted((MASK_FILE if k == LEGACY_MASK_FILE else k, v) for k, v in outputs.items()))
    else:
        return
    write_json(path, manifest)


def _write_manifest(cfg: ExportConfig, tmp: Path, tensors: int, dense: int, compressed: int, start: float) -> None:
    from spp.io.manifest import Manifest, hash_outputs, peak_memory_bytes, write_manifest

    write_manifest(tmp, Manifest(
        stage="export", settings=to_dict(cfg),
        inputs={str(Path(cfg.model) / name): digest for name, digest in hash_outputs(Path(cfg.model)).items()},
        details={"format": "spp-compressed", "masked_tensors": tensors, "dense_bytes": dense,
                 "compressed_bytes": compressed, "ratio": compressed / dense if dense else 1.0},
        wall_time_s=time.perf_counter() - start, peak_memory=peak_memory_bytes()))
