"""`spp train`: fine-tune a pruned model with a sparsity-preserving adapter, keeping every pruned zero.

`run_train(cfg)` reads top to bottom: check the inputs (base directory, mask file and
manifest, data, output), start accelerate, tokenize the data, load the pruned model
and wrap its target layers in the adapter layer of `cfg.adapter` (`spp.adapter`), then run `train.loop` inside the output's
`DIR.partial/` (kept on a crash so `--resume` can continue, under the same run conditions and from
the same base, mask, data and teacher, `spp.io.conditions`), check the pruned-entries
invariant on the effective weights, and write the adapter, the manifest and the log.
The loop itself (steps, checkpoints) is `spp.train.loop`, the checkpoint's resume state `spp.io.trainer_state`;
how the model is loaded and spread over processes (accelerate's DDP, or FSDP2 shards with
`distributed: fsdp`) is the strategy's (`spp.train.strategy`). With `objective: blockwise`, `run_blockwise` takes
the same inputs and writes the same output, training one decoder block at a time against the teacher's
(`spp.train.blockwise`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spp.config import TrainConfig, read_yaml, to_dict, write_yaml
from spp.errors import SppError, first_line
from spp.io.conditions import check_same_conditions, check_same_inputs, check_same_settings, run_conditions
from spp.io.checkpoint import (MASK_FILE, RESOLVED_CONFIG_FILE, TRAIN_LOG_FILE, atomic_dir, check_not_an_input,
                               check_output_dir, mask_path, partial_path, sha256_file)
from spp.typed import field_defaults

PRECISIONS = {"fp32": ("no", "float32"), "bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16")}  # accelerate, base dtype
# Keys that may change between a run and its --resume (they do not change the numbers).
RESUMABLE_CHANGES = {"resume", "overwrite", "logging_steps", "eval_steps", "save_steps", "save_total_limit"}


@dataclass
class TrainReport:
    """What `spp train` did."""

    output: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    trainable_params: int
    adapted_modules: int
    train_examples: int
    val_examples: int
    world_size: int
    tokens_seen: int
    resumed_from: int  # the step a --resume started at (0 for a fresh run)
    wall_time_s: float
    teacher_param_bytes: int = 0  # the distillation teacher's parameters in memory (0 without a teacher)


def run_train(cfg: TrainConfig) -> TrainReport:
    """Train the adapter `cfg.adapter` (SPP, masked LoRA or full) on `cfg.base_model` and write it to `cfg.output_dir`.

    Raises:
        SppError: bad inputs (before anything is written), a NaN or ±inf weight in the base or the teacher
            (right after it is loaded, before the partial output exists), a non-finite loss (the partial
            output and its last checkpoint are kept), or a failed resume.
    """
    from spp.adapter.model import count_trainable
    from spp.io.trainer_state import LoopState, checkpoint_dirs, truncate_log
    from spp.models import load_tokenizer
    from spp.train.distill import Distillation, check_teacher, load_teacher, parameter_bytes
    from spp.train.fsdp import gathered_layers
    from spp.train.loop import FINISH_MESSAGE, InterruptGuard, LoopInputs, load_checkpoint, train_loop
    from spp.train.strategy import strategy_for

    start = time.time()
    checkpoint, output = check_inputs(cfg)
    if cfg.objective == "blockwise":
        return run_blockwise(cfg, checkpoint, output, start)
    if cfg.resume and not checkpoint_dirs(partial_path(output)):  # nothing to resume (check_inputs said so)
        from dataclasses import replace

        cfg = replace(cfg, resume=False)
    base, mask_sha256 = checkpoint.directory, checkpoint.mask_sha256
    teacher_dir = check_teacher(cfg, checkpoint) if cfg.teacher else None  # configs and tokenizers only: cheap
    data_hashes = data_identity(cfg.data_path)  # hashed once: the checkpoints and the manifest record it
    inputs = input_identity(checkpoint, data_hashes, teacher_dir)
    accelerator = make_accelerator(cfg)
    dtype = PRECISIONS[cfg.precision][1]
    conditions = run_conditions(accelerator.device, dtype, accelerator.num_processes)
    if cfg.resume:
        check_resumable_conditions(partial_path(output), conditions, inputs)
    tokenizer = load_tokenizer(str(base))
    train, val = build_examples(cfg, tokenizer)
    total_steps = plan_steps(cfg, len(train))
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    from accelerate.utils import set_seed

    teacher = None
    if teacher_dir is not None:  # before set_seed, so the student's init draws the same numbers as without one
        teacher = load_teacher(teacher_dir, dtype, accelerator.device)
    set_seed(cfg.seed)  # the same α init on every process
    adapter_cfg = cfg.adapter_config(base_model=str(base.resolve()), mask_sha256=mask_sha256)
    strategy = strategy_for(cfg, accelerator)
    try:  # a process group the strategy started itself (one-rank FSDP) is closed however the run ends
        model, adapted = strategy.load_model(checkpoint, dtype, adapter_cfg, checkpoint.masks_by_parameter())
        if teacher is not None:
            strategy.prepare_teacher(teacher)
        if not adapted:
            raise SppError(f"target_modules {cfg.target_modules} select only layers that {base} left dense (no entry "
                           "in its mask file): nothing to adapt; set adapt_unpruned: true to adapt them anyway")
        trainable = count_trainable(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        model, optimizer = strategy.prepare(model, optimizer)
        distill = Distillation.build(cfg, teacher, accelerator.unwrap_model(model)) if teacher is not None else None

        # not armed until the last step is done; then a Ctrl-C no longer stops the run, up to the output's rename
        with InterruptGuard(message=None) as finishing, output_workdir(accelerator, output, cfg) as workdir:
            state = LoopState(run_conditions=conditions, inputs=inputs)
            if cfg.resume:
                state = load_checkpoint(accelerator, strategy, model, optimizer, checkpoint_dirs(workdir)[-1], len(train))
                if accelerator.is_main_process:
                    truncate_log(workdir / TRAIN_LOG_FILE, state.step)
            elif accelerator.is_main_process:
                write_yaml(workdir / RESOLVED_CONFIG_FILE, cfg)
            resumed_from = state.step
            inputs = LoopInputs(train=train, val=val, pad_id=pad_id, total_steps=total_steps, cfg=cfg, workdir=workdir,
                                strategy=strategy, distill=distill)
            state = train_loop(accelerator, model, optimizer, adapter_cfg, inputs, state)
            finishing.message = FINISH_MESSAGE
            report = TrainReport(output=output, steps=state.step, train_loss=state.train_loss, val_loss=state.val_loss,
                                 trainable_params=trainable, adapted_modules=len(adapted), train_examples=len(train),
                                 val_examples=len(val), world_size=accelerator.num_processes,
                                 tokens_seen=state.tokens_seen, resumed_from=resumed_from, wall_time_s=time.time() - start,
                                 teacher_param_bytes=parameter_bytes(teacher) if teacher is not None else 0)
            if distill is not None:
                distill.close()
            unwrapped = accelerator.unwrap_model(model)
            masks = strategy.masks_for_check(checkpoint)
            # every process takes part in a sharded model's per-layer gathers; the main one checks and writes
            for target, layer, W, tensors in gathered_layers(unwrapped):
                if accelerator.is_main_process:
                    check_layer_zeros(target, layer, W, masks, tensors)
            strategy.save_adapter(unwrapped, adapter_cfg, workdir)
            if accelerator.is_main_process:
                write_train_manifest(workdir, cfg, base, mask_sha256, report, conditions, data_hashes)
            accelerator.wait_for_everyone()
        return report
    finally:
        strategy.close()


def run_blockwise(cfg: TrainConfig, checkpoint, output: Path, start: float) -> TrainReport:
    """`run_train` for `objective: blockwise` (`spp.train.blockwise`): the same checks, output directory, adapter
    files and manifest as end to end, one process and one device; --resume continues at the first unfinished block.

    Raises:
        SppError: as `run_train`, or several processes.
    """
    from spp.io.checkpoint import BLOCKWISE_PROGRESS_DIR
    from spp.io.progress import check_resumable as check_block_progress, progress_dir, start_progress
    from spp.models import load_tokenizer, resolve_device
    from spp.train.blockwise import blockwise_windows, recover_blocks, write_recovered_adapter
    from spp.train.distill import check_teacher

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SppError("objective=blockwise trains one block at a time in one process: launch it without "
                       "torchrun/accelerate launch")
    teacher_dir = check_teacher(cfg, checkpoint)
    source = cfg.calib or cfg.data_path
    windows = blockwise_windows(load_tokenizer(str(checkpoint.directory)), source, cfg.nsamples, cfg.cutoff_len,
                                cfg.seed)
    data_hashes = data_identity(source)
    inputs = input_identity(checkpoint, data_hashes, teacher_dir)
    device = resolve_device("auto")
    dtype = PRECISIONS[cfg.precision][1]
    conditions = run_conditions(device, dtype, 1)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    partial = partial_path(output)
    blocks_done = check_block_progress(partial, settings, conditions, inputs, BLOCKWISE_PROGRESS_DIR,
                                       "block-wise train", field_defaults(cfg)) if cfg.resume else 0
    n_blocks = checkpoint.config.get_text_config().num_hidden_layers
    adapter_cfg = cfg.adapter_config(base_model=str(checkpoint.directory.resolve()), mask_sha256=checkpoint.mask_sha256)
    try:
        with atomic_dir(output, overwrite=cfg.overwrite, resume=True, keep_partial=blocks_done > 0) as workdir:
            if not blocks_done:
                start_progress(workdir, settings, n_blocks, conditions, inputs, BLOCKWISE_PROGRESS_DIR)
                write_yaml(workdir / RESOLVED_CONFIG_FILE, cfg)
            recovered = recover_blocks(cfg, checkpoint, teacher_dir, windows, adapter_cfg, device, dtype, workdir,
                                       blocks_done, check_pruned_zeros)
            trainable = write_recovered_adapter(workdir, adapter_cfg, n_blocks)
            (workdir / TRAIN_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in recovered.records))
            shutil.rmtree(progress_dir(workdir, BLOCKWISE_PROGRESS_DIR))
            finals = [r["epoch_losses"][-1] for r in recovered.records if "epoch_losses" in r]
            steps = sum(r.get("steps", 0) for r in recovered.records)
            report = TrainReport(output=output, steps=steps,
                                 train_loss=sum(finals) / len(finals) if finals else None, val_loss=None,
                                 trainable_params=trainable,
                                 adapted_modules=len(recovered.adapted), train_examples=cfg.nsamples, val_examples=0,
                                 world_size=1, resumed_from=blocks_done,
                                 tokens_seen=steps * cfg.batch_size * cfg.cutoff_len,
                                 wall_time_s=time.time() - start)
            write_train_manifest(workdir, cfg, checkpoint.directory, checkpoint.mask_sha256, report, conditions,
                                 data_hashes)
        return report
    except KeyboardInterrupt:
        from spp.errors import SppInterrupted

        raise SppInterrupted(f"interrupted; the recovered blocks are kept in {partial}") from None


# --------------------------------------------------------------------------- steps of run_train


def check_inputs(cfg: TrainConfig):
    """Check everything that can be checked cheaply, before any model is loaded or file written.

    Returns:
        (the base checkpoint, resolved once (`spp.io.reader.Checkpoint`; its mask matches its manifest), the
        output directory).
    """
    from spp.data import check_data_source
    from spp.io.reader import read_checkpoint

    for key, flag in (("base_model", "--model"), ("data_path", "--data"), ("output_dir", "--output")):
        if not getattr(cfg, key) and not (key == "data_path" and cfg.objective == "blockwise" and cfg.calib):
            raise SppError(f"no {key} given: pass {flag} or set {key} in the config")
    if cfg.cpu_offload and not torch.cuda.is_available():  # FSDP2 pins the offloaded shards for copies to a GPU
        raise SppError("cpu_offload=true moves FSDP shards between CPU memory and a GPU, and this machine has no CUDA "
                       "device (on a CPU the shards already live in CPU memory): drop cpu_offload")
    if cfg.objective == "blockwise":
        from spp.data import check_calib_source

        check_calib_source(cfg.calib or cfg.data_path)
    else:
        check_data_source(cfg.data_path)  # offline, a hub dataset fails here in a second, before any model is read
    base, output = Path(cfg.base_model).expanduser(), Path(cfg.output_dir).expanduser()
    check_not_an_input(output, [("--model", base), ("--data", cfg.data_path), ("--teacher", cfg.teacher),
                                ("calib", cfg.calib or None)])
    if not base.is_dir():
        raise SppError(f"--model {base} does not exist")
    if not (base / "config.json").is_file():
        raise SppError(f"--model {base} holds no model (no config.json)")
    if not mask_path(base).is_file():
        raise SppError(f"--model {base} has no {MASK_FILE}: train needs an `spp prune` output")
    checkpoint = read_checkpoint(base, need_manifest=True)  # names, shapes, whole shards, mask = manifest's
    check_output_dir(output, cfg.overwrite)
    partial = partial_path(output)
    if cfg.resume and cfg.objective == "end_to_end":  # block-wise progress is checked by `run_blockwise`
        check_resumable(cfg, partial)
    elif not cfg.resume and partial.exists() and not cfg.overwrite:
        raise SppError(f"{partial} holds an interrupted run: pass --resume to continue it, or --overwrite to start over")
    return checkpoint, output


def check_resumable(cfg: TrainConfig, partial: Path) -> None:
    """A --resume needs a checkpoint in `partial` made with the same settings (bar RESUMABLE_CHANGES). With no
    checkpoint there it says so in a note and `run_train` starts from the beginning (as `spp prune --resume` does)."""
    from spp.io.trainer_state import checkpoint_dirs

    if not checkpoint_dirs(partial):
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(f"note: --resume: nothing to resume in {partial} (no checkpoint was saved there); starting from "
                  "the beginning", file=sys.stderr)
        return
    saved = {**field_defaults(TrainConfig), **read_yaml(partial / RESOLVED_CONFIG_FILE)}
    check_same_settings(*({k: v for k, v in d.items() if k not in RESUMABLE_CHANGES} for d in (saved, to_dict(cfg))))


def check_resumable_conditions(partial: Path, conditions: dict, inputs: dict) -> None:
    """A --resume continues bit-exactly only from the inputs (`input_identity`) and under the run conditions its
    last checkpoint recorded.

    Raises:
        SppError: an input changed (the mask file, a base file, the data, a teacher file: names it), or a
            condition differs (threads, device, dtype, processes, versions), naming how to match it.
    """
    from spp.io.checkpoint import TRAINER_STATE_FILE, read_json
    from spp.io.trainer_state import checkpoint_dirs

    saved = read_json(checkpoint_dirs(partial)[-1] / TRAINER_STATE_FILE, what="trainer state")
    check_same_inputs(saved.get("inputs"), inputs, "the interrupted run", "start over with --overwrite (without --resume)")
    check_same_conditions(saved.get("run_conditions"), conditions, "the interrupted run",
                          "start over with --overwrite (without --resume)")


def data_identity(source: str) -> dict[str, str]:
    """sha256 of the local data file (of every file under a local dataset directory), keyed by path; nothing for a
    hub dataset (its name and split are settings, compared on --resume as such)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {str(path): sha256_file(path)}
    if path.is_dir():
        return {str(p): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return {}


def input_identity(checkpoint, data_hashes: dict[str, str], teacher: Path | None) -> dict[str, str]:
    """What a run trains from, path -> identity, as every checkpoint records it for --resume
    (`spp.io.conditions.check_same_inputs`). No weight is read for it:

    - the mask file: its sha256, which `read_checkpoint` computed;
    - the base's `config.json`, index and weight shards: the sha256 its manifest records (`spp.io.manifest.model_identity`);
    - the data: `data_hashes` (`data_identity`, hashed once per run);
    - the teacher's files, the same way as the base's: its manifest's sha256 when it has one, else each file's
      size and modification time (a dense model as downloaded; hashing it would read the whole model).
    """
    from spp.io.checkpoint import MANIFEST_FILE
    from spp.io.manifest import model_identity, read_manifest

    out = {str(checkpoint.mask_file): checkpoint.mask_sha256, **model_identity(checkpoint.directory, checkpoint.manifest),
           **data_hashes}
    if teacher is not None:
        manifest = read_manifest(teacher) if (teacher / MANIFEST_FILE).is_file() else None
        out.update(model_identity(teacher, manifest))
    return out


def make_accelerator(cfg: TrainConfig):
    """An `Accelerator` for `cfg.precision`, refusing a launch whose processes did not join.

    Raises:
        SppError: WORLD_SIZE > 1 but accelerate sees one process, a DeepSpeed or Megatron-LM
            launch, accelerate's own FSDP config without `distributed: fsdp`, the global batch
            does not split into micro-batches over the processes, or accelerate cannot start
            (e.g. the precision is unavailable).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Under a plain torchrun on a CPU-only machine accelerate starts no process group unless told the
    # processes are CPU ones; FSDP runs under torchrun as well as under accelerate launch.
    cpu = cfg.distributed == "fsdp" and world > 1 and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(mixed_precision=PRECISIONS[cfg.precision][0], cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise SppError(f"accelerate could not start (precision={cfg.precision}): {first_line(exc)}") from exc
    refused = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.MEGATRON_LM: "Megatron-LM"}
    if accelerator.distributed_type in refused:
        raise SppError(f"{refused[accelerator.distributed_type]} is not supported by spp train; for a model that does "
                       "not fit one device use distributed: fsdp (--distributed fsdp; spp shards it with FSDP2)")
    if accelerator.distributed_type == DistributedType.FSDP and cfg.distributed != "fsdp":
        raise SppError("accelerate's FSDP config is set but spp applies its own FSDP2 sharding: pass --distributed fsdp "
                       "(accelerate's fsdp_* settings are not used) or launch without --use_fsdp")
    if world > 1 and accelerator.num_processes == 1:
        raise SppError(f"WORLD_SIZE={world} but accelerate reports 1 process: launch with `accelerate launch` "
                       "(on a CPU-only machine: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N)")
    per_step = cfg.micro_batch_size * accelerator.num_processes
    if cfg.batch_size % per_step:
        raise SppError(f"batch_size={cfg.batch_size} (global) is not divisible by micro_batch_size × processes = "
                       f"{cfg.micro_batch_size} × {accelerator.num_processes} = {per_step}")
    return accelerator


def build_examples(cfg: TrainConfig, tokenizer) -> tuple[list, list]:
    """Tokenized (train, val) examples from `cfg.data_path`: Alpaca records or plain-text windows."""
    from spp.data import (_load_hub_records, read_alpaca_records, read_text_documents, split_train_val, target_count_of,
                          text_windows, tokenize_instruction, validation_note)

    source = cfg.data_path
    fmt = cfg.data_format
    if fmt == "auto":
        fmt = "text" if Path(source).suffix.lower() == ".txt" else "alpaca"
    if fmt == "text":
        if Path(source).expanduser().exists() or Path(source).suffix:
            documents = read_text_documents(Path(source).expanduser())
        else:
            documents = [r["text"] for r in _load_hub_records(source, cfg.data_split) if isinstance(r.get("text"), str)]
        examples = text_windows(tokenizer, documents, cfg.cutoff_len)
    else:
        records = read_alpaca_records(source, cfg.data_split)
        examples = [tokenize_instruction(tokenizer, r, cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token)
                    for r in records]
    if not examples:
        raise SppError(f"data {source} gives no training examples")
    # An example without a target token adds nothing to the loss; a batch of only such examples would
    # step the optimizer on a zero gradient (momentum still moves it). Drop them before the split.
    with_targets = [(ids, labels) for ids, labels in examples if target_count_of(labels)]
    if not with_targets:
        raise SppError(f"no example of {source} has a target token within cutoff_len={cfg.cutoff_len} "
                       "(the prompts fill it); raise cutoff_len or set train_on_inputs: true")
    dropped = len(examples) - len(with_targets)
    if dropped and os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"note: dropped {dropped} of {len(examples)} examples of {source} that have no target token within "
              f"cutoff_len={cfg.cutoff_len} (their prompts fill it)", file=sys.stderr)
    examples = with_targets
    note = validation_note(len(examples), cfg.val_set_size)  # the resolved config keeps what was asked
    if note and os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr)
    train_idx, val_idx = split_train_val(len(examples), cfg.val_set_size, cfg.seed)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx]


def plan_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps: `max_steps`, else `num_epochs` × (n_train // batch_size)."""
    if n_train < cfg.batch_size:
        raise SppError(f"only {n_train} training examples, fewer than one global batch (batch_size={cfg.batch_size})")
    return cfg.max_steps or cfg.num_epochs * (n_train // cfg.batch_size)


@contextlib.contextmanager
def output_workdir(accelerator, output: Path, cfg: TrainConfig):
    """The main process builds `output.partial/` (kept on a crash, for --resume) and renames it at the end."""
    accelerator.wait_for_everyone()  # every process has checked the inputs before the partial directory appears
    if accelerator.is_main_process:
        # a leftover partial (check_inputs refused one without --overwrite) is removed once this run holds the lock
        context = atomic_dir(output, overwrite=cfg.overwrite, resume=True, keep_partial=cfg.resume)
    else:
        context = contextlib.nullcontext(partial_path(output))
    with context as workdir:
        accelerator.wait_for_everyone()
        yield Path(workdir)


def check_pruned_zeros(model, masks: dict[str, torch.Tensor], prefix: str = "") -> None:
    """The invariant after training: where the mask says pruned, the base weight and the effective
    weight of every adapted weight (of any kind and shape, via `spp.adapter.weight.AdaptedWeight`) are
    bitwise +0.0 (a NaN/inf in a trained tensor would break it). `model` may be one decoder block, whose
    full-name `prefix` (`model.layers.3.`) names its weights as `masks` keys them.

    Raises:
        RuntimeError: a violation, which can only be a bug in spp.
    """
    from spp.adapter.model import adapter_layers

    for name, layer in adapter_layers(model).items():
        for target, W, tensors in layer.weights(prefix + name):  # as `check_layer_zeros` takes them (also from `spp.train.fsdp`)
            check_layer_zeros(target, layer, W, masks, tensors)


def check_layer_zeros(target, layer, W: torch.Tensor, masks: dict[str, torch.Tensor],
                      tensors: dict[str, torch.Tensor]) -> None:
    """`check_pruned_zeros` for one adapted weight (`spp.models.Target`) of `layer`, given its whole weight W (storage
    layout) and adapter tensors (gathered first when the model is sharded), as `AdaptedWeight.weights` yields them.

    Raises:
        RuntimeError: a pruned entry of W or of the effective weight is not +0.0 (a bug in spp).
    """
    from spp.sparsity import check_pruned_zero

    if target.param not in masks:
        return
    keep = masks[target.param].to(W.device)
    for weight in (W, layer.effective_weight(W, keep, tensors)):
        check_pruned_zero(weight, keep, lambda *_: f"{target.name}: a pruned entry is not +0.0 after training; this is "
                          "a bug in spp", error=RuntimeError)


def write_train_manifest(workdir: Path, cfg: TrainConfig, base: Path, mask_sha256: str, report: TrainReport,
                         conditions: dict, data_hashes: dict[str, str]) -> None:
    """`spp_manifest.json` for the train stage: inputs hashed (the data as `data_hashes` found it at the start of the
    run), the run conditions, trainable parameters, final losses."""
    from spp.io.manifest import Manifest, peak_memory_bytes, write_manifest

    inputs = {str(mask_path(base)): mask_sha256, **data_hashes}
    details = {key: getattr(report, key) for key in ("steps", "train_loss", "val_loss", "trainable_params",
                                                     "adapted_modules", "train_examples", "val_examples",
                                                     "world_size", "tokens_seen", "resumed_from")}
    if cfg.teacher:  # a second full model in the training dtype, besides its activations for one micro-batch
        details.update(teacher=str(Path(cfg.teacher).expanduser().resolve()), teacher_param_bytes=report.teacher_param_bytes)
    manifest = Manifest(stage="train", settings=to_dict(cfg), inputs=inputs, mask_sha256=mask_sha256,
                        conditions=conditions,
                        details={"base_model": str(base), **details}, wall_time_s=report.wall_time_s,
                        peak_memory=peak_memory_bytes())
    write_manifest(workdir, manifest)
