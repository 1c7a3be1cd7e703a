"""spp.io.reader: a model directory resolved once (names, shards, manifest, mask file).

The reader and transformers' loader agree on what is loaded: an index that leaves out a shard's tensors, or names
tensors its shards do not hold, is refused before any work, and a real load that transformers reports incomplete is
refused too (no stage runs on randomly initialised weights).

Mixture-of-experts checkpoints: transformers 5 keeps Mixtral's experts fused, `mlp.experts.gate_up_proj`
(E, 2·I, H), while the files keep `block_sparse_moe.experts.e.w1/w3.weight`; `spp.io.reader.Piece` is that
correspondence, read from transformers' own converters. These tests check it against what transformers actually
loads.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import MOE_CONFIGS, make_moe_model, one_line_error, save_tiny_stories_llama
from spp.cli import app
from spp.errors import SppError
from spp.io.reader import read_checkpoint

def test_the_mask_file_is_decoded_once_per_checkpoint(pruned_tiny_dir, monkeypatch):
    import spp.io.maskfile as maskfile

    calls = []
    real = maskfile.load_masks
    monkeypatch.setattr(maskfile, "load_masks", lambda path: calls.append(path) or real(path))
    checkpoint = read_checkpoint(pruned_tiny_dir)
    masks, layouts = checkpoint.read_masks()
    assert masks and set(layouts) == set(masks)
    by_parameter = checkpoint.masks_by_parameter()
    again, _ = checkpoint.read_masks()
    assert len(calls) == 1 and again is masks
    assert all(by_parameter[checkpoint.parameter_name(saved)] is keep for saved, keep in masks.items())
    assert all(keep.dtype == torch.bool for keep in masks.values())


def test_a_foreign_mask_file_is_refused_when_the_checkpoint_is_read(pruned_tiny_dir, tmp_path):
    """A safetensors file in the mask file's place that is not spp's format is refused by `read_checkpoint` itself,
    before any stage decodes it."""
    from spp.io.checkpoint import mask_path

    copy = tmp_path / "copy"
    shutil.copytree(pruned_tiny_dir, copy)
    packed = load_file(str(mask_path(copy)))
    with open(mask_path(copy), "rb") as f:  # the same tensors and per-entry metadata, without the format tag
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = {k: v for k, v in header["__metadata__"].items() if k != "format"}
    save_file(packed, str(mask_path(copy)), metadata=metadata)
    (copy / "spp_manifest.json").unlink()  # (its mask sha256 would be refused first)
    with pytest.raises(SppError, match=r"is not an spp mask file \(metadata format=None\)"):
        read_checkpoint(copy)


def test_one_blocks_masks_are_decoded_alone_and_not_kept(pruned_tiny_dir, monkeypatch):
    import spp.io.maskfile as maskfile

    whole = read_checkpoint(pruned_tiny_dir).masks_by_parameter()
    decoded = []
    real = maskfile.load_masks
    monkeypatch.setattr(maskfile, "load_masks", lambda path, names=None: decoded.append(r := real(path, names)) or r)
    checkpoint = read_checkpoint(pruned_tiny_dir)
    block = checkpoint.masks_by_parameter("model.layers.1.")
    assert block.keys() == {name for name in whole if name.startswith("model.layers.1.")} and block
    assert all(torch.equal(keep, whole[name]) for name, keep in block.items())
    assert set(decoded[0][0]) == {checkpoint.saved_name(name) for name in block}  # only that block's entries read
    assert checkpoint._masks is None  # nothing kept: the next block's call decodes its own
    assert {checkpoint.owner(saved) for saved in checkpoint.mask_names} == set(whole)


# --------------------------------------------------------------------------- the shard index


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, shared_data):
    """A tiny LLaMA saved in several shards with its index (as `save_pretrained(max_shard_size="200KB")` writes it)."""
    from transformers import AutoModelForCausalLM

    plain = save_tiny_stories_llama(tmp_path_factory.mktemp("plain") / "m", shared_data)
    directory = tmp_path_factory.mktemp("sharded") / "m"
    AutoModelForCausalLM.from_pretrained(plain).save_pretrained(directory, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(plain / name, directory / name)
    assert len(list(directory.glob("*.safetensors"))) >= 3
    return directory


def edit_index(src, dst, edit):
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return dst


def drop_last_shard(weight_map):
    last = sorted(set(weight_map.values()))[-1]
    for name in [n for n, shard in weight_map.items() if shard == last]:
        del weight_map[name]


@pytest.mark.parametrize("command", [
    ["prune", "--method", "magnitude", "--sparsity", "0.5", "--output", "{out}"],
    ["eval", "--ppl", "wikitext2:{text}", "--seqlen", "64", "--max-windows", "1"],
])
def test_an_index_that_leaves_out_a_shard_is_refused(sharded, tmp_path, text_file, command):
    model = edit_index(sharded, tmp_path / "m", drop_last_shard)
    args = [a.format(out=tmp_path / "out", text=text_file) for a in command]
    result = CliRunner().invoke(app, [args[0], "--model", str(model), *args[1:]])
    one_line_error(result, "model.safetensors.index.json does not name", "transformers would not load it")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial"))


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(sharded, tmp_path):
    def misplace(weight_map):
        name = sorted(weight_map)[0]
        weight_map[name] = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])

    model = edit_index(sharded, tmp_path / "m", misplace)
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5",
                                      "--output", str(tmp_path / "out")])
    one_line_error(result, "which does not hold it")


def test_the_complete_index_still_loads(sharded):
    from spp.io.reader import read_checkpoint

    ckpt = read_checkpoint(sharded)
    assert len(ckpt.shards) >= 3 and "lm_head.weight" in ckpt.tensors


def test_a_real_load_that_transformers_reports_incomplete_is_refused(tmp_path):
    """`load_model` checks transformers' own loading report after the load, not only the reader's verdict before."""
    from conftest import make_tiny_model
    from spp.models import load_model

    model = make_tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(SppError, match=r"describes model\.norm\.weight, which no shard"):
        load_model(str(tmp_path))
    state["model.norm.weight"] = torch.ones(model.config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert load_model(str(tmp_path)) is not None


# --------------------------------------------------------------------------- mixture of experts (fused in memory)


def _saved(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return read_checkpoint(directory)


def _state(ckpt):
    state = {}
    for shard in ckpt.shards:
        state.update(load_file(str(shard)))
    return state


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_pieces_tile_each_fused_weight_as_transformers_loads_it(arch, tmp_path):
    model = make_moe_model(arch)
    ckpt = _saved(model, tmp_path / "m", max_shard_size="60KB")  # several shards: pieces of one expert may split
    assert len(ckpt.shards) > 1
    saved = _state(ckpt)
    params = dict(model.named_parameters())
    fused = [name for name, p in params.items() if p.dim() == 3]
    assert sorted(ckpt.pieces) == sorted(fused) and fused
    for name in fused:
        E, out, _ = params[name].shape
        pieces = ckpt.pieces[name]
        assert [p.expert for p in pieces] == sorted(p.expert for p in pieces) and {p.expert for p in pieces} == set(range(E))
        assert torch.equal(ckpt.join(name, {p.saved: saved[p.saved] for p in pieces}), params[name])
        for saved_name, view in ckpt.split(name, params[name]).items():
            assert torch.equal(view, saved[saved_name])
            assert ckpt.piece_of(saved_name)[0] == name
    router = next(n for n in params if n.endswith("mlp.gate.weight"))
    assert ckpt.split(router, params[router]).keys() == {ckpt.saved_name(router)}


def test_mixtral_gate_and_up_rows_are_w1_and_w3(tmp_path):
    model = make_moe_model("mixtral")
    ckpt = _saved(model, tmp_path / "m")
    I = MOE_CONFIGS["mixtral"]["intermediate_size"]
    pieces = {p.saved.rsplit(".", 3)[-3] + "." + p.saved.rsplit(".", 3)[-2]: p
              for p in ckpt.pieces["model.layers.1.mlp.experts.gate_up_proj"]}
    assert pieces["2.w1"].expert == 2 and pieces["2.w1"].rows == (0, I)
    assert pieces["2.w3"].expert == 2 and pieces["2.w3"].rows == (I, 2 * I)
    assert pieces["2.w1"].saved == "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def test_twelve_experts_keep_numeric_order(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(MOE_CONFIGS["mixtral"], num_local_experts=12, num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    ckpt = _saved(model, tmp_path / "m")
    saved = _state(ckpt)
    name = "model.layers.0.mlp.experts.down_proj"
    assert [p.saved.split(".")[-3] for p in ckpt.pieces[name]] == [str(e) for e in range(12)]  # 10 after 9, not 1
    assert torch.equal(ckpt.join(name, saved), model.get_parameter(name))


def test_masks_by_parameter_joins_the_per_expert_entries(tmp_path):
    from spp.io.maskfile import save_masks

    model = make_moe_model("qwen3_moe")
    ckpt = _saved(model, tmp_path / "m")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    torch.manual_seed(1)
    keep = torch.rand(model.get_parameter(name).shape) > 0.5
    entries = {k: v.clone() for k, v in ckpt.split(name, keep).items()}
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    ckpt = read_checkpoint(tmp_path / "m")
    assert torch.equal(ckpt.masks_by_parameter()[name], keep)
    assert torch.equal(ckpt.masks_by_parameter("model.layers.0.")[name], keep)  # one block's: its pieces joined too
    del entries[next(iter(entries))]  # one expert's piece missing: refused, not silently dense
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="some experts of .*gate_up_proj"):
        read_checkpoint(tmp_path / "m").masks_by_parameter()
