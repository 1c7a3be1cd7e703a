"""Read a model directory once, into the `Checkpoint` that every stage receives.

`read_checkpoint(dir)` resolves, in one pass and without reading any weight values: the
safetensors shards (each header whole, each promised byte present, every shard an index
names on disk), each saved tensor's shard, dtype and shape; the saved-name ↔
parameter-name correspondence *as transformers resolves it* (its conversion mapping and
the model's `base_model_prefix`, so `h.0.attn.c_attn.weight` is GPT-2's
`transformer.h.0.attn.c_attn.weight`), including how a mixture-of-experts checkpoint's per-expert
tensors (Mixtral's `block_sparse_moe.experts.3.w1.weight`) make up a fused parameter
(`mlp.experts.gate_up_proj[3, :I]`), read from transformers' own weight converters (`Piece`); transformers' own verdict on the weights (its
loader run on the meta device over tensors built from the headers: missing, unexpected
and mismatched keys); the manifest; and the mask file (its sha256 checked against the
manifest, each entry naming a saved tensor of its shape). Refusals are one `SppError`
naming the file: a missing weight, a shape mismatch, a truncated or corrupt shard, a
saved tensor the model does not have. A saved tensor that transformers itself ignores for
the architecture (`_keys_to_ignore_on_load_unexpected`, old `rotary_emb.inv_freq` buffers)
gets a one-line warning: it is not used and `save_pretrained` will not write it again.
Weight values are hashed only by `spp verify` (against the manifest).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spp.errors import SppError, first_line
from spp.io.checkpoint import MANIFEST_FILE, MASK_FILE, mask_path, safetensors_files, safetensors_keys, sha256_file
from spp.io.maskfile import check_format
from spp.io.text import natural_key

INDEX_SUFFIX = ".safetensors.index.json"
CONFIG_FILE = "config.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class SavedTensor:
    """One tensor as a shard stores it."""

    shard: Path
    dtype: str  # the safetensors dtype string, e.g. "F32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One saved tensor of a fused mixture-of-experts parameter: it is `fused[expert, rows[0]:rows[1], :]`.

    transformers 5 stacks the saved per-expert matrices along dim 0 and concatenates gate over up along
    dim 1 (its `MergeModulelist(dim=0)` and `Concatenate(dim=1)` converters); a piece is that, read backwards.
    """

    saved: str
    expert: int
    rows: tuple[int, int]


@dataclass
class Checkpoint:
    """A model directory, resolved once: shards, names, the module tree, the manifest and the mask file.

    Attributes:
        directory: the local directory (a hub id is resolved to its cached snapshot).
        config: the transformers config `config.json` describes.
        model: that model's module tree on the meta device (no memory), with transformers' parameter names.
        tensors: saved tensor name -> its shard, dtype and shape.
        saved_names: parameter (or persistent buffer) name -> the saved tensor it is loaded from, for every
            one-to-one correspondence (a fused mixture-of-experts parameter built from several saved tensors
            has none).
        manifest: the directory's `spp_manifest.json`, or None when it has none.
        mask_sha256: sha256 of the mask file (`mask_file`), or None when there is none.
        mask_names: the saved tensors the mask file holds a mask for (read from its header; empty without one).
        source: for a directory dequantized from a GGUF file, its `spp_source.json` record (file, sha256,
            tensor types); None otherwise.
        pieces: fused parameter name (`model.layers.0.mlp.experts.gate_up_proj`, (E, out, in)) -> its saved
            per-expert tensors, ordered by (expert, rows); only fused parameters whose converters spp can read
            backwards (stack over experts, then optionally concatenate along the rows) are here.
    """

    directory: Path
    config: Any
    model: nn.Module
    tensors: dict[str, SavedTensor]
    saved_names: dict[str, str]
    manifest: Any = None
    mask_sha256: str | None = None
    mask_names: list[str] = field(default_factory=list)
    source: dict | None = None
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    _masks: tuple | None = field(default=None, repr=False, compare=False)  # the mask file, decoded once

    @property
    def mask_file(self) -> Path:
        """`spp/masks.safetensors`, or an older output's top-level `masks.safetensors` (`checkpoint.mask_path`)."""
        return mask_path(self.directory)

    @property
    def shards(self) -> list[Path]:
        """The weight shards, sorted."""
        return sorted({t.shard for t in self.tensors.values()})

    def saved_name(self, parameter: str) -> str:
        """The saved tensor name of a parameter (`transformer.h.0.attn.c_attn.weight` -> `h.0.attn.c_attn.weight`)."""
        try:
            return self.saved_names[parameter]
        except KeyError:
            raise SppError(f"{self.directory} holds no saved tensor for the parameter {parameter}") from None

    @cached_property
    def parameter_names(self) -> dict[str, str]:
        """Saved tensor name -> the parameter it is loaded into (the inverse of `saved_names`)."""
        return {saved: parameter for parameter, saved in self.saved_names.items()}

    def parameter_name(self, saved: str) -> str | None:
        """The parameter a saved tensor is loaded into one to one, or None (a piece of a fused parameter: `piece_of`)."""
        return self.parameter_names.get(saved)

    @cached_property
    def _piece_index(self) -> dict[str, tuple[str, Piece]]:
        return {piece.saved: (param, piece) for param, pieces in self.pieces.items() for piece in pieces}

    def piece_of(self, saved: str) -> tuple[str, Piece] | None:
        """(the fused parameter, the piece) a saved tensor makes up, or None."""
        return self._piece_index.get(saved)

    def owner(self, saved: str) -> str:
        """The parameter a saved tensor is loaded into, alone or as a piece of a fused one ("" for neither)."""
        piece = self.piece_of(saved)
        return piece[0] if piece is not None else self.parameter_name(saved) or ""

    def split(self, parameter: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """A parameter-shaped tensor (a weight or its mask) cut into its saved tensors: saved name -> view.

        A fused parameter's (E, out, in) tensor gives one (rows, in) view per piece; any other parameter gives
        {its saved name: tensor}.

        Raises:
            SppError: the directory has no saved tensor for `parameter`.
        """
        if parameter in self.pieces:
            return {p.saved: tensor[p.expert, p.rows[0]:p.rows[1]] for p in self.pieces[parameter]}
        return {self.saved_name(parameter): tensor}

    def saved_tensors_of(self, parameter: str) -> list[str]:
        """The saved tensors a parameter is loaded from: a fused expert weight's pieces, or its one saved tensor."""
        if parameter in self.pieces:
            return [p.saved for p in self.pieces[parameter]]
        return [self.saved_name(parameter)]

    def join(self, parameter: str, by_saved: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of `split`: the saved tensors of `parameter` (each in its saved shape) put together."""
        if parameter not in self.pieces:
            return by_saved[self.saved_name(parameter)]
        pieces = self.pieces[parameter]
        first = by_saved[pieces[0].saved]
        n_experts = pieces[-1].expert + 1
        out_features = max(p.rows[1] for p in pieces)
        fused = first.new_empty((n_experts, out_features, first.shape[1]))
        for p in pieces:
            fused[p.expert, p.rows[0]:p.rows[1]] = by_saved[p.saved]
        return fused

    def read_masks(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The mask file: (bool masks in the stored weight's shape, layouts), both keyed by saved tensor name.

        Decoded on the first call and served from memory after (1 byte per masked weight); callers must not
        modify the masks.

        Raises:
            SppError: there is no mask file, or it is corrupt.
        """
        from spp.io.maskfile import load_masks

        if self.mask_sha256 is None:
            raise SppError(f"{self.directory} has no {MASK_FILE} (is it an `spp prune` output?)")
        if self._masks is None:
            self._masks = load_masks(self.mask_file)
        return self._masks

    def masks_by_parameter(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The mask file keyed by in-memory parameter name (masks in the stored weight's shape, True = keep),
        from `read_masks` (decoded once); with a `prefix` (`model.layers.3.`), only the parameters under it,
        decoded for this call and not kept (one block's masks at a time)."""
        from spp.io.maskfile import load_masks

        if prefix:
            masks, _ = load_masks(self.mask_file, lambda saved: self.owner(saved).startswith(prefix))
        else:
            masks, _ = self.read_masks()
        out, fused = {}, {}
        for saved, keep in masks.items():
            name, piece = self.parameter_name(saved), self.piece_of(saved)
            if piece is not None:
                fused.setdefault(piece[0], {})[saved] = keep
            elif name is None:  # read_checkpoint checked every entry; a file changed since then
                raise SppError(f"{self.mask_file} names {saved}, which the model in {self.directory} does not have")
            else:
                out[name] = keep
        for param, by_saved in fused.items():
            missing = [p.saved for p in self.pieces[param] if p.saved not in by_saved]
            if missing:
                raise SppError(f"{self.mask_file} has masks for some experts of {param} but not for {missing[0]} "
                               f"({len(missing)} missing): spp masks every saved piece of a fused expert weight")
            out[param] = self.join(param, by_saved)
        return out

    def check_mask_hash(self, expected: str | None, who: str) -> str:
        """The mask file's sha256, refused unless it equals `expected` (from an adapter config or a manifest).

        Raises:
            SppError: no mask file, or another hash (naming both and `who` recorded it).
        """
        if self.mask_sha256 is None:
            raise SppError(f"{self.directory} has no {MASK_FILE} (is it an `spp prune` output?)")
        if expected is not None and self.mask_sha256 != expected:
            raise SppError(f"{self.mask_file} has sha256 {self.mask_sha256[:12]}… but {who} records {expected[:12]}…: "
                           "the mask changed or this is a different base")
        return self.mask_sha256

    def check_adapter_base(self, mask_sha256: str | None, adapter_weights: Path, who: str) -> str:
        """`check_mask_hash` for an adapter applied to this base (merge, eval --adapter), refusing first a merged
        model made from this very adapter file (its manifest records the file's sha256): merge keeps the mask
        file byte for byte, so the hash alone cannot tell such a model from the pruned base, and applying the
        adapter again would add it twice. A model merged from another adapter is a base like any other (an
        adapter trained on it applies).

        Raises:
            SppError: as `check_mask_hash`, or the adapter is already merged into this model.
        """
        if self.manifest is not None and self.manifest.stage == "merge" and adapter_weights.is_file() \
                and sha256_file(adapter_weights) in self.manifest.inputs.values():
            raise SppError(f"{who} is already merged into {self.directory} (its manifest records the adapter's "
                           "sha256), so applying it again would add it twice; use the pruned model it was trained on "
                           f"as the base, or {self.directory} without the adapter")
        return self.check_mask_hash(mask_sha256, who)


def read_checkpoint(source: str | Path, need_manifest: bool = False) -> Checkpoint:
    """Resolve a model directory (or a hub id) into a `Checkpoint`; see the module docstring.

    Args:
        source: a local directory, or a hub id (resolved to its local snapshot).
        need_manifest: refuse a directory without `spp_manifest.json` (read first, so its errors come first).

    Raises:
        SppError: the first problem, naming the file.
    """
    from spp.io.gguf import read_source
    from spp.io.manifest import read_manifest

    directory = local_directory(str(source))
    manifest = None
    if need_manifest or (directory / MANIFEST_FILE).is_file():
        manifest = read_manifest(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise SppError(f"model {source} holds no model (no {CONFIG_FILE})")
    check_no_sparsity_config(directory / CONFIG_FILE)
    config = load_config(str(directory))
    tensors = saved_tensors(directory)
    model, saved_names, ignored, pieces = _resolve_names(directory, config, tensors)
    if ignored:
        print(f"warning: {directory} holds {len(ignored)} tensor(s) that transformers ignores for "
              f"{type(model).__name__} (first: {ignored[0]}); they are not used and are not written again",
              file=sys.stderr)
    ckpt = Checkpoint(directory=directory, config=config, model=model, tensors=tensors, saved_names=saved_names,
                      manifest=manifest, source=read_source(directory), pieces=pieces)
    if ckpt.mask_file.is_file():
        ckpt.mask_sha256 = sha256_file(ckpt.mask_file)
        if manifest is not None and manifest.mask_sha256:
            ckpt.check_mask_hash(manifest.mask_sha256, who=str(directory / MANIFEST_FILE))
        _read_mask_header(ckpt)
    return ckpt


def check_no_sparsity_config(config_file: Path) -> None:
    """spp writes plain checkpoints: a `sparsity_config` in config.json (compressed-tensors' declaration, top level or
    in `quantization_config`) would pass into every output spp makes from it, and current vLLM refuses a model that
    carries one. So a model that declares one is refused as input, and `spp verify` refuses it as output.

    Raises:
        SppError: config.json declares a sparsity_config (naming the file and what to remove).
    """
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # not JSON: `load_config` says so
    quantization = raw.get("quantization_config")
    where = ("sparsity_config" if "sparsity_config" in raw else "quantization_config.sparsity_config"
             if isinstance(quantization, dict) and "sparsity_config" in quantization else None)
    if where is not None:
        raise SppError(f"{config_file} declares a {where}: spp reads and writes plain checkpoints (vLLM refuses a "
                       f"model that declares one); remove {where} from it")


def load_config(name_or_path: str):
    """Load a model's config (cheap). A stage reads its model with `read_checkpoint`, which calls this."""
    from transformers import AutoConfig

    path = local_directory(name_or_path)
    if not (path / CONFIG_FILE).is_file():
        raise SppError(f"model {name_or_path} holds no model (no {CONFIG_FILE})")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SppError(f"cannot load a model config from {name_or_path}: {first_line(exc)}") from exc


def local_directory(name_or_path: str) -> Path:
    """A local model directory as is; a `.gguf` file as its dequantized directory (`spp.io.gguf`); a hub id as its
    (cached) snapshot, weights in safetensors only.

    Raises:
        SppError: a local-looking path that is not a directory, or a hub id that cannot be fetched.
    """
    from spp.io.gguf import gguf_directory, is_gguf

    if is_gguf(name_or_path):
        return gguf_directory(name_or_path)
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if path.exists() and not path.is_dir():
            raise SppError(f"model {name_or_path} is a file, not a model directory: pass the directory that holds "
                           "its config.json and *.safetensors weights, or a .gguf file")
        if not path.is_dir():
            raise SppError(f"model {name_or_path} does not exist")
        return path
    from spp.hub import require_hub

    require_hub(f"--model {name_or_path}", name_or_path, "model",
                f"no local directory {name_or_path} exists either; pass --model DIR (a local Hugging Face model directory)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; all mean "cannot get this model"
        raise SppError(f"cannot load a model config from {name_or_path}: {first_line(exc)}") from exc


def saved_tensors(directory: Path) -> dict[str, SavedTensor]:
    """Saved tensor name -> (shard, dtype, shape), from the headers; every shard whole, and, when the directory has
    an index, the index and the shards agreeing tensor for tensor (transformers loads only what the index names).

    Raises:
        SppError: a truncated or corrupt shard, an index naming a missing shard or a tensor its shard does not
            hold, a tensor on disk the index does not name, a tensor in two shards, or no safetensors shard at all
            (names the file).
    """
    indexed: dict[str, str] = {}  # tensor -> shard file name, over every index
    indexes = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise SppError(f"{index} is not a valid safetensors index ({exc})") from exc
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise SppError(f"{index} names the shard {directory / shard}, which is missing")
        indexed.update(weight_map)
    out: dict[str, SavedTensor] = {}
    for shard in safetensors_files(directory):
        for name, (dtype, shape) in safetensors_keys(shard).items():
            if name in out:
                raise SppError(f"{shard} and {out[name].shard} both hold {name}")
            out[name] = SavedTensor(shard, dtype, tuple(shape))
    if not out:
        from spp.io.compressed import SUFFIX

        if any(directory.glob(f"*{SUFFIX}")):
            raise SppError(f"{directory} is an `spp export` compressed checkpoint ({SUFFIX} shards): restore it first "
                           f"with spp export --dense --model {directory} --output DIR")
        raise SppError(f"{directory} holds no safetensors weights (spp reads *.safetensors only)")
    if indexes:
        _check_index(indexes[0] if len(indexes) == 1 else directory, indexed, out)
    return out


def _check_index(index: Path, indexed: dict[str, str], tensors: dict[str, SavedTensor]) -> None:
    """Refuse an index that disagrees with its shards: transformers would skip what it does not name (and
    initialise those weights randomly) and fail on what it names wrongly."""
    unnamed = sorted((n for n in tensors if n not in indexed), key=natural_key)
    if unnamed:
        raise SppError(f"{index} does not name {unnamed[0]} ({len(unnamed)} such tensors, e.g. in "
                       f"{tensors[unnamed[0]].shard.name}), so transformers would not load it: the index is "
                       "incomplete; regenerate it or re-download the model")
    wrong = sorted((n for n, shard in indexed.items() if n not in tensors or tensors[n].shard.name != shard),
                   key=natural_key)
    if wrong:
        raise SppError(f"{index} names {wrong[0]} in {indexed[wrong[0]]}, which does not hold it "
                       f"({len(wrong)} such entries): the index and the shards disagree; regenerate it or re-download")


def _resolve_names(directory: Path, config, tensors: dict[str, SavedTensor]):
    """transformers' loader on the meta device over header-shaped tensors: its verdict and its name mapping.

    Returns:
        (the meta model, parameter name -> saved name, saved names transformers ignores, fused parameter
        name -> its pieces).
    """
    from spp import hf
    from spp.quiet import quiet_transformers

    config_file = directory / CONFIG_FILE
    model_class = hf.causal_lm_class(config)
    if model_class is None:
        raise SppError(f"{config_file} does not describe a causal LM spp can build "
                       f"({type(config).__name__} has no causal-LM class in transformers)")
    state = {name: torch.empty(t.shape, dtype=_DTYPES.get(t.dtype, torch.float32), device="meta")
             for name, t in tensors.items()}
    try:  # transformers' warnings off: our refusal below is the report, its table would be a second one
        with quiet_transformers(logging.ERROR):
            model, info = hf.meta_load(model_class, config, state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise hf.transformers_failed(exc, f"resolving the weights of {directory} against {config_file}") from exc
    renamings, converters = hf.weight_conversions(model)
    state = model.state_dict()
    renamed = _renamed_keys(tensors, renamings, converters, model.base_model_prefix, state)
    refuse_incomplete_load(directory, info, tensors, renamed)
    saved_names = {key: saved for saved, (key, pattern) in renamed.items() if key in state and pattern is None}
    ignored = sorted((saved for saved, (key, _) in renamed.items() if key not in state), key=natural_key)
    return model, saved_names, ignored, _fused_pieces(tensors, renamed, hf.stacked_expert_patterns(converters), state)


def _renamed_keys(tensors: dict[str, SavedTensor], renamings: list, converters: list, prefix: str,
                  state: dict) -> dict[str, tuple[str, str | None]]:
    """Saved name -> (the state-dict key transformers loads it into, the converter pattern or None).

    The two-step lookup of `transformers.core_model_loading.convert_and_load_state_dict_in_model`: every
    renaming, at most one converter (which merges several saved tensors into one parameter, e.g. experts),
    and the base-model prefix added or stripped as the model's state dict needs.
    """
    from spp import hf

    out = {}
    for saved in tensors:
        key, pattern = hf.loaded_key(saved, renamings, converters, prefix, state)
        if key not in state and saved in state:
            key, pattern = hf.loaded_key(saved, [], [], prefix, state)
        out[saved] = (key, pattern)
    return out


def _fused_pieces(tensors: dict[str, SavedTensor], renamed: dict, stacked: dict[str, int],
                  state: dict) -> dict[str, list[Piece]]:
    """Fused parameter -> its saved pieces, from the converters that built it (see `Piece`).

    Only converters made of `MergeModulelist(dim=0)`, optionally followed by `Concatenate(dim=1)`, with a
    `*` standing for the expert index, are read (`stacked`: `spp.hf.stacked_expert_patterns`); a parameter whose
    pieces do not tile it exactly (experts 0..E-1, rows 0..out, every piece (rows, in)) is left out, and a stage
    that needs it says so.
    """
    found: dict[str, dict[int, dict[int, str]]] = {}  # parameter -> expert -> source-pattern index -> saved name
    for saved, (key, pattern) in renamed.items():
        if pattern not in stacked or key not in state or state[key].dim() != 3:
            continue
        match = re.search(r"(\d+)".join(re.escape(part) for part in pattern.split("*")), saved)
        if match is None:
            continue
        found.setdefault(key, {}).setdefault(int(match.group(1)), {})[stacked[pattern]] = saved
    pieces = {}
    for param, experts in found.items():
        n_experts, out_features, in_features = state[param].shape
        out, complete = [], sorted(experts) == list(range(n_experts))
        for expert in sorted(experts):
            row = 0
            for _, saved in sorted(experts[expert].items()):
                rows, width = tensors[saved].shape[0], tensors[saved].shape[-1]
                complete &= len(tensors[saved].shape) == 2 and width == in_features
                out.append(Piece(saved, expert, (row, row + rows)))
                row += rows
            complete &= row == out_features
        if complete:
            pieces[param] = out
    return pieces


def refuse_incomplete_load(directory: Path, info: dict, tensors: dict[str, SavedTensor] | None = None,
                           renamed: dict | None = None) -> None:
    """Refuse what transformers would re-initialise or drop (or did: after a real load), from its loading report
    (`output_loading_info=True`): mismatched, missing and unexpected tensors. `tensors` and `renamed` (saved name
    -> (parameter, pattern)) name the saved tensor and its shard where known.

    Raises:
        SppError: the first such tensor and how many there are.
    """
    tensors, renamed = tensors or {}, renamed or {}
    config_file = directory / CONFIG_FILE
    saved_of = {key: saved for saved, (key, _) in renamed.items()}
    mismatched = sorted(info["mismatched_keys"], key=lambda m: natural_key(m[0]))
    if mismatched:
        key, saved_shape, model_shape = mismatched[0]
        saved = saved_of.get(key, key)
        shard = tensors[saved].shard if saved in tensors else directory
        raise SppError(f"{config_file} disagrees with the weights: {saved} is {tuple(saved_shape)} in {shard} "
                       f"but the config makes it {tuple(model_shape)} ({len(mismatched)} such tensors)")
    missing = sorted(info["missing_keys"], key=natural_key)
    if missing:
        raise SppError(f"{config_file} disagrees with the weights: it describes {missing[0]}, which no shard in "
                       f"{directory} holds ({len(missing)} such tensors; more layers or modules than were saved?)")
    unexpected = sorted(info["unexpected_keys"], key=natural_key)
    if unexpected:
        saved = saved_of.get(unexpected[0], unexpected[0])
        shard = tensors[saved].shard if saved in tensors else directory
        raise SppError(f"{config_file} disagrees with the weights: {shard} holds {saved}, which the model "
                       f"the config describes does not have ({len(unexpected)} such tensors)")


def _read_mask_header(ckpt: Checkpoint) -> None:
    """Check each mask-file entry names a saved tensor of the shape it records, and keep their names in
    `ckpt.mask_names` (header only)."""
    from safetensors import SafetensorError, safe_open

    path = ckpt.mask_file
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"mask file {path} is corrupt or truncated: {exc}") from exc
    check_format(path, metadata)
    ckpt.mask_names = keys
    for name in keys:
        try:
            shape = tuple(json.loads(metadata[name])["shape"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise SppError(f"mask file {path}: entry {name} has no valid metadata") from exc
        if name not in ckpt.tensors:
            raise SppError(f"{path} names {name}, which no weight shard in {ckpt.directory} holds")
        if ckpt.parameter_name(name) is None and ckpt.piece_of(name) is None:
            raise SppError(f"{path} names {name}, which transformers does not load into a parameter of "
                           f"{type(ckpt.model).__name__}")
        if shape != ckpt.tensors[name].shape:
            raise SppError(f"{path}: the mask for {name} has shape {shape} but {ckpt.tensors[name].shard} stores "
                           f"it as {ckpt.tensors[name].shape}")
