"""Refuse a model directory that would load wrong, before any stage uses it.

`check_model_dir` reads only headers and small files: every safetensors shard must have a
whole header and all the bytes it promises (a truncated copy fails here, not deep inside
transformers); the shards named by an index file must exist; the module tree that
`config.json` describes (built on the meta device, no memory) must have the saved tensors'
shapes and the same decoder-block tensors (transformers would otherwise re-initialise a
mismatched or missing weight with a warning, or drop an unexpected one); and a mask file
must have the sha256 the directory's manifest records. Every refusal is one SppError naming
the file. Weight values are not hashed here (`spp verify` does that against the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spp.errors import SppError
from spp.io.checkpoint import MANIFEST_FILE, MASK_FILE, safetensors_files, safetensors_keys

INDEX_SUFFIX = ".safetensors.index.json"


def saved_shapes(model_dir: Path) -> dict[str, tuple[Path, list[int]]]:
    """Saved tensor name -> (its shard, its shape), from the headers; checks every shard is whole.

    Raises:
        SppError: a truncated or corrupt shard, or an index naming a shard that is missing (names the file).
    """
    model_dir = Path(model_dir)
    for index in model_dir.glob(f"*{INDEX_SUFFIX}"):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise SppError(f"{index} is not a valid safetensors index ({exc})") from exc
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise SppError(f"{index} names the shard {model_dir / shard}, which is missing")
    out = {}
    for shard in safetensors_files(model_dir):
        for name, (_, shape) in safetensors_keys(shard).items():
            out[name] = (shard, shape)
    return out


def _meta_state(model_dir: Path) -> dict[str, list[int]]:
    """Parameter and persistent-buffer shapes of the model `config.json` describes (meta device)."""
    from transformers import AutoModelForCausalLM

    from spp.models import load_config

    config = load_config(str(model_dir))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise SppError(f"{model_dir / 'config.json'} does not describe a causal LM spp can build: {exc}") from exc
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _in_block(name: str) -> bool:
    """Tensors of a numbered decoder block (`model.layers.3.…`); others may be tied or renamed on save."""
    return any(part.isdigit() for part in name.split("."))


def check_config_shapes(model_dir: Path, saved: dict[str, tuple[Path, list[int]]]) -> None:
    """`config.json` and the weights agree: equal shapes for common names, the same decoder-block tensors.

    Raises:
        SppError: naming config.json, the tensor, its shard and both shapes.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    expected = _meta_state(model_dir)
    for name, (shard, shape) in saved.items():
        if name in expected and expected[name] != shape:
            raise SppError(f"{config_file} disagrees with the weights: {name} is {tuple(shape)} in {shard} "
                           f"but the config makes it {tuple(expected[name])}")
    missing = sorted(n for n in expected if _in_block(n) and n not in saved)
    if missing and saved:
        raise SppError(f"{config_file} disagrees with the weights: it describes {missing[0]}, which no shard in "
                       f"{model_dir} holds ({len(missing)} such tensors; more layers or modules than were saved?)")
    unexpected = sorted(n for n in saved if _in_block(n) and n not in expected)
    if unexpected:
        raise SppError(f"{config_file} disagrees with the weights: {saved[unexpected[0]][0]} holds {unexpected[0]}, "
                       f"which the model the config describes does not have ({len(unexpected)} such tensors)")


def check_manifest_mask(model_dir: Path) -> None:
    """The mask file's sha256 equals the one the directory's manifest records (when both exist).

    Raises:
        SppError: naming the mask file and both hashes.
    """
    from spp.io.manifest import check_mask_hash, read_manifest

    model_dir = Path(model_dir)
    if (model_dir / MANIFEST_FILE).is_file() and (model_dir / MASK_FILE).is_file():
        manifest = read_manifest(model_dir)
        if manifest.mask_sha256:
            check_mask_hash(model_dir, manifest.mask_sha256, who=f"{model_dir / MANIFEST_FILE}")


def check_model_dir(model_dir: Path) -> None:
    """Every check above on a local model directory (a hub id or a missing path is left to the loaders).

    Raises:
        SppError: the first problem, naming the file.
    """
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        return
    saved = saved_shapes(model_dir)
    if saved:
        check_config_shapes(model_dir, saved)
    check_manifest_mask(model_dir)
