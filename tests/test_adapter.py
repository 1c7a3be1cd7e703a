"""The SPP adapter: layer math against the naive formula, dtypes, layouts, and model wrapping; and adapters on
mixture-of-experts weights (in memory, `spp train`, `spp merge` and eval)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from conftest import MOE_CONFIGS, make_moe_model, one_line_error, weight_out_in
from spp.adapter import ADAPTERS, DEFAULT_LEARNING_RATE
from spp.adapter.config import AdapterConfig
from spp.adapter.layer import effective_weight, expand_rows, row_blocks, spp_delta, spp_merge_weight
from spp.adapter.model import (adapter_state_dict, add_adapter, count_trainable, load_adapter, merge_adapter,
                               save_adapter)
from spp.adapter.weight import AdaptedFunction, AdaptedWeight
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from spp.io.reader import read_checkpoint
from spp.prune.masks import apply_mask, unstructured_mask
from spp.sparsity import pruned_is_positive_zero
from spp.train import check_pruned_zeros

SHAPES = [(12, 5, 4), (10, 6, 4), (7, 3, 2), (5, 4, 5), (9, 8, 1)]  # (out, in, r); 10/4 and 7/2 not divisible


def group_of_rows(out_features: int, r: int) -> torch.Tensor:
    """Row -> group index by the definition: r nearly equal contiguous blocks, in order."""
    return torch.cat([torch.full((len(c),), k) for k, c in enumerate(torch.tensor_split(torch.arange(out_features), r))])


def naive_forward(x, W, alpha, beta, bias, s):
    """y = W x + s·(W ⊙ Â ⊙ β) x + b, two matrix products, Â built row by row from its definition."""
    A_hat = alpha[group_of_rows(W.shape[0], alpha.shape[0])]
    return F.linear(x, W, bias) + s * F.linear(x, W * (A_hat * beta[:, None]))


def function(kind, x, W, state, bias, scale, **tensors):
    """The one autograd function on a 2-D (out, in) weight W of `kind`, with its state and tensors."""
    return AdaptedFunction.apply(x, W, state, bias, ADAPTERS[kind], scale, False, tuple(tensors), *tensors.values())


def spp_layer(base, row_groups, scale):
    """An SPP `AdaptedWeight` on a linear layer with r = `row_groups` and s = `scale` (= lora_alpha / 8)."""
    return AdaptedWeight(base, AdapterConfig(spp_row_groups=row_groups, lora_alpha=scale * 8, lora_r=8))


def random_params(out, inp, r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=dtype)
    alpha = torch.randn(r, inp, generator=g, dtype=dtype)
    beta = torch.randn(out, generator=g, dtype=dtype)
    return W, alpha, beta


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_expand_rows_matches_the_block_definition(out, inp, r):
    _, alpha, _ = random_params(out, inp, r)
    assert torch.equal(expand_rows(alpha, out), alpha[group_of_rows(out, r)])
    sizes = [n_groups * rows for _, _, n_groups, rows in row_blocks(out, r)]
    assert sum(sizes) == out


def test_expand_rows_is_repeat_interleave_not_tiling():
    alpha = torch.arange(6.0).view(3, 2)
    A_hat = expand_rows(alpha, 6)
    assert torch.equal(A_hat, alpha.repeat_interleave(2, 0))
    assert torch.equal(A_hat[:2], alpha[[0, 0]])
    assert not torch.equal(A_hat, alpha.repeat(2, 1))


def test_uneven_blocks_put_the_larger_blocks_first():
    alpha = torch.arange(3.0)[:, None]
    assert expand_rows(alpha, 8).flatten().tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_effective_and_merged_weight_follow_the_formula(out, inp, r):
    W, alpha, beta = random_params(out, inp, r)
    s = 2.0
    expected = W * (1 + s * alpha[group_of_rows(out, r)] * beta[:, None])
    torch.testing.assert_close(effective_weight(W, alpha, beta, s), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W + spp_delta(W, alpha, beta, s), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(spp_merge_weight(W, alpha, beta, s), effective_weight(W, alpha, beta, s))


def test_pruned_entries_stay_positive_zero_even_with_negative_factors():
    W, alpha, beta = random_params(16, 8, 4, dtype=torch.float32)
    keep = unstructured_mask(W.abs(), 0.5)
    W = apply_mask(W, keep)
    beta = beta * 10  # many factors 1 + s·α·β are negative
    naive = W * (1 + 2.0 * expand_rows(alpha, 16) * beta[:, None])
    assert torch.signbit(naive[~keep]).any(), "the test needs factors that turn +0.0 into -0.0"
    for merged in (effective_weight(W, alpha, beta, 2.0), spp_merge_weight(W, alpha, beta, 2.0, keep)):
        assert (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()
        torch.testing.assert_close(merged, naive, rtol=1e-6, atol=1e-6)


def test_merge_keep_mask_zeroes_what_it_prunes():
    W, alpha, beta = random_params(6, 8, 2, dtype=torch.float32)
    keep = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    merged = spp_merge_weight(W, alpha, beta, 2.0, keep)
    assert torch.equal(merged[keep], effective_weight(W, alpha, beta, 2.0)[keep])
    assert (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()


def test_merge_in_fp32_then_cast_back():
    W, alpha, beta = random_params(8, 16, 2, dtype=torch.float32)
    W16 = W.to(torch.bfloat16)
    merged = spp_merge_weight(W16, alpha, beta, 2.0)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, spp_merge_weight(W16.float(), alpha, beta, 2.0).to(torch.bfloat16))
    torch.testing.assert_close(merged.float(), W16.float() * (1 + 2.0 * expand_rows(alpha, 8) * beta[:, None]),
                               rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------ the autograd function


@pytest.mark.parametrize("out,inp,r", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_gradcheck_float64(out, inp, r, with_bias):
    W, alpha, beta = random_params(out, inp, r)
    alpha.requires_grad_(True)
    beta.requires_grad_(True)
    x = torch.randn(2, 3, inp, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, alpha, beta) + ((bias,) if with_bias else ())

    def f(x, alpha, beta, *rest):
        return function("spp", x, W, None, rest[0] if rest else None, 2.0, spp_alpha=alpha, spp_beta=beta)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_function_equals_naive_formula_in_value_and_gradient(out, inp, r):
    W, alpha0, beta0 = random_params(out, inp, r, seed=1)
    x0 = torch.randn(4, inp, dtype=torch.float64)
    bias0 = torch.randn(out, dtype=torch.float64)
    grad_y = torch.randn(4, out, dtype=torch.float64)
    results = []
    for fn in (lambda x, a, b, bias: function("spp", x, W, None, bias, 2.0, spp_alpha=a, spp_beta=b),
               lambda *a: naive_forward(a[0], W, *a[1:], 2.0)):
        leaves = [t.clone().requires_grad_(True) for t in (x0, alpha0, beta0, bias0)]
        y = fn(*leaves)
        y.backward(grad_y)
        results.append([y.detach()] + [t.grad for t in leaves])
    for ours, naive in zip(*results):
        torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ the SPP layer


def make_layer(kind: str, out=10, inp=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "conv1d":
        layer = Conv1D(out, inp)
        nn.init.normal_(layer.bias)
    else:
        layer = nn.Linear(inp, out, bias=(kind == "linear_bias"))
    return layer.to(dtype)


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
def test_at_init_the_layer_is_the_base_layer(kind):
    base = make_layer(kind)
    x = torch.randn(3, 8)
    expected = base(x)
    layer = spp_layer(base, row_groups=3, scale=2.0)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.spp_beta, torch.zeros(10))
    bound = 1 / 8**0.5  # Kaiming-uniform with a = √5 on (r, in): U(-1/√in, 1/√in)
    assert layer.spp_alpha.abs().max() <= bound and layer.spp_alpha.std() > 0.2 * bound


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
def test_layer_equals_naive_formula_for_each_layout(kind):
    base = make_layer(kind, dtype=torch.float64)
    layer = spp_layer(base, row_groups=4, scale=2.0)  # out = 10, not divisible by 4
    with torch.no_grad():
        layer.spp_beta.normal_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = layer(x)
    W = weight_out_in(base).detach()
    alpha = layer.spp_alpha.detach().clone().requires_grad_(True)
    beta = layer.spp_beta.detach().clone().requires_grad_(True)
    y_naive = naive_forward(x, W, alpha, beta, base.bias, 2.0)
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-10)
    y.square().sum().backward()
    y_naive.square().sum().backward()
    torch.testing.assert_close(layer.spp_alpha.grad, alpha.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.spp_beta.grad, beta.grad, rtol=1e-10, atol=1e-10)
    assert base.weight.grad is None and not base.weight.requires_grad


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_merged_weight_is_in_storage_layout_and_reproduces_the_layer(kind):
    base = make_layer(kind)
    layer = spp_layer(base, row_groups=4, scale=2.0)
    with torch.no_grad():
        layer.spp_beta.normal_()
    x = torch.randn(3, 8)
    y = layer(x)
    merged = layer.merged_weight("weight")
    assert merged.shape == base.weight.shape
    with torch.no_grad():
        base.weight.copy_(merged)
        torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_and_backward_close_to_fp32(dtype):
    base32 = make_layer("linear_bias", out=32, inp=64)
    layer32 = spp_layer(base32, row_groups=4, scale=2.0)
    with torch.no_grad():
        layer32.spp_beta.normal_(std=0.1)
    layer16 = spp_layer(make_layer("linear_bias", out=32, inp=64).to(dtype), row_groups=4, scale=2.0)
    layer16.load_state_dict(layer32.state_dict())
    assert layer16.spp_alpha.dtype == torch.float32
    x = torch.randn(4, 64)
    y32, y16 = layer32(x), layer16(x.to(dtype))
    assert y16.dtype == dtype
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    y16.float().sum().backward()
    y32.sum().backward()
    assert layer16.spp_beta.grad.dtype == torch.float32
    torch.testing.assert_close(layer16.spp_beta.grad, layer32.spp_beta.grad, rtol=5e-2, atol=5e-2)


def test_autocast_bf16_trains():
    layer = spp_layer(make_layer("linear_bias", out=16, inp=8), row_groups=4, scale=2.0)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.spp_alpha.grad.dtype == torch.float32


def test_row_groups_larger_than_out_is_an_error():
    with pytest.raises(SppError, match="spp_row_groups=20"):
        spp_layer(make_layer("linear"), row_groups=20, scale=2.0)


# ------------------------------------------------------------------ config


def test_config_scale_json_round_trip_and_checks():
    cfg = AdapterConfig(spp_row_groups=4, lora_alpha=32, lora_r=8, target_modules=["*proj"], mask_sha256="ab")
    assert cfg.scale == 4.0
    obj = json.loads(json.dumps(cfg.to_json()))
    assert obj["peft_type"] == "SPP" and obj["scale"] == 4.0
    assert AdapterConfig.from_json(obj) == cfg
    with pytest.raises(SppError, match="one matrix product"):
        AdapterConfig(lora_dropout=0.05)
    with pytest.raises(SppError, match="spp_row_groups"):
        AdapterConfig(spp_row_groups=0)
    with pytest.raises(SppError, match="lora_r"):
        AdapterConfig(lora_r=0)
    with pytest.raises(SppError, match="not an SPP adapter"):
        AdapterConfig.from_json({"peft_type": "LORA"})
    with pytest.raises(SppError, match="spp_row_group"):
        AdapterConfig.from_json({**obj, "spp_row_group": 3})


# ------------------------------------------------------------------ whole models


def prune_in_place(model, sparsity=0.5):
    """Magnitude-prune every linear layer of the decoder blocks; keep-masks by parameter name."""
    from spp.models import decoder_targets

    masks = {}
    with torch.no_grad():
        for targets in decoder_targets(model):
            for target in targets.values():
                keep = unstructured_mask(target.weight.abs(), sparsity)
                target.weight.copy_(apply_mask(target.weight, keep))
                masks[target.param] = keep
    return masks


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("beta") else 0.1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_spp_wraps_targets_freezes_the_rest_and_starts_at_the_base(tiny_model, arch):
    model = tiny_model(arch)
    masks = prune_in_place(model)
    ids = torch.randint(0, 128, (2, 12))
    expected = model(ids).logits
    names = add_adapter(model, AdapterConfig(spp_row_groups=4), masks)
    per_block = 7 if arch == "llama" else 4
    assert len(names) == 2 * per_block
    assert all(isinstance(model.get_submodule(n), AdaptedWeight) and model.get_submodule(n).kind == "spp" for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert count_trainable(model) == sum(p.numel() for p in adapter_state_dict(model).values())
    assert torch.equal(model(ids).logits, expected)


def test_target_patterns_choose_layers(tiny_model):
    model = tiny_model("llama")
    names = add_adapter(model, AdapterConfig(spp_row_groups=4, target_modules=["self_attn.*"]))
    assert len(names) == 8 and all(".self_attn." in n for n in names)
    with pytest.raises(SppError, match="already has spp adapters"):
        add_adapter(model, AdapterConfig())
    with pytest.raises(SppError, match="match no linear layer.*q_proj"):
        add_adapter(tiny_model("llama"), AdapterConfig(target_modules=["attn.qkv"]))


@pytest.mark.parametrize("bad", ["nonzero", "negative_zero"])
def test_add_spp_refuses_a_base_that_breaks_its_mask(tiny_model, bad):
    model = tiny_model("llama")
    masks = prune_in_place(model)
    name = "model.layers.1.mlp.down_proj.weight"
    row, col = (~masks[name]).nonzero()[0].tolist()
    with torch.no_grad():
        model.get_parameter(name)[row, col] = 0.5 if bad == "nonzero" else -0.0
    with pytest.raises(SppError, match="model.layers.1.mlp.down_proj: 1 entries"):
        add_adapter(model, AdapterConfig(spp_row_groups=4), masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())
    assert model.get_parameter(name)[row, col].item() != 0 or torch.signbit(model.get_parameter(name)[row, col])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_and_in_memory_merge(tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    masks = prune_in_place(model)
    cfg = AdapterConfig(spp_row_groups=4, base_model="somewhere", mask_sha256="x" * 64)
    add_adapter(model, cfg, masks)
    perturb(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        y_adapter = model(ids).logits
    save_adapter(model, cfg, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE])

    reloaded = tiny_model(arch)
    prune_in_place(reloaded)
    with torch.no_grad():
        y_base = reloaded(ids).logits
    assert load_adapter(reloaded, tmp_path / "adapter", masks) == cfg
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, y_adapter)
        merge_adapter(reloaded, masks)
        assert not any(isinstance(m, AdaptedWeight) for m in reloaded.modules())
        y_merged = reloaded(ids).logits
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_merged, y_base, atol=1e-3)
    for name, keep in masks.items():
        w = reloaded.get_parameter(name)
        assert (w[~keep] == 0).all() and not torch.signbit(w[~keep]).any()


def test_load_adapter_bad_inputs(tiny_model, tmp_path):
    model = tiny_model("llama")
    cfg = AdapterConfig(spp_row_groups=4)
    add_adapter(model, cfg)
    save_adapter(model, cfg, tmp_path / "ok")
    with pytest.raises(SppError, match="does not exist"):
        load_adapter(tiny_model("llama"), tmp_path / "missing")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / ADAPTER_CONFIG_FILE).write_text((tmp_path / "ok" / ADAPTER_CONFIG_FILE).read_text())
    (tmp_path / "corrupt" / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SppError, match="corrupt"):
        load_adapter(tiny_model("llama"), tmp_path / "corrupt")
    (tmp_path / "ok" / ADAPTER_CONFIG_FILE).write_text(json.dumps({**cfg.to_json(), "spp_row_groups": 2}))
    with pytest.raises(SppError, match="spp_alpha has shape \\(4, 32\\), the model needs \\(2, 32\\)"):
        load_adapter(tiny_model("llama"), tmp_path / "ok")


# ------------------------------------------------------------------ masked LoRA

from spp.adapter.masked_lora import masked_lora_weight  # noqa: E402


def masked_lora_layer(base, keep, rank, scale, name=""):
    """A masked-LoRA `AdaptedWeight` on a linear layer (keep in its storage layout), s = `scale` (= lora_alpha / rank)."""
    return AdaptedWeight(base, AdapterConfig(kind="masked_lora", rank=rank, lora_alpha=scale * rank), {"weight": keep},
                         name=name)


def full_layer(base, keep):
    return AdaptedWeight(base, AdapterConfig(kind="full"), {"weight": keep})


def keep_of(layer):
    """The layer's keep-mask M rebuilt from its W and state, storage layout."""
    return ADAPTERS[layer.kind].keep(layer.base_layer.weight.detach(), layer.state["weight"])

LORA_SHAPES = [(11, 6, 3), (7, 9, 2), (5, 4, 6)]  # (out, in, rank): out 11 and 7 are prime; rank may exceed min(out, in)


def lora_params(out, inp, r, dtype=torch.float64, seed=0):
    """W pruned by a random mask, with one kept entry that is zero (it must still move)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, inp, generator=g) > 0.5
    W = torch.where(keep, torch.randn(out, inp, generator=g, dtype=dtype), torch.zeros((), dtype=dtype))
    W[tuple(keep.nonzero()[0])] = 0.0
    A = torch.randn(r, inp, generator=g, dtype=dtype)
    B = torch.randn(out, r, generator=g, dtype=dtype)
    return W, A, B, keep


def kept_zeros(W, keep):
    return ((W == 0) & keep).nonzero()


def naive_lora_forward(x, W, A, B, keep, bias, s):
    """y = (W + M ⊙ (s·B·A)) x + b, by the formula (autograd does the gradients)."""
    return F.linear(x, W + keep * (s * B @ A), bias)


@pytest.mark.parametrize("out,inp,r", LORA_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_lora_function_gradcheck_float64(out, inp, r, with_bias):
    W, A, B, keep = lora_params(out, inp, r)
    x = torch.randn(2, 3, inp, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, A.requires_grad_(True), B.requires_grad_(True)) + ((bias,) if with_bias else ())

    def f(x, A, B, *rest):
        return function("masked_lora", x, W, kept_zeros(W, keep), rest[0] if rest else None, 1.5, lora_A=A, lora_B=B)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("out,inp,r", LORA_SHAPES)
def test_masked_lora_equals_naive_formula_in_value_and_gradient(out, inp, r):
    W, A0, B0, keep = lora_params(out, inp, r, seed=1)
    x0, bias0 = torch.randn(4, inp, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    grad_y = torch.randn(4, out, dtype=torch.float64)
    results = []
    assert len(kept_zeros(W, keep)) == 1
    for fn in (lambda x, A, B, b: function("masked_lora", x, W, kept_zeros(W, keep), b, 2.0, lora_A=A, lora_B=B),
               lambda x, A, B, b: naive_lora_forward(x, W, A, B, keep, b, 2.0)):
        leaves = [t.clone().requires_grad_(True) for t in (x0, A0, B0, bias0)]
        fn(*leaves).backward(grad_y)
        results.append([fn(*leaves).detach()] + [t.grad for t in leaves])
    for ours, naive in zip(*results):
        torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)
    # the table's pure gradients: dA = s·Bᵀ(G ⊙ M), dB = s·(G ⊙ M)Aᵀ
    G = grad_y.t() @ x0
    grads = ADAPTERS["masked_lora"].gradients(G.clone(), W, keep, {"lora_A": A0, "lora_B": B0}, 2.0)
    torch.testing.assert_close(grads["lora_A"], results[1][2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["lora_B"], results[1][3], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
def test_masked_lora_layer_equals_naive_formula_for_each_layout(kind):
    base = make_layer(kind, out=11, inp=8, dtype=torch.float64)
    keep = torch.rand(base.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.4  # storage layout
    with torch.no_grad():
        base.weight.copy_(torch.where(keep, base.weight, torch.zeros((), dtype=torch.float64)))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = base(x)
    layer = masked_lora_layer(base, keep, rank=3, scale=16 / 3)
    assert torch.equal(layer(x), expected)  # B = 0 at init: the base layer exactly
    bound = 1 / 8**0.5  # Kaiming-uniform with a = √5 on (r, in)
    assert layer.lora_A.abs().max() <= bound and not layer.lora_B.any()
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    W, keep_oi = weight_out_in(base).detach(), keep_of(layer).t() if kind == "conv1d" else keep_of(layer)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    y_naive = naive_lora_forward(x, W, A, B, keep_oi, base.bias, 16 / 3)
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-10)
    y.square().sum().backward()
    y_naive.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-10, atol=1e-10)
    assert base.weight.grad is None
    merged = layer.merged_weight("weight")
    assert merged.shape == base.weight.shape
    assert (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()
    with torch.no_grad():
        base.weight.copy_(merged)
        assert torch.equal(base(x), y.detach())  # the merged weight is bitwise the forward's


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_masked_lora_layer_rebuilds_the_mask_file_s_mask_not_w_nonzero(kind):
    base = make_layer(kind, out=10, inp=8)
    keep = torch.rand(base.weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5  # storage layout
    with torch.no_grad():
        base.weight.copy_(torch.where(keep, base.weight, torch.zeros(())))
        kept = tuple(keep.nonzero()[0])
        base.weight[kept] = 0.0  # a kept weight that is zero: M keeps it, W != 0 would not
    layer = masked_lora_layer(base, keep, rank=2, scale=2.0)
    assert torch.equal(keep_of(layer).bool(), keep) and len(layer.state["weight"]) == 1
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged_weight("weight")
    assert merged[kept] != 0 and (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()
    with torch.no_grad():
        base.weight[tuple((~keep).nonzero()[0])] = 0.5
    with pytest.raises(SppError, match="^lin: 1 entries the mask marks pruned are not zero"):
        masked_lora_layer(base, keep, rank=2, scale=2.0, name="lin")


def test_masked_lora_pruned_entries_are_positive_zero_and_kept_ones_may_vanish():
    W, A, B, keep = lora_params(8, 6, 2, dtype=torch.float32)
    W_eff = masked_lora_weight(W, A, B, 2.0, keep)
    assert (W_eff[~keep] == 0).all() and not torch.signbit(W_eff[~keep]).any()
    # a kept entry whose update cancels W becomes a kept zero, not a pruned one
    row, col = keep.nonzero()[0].tolist()
    B2 = B.clone()
    B2[row] = 0
    W2 = W.clone()
    W2[row, col] = 0.0
    assert masked_lora_weight(W2, A, B2, 2.0, keep)[row, col] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_lora_low_precision_close_to_fp32(dtype):
    keep = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    base32 = make_layer("linear_bias", out=32, inp=64)
    with torch.no_grad():
        base32.weight.copy_(torch.where(keep, base32.weight, torch.zeros(())))
    layer32 = masked_lora_layer(base32, keep, rank=4, scale=4.0)
    with torch.no_grad():
        layer32.lora_B.normal_(std=0.1)
    base16 = make_layer("linear_bias", out=32, inp=64).to(dtype)
    with torch.no_grad():
        base16.weight.copy_(base32.weight)
    layer16 = masked_lora_layer(base16, keep, rank=4, scale=4.0)
    layer16.load_state_dict(layer32.state_dict())
    assert layer16.lora_A.dtype == torch.float32
    x = torch.randn(4, 64)
    y32, y16 = layer32(x), layer16(x.to(dtype))
    assert y16.dtype == dtype
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    y16.float().sum().backward()
    y32.sum().backward()
    assert layer16.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(layer16.lora_B.grad, layer32.lora_B.grad, rtol=5e-2, atol=5e-2)
    merged = layer16.merged_weight("weight")
    assert merged.dtype == dtype and (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()


# ------------------------------------------------------------------ full (masked) fine-tuning


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_full_gradient_is_the_dense_gradient_times_the_mask(kind):
    base = make_layer(kind, out=11, inp=8, dtype=torch.float64)
    keep = torch.rand(base.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        base.weight.copy_(torch.where(keep, base.weight, torch.zeros((), dtype=torch.float64)))
    dense = make_layer(kind, out=11, inp=8, dtype=torch.float64)
    dense.load_state_dict(base.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    layer = full_layer(base, keep)
    assert base.weight.requires_grad and not base.bias.requires_grad  # an fp32/fp64 base is its own master
    y, y_dense = layer(x), dense(x)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    y_dense.square().sum().backward()
    expected = torch.where(keep, dense.weight.grad, torch.zeros((), dtype=torch.float64))
    assert torch.equal(base.weight.grad, expected)  # storage layout, exactly +0.0 where pruned
    assert not torch.signbit(base.weight.grad[~keep]).any()
    assert base.bias.grad is None


def test_full_function_gradcheck_float64():
    W, _, _, keep = lora_params(7, 5, 1)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    keep = keep.to(torch.uint8)  # as the layer keeps it; W is both the frozen weight and the trained master
    assert torch.autograd.gradcheck(lambda x, W, b: function("full", x, W, keep, b, 1.0, full_weight=W),
                                    (x, W.requires_grad_(True), bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_full_pruned_entries_stay_positive_zero_through_adamw_with_weight_decay(dtype, kind):
    base = make_layer(kind, out=16, inp=8, dtype=dtype)
    keep = torch.rand(base.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    with torch.no_grad():
        base.weight.copy_(torch.where(keep, base.weight, torch.zeros((), dtype=dtype)))
    layer = full_layer(base, keep)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 1 and params[0].dtype == torch.float32  # the base itself (fp32) or a float32 master (bf16)
    assert (layer.names["weight"] == []) == (dtype == torch.float32)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    for step in range(5):
        x = torch.randn(4, 8, dtype=dtype)
        layer(x).float().sin().sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    master = params[0]
    assert (master[~keep] == 0).all() and not torch.signbit(master[~keep]).any()
    assert not torch.equal(master[keep], base.weight.float()[keep]) or dtype == torch.float32
    merged = layer.merged_weight("weight")
    assert merged.dtype == dtype and (merged[~keep] == 0).all() and not torch.signbit(merged[~keep]).any()
    for state in optimizer.state[master].values():
        if torch.is_tensor(state) and state.shape == master.shape:
            assert not state[~keep].any() and not torch.signbit(state[~keep]).any()


# ------------------------------------------------------------------ the table, the config, whole models


def test_every_kind_has_the_same_entry_points_and_a_default_learning_rate():
    assert set(ADAPTERS) == set(DEFAULT_LEARNING_RATE) == {"spp", "masked_lora", "full"}
    for name, kind in ADAPTERS.items():
        assert isinstance(kind.label, str) and kind.label
        assert all(callable(f) for f in (kind.scale, kind.size, kind.tensor_shapes, kind.init, kind.state, kind.keep,
                                         kind.effective_weight, kind.gradients, kind.merged_weight))


def test_config_records_the_kind_and_refuses_an_unknown_one():
    cfg = AdapterConfig(kind="masked_lora", rank=4, lora_alpha=16)
    obj = json.loads(json.dumps(cfg.to_json()))
    assert obj["kind"] == "masked_lora" and obj["scale"] == 4.0 and AdapterConfig.from_json(obj) == cfg
    assert AdapterConfig(kind="spp", rank=4).scale == 2.0  # lora_alpha / lora_r: rank is not SPP's
    old = {k: v for k, v in AdapterConfig().to_json().items() if k not in ("kind", "rank")}
    assert AdapterConfig.from_json(old).kind == "spp"  # written before there were kinds
    with pytest.raises(SppError, match=r"unknown adapter kind 'lora' \(valid kinds: spp, masked_lora, full\)"):
        AdapterConfig.from_json({**obj, "kind": "lora"}, source="x/adapter_config.json")
    with pytest.raises(SppError, match="rank=0"):
        AdapterConfig(kind="masked_lora", rank=0)


def test_spp_row_groups_error_names_the_layer(tiny_model):
    model = tiny_model("llama")  # k_proj and v_proj have 2 kv heads × 8 = 16 output rows
    with pytest.raises(SppError, match=r"^model\.layers\.0\.self_attn\.k_proj has 16 output rows, fewer than "
                                       r"spp_row_groups=32$"):
        add_adapter(model, AdapterConfig(spp_row_groups=32))
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())


@pytest.mark.parametrize("kind", ["masked_lora", "full"])
def test_a_target_without_a_mask_is_refused_for_kinds_that_need_one(tiny_model, kind):
    model = tiny_model("llama")
    masks = prune_in_place(model)
    del masks["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(SppError, match=rf"^model\.layers\.1\.mlp\.up_proj has no entry in the keep-masks .*{kind}"):
        add_adapter(model, AdapterConfig(kind=kind, adapt_unpruned=True), masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed
    with pytest.raises(SppError, match="has no entry in the keep-masks"):
        add_adapter(tiny_model("llama"), AdapterConfig(kind=kind))  # no masks at all
    # by default a layer without a mask entry (left dense by `spp prune`) is simply not adapted
    names = add_adapter(model, AdapterConfig(kind=kind), masks)
    assert "model.layers.1.mlp.up_proj" not in names and len(names) == len(masks)


def perturb_any(model, seed=0):
    """Move every adapter tensor away from its init (any kind)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if name.endswith("full_weight") else 0.3))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["masked_lora", "full"])
def test_save_load_and_in_memory_merge_for_each_kind(tiny_model, tmp_path, arch, kind):
    model = tiny_model(arch)
    masks = prune_in_place(model)
    cfg = AdapterConfig(kind=kind, rank=3, base_model="somewhere", mask_sha256="x" * 64)
    add_adapter(model, cfg, masks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(adapter_state_dict(model))
    assert [p.shape for p in trainable] == [  # one tensor per trainable parameter, in order (optimizer state)
        (t.t() if t.shape != p.shape else t).shape for p, t in zip(trainable, adapter_state_dict(model).values())]
    perturb_any(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        y_adapter = model(ids).logits
    save_adapter(model, cfg, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())["kind"] == kind

    reloaded = tiny_model(arch)
    prune_in_place(reloaded)
    with torch.no_grad():
        y_base = reloaded(ids).logits
    assert load_adapter(reloaded, tmp_path / "adapter", masks) == cfg
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, y_adapter)
        merge_adapter(reloaded, masks)
        y_merged = reloaded(ids).logits
    assert not any(isinstance(m, AdaptedWeight) for m in reloaded.modules())
    assert not any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_merged, y_base, atol=1e-3)
    for name, keep in masks.items():
        w = reloaded.get_parameter(name)
        assert (w[~keep] == 0).all() and not torch.signbit(w[~keep]).any()


# =========================================================================== mixture of experts
# Adapters on mixture-of-experts weights: `AdaptedWeight` in memory, `spp train`, `spp merge` and eval.
#
# Tiny random Mixtral and Qwen3-MoE models (4 experts, top-2): in memory, every expert weight and linear
# layer magnitude-pruned 2:4 (`prune_2_4`); on disk, `spp prune --method wanda --pattern 2:4` outputs
# (per-expert tensors, the mask file keyed by those saved names). Bit-exact comparisons use one experts
# kernel throughout (`eager`, or transformers' default on both sides): `eager` and `grouped_mm` sum in
# different orders and differ by ~1e-7.

KINDS = ["spp", "masked_lora", "full"]
EAGER = "eager"


def prune_2_4(model) -> dict[str, torch.Tensor]:
    """Magnitude 2:4 along the input axis of every linear layer and expert weight in the decoder blocks (in place).

    Returns:
        keep-masks by parameter name (a fused expert weight's own name, (E, out, in)).
    """
    from spp.models import decoder_targets
    from spp.prune.masks import apply_mask, nm_mask

    masks = {}
    with torch.no_grad():
        for target in (target for targets in decoder_targets(model) for target in targets.values()):
            W = target.out_in()  # (out, in) or (E, out, in)
            keep = nm_mask(W.abs().reshape(-1, W.shape[-1]), 2, 4).reshape(W.shape)
            W.copy_(apply_mask(W, keep))
            masks[target.param] = keep
    return masks


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "stories260K-hf")


def _pruned_dir(arch, tokenizer, text_file, tmp_path_factory, **prune) -> Path:
    """`spp prune --method wanda --pattern 2:4` of a seeded random MoE model (vocab 512, the stories260K tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spp.config import PruneConfig
    from spp.io.checkpoint import save_model
    from spp.prune import run_prune

    kwargs = dict(MOE_CONFIGS[arch], vocab_size=512, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(arch)
    save_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer, directory / "dense")
    run_prune(PruneConfig(model=str(directory / "dense"), output=str(directory / "pruned"), method="wanda",
                          pattern="2:4", calib=str(text_file), nsamples=4, seqlen=32, device="cpu", **prune))
    return directory / "pruned"


@pytest.fixture(scope="module")
def pruned_mixtral(tokenizer, text_file, tmp_path_factory) -> Path:
    return _pruned_dir("mixtral", tokenizer, text_file, tmp_path_factory)


@pytest.fixture(scope="module")
def pruned_qwen3_moe(tokenizer, text_file, tmp_path_factory) -> Path:
    # small shards: one expert's pieces land in different shards, and merge writes each where it is
    return _pruned_dir("qwen3_moe", tokenizer, text_file, tmp_path_factory, max_shard_size="100KB")


def adapter_cfg(kind: str, **extra) -> AdapterConfig:
    return AdapterConfig(kind=kind, **{"spp_row_groups": 4, "rank": 4, **extra})


def train_steps(model, vocab: int, steps: int = 3, lr: float = 0.1) -> None:
    """A few AdamW steps (large lr, weight decay) on random tokens: moves β, B and the masters far from init."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 12))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapted_experts_start_at_the_base_keep_zeros_and_merge_in_memory(arch, kind):
    model = make_moe_model(arch, experts_implementation=EAGER)
    masks = prune_2_4(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base = logits(model, ids)
    adapted = add_adapter(model, adapter_cfg(kind), masks)
    assert [n for n in adapted if ".experts." in n] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                        for p in ("gate_up_proj", "down_proj")]
    assert not any(n.endswith("mlp.gate") for n in adapted)  # the router is not adapted
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, AdaptedWeight) and experts.params == ["gate_up_proj", "down_proj"]
    E, H, I = 4, MOE_CONFIGS[arch]["hidden_size"], 48
    expected = {"spp": {"spp_alpha": (E, 4, H), "spp_beta": (E, 2 * I)},
                "masked_lora": {"lora_A": (E, 4, H), "lora_B": (E, 2 * I, 4)},
                "full": {"full_weight": (E, 2 * I, H)}}[kind]
    state = adapter_state_dict(model)
    prefix = "model.layers.0.mlp.experts.gate_up_proj."
    assert {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)} == expected
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [t.data_ptr() for t in state.values()] == [p.data_ptr() for p in trainable]  # the optimizer's order
    assert torch.equal(logits(model, ids), base)  # at init the adapted model is the base, bitwise

    train_steps(model, 128)
    check_pruned_zeros(model, masks)  # base and W_eff +0.0 bitwise at every pruned entry
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        module, _, p = name.rpartition(".")
        layer = model.get_submodule(module)
        W_eff = layer.effective_weight(getattr(layer.base_layer, p).detach(), masks[name], layer.tensors(p))
        assert pruned_is_positive_zero(W_eff, masks[name]).all() and (W_eff[masks[name]] == 0).float().mean() < 0.01
    trained = logits(model, ids)
    assert (trained - base).abs().max() > 1e-3
    merge_adapter(model, masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())
    assert torch.equal(logits(model, ids), trained)  # the in-memory merge is the adapter model, bitwise
    for name, keep in masks.items():
        assert pruned_is_positive_zero(model.get_parameter(name), keep).all()


def test_every_experts_kernel_runs_the_adapter():
    """grouped_mm (transformers' default), batched_mm and eager give the same adapted model up to summation order."""
    outputs = {}
    for kernel in ("grouped_mm", "batched_mm", EAGER):
        model = make_moe_model("mixtral", experts_implementation=kernel)
        masks = prune_2_4(model)
        torch.manual_seed(0)
        add_adapter(model, adapter_cfg("spp"), masks)
        train_steps(model, 128, steps=2)
        outputs[kernel] = logits(model, torch.arange(12)[None])
    for kernel in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[kernel], outputs[EAGER], rtol=1e-5, atol=1e-5)


def test_only_the_targeted_fused_weight_is_adapted():
    model = make_moe_model("mixtral", experts_implementation=EAGER)
    masks = prune_2_4(model)
    gate_up = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").detach().clone()
    adapted = add_adapter(model, adapter_cfg("masked_lora", target_modules=["mlp.experts.down_proj"]), masks)
    assert adapted == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    assert model.model.layers[0].mlp.experts.params == ["down_proj"]
    assert sorted(adapter_state_dict(model)) == [f"model.layers.{i}.mlp.experts.down_proj.{t}"
                                                 for i in (0, 1) for t in ("lora_A", "lora_B")]
    train_steps(model, 128)
    trained = logits(model, torch.arange(12)[None])
    merge_adapter(model, masks)
    assert torch.equal(model.get_parameter("model.layers.0.mlp.experts.gate_up_proj"), gate_up)
    assert torch.equal(logits(model, torch.arange(12)[None]), trained)


def _reference_weight(kind, W, keep, tensors, scale):
    """W_eff of one expert by the naive formula, differentiable by autograd (float64)."""
    if kind == "spp":
        return W + spp_delta(W, tensors["spp_alpha"], tensors["spp_beta"], scale)
    if kind == "masked_lora":
        return W + keep * (scale * tensors["lora_B"] @ tensors["lora_A"])
    return keep * tensors["full_weight"]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_function_gradients_equal_a_per_expert_reference(kind):
    """float64: the adapted experts' output and the gradients of every adapter tensor equal autograd through
    W_eff[e] built expert by expert from the naive formula (`spp_delta`, B·A, M ⊙ W)."""
    model = make_moe_model("mixtral", experts_implementation=EAGER)
    masks = prune_2_4(model)
    experts = model.model.layers[0].mlp.experts.double()
    keeps = {p: masks[f"model.layers.0.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj")}
    cfg = adapter_cfg(kind, spp_row_groups=5)  # 5 groups: 96 and 64 rows are not divisible by 5
    torch.manual_seed(0)
    adapted = AdaptedWeight(experts, cfg, keeps, ["gate_up_proj", "down_proj"])
    with torch.no_grad():  # away from init, so every term of every gradient is non-zero
        for p in adapted.params:
            for t in adapted.tensors(p).values():
                t.add_(torch.randn_like(t) * 0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 64, dtype=torch.float64, generator=gen)
    top_k = torch.randint(0, 4, (10, 2), generator=gen)
    top_w = torch.rand(10, 2, dtype=torch.float64, generator=gen)
    probe = torch.randn(10, 64, dtype=torch.float64, generator=gen)
    (adapted(x, top_k, top_w) * probe).sum().backward()

    reference, leaves = {}, {}
    for p in adapted.params:
        leaves[p] = {t: v.detach().clone().requires_grad_(True) for t, v in adapted.tensors(p).items()}
        W = getattr(experts, p).detach()
        reference[p] = torch.stack([_reference_weight(kind, W[e], keeps[p][e].double(),
                                                      {t: v[e] for t, v in leaves[p].items()}, cfg.scale)
                                    for e in range(W.shape[0])])
    y = torch.func.functional_call(experts, reference, (x, top_k, top_w))
    (y * probe).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, top_k, top_w), y, rtol=1e-12, atol=1e-12)
    for p in adapted.params:
        for t, v in adapted.tensors(p).items():
            assert v.grad is not None and v.grad.abs().max() > 0
            torch.testing.assert_close(v.grad, leaves[p][t].grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- spp train


def _train_cfg(base, data, output, **overrides):
    from spp.config import TrainConfig, merge_into

    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(output), cutoff_len=32,
                    micro_batch_size=2, batch_size=4, max_steps=12, save_steps=2, logging_steps=1, eval_steps=6,
                    val_set_size=4, learning_rate=0.3, warmup_ratio=0.0, spp_row_groups=4)
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


def test_spp_train_lowers_the_validation_loss_and_resumes_bit_for_bit(pruned_mixtral, text_file, tmp_path,
                                                                         monkeypatch):
    import json

    from spp.errors import SppInterrupted
    from spp.train import run_train

    report = run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "straight"))
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    first = next(r["val_loss"] for r in log if r["step"] == 0)
    assert report.val_loss < first - 0.03, (first, report.val_loss)  # 6.237 -> 6.155 when written
    straight = load_file(str(tmp_path / "straight" / ADAPTER_WEIGHTS_FILE))
    assert "model.layers.0.mlp.experts.gate_up_proj.spp_alpha" in straight
    assert report.trainable_params == sum(t.numel() for t in straight.values())

    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")
    with pytest.raises(SppInterrupted):
        run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "resumed"))
    monkeypatch.delenv("SPP_FAULT")
    resumed_report = run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "resumed", resume=True))
    assert resumed_report.resumed_from == 2
    resumed = load_file(str(tmp_path / "resumed" / ADAPTER_WEIGHTS_FILE))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_activation_checkpointing_gives_the_same_adapter(pruned_mixtral, text_file, tmp_path):
    """Recomputing a block in backward rebuilds W_eff through the same Function: the same adapter, bitwise."""
    from spp.train import run_train

    for out, checkpointing in (("a", False), ("b", True)):
        run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / out, max_steps=2, val_set_size=0,
                             gradient_checkpointing=checkpointing))
    a, b = (load_file(str(tmp_path / out / ADAPTER_WEIGHTS_FILE)) for out in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one(pruned_mixtral, text_file, tmp_path):
    """DDP needs nothing MoE-specific: every expert's adapter tensors get a gradient (zero for an expert no token
    reached), so no parameter is unused. Two CPU processes under `accelerate launch` match one process."""
    import sys

    from spp.train import run_train
    from test_train import SPP_MAIN, cli_args, log_records, spp_command

    settings = dict(max_steps=3, batch_size=8, micro_batch_size=2, learning_rate=2e-2)
    run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "single", **settings))
    script = tmp_path / "spp_main.py"
    script.write_text(SPP_MAIN + "\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cfg = _train_cfg(pruned_mixtral, text_file, tmp_path / "ddp", **settings)
    result = spp_command(*cli_args(cfg), "--set", f"spp_row_groups={cfg.spp_row_groups}",
                         env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    for one, two in zip(log_records(tmp_path / "single")[1:], log_records(tmp_path / "ddp")[1:]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    single = load_file(str(tmp_path / "single" / ADAPTER_WEIGHTS_FILE))
    ddp = load_file(str(tmp_path / "ddp" / ADAPTER_WEIGHTS_FILE))
    assert single.keys() == ddp.keys()
    assert max(float((single[k] - ddp[k]).abs().max()) for k in single) <= 1e-5  # gradient all-reduce sums in another order


# --------------------------------------------------------------------------- spp merge, verify, eval


def _adapter_dir(pruned: Path, kind: str, directory: Path):
    """An adapter trained in memory on `pruned` (eager kernel), saved as `spp train` saves it; returns the model."""
    from transformers import AutoModelForCausalLM

    ckpt = read_checkpoint(pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned, experts_implementation=EAGER).eval()
    cfg = adapter_cfg(kind, base_model=str(pruned), mask_sha256=ckpt.mask_sha256)
    torch.manual_seed(0)
    add_adapter(model, cfg, ckpt.masks_by_parameter())
    train_steps(model, 512)
    save_adapter(model, cfg, directory)
    return model


@pytest.mark.parametrize("arch,kind", [("mixtral", "spp"), ("mixtral", "masked_lora"), ("mixtral", "full"),
                                       ("qwen3_moe", "spp")])
def test_merge_keeps_every_pruned_zero_verifies_and_reloads_as_the_adapter_model(
        arch, kind, pruned_mixtral, pruned_qwen3_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp.cli import app
    from spp.config import MergeConfig
    from spp.merge import run_merge

    pruned = {"mixtral": pruned_mixtral, "qwen3_moe": pruned_qwen3_moe}[arch]
    adapter_model = _adapter_dir(pruned, kind, tmp_path / "adapter")
    report = run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged")))
    assert report.n_modules == 2 * (4 + 2)  # per block: q, k, v, o and the two fused expert weights (no router)
    assert (report.n_shards > 1) == (arch == "qwen3_moe")  # the Qwen3-MoE base is saved in small shards
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output

    masks, _ = read_checkpoint(pruned).read_masks()  # keyed by the saved per-expert names
    saved = {}
    for shard in sorted((tmp_path / "merged").glob("*.safetensors")):
        saved.update(load_file(str(shard)))
    experts = [k for k in masks if ".experts." in k]
    assert len(experts) == 2 * 4 * 3  # blocks × experts × (gate, up, down)
    for name, keep in masks.items():
        assert pruned_is_positive_zero(saved[name], keep).all(), name

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = logits(adapter_model, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", experts_implementation=EAGER).eval()
    assert torch.equal(logits(reloaded, ids), expected)  # same weights bitwise, same kernel: same logits
    base = AutoModelForCausalLM.from_pretrained(pruned, experts_implementation=EAGER).eval()
    assert (logits(base, ids) - expected).abs().max() > 1e-3
    merge_adapter(adapter_model, read_checkpoint(pruned).masks_by_parameter())
    for name, param in adapter_model.named_parameters():  # streaming merge == in-memory merge, tensor by tensor
        assert torch.equal(param, reloaded.get_parameter(name)), name


def test_eval_with_the_adapter_equals_eval_of_the_merged_model(pruned_mixtral, text_file, tmp_path):
    from spp.config import EvalConfig, MergeConfig
    from spp.eval import run_eval
    from spp.merge import run_merge

    _adapter_dir(pruned_mixtral, "spp", tmp_path / "adapter")
    run_merge(MergeConfig(model=str(pruned_mixtral), adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged")))
    ppl = {}
    for name, model, extra in (("unmerged", pruned_mixtral, {"adapter": str(tmp_path / "adapter")}),
                               ("merged", tmp_path / "merged", {}), ("pruned", pruned_mixtral, {})):
        results = run_eval(EvalConfig(model=str(model), ppl=[str(text_file)], seqlen=32, max_windows=4,
                                      device="cpu", dtype="float32", **extra)).results
        (ppl[name],) = (entry["ppl"] for entry in results["perplexity"].values())
    assert ppl["unmerged"] == ppl["merged"] != ppl["pruned"]  # both run transformers' default kernel on equal weights


# --------------------------------------------------------------------------- bad inputs


def test_an_adapter_that_does_not_fit_the_experts_is_one_error_line(pruned_mixtral, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp.cli import app

    _adapter_dir(pruned_mixtral, "spp", tmp_path / "adapter")
    path = tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE
    weights = load_file(str(path))
    key = "model.layers.1.mlp.experts.gate_up_proj.spp_alpha"
    weights[key] = weights[key][:3].contiguous()  # three experts' α for a four-expert base
    save_file(weights, str(path), metadata={"format": "spp-adapter"})
    result = CliRunner().invoke(app, ["merge", "--model", str(pruned_mixtral), "--adapter", str(tmp_path / "adapter"),
                                      "--output", str(tmp_path / "merged")])
    one_line_error(result, "model.layers.1.mlp.experts.gate_up_proj", "spp_alpha (3, 4, 64)", "(4, 4, 64)")
    assert not (tmp_path / "merged").exists()
    model = AutoModelForCausalLM.from_pretrained(pruned_mixtral).eval()
    with pytest.raises(SppError, match=r"gate_up_proj.spp_alpha has shape \(3, 4, 64\), the model needs \(4, 4, 64\)"):
        load_adapter(model, tmp_path / "adapter", read_checkpoint(pruned_mixtral).masks_by_parameter())

    model = make_moe_model("mixtral")
    masks = prune_2_4(model)
    with torch.no_grad():  # expert 3 of block 1: one pruned entry that is not +0.0 in the base
        expert = model.get_parameter("model.layers.1.mlp.experts.down_proj")[3]
        row, col = (~masks["model.layers.1.mlp.experts.down_proj"][3]).nonzero()[0].tolist()
        expert[row, col] = -0.0
    with pytest.raises(SppError, match=r"^model.layers.1.mlp.experts.down_proj: 1 entries the mask marks pruned are "
                                       r"not \+0.0 in the base weight"):
        add_adapter(model, adapter_cfg("spp"), masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())

    with pytest.raises(SppError, match=r"model.layers.0.mlp.experts.gate_up_proj \(expert 0\) has 96 output rows, "
                                       r"fewer than spp_row_groups=100"):
        add_adapter(model, adapter_cfg("spp", spp_row_groups=100, target_modules=["mlp.experts.*"]))
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())  # nothing changed
