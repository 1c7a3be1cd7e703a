"""`spp_manifest.json`: one schema for every stage's output directory.

A manifest ties an output to what made it: the stage, the resolved settings and
their sha256, the sha256 of every input and output file, the mask's identity
(`mask_sha256`, the sha256 of the mask file, `spp/masks.safetensors`), library versions, the run conditions
that change float results (`spp.io.conditions`: threads, device, dtype, processes), wall
time and peak memory, and stage-specific details (for prune: method, pattern, sparsity per
module, calibration). It holds no tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spp import __version__
from spp.errors import SppError
from spp.io.checkpoint import (MANIFEST_FILE, MASK_FILE, proc_self_status, read_json, safetensors_files, sha256_file,
                               write_json)

SCHEMA_VERSION = 1


def settings_sha256(settings: dict) -> str:
    """sha256 of the settings as canonical JSON (sorted keys), so equal settings hash equally."""
    blob = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "spp": __version__}
    for name in ("torch", "transformers", "accelerate", "datasets", "safetensors", "lm_eval"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out


def peak_memory_bytes() -> dict[str, int]:
    """Peak host RSS of this process and, when CUDA is in use, peak device memory allocated.

    On Linux the RSS is the process's own high-water mark (`VmHWM`): `ru_maxrss` carries the parent's peak across
    fork and exec, so a stage started by a large process (a script that built the model) would report that."""
    hwm = proc_self_status("VmHWM")
    if hwm is not None:
        out = {"host_rss": int(hwm) * 1024}
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"host_rss": rss if sys.platform == "darwin" else rss * 1024}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated"] = int(torch.cuda.max_memory_allocated())
    return out


@dataclass
class Manifest:
    """What one stage wrote and what it was made from."""

    stage: str
    settings: dict
    inputs: dict[str, str] = field(default_factory=dict)  # path -> sha256
    outputs: dict[str, str] = field(default_factory=dict)  # file relative to the dir -> sha256
    mask_sha256: str | None = None
    details: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)  # spp.io.conditions.run_conditions the output was made under
    wall_time_s: float = 0.0
    peak_memory: dict[str, int] = field(default_factory=dict)
    settings_sha256: str = ""
    spp_version: str = __version__
    libraries: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not self.settings_sha256:
            self.settings_sha256 = settings_sha256(self.settings)


def hash_outputs(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except the manifest itself, keyed by relative path."""
    directory = Path(directory)
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                out[rel] = sha256_file(path)
    return dict(sorted(out.items()))


def model_identity(directory: Path, manifest: Manifest | None) -> dict[str, str]:
    """A model directory's identity, without reading its weights: for `config.json`, the safetensors index and
    every weight shard, its path -> the sha256 `manifest` records for it (spp wrote and hashed it), else its size
    and modification time (`spp.io.conditions.file_identity`: a model spp did not write; hashing it would read
    the whole model). A file rewritten by hand under an unchanged manifest is not seen here (`spp verify` sees it).
    """
    from spp.io.conditions import file_identity

    directory = Path(directory)
    recorded = manifest.outputs if manifest is not None else {}
    files = [directory / "config.json", *sorted(directory.glob("*.safetensors.index.json")),
             *safetensors_files(directory)]
    return {str(p): recorded.get(p.relative_to(directory).as_posix()) or file_identity(p) for p in files if p.is_file()}


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Hash the directory's files into `manifest.outputs` (and `mask_sha256` if a mask is there), then write it."""
    directory = Path(directory)
    manifest.outputs = hash_outputs(directory)
    if MASK_FILE in manifest.outputs:
        manifest.mask_sha256 = manifest.outputs[MASK_FILE]
    write_json(directory / MANIFEST_FILE, dataclasses.asdict(manifest))
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """Load `spp_manifest.json` from a stage output.

    Raises:
        SppError: missing, malformed, or from a newer schema (names the file).
    """
    path = Path(directory) / MANIFEST_FILE
    raw = read_json(path, what="manifest")
    names = {f.name for f in dataclasses.fields(Manifest)}
    if raw.get("schema_version", 0) > SCHEMA_VERSION:
        raise SppError(f"manifest {path} has schema {raw['schema_version']}; this spp reads up to {SCHEMA_VERSION}")
    missing = {"stage", "settings"} - raw.keys()
    if missing:
        raise SppError(f"manifest {path} lacks {', '.join(sorted(missing))}")
    return Manifest(**{k: v for k, v in raw.items() if k in names})
