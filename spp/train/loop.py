"""The training loop under accelerate: one optimizer step per global batch, logging, checkpoints, resume.

How the model is spread over processes (one, DDP, or FSDP2 shards) is the strategy's business
(`spp.train.strategy`): the loop asks it for each micro-batch's context, the gradient clipping and the
checkpoint's adapter and AdamW state; accelerate starts the processes and reduces the loop's counters.
The checkpoint's other files are `spp.io.trainer_state`'s.

Data order is a pure function of (seed, step): epoch e visits the training examples in
the order `randperm(n, seed + e)`, and global step t takes the next `batch_size` of
them. Each process takes its own contiguous slice of that global batch (so ranks see
disjoint examples) and runs it in micro-batches of `micro_batch_size`. Because the
order is recomputed from the step, a checkpoint only has to record the step count to
resume the data exactly. Loss = summed token NLL over the global batch / its number
of target tokens, so one process, several processes and a resumed run all optimise
the same quantity. This module does not load models or data (`spp.train` does).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spp.config import TrainConfig
from spp.data import pad_batch
from spp.errors import SppError, SppInterrupted
from spp.faults import fault_point
from spp.io.checkpoint import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, TRAIN_LOG_FILE
from spp.io.trainer_state import (LoopState, checkpoint_dirs, checkpoint_tmp, commit_checkpoint, data_position,
                                  load_rng, new_checkpoint, read_trainer_state, save_rng, write_trainer_state)
from spp.train.distill import Distillation
from spp.train.strategy import Strategy
from spp.train.losses import kd_kl_sum, squarehead_sum, summed_nll, target_count

Example = tuple[list[int], list[int]]  # (input_ids, labels)


# --------------------------------------------------------------------------- pure pieces


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps. Then, with
    p = (step - warmup_steps) / (total_steps - warmup_steps) in [0, 1):
    linear 1 - p, cosine (1 + cos πp) / 2, constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def global_batch(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of global step `step`: epoch e = step // (n // B) shuffles with `seed + e`.

    A last incomplete batch of each epoch is skipped (it would change the batch size).
    """
    steps_per_epoch = n_examples // batch_size
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[within * batch_size : (within + 1) * batch_size].tolist()


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This process's contiguous share of a global batch (len divisible by world_size)."""
    share = len(indices) // world_size
    return indices[rank * share : (rank + 1) * share]


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator, strategy, model, optimizer, adapter_cfg, state: LoopState, workdir: Path,
                    keep: int, position: dict) -> Path:
    """Write `checkpoints/step-N/` atomically: build `step-N.tmp/`, then rename; then drop old ones.

    The previous checkpoint stays until the new one is complete; at most `keep` remain.
    Every process writes its own RNG state and takes part in the strategy's writes of the adapter and AdamW
    state (a sharded model's are collectives, and its shards need a filesystem all processes share); the main
    process writes the trainer state (`spp.io.trainer_state`).
    """
    if accelerator.is_main_process:
        new_checkpoint(workdir, state.step)
    accelerator.wait_for_everyone()
    tmp = checkpoint_tmp(workdir, state.step)
    save_rng(tmp, accelerator.process_index)
    strategy.save_adapter(model, adapter_cfg, tmp)
    fault_point("checkpoint_write", state.step)
    strategy.save_optimizer(model, optimizer, tmp)
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None  # fp16 loss scale
        write_trainer_state(tmp, state, position, scaler)
    accelerator.wait_for_everyone()
    final = tmp.with_name(f"{CHECKPOINT_PREFIX}{state.step}")
    if accelerator.is_main_process:
        commit_checkpoint(workdir, state.step, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, strategy, model, optimizer, checkpoint: Path, n_examples: int) -> LoopState:
    """Restore adapter, optimizer, RNG and loop state from `checkpoint` (in place).

    Raises:
        SppError: the checkpoint does not fit (another adapter, other processes, or data
            that now gives another number of training examples).
    """
    strategy.load_state(model, optimizer, checkpoint)
    load_rng(checkpoint, accelerator.process_index)
    state, scaler = read_trainer_state(checkpoint, n_examples)
    if scaler and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    return state


# --------------------------------------------------------------------------- the loop


def evaluate(accelerator, model, examples: list[Example], micro_batch_size: int, pad_id: int) -> float:
    """Validation loss: Σ NLL / Σ targets over all `examples`, each process taking every world-th one."""
    share = examples[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (Σ NLL, Σ targets)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(share), micro_batch_size):
            batch = {k: v.to(accelerator.device) for k, v in pad_batch(share[start : start + micro_batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            totals[0] += summed_nll(logits, batch["labels"]).double()
            totals[1] += target_count(batch["labels"])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


@dataclass
class LoopInputs:
    """What the loop needs besides the model: data, settings and where to write."""

    train: list[Example]
    val: list[Example]
    pad_id: int
    total_steps: int
    cfg: TrainConfig
    workdir: Path
    strategy: Strategy  # how the model is spread over processes (spp.train.strategy)
    distill: Distillation | None = None  # the teacher, when kd_weight or squarehead_weight > 0


TERMS = ("ce", "kd", "squarehead")  # the loss terms logged besides the total, in _step's order


def _micro_batch_loss(accelerator, model, batch: dict, ce_weight: float,
                      distill: Distillation | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's ce_weight·Σnll + kd_weight·Σkl + squarehead_weight·Σsq (differentiable) and the
    three sums (float64, detached; a term whose weight is 0 is not computed and reads 0)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if distill is None:
        nll = summed_nll(model(**inputs).logits, batch["labels"])
        loss = nll if ce_weight == 1.0 else ce_weight * nll
        return loss, torch.stack([nll.detach().double(), *torch.zeros(2, dtype=torch.float64, device=nll.device)])
    labels = batch["labels"]
    teacher_rec = distill.teacher_blocks.recording() if distill.teacher_blocks else contextlib.nullcontext([])
    student_rec = distill.student_blocks.recording() if distill.student_blocks else contextlib.nullcontext([])
    # The teacher first, without a graph: only its logits (and block outputs) outlive its forward.
    with torch.no_grad(), accelerator.autocast(), teacher_rec as teacher_hiddens:
        teacher_logits = distill.teacher(**inputs).logits
    with student_rec as student_hiddens:
        logits = model(**inputs).logits
    nll = summed_nll(logits, labels)
    zero = torch.zeros((), dtype=torch.float32, device=nll.device)
    kl = kd_kl_sum(logits, teacher_logits, labels, distill.temperature) if distill.kd_weight > 0 else zero
    sq = squarehead_sum(student_hiddens, teacher_hiddens, labels) if distill.squarehead_weight > 0 else zero
    loss = sum(w * term for w, term in ((ce_weight, nll), (distill.kd_weight, kl), (distill.squarehead_weight, sq))
               if w > 0)
    return loss, torch.stack([nll.detach(), kl.detach(), sq.detach()]).double()


def _step(accelerator, strategy: Strategy, model, batches: list[dict], world_size: int, ce_weight: float = 1.0,
          distill: Distillation | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over this process's micro-batches; gradients of (ce_weight·Σ NLL + the
    distillation terms) / N_global.

    N_global, the target count of the whole global batch, is all-reduced first. DDP and FSDP
    average gradients over processes, so each process scales its loss by world_size. Gradients
    are synchronised after the last micro-batch only (`strategy.micro_batch`).

    Returns:
        (Σ over the global batch of (loss, NLL, KL, SquareHead) as a float64 (4,) tensor, N_global,
        input tokens of the global batch).
    """
    local = torch.tensor([sum(target_count(b["labels"]) for b in batches),
                          sum(int(b["attention_mask"].sum()) for b in batches)], device=accelerator.device)
    n_targets, n_tokens = accelerator.reduce(local, reduction="sum")
    totals = torch.zeros(1 + len(TERMS), dtype=torch.float64, device=accelerator.device)
    for k, batch in enumerate(batches):
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        with strategy.micro_batch(model, last=k == len(batches) - 1):
            loss, terms = _micro_batch_loss(accelerator, model, batch, ce_weight, distill)
            accelerator.backward(loss * (world_size / n_targets.clamp(min=1)))
        totals[0] += loss.detach().double()
        totals[1:] += terms
    return accelerator.reduce(totals, reduction="sum"), n_targets, n_tokens


def train_loop(accelerator, model, optimizer, adapter_cfg, inputs: LoopInputs, state: LoopState) -> LoopState:
    """Run optimizer steps `state.step` .. `inputs.total_steps - 1`, logging, evaluating and saving.

    Raises:
        SppError: the loss became NaN/inf (the step is not applied; names the last good checkpoint).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg, world, rank = inputs.cfg, accelerator.num_processes, accelerator.process_index
    micro = cfg.micro_batch_size
    warmup = math.ceil(cfg.warmup_ratio * inputs.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    log_path = inputs.workdir / TRAIN_LOG_FILE
    window_tokens, window_start, rate = 0, time.perf_counter(), 0.0
    if inputs.val and state.step == 0:  # the pruned model's own validation loss, as the baseline
        state.val_loss = evaluate(accelerator, model, inputs.val, micro, inputs.pad_id)
        _append_log(accelerator, log_path, {"step": 0, "val_loss": state.val_loss})
    model.train()
    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not accelerator.is_main_process) as progress, InterruptGuard() as guard:
        task = progress.add_task("train", total=inputs.total_steps, completed=state.step, info="")
        while state.step < inputs.total_steps:
            ids = rank_slice(global_batch(len(inputs.train), cfg.batch_size, cfg.seed, state.step), rank, world)
            batches = [pad_batch([inputs.train[i] for i in ids[j : j + micro]], inputs.pad_id)
                       for j in range(0, len(ids), micro)]
            sums, n_targets, n_tokens = _step(accelerator, inputs.strategy, model, batches, world, cfg.ce_weight,
                                              inputs.distill)
            if int(n_targets) == 0:  # spp.train.build_examples drops every example without a target token
                raise RuntimeError(f"step {state.step + 1} has no target token in its global batch; this is a bug in spp")
            loss = float(sums[0] / n_targets.clamp(min=1))
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                _stop_on_bad_loss(loss, state.step + 1, inputs.workdir)
            lr = cfg.learning_rate * lr_factor(state.step, inputs.total_steps, warmup, cfg.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.max_grad_norm is not None:
                inputs.strategy.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += int(n_tokens)
            state.train_loss = loss
            window_tokens += int(n_tokens)
            record = None
            if state.step % cfg.logging_steps == 0 or state.step == inputs.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": state.step, "epoch": state.step * cfg.batch_size / len(inputs.train), "loss": loss,
                          "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9), "tokens_seen": state.tokens_seen,
                          "targets": int(n_targets), "example_ids": _gather_ids(accelerator, ids)}
                if inputs.distill is not None:  # each term / N, as optimised before its weight
                    weights = (cfg.ce_weight, cfg.kd_weight, cfg.squarehead_weight)
                    record.update({name: float(sums[i + 1] / n_targets.clamp(min=1))
                                   for i, name in enumerate(TERMS) if name == "ce" or weights[i] > 0})
            if inputs.val and (state.step % cfg.eval_steps == 0 or state.step == inputs.total_steps):
                state.val_loss = evaluate(accelerator, model, inputs.val, micro, inputs.pad_id)
                record = {**(record or {"step": state.step}), "val_loss": state.val_loss}
            if record is not None:
                _append_log(accelerator, log_path, record)
            saved = state.step % cfg.save_steps == 0 or state.step == inputs.total_steps
            if saved:
                position = data_position(len(inputs.train), cfg.batch_size, cfg.seed, state.step)
                save_checkpoint(accelerator, inputs.strategy, model, optimizer, adapter_cfg, state, inputs.workdir,
                                cfg.save_total_limit, position)
            if record is not None and "tokens_per_s" in record:  # the next window starts after eval and save
                rate, window_tokens, window_start = record["tokens_per_s"], 0, time.perf_counter()
            progress.update(task, completed=state.step, info=f"loss {loss:.4f}  lr {lr:.2e}  {rate:.0f} tok/s")
            fault_point("train_step", state.step)
            fault_point("train_sigint", state.step, signal.SIGINT)  # a Ctrl-C arriving during this step
            if state.step < inputs.total_steps and _stop_requested(accelerator, guard):  # after the last, finish
                if not saved:
                    position = data_position(len(inputs.train), cfg.batch_size, cfg.seed, state.step)
                    save_checkpoint(accelerator, inputs.strategy, model, optimizer, adapter_cfg, state,
                                    inputs.workdir, cfg.save_total_limit, position)
                raise SppInterrupted(f"interrupted at step {state.step} of {inputs.total_steps}; the checkpoint is "
                                     f"in {inputs.workdir / CHECKPOINTS_DIR}",
                                     "continue with the same `spp train ...` command plus --resume")
        if guard.requested and accelerator.is_main_process:
            print("interrupt: that was the last step; writing the output", file=sys.stderr)
    return state


STOP_MESSAGE = "interrupt: saving a checkpoint after this step (press Ctrl-C again to stop at once)"
FINISH_MESSAGE = ("interrupt: training is done; finishing the output (press Ctrl-C again to stop at once; "
                  "--resume then writes it)")


class InterruptGuard:
    """Ctrl-C while training: the first SIGINT asks the loop to save a checkpoint at the end of the
    current step and stop (`requested`); a second one raises KeyboardInterrupt at once.

    With `message=None` the guard is not armed: a Ctrl-C goes to the previous handler (KeyboardInterrupt by
    default), until `message` is set (`spp.train.run_train` sets FINISH_MESSAGE once the last step is done, so a
    Ctrl-C while the output is written does not stop it). Installed only in the main thread (Python delivers
    signals there); the previous handler is restored on exit.
    """

    def __init__(self, message: str | None = STOP_MESSAGE):
        self.requested = False
        self.message = message
        self._previous = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.message is None and callable(self._previous):
            return self._previous(signum, frame)
        if self.requested or self.message is None:
            raise KeyboardInterrupt
        self.requested = True
        print(self.message, file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _stop_requested(accelerator, guard: InterruptGuard) -> bool:
    """Whether any process got a Ctrl-C (all processes must agree, since saving has barriers)."""
    if accelerator.num_processes == 1:
        return guard.requested
    flag = torch.tensor([float(guard.requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _append_log(accelerator, log_path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _gather_ids(accelerator, ids: list[int]) -> list[list[int]]:
    """Every process's example indices for this step, as [rank 0's, rank 1's, …]."""
    if accelerator.num_processes == 1:
        return [list(ids)]
    from accelerate.utils import gather_object

    return [list(chunk) for chunk in gather_object([list(ids)])]


def _stop_on_bad_loss(loss: float, step: int, workdir: Path) -> None:
    saved = checkpoint_dirs(workdir)
    where = (f"the last good checkpoint is {saved[-1]}; continue from it with --resume (after lowering learning_rate)"
             if saved else f"no checkpoint was saved yet; the partial output is {workdir}")
    raise SppError(f"the training loss is {loss} at step {step}; stopped without applying that step. {where}")
