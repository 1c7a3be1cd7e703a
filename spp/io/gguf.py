"""`--model FILE.gguf`: a GGUF file dequantized once, through transformers' own GGUF loader, into a normal directory.

Every stage reads safetensors directories (`spp.io.reader`), so a `.gguf` file is turned into one
and the stage reads that: `from_pretrained(folder, gguf_file=name)` with
`GgufConfig(dequantize=True)` unpacks every quantized block to float32 (spp prunes and trains
plain float weights), then the quantizer's own `remove_quantization_config` drops the GGUF
quantization config — without that, `save_pretrained` refuses the model — and the model and
tokenizer are saved as usual. The directory is kept in a cache keyed by the file's sha256
(`$SPP_CACHE`, else `$XDG_CACHE_HOME/spp`, else `~/.cache/spp`), so prune, eval and run on the
same file convert it once. `spp_source.json` in it records the file, its sha256 and its tensor
types, and the stages copy that record into their manifests: the weights are the dequantized
values, not the model the file was quantized from.

Needs the `gguf` package (`pip install 'spp-llm[gguf]'`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

from spp.errors import SppError, first_line
from spp.io.checkpoint import atomic_dir, read_json, save_model, sha256_file, write_json

SOURCE_FILE = "spp_source.json"
SUFFIX = ".gguf"


def is_gguf(name: str | Path) -> bool:
    """True for a name ending in `.gguf` (any case): `--model` then names a GGUF file, not a directory."""
    return str(name).lower().endswith(SUFFIX)


def cache_root() -> Path:
    """Where dequantized GGUF models are kept: `$SPP_CACHE`, `$XDG_CACHE_HOME/spp` or `~/.cache/spp`."""
    if os.environ.get("SPP_CACHE"):
        return Path(os.environ["SPP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spp"


def gguf_directory(path: str | Path) -> Path:
    """The normal model directory a GGUF file dequantizes to, made on first use (atomically) and reused.

    Returns:
        `cache_root()/gguf/<sha256 prefix>-<file stem>`, holding model.safetensors, config.json, the tokenizer
        and `spp_source.json`.

    Raises:
        SppError: the file is missing, the `gguf` package is not installed, or transformers cannot read the file.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise SppError(f"model {path} does not exist")
    stat = path.stat()
    return _gguf_directory(path, stat.st_size, stat.st_mtime_ns, cache_root())


@lru_cache(maxsize=8)  # one process (spp run) reads the same file in several stages: hash it once
def _gguf_directory(path: Path, size: int, mtime_ns: int, root: Path) -> Path:
    try:
        import gguf  # noqa: F401 - transformers' loader needs it; say so before any work
    except ImportError:
        raise SppError(f"--model {path} is a GGUF file, which needs the gguf package: pip install 'spp-llm[gguf]'") \
            from None
    digest = sha256_file(path)
    directory = root / "gguf" / f"{digest[:16]}-{path.stem}"
    if (directory / SOURCE_FILE).is_file() and read_json(directory / SOURCE_FILE).get("sha256") == digest:
        return directory
    types = tensor_types(path)
    print(f"dequantizing {path.name} once into {directory} (reused by later runs on the same file)",
          file=sys.stderr)
    model, tokenizer = _load_dequantized(path)
    with atomic_dir(directory, overwrite=True) as tmp:
        save_model(model, tokenizer, tmp)
        write_json(tmp / SOURCE_FILE, {"format": "gguf", "file": str(path), "bytes": size, "sha256": digest,
                                       "tensor_types": types, "dequantized_to": str(model.dtype)[6:]})
    return directory


def _load_dequantized(path: Path):
    """transformers' GGUF loader with every block unpacked to float32, its quantization config then removed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from spp import hf

    try:
        model = hf.from_pretrained(AutoModelForCausalLM, path.parent, gguf_file=path.name, dtype=torch.float32,
                                   quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise SppError(f"transformers cannot load {path} as a causal LM: {first_line(exc)}") from exc
    hf.drop_quantization_config(model)  # the weights are plain floats now; this lets it be saved
    return model, tokenizer


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (e.g. {"Q4_1": 210, "F32": 61}), from its header.

    Raises:
        SppError: the file is not a readable GGUF file.
    """
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path)).tensors
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise SppError(f"{path} is not a readable GGUF file: {first_line(exc)}") from exc
    return dict(sorted(Counter(t.tensor_type.name for t in tensors).items()))


def read_source(directory: Path) -> dict | None:
    """The `spp_source.json` record of a directory made from a GGUF file, or None for any other directory."""
    file = Path(directory) / SOURCE_FILE
    return read_json(file, what="source record") if file.is_file() else None
