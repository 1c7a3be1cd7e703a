"""Training-step benchmark: SPP, `spp train`'s own loop, masked LoRA and masked full fine-tuning against PEFT LoRA.

Trains a random LLaMA (by default hidden 768, intermediate 2048, 12 layers, 12 heads, vocab 512:
compute dominated by the decoder linears, as in real LLMs; batch 4 × 256; q, k, v, o, gate, up,
down adapted; target weights 2:4 magnitude-pruned) for a fixed number of AdamW steps with each
variant, each in its own child process, alternating the order over rounds, and prints the median
step time and peak memory as ratios to LoRA, plus `spp_train` / bare `spp` side by side.
Never run by tests.

Variants:
  spp, masked_lora, full   the bare adapter (`spp.adapter.model.add_adapter`, AdapterConfig(kind=...))
                           in the minimal loop: loss = model(ids, labels=ids).loss; backward; AdamW step
  lora, hira               PEFT LoRA r=8 (alpha 16) / HiRA r=8 in the same minimal loop
  naive_spp                the naive two-matmul SPP formula with plain autograd, same loop
  spp_train                the real `spp train` path, in-process: the random LLaMA is saved, pruned by
                           `spp.prune.run_prune` (magnitude 2:4), and `spp.train.run_train` trains it on
                           256-token windows of text (accelerate, `train_loop`, `_step`, clipping, the
                           LR schedule, logging, progress bar); a global optimizer post-hook times each
                           loop iteration (optimizer step to optimizer step), so the final checkpoint
                           save is outside the timed steps.

    python scripts/bench_train.py                 # the linear-dominated config on the CPU (slow on 2 cores)
    python scripts/bench_train.py --small         # 4 layers, hidden 256, vocab 32000: output-layer dominated
    python scripts/bench_train.py --device cuda   # on a GPU (peak = torch.cuda.max_memory_allocated)
    python scripts/bench_train.py --json out.json # also write the per-run records and the summary

Memory on the CPU is the peak resident set during the training steps (VmHWM, reset through
/proc/self/clear_refs after the warmup steps) and its increase over the resident set at that
point; on CUDA it is the peak allocated device memory during the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import DATA, proc_status, reset_peak_rss

VARIANTS = ("spp", "spp_train", "lora", "hira", "masked_lora", "full", "naive_spp")
ADAPTER_KINDS = ("spp", "masked_lora", "full")  # built by spp.adapter.model.add_adapter
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=512)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=32000)


@dataclass
class StepRecord:
    """One child run: median seconds per training step and peak memory in bytes."""

    variant: str
    device: str
    step_s: float
    step_times: list
    peak_bytes: int
    increase_bytes: int
    trainable: int
    loss: float
    cpu_times: list | None = None  # process CPU seconds per step (all threads): steadier than wall time on a busy machine


def _naive_module():
    """The naive SPP layer: y = W x + s·(W ⊙ (Â ⊙ β·1ᵀ)) x + b, two matmuls, plain autograd."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class Naive(nn.Module):
        def __init__(self, base, r=16, scale=2.0):
            super().__init__()
            self.base_layer = base.requires_grad_(False)
            out_features, in_features = base.weight.shape
            self.scale = scale
            self.spp_alpha = nn.Parameter(torch.empty(r, in_features, device=base.weight.device))
            self.spp_beta = nn.Parameter(torch.zeros(out_features, device=base.weight.device))
            nn.init.kaiming_uniform_(self.spp_alpha, a=math.sqrt(5))

        def forward(self, x):
            W = self.base_layer.weight
            A_hat = self.spp_alpha.repeat_interleave(W.shape[0] // self.spp_alpha.shape[0], 0)  # r divides out here
            delta = W * (A_hat * self.spp_beta[:, None])
            return self.base_layer(x) + self.scale * F.linear(x, delta)

    return Naive


def projections(model) -> dict:
    """The seven projections of every decoder block (what `*proj` selects in spp), by full module name."""
    return {name: m for name, m in model.named_modules() if name.startswith("model.layers.") and name.endswith("proj")}


def random_llama(dims: dict, seed: int = 0):
    """A seeded random LLaMA of `dims` (float32, CPU), its decoder linears 2:4 magnitude-pruned.

    Returns:
        (model, keep-masks keyed `<module>.weight`): pruned entries are +0.0, as `spp prune` leaves them.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dims, num_key_value_heads=dims["num_attention_heads"], max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    masks = {}
    with torch.no_grad():
        for name, layer in projections(model).items():
            W = layer.weight  # (out, in); keep the 2 largest |w| of every 4 inputs
            groups = W.abs().view(W.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            keep = keep.view_as(W)
            W.copy_(torch.where(keep, W, torch.zeros((), dtype=W.dtype)))
            masks[f"{name}.weight"] = keep
    return model, masks


def build_model(variant: str, dims: dict, device: str, seed: int = 0):
    """A random 2:4-pruned LLaMA with one adapter variant on the 7 projections; everything else frozen."""
    model, masks = random_llama(dims, seed)
    model = model.to(device)
    if variant in ADAPTER_KINDS:
        from spp.adapter.config import AdapterConfig
        from spp.adapter import model as adapter_model

        adapter_model.add_adapter(model, AdapterConfig(kind=variant, rank=8, spp_row_groups=16, lora_alpha=16, lora_r=8,
                                                       target_modules=["*proj"]), masks)
    elif variant == "naive_spp":
        model.requires_grad_(False)
        naive = _naive_module()
        for name, layer in projections(model).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, naive(layer))
    elif variant in ("lora", "hira"):
        from peft import HiraConfig, LoraConfig, get_peft_model

        peft_config = (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS) if variant == "lora"
                       else HiraConfig(r=8, hira_dropout=0.0, target_modules=TARGETS))
        model = get_peft_model(model, peft_config)
    else:
        raise ValueError(f"unknown variant {variant}")
    return model.train()


def available_variants() -> list[str]:
    """The variants this PEFT can build (HiRA needs a recent one)."""
    import peft

    return [v for v in VARIANTS if v != "hira" or hasattr(peft, "HiraConfig")]


def _memory_start(device: str) -> int:
    """Reset the peak-memory counter; returns the current use (the baseline of the increase)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    base = proc_status("VmRSS")
    reset_peak_rss()
    return base


def _memory_peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else proc_status("VmHWM")


def bench_train(variant: str, dims: dict = FULL, batch: int = 4, seqlen: int = 256, warmup: int = 2, steps: int = 5,
                device: str = "cpu", threads: int | None = None, seed: int = 0) -> StepRecord:
    """Time `steps` AdamW training steps (after `warmup`) of one variant in this process.

    Returns:
        The median step time and the peak memory during the steps.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if variant == "spp_train":
        return bench_spp_train(dims, batch, seqlen, warmup, steps, device, seed)
    model = build_model(variant, dims, device, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, dims["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(seed)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    sync()
    base = _memory_start(device)
    times, cpu_times, loss = [], [], 0.0
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = _memory_peak(device)
    return StepRecord(variant=variant, device=device, step_s=statistics.median(times), step_times=times,
                      peak_bytes=peak, increase_bytes=peak - base, trainable=sum(p.numel() for p in params), loss=loss,
                      cpu_times=cpu_times)


def _text_file(path, min_chars: int) -> None:
    """Training text: the start of TinyStories' validation file if it is there, else seeded random words."""
    source = DATA / "tinystories" / "tinystories_val.txt"
    if source.is_file():
        with open(source, encoding="utf-8") as f:
            text = f.read(min_chars)
    else:
        import random

        rng = random.Random(0)
        words = ["once", "upon", "a", "time", "there", "was", "little", "girl", "named", "lily", "she", "liked", "to",
                 "play", "in", "the", "park", "with", "her", "dog", "one", "day", "saw", "big", "red", "ball", "."]
        text = " ".join(rng.choice(words) for _ in range(min_chars // 4))
    path.write_text(text, encoding="utf-8")


def bench_spp_train(dims: dict, batch: int, seqlen: int, warmup: int, steps: int, device: str,
                    seed: int = 0) -> StepRecord:
    """The real `spp train` step: `run_train` on a pruned random checkpoint, timed between optimizer steps.

    The random LLaMA of `random_llama` (before pruning) is saved with the stories260K tokenizer
    (vocab 512), pruned by `run_prune` (magnitude 2:4), and trained by `run_train` with the SPP
    adapter (16 row groups, alpha 16, lora_r 8, every projection), global batch = micro-batch =
    `batch` windows of `seqlen` tokens, fp32, no validation set, no checkpoint before the last
    step. A global optimizer post-hook stamps each step; iteration k's time is stamp k minus stamp
    k − 1 (everything the loop does per step: batch assembly, `_step`, clipping, the optimizer,
    logging, the progress bar); the final checkpoint and adapter save come after the last stamp.
    """
    import tempfile

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from spp.config import PruneConfig, TrainConfig
    from spp.models import load_tokenizer
    from spp.prune import run_prune
    from spp.train import run_train

    if not device.startswith("cuda") and device != "cpu":
        raise ValueError(f"spp_train runs on cpu or cuda, not {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("spp_train on cuda needs a visible GPU (accelerate picks it)")
    with tempfile.TemporaryDirectory(prefix="bench_spp_train.") as tmp:
        root = Path(tmp)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)  # random_llama's weights before its pruning; run_prune prunes these
        config = LlamaConfig(**dims, num_key_value_heads=dims["num_attention_heads"], max_position_embeddings=2048)
        LlamaForCausalLM(config).save_pretrained(str(root / "dense"))
        load_tokenizer(str(DATA / "stories260K-hf")).save_pretrained(str(root / "dense"))
        run_prune(PruneConfig(model=str(root / "dense"), output=str(root / "pruned"), method="magnitude",
                              pattern="2:4", device=device))
        total = warmup + steps + 1  # stamp 1 ends step 1; iterations 2 .. total are timed after `warmup` of them
        _text_file(root / "train.txt", min_chars=8 * seqlen * batch * (total + 2))
        cfg = TrainConfig(base_model=str(root / "pruned"), data_path=str(root / "train.txt"),
                          output_dir=str(root / "out"), data_format="text", cutoff_len=seqlen, batch_size=batch,
                          micro_batch_size=batch, max_steps=total, val_set_size=0, learning_rate=1e-4,
                          save_steps=10**6, spp_row_groups=16, lora_alpha=16, lora_r=8, seed=seed)
        stamps: list[float] = []
        cpu_stamps: list[float] = []
        memory: dict[str, int] = {}
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def stamp(optimizer, args, kwargs):
            sync()
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if len(stamps) == warmup + 1:
                memory["base"] = _memory_start(device)
            elif len(stamps) == total:
                memory["peak"] = _memory_peak(device)

        handle = register_optimizer_step_post_hook(stamp)
        try:
            report = run_train(cfg)
        finally:
            handle.remove()
        times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
        cpu_times = [b - a for a, b in zip(cpu_stamps[warmup:], cpu_stamps[warmup + 1:])]
        return StepRecord(variant="spp_train", device=device, step_s=statistics.median(times), step_times=times,
                          peak_bytes=memory["peak"], increase_bytes=memory["peak"] - memory["base"],
                          trainable=report.trainable_params, loss=report.train_loss, cpu_times=cpu_times)


def _child(variant: str, args) -> StepRecord:
    """Run one variant in a fresh interpreter, so memory and allocator state do not leak between runs."""
    cmd = [sys.executable, __file__, "--child", variant, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--device", args.device] + (["--small"] if args.small else []) + (["--threads", str(args.threads)] if args.threads else [])
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return StepRecord(**json.loads(out.stdout.strip().splitlines()[-1]))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="4 layers, hidden 256, vocab 32000 (quick, but dominated by the output layer: it "
                             "hides the adapters' cost; use the default linear-dominated config for adapter claims)")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (e.g. 32000)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--rounds", type=int, default=2, help="each variant runs once per round, order rotated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} "
                        "(default: all this checkout can build)")
    parser.add_argument("--json", default=None, help="write the records and the summary here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dims = dict(SMALL if args.small else FULL)
    if args.vocab:
        dims["vocab_size"] = args.vocab
    if args.layers:
        dims["num_hidden_layers"] = args.layers
    if args.child:
        record = bench_train(args.child, dims, warmup=args.warmup, steps=args.steps, device=args.device,
                             threads=args.threads)
        print(json.dumps(asdict(record)))
        return [asdict(record)]

    variants = args.variants.split(",") if args.variants else available_variants()
    runs: dict[str, list[StepRecord]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        if round_index % 2:
            order = order[::-1]  # alternate the direction too, so no pair always runs in the same order
        for variant in order:
            record = _child(variant, args)
            runs[variant].append(record)
            print(f"round {round_index + 1} {variant:12s} {record.step_s:8.3f} s/step  "
                  f"peak {record.peak_bytes / 2**20:9.1f} MiB  (+{record.increase_bytes / 2**20:.1f} MiB)", flush=True)
    summary = []
    for variant in variants:
        step_s = statistics.median(t for r in runs[variant] for t in r.step_times)
        cpu = [t for r in runs[variant] for t in (r.cpu_times or [])]
        summary.append({"variant": variant, "step_s": step_s,
                        "cpu_s": statistics.median(cpu) if cpu else None,
                        "round_medians": [r.step_s for r in runs[variant]],
                        "peak_bytes": statistics.median(r.peak_bytes for r in runs[variant]),
                        "increase_bytes": statistics.median(r.increase_bytes for r in runs[variant]),
                        "trainable": runs[variant][0].trainable})
    ref = next((s for s in summary if s["variant"] == "lora"), summary[0])
    what = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    label = "small dims (output-layer dominated)" if args.small else "dims"
    print(f"\n{label}: {dims}; batch 4 x 256; {args.rounds} rounds x {args.steps} timed steps "
          f"(after {args.warmup} warmup); device {args.device}; ratios to {ref['variant']}")
    print(f"| variant | trainable | step time (s) | × LoRA | CPU time (s) | × LoRA | {what} (MiB) | × LoRA | "
          "increase in steps (MiB) | × LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        cpu = f"{s['cpu_s']:.3f} | {_ratio(s['cpu_s'], ref['cpu_s'] or 0)}" if s["cpu_s"] is not None else "– | –"
        print(f"| {s['variant']} | {s['trainable']:,} | {s['step_s']:.3f} | {_ratio(s['step_s'], ref['step_s'])} | {cpu} | "
              f"{s['peak_bytes'] / 2**20:.0f} | {_ratio(s['peak_bytes'], ref['peak_bytes'])} | "
              f"{s['increase_bytes'] / 2**20:.0f} | {_ratio(s['increase_bytes'], max(ref['increase_bytes'], 1))} |")
    by = {s["variant"]: s for s in summary}
    if "spp_train" in by and "spp" in by:
        loop = by["spp_train"]["step_s"] / by["spp"]["step_s"]
        per_round = [a / b for a, b in zip(by["spp_train"]["round_medians"], by["spp"]["round_medians"])]
        cpu = (f"; CPU time {by['spp_train']['cpu_s'] / by['spp']['cpu_s']:.3f}×"
               if by["spp_train"]["cpu_s"] and by["spp"]["cpu_s"] else "")
        print(f"\nspp_train / bare spp step: {loop:.3f}× wall (per round: {', '.join(f'{r:.3f}' for r in per_round)})"
              f"{cpu}")
    if args.json:
        meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dims": dims, "batch": 4, "seqlen": 256,
                "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps, "device": args.device,
                "threads": args.threads, "small": args.small}
        records = {v: [asdict(r) for r in rs] for v, rs in runs.items()}
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
