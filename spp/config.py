"""Typed configs for every stage, and how YAML files and command-line overrides become one.

Precedence: dataclass defaults < YAML file < explicit flags < `--set key=value`.
Every key must name a field; an unknown key is an error naming the nearest valid
one. Values are read by the field's type (`spp.typed.coerce`: `1e-3` is a float) and checked against the field's
type. Each dataclass checks its own ranges in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from spp.errors import SppError, first_line
from spp.typed import merge_into, nearest  # noqa: F401 (re-exported: callers import them from here)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a=1e-3", "b=x", "c={spp: 1e-2}"]` -> `{"a": "1e-3", "b": "x", "c": {"spp": "1e-2"}}`.

    Values stay text, read later by the field's type (`spp.typed.coerce`), so `1e-3` is a
    float and `no` a string where the field says so; only a `{...}` mapping and quoted text are parsed (as YAML).
    """
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SppError(f"--set {item!r} must look like key=value")
        raw = raw.strip()
        if raw.startswith("{") or len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"":  # a mapping, or quoted text
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise SppError(f"--set {item!r}: the value is not valid YAML") from exc
        out[key.strip()] = raw
    return out


def option(default=dataclasses.MISSING, help: str = "", flag: str = "", **field_kwargs):
    """A config field that its stage's command also takes as a flag: `--name` (or `flag`), with this help line.

    `spp.cli` builds each command's flags from these fields, so a setting is declared once; a field made with a
    plain default or `dataclasses.field` has no flag (YAML and `--set` only).
    """
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag}, **field_kwargs)


def flag_of(field: dataclasses.Field) -> str:
    """A flagged field's flag declaration: `--name`, or the `flag` given to `option` (`--compressed/--dense`)."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def flag_names(cls) -> dict[str, str]:
    """Config key -> its `spp <stage>` flag (`max_shard_size` -> `--max-shard-size`), for every key that has one.

    The one source both `spp.cli` (which builds its flags from it) and `spp run`'s reproduce commands rely on.
    """
    return {f.name: flag_of(f).split("/")[0] for f in dataclasses.fields(cls) if "help" in f.metadata}


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, turning a missing or malformed file into an SppError that names it."""
    path = Path(path)
    if not path.is_file():
        raise SppError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SppError(f"config {path} is not valid YAML: {first_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SppError(f"config {path} must be a YAML mapping of key: value")
    return data


def to_dict(cfg) -> dict:
    """A config as plain JSON/YAML-friendly values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(path: Path, cfg) -> None:
    """Write the resolved config, so an output records exactly what made it."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise SppError(f"{name}={value} is out of range {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}")


def _check_shard_size(value: str) -> None:
    """`--max-shard-size` as save_pretrained reads it: a positive number followed by KB, MB, GB or TB."""
    text = str(value).strip()
    try:
        ok = text[-2:].upper() in ("KB", "MB", "GB", "TB") and float(text[:-2]) > 0
    except ValueError:
        ok = False
    if not ok:
        raise SppError(f"--max-shard-size {value!r} must be a size such as 2GB or 500MB (units KB, MB, GB, TB)")


# --------------------------------------------------------------------------- prune


@dataclass
class PruneConfig:
    """Settings of `spp prune`. `pattern` is `unstructured` or `N:M` (at most N kept in every M inputs)."""

    model: str = option(help="Local Hugging Face directory, a .gguf file (dequantized once; needs spp-llm[gguf]), or a hub id (downloads from the hub).")
    output: str = option(help="Output directory (built in OUTPUT.partial, then renamed).")
    method: Literal["wanda", "sparsegpt", "magnitude", "ria", "alps"] = option("wanda", "wanda (default), sparsegpt, magnitude, ria or alps (ADMM + conjugate-gradient refit; reuses SparseGPT's Hessian).")
    pattern: str = option("unstructured", "unstructured (default), or N:M = at most N kept in every M inputs.")
    # default 0.5 for unstructured; for N:M the implied 1 - N/M
    sparsity: float | None = option(None, "Fraction pruned, unstructured only (default 0.5).")
    # Which linear layers of the decoder blocks are pruned (spp.patterns: fnmatch or `re:`, block-relative or full
    # names); the rest stay dense, get no mask entry and, by default, no adapter in `spp train`.
    targets: list[str] = option(help="Prune only the decoder-block linears these patterns name (fnmatch or re:REGEX, block-relative or full names; repeatable; default *).", default_factory=lambda: ["*"])
    ignore: list[str] = option(help="Leave the linears these patterns name dense: no mask entry, no adapter (repeatable).", default_factory=list)
    # pattern -> sparsity for the layers it selects (unstructured only; YAML or --set); OWL leaves these alone
    sparsity_overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    owl: bool = option(False, "Outlier-weighted layerwise sparsity (OWL): blocks with more outliers are pruned less; unstructured only.")
    owl_m: float = option(5.0, "OWL's outlier threshold M, times a block's mean Wanda score (default 5).")
    owl_lmbda: float = option(0.08, "OWL's lambda: block sparsities span 2*lambda around --sparsity (default 0.08).")
    # RIA's channel permutation for N:M, where it folds (spp.prune.permute)
    permute_channels: bool = option(False, "N:M with ria or wanda: reorder the inputs of o_proj and down_proj before forming groups (RIA's channel permutation), folded into v_proj and gate/up_proj so the saved model computes the same function.")
    calib: str = option("c4", "A local .txt/.jsonl/.json file, or c4 / wikitext2 (downloaded from the hub; the default c4 needs the network).")
    nsamples: int = option(128, "Number of calibration windows (default 128).")
    seqlen: int | None = option(None, "Tokens per window (default min(2048, context)).")
    seed: int = option(0, "Seed of the calibration window offsets (default 0).")
    device: str = option("auto", "auto (default), cpu or cuda: where each block is pruned.")
    dtype: str = option("auto", "auto (default), float32, bfloat16 or float16.")
    max_shard_size: str = option("2GB", "Largest safetensors shard (default 2GB).")
    overwrite: bool = option(False, "Replace an existing OUTPUT (only once the new one is complete).")
    resume: bool = option(False, "Continue a killed or interrupted run at its first unfinished block (same settings).")
    offload_activations: bool = option(False, "Keep calibration activations on the CPU.")
    blocksize: int = 128  # SparseGPT column block width
    percdamp: float = 0.01  # SparseGPT dampening, × mean Hessian diagonal
    batch_size: int = option(16, "Calibration windows per block forward (default 16).")
    # ALPS (spp.prune.alps). The paper's code runs up to 300 ADMM iterations; each costs about one SparseGPT pass,
    # and 15 keep ALPS within ~10x SparseGPT's time at about half its layer error (docs/pruning-methods.md).
    alps_iters: int | None = option(None, "ALPS: the most ADMM iterations, each about one SparseGPT pass (default 15 unstructured, 30 for N:M; the paper's code: 300).")
    # the initial ADMM penalty is in the unit-diagonal scale; the CG refit acts on the final support
    alps_rho: float = option(0.1, "ALPS: initial ADMM penalty; smaller explores more supports, larger settles sooner (default 0.1).")
    alps_pcg_steps: int = option(10, "ALPS: conjugate-gradient steps refitting the kept weights (default 10; 0: none).")
    # Mask refinement after the method (spp.prune.dsnot): none, or dsnot (swaps a pruned and a kept weight per row)
    refine: Literal["none", "dsnot"] = option("none", "none (default) or dsnot: swap pruned and kept weights per row (in their group) to cut the expected error; needs calibration.")
    # DSnoT's guard: reject a swap that raises the row's squared reconstruction error, exactly, from the full input
    # Hessian (gathered for Wanda/RIA/magnitude as --record-error does); a departure from the paper, whose criterion
    # is the expected error alone
    dsnot_guard: bool = option(True, "DSnoT: reject swaps that raise the squared reconstruction error, from each layer's full input Hessian (as --record-error holds it; default on; the paper has no guard).")
    # DSnoT's update threshold: a row whose expected error |ε_i| (output units, per token) is at or below it is left
    # alone; the authors' 0.1 is on the error summed over a 2048-token window, hence 0.1 / 2048 per token
    dsnot_threshold: float = 0.1 / 2048
    # Gather the full input Hessian (in² float32 per layer of a block) for Wanda/RIA/magnitude, to record their
    # reconstruction error (SparseGPT and ALPS hold it anyway) and give DSnoT's guard the exact error
    record_error: bool = option(False, "Record wanda/ria/magnitude's reconstruction error: holds each layer's input Hessian, in*in float32 (4*in^2 bytes per layer of a block); sparsegpt/alps record it anyway.")
    # A mixture-of-experts expert that the router sent fewer calibration tokens than this is pruned by magnitude
    # (recorded per saved tensor in the manifest). Its statistics would be a handful of tokens: Wanda's ‖X_j‖ from
    # T tokens varies by ~1/√(2T) (±12% at 32), one token's outlier channel would decide every row's mask, and at 0
    # all scores tie; SparseGPT's Hessian has rank ≤ T. 32 costs nothing at usual calibration sizes
    # (128 × 2048 tokens give each of 8 top-2 experts ~65k on average) and catches only starved experts.
    expert_min_tokens: int = option(32, "Mixture-of-experts: an expert routed fewer calibration tokens is pruned by magnitude, recorded in the manifest (default 32).")

    @functools.cached_property
    def n_m(self) -> tuple[int, int] | None:
        """The parsed `pattern`: (N, M) for N:M, None for unstructured; parsed once, by `__post_init__`.

        Raises:
            SppError: `pattern` is neither (`spp.prune.masks.parse_pattern`).
        """
        # imported here: `spp.prune`'s package __init__ (run by any `spp.prune.*` import) imports this module
        from spp.prune.masks import parse_pattern

        return parse_pattern(self.pattern)

    def __post_init__(self):
        n_m = self.n_m
        if self.sparsity is not None:
            _check_range("--sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        if n_m is None:
            if self.sparsity is None:
                self.sparsity = 0.5
        else:
            implied = 1 - n_m[0] / n_m[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise SppError(
                    f"--sparsity {self.sparsity} contradicts --pattern {self.pattern} "
                    f"(which means sparsity {implied:g}); drop --sparsity for N:M patterns"
                )
            self.sparsity = implied
        self._check_layer_choice(n_m)
        _check_range("--nsamples", self.nsamples, 1)
        if self.seqlen is not None:
            _check_range("--seqlen", self.seqlen, 1)
        _check_range("--blocksize", self.blocksize, 1)
        if n_m is not None and self.method == "sparsegpt" and self.blocksize % n_m[1]:
            raise SppError(f"--blocksize {self.blocksize} must be a multiple of M={n_m[1]} for --pattern {self.pattern}")
        _check_range("--percdamp", self.percdamp, 0.0, lo_open=True)
        _check_range("--batch-size", self.batch_size, 1)
        if self.alps_iters is not None:
            _check_range("--alps-iters", self.alps_iters, 1)
        _check_range("--alps-rho", self.alps_rho, 0.0, lo_open=True)
        _check_range("--alps-pcg-steps", self.alps_pcg_steps, 0)
        _check_range("dsnot_threshold", self.dsnot_threshold, 0.0)
        _check_range("--expert-min-tokens", self.expert_min_tokens, 1)
        _check_shard_size(self.max_shard_size)

    def _check_layer_choice(self, n_m) -> None:
        """--targets/--ignore/sparsity_overrides/OWL values; the names themselves are checked against the model."""
        for key in ("targets", "ignore"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        if not self.targets:
            raise SppError("--targets is empty; give at least one layer name pattern (the default '*' prunes every one)")
        if n_m is not None and self.owl:
            raise SppError(f"--owl needs --pattern unstructured: {self.pattern} fixes every layer's sparsity at "
                           f"{1 - n_m[0] / n_m[1]:g}, so there is no per-block sparsity for OWL to choose")
        if n_m is not None and self.sparsity_overrides:
            raise SppError(f"sparsity_overrides need --pattern unstructured: {self.pattern} fixes every layer's "
                           f"sparsity at {1 - n_m[0] / n_m[1]:g}")
        for pattern, value in self.sparsity_overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SppError(f"sparsity_overrides: {pattern}={value!r} should be a number in [0, 1)")
            _check_range(f"sparsity_overrides: {pattern}", value, 0.0, 1.0, hi_open=True)
        if self.permute_channels and (n_m is None or self.method not in ("ria", "wanda")):
            raise SppError("--permute-channels needs --pattern N:M and --method ria or wanda: it reorders a layer's "
                           "inputs before the groups of M are formed, by those methods' scores")
        _check_range("--owl-m", self.owl_m, 0.0, lo_open=True)
        _check_range("--owl-lmbda", self.owl_lmbda, 0.0, 0.5)


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """Settings of `spp train`. Key names follow alpaca-lora's `finetune.py` where one exists.

    The global batch is `batch_size` examples; each process runs `micro_batch_size` at a
    time and accumulates `batch_size / (micro_batch_size · processes)` micro-batches per
    optimizer step. `num_epochs` sets the length unless `max_steps` is given.
    """

    base_model: str = option("", "The pruned model directory (an `spp prune` output).", flag="--model")
    data_path: str = option("", "Alpaca .json/.jsonl, a plain .txt, or a datasets hub name (downloads; alpaca.yaml's default is one).", flag="--data")
    output_dir: str = option("", "The output directory (built in OUTPUT.partial).", flag="--output")
    data_format: Literal["auto", "alpaca", "text"] = "auto"  # auto: .txt -> text, anything else -> alpaca
    data_split: str = "train"  # split of a hub dataset
    prompt_template: Literal["alpaca"] = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = True
    add_eos_token: bool = True
    val_set_size: int | float = 0  # a count, or a fraction < 1 of the records
    micro_batch_size: int = 4
    batch_size: int = 128
    num_epochs: int = 1
    max_steps: int | None = option(None, "Stop after this many optimizer steps.")
    # None: the adapter's documented default (spp.adapter.DEFAULT_LEARNING_RATE); a mapping {adapter: rate}
    # picks the rate of the chosen adapter (so one file can carry a rate per adapter). Resolved to a float.
    learning_rate: float | dict[str, float] | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    # Several processes: `ddp` replicates the model (accelerate's DDP); `fsdp` shards it with FSDP2 (spp.train.fsdp).
    distributed: Literal["ddp", "fsdp"] = option("ddp", "ddp (replicate the model on each process; launch with accelerate launch) or fsdp (shard it with FSDP2; launch with torchrun).")
    cpu_offload: bool = False  # fsdp only: keep sharded parameters, gradients and AdamW state in CPU memory
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 2
    adapter: Literal["spp", "masked_lora", "full"] = "spp"  # the sparsity-preserving recovery (spp.adapter)
    spp_row_groups: int = 16
    rank: int = 8  # masked_lora's rank (lora_r is only SPP's scale denominator)
    lora_alpha: float = 16.0
    lora_r: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    adapt_unpruned: bool = False  # also adapt target layers that `spp prune` left dense (no mask entry)
    # Distillation from the dense model (spp.train.losses): the loss is ce_weight·CE + kd_weight·T²·KL
    # + squarehead_weight·SquareHead, each per target token; kd/squarehead need a teacher.
    # the dense model that was pruned (`spp run` sets it when a distillation weight is > 0)
    teacher: str = option("", "The dense model to distil from (with kd_weight or squarehead_weight > 0).")
    ce_weight: float = 1.0
    kd_weight: float = 0.0  # KL(teacher ‖ student) of the logits at temperature kd_temperature, times T²
    kd_temperature: float = 1.0
    squarehead_weight: float = 0.0  # per-block ‖h_t − h_s‖² / ‖h_t‖² (Kurtic et al. 2023)
    # end_to_end: the whole model on the training text (the loss above); blockwise: each decoder block in turn
    # reproduces the teacher's block output on calibration windows (spp.train.blockwise; needs a teacher)
    objective: Literal["end_to_end", "blockwise"] = "end_to_end"
    block_loss: Literal["normalized", "mse"] = "normalized"
    block_target_inputs: Literal["dense", "sparse"] = "sparse"
    block_epochs: int = 4  # passes over the windows per block
    calib: str = ""  # blockwise windows: c4, wikitext2 or a file ("": data_path)
    nsamples: int = 128  # blockwise windows of cutoff_len tokens
    overwrite: bool = option(False, "Replace an existing output directory.")
    resume: bool = option(False, "Continue an interrupted run from its last checkpoint.")

    def __post_init__(self):
        if self.cutoff_len < 2:
            raise SppError(f"cutoff_len={self.cutoff_len} must be at least 2 (one input and one target token)")
        if isinstance(self.val_set_size, float) and not 0 <= self.val_set_size < 1:
            raise SppError(f"val_set_size={self.val_set_size}: a fraction must be in [0, 1); use an integer for a count")
        _check_range("val_set_size", self.val_set_size, 0)
        for key in ("micro_batch_size", "batch_size", "num_epochs", "logging_steps", "eval_steps", "save_steps",
                    "save_total_limit", "spp_row_groups", "rank", "lora_r", "block_epochs", "nsamples"):
            _check_range(key, getattr(self, key), 1)
        if self.max_steps is not None:
            _check_range("max_steps", self.max_steps, 1)
        if self.batch_size % self.micro_batch_size:
            raise SppError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size={self.micro_batch_size} "
                "(batch_size is the global batch; gradient accumulation makes up the difference)"
            )
        self.learning_rate = self._resolve_learning_rate()
        _check_range("learning_rate", self.learning_rate, 0.0, lo_open=True)
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0)
        if self.max_grad_norm is not None:
            _check_range("max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        self._check_distillation()
        if self.distributed == "fsdp" and self.precision == "fp16":
            raise SppError("precision=fp16 with distributed=fsdp is not supported (fp16 needs a sharded loss scaler); "
                           "use precision=bf16 or fp32")
        if self.cpu_offload and self.distributed != "fsdp":
            raise SppError("cpu_offload=true needs distributed=fsdp (it offloads FSDP's shards)")
        self.adapter_config()  # checks the adapter keys (a non-zero lora_dropout among them)

    def _check_distillation(self) -> None:
        for key in ("ce_weight", "kd_weight", "squarehead_weight"):
            _check_range(key, getattr(self, key), 0.0)
        _check_range("kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        distilling = self.kd_weight > 0 or self.squarehead_weight > 0
        if self.objective == "blockwise":
            return self._check_blockwise(distilling)
        if not distilling and self.ce_weight == 0:
            raise SppError("ce_weight, kd_weight and squarehead_weight are all 0: nothing to train on; set one > 0")
        if distilling and not self.teacher:
            which = "kd_weight" if self.kd_weight > 0 else "squarehead_weight"
            raise SppError(f"{which}={getattr(self, which)} needs a teacher: pass --teacher (the dense model that was "
                           "pruned) or set teacher in the config")
        if self.teacher and not distilling:
            raise SppError(f"teacher {self.teacher} is set but kd_weight and squarehead_weight are both 0, so it "
                           "would not be used: set one of them > 0 or drop the teacher")

    def _check_blockwise(self, distilling: bool) -> None:
        if not self.teacher:
            raise SppError("objective=blockwise needs a teacher: pass --teacher (the dense model that was pruned) or "
                           "set teacher in the config")
        if distilling:
            raise SppError("kd_weight and squarehead_weight are terms of objective=end_to_end; objective=blockwise "
                           "has its own loss (block_loss): set them to 0")
        if self.distributed == "fsdp":
            raise SppError("objective=blockwise runs on one device (one block at a time): drop distributed=fsdp")
        if self.precision == "fp16":
            raise SppError("precision=fp16 with objective=blockwise is not supported (no loss scaler): use bf16 or fp32")
        if self.max_steps is not None:
            raise SppError(f"max_steps={self.max_steps} counts end-to-end steps; objective=blockwise trains each "
                           "block for block_epochs passes over nsamples windows: drop max_steps")
        if self.nsamples < self.batch_size:
            raise SppError(f"nsamples={self.nsamples} is fewer than one batch (batch_size={self.batch_size}): "
                           "objective=blockwise needs at least one optimizer step per block epoch")

    def _resolve_learning_rate(self) -> float:
        """`learning_rate` as a number: as given, the chosen adapter's entry of a mapping, or the adapter's default."""
        from spp.adapter import DEFAULT_LEARNING_RATE
        from spp.adapter.config import check_kind

        check_kind(self.adapter, "adapter")
        rate = self.learning_rate
        if isinstance(rate, dict):
            for kind, value in rate.items():
                check_kind(kind, "learning_rate")
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise SppError(f"learning_rate: {kind}={value!r} should be a number")
            rate = rate.get(self.adapter)
        return float(DEFAULT_LEARNING_RATE[self.adapter] if rate is None else rate)

    def adapter_config(self, base_model: str = "", mask_sha256: str = ""):
        """The `AdapterConfig` these settings describe (it raises SppError on bad adapter keys)."""
        from spp.adapter.config import AdapterConfig

        return AdapterConfig(kind=self.adapter, rank=self.rank, spp_row_groups=self.spp_row_groups, lora_alpha=self.lora_alpha, lora_r=self.lora_r,
                             lora_dropout=self.lora_dropout, target_modules=list(self.target_modules),
                             adapt_unpruned=self.adapt_unpruned,
                             base_model=base_model, mask_sha256=mask_sha256)


# --------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    """Settings of `spp eval`: perplexity sets (`ppl`) and lm-eval zero-shot tasks (`tasks`).

    `seqlen` None means the model's context capped at 4096 (the published protocol:
    2048 for LLaMA-1, 4096 for LLaMA-2). `task_data` None means the hub; a directory
    means the local copies described in the README (`spp eval`, offline task data).
    """

    model: str = option(help="Local Hugging Face directory (dense, pruned, merged), a .gguf file (needs spp-llm[gguf]), or a hub id (downloads from the hub).")
    adapter: str | None = option(None, "An `spp train` output to evaluate unmerged on top of --model.")
    ppl: list[str] = option(help="Comma list of PATH (.txt/.jsonl); wikitext2 / c4 (from the hub); or NAME:PATH, a local copy of the set NAME (wikitext2, c4 or ptb).", default_factory=list)
    seqlen: int | None = option(None, "Perplexity window (default: the model's context, at most 4096).")
    max_windows: int | None = option(None, "Use at most this many perplexity windows per set.")
    tasks: list[str] = option(help="Comma list of lm-eval tasks: boolq,piqa,arc_easy,... (data from the hub unless --task-data).", default_factory=list)
    task_data: str | None = option(None, "Local task data directory (default $SPP_TASK_DATA; unset: the hub).")
    limit: int | None = option(None, "Evaluate only the first N examples of each task.")
    batch_size: int | None = option(None, "Perplexity windows (default 1) / distinct zero-shot contexts (default: 4 on a CPU, the most that fits on CUDA) per forward.")
    num_fewshot: int = option(0, "Few-shot examples per prompt (the papers use 0).")
    output: str | None = option(None, "Write results.json and the manifest here.")
    device: str = option("auto", "auto, cpu or cuda.")
    dtype: str = option("auto", "auto, float32, bfloat16 or float16.")
    # run 2:4 linears on cuSPARSELt (spp.eval.sparse_kernels); CUDA, fp16/bf16 only
    sparse_kernels: bool = option(False, "Run the 2:4 linears on cuSPARSELt (CUDA, float16/bfloat16); reports speed against dense.")
    overwrite: bool = option(False, "Replace an existing OUTPUT.")

    def __post_init__(self):
        if not self.ppl and not self.tasks:
            raise SppError("nothing to evaluate: pass --ppl (e.g. wikitext2) and/or --tasks (e.g. boolq,piqa)")
        for name in ("seqlen", "max_windows", "limit", "batch_size"):
            if getattr(self, name) is not None:
                _check_range("--" + name.replace("_", "-"), getattr(self, name), 1)
        _check_range("--num-fewshot", self.num_fewshot, 0)


PIPELINE_SECTIONS = {"sweep", "prune", "eval"}  # keys only an `spp run` file has (its eval section is required)


def find_config(name: str, kind: Literal["train", "pipeline"] = "train") -> Path:
    """A train `--config` value, or an `spp run` file: an existing path, else one bundled with spp.

    Bundled pipelines are the `pipeline_*.yaml` files; the others (`alpaca.yaml`, ...) are train configs.

    Raises:
        SppError: neither exists (lists the bundled files of that kind).
    """
    from importlib.resources import files

    bundled = files("spp.configs")
    path = Path(name).expanduser()
    if not path.is_file() and "/" not in name and (bundled / name).is_file():
        path = Path(str(bundled / name))
    if not path.is_file():
        raise SppError(f"config {name} does not exist (bundled configs: {', '.join(_bundled_names(kind))})")
    return path


def _bundled_names(kind: Literal["train", "pipeline"]) -> list[str]:
    from importlib.resources import files

    return sorted(p.name for p in files("spp.configs").iterdir() if p.name.endswith(".yaml")
                  and p.name.startswith("pipeline_") == (kind == "pipeline"))


def read_train_config(name: str) -> tuple[Path, dict]:
    """A train `--config` value found (`find_config`) and read, once: (its path, its keys).

    Raises:
        SppError: as `find_config` and `read_yaml`, or the file is an `spp run` pipeline.
    """
    path = find_config(name)
    values = read_yaml(path)
    if PIPELINE_SECTIONS & values.keys():
        raise SppError(f"{name} is an `spp run` pipeline, not a train config: run it with `spp run {name}` "
                       f"(bundled train configs: {', '.join(_bundled_names('train'))})")
    return path, values


# --------------------------------------------------------------------------- merge


@dataclass
class MergeConfig:
    """Settings of `spp merge`. Run inside a training run's directory, the defaults need no flags:
    `adapter` is `./train`, `model` the base recorded in the adapter config, `output` `./merged`."""

    model: str | None = option(None, "The pruned base (default: the one the adapter records).")
    adapter: str = option("train", "The adapter directory (an `spp train` output).")
    output: str = option("merged", "The merged model directory (built in OUTPUT.partial).")
    dtype: str = option("auto", "The merged weights' dtype: auto (the base's), float32, bfloat16 or float16; the merge math is float32 either way.")
    overwrite: bool = option(False, "Replace an existing output directory.")


@dataclass
class ExportConfig:
    """Settings of `spp export`: `compressed` writes kept values + mask (spp.io.compressed); False restores."""

    model: str = option(help="A sparse checkpoint (spp prune/merge output), or with --dense an `spp export` output.")
    output: str = option(help="The output directory (built in OUTPUT.partial).")
    compressed: bool = option(True, "Write kept values + the mask file (default), or restore the checkpoint.", flag="--compressed/--dense")
    dtype: str = option("auto", "With --dense: the restored weights' dtype: auto (the source's, byte for byte), float32, bfloat16 or float16.")
    overwrite: bool = option(False, "Replace an existing output directory.")


# --------------------------------------------------------------------------- pipeline


@dataclass
class PipelineConfig:
    """A `spp run` file: the model, the run directory, shared prune settings, the sweep, train and eval sections.

    `prune` holds PruneConfig keys shared by every setting; each `sweep` entry adds or
    overrides keys for one setting (and may carry a `name`, the setting's folder).
    `train` holds TrainConfig keys, optionally `config: NAME` (a file or a bundled
    config such as `alpaca.yaml`) whose keys come first. `eval` holds EvalConfig keys,
    used alike for the dense, pruned and merged models. Paths, output folders and
    `overwrite`/`resume` are set by the run itself.
    """

    model: str
    output: str = "run"
    prune: dict = dataclasses.field(default_factory=dict)
    sweep: list[dict] = dataclasses.field(default_factory=lambda: [{}])
    train: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.sweep:
            raise SppError("sweep: is empty; list at least one prune setting (e.g. - {pattern: '2:4'})")
        for i, entry in enumerate(self.sweep):
            if not isinstance(entry, dict):
                raise SppError(f"sweep entry {i + 1} must be a mapping of prune keys, not {entry!r}")
        if not self.eval:
            raise SppError("eval: is empty; give at least ppl: [...] or tasks: [...]")
