"""Mixture-of-experts models through every stage from the command line: prune -> train -> merge -> verify -> eval.

Tiny random Mixtral, Qwen3-MoE and OLMoE models (4 experts, top-2) with the stories260K tokenizer stand in for
the real ones. The stage-level math has its own tests (test_moe_core, test_moe_prune, test_moe_adapter); here
the point is that the stages hand each other MoE checkpoints as users would: per-expert tensors on disk, fused
experts in memory, one mask file keyed by the saved names.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import MOE_CONFIGS, make_moe_model, one_line_error
from spp.cli import app
from spp.io.checkpoint import MASK_FILE


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def saved_moe(directory, arch, shared_data):
    """A tiny MoE of `arch` with the stories260K tokenizer (vocab 512), saved as a user's checkpoint."""
    model = make_moe_model(arch)
    model.resize_token_embeddings(512)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(shared_data / "stories260K-hf" / name, directory / name)
    return directory


def expert_tensors(directory):
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        if shard.name != "masks.safetensors":
            state.update(load_file(str(shard)))
    return {name: t for name, t in state.items() if ".experts." in name}


def two_of_four(t):
    return bool(((t != 0).reshape(t.shape[0], -1, 4).sum(-1) <= 2).all())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    text = tmp_path_factory.mktemp("moe_text") / "text.txt"
    text.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:30000])
    return text


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_moe_prune_train_merge_verify_eval(arch, tmp_path, shared_data, corpus):
    dense = saved_moe(tmp_path / "dense", arch, shared_data)
    cli("prune", "--model", dense, "--method", "wanda", "--pattern", "2:4", "--calib", corpus, "--nsamples", 8,
        "--seqlen", 64, "--output", tmp_path / "pruned", "--device", "cpu")
    cli("verify", tmp_path / "pruned")
    experts = expert_tensors(tmp_path / "pruned")
    assert experts and all(two_of_four(t) for t in experts.values())  # every saved expert matrix is 2:4
    router = [n for n in load_file(str(tmp_path / "pruned" / "model.safetensors")) if n.endswith("gate.weight")]
    assert router and all((load_file(str(tmp_path / "pruned" / "model.safetensors"))[n] != 0).all() for n in router)

    cli("train", "--config", "tinystories.yaml", "--model", tmp_path / "pruned", "--data", corpus,
        "--max-steps", 6, "--set", "eval_steps=6", "--set", "logging_steps=6", "--set", "cutoff_len=64",
        "--set", "micro_batch_size=8", "--set", "batch_size=8", "--output", tmp_path / "train")
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0], val  # SPP on every linear and expert weight lowers the validation loss
    adapter = load_file(str(tmp_path / "train" / "adapter_model.safetensors"))
    assert any(".experts.gate_up_proj." in k for k in adapter) and any(".experts.down_proj." in k for k in adapter)
    assert not any(".gate." in k or k.split(".")[-2] == "gate" for k in adapter)  # the router is not adapted

    cli("merge", "--model", tmp_path / "pruned", "--adapter", tmp_path / "train", "--output", tmp_path / "merged")
    cli("verify", tmp_path / "merged")
    merged = expert_tensors(tmp_path / "merged")
    assert merged.keys() == experts.keys()
    assert all(bool(((experts[n] == 0) <= (merged[n] == 0)).all()) for n in merged)  # every pruned zero stays zero
    assert any(not torch.equal(merged[n], experts[n]) for n in merged)  # and the experts did change

    ppl = {}
    for name, extra in (("merged", ["--model", tmp_path / "merged"]),
                        ("adapter", ["--model", tmp_path / "pruned", "--adapter", tmp_path / "train"])):
        cli("eval", *extra, "--ppl", corpus, "--seqlen", 64, "--max-windows", 4, "--device", "cpu",
            "--output", tmp_path / f"eval-{name}")
        ppl[name] = json.loads((tmp_path / f"eval-{name}" / "results.json").read_text())
    assert ppl["merged"]["perplexity"] == ppl["adapter"]["perplexity"], ppl


def test_moe_zero_shot_eval_and_export_of_a_pruned_model(tmp_path, shared_data):
    dense = saved_moe(tmp_path / "dense", "mixtral", shared_data)
    cli("prune", "--model", dense, "--method", "magnitude", "--pattern", "2:4", "--output", tmp_path / "pruned")
    cli("export", "--model", tmp_path / "pruned", "--output", tmp_path / "packed")  # per-expert masks compress too
    details = json.loads((tmp_path / "packed" / "spp_manifest.json").read_text())["details"]
    assert details["masked_tensors"] == 2 * (4 + 3 * 4) and details["ratio"] <= 0.55  # 4 attention + 12 expert each
    refused = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "packed"), "--ppl", "x.txt"])
    one_line_error(refused, "is an `spp export` compressed checkpoint", "spp export --dense")
    cli("export", "--dense", "--model", tmp_path / "packed", "--output", tmp_path / "restored")
    for name in ("model.safetensors", MASK_FILE):
        assert (tmp_path / "restored" / name).read_bytes() == (tmp_path / "pruned" / name).read_bytes()
    cli("eval", "--model", tmp_path / "pruned", "--tasks", "boolq", "--task-data", shared_data / "eval",
        "--limit", 8, "--device", "cpu", "--output", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    boolq = results["zeroshot"]["tasks"]["boolq"]
    assert boolq["n"] == 8 and 0 <= boolq["acc"] <= 1
    assert results["sparsity"]["sparsity"] == pytest.approx(0.5)  # the expert weights are counted: all 2:4


def test_sparsity_counts_the_weights_left_dense(tmp_path, shared_data, corpus):
    """`--ignore 'mlp.experts.*'` prunes attention only: eval and the `spp run` report count the dense experts as
    kept, rather than reporting the masked weights' 50% as the model's sparsity."""
    from spp.report import _mask_names, weight_sparsity

    dense = saved_moe(tmp_path / "dense", "mixtral", shared_data)
    cli("prune", "--model", dense, "--method", "magnitude", "--pattern", "2:4", "--ignore", "mlp.experts.*",
        "--output", tmp_path / "pruned")
    state = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    attention = sum(t.numel() for n, t in state.items() if "self_attn" in n and n.endswith("proj.weight"))
    experts = sum(t.numel() for n, t in state.items() if ".experts." in n)
    expected = attention / 2 / (attention + experts)
    result = cli("eval", "--model", tmp_path / "pruned", "--ppl", corpus, "--seqlen", 64, "--max-windows", 1,
                 "--device", "cpu", "--output", tmp_path / "eval")
    sparsity = json.loads((tmp_path / "eval" / "results.json").read_text())["sparsity"]
    assert sparsity["sparsity"] == pytest.approx(expected) and sparsity["masked_sparsity"] == 0.5
    assert sparsity["dense_tensors"] == 2 * 3 * 4 and "24 tensors dense" in result.output
    assert weight_sparsity(tmp_path / "pruned", _mask_names(tmp_path / "pruned")) == pytest.approx(expected)
