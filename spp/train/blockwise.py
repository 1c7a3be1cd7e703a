"""Block-wise recovery (`objective: blockwise`): each decoder block in turn learns to reproduce the dense block.

For block l = 1..L in order, with X_l the calibration windows' hidden states that reach block l through the
already-recovered sparse blocks 1..l−1 (X_1: the embeddings), the adapter of block l (any kind: its trainable
tensors θ_l, the pruned entries staying +0.0 as in end-to-end training) minimises, over `block_epochs` passes of
the windows,

    L_l(θ_l) = (1/N) Σ_n e(f_l(X_l; θ_l)_n, T_l,n),   T_l = g_l(Y_l)

where f_l is the sparse block with its adapter, g_l the teacher's dense block, n runs over the N tokens of a batch
and e is `spp.train.losses.feature_error_sum`'s per-token term: ‖t − s‖² / ‖t‖² (`block_loss: normalized`,
SquareHead's form) or ‖t − s‖² / H (`block_loss: mse`, the plain MSE of EBFT: Guo et al. 2024, "EBFT: Effective
and Block-Wise Fine-Tuning for Sparse LLMs"; block reconstruction as in BRECQ, Li et al. 2021). The teacher
block's input Y_l is the teacher's own hidden states (`block_target_inputs: dense`, Y_1 = X_1, Y_{l+1} = g_l(Y_l))
or the student's (`sparse`, Y_l = X_l). Then block l is frozen and X_{l+1} = f_l(X_l; θ_l).

One student block and one teacher block are on the device at a time, with the windows' activations (X_l, and
T_l / Y_l). Each finished block is persisted (`spp.io.progress.save_recovered_block`: its adapter tensors and the
next block's inputs), so `--resume` restarts at the first unfinished block, bit for bit. Batches, learning-rate
schedule and clipping follow the end-to-end settings (`batch_size` windows per optimizer step in micro-batches of
`micro_batch_size`, `learning_rate`, `lr_scheduler` and `warmup_ratio` restarted for each block, `max_grad_norm`,
`weight_decay`); a fresh AdamW per block. This module knows nothing about the output directory's other files
(`spp.train` writes them).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spp.errors import SppError
from spp.faults import fault_point
from spp.prune.sequential import BlockInputs, call_block, capture_block_inputs, run_block, to_device
from spp.train.loop import global_batch, lr_factor
from spp.train.losses import feature_error_sum


@dataclass
class Recovered:
    """What `recover_blocks` returns: the adapted weights' names, and a record per block (this run's and the
    resumed run's)."""

    adapted: list[str]
    records: list[dict]


def blockwise_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` calibration windows of `seqlen` ids from `source` (c4, wikitext2 or a local text file), as
    `spp prune --calib` draws them (`spp.data.calibration_windows`).

    Raises:
        SppError: a local file too short for one window (or for all of them), naming `cutoff_len` and `nsamples`.
    """
    from spp.data import HUB_CALIBRATION, calibration_windows, random_windows, read_text_documents, tokenize_stream

    if source in HUB_CALIBRATION:
        return calibration_windows(tokenizer, source, nsamples, seqlen, seed)
    stream = tokenize_stream(tokenizer, read_text_documents(Path(source).expanduser()))
    if stream.numel() < seqlen * nsamples:
        short = "too short for one window" if stream.numel() < seqlen else f"nsamples={nsamples} windows need {seqlen * nsamples}"
        raise SppError(f"calibration data {source} has only {stream.numel()} tokens; {short} of cutoff_len={seqlen}")
    return random_windows(stream, nsamples, seqlen, seed, source=source)


def recover_blocks(cfg, checkpoint, teacher_dir: Path, windows: torch.Tensor, adapter_cfg, device: torch.device,
                   dtype: str, workdir: Path, blocks_done: int,
                   check_block: Callable[[nn.Module, dict, str], None]) -> Recovered:
    """Train every decoder block's adapter against the teacher's block, in order (the module docstring's loss),
    streaming both models: each is a skeleton on the meta device (`spp.io.stream`), and only the embeddings (for
    the calibration inputs), then one student block and one teacher block at a time, are read from their shards
    and released after use. Each finished block's adapter tensors go into the progress (`workdir`), from which
    `write_recovered_adapter` writes the adapter file.

    Args:
        cfg: the `TrainConfig` (objective blockwise). checkpoint: the pruned student (`spp.io.reader.Checkpoint`).
        teacher_dir: the dense model. windows: (nsamples, cutoff_len) ids. adapter_cfg: the adapter to add.
        device: where each block runs. dtype: the base dtype's name (`precision`).
        workdir: `OUTPUT.partial/`, whose progress holds the finished blocks. blocks_done: blocks a resumed run
            takes from there.
        check_block: (trained block, its keep-masks by full parameter name, its full-name prefix) -> None; raises if
            a pruned entry is not +0.0.

    Raises:
        SppError: a NaN or ±inf weight in the student or teacher, nothing to adapt, or a non-finite loss.
    """
    from spp.adapter.model import add_block_adapter, adapter_state_dict, find_targets
    from spp.io.progress import recovered_inputs, save_recovered_block
    from spp.io.reader import read_checkpoint
    from spp.io.stream import load, outside_blocks, release, skeleton
    from spp.models import find_decoder_blocks

    student = skeleton(checkpoint, dtype).requires_grad_(False)
    teacher_checkpoint = read_checkpoint(teacher_dir)
    teacher = skeleton(teacher_checkpoint, dtype).requires_grad_(False)
    # names only: the masks themselves are decoded one block at a time (1 byte a weight)
    targets = list(find_targets(student, adapter_cfg, {checkpoint.owner(saved) for saved in checkpoint.mask_names}))
    if not targets:
        raise SppError(f"target_modules {cfg.target_modules} select only layers that {checkpoint.directory} left dense "
                       "(no entry in its mask file): nothing to adapt; set adapt_unpruned: true to adapt them anyway")
    prefix, blocks = find_decoder_blocks(student)
    teacher_prefix, teacher_blocks = find_decoder_blocks(teacher)
    # block 0's inputs and every block's call arguments: the embeddings only
    with outside_blocks(student, checkpoint, prefix), torch.no_grad():
        captured = capture_block_inputs(student, blocks, windows, cfg.micro_batch_size, device)
    streams, records = {"student": captured.hidden}, []
    if blocks_done:
        streams, records = recovered_inputs(workdir, blocks_done, device)
    for index in range(blocks_done, len(blocks)):
        block, own = blocks[index], f"{prefix}.{index}."
        load(student, checkpoint, own, device)
        masks = checkpoint.masks_by_parameter(own)
        torch.manual_seed(cfg.seed + index)  # the block's adapter init, whatever ran before it (a resumed run too)
        names = add_block_adapter(block, own, targets, adapter_cfg, masks)
        student_in = streams["student"]
        with torch.no_grad(), _autocast(cfg, device):  # the target: the dense block on Y_l (X_l when sparse)
            load(teacher, teacher_checkpoint, f"{teacher_prefix}.{index}.", device)
            target = run_block(teacher_blocks[index], index, _inputs(captured, streams.get("teacher", student_in)), device)
            release(teacher_blocks[index])
        record = train_block(block, student_in, target, captured, index, cfg, device) if names else {"block": index}
        block.requires_grad_(False)
        check_block(block, masks, own)
        last = index + 1 == len(blocks)
        with torch.no_grad(), _autocast(cfg, device):
            after = [] if last else run_block(block, index, _inputs(captured, student_in), device)
        captured.calls[index] = []
        streams = {"student": after}
        if cfg.block_target_inputs == "dense" and not last:
            streams["teacher"] = target  # the dense block's outputs are the next dense block's inputs
        records.append(record)
        save_recovered_block(workdir, index, {own + k: v for k, v in adapter_state_dict(block).items()}, streams,
                             record)
        release(block)  # its adapter is in the progress now: free the block, and what training it left on the heap
        blocks[index] = nn.Module()  # drop the block with the adapter's state
        fault_point("block_done", index)
    return Recovered(adapted=targets, records=records)


def write_recovered_adapter(workdir: Path, adapter_cfg, n_blocks: int) -> int:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `workdir` from the progress's per-block
    adapter files, one block at a time (`spp.io.checkpoint.save_tensors_streamed`), as `save_adapter` would.

    Returns:
        The number of adapter entries (trainable parameters).
    """
    from safetensors import safe_open

    from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, save_tensors_streamed, write_json
    from spp.io.progress import recovered_adapter, recovered_adapter_path
    from spp.io.reader import _DTYPES

    specs = {}
    for index in range(n_blocks):
        with safe_open(str(recovered_adapter_path(workdir, index)), "pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                specs[key] = (_DTYPES[sliced.get_dtype()], tuple(sliced.get_shape()))
    chunks = (recovered_adapter(workdir, index) for index in range(n_blocks))
    ordered = ({key: chunk[key] for key in specs if key in chunk} for chunk in chunks)
    save_tensors_streamed(specs, ordered, workdir / ADAPTER_WEIGHTS_FILE, metadata={"format": "spp-adapter"})
    write_json(workdir / ADAPTER_CONFIG_FILE, adapter_cfg.to_json())
    return sum(math.prod(shape) for _, shape in specs.values())


def _inputs(captured: BlockInputs, hidden: list[torch.Tensor]) -> BlockInputs:
    return BlockInputs(hidden=hidden, calls=captured.calls, hidden_as_kwarg=captured.hidden_as_kwarg,
                       storage=captured.storage)


def _autocast(cfg, device: torch.device):
    """bf16 runs the blocks under autocast, as accelerate does end to end; fp32 runs them as they are."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def train_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], captured: BlockInputs,
                index: int, cfg, device: torch.device) -> dict:
    """Fit block `index`'s adapter so its outputs on `inputs` match `targets` (both one (B, T, H) tensor per
    micro-batch of windows); `block_epochs` passes, `batch_size // micro_batch_size` micro-batches per step.

    Returns:
        The block's record: steps, and the loss (Σ e / N over a step's tokens) of its first step and the mean of each
        epoch's steps.

    Raises:
        SppError: the loss is NaN or ±inf (names the block and step).
    """
    params = [p for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = max(1, cfg.batch_size // cfg.micro_batch_size)
    steps_per_epoch = len(inputs) // per_step
    total = cfg.block_epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total)
    normalized = cfg.block_loss == "normalized"
    calls = captured.calls[index]
    epoch_losses, first = [0.0] * cfg.block_epochs, None
    for step in range(total):
        chunks = global_batch(len(inputs), per_step, cfg.seed + index * cfg.block_epochs, step)
        n_tokens = sum(inputs[c].shape[0] * inputs[c].shape[1] for c in chunks)
        summed = 0.0
        for c in chunks:
            with _autocast(cfg, device):
                out = call_block(block, inputs[c].to(device), to_device(calls[c], device), captured.hidden_as_kwarg)
            loss = feature_error_sum(out, targets[c].to(device), normalized)
            (loss / n_tokens).backward()
            summed += float(loss.detach())
        value = summed / n_tokens
        if not math.isfinite(value):
            raise SppError(f"the block-wise loss of block {index} is {value} at its step {step + 1}; lower "
                           "learning_rate (the blocks before it are kept: continue with --resume)")
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, total, warmup, cfg.lr_scheduler)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = value if first is None else first
        epoch_losses[step // steps_per_epoch] += value / steps_per_epoch
        fault_point("block_step", index * total + step + 1)  # counted over the run (every block has `total`)
        fault_point("block_sigint", index * total + step + 1, signal.SIGINT)  # a Ctrl-C mid-block
    return {"block": index, "steps": total, "first_loss": first, "epoch_losses": epoch_losses}
