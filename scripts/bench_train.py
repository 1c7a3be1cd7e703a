"""Training-step benchmark: the SPP adapter against PEFT LoRA, PEFT HiRA and the naive SPP formula.

Trains a random LLaMA (hidden 768, intermediate 2048, 12 layers, vocab 32000; batch 4 × 256;
q, k, v, o, gate, up, down adapted) for a fixed number of AdamW steps with each adapter, each
in its own child process, alternating the order over rounds, and prints the median step time
and peak memory as ratios to LoRA. Never run by tests.

    python scripts/bench_train.py                 # the issue's config on the CPU (slow on 2 cores)
    python scripts/bench_train.py --small         # a 4-layer, hidden-256 model, for a quick look
    python scripts/bench_train.py --device cuda   # on a GPU (peak = torch.cuda.max_memory_allocated)

Memory on the CPU is the peak resident set during the training steps (VmHWM, reset through
/proc/self/clear_refs after the model is built) and its increase over the resident set of the
built model; on CUDA it is the peak allocated device memory during the steps.
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

VARIANTS = ("spp", "lora", "hira", "naive_spp")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000)
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


def _naive_module():
    """The naive SPP layer: y = W x + s·(W ⊙ (Â ⊙ β·1ᵀ)) x + b, two matmuls, plain autograd."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    from spp.adapter.layer import expand_rows

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
            delta = W * (expand_rows(self.spp_alpha, W.shape[0]) * self.spp_beta[:, None])
            return self.base_layer(x) + self.scale * F.linear(x, delta)

    return Naive


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build_model(variant: str, dims: dict, device: str, seed: int = 0):
    """A random LLaMA with one adapter variant on the 7 projections; everything else frozen."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dims, num_key_value_heads=dims["num_attention_heads"], max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(device)
    if variant == "spp":
        from spp.adapter.config import AdapterConfig
        from spp.adapter.model import add_spp

        add_spp(model, AdapterConfig(spp_row_groups=16, lora_alpha=16, lora_r=8, target_modules=["*proj"]))
    elif variant == "naive_spp":
        from spp.adapter.model import target_layers

        model.requires_grad_(False)
        naive = _naive_module()
        for name, layer in target_layers(model, ["*proj"]).items():
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


def bench_train(variant: str, dims: dict = FULL, batch: int = 4, seqlen: int = 256, warmup: int = 2, steps: int = 5,
                device: str = "cpu", threads: int | None = None, seed: int = 0) -> StepRecord:
    """Time `steps` AdamW training steps (after `warmup`) of one variant in this process.

    Returns:
        The median step time and the peak memory during the steps.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
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
    if device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _current_rss()
        _reset_peak_rss()
    times, loss = [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    return StepRecord(variant=variant, device=device, step_s=statistics.median(times), step_times=times,
                      peak_bytes=peak, increase_bytes=peak - base, trainable=sum(p.numel() for p in params), loss=loss)


def _child(variant: str, args) -> StepRecord:
    """Run one variant in a fresh interpreter, so memory and allocator state do not leak between runs."""
    cmd = [sys.executable, __file__, "--child", variant, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--device", args.device] + (["--small"] if args.small else []) + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return StepRecord(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 layers, hidden 256 (quick)")
    parser.add_argument("--rounds", type=int, default=2, help="each variant runs once per round, order rotated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dims = SMALL if args.small else FULL
    if args.child:
        record = bench_train(args.child, dims, warmup=args.warmup, steps=args.steps, device=args.device,
                             threads=args.threads)
        print(json.dumps(asdict(record)))
        return [asdict(record)]

    variants = args.variants.split(",")
    runs: dict[str, list[StepRecord]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
        for variant in order:
            record = _child(variant, args)
            runs[variant].append(record)
            print(f"round {round_index + 1} {variant:10s} {record.step_s:8.3f} s/step  "
                  f"peak {record.peak_bytes / 2**20:9.1f} MiB  (+{record.increase_bytes / 2**20:.1f} MiB)", flush=True)
    summary = []
    for variant in variants:
        step_s = statistics.median(t for r in runs[variant] for t in r.step_times)
        summary.append({"variant": variant, "step_s": step_s,
                        "peak_bytes": statistics.median(r.peak_bytes for r in runs[variant]),
                        "increase_bytes": statistics.median(r.increase_bytes for r in runs[variant]),
                        "trainable": runs[variant][0].trainable})
    ref = next((s for s in summary if s["variant"] == "lora"), summary[0])
    what = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{'dims' if not args.small else 'small dims'}: {dims}; batch 4 x 256; {args.rounds} rounds x {args.steps} "
          f"timed steps; device {args.device}; ratios to {ref['variant']}")
    print(f"| adapter | trainable | step time (s) | × LoRA | {what} (MiB) | × LoRA | increase in steps (MiB) | × LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['variant']} | {s['trainable']:,} | {s['step_s']:.3f} | {s['step_s'] / ref['step_s']:.2f} | "
              f"{s['peak_bytes'] / 2**20:.0f} | {s['peak_bytes'] / ref['peak_bytes']:.2f} | "
              f"{s['increase_bytes'] / 2**20:.0f} | {s['increase_bytes'] / max(ref['increase_bytes'], 1):.2f} |")
    return summary


if __name__ == "__main__":
    main()
