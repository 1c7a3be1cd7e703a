"""spp.models: what counts as a target (a weight spp prunes and adapts) in a block, mixture-of-experts blocks included.

A mixture-of-experts block's fused expert weights (E, out, in) are targets by their parameter names; its router and
gates stay dense and unadapted.
"""

import pytest
import torch

from conftest import make_moe_model
from spp.errors import SppError
from spp.models import block_targets, decoder_targets
from spp.patterns import match_layers


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


def test_a_library_error_without_a_message_still_gives_one_line(monkeypatch):
    """The SppError quotes the first line of the library's message, or its type when it has none (an empty message
    used to raise IndexError, a traceback)."""
    import transformers

    from spp.errors import SppError, first_line
    from spp.models import load_tokenizer

    assert first_line(ValueError("\n  bad value  \nmore detail")) == "bad value" and first_line(OSError()) == "OSError"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    with pytest.raises(SppError, match=r"^cannot load a tokenizer from somewhere: OSError$"):
        load_tokenizer("somewhere")
