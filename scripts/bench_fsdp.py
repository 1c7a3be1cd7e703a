"""FSDP benchmark: peak memory per rank and step time, one unsharded process against two FSDP2 ranks.

Builds a ~100M-parameter random LLaMA (hidden 768, intermediate 2048, 12 layers, 12 heads, vocab 8000,
float32), saves it, loads it with the SPP adapter on every decoder linear as `spp train` does, and trains
it for a few AdamW steps on random tokens with the same global batch: world 1 (`spp.models.load_model` +
`add_adapter`, no sharding) in a child process, and world 2 (`spp.train.fsdp.load_sharded_model`: meta
device, block by block, gloo) under `torchrun --nproc_per_node 2`. Each rank reports its resident memory
(VmRSS) before the model exists, its peak (VmHWM) while the model is loaded (and sharded),
and its peak during the steps (VmHWM reset through /proc/self/clear_refs after the warmup step), and the
median step time. Beside them: the memory model of docs/commands.md (the parameter and optimizer terms,
without activations). The children run with MALLOC_MMAP_THRESHOLD_=65536, so every large tensor is its own
mmap and goes back to the system when freed: with glibc's default (a threshold that grows as large blocks
are freed) the resident set keeps freed gathers and gradients and says more about the allocator than about
the memory the ranks use. Never run by tests; Linux only (reads /proc).

    OMP_NUM_THREADS=1 python scripts/bench_fsdp.py                # prints a table
    OMP_NUM_THREADS=1 python scripts/bench_fsdp.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import proc_status, reset_peak_rss

CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, vocab_size=8000, max_position_embeddings=256, tie_word_embeddings=False)
GLOBAL_BATCH, SEQ, STEPS, ROW_GROUPS = 4, 64, 4, 16


def predicted_bytes(world: int, b: int = 4) -> dict:
    """The memory model of docs/commands.md (sharded base, two gathered blocks, the larger of the embeddings and
    the output layer while it runs, adapter + gradient + AdamW moments sharded), in bytes, without activations."""
    h, i, L, V = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"], CONFIG["vocab_size"]
    p_blk = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two norms
    p_emb = p_out = V * h
    adapter_blk = sum(ROW_GROUPS * n_in + n_out for n_in, n_out in [(h, h)] * 4 + [(h, i), (h, i), (i, h)])
    A = L * adapter_blk
    base = b * (L * p_blk + p_emb + p_out + h)
    if world == 1:
        return {"base": base, "gathered": 0, "adapter_optimizer": 16 * A, "total": base + 16 * A}
    gathered = 2 * b * p_blk + b * max(p_emb, p_out)
    terms = {"base": base // world, "gathered": gathered, "adapter_optimizer": 16 * A // world}
    return {**terms, "total": sum(terms.values())}


def predicted_load_bytes(world: int, b: int = 4) -> int:
    """Peak while loading, by the same model: world 1 the whole base and adapter; world > 1 (meta-device
    loading) this rank's shards plus one whole block plus the embeddings or output layer being read."""
    h, i, V = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    terms = predicted_bytes(world, b)
    adapter = terms["adapter_optimizer"] // 4  # α and β alone (no gradient or moments yet)
    if world == 1:
        return terms["base"] + adapter
    return terms["base"] + adapter + b * (4 * h * h + 3 * h * i + 2 * h) + b * V * h


def worker(out_dir: Path) -> None:
    """One rank (or the single process): load (sharded), train STEPS steps, write its record."""
    import torch
    import torch.distributed as dist

    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_adapter
    from spp.io.reader import read_checkpoint
    from spp.models import load_model
    from spp.train.fsdp import load_sharded_model  # every import before the baseline, in both settings
    from transformers import LlamaForCausalLM  # noqa: F401  (the modeling code: ~150 MiB of imports)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    rss_start = proc_status("VmRSS")
    reset_peak_rss()
    adapter_cfg = AdapterConfig(kind="spp", spp_row_groups=ROW_GROUPS)
    torch.manual_seed(0)
    if world > 1:
        model, _ = load_sharded_model(read_checkpoint(out_dir / "model"), torch.float32, adapter_cfg, None)
    else:
        model = load_model(str(out_dir / "model"), dtype="float32")
        add_adapter(model, adapter_cfg)
        with torch.no_grad():  # from_pretrained may map the file lazily; count the model as the first step will
            sum(float(p.sum()) for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    load_peak = proc_status("VmHWM")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ), generator=generator)
    mine = ids[rank * GLOBAL_BATCH // world : (rank + 1) * GLOBAL_BATCH // world]
    micro = 1 if world > 1 else 2  # the same micro-batch size (2 rows) on every rank
    times = []
    for step in range(STEPS):
        if step == 1:
            reset_peak_rss()
        start = time.perf_counter()
        chunks = mine.split(2)
        for k, chunk in enumerate(chunks):
            if world > 1:
                model.set_requires_gradient_sync(k == len(chunks) - 1)
            (model(input_ids=chunk, labels=chunk, use_cache=False).loss / len(chunks)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    record = {"world": world, "rank": rank, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "rss_start": rss_start, "load_peak": load_peak,
              "step_peak": proc_status("VmHWM"), "step_s": statistics.median(times[1:]), "micro_batches": micro}
    (out_dir / f"world{world}-rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the records and predictions here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    with tempfile.TemporaryDirectory() as tmp:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(Path(tmp) / "model")
        subprocess.run([sys.executable, __file__, "--worker", tmp], env=env, check=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--worker", tmp], env=env, check=True)
        records = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("world*.json"))]
    mib = 2 ** 20
    print(f"{'world':>5} {'rank':>4} {'load peak - start':>18} {'predicted':>10} {'step peak - start':>18} "
          f"{'predicted':>10} {'step s':>7}")
    for r in records:
        load, step = predicted_load_bytes(r["world"]), predicted_bytes(r["world"])["total"]
        print(f"{r['world']:>5} {r['rank']:>4} {(r['load_peak'] - r['rss_start']) / mib:>14.0f} MiB "
              f"{load / mib:>6.0f} MiB {(r['step_peak'] - r['rss_start']) / mib:>14.0f} MiB {step / mib:>6.0f} MiB "
              f"{r['step_s']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"config": CONFIG, "global_batch": GLOBAL_BATCH, "seq": SEQ, "records": records,
                                         "predicted": {w: predicted_bytes(w) for w in (1, 2)},
                                         "predicted_load": {w: predicted_load_bytes(w) for w in (1, 2)}}, indent=1))


if __name__ == "__main__":
    main()
