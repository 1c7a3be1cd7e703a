"""spp.patterns: the one layer-name pattern language of `spp prune --targets/--ignore` and `spp train`'s
`target_modules` (fnmatch over the block-relative or full name, `re:` for a regular expression, nothing outside the
decoder blocks)."""

import pytest

from spp.errors import SppError


def test_target_modules_share_the_pattern_language(tiny_model):
    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_adapter

    names = add_adapter(tiny_model("llama"), AdapterConfig(target_modules=[r"re:.*\.(q|v)_proj"], spp_row_groups=4))
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    names = add_adapter(tiny_model("llama"), AdapterConfig(target_modules=["model.layers.1.mlp.*"], spp_row_groups=4))
    assert names == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(SppError, match="names lm_head, which is outside the decoder blocks"):
        add_adapter(tiny_model("llama"), AdapterConfig(target_modules=["lm_head"]))
    with pytest.raises(SppError, match="not a valid regular expression"):
        AdapterConfig(target_modules=["re:(q"])
