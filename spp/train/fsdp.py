"""Sharded training with PyTorch FSDP2: spp's sharding policy, gradient clipping, DCP checkpoints, gathering.

With `distributed: fsdp`, `spp.train` calls `load_sharded_model` (the model built on the meta device
and read, adapted and sharded one block at a time) instead of loading it whole and calling accelerate's
`prepare`; `shard_model` applies the same policy to a model already in memory (the teacher):
`torch.distributed.fsdp.fully_shard` on each decoder block, on the input embeddings and on the
output layer (each its own unit, unless the two are tied), then on the root, so each rank holds
1/world of every frozen weight, adapter tensor, gradient and AdamW moment (FSDP2 shards dim 0 of
each parameter). The mixed-precision policy leaves parameter dtypes alone (`param_dtype=None`:
a bf16 base stays bf16 and the adapter stays float32, as without sharding) and reduces gradients
in float32. Inside a block's forward FSDP2 all-gathers the block, so every adapter's autograd
function sees the whole (out, in) weight and the adapter code does not know it is sharded.
A keep-mask that a kind stores per weight (`full`'s uint8 mask) becomes a frozen uint8
parameter first, so it is sharded by rows with its weight instead of replicated on every rank
(bfloat16 0/1 on torch < 2.13, whose FSDP2 cannot shard an integer parameter: `mask_parameter`).
Mixture-of-experts models shard the same way: a fused expert weight (E, out, in) is read from its saved
per-expert tensors (`Checkpoint.join`), and an adapted experts module's stacked tensors (α (E, r, in), β (E, out), …)
and uint8 masks (E, out, in) are parameters split along the expert axis; its forward, inside the block's,
sees them gathered.
Checkpoints hold the trainable parameters and the optimizer state through
`torch.distributed.checkpoint` (each rank writes its own shards); the adapter file is gathered
one layer at a time (`gathered_layers`) and streamed by rank 0. `FSDP2` is this policy as the training
strategy (`spp.train.strategy`) that `spp.train` and its loop call. This module owns no loop and no
file names: `spp.io.checkpoint` names the files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from spp.errors import SppError, first_line


def start_process_group() -> bool:
    """A process group for FSDP2 when the launcher made none: a one-process gloo (CPU) or NCCL (CUDA) group.

    A `torchrun`/`accelerate launch` run already has one (accelerate starts it); a plain `spp train`
    with `distributed: fsdp` is a one-rank FSDP run (the sharding code path on one device).

    Returns:
        True when this call started the group (the caller destroys it at the end), else False.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SppError("distributed: fsdp with WORLD_SIZE > 1 but no process group was started: launch with "
                       "torchrun --nproc_per_node N or accelerate launch --num_processes N")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


# torch 2.11's FSDP2 re-creates each sharded parameter with requires_grad=True before freezing it, which an integer
# tensor refuses ("only Tensors of floating point dtype can require gradients"); torch 2.13 passes requires_grad
# through. 2.12 is untested, so it takes the float path too.
FSDP_SHARDS_INTEGER_PARAMETERS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def mask_parameter(keep: torch.Tensor) -> nn.Parameter:
    """A uint8 keep-mask as a frozen parameter FSDP2 can shard: uint8 where torch allows it, else bfloat16 0/1
    (exact, 2 bytes a weight instead of 1; every kind multiplies by the mask, so the results are the same)."""
    return nn.Parameter(keep if FSDP_SHARDS_INTEGER_PARAMETERS else keep.to(torch.bfloat16), requires_grad=False)


def masks_as_parameters(model: nn.Module) -> int:
    """Give FSDP2 the per-weight state that adapted modules keep as plain attributes (in place;
    `spp.adapter.weight.AdaptedWeight.register_state`).

    A kind's keep-mask kept in the weight's storage layout (`full`'s uint8 mask) becomes a frozen parameter:
    FSDP2 shards parameters, not plain attributes or buffers, so it is split exactly as its weight is (by rows,
    so GPT-2's (in, out) Conv1D mask follows its (in, out) weight; an (E, out, in) mask along the expert axis)
    and costs 1/world byte per weight on each rank instead of 1. Other state (`masked_lora`'s kept-zero
    indices, usually none) becomes a non-persistent buffer, so FSDP2 moves it to the device with the block.
    `spp` keeps none.

    Returns:
        The number of masks turned into parameters.
    """
    from spp.adapter.model import adapter_layers

    return sum(layer.register_state(mask_parameter) for layer in adapter_layers(model).values())


def shard_model(model: nn.Module, cpu_offload: bool = False) -> int:
    """Apply spp's FSDP2 policy in place: each decoder block, the embeddings, the output layer, then the root.

    Tied input and output embeddings (one parameter) stay in the root unit: a unit of their own would
    be resharded after the embedding lookup and gathered again for the output layer.

    Args:
        model: a causal LM (with its adapter layers, if any), on the CPU or its device: `fully_shard`
            moves each unit to the process group's device as it shards it, one block at a time.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory
            (`CPUOffloadPolicy`), gathering each unit to the device for its forward and backward.

    Returns:
        The number of units (blocks, embeddings, output layer, root).
    """
    from torch.distributed.fsdp import fully_shard

    from spp.models import find_decoder_blocks

    masks_as_parameters(model)
    policy = _policy(cpu_offload)
    _, blocks = find_decoder_blocks(model)
    units = list(blocks) + _outer_units(model)
    for unit in units:
        fully_shard(unit, **policy)
    fully_shard(model, **policy)
    return len(units) + 1


def _policy(cpu_offload: bool) -> dict:
    """`fully_shard`'s keyword arguments for every unit."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    # param_dtype=None: no cast, so float32 adapter tensors stay float32 next to a bf16 base (a bf16
    # policy would round α and β and break "eval --adapter equals merged"); float32 gradient reductions.
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}


def _outer_units(model: nn.Module) -> list[nn.Module]:
    """The input embeddings and the output layer, each a unit, unless they share their weight (tied)."""
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is not None and output.weight is embeddings.weight:
        return []
    return [m for m in (embeddings, output) if m is not None and any(True for _ in m.parameters())]


def load_sharded_model(checkpoint, dtype: torch.dtype, adapter_cfg, masks: dict[str, torch.Tensor] | None,
                       cpu_offload: bool = False, checkpointing: bool = False) -> tuple[nn.Module, list[str]]:
    """The model of `checkpoint` with its adapter, sharded, without any rank holding the whole model.

    The module tree is built on the meta device (`spp.io.stream.skeleton`); then each decoder block in turn is
    read from the safetensors shards (`spp.io.stream.load`, which also checks every tensor is finite), adapted
    (`add_adapter` on that block, so α's random init draws the same numbers, in the same order, as adapting the
    whole model) and sharded, which frees all but this rank's share before the next block is read. The embeddings and output layer
    follow, then the root. Peak per rank while loading: its shards so far plus one whole block (and a whole
    embedding or output layer).

    Args:
        checkpoint: `spp.io.reader.Checkpoint` of the pruned model. dtype: the base dtype.
        adapter_cfg, masks: as for `spp.adapter.model.add_adapter` (masks keyed by parameter name).
        checkpointing: recompute each block's activations in backward.

    Returns:
        (the sharded model, the adapted module names in model order).

    Raises:
        SppError: as `add_adapter` (no target layer matches, a base weight breaks its mask, ...).
    """
    from torch.distributed.fsdp import fully_shard

    from spp.adapter.model import add_block_adapter, find_targets
    from spp.io import stream
    from spp.models import enable_checkpointing, find_decoder_blocks

    model = stream.skeleton(checkpoint, dtype).requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model)
    policy = _policy(cpu_offload)
    # The targets are chosen once on the whole (meta) model, names only, exactly as `add_adapter` chooses them
    # (full-name patterns, layers left dense); each block is then adapted at those exact names.
    targets = list(find_targets(model, adapter_cfg, masks))
    prefix, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        stream.load(model, checkpoint, f"{prefix}.{i}.")
        add_block_adapter(block, f"{prefix}.{i}.", targets, adapter_cfg, masks)
        masks_as_parameters(block)
        fully_shard(block, **policy)
    stream.load(model, checkpoint, "", skip=(f"{prefix}.",))  # the rest: embeddings, final norm, output layer
    for unit in _outer_units(model):
        fully_shard(unit, **policy)
    fully_shard(model, **policy)
    return model, targets


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor shard; a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def adapter_specs(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """`<module>.<tensor>` -> (dtype, global shape) of every adapter tensor, in `adapter_state_dict` order."""
    from spp.adapter.model import adapter_layers

    return {f"{name}.{key}": (t.dtype, tuple(t.shape)) for name, layer in adapter_layers(model).items()
            for key, t in layer.adapter_tensors().items()}


def gathered_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor, dict[str, torch.Tensor]]]:
    """Each adapted weight with its whole base weight and adapter tensors, gathered one weight at a time.

    Every rank must run the iteration to its end (each gather is a collective); every rank gets the
    whole tensors of one weight, which are dropped before the next one is gathered.

    Yields:
        (the weight as a `spp.models.Target`, named as adapters key it: a linear layer's module name or a fused
        expert weight's own; its `AdaptedWeight`; W in its storage layout, (E?, ...); {tensor name: whole tensor}).
    """
    from spp.adapter.model import adapter_layers

    for name, layer in adapter_layers(model).items():
        for target, W, tensors in layer.weights(name, gather=_full):
            yield target, layer, W, tensors


def save_adapter_gathered(model: nn.Module, adapter_cfg, directory: Path, is_main: bool) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` of a sharded model, as `save_adapter` does.

    The file is the one an unsharded run writes (same names, shapes, dtypes, order): rank 0 writes the
    header from the global shapes, then each layer's tensors as they are gathered, so no rank ever holds
    more than one layer's whole tensors. Every rank must call this.
    """
    from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, save_tensors_streamed, write_json

    chunks = ({f"{target.name}.{key}": t.to("cpu") for key, t in tensors.items()}
              for target, _, _, tensors in gathered_layers(model))
    if not is_main:
        for _ in chunks:  # take part in every gather
            pass
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_streamed(adapter_specs(model), chunks, directory / ADAPTER_WEIGHTS_FILE,
                          metadata={"format": "spp-adapter"})
    write_json(directory / ADAPTER_CONFIG_FILE, adapter_cfg.to_json())


def _state_dicts(model: nn.Module, optimizer) -> dict:
    """{"model": trainable parameters (sharded), "optimizer": its state (sharded)}, FSDP prefixes stripped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen weights are left out: they are the pruned base, which --resume reloads from --model.
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optim_state}


class FSDP2:
    """`distributed: fsdp`: the model sharded by FSDP2 (`load_sharded_model`), not prepared by accelerate, which
    still starts the processes and reduces the loop's counters. The interface is `spp.train.strategy`'s."""

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.own_group = False

    def load_model(self, checkpoint, dtype: str, adapter_cfg, masks: dict):
        """`load_sharded_model`, in a process group (`start_process_group`). The masks are not kept (a byte per
        weight of the whole model on every rank): `masks_for_check` reads them again."""
        self.own_group = start_process_group()
        return load_sharded_model(checkpoint, getattr(torch, dtype), adapter_cfg, masks, self.cfg.cpu_offload,
                                  self.cfg.gradient_checkpointing)

    def prepare_teacher(self, teacher: nn.Module) -> None:
        shard_model(teacher, self.cfg.cpu_offload)

    def prepare(self, model, optimizer):
        return model, optimizer

    @contextlib.contextmanager
    def micro_batch(self, model, last: bool):
        """FSDP2's `set_requires_gradient_sync(last)`, which keeps the unsharded gradients until the last
        micro-batch; the model is not wrapped by accelerate, so its forward gets accelerate's autocast here."""
        model.set_requires_gradient_sync(last)
        with self.accelerator.autocast():
            yield

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Scale the (sharded) gradients so their global 2-norm is at most `max_norm`; returns the norm before.

        ‖g‖ = (Σ_ranks Σ_local g²)^½: `get_total_norm` on DTensor gradients gives a partial result that
        `full_tensor` all-reduces, the same number `torch.nn.utils.clip_grad_norm_` gives one process.
        """
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def save_adapter(self, model: nn.Module, adapter_cfg, directory: Path) -> None:
        """The adapter file gathered one layer at a time (`save_adapter_gathered`); every rank calls it."""
        save_adapter_gathered(model, adapter_cfg, directory, self.accelerator.is_main_process)

    def save_optimizer(self, model: nn.Module, optimizer, directory: Path) -> None:
        """Each rank writes its shards of the trainable parameters and AdamW state into `directory/sharded` (DCP).

        `directory` must be on a filesystem every rank sees; rank 0 writes the `.metadata` index last.
        Every rank must call this.
        """
        import torch.distributed.checkpoint as dcp

        from spp.io.checkpoint import SHARDED_STATE_DIR

        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(Path(directory) / SHARDED_STATE_DIR))

    def load_state(self, model: nn.Module, optimizer, checkpoint: Path) -> None:
        """Read `save_optimizer`'s shards back into `model` and `optimizer` (in place; every rank calls it).

        Raises:
            SppError: the checkpoint holds no DCP state, or one of another adapter.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from spp.io.checkpoint import SHARDED_STATE_DIR

        directory = Path(checkpoint) / SHARDED_STATE_DIR
        if not (directory / ".metadata").is_file():
            raise SppError(f"checkpoint {directory} holds no sharded (distributed: fsdp) state; was it written by "
                           "a distributed: ddp run? resume with the settings it was written with")
        state = _state_dicts(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(directory))
        except (RuntimeError, KeyError, ValueError) as exc:  # DCP wraps per-rank failures in a CheckpointException
            first = first_line(exc)
            raise SppError(f"checkpoint {directory} does not fit this model's adapter: {first}") from exc
        # strict=False: the frozen base is absent on purpose; dcp.load has already refused a checkpoint that
        # lacks any trainable tensor this model asked for.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def masks_for_check(self, checkpoint) -> dict:
        """The mask file read again, by the main process only ({} on the others)."""
        return checkpoint.masks_by_parameter() if self.accelerator.is_main_process else {}

    def close(self) -> None:
        """Destroy the process group `load_model` started itself (a one-rank FSDP run), if any."""
        if self.own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.own_group = False
