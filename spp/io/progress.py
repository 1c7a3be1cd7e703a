"""Per-block progress of `spp prune`, kept in `OUTPUT.partial/prune-progress/` so a killed run can resume.

After decoder block i is pruned, `save_block` writes (each file through a temporary name
and a rename): `block-i.safetensors` (the block's pruned parameters and buffers, bitwise),
`masks-i.safetensors` (its bool keep-masks (out, in), or (E, out, in) for a fused expert
weight, keyed by block-relative layer name) and `hidden-(i+1).safetensors` (block i+1's
calibration inputs, one (batch, seq, hidden) tensor per chunk of windows). Only then does
`progress.json` (the settings it was made with, their sha256, the run conditions
(`spp.io.conditions`: threads, device, dtype, versions), the sha256 of every input file
(`spp.prune.output.input_hashes`), OWL's block sparsities once its
statistics pass is done (`save_owl`), and per finished block its statistics) advance to
i + 1, and the now stale `hidden-i` is deleted. A kill between two writes therefore leaves
`progress.json` pointing at complete files. The per-call keyword arguments of each block
(attention masks, position embeddings) are not stored: resuming recomputes them from the
embeddings, which is cheap and deterministic; a mixture-of-experts block's routed tokens
come from its inputs, so they are not stored either. SparseGPT changes the kept weights, so
the blocks are stored whole rather than as masks. Nothing here is unpickled: tensors in
safetensors, the rest JSON.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spp.errors import SppError, first_line
from spp.io.checkpoint import BLOCKWISE_PROGRESS_DIR, PRUNE_PROGRESS_DIR, PRUNE_PROGRESS_FILE, read_json, save_tensors, write_json
from spp.io.conditions import check_same_conditions, check_same_inputs, check_same_settings
from spp.io.manifest import settings_sha256


@dataclass
class BlockRecord:
    """What `prune_model` keeps for a finished block besides its weights: per-parameter layout and
    sparsity statistics (keyed by full parameter name; a fused expert weight's also list its saved pieces with
    their routed tokens and method), and SparseGPT dampening retries."""

    layouts: dict[str, str]
    module_stats: dict[str, dict]
    retries: list[dict]


@dataclass
class Restored:
    """The state of an interrupted prune: finished blocks' masks and records, and the next block's inputs."""

    blocks_done: int
    masks: list[dict[str, torch.Tensor]]
    records: list[BlockRecord]
    hidden: list[torch.Tensor] | None


def progress_dir(partial: Path, name: str = PRUNE_PROGRESS_DIR) -> Path:
    return Path(partial) / name


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors through a temporary file and a rename, so a kill never leaves half a file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SppError(f"--resume: {path} is missing; the interrupted run's progress is incomplete "
                       "(run without --resume to start over)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"--resume: {path} is corrupt or truncated ({exc}); run without --resume to start over") from exc


def start_progress(partial: Path, settings: dict, n_blocks: int, conditions: dict, inputs: dict,
                   name: str = PRUNE_PROGRESS_DIR) -> None:
    """Record a fresh run's settings, run conditions and input files' sha256 (no block finished yet) in
    `partial/name/` (prune's progress, or block-wise recovery's)."""
    directory = progress_dir(partial, name)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / PRUNE_PROGRESS_FILE, {"settings": settings, "settings_sha256": settings_sha256(settings),
                                                 "conditions": conditions, "inputs": inputs, "n_blocks": n_blocks,
                                                 "blocks_done": 0,
                                                 "blocks": []})


def check_resumable(partial: Path, settings: dict, conditions: dict, inputs: dict, name: str = PRUNE_PROGRESS_DIR,
                    stage: str = "prune", defaults: dict | None = None) -> int:
    """The number of finished blocks of the interrupted run in `partial`, if it used the same settings, read the
    same input files (`inputs`: path -> sha256) and ran under the same conditions
    (`spp.io.conditions.run_conditions`), so the result stays bit-exact. With no progress recorded there it
    says so in a note on stderr and returns 0: the run starts from the beginning. A setting the interrupted run did
    not record (added to spp since) counts as its value in `defaults` (`spp.typed.field_defaults`), as a train
    --resume counts it.

    Raises:
        SppError: a setting differs (names the first differing key), an input file changed
            (names it), or a run condition differs (names it and how to match it).
    """
    path = progress_dir(partial, name) / PRUNE_PROGRESS_FILE
    if not path.is_file():  # never started, or killed before it recorded progress: `spp run` and scripts always resume
        print(f"note: --resume: nothing to resume in {partial} (no interrupted {stage} recorded progress there); "
              "starting from the beginning", file=sys.stderr)
        return 0
    saved = read_json(path, what=f"{stage} progress")
    # a setting added to spp after the interrupted run started was at its default (`defaults`) then, as in train
    old = {**{k: v for k, v in (defaults or {}).items() if k in settings}, **saved.get("settings", {})}
    check_same_settings(old, settings, "run without --resume to start over")
    check_same_inputs(saved.get("inputs"), inputs, "the interrupted run", "run without --resume to start over")
    check_same_conditions(saved.get("conditions"), conditions, "the interrupted run",
                          "run without --resume to start over")
    return int(saved["blocks_done"])


def save_owl(partial: Path, record: dict) -> None:
    """Keep OWL's per-block outlier shares and sparsities in `progress.json`, so `--resume` does not redo the
    statistics pass (whose numbers would come out the same: same settings, calibration and run conditions)."""
    path = progress_dir(partial) / PRUNE_PROGRESS_FILE
    progress = read_json(path, what="prune progress")
    progress["owl"] = record
    write_json(path, progress)


def load_owl(partial: Path) -> dict | None:
    """The OWL record `save_owl` kept, or None when the interrupted run had not finished its statistics pass."""
    path = progress_dir(partial) / PRUNE_PROGRESS_FILE
    return read_json(path, what="prune progress").get("owl") if path.is_file() else None


def save_block(partial: Path, index: int, block: nn.Module, masks: dict[str, torch.Tensor],
               hidden: list[torch.Tensor] | None, record: BlockRecord) -> None:
    """Persist finished block `index` and the next block's inputs, then advance `progress.json`."""
    _advance(progress_dir(partial), index, {"block": block.state_dict(), "masks": masks},
             None if hidden is None else {f"chunk.{c}": h for c, h in enumerate(hidden)}, record.__dict__,
             "prune progress")


def _advance(directory: Path, index: int, files: dict[str, dict[str, torch.Tensor]],
             hidden: dict[str, torch.Tensor] | None, record: dict, what: str) -> None:
    """Write block `index`'s tensor files (`NAME-index.safetensors` for each of `files`) and the next block's inputs
    (`hidden-(index+1)`, unless None), then advance `progress.json` to index + 1 with `record`, then delete the spent
    `hidden-index`: a kill between two writes leaves `progress.json` pointing at complete files."""
    for name, tensors in files.items():
        _save_tensors(directory / f"{name}-{index}.safetensors", tensors)
    if hidden is not None:
        _save_tensors(directory / f"hidden-{index + 1}.safetensors", hidden)
    path = directory / PRUNE_PROGRESS_FILE
    progress = read_json(path, what=what)
    progress["blocks"] = progress["blocks"][:index] + [record]
    progress["blocks_done"] = index + 1
    write_json(path, progress)
    (directory / f"hidden-{index}.safetensors").unlink(missing_ok=True)  # block index's inputs are spent


def load_block(partial: Path, index: int) -> dict[str, torch.Tensor]:
    """Finished block `index`'s parameters and buffers as `save_block` kept them, by block-relative name.

    Raises:
        SppError: the file is missing or corrupt.
    """
    return _load_tensors(progress_dir(partial) / f"block-{index}.safetensors")


def restore_blocks(partial: Path, blocks: nn.ModuleList, blocks_done: int, calibrated: bool,
                   storage: torch.device, load_weights: bool = True) -> Restored:
    """Load finished blocks 0 .. blocks_done - 1 into `blocks` (in place; not with `load_weights=False`, for a
    streamed model, whose output is written from the progress) and block `blocks_done`'s inputs.

    Raises:
        SppError: a progress file is missing or corrupt, or a stored block does not fit the model.
    """
    directory = progress_dir(partial)
    progress = read_json(directory / PRUNE_PROGRESS_FILE, what="prune progress")
    masks, records = [], []
    for index in range(blocks_done):
        if load_weights:
            try:
                blocks[index].load_state_dict(load_block(partial, index), strict=True)
            except RuntimeError as exc:
                raise SppError(f"--resume: {directory / f'block-{index}.safetensors'} does not fit block {index} "
                               f"of the model: {first_line(exc)}") from exc
        masks.append({k: v.to(torch.bool) for k, v in _load_tensors(directory / f"masks-{index}.safetensors").items()})
        records.append(BlockRecord(**progress["blocks"][index]))
    hidden = None
    if calibrated and 0 < blocks_done < len(blocks):  # with none done, the captured inputs are block 0's
        chunks = _load_tensors(directory / f"hidden-{blocks_done}.safetensors")
        hidden = [chunks[f"chunk.{c}"].to(storage) for c in range(len(chunks))]
    return Restored(blocks_done=blocks_done, masks=masks, records=records, hidden=hidden)


# --------------------------------------------------------------------------- block-wise recovery (spp.train.blockwise)


def save_recovered_block(partial: Path, index: int, tensors: dict[str, torch.Tensor],
                         hidden: dict[str, list[torch.Tensor]], record: dict) -> None:
    """Persist recovered block `index` of `spp train` with `objective: blockwise`, then advance its progress.

    Writes `adapter-i.safetensors` (the block's trained adapter tensors, keyed as in `adapter_model.safetensors`)
    and `hidden-(i+1).safetensors` (block i+1's inputs: `<stream>.<chunk>` for each stream, the student's and, with
    dense targets, the teacher's), then `progress.json` (`blocks_done` = i + 1, the block's `record`), then deletes
    the spent `hidden-i`. As for prune, a kill between two writes leaves `progress.json` pointing at complete files.
    """
    _advance(progress_dir(partial, BLOCKWISE_PROGRESS_DIR), index, {"adapter": tensors},
             {f"{stream}.{c}": h for stream, chunks in hidden.items() for c, h in enumerate(chunks)} if hidden else None,
             record, "train progress")


def recovered_adapter(partial: Path, index: int) -> dict[str, torch.Tensor]:
    """Recovered block `index`'s adapter tensors, as `save_recovered_block` wrote them.

    Raises:
        SppError: the file is missing or corrupt (names it).
    """
    return _load_tensors(recovered_adapter_path(partial, index))


def recovered_adapter_path(partial: Path, index: int) -> Path:
    return progress_dir(partial, BLOCKWISE_PROGRESS_DIR) / f"adapter-{index}.safetensors"


def recovered_inputs(partial: Path, blocks_done: int, storage: torch.device) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Block `blocks_done`'s inputs by stream (one tensor per chunk of windows) and the finished blocks' records.

    Raises:
        SppError: the file is missing or corrupt (names it).
    """
    directory = progress_dir(partial, BLOCKWISE_PROGRESS_DIR)
    records = read_json(directory / PRUNE_PROGRESS_FILE, what="train progress")["blocks"][:blocks_done]
    flat = _load_tensors(directory / f"hidden-{blocks_done}.safetensors")
    streams: dict[str, list[torch.Tensor]] = {}
    for key in sorted(flat, key=lambda k: (k.rpartition(".")[0], int(k.rpartition(".")[2]))):
        streams.setdefault(key.rpartition(".")[0], []).append(flat[key].to(storage))
    return streams, records
