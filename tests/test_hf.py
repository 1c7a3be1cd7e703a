"""spp.hf: one test per transformers internal it wraps, each failing with the API's name and the tested versions,
and the hub-kernels decision (no module of a model spp loads is replaced by `kernels`)."""

import importlib.util

import pytest
import torch

from spp import hf
from tests.conftest import make_moe_model, make_tiny_model


def why(api: str) -> str:
    return (f"transformers {hf.transformers_version()} changed {api} (spp.hf; tested with transformers {hf.TESTED}): "
            "fix spp/hf.py before raising the cap in pyproject.toml")


def test_causal_lm_class_maps_configs_to_their_class():
    llama, gpt2 = make_tiny_model("llama"), make_tiny_model("gpt2")
    assert hf.causal_lm_class(llama.config) is type(llama), why("AutoModelForCausalLM._model_mapping")
    assert hf.causal_lm_class(gpt2.config) is type(gpt2), why("AutoModelForCausalLM._model_mapping")
    from transformers import CLIPVisionConfig

    assert hf.causal_lm_class(CLIPVisionConfig()) is None, why("AutoModelForCausalLM._model_mapping")


def test_meta_load_reports_missing_unexpected_and_mismatched_keys():
    model = make_tiny_model("llama")
    state = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.up_proj.weight"] = torch.empty(3, 3, device="meta")
    state["model.extra.weight"] = torch.empty(2, device="meta")
    built, info = hf.meta_load(type(model), model.config, state)
    api = "from_pretrained(None, state_dict=..., device_map='meta', output_loading_info=True)"
    assert next(built.parameters()).device.type == "meta", why(api)
    assert "model.norm.weight" in info["missing_keys"], why(api)
    assert "model.extra.weight" in info["unexpected_keys"], why(api)
    assert [m[0] for m in info["mismatched_keys"]] == ["model.layers.0.mlp.up_proj.weight"], why(api)


def test_loaded_key_renames_saved_names_and_finds_expert_converters():
    gpt2 = make_tiny_model("gpt2")
    renamings, converters = hf.weight_conversions(gpt2)
    state = gpt2.state_dict()
    key, pattern = hf.loaded_key("h.0.attn.c_attn.weight", renamings, converters, gpt2.base_model_prefix, state)
    assert (key, pattern) == ("transformer.h.0.attn.c_attn.weight", None), why("core_model_loading.rename_source_key")

    mixtral = make_moe_model("mixtral")
    renamings, converters = hf.weight_conversions(mixtral)
    assert converters, why("conversion_mapping.get_model_conversion_mapping (no WeightConverter for Mixtral)")
    key, pattern = hf.loaded_key("model.layers.0.block_sparse_moe.experts.3.w1.weight", renamings, converters,
                                 mixtral.base_model_prefix, mixtral.state_dict())
    assert key == "model.layers.0.mlp.experts.gate_up_proj", why("core_model_loading.rename_source_key")
    stacked = hf.stacked_expert_patterns(converters)
    assert pattern in stacked, why("core_model_loading.{MergeModulelist, Concatenate} / WeightConverter.operations")
    # w1 (gate) comes before w3 (up) in the fused rows
    w3 = [p for p in stacked if p.endswith("w3.weight")]
    assert w3 and stacked[pattern] < stacked[w3[0]], why("WeightConverter.source_patterns order")


def test_no_split_modules_name_the_decoder_block():
    model = make_tiny_model("llama")
    assert "LlamaDecoderLayer" in hf.no_split_module_classes(model), why("PreTrainedModel._no_split_modules")


def test_expert_gate_fn_or_act_fn():
    experts = make_moe_model("mixtral").model.layers[0].mlp.experts
    gate = hf.expert_gate_fn(experts)
    assert gate is not None or callable(getattr(experts, "act_fn", None)), \
        why("the experts module's _apply_gate / act_fn")
    if gate is not None:
        x = torch.randn(5, 2 * experts.gate_up_proj.shape[1] // 2)
        assert gate(x).shape == (5, x.shape[1] // 2), why("the experts module's _apply_gate")


def test_gguf_quantizer_can_drop_its_config():
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    assert callable(getattr(GgufHfQuantizer, "remove_quantization_config", None)), \
        why("quantizers.GgufHfQuantizer.remove_quantization_config")

    class Model:  # a quantizer that is not there is nothing to drop
        pass

    hf.drop_quantization_config(Model())


def test_a_moved_internal_is_one_line_naming_it():
    err = hf.moved("core_model_loading.rename_source_key", ImportError("cannot import name 'x'\nmore"))
    assert "rename_source_key" in str(err) and hf.TESTED in str(err) and "spp env" in str(err)
    assert "\n" not in str(err)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the kernels package is not installed")
def test_models_spp_loads_are_never_kernelized(tmp_path, monkeypatch):
    """With `kernels` installed (transformers 5.25 then defaults to use_kernels=True), a model spp loads keeps every
    module's own forward: nothing is fetched from the hub and the numerics are the installed transformers'."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    from spp.models import load_model

    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert not getattr(model, "use_kernels", False)
    replaced = [name for name, m in model.named_modules() if "forward" in vars(m) or "_kernel_repo" in vars(m)]
    assert replaced == []
    model.train()  # transformers re-kernelizes on a mode change when kernels are on
    assert not [name for name, m in model.named_modules() if "forward" in vars(m)]


def test_a_failure_inside_transformers_names_transformers(tmp_path, monkeypatch):
    """An exception raised by transformers' own loader is reported as transformers' failure (its version, the first
    line of its error, `spp env`), not as a fault in the user's checkpoint."""
    from transformers import LlamaForCausalLM

    from spp.errors import SppError
    from spp.io.reader import read_checkpoint

    make_tiny_model("llama").save_pretrained(tmp_path / "m")

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported device type 'meta'\nsecond line")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", broken)
    with pytest.raises(SppError) as err:
        read_checkpoint(tmp_path / "m")
    line = str(err.value)
    assert f"transformers {hf.transformers_version()} failed" in line and "Unsupported device type 'meta'" in line
    assert "spp env" in line and "second line" not in line and "config.json" in line
