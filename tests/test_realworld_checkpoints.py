"""Checkpoints as users have them: every one transformers loads is read the way transformers reads it.

Each case builds its input from a tiny transformers config (vocab 512, hidden 64, 2 layers) with the
stories260K tokenizer files beside it, then rewrites the saved file the way real checkpoints differ:
GPT-2's original release without the `transformer.` prefix (and without the tied `lm_head`), a
LLaMA-1-era conversion carrying `rotary_emb.inv_freq` buffers, GPT-2's old `attn.bias` buffers, a
Mixtral saved by transformers 5. Damaged copies (a missing weight, a wrong shape, a truncated shard,
a tensor the model does not have) are refused in one line with nothing written.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spp.cli import app
from spp.io.checkpoint import MASK_FILE, safetensors_files
from spp.io.maskfile import load_masks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)


def _save(model, directory: Path, shared_data: Path) -> Path:
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (shared_data / "stories260K-hf" / name).is_file():
            shutil.copy(shared_data / "stories260K-hf" / name, directory / name)
    return directory


def _rewrite(directory: Path, change) -> None:
    """Apply `change(tensors) -> tensors` to the directory's single safetensors file."""
    path = directory / "model.safetensors"
    tensors = change(load_file(str(path)))
    save_file(tensors, str(path), metadata={"format": "pt"})


def _model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def gpt2_model():
    from transformers import GPT2Config

    return _model(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **COMMON))


def llama_model():
    from transformers import LlamaConfig

    return _model(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **COMMON))


def _no_prefix(tensors):
    return {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.startswith("lm_head.")}


def _inv_freq(tensors):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)  # head_dim 16
    return {**tensors, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)}}


def _attn_bias(tensors):
    causal = torch.tril(torch.ones(256, 256, dtype=torch.bool)).view(1, 1, 256, 256)
    return {**tensors, **{f"h.{i}.attn.bias": causal.clone() for i in range(2)}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    """The real-world inputs, built once: name -> (directory, the in-memory original model)."""
    root = tmp_path_factory.mktemp("realworld")
    gpt2, llama = gpt2_model(), llama_model()
    out = {}
    out["gpt2-no-prefix"] = (_save(gpt2, root / "gpt2-no-prefix", shared_data), gpt2)
    _rewrite(root / "gpt2-no-prefix", _no_prefix)
    out["gpt2-attn-bias"] = (_save(gpt2, root / "gpt2-attn-bias", shared_data), gpt2)
    _rewrite(root / "gpt2-attn-bias", lambda t: _attn_bias(_no_prefix(t)))
    out["llama-inv-freq"] = (_save(llama, root / "llama-inv-freq", shared_data), llama)
    _rewrite(root / "llama-inv-freq", _inv_freq)
    out["llama"] = (_save(llama, root / "llama", shared_data), llama)
    (root / "calib.txt").write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:30000])
    return root, out


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    return result


def prune_args(model: Path, output: Path, calib: Path, method="wanda", pattern="2:4"):
    return ["prune", "--model", model, "--output", output, "--method", method, "--pattern", pattern,
            "--calib", calib, "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- loads as transformers loads it


@pytest.mark.parametrize("name", ["gpt2-no-prefix", "llama-inv-freq"])
def test_transformers_loads_the_rewritten_checkpoint_unchanged(inputs, name):
    from transformers import AutoModelForCausalLM

    _, cases = inputs
    directory, original = cases[name]
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, original(IDS).logits)


@pytest.mark.parametrize("name", ["gpt2-no-prefix", "llama-inv-freq"])
def test_prune_train_merge_eval_verify_end_to_end(inputs, tmp_path, name):
    root, cases = inputs
    directory, _ = cases[name]
    pruned, train, merged = tmp_path / "pruned", tmp_path / "train", tmp_path / "merged"
    ok(invoke(*prune_args(directory, pruned, root / "calib.txt")))

    # a normal, prefixed save_pretrained checkpoint; the mask file names its tensors
    saved = {k for shard in safetensors_files(pruned) for k in load_file(str(shard))}
    prefix = "transformer." if name.startswith("gpt2") else "model."
    assert all(k.startswith(prefix) or k == "lm_head.weight" for k in saved), sorted(saved)[:5]
    assert not any("inv_freq" in k for k in saved)
    masks, _ = load_masks(pruned / MASK_FILE)
    assert masks and set(masks) <= saved
    assert all(k.startswith(prefix) for k in masks)
    ok(invoke("verify", pruned))

    ok(invoke("train", "--config", "tinystories.yaml", "--model", pruned, "--data", root / "calib.txt",
              "--output", train, "--max-steps", "2", "--set", "cutoff_len=32", "--set", "micro_batch_size=2",
              "--set", "batch_size=2", "--set", "val_set_size=2", "--set", "spp_row_groups=4",
              "--set", "save_steps=100", "--set", "eval_steps=100"))
    ok(invoke("merge", "--model", pruned, "--adapter", train, "--output", merged))
    ok(invoke("verify", merged))
    ok(invoke("eval", "--model", merged, "--ppl", root / "calib.txt", "--seqlen", "32", "--max-windows", "2",
              "--device", "cpu", "--output", tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["sparsity"]["mask_sha256"] and all(
        entry["ppl"] > 1 for entry in results["perplexity"].values())


def test_a_buffer_transformers_ignores_is_a_one_line_warning(inputs, tmp_path):
    """GPT-2's old `attn.bias` buffers: transformers ignores them for GPT-2; spp says so once and goes on."""
    root, cases = inputs
    directory, _ = cases["gpt2-attn-bias"]
    result = ok(invoke(*prune_args(directory, tmp_path / "out", root / "calib.txt", method="magnitude")))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "h.0.attn.bias" in warnings[0] and "2 tensor" in warnings[0], result.stderr
    assert not any(k.endswith(".attn.bias") for k in load_file(str(tmp_path / "out" / "model.safetensors")))


# --------------------------------------------------------------------------- refused, one line, nothing written


def _without(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def _with(name, tensor):
    return lambda tensors: {**tensors, name: tensor}


def _truncate(directory: Path) -> None:
    blob = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(blob[: len(blob) - 64])


REFUSALS = {  # case: (input, change to its saved file, words the one error line must hold)
    "missing decoder weight": ("gpt2-no-prefix", _without("h.1.mlp.c_proj.weight"),
                               ["config.json", "transformer.h.1.mlp.c_proj.weight", "which no shard", "(1 such"]),
    "missing untied head": ("llama", _without("lm_head.weight"), ["config.json", "lm_head.weight", "which no shard"]),
    "shape mismatch": ("gpt2-no-prefix", _with("h.0.mlp.c_fc.weight", torch.zeros(64, 192)),
                       ["config.json", "h.0.mlp.c_fc.weight is (64, 192)", "makes it (64, 256)"]),
    "truncated shard": ("llama", None, ["model.safetensors", "truncated"]),
    "unexpected tensor in a block": ("gpt2-no-prefix", _with("h.0.mlp.c_extra.weight", torch.zeros(64, 64)),
                                     ["config.json", "h.0.mlp.c_extra.weight", "does not have"]),
    "unexpected tensor outside the blocks": ("llama", _with("model.extra_norm.weight", torch.ones(64)),
                                             ["config.json", "model.extra_norm.weight", "does not have"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_damaged_checkpoints_are_refused_in_one_line_with_nothing_written(inputs, tmp_path, case):
    root, cases = inputs
    source, change, words = REFUSALS[case]
    directory = tmp_path / "model"
    shutil.copytree(cases[source][0], directory)
    _rewrite(directory, change) if change is not None else _truncate(directory)
    before = snapshot(tmp_path)
    result = invoke(*prune_args(directory, tmp_path / "out", root / "calib.txt"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert snapshot(tmp_path) == before


def test_a_mixtral_checkpoint_as_saved_prunes_and_verifies(tmp_path, shared_data):
    """Its files keep the hub's per-expert names (`block_sparse_moe.experts.N.w1`), its model fuses them: the
    reader's converter mapping is what makes the two agree (the mixture-of-experts sections of test_reader,
    test_prune and test_adapter test the stages in depth)."""
    from transformers import MixtralConfig

    model = _model(MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                 max_position_embeddings=256, **COMMON))
    directory = _save(model, tmp_path / "mixtral", shared_data)
    ok(invoke("prune", "--model", directory, "--output", tmp_path / "out", "--method", "magnitude", "--device", "cpu"))
    ok(invoke("verify", tmp_path / "out"))
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:4000])
    ok(invoke("eval", "--model", directory, "--ppl", text, "--seqlen", "32", "--max-windows", "2", "--device", "cpu"))
