"""`spp merge`: merged = unmerged adapter = reloaded with plain transformers ≠ pruned, sparsity kept, bad inputs refused."""

import json

import pytest
import torch
from typer.testing import CliRunner

from spp.adapter.config import AdapterConfig
from spp.adapter.model import adapter_state_dict, add_adapter, save_adapter
from spp.cli import app
from spp.config import MergeConfig
from spp.errors import SppError
from spp.io.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, MASK_FILE,
                               read_json, safetensors_files, save_model, sha256_file)
from spp.io.manifest import Manifest, read_manifest, write_manifest
from spp.io.maskfile import save_masks
from spp.io.reader import read_checkpoint
from spp.merge import run_merge
from spp.models import decoder_targets
from spp.prune.masks import apply_mask, unstructured_mask
from spp.verify import verify_checkpoint

from conftest import one_line_error

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def make_pruned(model, directory, sparsity=0.5, max_shard_size="2GB"):
    """Magnitude-prune the decoder linears of `model` and save it as `spp prune` would."""
    keep_by_param, layouts = {}, {}
    with torch.no_grad():
        for target in (target for targets in decoder_targets(model) for target in targets.values()):
            W = target.out_in()
            keep = unstructured_mask(W.abs(), sparsity)
            W.copy_(apply_mask(W, keep))
            stored = keep.t() if target.layout == "conv1d" else keep
            keep_by_param[target.param], layouts[target.param] = stored, target.layout
    directory.mkdir(parents=True)
    save_model(model, None, directory, max_shard_size=max_shard_size)
    written = read_checkpoint(directory)
    saved = {param: written.saved_name(param) for param in keep_by_param}
    save_masks(directory / MASK_FILE, {saved[p]: k for p, k in keep_by_param.items()},
               {saved[p]: layouts[p] for p in keep_by_param})
    write_manifest(directory, Manifest(stage="prune", settings={"sparsity": sparsity},
                                       details={"method": "magnitude", "pattern": "unstructured"}))
    return directory


STEP = {"spp_beta": 1.0, "spp_alpha": 0.2, "lora_A": 0.2, "lora_B": 0.2, "full_weight": 0.05}


def make_adapter(pruned_dir, directory, seed=0, row_groups=3, kind="spp"):
    """add_adapter on the saved pruned model, move its tensors away from init, save; returns the adapter model's logits."""
    model = load(pruned_dir)
    cfg = AdapterConfig(kind=kind, spp_row_groups=row_groups, rank=3, lora_alpha=16, lora_r=8,
                        base_model=str(pruned_dir), mask_sha256=sha256_file(pruned_dir / MASK_FILE))
    add_adapter(model, cfg, read_checkpoint(pruned_dir).masks_by_parameter())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            p.add_(torch.randn(p.shape, generator=g) * STEP[name.rpartition(".")[2]])
    save_adapter(model, cfg, directory)
    return logits(model)


@pytest.fixture
def run(tmp_path, tiny_model):
    """A pruned llama in 3+ shards and a trained-looking adapter for it."""
    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned", max_shard_size="20KB")
    adapter_logits = make_adapter(pruned, tmp_path / "train")
    return tmp_path, pruned, adapter_logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_merged_equals_unmerged_and_reloads_with_plain_transformers(tmp_path, tiny_model, arch):
    shard_size = "20KB" if arch == "llama" else "2GB"
    pruned = make_pruned(tiny_model(arch), tmp_path / "pruned", max_shard_size=shard_size)
    adapter_logits = make_adapter(pruned, tmp_path / "train")
    report = run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    merged = tmp_path / "merged"
    assert report.n_modules == (14 if arch == "llama" else 8)
    merged_logits = logits(load(merged))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert (merged_logits - logits(load(pruned))).abs().max() > 1e-2
    assert (merged / MASK_FILE).read_bytes() == (pruned / MASK_FILE).read_bytes()
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in pruned.iterdir())
    if arch == "llama":
        assert len(safetensors_files(merged)) >= 3
    verify_checkpoint(merged)  # every pruned entry +0.0, files match the manifest
    manifest = read_manifest(merged)
    assert manifest.stage == "merge" and manifest.mask_sha256 == sha256_file(pruned / MASK_FILE)
    assert str(tmp_path / "train" / ADAPTER_WEIGHTS_FILE) in manifest.inputs
    assert not (tmp_path / "merged.partial").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["masked_lora", "full"])
def test_every_kind_merges_to_its_unmerged_model_and_verifies(tmp_path, tiny_model, arch, kind):
    pruned = make_pruned(tiny_model(arch), tmp_path / "pruned", max_shard_size="20KB" if arch == "llama" else "2GB")
    adapter_logits = make_adapter(pruned, tmp_path / "train", kind=kind)
    report = run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    merged_logits = logits(load(tmp_path / "merged"))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert (merged_logits - logits(load(pruned))).abs().max() > 1e-2
    checked = verify_checkpoint(tmp_path / "merged")  # every pruned entry +0.0, files match the manifest
    details = read_manifest(tmp_path / "merged").details
    assert details["adapter"] == kind and details["kept_zero"] == report.kept_zero == checked.kept_zero


def test_a_kept_entry_that_becomes_zero_is_counted_as_kept_zero(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned")
    make_adapter(pruned, tmp_path / "train", kind="full")
    weights = load_file(str(tmp_path / "train" / ADAPTER_WEIGHTS_FILE))
    keep = read_checkpoint(pruned).masks_by_parameter()["model.layers.0.mlp.up_proj.weight"]
    full = weights["model.layers.0.mlp.up_proj.full_weight"]
    full[keep.nonzero()[:5].unbind(1)] = 0.0  # five kept weights trained to exactly zero
    save_file(weights, str(tmp_path / "train" / ADAPTER_WEIGHTS_FILE))
    result = CliRunner().invoke(app, ["merge", "--model", str(pruned), "--adapter", str(tmp_path / "train"),
                                      "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "5 kept weights are zero" in result.output
    assert read_manifest(tmp_path / "merged").details["kept_zero"] == verify_checkpoint(tmp_path / "merged").kept_zero == 5


def test_a_target_without_a_mask_entry_is_refused_for_masked_lora(tmp_path, tiny_model):
    from spp.io.maskfile import load_masks

    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned")
    make_adapter(pruned, tmp_path / "train", kind="masked_lora")
    masks, layouts = load_masks(pruned / MASK_FILE)
    del masks["model.layers.1.mlp.up_proj.weight"]
    save_masks(pruned / MASK_FILE, masks, {k: layouts[k] for k in masks})
    write_manifest(pruned, read_manifest(pruned))  # a consistent base whose mask file lacks one target
    path = tmp_path / "train" / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({**read_json(path), "mask_sha256": sha256_file(pruned / MASK_FILE), "adapt_unpruned": True}))
    with pytest.raises(SppError, match=r"^model\.layers\.1\.mlp\.up_proj has no entry in .*masks\.safetensors; "
                                       r"adapter kind 'masked_lora' needs the mask of every target layer$"):
        run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
    # by default a layer without a mask entry was never adapted, so an adapter holding one does not fit
    path.write_text(json.dumps({**read_json(path), "adapt_unpruned": False}))
    with pytest.raises(SppError, match=r"do not fit the model .*first mismatched module: model\.layers\.1\.mlp\.up_proj"):
        run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_merge_changes_only_adapted_weights(run):
    from safetensors.torch import load_file

    tmp_path, pruned, _ = run
    run_merge(MergeConfig(adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    changed = set()
    for shard in safetensors_files(pruned):
        before, after = load_file(str(shard)), load_file(str(tmp_path / "merged" / shard.name))
        assert before.keys() == after.keys()
        changed |= {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                       ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}


def test_bare_spp_merge_works_inside_a_run_directory(run, monkeypatch):
    tmp_path, _, adapter_logits = run
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["merge"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(logits(load(tmp_path / "merged")), adapter_logits, rtol=1e-5, atol=1e-5)


def test_refuses_an_adapter_for_another_base(run, tiny_model):
    tmp_path, _, _ = run
    other = make_pruned(tiny_model("llama"), tmp_path / "other", sparsity=0.6)
    with pytest.raises(SppError, match="different base") as refused:
        run_merge(MergeConfig(model=str(other), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    trained_on = json.loads((tmp_path / "train" / "adapter_config.json").read_text())["base_model"]
    assert f"(trained on {trained_on})" in str(refused.value)  # names the base it belongs to
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def _corrupt_weights(tmp_path):
    (tmp_path / "train" / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")


def _corrupt_config(tmp_path):
    (tmp_path / "train" / ADAPTER_CONFIG_FILE).write_text("{not json")


def _no_mask_hash(tmp_path):
    path = tmp_path / "train" / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({**read_json(path), "mask_sha256": ""}))


def _lora_config(tmp_path):
    path = tmp_path / "train" / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({**read_json(path), "peft_type": "LORA"}))


def _unknown_kind(tmp_path):
    path = tmp_path / "train" / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({**read_json(path), "kind": "dora"}))


def _wrong_shape(tmp_path):
    path = tmp_path / "train" / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({**read_json(path), "target_modules": ["self_attn.*"]}))


def _other_base(tmp_path):
    (tmp_path / "pruned" / MASK_FILE).write_bytes((tmp_path / "pruned" / MASK_FILE).read_bytes() + b" ")


def _existing_output(tmp_path):
    (tmp_path / "merged").mkdir()


def _base_breaks_its_mask(tmp_path):
    """A weight of the base with its pruned entries set non-zero (a dense copy dropped in beside the mask)."""
    from safetensors import safe_open

    from spp.io.checkpoint import save_tensors
    from spp.io.maskfile import load_masks

    masks, _ = load_masks(tmp_path / "pruned" / MASK_FILE)
    shard = next(s for s in safetensors_files(tmp_path / "pruned") if any(n in masks for n in safe_open(str(s), "pt").keys()))
    with safe_open(str(shard), "pt") as f:
        tensors, metadata = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    name = next(n for n in tensors if n in masks)
    tensors[name] = torch.where(masks[name], tensors[name], torch.full_like(tensors[name], 0.25))
    save_tensors(tensors, shard, metadata=metadata)


def _already_merged(tmp_path):
    run_merge(MergeConfig(model=str(tmp_path / "pruned"), adapter=str(tmp_path / "train"), output=str(tmp_path / "once")))


BAD_INPUTS = {
    "missing adapter dir": (["--adapter", "nowhere"], None, "nowhere does not exist"),
    "corrupt adapter weights": ([], _corrupt_weights, "corrupt"),
    "corrupt adapter config": ([], _corrupt_config, "not valid JSON"),
    "adapter without mask hash": ([], _no_mask_hash, "records no mask_sha256"),
    "not an SPP adapter": ([], _lora_config, "not an SPP adapter"),
    "adapter does not fit": ([], _wrong_shape, "do not fit"),
    "unknown adapter kind": ([], _unknown_kind, "unknown adapter kind 'dora' (valid kinds: spp, masked_lora, full)"),
    "adapter for another base": ([], _other_base, "different base"),
    "missing model": (["--model", "nothing"], None, "nothing does not exist"),
    "existing output": ([], _existing_output, "already exists"),
    "base breaks its mask": ([], _base_breaks_its_mask, "entries the mask marks pruned are not +0.0 in the base weight"),
    "adapter already merged into the base": (["--model", "once"], _already_merged, "is already merged into once"),
    "unknown dtype": (["--dtype", "int8"], None, "--dtype 'int8' is not one of auto, float32, bfloat16, float16"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_inputs_give_one_error_line_and_no_output(run, monkeypatch, case):
    tmp_path, _, _ = run
    args, damage, message = BAD_INPUTS[case]
    if damage:
        damage(tmp_path)
    monkeypatch.chdir(tmp_path)
    existed = (tmp_path / "merged").exists()
    result = CliRunner().invoke(app, ["merge", *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert (tmp_path / "merged").exists() == existed
    assert not (tmp_path / "merged.partial").exists()


def test_an_adapter_trained_on_a_merged_model_merges_into_it(run):
    """A second round of recovery: a merged model is a base like any other for an adapter trained on it; only the
    adapter it already holds is refused (the mask file is the same, so its hash cannot tell)."""
    tmp_path, pruned, _ = run
    once = tmp_path / "once"
    run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(once)))
    second_logits = make_adapter(once, tmp_path / "second", seed=1)
    run_merge(MergeConfig(model=str(once), adapter=str(tmp_path / "second"), output=str(tmp_path / "twice")))
    torch.testing.assert_close(logits(load(tmp_path / "twice")), second_logits, rtol=1e-4, atol=1e-5)
    verify_checkpoint(tmp_path / "twice")
    with pytest.raises(SppError, match="is already merged into"):
        run_merge(MergeConfig(model=str(tmp_path / "twice"), adapter=str(tmp_path / "second"),
                              output=str(tmp_path / "thrice")))


def test_overwrite_replaces_an_existing_output(run):
    tmp_path, _, adapter_logits = run
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("old")
    run_merge(MergeConfig(adapter=str(tmp_path / "train"), output=str(tmp_path / "merged"), overwrite=True))
    assert not (tmp_path / "merged" / "stale.txt").exists() and (tmp_path / "merged" / MANIFEST_FILE).is_file()
    torch.testing.assert_close(logits(load(tmp_path / "merged")), adapter_logits, rtol=1e-5, atol=1e-5)


def test_train_then_bare_merge_end_to_end(pruned_tiny_dir, shared_data, tmp_path, monkeypatch):
    """A real `spp train` output merges with a bare `spp merge` in the run directory."""
    from spp.adapter.model import load_adapter
    from spp.config import TrainConfig, merge_into
    from spp.train import run_train

    text = tmp_path / "stories.txt"
    text.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:8000])
    settings = dict(base_model=str(pruned_tiny_dir), data_path=str(text), output_dir=str(tmp_path / "train"),
                    cutoff_len=32, micro_batch_size=2, batch_size=4, max_steps=3, save_steps=100, logging_steps=1,
                    eval_steps=100, learning_rate=2e-2, warmup_ratio=0.0, spp_row_groups=4)
    run_train(merge_into(TrainConfig, [("test", settings)]))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["merge"])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    unmerged = load(pruned_tiny_dir)
    load_adapter(unmerged, tmp_path / "train", read_checkpoint(pruned_tiny_dir).masks_by_parameter())
    with torch.no_grad():
        expected, merged, pruned = (m(ids).logits for m in (unmerged, load(tmp_path / "merged"), load(pruned_tiny_dir)))
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (merged - pruned).abs().max() > 1e-4
    verify_checkpoint(tmp_path / "merged")


# --------------------------------------------------------------------------- what other loaders read


def assert_top_level_safetensors_are_the_model(directory):
    """A loader that reads every top-level `*.safetensors` of `directory` (vLLM and sglang without an index) gets
    exactly the state dict transformers loads: the same names and equal values, nothing else (no mask file)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        part = load_file(str(path))
        assert not part.keys() & tensors.keys(), f"{path} repeats {sorted(part.keys() & tensors.keys())[:3]}"
        tensors.update(part)
    state = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto").state_dict()
    assert sorted(tensors) == sorted(state)
    for name, tensor in tensors.items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name


def to_old_layout(directory):
    """Make an spp output look as spp before the mask file moved wrote it: `masks.safetensors` at the top, so
    named in the manifest's outputs."""
    old = directory / "masks.safetensors"
    (directory / MASK_FILE).rename(old)
    if (directory / MASK_FILE).parent != directory and not any((directory / MASK_FILE).parent.iterdir()):
        (directory / MASK_FILE).parent.rmdir()
    manifest = read_json(directory / MANIFEST_FILE)
    manifest["outputs"] = {("masks.safetensors" if k == MASK_FILE else k): v for k, v in manifest["outputs"].items()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return old


def test_every_top_level_safetensors_file_of_a_prune_and_a_merge_output_is_the_model(tmp_path):
    from test_prune import save_tiny

    from spp.config import PruneConfig
    from spp.prune import run_prune

    pruned = tmp_path / "pruned"
    run_prune(PruneConfig(model=str(save_tiny("llama", tmp_path / "model")), output=str(pruned), method="magnitude",
                          device="cpu"))
    make_adapter(pruned, tmp_path / "train")
    run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    for directory in (pruned, tmp_path / "merged"):
        assert_top_level_safetensors_are_the_model(directory)
        assert not (directory / "masks.safetensors").exists() and (directory / MASK_FILE).is_file()
        assert read_manifest(directory).outputs[MASK_FILE] == sha256_file(directory / MASK_FILE)
    assert (tmp_path / "merged" / MASK_FILE).read_bytes() == (pruned / MASK_FILE).read_bytes()
    verify_checkpoint(tmp_path / "merged")


def test_an_old_layout_base_still_verifies_trains_merges_and_exports(tmp_path, tiny_model):
    """A directory an older spp wrote (mask file `masks.safetensors` at the top) is read by every stage; what merge
    and export --dense write from it has the new layout, with the mask's bytes (and so `mask_sha256`) unchanged."""
    from spp.config import TrainConfig, merge_into
    from spp.io.reader import read_checkpoint
    from spp.report import _mask_names
    from spp.train import check_inputs

    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned")
    adapter_logits = make_adapter(pruned, tmp_path / "train")
    mask_bytes = (pruned / MASK_FILE).read_bytes()
    old = to_old_layout(pruned)
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(pruned)])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(pruned).mask_sha256 == sha256_file(old) and _mask_names(pruned)
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 200)
    checkpoint, _ = check_inputs(merge_into(TrainConfig, [("test", dict(
        base_model=str(pruned), data_path=str(text), output_dir=str(tmp_path / "t2")))]))
    assert checkpoint.mask_file == old

    result = runner.invoke(app, ["merge", "--model", str(pruned), "--adapter", str(tmp_path / "train"),
                                 "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert (merged / MASK_FILE).read_bytes() == mask_bytes and not (merged / "masks.safetensors").exists()
    assert_top_level_safetensors_are_the_model(merged)
    torch.testing.assert_close(logits(load(merged)), adapter_logits, rtol=1e-5, atol=1e-5)
    assert runner.invoke(app, ["verify", str(merged)]).exit_code == 0

    for args in (["--model", pruned, "--output", tmp_path / "packed"],
                 ["--dense", "--model", tmp_path / "packed", "--output", tmp_path / "restored"]):
        result = runner.invoke(app, ["export", *map(str, args)])
        assert result.exit_code == 0, result.output
    restored = tmp_path / "restored"
    assert (restored / MASK_FILE).read_bytes() == mask_bytes and not (restored / "masks.safetensors").exists()
    assert_top_level_safetensors_are_the_model(restored)
    result = runner.invoke(app, ["verify", str(restored)])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- --dtype


def shard_tensors(directory):
    from safetensors.torch import load_file

    return {k: v for shard in safetensors_files(directory) for k, v in load_file(str(shard)).items()}


def test_merge_dtype_casts_the_fp32_merge_once_and_keeps_every_zero(tmp_path, tiny_model):
    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned")  # fp32, as a GGUF-derived base is
    make_adapter(pruned, tmp_path / "train")
    run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "m32")))
    result = CliRunner().invoke(app, ["merge", "--model", str(pruned), "--adapter", str(tmp_path / "train"),
                                      "--output", str(tmp_path / "m16"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    m32, m16 = shard_tensors(tmp_path / "m32"), shard_tensors(tmp_path / "m16")
    assert m32.keys() == m16.keys()
    for name, tensor in m32.items():  # the fp32 merge, cast once: bitwise
        assert m16[name].dtype == torch.bfloat16 and torch.equal(m16[name].view(torch.int16),
                                                                  tensor.to(torch.bfloat16).view(torch.int16)), name
    assert read_json(tmp_path / "m16" / "config.json")["dtype"] == "bfloat16"
    assert read_manifest(tmp_path / "m16").settings["dtype"] == "bfloat16"
    assert (tmp_path / "m16" / MASK_FILE).read_bytes() == (pruned / MASK_FILE).read_bytes()
    verify_checkpoint(tmp_path / "m16")  # every pruned entry still +0.0, the files its manifest lists
    assert_top_level_safetensors_are_the_model(tmp_path / "m16")


def test_merge_dtype_float32_of_a_bf16_base_is_not_a_rounded_bf16_merge(tmp_path, tiny_model):
    pruned = make_pruned(tiny_model("llama").to(torch.bfloat16), tmp_path / "pruned")
    make_adapter(pruned, tmp_path / "train")
    run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "auto")))
    run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "train"), output=str(tmp_path / "m32"),
                          dtype="float32"))
    auto, m32 = shard_tensors(tmp_path / "auto"), shard_tensors(tmp_path / "m32")
    name = "model.layers.0.mlp.up_proj.weight"
    assert auto[name].dtype == torch.bfloat16 and m32[name].dtype == torch.float32
    assert all(torch.equal(m32[k].to(torch.bfloat16), auto[k]) for k in auto)  # auto = the fp32 merge cast once
    assert not torch.equal(m32[name].to(torch.bfloat16).float(), m32[name])  # not a bf16 result widened
    verify_checkpoint(tmp_path / "m32")


def test_merge_dtype_float16_refuses_a_weight_it_cannot_hold(tmp_path, tiny_model):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[3] = 1e6  # finite in fp32, inf in fp16
    pruned = make_pruned(model, tmp_path / "pruned")
    make_adapter(pruned, tmp_path / "train")
    result = CliRunner().invoke(app, ["merge", "--model", str(pruned), "--adapter", str(tmp_path / "train"),
                                      "--output", str(tmp_path / "m16"), "--dtype", "float16"])
    one_line_error(result, "model.norm.weight", "float16", "--dtype bfloat16")
    assert not (tmp_path / "m16").exists() and not (tmp_path / "m16.partial").exists()
