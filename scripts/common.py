"""What several scripts share: the `spp` CLI run in this process, the text split the studies use, the +0.0 tally of a
model against its pruned base's masks, the PEFT reference recovery, and the process's resident memory.

A helper module, not a script: the scripts beside it import it (`python scripts/NAME.py` puts `scripts/` on
`sys.path`). Everything about pruning, training, merging and measuring goes through `spp`'s stage entries; the
one loop here trains PEFT's adapters, which `spp train` does not, the way `spp train` trains its own.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


# A random LLaMA of about 100M parameters for the benchmarks (hidden 768, MLP 2048, 12 heads, vocab 16384, tied head)
LLAMA_100M = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, vocab_size=16384, max_position_embeddings=2048,
                  tie_word_embeddings=True)


def random_llama(layers: int, seed: int = 0, **overrides):
    """A seeded random `LLAMA_100M` with `layers` decoder blocks (and any other config key overridden), float32,
    in eval mode on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**LLAMA_100M, "num_hidden_layers": layers, **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# --------------------------------------------------------------------------- the CLI


def run(args: list[str], log: list[str], check: bool = True) -> int:
    """Run `spp ARGS` through the command line's own entry (`spp.cli.app`) in this process, printed and logged.

    Returns:
        The exit code (0 unless `check` is False).

    Raises:
        SppError: the command exited non-zero and `check` is set (its stderr, which is echoed, ends the message).
    """
    import contextlib
    import io

    from spp.cli import app
    from spp.errors import SppError

    shown = "spp " + " ".join(args)
    print("$", shown, flush=True)
    log.append(shown)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = app(args, standalone_mode=False) or 0
    if code and check:
        sys.stderr.write(err.getvalue())
        raise SppError(f"`{shown}` exited {code}: {err.getvalue().strip()}")
    return code


def cli_train_config(config: str, flags: dict, sets: list[str]):
    """The `TrainConfig` that `spp train --config CONFIG` with these flags and `--set` items resolves, as the CLI
    does it (file < flags < --set)."""
    from spp.config import TrainConfig, find_config, merge_into, parse_set, read_yaml

    path = find_config(config)
    return merge_into(TrainConfig, [(str(path), read_yaml(path)), ("flags", flags), ("--set", parse_set(sets))])


# --------------------------------------------------------------------------- data and masks


def split_halves(text: str) -> tuple[str, str]:
    """Cut `text` at the first line break at or after its middle character: (first half, second half)."""
    middle = text.find("\n", len(text) // 2)
    middle = len(text) // 2 if middle < 0 else middle + 1
    return text[:middle], text[middle:]


def pruned_masks(pruned: Path | str, device="cpu") -> dict:
    """The keep-masks of an `spp prune` output, by parameter name, on `device`."""
    from spp.io.reader import read_checkpoint

    return {k: v.to(device) for k, v in read_checkpoint(Path(pruned)).masks_by_parameter().items()}


def zeros_check(model, masks: dict) -> dict:
    """A model's weights against the pruned base's keep-masks (`spp.sparsity`): entries the mask prunes that are
    not bitwise +0.0 (`pruned_not_plus_zero`), kept entries that are zero (`kept_zero`), pruned entries, and
    the share of zeros in the masked weights (`sparsity`; 0.0 without masks)."""
    from spp.sparsity import pruned_is_positive_zero, sparsity_stats, tally

    params = dict(model.named_parameters())
    stats = [sparsity_stats(params[name].detach(), keep) for name, keep in masks.items()]
    bad = sum(int((~pruned_is_positive_zero(params[name], keep)).sum()) for name, keep in masks.items())
    total = tally(stats)
    zeros = sum(int((params[name].detach() == 0).sum()) for name in masks)
    return {"pruned_not_plus_zero": bad, "kept_zero": total["kept_zero"], "pruned": total["pruned"],
            "sparsity": zeros / total["numel"] if total["numel"] else 0.0}


def saved_zeros(model_dir: Path | str, pruned: Path | str) -> dict:
    """`zeros_check` of a saved model against the mask file of the `spp prune` output it came from."""
    from spp.models import load_model

    return zeros_check(load_model(str(model_dir), "float32", "cpu"), pruned_masks(pruned))


# --------------------------------------------------------------------------- the PEFT reference


def train_peft(kind: str, cfg, device="cpu", teacher=None):
    """PEFT LoRA (`kind` "lora") or HiRA ("hira") on `cfg.base_model`, trained as `spp train` trains with `cfg`.

    The same examples (`spp.train.build_examples`), the same order (global batch t of seed `cfg.seed`), the same
    loss (`ce_weight`·NLL/N, plus `kd_weight`·T²·KL(teacher ‖ student)/N with a `teacher`, N the batch's target
    count, `spp.train.losses`), schedule (`learning_rate`, `warmup_ratio`, `lr_scheduler`), AdamW settings and
    clipping, for `cfg.max_steps` steps; rank `cfg.rank`, alpha `cfg.lora_alpha`, every linear of the decoder
    blocks (PEFT's "all-linear"). A non-finite loss stops training (the step is not applied).

    Returns:
        (the PEFT model in eval mode, {"losses": cross-entropy per step, "kd_losses": the KD term per step,
         "step_times": seconds per step, "diverged_at": the 1-based step of a non-finite loss or None}).
    """
    import torch
    from peft import HiraConfig, LoraConfig, get_peft_model

    from spp.data import pad_batch
    from spp.models import load_model, load_tokenizer
    from spp.train import build_examples
    from spp.train.loop import global_batch, lr_factor  # spp train's data order and schedule
    from spp.train.losses import kd_kl_sum, summed_nll, target_count

    tokenizer = load_tokenizer(cfg.base_model)
    train, _ = build_examples(cfg, tokenizer)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    model = load_model(cfg.base_model, "float32", device)
    torch.manual_seed(cfg.seed)
    config = (LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
              if kind == "lora" else HiraConfig(r=cfg.rank, hira_dropout=0.0, target_modules="all-linear"))
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = cfg.max_steps
    warmup = math.ceil(cfg.warmup_ratio * steps)
    log = {"losses": [], "kd_losses": [], "step_times": [], "diverged_at": None}
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        ids = global_batch(len(train), cfg.batch_size, cfg.seed, step)
        batch = {k: v.to(device) for k, v in pad_batch([train[i] for i in ids], pad_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        n = max(target_count(batch["labels"]), 1)
        logits = model(**inputs).logits
        ce = summed_nll(logits, batch["labels"]) / n
        loss = cfg.ce_weight * ce
        if teacher is not None:
            with torch.no_grad():
                kd = kd_kl_sum(logits, teacher(**inputs).logits, batch["labels"], cfg.kd_temperature) / n
            loss = loss + cfg.kd_weight * kd
            log["kd_losses"].append(kd.item())
        if not math.isfinite(loss.item()):
            log["diverged_at"] = step + 1
            break
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, steps, warmup, cfg.lr_scheduler)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log["losses"].append(ce.item())
        log["step_times"].append(time.perf_counter() - start)
    return model.eval(), log


def save_merged(model, tokenizer_from: Path | str, output: Path) -> None:
    """Merge a PEFT model into its base (`merge_and_unload`) and save it with the tokenizer of `tokenizer_from`."""
    from spp.models import load_tokenizer

    model.merge_and_unload().save_pretrained(output)
    load_tokenizer(str(tokenizer_from)).save_pretrained(output)


# --------------------------------------------------------------------------- tables and memory (Linux)


def format_owl_table(records: list[dict]) -> str:
    """A Markdown table per method and pattern: the fastest spp run without and with OWL, ratio OWL / plain."""
    lines = ["| method | pattern | achieved sparsity (OWL) | plain s | OWL s | time ratio (OWL / plain) | plain peak RSS MiB | OWL peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r["method"], r["pattern"], r["impl"]), []).append(r)
    for method, pattern, impl in runs:
        if impl != "spp+owl" or (method, pattern, "spp") not in runs:
            continue
        p, o = runs[(method, pattern, "spp")], runs[(method, pattern, "spp+owl")]
        pt, ot = min(r["seconds"] for r in p), min(r["seconds"] for r in o)
        lines.append(f"| {method} | {pattern} | {o[0]['sparsity']:.4f} | {pt:.2f} | {ot:.2f} | {ot / pt:.2f}x | "
                     f"{max(r['peak_rss_mb'] for r in p):.0f} | {max(r['peak_rss_mb'] for r in o):.0f} |")
    return "\n".join(lines)





def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes: VmRSS (resident now) or VmHWM (the peak since the last reset)."""
    from spp.io.checkpoint import proc_self_status

    value = proc_self_status(key)
    if value is None:
        raise KeyError(key)
    return int(value) * 1024


def reset_peak_rss() -> None:
    """Start a new VmHWM peak at the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
