"""RIA's channel permutation for N:M (`spp.prune.permute`): the heuristic against the identity, the fold against
the unfolded model (every family it applies to, GQA, biases), the families it leaves alone, and `spp prune
--permute-channels` end to end: every saved weight exactly N:M, `spp verify` passing, bad combinations one line."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_CONFIGS, one_line_error
from spp.models import decoder_targets, find_decoder_blocks
from spp.prune.dsnot import accumulate_input_sums
from spp.prune.permute import (assignment_refinement, channel_permutation, head_permutation, kept_score, legal_folds,
                               permute_block, permute_inputs)
from spp.prune.sparsegpt import accumulate_hessian
from test_owl_ria import calib, invoke, model_dir, prune_flags  # noqa: F401 (fixtures)
from test_prune import saved_tensors


def tiny(arch: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY_CONFIGS[arch], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


# --------------------------------------------------------------------------- the heuristic


def test_the_heuristic_spreads_heavy_channels_and_keeps_more_score():
    """Four heavy channels side by side share one group's two places; spread, each group keeps one."""
    g = torch.Generator().manual_seed(0)
    S = torch.rand(16, 32, generator=g)
    S[:, :4] += 10
    P = channel_permutation(S, 2, 4)
    assert sorted(P.tolist()) == list(range(32))
    assert kept_score(S[:, P], 2, 4) > kept_score(S, 2, 4) + 16 * 2 * 9  # two more heavy weights kept per row
    groups = P.reshape(8, 4)
    assert all(int((row < 4).sum()) <= 1 for row in groups)  # no two heavy channels in one group


@settings(max_examples=100, deadline=None)
@given(nm=st.sampled_from([(1, 4), (2, 4), (4, 8)]), rows=st.integers(1, 12), groups=st.integers(1, 10),
       seed=st.integers(0, 2**31 - 1))
def test_the_permutation_never_keeps_less_than_the_identity(nm, rows, groups, seed):
    n, m = nm
    S = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    P = channel_permutation(S, n, m)
    assert sorted(P.tolist()) == list(range(groups * m))
    assert kept_score(S[:, P], n, m) >= kept_score(S, n, m)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8)])
def test_the_assignment_step_keeps_more_and_is_optimal_at_the_position_it_solved_last(n, m):
    """The refinement never keeps less than its start; at the last position it solves (k = M − 1; earlier ones
    change as their groups' other channels move), no exchange of two channels between groups keeps more."""
    S = torch.rand(5, 6 * m, generator=torch.Generator().manual_seed(n * m), dtype=torch.float64)
    start = torch.randperm(6 * m, generator=torch.Generator().manual_seed(1))
    P = assignment_refinement(S, start, n, m)
    assert sorted(P.tolist()) == list(range(6 * m))
    best = kept_score(S[:, P], n, m)
    assert best >= kept_score(S[:, start], n, m)
    k = m - 1
    for g in range(6):
        for h in range(g + 1, 6):
            Q = P.clone()
            Q[[g * m + k, h * m + k]] = Q[[h * m + k, g * m + k]]
            assert kept_score(S[:, Q], n, m) <= best + 1e-12


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_o_proj_permutations_stay_within_heads_and_are_shared_by_a_kv_heads_query_heads(kv_heads):
    heads, head_dim = 4, 8
    S = torch.rand(6, heads * head_dim, generator=torch.Generator().manual_seed(kv_heads))
    S.view(6, heads, head_dim)[:, :, :3] += 5  # three heavy dims at the start of every head: one group keeps two
    P, R = head_permutation(S, 2, 4, head_dim, heads // kv_heads)
    assert sorted(R.tolist()) == list(range(kv_heads * head_dim)) and sorted(P.tolist()) == list(range(heads * head_dim))
    for h in range(heads):
        g = h // (heads // kv_heads)
        pi = R[g * head_dim:(g + 1) * head_dim] - g * head_dim  # kv head g's permutation of its value dims
        assert torch.equal(P[h * head_dim:(h + 1) * head_dim] - h * head_dim, pi)
    assert kept_score(S[:, P], 2, 4) > kept_score(S, 2, 4)


# --------------------------------------------------------------------------- the fold


FOLDING = [("llama", {}), ("llama", dict(num_key_value_heads=4)), ("llama", dict(num_key_value_heads=1)),
           ("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen2", {}), ("qwen3", {}), ("gemma2", {}),
           ("mistral", {})]


@pytest.mark.parametrize("arch,overrides", FOLDING, ids=[f"{a}-{'-'.join(o) or 'gqa'}" for a, o in FOLDING])
def test_folding_leaves_the_model_function_unchanged(arch, overrides):
    """Folded and unpruned, the logits equal the original's to float64 rounding; o_proj and down_proj of every
    block were permuted (their weights moved), and each statistic moved with its columns."""
    model = tiny(arch, **overrides)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    _, blocks = find_decoder_blocks(model)
    for block, targets in zip(blocks, decoder_targets(model)):
        assert sorted(f.consumer for f in legal_folds(block)) == ["mlp.down_proj", "self_attn.o_proj"]
        old = {n: t.weight.detach().clone() for n, t in targets.items()}
        stats = {n: torch.rand(t.weight.shape[1], dtype=torch.float64) for n, t in targets.items()}
        for x in stats.values():  # three loud inputs side by side in every 8 (every head): worth moving apart
            x.view(-1, 8)[:, :3] *= 100
        stats_before = dict(stats)
        done = permute_block(block, targets, stats, "ria", (2, 4))
        assert set(done) == {targets["mlp.down_proj"].name, targets["self_attn.o_proj"].name}
        for name in ("mlp.down_proj", "self_attn.o_proj"):
            P = done[targets[name].name]
            assert torch.equal(targets[name].weight, old[name][:, P]) and not torch.equal(P, torch.arange(P.numel()))
            assert torch.equal(stats[name], stats_before[name][P])
        for name in ("self_attn.q_proj", "self_attn.k_proj"):  # the residual stream's readers stay as they were
            assert torch.equal(targets[name].weight, old[name])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "opt", "gpt_neox"])
def test_nothing_folds_where_the_producer_is_fused_transposed_or_unnamed(arch):
    """GPT-2's Conv1D c_fc/c_proj, Phi-3's fused gate_up_proj and qkv_proj, OPT's and GPT-NeoX's own names."""
    model = tiny(arch)
    _, blocks = find_decoder_blocks(model)
    assert legal_folds(blocks[0]) == []


# --------------------------------------------------------------------------- spp prune --permute-channels


@pytest.mark.parametrize("method,pattern", [("ria", "2:4"), ("wanda", "2:4")])
def test_prune_with_permuted_channels_saves_an_exact_n_m_pattern_that_verifies(method, pattern, model_dir, calib,
                                                                                 tmp_path):
    n, m = (int(x) for x in pattern.split(":"))
    plain, permuted = tmp_path / "plain", tmp_path / "permuted"
    flags = ("--method", method, "--pattern", pattern)
    assert invoke(*prune_flags(model_dir, calib, plain, *flags)).exit_code == 0
    result = invoke(*prune_flags(model_dir, calib, permuted, *flags, "--permute-channels"))
    assert result.exit_code == 0, result.output
    assert invoke("verify", permuted).exit_code == 0
    saved, before = saved_tensors(permuted), saved_tensors(plain)
    for name, W in saved.items():
        if "layers" in name and name.endswith("_proj.weight"):
            nonzero = (W != 0).reshape(W.shape[0], -1, m).sum(-1)
            assert int(nonzero.max()) <= n, name  # at most N in every group of M in the saved layout
    changed = {name for name in saved if not torch.equal(saved[name], before[name])}
    assert any("o_proj" in c for c in changed) and any("down_proj" in c for c in changed)
    # block 0's residual readers saw the same inputs and were not permuted; later blocks see other pruned inputs
    assert not any(k in c for c in changed for k in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                                                       "embed", "norm"))


def test_permuted_statistics_are_those_of_the_permuted_inputs():
    """Every statistic a layer can hold (Σx², DSnoT's sums, the Hessian sum), permuted, equals the statistic of the
    inputs with their channels in the new order."""
    X = torch.randn(50, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    state = {"sums": accumulate_input_sums(None, X), "hessian": accumulate_hessian(None, X)}
    moved, expected = permute_inputs(state, P), {"sums": accumulate_input_sums(None, X[:, P]),
                                                  "hessian": accumulate_hessian(None, X[:, P])}
    for key in expected:
        for a, b in zip(moved[key], expected[key]):
            assert a == b if isinstance(a, int) else torch.equal(a, b), key


@pytest.mark.parametrize("extra", [("--refine", "dsnot"), ("--record-error",)])
def test_permute_channels_with_dsnot_or_the_recorded_error(extra, model_dir, calib, tmp_path):
    """Both hold more than Σx² per layer (DSnoT's sums and H; H), all permuted with the channels: the run used to
    stop with a traceback."""
    out = tmp_path / "out"
    result = invoke(*prune_flags(model_dir, calib, out, "--method", "wanda", "--pattern", "2:4", "--permute-channels",
                                 *extra))
    assert result.exit_code == 0, result.output
    assert invoke("verify", out).exit_code == 0
    assert "reconstruction error" in result.output


@pytest.mark.parametrize("extra", [("--method", "ria"), ("--method", "sparsegpt", "--pattern", "2:4"),
                                   ("--method", "magnitude", "--pattern", "2:4")])
def test_permute_channels_needs_n_m_and_a_score_method(extra, model_dir, calib, tmp_path):
    result = invoke(*prune_flags(model_dir, calib, tmp_path / "out", *extra, "--permute-channels"))
    one_line_error(result, "--permute-channels needs --pattern N:M and --method ria or wanda")
    assert not (tmp_path / "out").exists()
