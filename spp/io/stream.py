"""Hold one part of a model in memory at a time: a skeleton on the meta device, filled from the shards on demand.

This is the shared block loader of streaming stages (`spp prune`, block-wise recovery). `skeleton(checkpoint, dtype)`
builds the whole model on the meta device (no memory) as `from_pretrained(dtype=...)` would build it: every
parameter's dtype, the generation config, and the non-persistent buffers (rotary frequencies) computed by
transformers' own initialisation, on the CPU. `load(model, checkpoint, prefix, device)` then reads the parameters
and persistent buffers under `prefix` (one decoder block, `model.layers.3`; or everything but the blocks) from the
safetensors shards, by the saved-name correspondence `spp.io.reader.Checkpoint` resolved as transformers does, a
fused mixture-of-experts weight put together from its saved per-expert pieces (`Checkpoint.join`), each cast as
`from_pretrained` casts it; `release(module)` puts them back on the meta device. Values are bitwise those of
`spp.models.load_model`. `save_streamed` writes the files `save_pretrained` would write for the model, byte for
byte, reading one part at a time from wherever the caller keeps it. Nothing here knows about blocks or methods:
callers pass the prefixes.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spp.errors import SppError
from spp.io.finite import check_finite
from spp.io.reader import _DTYPES, Checkpoint


def skeleton(checkpoint: Checkpoint, dtype: torch.dtype | str = "auto") -> nn.Module:
    """The model of `checkpoint` on the meta device, in eval mode, as `from_pretrained(dtype=dtype)` builds it.

    Parameters and persistent buffers are meta tensors of the dtype the real load would give them; non-persistent
    buffers hold their real values on the CPU. Tied parameters are tied (one `nn.Parameter`).

    Raises:
        SppError: transformers cannot build the model.
    """
    from spp import hf

    model_class = hf.causal_lm_class(checkpoint.config)
    state = {name: torch.empty(t.shape, dtype=_DTYPES.get(t.dtype, torch.float32), device="meta")
             for name, t in checkpoint.tensors.items()}
    try:
        model = hf.meta_model(model_class, checkpoint.config, state, dtype)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise hf.transformers_failed(exc, f"building the model of {checkpoint.directory}") from exc
    hf.init_non_persistent_buffers(model)
    hf.load_generation_config(model, checkpoint.directory)
    model.config.name_or_path = str(checkpoint.directory)  # as from_pretrained records it (config.json keeps it)
    model.tie_weights()
    return model.eval()


def load(model: nn.Module, checkpoint: Checkpoint, prefix: str, device: torch.device | str = "cpu",
         skip: tuple[str, ...] = ()) -> None:
    """Fill every meta parameter and persistent buffer of `model` whose name starts with `prefix` from the shards.

    Args:
        model: from `skeleton` (names as transformers resolves them).
        checkpoint: the same checkpoint.
        prefix: the module to fill (`model.layers.3.`: one decoder block); "" for the whole model.
        device: where the tensors go.
        skip: name prefixes left on meta (`("model.layers.",)`: everything but the decoder blocks).

    Raises:
        SppError: a tensor holds a NaN or ±inf (named as the model names it, `spp.io.finite`), or a parameter has
            no saved tensor spp can read (a weight converter spp cannot invert).
    """
    from safetensors import safe_open

    _big_allocations_mapped()
    owners = defaultdict(list)  # id of a meta tensor -> (module, attribute) of every name sharing it
    wanted = {}  # state name -> its meta tensor; a tied parameter once, under its first name
    chosen = set()  # ids of the tensors in `wanted`
    for name, owner, attr, tensor in _state(model):
        if not tensor.is_meta:
            continue
        owners[id(tensor)].append((owner, attr))  # under every name, chosen or not
        if name.startswith(prefix) and not name.startswith(skip) and id(tensor) not in chosen:
            wanted[name] = tensor
            chosen.add(id(tensor))
    by_shard = defaultdict(list)  # shard -> saved names to read
    for name in wanted:
        for saved in _saved_names(checkpoint, name):
            by_shard[checkpoint.tensors[saved].shard].append(saved)
    read = {}
    for shard, names in by_shard.items():
        with safe_open(str(shard), "pt", device="cpu") as f:
            read.update((saved, f.get_tensor(saved)) for saved in names)
    for name, meta in wanted.items():
        value = checkpoint.join(name, read)
        for saved in _saved_names(checkpoint, name):
            del read[saved]
        if value.is_floating_point() and meta.is_floating_point():
            value = value.to(meta.dtype)  # as from_pretrained casts each tensor it loads
        check_finite(value, name, f"model {checkpoint.directory}")
        value = value.to(device)
        if isinstance(meta, nn.Parameter):
            value = nn.Parameter(value, requires_grad=meta.requires_grad)
        for owner, attr in owners[id(meta)]:  # every name of a tied parameter gets the same one
            if isinstance(meta, nn.Parameter):
                setattr(owner, attr, value)
            else:
                owner._buffers[attr] = value


def unreadable(model: nn.Module, checkpoint: Checkpoint) -> str | None:
    """The first parameter or persistent buffer of the skeleton `model` that `load` cannot read tensor by tensor
    (transformers builds it with a weight conversion spp does not invert), or None: the model can be streamed."""
    seen = set()
    for name, _, _, tensor in _state(model):
        if id(tensor) in seen or not tensor.is_meta:
            continue
        seen.add(id(tensor))
        if name not in checkpoint.saved_names and name not in checkpoint.pieces:
            return name
    return None


def release(module: nn.Module) -> None:
    """Put `module`'s parameters and persistent buffers back on the meta device, so their memory is freed (once
    nothing else holds them); non-persistent buffers stay."""
    released = {}  # id of a released parameter -> its meta stand-in, so tied parameters stay tied
    for owner in module.modules(remove_duplicate=False):
        for name, param in owner.named_parameters(recurse=False):
            if not param.is_meta:
                if id(param) not in released:
                    released[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                       requires_grad=param.requires_grad)
                setattr(owner, name, released[id(param)])
        for name, buffer in owner.named_buffers(recurse=False):
            if name not in owner._non_persistent_buffers_set and buffer is not None and not buffer.is_meta:
                owner._buffers[name] = torch.empty_like(buffer, device="meta")
    released.clear()
    _return_freed_memory()


@contextlib.contextmanager
def outside_blocks(model: nn.Module, checkpoint: Checkpoint, blocks_name: str):
    """Hold the tensors outside the decoder blocks `blocks_name` (`model.layers`) on the CPU: the embeddings and
    norms that capturing the blocks' inputs runs. The output head, which that never reaches, stays on meta (a head
    tied to the embeddings is read under their name). Everything is released on exit."""
    head = model.get_output_embeddings()
    heads = tuple(f"{name}." for name, module in model.named_modules() if module is head and name)
    load(model, checkpoint, "", "cpu", skip=(f"{blocks_name}.", *heads))
    try:
        yield
    finally:
        release(model)


_MMAP_THRESHOLD = 4 << 20  # bytes: glibc serves an allocation this large or larger with its own mmap


def _big_allocations_mapped() -> None:
    """Fix glibc's mmap threshold (`mallopt(M_MMAP_THRESHOLD)`, for the rest of the process; elsewhere nothing), so
    every tensor of 4 MiB or more is its own mapping, unmapped when freed. By default glibc raises the threshold to
    the size of each large allocation it frees (up to 32 MiB), after which a block's weights, Hessians and
    activations come from the heap, whose free holes stay resident and fragment further with each block: a streamed
    SparseGPT prune's peak RSS grew by about 10 MiB a block (measured, docs/results/streaming.md)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _return_freed_memory() -> None:
    """Hand the heap memory just freed back to the OS (glibc's `malloc_trim`; elsewhere nothing): what was allocated
    below the mmap threshold (`_big_allocations_mapped`) comes from the heap, whose free pages glibc keeps resident
    (measured before the threshold was fixed, when a block's tensors came from the heap too: without this, a streamed
    prune's resident set grew by 40 MB a block of 51 MB)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_streamed(model: nn.Module, directory: Path, max_shard_size: str,
                  read_part: Callable[[str], dict[str, torch.Tensor]], parts: list[str]) -> None:
    """Write the weights, index and configs `model.save_pretrained(directory, max_shard_size)` would write, byte for
    byte, holding one part of the model at a time.

    The plan (which tensor goes to which shard, under which saved name) is `save_pretrained`'s own, made on the
    meta skeleton: the saved state (`spp.hf.state_to_save`: tied weights once, fused expert weights split back) cut
    into shards by `huggingface_hub`'s splitter, with meta tensors counted as their real storage would be (a split
    expert weight's pieces share one storage, so they stay together). Each shard is then written tensor by tensor
    in safetensors' own order (`save_tensors_streamed`), each tensor taken from its part, read on demand.

    Args:
        model: the skeleton (`skeleton`), every parameter and persistent buffer on the meta device.
        directory: where to write (existing).
        max_shard_size: as `save_pretrained`'s (`"2GB"`).
        read_part: part prefix -> that part's real tensors by state name (`model.layers.3.mlp.down_proj.weight`).
        parts: the part prefixes (`model.layers.0.`, ...); "" stands for every tensor outside the others.
    """
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    from spp import hf
    from spp.io.checkpoint import save_tensors_streamed

    state = {name: t if t.is_meta else t.to("meta") for name, t in model.state_dict().items()}
    plan = hf.state_to_save(model, state)
    split = split_state_dict_into_shards_factory(
        plan, get_storage_size=lambda t: t.untyped_storage().nbytes(), filename_pattern="model{suffix}.safetensors",
        get_storage_id=lambda t: id(t.untyped_storage()), max_shard_size=max_shard_size)  # views of one storage: one
    ordered = sorted(parts, key=len, reverse=True)
    part_of = {name: next(p for p in ordered + [""] if name.startswith(p)) for name in plan}
    held: dict = {"part": None, "tensors": {}}

    def tensors(names):
        for name in names:
            if part_of[name] != held["part"]:
                held["tensors"] = {}  # the previous part is freed before the next is read
                held["tensors"] = hf.state_to_save(model, read_part(part_of[name]))
                held["part"] = part_of[name]
            yield {name: held["tensors"][name]}

    for filename, names in split.filename_to_tensors.items():
        names = _safetensors_order({name: plan[name].dtype for name in names})
        specs = {name: (plan[name].dtype, tuple(plan[name].shape)) for name in names}
        save_tensors_streamed(specs, tensors(names), Path(directory) / filename, metadata={"format": "pt"})
    held.clear()
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(Path(directory) / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    hf.save_configs(model, directory)


def _safetensors_order(dtypes: dict[str, torch.dtype]) -> list[str]:
    """The order safetensors lays tensors out in a file, asked of safetensors itself on empty stand-ins."""
    from safetensors.torch import save

    blob = save({name: torch.empty(0, dtype=dtype) for name, dtype in dtypes.items()})
    size = int.from_bytes(blob[:8], "little")
    return [name for name in json.loads(blob[8:8 + size]) if name != "__metadata__"]


def _state(model: nn.Module):
    """(name, owning module, attribute, tensor) of every parameter and persistent buffer, tied ones under each
    name."""
    for module_name, owner in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, param in owner.named_parameters(recurse=False):
            yield prefix + attr, owner, attr, param
        for attr, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and attr not in owner._non_persistent_buffers_set:
                yield prefix + attr, owner, attr, buffer


def _saved_names(checkpoint: Checkpoint, name: str) -> list[str]:
    """The saved tensors a parameter or persistent buffer is read from; refuses one spp cannot read."""
    if name in checkpoint.saved_names or name in checkpoint.pieces:
        return checkpoint.saved_tensors_of(name)
    raise SppError(f"{checkpoint.directory}: spp cannot read {name} tensor by tensor (transformers builds it with a "
                   "weight conversion spp does not invert), so it cannot stream this model")
