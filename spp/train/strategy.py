"""How a model is trained over processes: one small interface (`Strategy`) that `spp.train` and its step loop
call, and two implementations: `Accelerate` (here) for one process or DDP (accelerate's `prepare`), and
`spp.train.fsdp.FSDP2`, which shards the model with FSDP2 (`distributed: fsdp`). `strategy_for` picks one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Protocol

from spp.config import TrainConfig


class Strategy(Protocol):
    """What the training code asks of a strategy. Every process calls every method (some are collectives)."""

    def load_model(self, checkpoint, dtype: str, adapter_cfg, masks: dict) -> tuple:
        """The base of `checkpoint` (`spp.io.reader.Checkpoint`) in `dtype` with its adapter: (model, adapted names)."""

    def prepare_teacher(self, teacher) -> None:
        """Make the distillation teacher ready to run beside the model (frozen, no gradients)."""

    def prepare(self, model, optimizer) -> tuple:
        """(model, optimizer) ready for the step loop."""

    def micro_batch(self, model, last: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward; gradients are synchronised after the last only."""

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        """Scale the gradients so that their global 2-norm is at most `max_norm`."""

    def save_adapter(self, model, adapter_cfg, directory: Path) -> None:
        """Write the adapter files (`adapter_model.safetensors`, `adapter_config.json`) into `directory`."""

    def save_optimizer(self, model, optimizer, directory: Path) -> None:
        """Write the AdamW state (and whatever else it needs to resume) into the checkpoint `directory`."""

    def load_state(self, model, optimizer, checkpoint: Path) -> None:
        """Restore what `save_adapter` and `save_optimizer` wrote into `model` and `optimizer` (in place)."""

    def masks_for_check(self, checkpoint) -> dict:
        """The masks by parameter name for the pruned-zeros check at the end (the main process's are used)."""

    def close(self) -> None:
        """Release what the strategy started (a process group)."""


def strategy_for(cfg: TrainConfig, accelerator):
    """`spp.train.fsdp.FSDP2` for `distributed: fsdp`, else `Accelerate`."""
    if cfg.distributed == "fsdp":
        from spp.train.fsdp import FSDP2

        return FSDP2(cfg, accelerator)
    return Accelerate(cfg, accelerator)


class Accelerate:
    """One process, or DDP: the whole model on every process, wrapped by accelerate's `prepare`."""

    def __init__(self, cfg: TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.masks = None

    def load_model(self, checkpoint, dtype: str, adapter_cfg, masks: dict):
        """The base of `checkpoint` in `dtype` with its adapter added (`add_adapter`); keeps `masks`
        for the check at the end.

        Returns:
            (the model, the adapted module names).

        Raises:
            SppError: a NaN or ±inf weight, or as `add_adapter`.
        """
        from spp.adapter.model import add_adapter
        from spp.io.finite import check_finite_model
        from spp.models import enable_checkpointing, load_model

        model = load_model(str(checkpoint.directory), dtype=dtype)
        check_finite_model(model, f"model {checkpoint.directory}")  # else the first step's loss is NaN, with no word on why
        adapted = add_adapter(model, adapter_cfg, masks)
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.masks = masks
        return model, adapted

    def prepare_teacher(self, teacher) -> None:
        """The teacher is not prepared: no DDP wrapper, no gradients."""

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def micro_batch(self, model, last: bool):
        """DDP's `no_sync` on every micro-batch but the last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)

    def save_adapter(self, model, adapter_cfg, directory: Path) -> None:
        """The main process writes `adapter_model.safetensors` and `adapter_config.json`."""
        from spp.adapter.model import save_adapter

        if self.accelerator.is_main_process:
            save_adapter(self.accelerator.unwrap_model(model), adapter_cfg, directory)

    def save_optimizer(self, model, optimizer, directory: Path) -> None:
        """The main process writes AdamW's state (`spp.io.trainer_state.save_optimizer`)."""
        from spp.adapter.model import adapter_state_dict
        from spp.io.trainer_state import save_optimizer

        if self.accelerator.is_main_process:
            save_optimizer(optimizer, list(adapter_state_dict(self.accelerator.unwrap_model(model))), directory)

    def load_state(self, model, optimizer, checkpoint: Path) -> None:
        """The adapter and AdamW state of an unsharded checkpoint (safetensors + JSON), into `model` and `optimizer`.

        Raises:
            SppError: the checkpoint holds another adapter, or the optimizer state of other parameters.
        """
        import torch

        from spp.adapter.model import adapter_state_dict, read_adapter_weights
        from spp.errors import SppError
        from spp.io.trainer_state import load_optimizer

        weights = read_adapter_weights(checkpoint)
        params = adapter_state_dict(self.accelerator.unwrap_model(model))
        if set(weights) != set(params):
            raise SppError(f"checkpoint {checkpoint} holds another adapter than this model has")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        load_optimizer(optimizer, list(params), checkpoint)

    def masks_for_check(self, checkpoint) -> dict:
        """The masks by parameter name for the pruned-zeros check at the end: the ones `load_model` kept."""
        return self.masks

    def close(self) -> None:
        pass
