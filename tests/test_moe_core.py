"""Mixture-of-experts plumbing: fused expert weights found in memory, and mapped to the per-expert tensors on disk.

transformers 5 keeps Mixtral's experts fused, `mlp.experts.gate_up_proj` (E, 2·I, H), while the files keep
`block_sparse_moe.experts.e.w1/w3.weight`; `spp.io.reader.Piece` is that correspondence, read from
transformers' own converters. These tests check it against what transformers actually loads.
"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import MOE_CONFIGS, make_moe_model
from spp.errors import SppError
from spp.io.reader import read_checkpoint
from spp.models import block_targets, decoder_targets
from spp.patterns import match_layers


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
    del entries[next(iter(entries))]  # one expert's piece missing: refused, not silently dense
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="some experts of .*gate_up_proj"):
        read_checkpoint(tmp_path / "m").masks_by_parameter()


def test_expert_weights_are_targets_and_the_router_is_not():
    model = make_moe_model("mixtral")
    block = model.model.layers[0]
    experts = {name: t for name, t in block_targets(block).items() if t.weight.dim() == 3}
    assert sorted(experts) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert all(t.module is block.mlp.experts and t.weight.shape[0] == 4 for t in experts.values())
    assert experts["mlp.experts.down_proj"].weight is block.mlp.experts.down_proj
    assert "mlp.gate" not in block_targets(block)  # the router is not an nn.Linear: never pruned or adapted
    layers = {t.name: t for targets in decoder_targets(model) for t in targets.values()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in layers and not any(".gate" == n[-5:] for n in layers)
    chosen = match_layers(model, ["mlp.experts.*"], "--targets")
    assert list(chosen) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    full = "model.layers.0.mlp.experts.down_proj"
    assert layers[full].param == full  # an expert weight's name is its parameter's: no `.weight`
    q = "model.layers.0.self_attn.q_proj"
    assert layers[q].param == f"{q}.weight" and layers[q].module is model.model.layers[0].self_attn.q_proj


def test_transposed_experts_with_biases_are_refused():
    from transformers import GptOssConfig, AutoModelForCausalLM

    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SppError, match="transposed or with biases"):
        block_targets(model.model.layers[0])


def test_sparse_kernels_leave_expert_weights_dense(tmp_path):
    """cuSPARSELt takes 2-D weights: unstructured expert masks do not stop the 2:4 attention linears (the check
    reaches the CUDA test, the last one), while a non-2:4 attention mask still does."""
    from spp.eval.sparse_kernels import check_sparse_kernels
    from spp.io.maskfile import save_masks
    from spp.prune.masks import nm_mask

    model = make_moe_model("mixtral")
    ckpt = _saved(model, tmp_path / "m")
    torch.manual_seed(0)
    entries = {}
    for name, param in model.named_parameters():
        if param.dim() == 3:
            entries.update(ckpt.split(name, torch.rand(param.shape) > 0.3))
    q = "model.layers.0.self_attn.q_proj.weight"
    entries[ckpt.saved_name(q)] = nm_mask(model.get_parameter(q).detach().abs(), 2, 4)
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="needs a CUDA GPU"):
        check_sparse_kernels(read_checkpoint(tmp_path / "m"), "bfloat16", None, torch.device("cpu"))
    entries[ckpt.saved_name(q)] = torch.ones_like(entries[ckpt.saved_name(q)])
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="q_proj.weight is not 2:4 sparse"):
        check_sparse_kernels(read_checkpoint(tmp_path / "m"), "bfloat16", None, torch.device("cpu"))


def test_gates_of_an_moe_block_are_not_targets():
    """Qwen2-MoE's `shared_expert_gate` is an nn.Linear (1, H) that scales the shared expert: like the router it
    stays dense and unadapted (SPP's 16 row groups could not even fit its one row); `gate_proj`s are targets."""
    model = make_moe_model("qwen2_moe")
    block = model.model.layers[0]
    assert isinstance(block.mlp.shared_expert_gate, torch.nn.Linear)
    names = set(block_targets(block))
    assert "mlp.shared_expert_gate" not in names and "mlp.shared_expert.gate_proj" in names
    with pytest.raises(SppError, match="match no linear layer"):
        match_layers(model, ["mlp.shared_expert_gate"], "--targets")
    assert set(block_targets(torch.nn.ModuleDict({"gate": torch.nn.Linear(4, 4)}))) == {"gate"}  # MoE blocks only
