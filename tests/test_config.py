"""config.py: layering of defaults, YAML, flags and --set; unknown keys; type checks; ranges."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spp.config import PruneConfig, merge_into, parse_set, read_yaml
from spp.errors import SppError


def base(**kw):
    return [("defaults", {"model": "m", "output": "o", **kw})]


def test_later_layers_win():
    cfg = merge_into(PruneConfig, base(nsamples=4) + [("file", {"nsamples": 8, "seed": 3}), ("--set", {"seed": 5})])
    assert (cfg.nsamples, cfg.seed) == (8, 5)


def test_unknown_key_names_nearest():
    with pytest.raises(SppError, match="unknown key 'nsample'.*did you mean 'nsamples'"):
        merge_into(PruneConfig, base(nsample=4))


@pytest.mark.parametrize("key,value", [("nsamples", "many"), ("nsamples", 1.5), ("method", "svd"), ("overwrite", "yes")])
def test_mistyped_values(key, value):
    with pytest.raises(SppError, match=key):
        merge_into(PruneConfig, base(**{key: value}))


def test_parse_set_reads_yaml_scalars():
    assert parse_set(["a=1", "b=0.5", "c=true", "d=x y", "e="]) == {"a": 1, "b": 0.5, "c": True, "d": "x y", "e": None}
    with pytest.raises(SppError, match="key=value"):
        parse_set(["novalue"])


def test_read_yaml_errors(tmp_path):
    with pytest.raises(SppError, match="does not exist"):
        read_yaml(tmp_path / "no.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(SppError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SppError, match="mapping"):
        read_yaml(tmp_path / "list.yaml")


def test_prune_sparsity_rules():
    assert PruneConfig("m", "o").sparsity == 0.5
    assert PruneConfig("m", "o", pattern="1:4").sparsity == 0.75
    assert PruneConfig("m", "o", pattern="2:4", sparsity=0.5).sparsity == 0.5
    with pytest.raises(SppError, match="contradicts"):
        PruneConfig("m", "o", pattern="2:4", sparsity=0.6)
    for bad in (1.0, -0.1):
        with pytest.raises(SppError, match="out of range"):
            PruneConfig("m", "o", sparsity=bad)


@given(st.text(max_size=8))
def test_any_pattern_string_parses_or_raises_spp_error(text):
    from spp.prune.masks import parse_pattern

    try:
        result = parse_pattern(text)
    except SppError:
        return
    assert result is None or (0 < result[0] < result[1])
