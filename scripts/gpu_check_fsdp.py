"""GPU check of `spp train --distributed fsdp`: bf16 FSDP2 training of a ~1B-parameter random LLaMA on one GPU.

Run it whenever a GPU machine is available (not part of the tests; it needs CUDA and ~10 minutes):

    python scripts/gpu_check_fsdp.py --work /tmp/fsdp_check [--json out.json]

Steps, all through the `spp` CLI in child processes: save a seeded random LLaMA (hidden 2048, intermediate
5504, 16 layers, 16 heads, vocab 32000: ~0.94B parameters) in bf16 with the stories260K tokenizer; prune it
(magnitude 2:4, on the GPU); train SPP for 8 steps as a one-rank FSDP run (`--distributed fsdp`,
`precision=bf16`, checkpoints every 4 steps); train again, SIGKILLed after step 6 (`SPP_FAULT=train_step:6`),
and `--resume` it. Checks: the logged loss decreases, the resumed adapter equals the uninterrupted one bit
for bit, every pruned entry stays +0.0 (`spp verify` after `spp merge`). Records the peak GPU memory of the
training process (the manifest's `peak_memory.cuda_allocated`) beside the memory model of docs/commands.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIG = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def spp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from spp.cli import app; app()", *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)


def save_random_llama(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "stories260K-hf" / name, directory / name)


def predicted_gib(b: int = 2) -> float:
    """docs/commands.md's memory model at world size 1, without activations: base + two gathered blocks +
    the output layer + 16 bytes per adapter parameter."""
    h, i, L, V, r = (CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"],
                     CONFIG["vocab_size"], 16)
    p_blk = 4 * h * h + 3 * h * i + 2 * h
    adapter = L * sum(r * n_in + n_out for n_in, n_out in [(h, h)] * 4 + [(h, i), (h, i), (i, h)])
    return (b * (L * p_blk + 2 * V * h + h) + 2 * b * p_blk + b * V * h + 16 * adapter) / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    if not torch.cuda.is_available():
        sys.exit("error: this check needs a CUDA GPU")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = SHARED / "tinystories" / "tinystories_val.txt"
    if not (work / "dense" / "config.json").is_file():
        save_random_llama(work / "dense")
    steps = []

    def check(result, what):
        steps.append({"step": what, "rc": result.returncode})
        if result.returncode != 0:
            sys.exit(f"error: {what} failed:\n{result.stderr[-3000:]}")

    check(spp("prune", "--model", str(work / "dense"), "--output", str(work / "pruned"), "--method", "magnitude",
              "--pattern", "2:4", "--calib", str(text), "--nsamples", "4", "--seqlen", "256", "--device", "cuda",
              "--dtype", "bfloat16", "--overwrite"), "prune")
    train = ["train", "--config", "tinystories.yaml", "--model", str(work / "pruned"), "--data", str(text),
             "--distributed", "fsdp", "--set", "precision=bf16", "--set", "max_steps=8", "--set", "save_steps=4",
             "--set", "batch_size=8", "--set", "micro_batch_size=4", "--set", "cutoff_len=256",
             "--set", "logging_steps=1", "--set", "learning_rate=1e-3", "--set", "gradient_checkpointing=true"]
    check(spp(*train, "--output", str(work / "straight"), "--overwrite"), "train (straight)")
    shutil.rmtree(work / "resumed", ignore_errors=True)
    shutil.rmtree(work / "resumed.partial", ignore_errors=True)
    killed = spp(*train, "--output", str(work / "resumed"), env={"SPP_FAULT": "train_step:6"})
    steps.append({"step": "train (killed after step 6)", "rc": killed.returncode})
    check(spp(*train, "--output", str(work / "resumed"), "--resume"), "train --resume")
    check(spp("merge", "--adapter", str(work / "straight"), "--output", str(work / "merged"), "--overwrite"), "merge")
    check(spp("verify", str(work / "merged")), "verify")

    losses = [json.loads(line)["loss"] for line in (work / "straight" / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    a = load_file(str(work / "straight" / "adapter_model.safetensors"))
    b = load_file(str(work / "resumed" / "adapter_model.safetensors"))
    manifest = json.loads((work / "straight" / "spp_manifest.json").read_text())
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "losses": losses,
        "loss_decreased": losses[-1] < losses[0],
        "resume_bitwise_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "peak_cuda_allocated_gib": manifest.get("peak_memory", {}).get("cuda_allocated", 0) / 2 ** 30,
        "predicted_gib_without_activations": predicted_gib(),
        "steps": steps,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not (result["loss_decreased"] and result["resume_bitwise_equal"]):
        sys.exit("error: the check failed (see above)")


if __name__ == "__main__":
    main()
