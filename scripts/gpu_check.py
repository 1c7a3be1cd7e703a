"""One prepared GPU check of every CUDA path of spp: one command, one report, at most about 5 minutes.

    bash scripts/gpu_check.sh prepare                    # once, on a CPU machine with network: .gpu-check/
    bash scripts/gpu_check.sh                            # on the GPU machine: offline install, then this script
    python scripts/gpu_check.py --output DIR [--only e2e,train] [--budget 270] [--cap prune=90]
    python scripts/gpu_check.py --dry-run --output DIR   # tiny shapes on the CPU (tests/test_gpu_check.py runs it)

Writes DIR/gpu.json and DIR/gpu.md, rewritten after every row, so a timeout keeps what ran. Rows, in priority
order, each in its own forked process (own peak memory, killed with its children at its time cap; what it
recorded before is kept and marked):

  e2e      `spp prune (wanda 2:4) → train (10 steps, bf16) → merge → verify → eval --sparse-kernels` through the
           CLI in child processes: exit code and wall time of each, perplexity and the 2:4 speed-ups of eval.
  train    one AdamW step of each spp adapter kind (spp, masked_lora, full) against a PEFT LoRA step (r 8, every
           projection), bf16, micro-batch 4 × 2048, activation checkpointing off and on: median step time and
           peak CUDA memory, as ratios to LoRA in the same setting.
  prune    `spp.prune.prune_model` (Wanda, SparseGPT; 2:4) against the reference-style loop of
           scripts/reference.py on the first blocks of the model, 128 × 2048 calibration tokens: seconds per
           block and peak CUDA memory; then ALPS (`spp.prune.alps.alps_prune`, not a CLI method) against
           `sparsegpt_prune` on block 0's q_proj and down_proj: seconds and the layer-wise error tr(ΔW H ΔWᵀ).
  kernels  dense F.linear against the 2:4 semi-structured path (the tensor subclass that `spp eval
           --sparse-kernels` uses, and cuSPARSELt directly with its algorithm searched once) on LLaMA-3-8B and 70B
           linear shapes, 1/16/128/2048 tokens, bf16 and fp16; CUDA events after warm-up, weights converted outside
           the timed region; every row where 2:4 is slower is profiled (torch.profiler: the ops, CUDA and CPU µs)
           and a one-line reason is recorded; torch.compile of both paths on two shapes.
  fsdp     `spp train --distributed fsdp` under `torchrun --nproc_per_node 1` (NCCL), and with cpu_offload,
           against the single-process bf16 run on the same GPU: per-step loss differences and the adapter's
           largest relative difference (the tolerance, measured), peak CUDA memory from the manifests.
  eval     `spp.eval.perplexity.perplexity` tokens/s against a plain loop (scripts/reference.py) on the model.

The model: a seeded random LLaMA with LLaMA-3-8B layer shapes (hidden 4096, intermediate 14336, 32 query / 8
key-value heads), 4 layers, vocabulary 512 with the stories260K tokenizer, bf16; text: TinyStories' validation
file. Both come from `--assets` (default `.gpu-check/`, which `gpu_check.sh prepare` fills; else ../shared/data).
`datasets` and `lm_eval` are made unimportable in this process and in every CLI child, as on the GPU machine, so
the dry run proves those rows need neither. `--dry-run`: the same code with tiny shapes on the CPU; the CUDA-only
rows (kernels, fsdp) are reported as skipped and `eval --sparse-kernels` runs without the flag.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `datasets` and `lm_eval` are not on the GPU machine: None in sys.modules makes every import of them fail here too
BLOCK_MISSING = "import sys\nfor _name in ('datasets', 'lm_eval'):\n    sys.modules[_name] = None\n"
CLI_MAIN = BLOCK_MISSING + "from spp.cli import app\napp()\n"

ROWS = ("e2e", "train", "prune", "kernels", "fsdp", "eval")
CUDA_ONLY = {"kernels": "2:4 semi-structured kernels need a CUDA GPU", "fsdp": "FSDP2 over NCCL needs a CUDA GPU"}
CAPS = {"e2e": 110, "train": 70, "prune": 70, "kernels": 60, "fsdp": 75, "eval": 25}  # seconds; the budget cuts later rows
SETUP_CAP = 60

LLAMA3_8B_4L = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=512, max_position_embeddings=4096, rope_theta=500000.0,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TINY = dict(LLAMA3_8B_4L, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FULL_SIZES = dict(nsamples=128, seqlen=2048, micro=4, train_seq=2048, e2e_steps=10, warmup=2, steps=3,
                  prune_blocks=2, alps_windows=16, ppl_windows=8, fsdp_steps=4, min_ms=10.0)
DRY_SIZES = dict(nsamples=4, seqlen=64, micro=2, train_seq=64, e2e_steps=2, warmup=1, steps=1, prune_blocks=2,
                 alps_windows=4, ppl_windows=4, fsdp_steps=2, min_ms=1.0)
KERNEL_SHAPES = {  # (out, in) of nn.Linear weights
    "8B q/o": (4096, 4096), "8B k/v": (1024, 4096), "8B gate/up": (14336, 4096), "8B down": (4096, 14336),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}
KERNEL_TOKENS = (1, 16, 128, 2048)
KERNEL_DTYPES = ("bfloat16", "float16")
COMPILED = (("8B gate/up", 16), ("8B gate/up", 2048))  # bf16; torch.compile costs seconds per graph
TRAIN_KINDS = ("lora", "spp", "masked_lora", "full")  # lora (PEFT) first: the reference of its setting
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Context:
    """What every row needs: where things are, the device, the model's shape and the sizes of the measurements."""

    work: Path
    tokenizer: Path
    text: Path
    device: str
    dims: dict
    sizes: dict
    dry_run: bool
    dtype: str = "bfloat16"
    gpu: dict = field(default_factory=dict)  # name and capability, read by the setup row (no CUDA call elsewhere)

    @property
    def dense(self) -> Path:
        return self.work / "dense"


# --------------------------------------------------------------------------- rows record as they go


@dataclass
class Row:
    """One row's record, flushed to `path` after every item, so a killed row keeps what it measured."""

    name: str
    path: Path
    status: str = "running"
    env: dict = field(default_factory=dict)
    columns: list = field(default_factory=list)
    items: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None

    def flush(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)

    def add(self, **item) -> dict:
        self.items.append(item)
        self.flush()
        return item

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()


def environment(ctx: Context) -> dict:
    """Device, versions and dtype, as every row states them."""
    import torch
    import transformers

    env = {"device": ctx.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "dtype": ctx.dtype, "python": platform.python_version()}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    env.update(ctx.gpu)
    if ctx.device != "cuda":
        env["cpu_threads"] = torch.get_num_threads()
    return env


def sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        import torch

        torch.cuda.synchronize()


def reset_peak(ctx: Context) -> None:
    import gc

    import torch

    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(ctx: Context) -> float | None:
    """Peak CUDA memory allocated since `reset_peak`, MiB (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if ctx.device == "cuda" else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- setup: the model on disk


def setup(ctx: Context, row: Row) -> None:
    """The random LLaMA (seed 0) in bf16 with the stories260K tokenizer, saved to `ctx.dense` once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (ctx.dense / "config.json").is_file():
        row.note("model already saved")
        return
    if ctx.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible; run with --dry-run on a CPU machine")
        row.add(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                cuda_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    torch.manual_seed(0)
    with torch.device(ctx.device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = LlamaForCausalLM(LlamaConfig(**ctx.dims)).to(getattr(torch, ctx.dtype))
    model.save_pretrained(ctx.dense)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (ctx.tokenizer / name).is_file():
            shutil.copyfile(ctx.tokenizer / name, ctx.dense / name)
    params = sum(p.numel() for p in model.parameters())
    row.add(params=params, bytes=sum(p.numel() * p.element_size() for p in model.parameters()))


# --------------------------------------------------------------------------- e2e: the CLI


def cli(args: list[str], log: Path, launch: str = "fork") -> tuple[int, float, str]:
    """One `spp` command, its output in `log`: (exit code, seconds, its whole output when it failed).

    `launch`: "fork" runs `spp.cli.app` in a forked child of this process (the imports are already done: seconds
    saved per command; only while this process has not used CUDA), "python" in a fresh interpreter, "torchrun"
    under `torchrun --standalone --nproc_per_node 1`. Every way, `datasets` and `lm_eval` cannot be imported.
    """
    start = time.perf_counter()
    if launch == "fork":
        rc = _forked_cli(args, log)
    else:
        script = log.parent / "spp_main.py"
        script.write_text(CLI_MAIN)
        prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
                  if launch == "torchrun" else [sys.executable])
        with open(log, "w") as out:
            rc = subprocess.run(prefix + [str(script), *args], stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    return rc, seconds, "" if rc == 0 else log.read_text(errors="replace")


def _forked_cli(args: list[str], log: Path) -> int:
    pid = os.fork()
    if pid == 0:  # the child: `spp ARGS` with stdout and stderr in the log
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["spp", *args]
            from spp.cli import app

            app()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def error_line(tail: str) -> str:
    """The line of a failed command's output that says why: its last `Error`/`error:` line, else its last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    spp_said = [line for line in lines if line.startswith(("Error:", "error:"))]  # spp's own one-line refusals
    raised = [line for line in lines if "Error:" in line and "ChildFailedError" not in line]
    return (spp_said or raised or lines or [""])[-1][:300]


def train_args(ctx: Context, model: Path, output: Path, steps: int, micro: int, batch: int, *extra: str) -> list[str]:
    """`spp train` on the text, bf16, `steps` AdamW steps of `batch` windows of the training length."""
    sets = {"precision": "bf16", "cutoff_len": ctx.sizes["train_seq"], "micro_batch_size": micro, "batch_size": batch,
            "val_set_size": 0, "save_steps": 10**6, "logging_steps": 1, "learning_rate": 1e-4, "warmup_ratio": 0.0,
            "data_format": "text"}
    args = ["train", "--config", str(REPO / "configs" / "tinystories.yaml"), "--model", str(model), "--data",
            str(ctx.text), "--output", str(output), "--max-steps", str(steps), "--overwrite"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def losses(train_dir: Path) -> list[float]:
    lines = (train_dir / "train_log.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def eval_summary(results: dict) -> str:
    """Perplexity and, with --sparse-kernels, the 2:4 speed-ups from an `spp eval` results.json."""
    parts = [f"ppl {v.get('ppl'):.4g}" for v in (results.get("perplexity") or {}).values() if isinstance(v, dict)]
    kernels = results.get("sparse_kernels")
    if isinstance(kernels, dict):
        parts.append(", ".join(f"{k} {kernels[k]:.3g}" for k in ("converted_linears", "logit_max_rel_difference",
                                                                  "prefill_speedup", "decode_speedup") if k in kernels))
    return "; ".join(parts)


def row_e2e(ctx: Context, row: Row) -> None:
    s = ctx.sizes
    d = ctx.work / "e2e"
    d.mkdir(exist_ok=True)
    row.columns = ["step", "rc", "seconds", "detail"]
    dev = ["--device", ctx.device, "--dtype", ctx.dtype]
    eval_args = ["eval", "--model", str(d / "merged"), "--ppl", str(ctx.text), "--seqlen", str(s["seqlen"]),
                 "--max-windows", str(s["ppl_windows"]), "--batch-size", "4", *dev, "--output", str(d / "eval"),
                 "--overwrite"]
    if ctx.device == "cuda":
        eval_args.append("--sparse-kernels")
    else:
        row.note("eval ran without --sparse-kernels (CUDA only)")
    steps = [
        ("prune", ["prune", "--model", str(ctx.dense), "--output", str(d / "pruned"), "--method", "wanda",
                   "--pattern", "2:4", "--calib", str(ctx.text), "--nsamples", str(s["nsamples"]), "--seqlen",
                   str(s["seqlen"]), *dev, "--overwrite"]),
        ("train", train_args(ctx, d / "pruned", d / "train", s["e2e_steps"], s["micro"], s["micro"])),
        ("merge", ["merge", "--adapter", str(d / "train"), "--output", str(d / "merged"), "--overwrite"]),
        ("verify", ["verify", str(d / "merged")]),
        ("eval", eval_args),
    ]
    for name, args in steps:
        rc, seconds, tail = cli(args, d / f"{name}.log")
        detail = error_line(tail)
        if rc == 0 and name == "train":
            got = losses(d / "train")
            detail = f"loss {got[0]:.4f} → {got[-1]:.4f} over {len(got)} steps"
        if rc == 0 and name == "eval":
            detail = eval_summary(json.loads((d / "eval" / "results.json").read_text()))
        row.add(step=name, rc=rc, seconds=round(seconds, 2), detail=detail)
        if rc != 0:
            row.error = f"spp {name} exited {rc}:\n{tail[-1500:]}"
            row.flush()
            raise RuntimeError(f"spp {name} exited {rc}")


# --------------------------------------------------------------------------- train: adapter steps against LoRA


def magnitude_24(model) -> dict:
    """2:4 magnitude masks of every decoder projection, applied in place (pruned entries +0.0, as spp prune leaves
    them); keep-masks by `<module>.weight`."""
    import torch

    from spp.prune.masks import apply_mask, select_mask
    from spp.prune.wanda import magnitude_scores

    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." in name and name.rpartition(".")[2] in PROJECTIONS:
                keep = select_mask(magnitude_scores(module.weight), (2, 4), 0.5, per_row=False)
                module.weight.copy_(apply_mask(module.weight, keep))
                masks[f"{name}.weight"] = keep
    return masks


def train_step_record(ctx: Context, kind: str, checkpointing: bool) -> dict:
    """Median step time and peak memory of `steps` AdamW steps (after `warmup`) with one adapter kind."""
    import torch

    from spp.models import enable_checkpointing, load_model

    s = ctx.sizes
    reset_peak(ctx)
    model = load_model(str(ctx.dense), ctx.dtype, ctx.device)
    masks = magnitude_24(model)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
    else:
        from spp.adapter.config import AdapterConfig
        from spp.adapter.model import add_adapter

        add_adapter(model, AdapterConfig(kind=kind, rank=8, spp_row_groups=16, lora_alpha=16, lora_r=8,
                                         target_modules=["*proj"]), masks)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, ctx.dims["vocab_size"], (s["micro"], s["train_seq"]),
                        generator=torch.Generator().manual_seed(0)).to(ctx.device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(s["warmup"]):
        step()
    sync(ctx)
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(s["steps"]):
        start = time.perf_counter()
        loss = step()
        sync(ctx)
        times.append(time.perf_counter() - start)
    record = {"kind": kind, "checkpointing": checkpointing, "step_s": statistics.median(times),
              "peak_mib": peak_mib(ctx), "trainable": sum(p.numel() for p in params), "loss": loss}
    del model, optimizer, params
    return record


def row_train(ctx: Context, row: Row) -> None:
    import peft  # noqa: F401  (the reference; a missing PEFT fails the row at once)

    row.columns = ["kind", "checkpointing", "step_s", "time_vs_lora", "peak_mib", "memory_vs_lora", "trainable", "loss"]
    row.note(f"micro-batch {ctx.sizes['micro']} × {ctx.sizes['train_seq']} random tokens, AdamW, every projection "
             f"adapted; median of {ctx.sizes['steps']} steps after {ctx.sizes['warmup']}; ratios to PEFT LoRA r 8 "
             "in the same checkpointing setting")
    for checkpointing in (False, True):
        reference = None
        for kind in TRAIN_KINDS:
            record = train_step_record(ctx, kind, checkpointing)
            reference = reference or record
            row.add(**record, time_vs_lora=ratio(record["step_s"], reference["step_s"]),
                    memory_vs_lora=ratio(record["peak_mib"], reference["peak_mib"]))


# --------------------------------------------------------------------------- prune: spp against the reference loop


def row_prune(ctx: Context, row: Row) -> None:
    import copy

    import torch

    from reference import baseline_prune  # the reference-style loop
    from spp.config import PruneConfig
    from spp.data import calibration_windows
    from spp.models import load_model, load_tokenizer
    from spp.prune import prune_model

    s = ctx.sizes
    base = load_model(str(ctx.dense), ctx.dtype, "cpu")
    blocks = min(s["prune_blocks"], len(base.model.layers))
    base.model.layers = base.model.layers[:blocks]  # seconds per block: the first blocks are enough
    base.config.num_hidden_layers = blocks
    windows = calibration_windows(load_tokenizer(str(ctx.dense)), str(ctx.text), s["nsamples"], s["seqlen"], 0)
    device = torch.device(ctx.device)
    row.columns = ["method", "impl", "blocks", "s_per_block", "peak_mib", "time_ratio_ref_over_spp",
                   "memory_ratio_ref_over_spp", "error_ratio", "detail"]
    row.note(f"{s['nsamples']} × {s['seqlen']} calibration tokens (TinyStories validation), 2:4, the first {blocks} "
             "blocks; ratios reference / spp (above 1: spp faster or smaller)")
    for method in ("wanda", "sparsegpt"):
        timed = {}
        for impl in ("reference", "spp"):
            model = copy.deepcopy(base)
            reset_peak(ctx)
            start = time.perf_counter()
            if impl == "spp":
                cfg = PruneConfig(model="-", output="-", method=method, pattern="2:4", calib="-",
                                  nsamples=s["nsamples"], seqlen=s["seqlen"])
                prune_model(model, windows, cfg, device)
            else:
                baseline_prune(model, windows, method, (2, 4), 0.5, device)
            sync(ctx)
            timed[impl] = ((time.perf_counter() - start) / blocks, peak_mib(ctx))
            del model
        (ref_s, ref_m), (spp_s, spp_m) = timed["reference"], timed["spp"]
        row.add(method=method, impl="reference", blocks=blocks, s_per_block=ref_s, peak_mib=ref_m)
        row.add(method=method, impl="spp", blocks=blocks, s_per_block=spp_s, peak_mib=spp_m,
                time_ratio_ref_over_spp=ratio(ref_s, spp_s), memory_ratio_ref_over_spp=ratio(ref_m, spp_m))
    alps_rows(ctx, row, base, windows[: s["alps_windows"]])


def alps_rows(ctx: Context, row: Row, base, windows) -> None:
    """ALPS against SparseGPT on block 0's q_proj and down_proj, through the pure functions (ALPS is not a CLI
    method yet): seconds and the layer-wise error tr(ΔW H ΔWᵀ) with the Hessian of these windows."""
    import copy

    import torch

    from spp.prune.alps import alps_prune
    from spp.prune.sparsegpt import accumulate_hessian, hessian_from_sum, sparsegpt_prune

    row.note("ALPS is not a `--method` yet: `spp.prune.alps.alps_prune` against `sparsegpt_prune` on block 0's "
             f"q_proj and down_proj, Hessian from {windows.shape[0]} windows; error ratio = ALPS / SparseGPT error")
    model = copy.deepcopy(base)
    model.model.layers = model.model.layers[:1]
    model.to(ctx.device)
    layers = {name: getattr(getattr(model.model.layers[0], part), name)
              for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))}
    sums = {name: [None, 0] for name in layers}

    def hook(name):
        def accumulate(module, args):
            H, n = accumulate_hessian(sums[name][0], args[0])
            sums[name][0], sums[name][1] = H, sums[name][1] + n
        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        for batch in windows.split(4):
            model(batch.to(ctx.device), use_cache=False)
    for handle in handles:
        handle.remove()
    for name, layer in layers.items():
        H = hessian_from_sum(*sums[name])
        W = layer.weight.detach()
        results = {}
        for impl, fn in (("sparsegpt", lambda: sparsegpt_prune(W, H, (2, 4), 0.5)),
                         ("alps", lambda: alps_prune(W, H, (2, 4), 0.5))):
            sync(ctx)
            start = time.perf_counter()
            W_new, keep, info = fn()
            sync(ctx)
            delta = (W.float() - W_new.float())
            error = float(((delta @ H) * delta).sum())
            results[impl] = (time.perf_counter() - start, error, info)
        (sg_s, sg_e, _), (al_s, al_e, info) = results["sparsegpt"], results["alps"]
        detail = f"{tuple(W.shape)}, ADMM iterations {info.get('admm_iterations')}" if isinstance(info, dict) else ""
        row.add(method="sparsegpt (layer)", impl=name, blocks=1, s_per_block=sg_s)
        row.add(method="alps (layer)", impl=name, blocks=1, s_per_block=al_s, time_ratio_ref_over_spp=ratio(sg_s, al_s),
                error_ratio=ratio(al_e, sg_e), detail=detail)
    del model


# --------------------------------------------------------------------------- 2:4 kernels


def prune_24(weight):
    """Magnitude 2:4 along the input axis (keep the 2 largest |w| of every 4)."""
    import torch

    out_features, in_features = weight.shape
    groups = weight.abs().view(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return weight * keep.view(out_features, in_features)


def cuda_ms(fn, min_ms: float) -> float:
    """Mean milliseconds per call, CUDA events, after 5 warm-up calls, over enough calls to run at least `min_ms`."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 10
    while True:
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        total = start.elapsed_time(end)
        if total >= min_ms or repeats >= 10000:
            return total / repeats
        repeats *= 4


def profile_ops(fn, top: int = 5) -> list[dict]:
    """The ops one call ran, by self CUDA time: name, calls, CUDA µs, CPU µs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"op": e.key, "calls": e.count, "cuda_us": round(getattr(e, "self_device_time_total", 0.0), 1),
             "cpu_us": round(e.self_cpu_time_total, 1)} for e in prof.key_averages()]
    rows.sort(key=lambda r: (r["cuda_us"], r["cpu_us"]), reverse=True)
    return rows[:top]


def why_slower(ops: list[dict], dense_ms: float, sparse_ms: float) -> str:
    """A one-line reading of a slower 2:4 call's profile."""
    cuda = sum(o["cuda_us"] for o in ops)
    cpu = sum(o["cpu_us"] for o in ops)
    extra = [o for o in ops if any(w in o["op"].lower() for w in ("pad", "copy", "cat", "contiguous", "fill"))]
    extra_us = sum(o["cuda_us"] for o in extra)
    if cpu > 2 * cuda:
        return f"host-side overhead: {cpu:.0f} µs of CPU per call against {cuda:.0f} µs on the GPU"
    if cuda and extra_us > 0.2 * cuda:
        return (f"input padding/copies: {', '.join(o['op'] for o in extra)} take {extra_us:.0f} of {cuda:.0f} "
                "GPU µs per call")
    top = ops[0]["op"] if ops else "?"
    return f"the sparse kernel itself ({top}) is slower at this shape: {sparse_ms * 1e3:.0f} µs vs dense {dense_ms * 1e3:.0f} µs"


def kernel_record(name: str, shape, tokens: int, dtype_name: str, min_ms: float, profile: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    weight = prune_24(torch.randn(shape, device="cuda", dtype=dtype))
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
    record = {"shape": name, "out_in": f"{shape[0]}×{shape[1]}", "tokens": tokens, "dtype": dtype_name}
    paths = {"dense": lambda: F.linear(x, weight)}
    try:
        sparse_weight = to_sparse_semi_structured(weight)  # converted once, outside every timed region
        paths["subclass"] = lambda: F.linear(x, sparse_weight)
        packed, xt = torch._cslt_compress(weight), x.t()
        alg_id = torch._cslt_sparse_mm_search(packed, xt, transpose_result=True)
        paths["direct"] = lambda: torch._cslt_sparse_mm(packed, xt, transpose_result=True, alg_id=alg_id)
    except (RuntimeError, NotImplementedError) as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    reference = paths["dense"]().float()
    for path, fn in paths.items():
        try:
            out = fn().float()
            record[f"{path}_ms"] = cuda_ms(fn, min_ms)
            if path != "dense":
                record[f"{path}_rel_err"] = float((out - reference).abs().max() / reference.abs().max())
                record[f"{path}_speedup"] = record["dense_ms"] / record[f"{path}_ms"]
        except (RuntimeError, NotImplementedError) as exc:
            record[f"{path}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if profile and record.get("subclass_speedup", 1.0) < 1.0:
        ops = profile_ops(paths["subclass"])
        record["subclass_profile"] = ops
        record["why"] = why_slower(ops, record["dense_ms"], record["subclass_ms"])
    return record


def row_kernels(ctx: Context, row: Row) -> None:
    import torch

    row.columns = ["shape", "out_in", "tokens", "dtype", "dense_ms", "subclass_ms", "subclass_speedup", "direct_ms",
                   "direct_speedup", "subclass_rel_err", "why"]
    row.note("speed-up = dense ms / 2:4 ms (above 1: 2:4 faster); subclass = F.linear on "
             "to_sparse_semi_structured(W), what `spp eval --sparse-kernels` runs; direct = torch._cslt_sparse_mm "
             "with the algorithm from _cslt_sparse_mm_search; CUDA events, weights converted outside the timed region")
    row.note("profiled: the first slower token count of each shape and dtype")
    for dtype_name in KERNEL_DTYPES:
        for name, shape in KERNEL_SHAPES.items():
            profiled = False
            for tokens in KERNEL_TOKENS:
                record = row.add(**kernel_record(name, shape, tokens, dtype_name, ctx.sizes["min_ms"], not profiled))
                profiled = profiled or "subclass_profile" in record
                torch.cuda.empty_cache()
        if dtype_name == "bfloat16":
            compiled_rows(ctx, row)


def compiled_rows(ctx: Context, row: Row) -> None:
    """torch.compile of the dense and the 2:4 path on `COMPILED` (bf16): does it change the answer?"""
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    for name, tokens in COMPILED:
        shape = KERNEL_SHAPES[name]
        weight = prune_24(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
        sparse_weight = to_sparse_semi_structured(weight)
        dense_c = torch.compile(lambda inp: F.linear(inp, weight))
        sparse_c = torch.compile(lambda inp: F.linear(inp, sparse_weight))
        record = {"shape": name + " (torch.compile)", "out_in": f"{shape[0]}×{shape[1]}", "tokens": tokens,
                  "dtype": "bfloat16"}
        try:
            record["dense_ms"] = cuda_ms(lambda: dense_c(x), ctx.sizes["min_ms"])
            record["subclass_ms"] = cuda_ms(lambda: sparse_c(x), ctx.sizes["min_ms"])
            record["subclass_speedup"] = record["dense_ms"] / record["subclass_ms"]
        except Exception as exc:  # compile failures are an answer too
            record["why"] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row.add(**record)


# --------------------------------------------------------------------------- fsdp: torchrun against one process


def pruned_model(ctx: Context) -> Path:
    """The e2e row's pruned model if it ran, else a magnitude 2:4 prune of the dense model (no calibration)."""
    e2e = ctx.work / "e2e" / "pruned"
    if (e2e / "config.json").is_file():
        return e2e
    out = ctx.work / "pruned-magnitude"
    if not (out / "config.json").is_file():
        from spp.config import PruneConfig
        from spp.prune import run_prune

        run_prune(PruneConfig(model=str(ctx.dense), output=str(out), method="magnitude", pattern="2:4",
                              device=ctx.device, dtype=ctx.dtype, overwrite=True))
    return out


def row_fsdp(ctx: Context, row: Row) -> None:
    from safetensors.torch import load_file

    pruned = pruned_model(ctx)
    d = ctx.work / "fsdp"
    d.mkdir(exist_ok=True)
    steps, micro = ctx.sizes["fsdp_steps"], max(ctx.sizes["micro"] // 2, 1)
    row.columns = ["run", "rc", "seconds", "max_abs_loss_diff", "max_rel_loss_diff", "adapter_max_rel_diff",
                   "peak_mib", "losses"]
    row.note(f"{steps} steps of 2 micro-batches × {micro} × {ctx.sizes['train_seq']} tokens, bf16, SPP adapter; "
             "differences against the single-process run on this GPU (the tolerance, measured)")
    runs = {"single": ("single process", [], False), "fsdp": ("fsdp (torchrun, 1 rank)", ["--distributed", "fsdp"], True),
            "offload": ("fsdp + cpu_offload", ["--distributed", "fsdp", "--set", "cpu_offload=true"], True)}
    reference = None
    for key, (name, extra, torchrun) in runs.items():
        out = d / key
        rc, seconds, tail = cli(train_args(ctx, pruned, out, steps, micro, 2 * micro, *extra), d / f"{key}.log",
                                launch="torchrun" if torchrun else "python")  # this process may have used CUDA
        record = {"run": name, "rc": rc, "seconds": round(seconds, 2)}
        if rc:
            row.add(**record, losses=error_line(tail))
            continue
        got = losses(out)
        weights = load_file(str(out / "adapter_model.safetensors"))
        manifest = json.loads((out / "spp_manifest.json").read_text())
        record.update(losses=[round(v, 5) for v in got],
                      peak_mib=(manifest.get("peak_memory") or {}).get("cuda_allocated", 0) / 2**20)
        if reference is None:
            reference = (got, weights)
        else:
            ref_losses, ref_weights = reference
            diffs = [abs(a - b) for a, b in zip(got, ref_losses)]
            record["max_abs_loss_diff"] = max(diffs)
            record["max_rel_loss_diff"] = max(d_ / abs(b) for d_, b in zip(diffs, ref_losses))
            record["adapter_max_rel_diff"] = max(
                float((weights[k].float() - ref_weights[k].float()).abs().max()
                      / ref_weights[k].float().abs().max().clamp_min(1e-12)) for k in ref_weights)
        row.add(**record)
    if any(item["rc"] for item in row.items):
        raise RuntimeError("a training run failed (see its row)")


# --------------------------------------------------------------------------- eval: perplexity against a plain loop


def row_eval(ctx: Context, row: Row) -> None:
    from reference import plain_loop_ppl  # the baseline: one window per forward, transformers' loss
    from spp.eval.perplexity import perplexity, perplexity_windows, tokenize_text
    from spp.models import load_model, load_tokenizer

    s = ctx.sizes
    model = load_model(str(ctx.dense), ctx.dtype, ctx.device).eval()
    ids = tokenize_text(load_tokenizer(str(ctx.dense)), ctx.text.read_text(encoding="utf-8"))
    ids = ids[: s["ppl_windows"] * s["seqlen"]]
    windows = perplexity_windows(ids, s["seqlen"])
    row.columns = ["seqlen", "windows", "batch", "spp_tok_s", "plain_tok_s", "speedup", "ppl_spp", "ppl_plain"]
    perplexity(model, ids[: 2 * s["seqlen"]], s["seqlen"], batch_size=1)  # warm-up
    best = {"spp": float("inf"), "plain": float("inf")}
    values = {}
    for _ in range(2):  # interleaved, best of 2
        for impl, fn in (("spp", lambda: perplexity(model, ids, s["seqlen"], batch_size=4).ppl),
                         ("plain", lambda: plain_loop_ppl(model, windows))):
            sync(ctx)
            start = time.perf_counter()
            values[impl] = fn()
            sync(ctx)
            best[impl] = min(best[impl], time.perf_counter() - start)
    tokens = windows.numel()
    row.add(seqlen=s["seqlen"], windows=windows.shape[0], batch=4, spp_tok_s=tokens / best["spp"],
            plain_tok_s=tokens / best["plain"], speedup=best["plain"] / best["spp"], ppl_spp=values["spp"],
            ppl_plain=values["plain"])


ROW_FUNCS = {"setup": setup, "e2e": row_e2e, "train": row_train, "prune": row_prune, "kernels": row_kernels,
             "fsdp": row_fsdp, "eval": row_eval}


# --------------------------------------------------------------------------- running rows under their caps


def _child(name: str, ctx: Context, path: Path) -> None:
    """The forked row: its own process group (so a timeout kills its CLI children too)."""
    os.setpgid(0, 0)
    row = Row(name=name, path=path)
    start = time.perf_counter()
    code = 0
    try:
        row.env = environment(ctx)
        row.flush()
        ROW_FUNCS[name](ctx, row)
        row.status = "ok"
    except BaseException as exc:  # recorded in the report, whatever it was
        row.status = "failed"
        row.error = row.error or "".join(traceback.format_exception(exc)[-6:])[-3000:]
        code = 1
    row.seconds = round(time.perf_counter() - start, 2)
    row.flush()
    sys.stdout.flush()
    os._exit(code)


def run_row(name: str, ctx: Context, cap: float) -> dict:
    """Run one row in a forked process for at most `cap` seconds; its record (partial if it was killed)."""
    path = ctx.work / f"row-{name}.json"
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(name, ctx, path))
    proc.start()
    proc.join(cap)
    timed_out = proc.is_alive()
    if timed_out:  # the row's whole process group: its CLI children and torchrun's agent (which stops its workers)
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            proc.join(wait)
        proc.kill()
        proc.join()
    data = json.loads(path.read_text()) if path.is_file() else {"name": name, "items": [], "notes": []}
    data["seconds"] = round(time.perf_counter() - start, 2)
    if timed_out:
        data["status"] = "timed out"
        data["error"] = f"stopped at its cap of {cap:.0f} s; the items above are what it finished"
    elif data.get("status") in (None, "running"):
        data["status"] = "failed"
        data["error"] = data.get("error") or f"the row's process died (exit code {proc.exitcode})"
    return data


# --------------------------------------------------------------------------- the report


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:200]
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = ["# GPU check", "",
             f"`python scripts/gpu_check.py {' '.join(m['argv'])}`, started {m['started']}; "
             f"{'DRY RUN (tiny shapes, CPU): no number here is a GPU measurement; ' if m['dry_run'] else ''}"
             f"model: random LLaMA {json.dumps(m['dims'])}, {m['dtype']}; sizes {json.dumps(m['sizes'])}.", "",
             "| row | status | seconds | device | torch / CUDA | dtype |", "|---|---|---:|---|---|---|"]
    for row in report["rows"]:
        env = row.get("env") or {}
        lines.append(f"| {row['name']} | {row['status']} | {_cell(row.get('seconds'))} | "
                     f"{env.get('gpu', env.get('device', '–'))} | {env.get('torch', '–')} / {env.get('cuda', '–')} | "
                     f"{env.get('dtype', '–')} |")
    for row in report["rows"]:
        lines += ["", f"## {row['name']}: {row['status']}", ""]
        env = row.get("env") or {}
        if env:
            lines += [", ".join(f"{k} {v}" for k, v in env.items()), ""]
        lines += [f"- {n}" for n in row.get("notes", [])]
        if row.get("notes"):
            lines.append("")
        items, columns = row.get("items") or [], row.get("columns") or []
        if items:
            columns = columns or sorted({k for item in items for k in item})
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(item.get(c)) for c in columns) + " |" for item in items]
            profiles = [i for i in items if i.get("subclass_profile")]
            if profiles:
                lines += ["", "Slower than dense, the ops of one call (self CUDA µs / CPU µs):", ""]
                lines += [f"- {i['shape']}, {i['tokens']} tokens, {i['dtype']}: " + "; ".join(
                    f"{o['op']} ×{o['calls']} {o['cuda_us']}/{o['cpu_us']}" for o in i["subclass_profile"])
                          for i in profiles]
        if row.get("error"):
            lines += ["", "```", row["error"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def write_report(output: Path, report: dict) -> None:
    for name, text in (("gpu.json", json.dumps(report, indent=1, default=str) + "\n"), ("gpu.md", markdown(report))):
        tmp = output / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(output / name)


def resolve_assets(assets: Path | None) -> tuple[Path, Path]:
    """(tokenizer directory, text file): from `assets` (.gpu-check/ layout), else the checkout's ../shared/data."""
    candidates = [assets] if assets else [REPO / ".gpu-check", REPO.parent / "shared" / "data"]
    for root in candidates:
        tokenizer = root / "stories260K-hf"
        text = next((p for p in (root / "tinystories_val.txt", root / "tinystories" / "tinystories_val.txt")
                     if p.is_file()), None)
        if (tokenizer / "tokenizer.json").is_file() and text:
            return tokenizer, text
    sys.exit(f"error: no stories260K-hf/ and tinystories_val.txt under {', '.join(map(str, candidates))}; "
             "run `bash scripts/gpu_check.sh prepare`")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="where gpu.json and gpu.md go")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma list of rows (default all: {','.join(ROWS)})")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; CUDA-only rows skipped")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for everything, setup included")
    parser.add_argument("--cap", action="append", default=[], metavar="ROW=SECONDS", help="a row's own time cap")
    parser.add_argument("--work", type=Path, help="models and logs (default: a temporary folder, removed after)")
    parser.add_argument("--assets", type=Path, help="folder with stories260K-hf/ and tinystories_val.txt")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    caps = dict(CAPS)
    for item in args.cap:
        key, _, value = item.partition("=")
        caps[key] = float(value)
    exec(BLOCK_MISSING)  # this process and its forks, as on the GPU machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.path.insert(0, str(REPO / "scripts"))
    # imported once here, before any fork (no CUDA call in this process: a forked child could not use it after one)
    import torch  # noqa: F401
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars in every row's log say nothing here

    import spp.cli  # noqa: F401
    import spp.eval.perplexity  # noqa: F401
    import spp.prune  # noqa: F401
    import spp.train  # noqa: F401

    begin = time.perf_counter()
    tokenizer, text = resolve_assets(args.assets)
    args.output.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work=work, tokenizer=tokenizer, text=text, device="cpu" if args.dry_run else "cuda",
                  dims=TINY if args.dry_run else LLAMA3_8B_4L, sizes=DRY_SIZES if args.dry_run else FULL_SIZES,
                  dry_run=args.dry_run)
    report = {"meta": {"argv": sys.argv[1:] if argv is None else argv, "dry_run": args.dry_run,
                       "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dims": ctx.dims,
                       "sizes": ctx.sizes, "dtype": ctx.dtype, "budget_s": args.budget, "caps": caps,
                       "host": platform.node(), "cpus": os.cpu_count()}, "rows": []}

    def remaining() -> float:
        return args.budget - (time.perf_counter() - begin)

    try:
        setup_row = run_row("setup", ctx, min(SETUP_CAP, remaining()))
        report["rows"].append(setup_row)
        if setup_row["status"] == "ok" and setup_row["items"] and "gpu" in setup_row["items"][0]:
            ctx.gpu = {k: setup_row["items"][0][k] for k in ("gpu", "capability")}
        write_report(args.output, report)
        for name in rows:
            if name in CUDA_ONLY and ctx.device != "cuda":
                report["rows"].append({"name": name, "status": "skipped", "error": None,
                                       "notes": [CUDA_ONLY[name] + " (dry run on the CPU)"]})
            elif setup_row["status"] != "ok":
                report["rows"].append({"name": name, "status": "skipped", "notes": ["the setup failed"]})
            elif remaining() < 5:
                report["rows"].append({"name": name, "status": "skipped",
                                       "notes": [f"the budget of {args.budget:.0f} s was spent"]})
            else:
                report["rows"].append(run_row(name, ctx, min(caps[name], remaining())))
            print(f"{name}: {report['rows'][-1]['status']} ({report['rows'][-1].get('seconds', 0) or 0:.1f} s)",
                  flush=True)
            write_report(args.output, report)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["meta"]["seconds"] = round(time.perf_counter() - begin, 1)
    write_report(args.output, report)
    print(f"report -> {args.output / 'gpu.md'}")
    return report


if __name__ == "__main__":
    main()
