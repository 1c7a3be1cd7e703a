"""spp.io.stream: a meta skeleton filled part by part from the shards equals transformers' own load, bit for bit."""

import pytest
import torch

from conftest import make_moe_model, make_tiny_model
from spp.errors import SppError
from spp.io import stream
from spp.io.reader import read_checkpoint
from spp.models import find_decoder_blocks, load_model


def _saved(model, directory):
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch,dtype", [("llama", "auto"), ("gpt2", "auto"), ("mixtral", "auto"),
                                        ("qwen2_moe", "auto"), ("llama", "bfloat16")])
def test_skeleton_filled_block_by_block_equals_load_model(tmp_path, arch, dtype):
    model = make_moe_model(arch) if arch in ("mixtral", "qwen2_moe") else make_tiny_model(arch)
    directory = _saved(model, tmp_path / arch)
    full = load_model(str(directory), dtype)
    checkpoint = read_checkpoint(directory)
    skeleton = stream.skeleton(checkpoint, full.dtype if dtype != "auto" else "auto")
    assert all(p.is_meta for p in skeleton.parameters())
    prefix, blocks = find_decoder_blocks(skeleton)
    stream.load(skeleton, checkpoint, "", skip=(f"{prefix}.",))  # embeddings, final norm, head
    assert all(p.is_meta for p in blocks.parameters())
    for i in range(len(blocks)):
        stream.load(skeleton, checkpoint, f"{prefix}.{i}.")
    expected, got = full.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    buffers = dict(skeleton.named_buffers())
    for name, buffer in full.named_buffers():  # the non-persistent ones (rotary frequencies) too
        assert buffers[name].dtype == buffer.dtype and torch.equal(buffers[name], buffer), name
    assert skeleton.config.to_dict() == full.config.to_dict()
    assert skeleton.generation_config.to_dict() == full.generation_config.to_dict()
    tied = [n for n in ("lm_head.weight",) if full.config.tie_word_embeddings]
    for name in tied:
        assert skeleton.get_parameter(name) is skeleton.get_input_embeddings().weight


def test_release_puts_a_block_back_on_meta_and_load_restores_it(tmp_path):
    directory = _saved(make_tiny_model("llama"), tmp_path / "m")
    checkpoint = read_checkpoint(directory)
    model = stream.skeleton(checkpoint)
    stream.load(model, checkpoint, "model.layers.1.")
    block = model.model.layers[1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    stream.release(block)
    assert all(p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in model.model.layers[0].parameters())  # never loaded
    stream.load(model, checkpoint, "model.layers.1.")
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_load_refuses_a_non_finite_weight_naming_the_parameter(tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 3] = float("nan")
    directory = _saved(model, tmp_path / "m")
    checkpoint = read_checkpoint(directory)
    skeleton = stream.skeleton(checkpoint)
    stream.load(skeleton, checkpoint, "model.layers.0.")
    with pytest.raises(SppError, match=r"model\.layers\.1\.mlp\.down_proj\.weight .* first at \(2, 3\)"):
        stream.load(skeleton, checkpoint, "model.layers.1.")


@pytest.mark.parametrize("arch,max_shard_size", [("llama", "20KB"), ("gpt2", "2GB"), ("mixtral", "20KB")])
def test_save_streamed_writes_what_save_pretrained_writes_byte_for_byte(tmp_path, arch, max_shard_size):
    """Shard split, index, tied weights (gpt2), fused experts split back into per-expert tensors (mixtral)."""
    model = make_moe_model(arch) if arch == "mixtral" else make_tiny_model(arch)
    directory = _saved(model, tmp_path / "in")
    full = load_model(str(directory))
    with torch.no_grad():  # not the saved values, so the parts must come from `read_part`
        for param in full.parameters():
            param.mul_(0.5)
    full.save_pretrained(tmp_path / "expected", max_shard_size=max_shard_size)
    skeleton = stream.skeleton(read_checkpoint(directory))
    prefix, blocks = find_decoder_blocks(skeleton)
    parts = [f"{prefix}.{i}." for i in range(len(blocks))]
    state = full.state_dict()

    def read_part(part):
        return {k: v for k, v in state.items()
                if (k.startswith(part) if part else not k.startswith(f"{prefix}."))}

    (tmp_path / "got").mkdir()
    stream.save_streamed(skeleton, tmp_path / "got", max_shard_size, read_part, parts)
    expected = sorted(p.name for p in (tmp_path / "expected").iterdir())
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == expected
    assert len(expected) > 3 or max_shard_size == "2GB"  # sharded: an index and several shards
    for name in expected:
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes(), name


def test_a_parameter_without_a_readable_saved_tensor_is_named_before_any_load(tmp_path):
    directory = _saved(make_tiny_model("llama"), tmp_path / "m")
    checkpoint = read_checkpoint(directory)
    model = stream.skeleton(checkpoint)
    assert stream.unreadable(model, checkpoint) is None
    del checkpoint.saved_names["model.layers.1.post_attention_layernorm.weight"]  # as for a converter spp cannot invert
    assert stream.unreadable(model, checkpoint) == "model.layers.1.post_attention_layernorm.weight"
    with pytest.raises(SppError, match="cannot stream this model"):
        stream.load(model, checkpoint, "model.layers.1.")
