"""Peak host memory of block-wise recovery against depth (issue 26's bar): two random LLaMA models of one width.

For each depth (default 8 and 32 decoder blocks; hidden 1024, intermediate 2816, vocab 32000, untied head, fp32)
this saves a seeded random dense model with the stories260K tokenizer, prunes it to 50% by magnitude (`spp prune`,
in a child process), then runs `spp train --set objective=blockwise` (spp adapter, one epoch over 32 windows of 128
tokens) in a child process and reads the peak RSS its manifest records (`peak_memory.host_rss`, the process's own
`VmHWM`), beside the fp32 weight size and the prune's own peak (streamed, as `spp prune` ships). Prints one Markdown
table.

    taskset -c 0 python scripts/blockwise_memory.py --work /tmp/blockwise-memory
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import DATA

WIDTH = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SPP = [sys.executable, "-c", "from spp.cli import app; app()"]


def save_dense(directory: Path, layers: int) -> int:
    """Save the seeded random model; returns its fp32 weight bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {**WIDTH, "num_hidden_layers": layers}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    size = sum(p.numel() * 4 for p in model.parameters())
    if not directory.is_dir():
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(DATA / "stories260K-hf").save_pretrained(directory)
    return size


def peak(directory: Path) -> int:
    return json.loads((directory / "spp_manifest.json").read_text())["peak_memory"]["host_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--report", help="also write the table, with the machine, to this Markdown file")
    args = parser.parse_args()
    work = Path(args.work)
    text = DATA / "tinystories" / "tinystories_val.txt"
    rows = []
    for layers in args.layers:
        dense, pruned, train = work / f"dense-{layers}", work / f"pruned-{layers}", work / f"train-{layers}"
        size = save_dense(dense, layers)
        if not pruned.is_dir():
            subprocess.run([*SPP, "prune", "--model", str(dense), "--method", "magnitude", "--sparsity", "0.5",
                            "--output", str(pruned)], check=True)
        shutil.rmtree(train, ignore_errors=True)
        subprocess.run([*SPP, "train", "--config", "tinystories.yaml", "--model", str(pruned), "--data", str(text),
                        "--teacher", str(dense), "--output", str(train), "--set", "objective=blockwise",
                        "--set", "nsamples=32", "--set", "cutoff_len=128", "--set", "batch_size=8",
                        "--set", "micro_batch_size=8", "--set", "block_epochs=1"], check=True)
        rows.append((layers, size, peak(pruned), peak(train)))
        shutil.rmtree(train)
    lines = ["| decoder blocks | fp32 weights (MiB) | `spp prune` magnitude peak RSS (MiB) | block-wise recovery peak RSS "
             "(MiB) | recovery peak / weights |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {layers} | {size / 2**20:.0f} | {prune_peak / 2**20:.0f} | {train_peak / 2**20:.0f} | "
              f"{train_peak / size:.2f} |" for layers, size, prune_peak, train_peak in rows]
    print("\n".join(lines))
    if args.report:
        import platform

        from spp.io.conditions import describe_conditions, run_conditions

        machine = f"{describe_conditions(run_conditions('cpu', 'float32'))}; {platform.machine()}"
        Path(args.report).write_text("\n".join(["# Block-wise recovery: peak host memory against depth (issue 26)", "",
                                                 __doc__.split("\n\n")[1].replace("\n", " "), "",
                                                 f"machine: {machine}", "", *lines]) + "\n")


if __name__ == "__main__":
    main()
