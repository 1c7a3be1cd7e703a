"""Distillation from the dense model: check the teacher cheaply, load it, record decoder-block outputs.

The teacher is a second full model in the training dtype on the training device. It is
frozen (`requires_grad_(False)`, eval mode), runs each micro-batch under `torch.no_grad()`
before the student, and never goes through accelerate's `prepare` (no DDP wrapper: it has
no gradients to average). It holds no state, so a checkpoint need not save it, and it
draws no random numbers, so a resumed run stays exact. The loss terms themselves are
pure functions in `spp.train.losses`; the loop sums them (`spp.train.loop`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spp.errors import SppError

SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def check_teacher(cfg, checkpoint) -> Path:
    """Refuse a teacher that cannot teach this student, from configs and tokenizers only (no weights).

    `checkpoint` is the student's (`spp.io.reader.Checkpoint`). Checks: the path exists and holds a model; it
    is not the student itself; the tokenizers agree (the same token → id map and the same special-token ids);
    with SquareHead on or `objective: blockwise`, the same number of decoder blocks and hidden size; with KD on, the same vocabulary
    size (the logits are compared entry by entry).

    Returns:
        The teacher's directory.

    Raises:
        SppError: one line saying what differs.
    """
    from spp.io.gguf import gguf_directory, is_gguf
    from spp.models import load_tokenizer

    # a GGUF teacher (spp run --model FILE.gguf) is its dequantized directory, as for --model
    base = checkpoint.directory
    teacher = gguf_directory(cfg.teacher) if is_gguf(cfg.teacher) else Path(cfg.teacher).expanduser()
    if not teacher.is_dir():
        raise SppError(f"teacher {teacher} does not exist")
    if not (teacher / "config.json").is_file():
        raise SppError(f"teacher {teacher} holds no model (no config.json)")
    if teacher.resolve() == base.resolve():
        raise SppError(f"teacher {teacher} is the student itself (--model {base}); the teacher must be the "
                       "dense model that was pruned")
    from spp.io.reader import read_checkpoint

    student_cfg = _text_config(checkpoint.config)
    # read as transformers reads it: a teacher with missing or mismatched weights is refused, not re-initialised
    teacher_cfg = _text_config(read_checkpoint(teacher).config)
    shapes = []
    blocks = "objective=blockwise" if cfg.objective == "blockwise" else "squarehead_weight > 0"
    if cfg.squarehead_weight > 0 or cfg.objective == "blockwise":
        shapes += [("decoder blocks", "num_hidden_layers", blocks), ("hidden size", "hidden_size", blocks)]
    if cfg.kd_weight > 0:
        shapes += [("vocabulary size", "vocab_size", "kd_weight > 0")]
    for what, key, needs in shapes:
        s, t = getattr(student_cfg, key, None), getattr(teacher_cfg, key, None)
        if s != t:
            raise SppError(f"teacher {teacher} has {what} {t} but the student has {s}; {needs} needs them equal")
    difference = tokenizer_difference(load_tokenizer(str(base)), load_tokenizer(str(teacher)))
    if difference:
        raise SppError(f"teacher {teacher}'s tokenizer differs from the student's ({difference}); distillation "
                       "needs the same vocabulary and token ids")
    return teacher


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tokenizer_difference(student, teacher) -> str:
    """'' when both tokenizers map the same tokens to the same ids with the same special tokens, else the first difference."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if len(s_vocab) != len(t_vocab):
        return f"{len(t_vocab)} tokens vs the student's {len(s_vocab)}"
    for token, index in s_vocab.items():
        if t_vocab.get(token) != index:
            return f"token {token!r} has id {t_vocab.get(token)} vs the student's {index}"
    for name in SPECIAL_TOKENS:
        s, t = getattr(student, f"{name}_token_id", None), getattr(teacher, f"{name}_token_id", None)
        if s != t:
            return f"{name}_token_id {t} vs the student's {s}"
    return ""


def load_teacher(path: Path, dtype: str, device) -> nn.Module:
    """The teacher, frozen and in eval mode, in `dtype` on `device`.

    Raises:
        SppError: it cannot be loaded, or a weight is NaN or ±inf (`spp.io.finite`).
    """
    from spp.io.finite import check_finite_model
    from spp.models import load_model

    model = load_model(str(path), dtype=dtype, device=device)
    check_finite_model(model, f"teacher {path}")
    model.requires_grad_(False)
    return model.eval()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (shared ones counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class BlockOutputs:
    """Forward hooks on a model's decoder blocks that keep each block's output while `recording()`.

    Why hooks and not `output_hidden_states=True`: in transformers 5 that option itself
    records block outputs with hooks, but then replaces the last entry by the output of
    the final norm (LLaMA's `capture_outputs` ties it to `last_hidden_state`), and other
    families differ. Hooks on `spp.models.find_decoder_blocks` give every architecture the
    same thing, the raw output of each of the L blocks (the last one before the final
    norm), with no copy: the hook keeps a reference to a tensor the forward makes anyway.
    Only forwards inside `recording()` are kept, so a second forward of a block outside it
    (evaluation, or a checkpointing implementation that re-runs hooks in backward) adds nothing.
    """

    def __init__(self, model: nn.Module):
        from spp.models import find_decoder_blocks

        _, blocks = find_decoder_blocks(model)
        self.outputs: list[torch.Tensor] = []
        self._on = False
        self._handles = [block.register_forward_hook(self._hook) for block in blocks]

    def _hook(self, module, args, output) -> None:
        if self._on:
            self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    @contextlib.contextmanager
    def recording(self):
        """Yield the list that fills with one (B, T, H) tensor per block, in order, during a forward."""
        self.outputs = []
        self._on = True
        try:
            yield self.outputs
        finally:
            self._on = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Distillation:
    """The teacher and what the loop needs to distil from it (None in the loop when no teacher is set)."""

    teacher: nn.Module
    ce_weight: float
    kd_weight: float
    temperature: float
    squarehead_weight: float
    student_blocks: BlockOutputs | None  # hooks on the student's blocks, when squarehead_weight > 0
    teacher_blocks: BlockOutputs | None

    @classmethod
    def build(cls, cfg, teacher: nn.Module, student: nn.Module) -> "Distillation":
        """`student` is the unwrapped model (hooks go on its blocks, which DDP's wrapper calls)."""
        squarehead = cfg.squarehead_weight > 0
        return cls(teacher=teacher, ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
                   temperature=cfg.kd_temperature, squarehead_weight=cfg.squarehead_weight,
                   student_blocks=BlockOutputs(student) if squarehead else None,
                   teacher_blocks=BlockOutputs(teacher) if squarehead else None)

    def close(self) -> None:
        for hooks in (self.student_blocks, self.teacher_blocks):
            if hooks is not None:
                hooks.remove()
