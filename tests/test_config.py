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


def test_parse_set_keeps_text_for_the_field_type_to_read():
    assert parse_set(["a=1", "b=x y", "c=", "d={spp: 1e-2}"]) == {"a": "1", "b": "x y", "c": "", "d": {"spp": "1e-2"}}
    with pytest.raises(SppError, match="key=value"):
        parse_set(["novalue"])


@pytest.mark.parametrize("item,key,expected", [
    ("learning_rate=1e-3", "learning_rate", 1e-3),  # YAML 1.1 reads 1e-3 as a string
    ("learning_rate=2e-5", "learning_rate", 2e-5),
    ("learning_rate={spp: 2e-2, full: 3e-3}", "learning_rate", 2e-2),  # the chosen adapter's (spp) entry
    ("max_grad_norm=none", "max_grad_norm", None),
    ("max_grad_norm=0.5", "max_grad_norm", 0.5),
    ("val_set_size=0.1", "val_set_size", 0.1),
    ("val_set_size=100", "val_set_size", 100),
    ("train_on_inputs=false", "train_on_inputs", False),
    ("data_path=no", "data_path", "no"),  # YAML 1.1 would read a boolean
    ("target_modules=[q_proj, v_proj]", "target_modules", ["q_proj", "v_proj"]),
    ("target_modules=q_proj,v_proj", "target_modules", ["q_proj", "v_proj"]),
])
def test_set_values_are_read_as_the_field_type_says(item, key, expected):
    from spp.config import TrainConfig

    cfg = merge_into(TrainConfig, [("--set", parse_set([item]))])
    assert getattr(cfg, key) == expected and type(getattr(cfg, key)) is type(expected)


def test_yaml_file_numbers_without_a_dot_are_floats_where_the_field_is(tmp_path):
    from spp.config import TrainConfig

    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\nweight_decay: 1e-2\n")
    cfg = merge_into(TrainConfig, [("c.yaml", read_yaml(tmp_path / "c.yaml"))])
    assert (cfg.learning_rate, cfg.weight_decay) == (1e-3, 1e-2)


@pytest.mark.parametrize("item", ["learning_rate=fast", "max_steps=1.5", "train_on_inputs=yes"])
def test_set_values_that_fit_no_type_are_refused(item):
    from spp.config import TrainConfig

    with pytest.raises(SppError, match=item.partition("=")[0]):
        merge_into(TrainConfig, [("--set", parse_set([item]))])


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
