"""The SPP adapter: layer math against the naive formula, dtypes, layouts, and model wrapping."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import weight_out_in
from spp.adapter import ADAPTERS, DEFAULT_LEARNING_RATE
from spp.adapter.config import AdapterConfig
from spp.adapter.layer import effective_weight, expand_rows, row_blocks, spp_delta, spp_merge_weight
from spp.adapter.model import (adapter_state_dict, add_adapter, count_trainable, load_adapter, merge_adapter,
                               save_adapter)
from spp.adapter.weight import AdaptedFunction, AdaptedWeight
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from spp.prune.masks import apply_mask, unstructured_mask

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
