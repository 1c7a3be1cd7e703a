"""ALPS and the reconstruction objective (spp.prune.alps, spp.prune.reconstruction) on small seeded layers, float64."""

from __future__ import annotations

import pytest
import torch

from spp.errors import SppError
from spp.prune.alps import alps_prune
from spp.prune.masks import is_nm_valid, pruned_count
from spp.prune.reconstruction import reconstruction_error, resolve_on_support
from spp.prune.sparsegpt import accumulate_hessian, hessian_from_sum, sparsegpt_prune


def layer(seed: int, out_features: int = 16, in_features: int = 32, tokens: int = 512):
    """(W, X, H): correlated inputs with a few heavy channels, H = 2XᵀX/T, all float64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_features, dtype=torch.float64) + 0.3 * torch.randn(in_features, in_features, generator=g,
                                                                          dtype=torch.float64)
    X = torch.randn(tokens, in_features, generator=g, dtype=torch.float64) @ mix
    X[:, :3] *= 8.0  # heavy channels
    W = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    return W, X, 2 * X.t() @ X / tokens  # float64 (accumulate_hessian sums in float32)


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), (None, 0.7), (None, 0.33), ((2, 4), 0.5), ((1, 4), 0.75),
                                              ((4, 8), 0.5)])
def test_alps_pattern_is_exact(pattern, sparsity):
    W, _, H = layer(0)
    W_hat, keep, info = alps_prune(W, H, pattern, sparsity)
    if pattern is None:  # one budget for the whole layer, as the paper projects
        assert int((~keep).sum()) == pruned_count(W.numel(), sparsity)
    else:
        n, m = pattern
        assert is_nm_valid(keep, n, m) and (keep.reshape(16, -1, m).sum(-1) == n).all()
    assert (W_hat[~keep] == 0).all() and not torch.signbit(W_hat[~keep]).any()
    assert W_hat.dtype == W.dtype and info["percdamp_used"] == 0.01 and info["admm_iterations"] >= 3


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5)])
def test_alps_error_is_at_most_sparsegpts(pattern, sparsity):
    for seed in range(5):
        W, _, H = layer(seed)
        W_sgpt, _, _ = sparsegpt_prune(W, H, pattern, sparsity, blocksize=8)
        W_alps, _, _ = alps_prune(W, H, pattern, sparsity)
        assert reconstruction_error(W, W_alps, H) <= reconstruction_error(W, W_sgpt, H), seed


def test_after_pcg_the_kept_weights_are_the_least_squares_optimum():
    """With no dampening and enough PCG steps, the gradient 2(Ŵ − W)H vanishes on the kept entries: a direct solve."""
    W, X, H = layer(1, out_features=6, in_features=16)
    W_hat, keep, _ = alps_prune(W, H, None, 0.6, percdamp=0.0, pcg_steps=200, pcg_rtol=1e-13)
    grad = 2 * (W_hat - W) @ H  # (out, in): ∂/∂Ŵ tr((W − Ŵ)H(W − Ŵ)ᵀ)
    assert grad[keep].abs().max() < 1e-8 * grad.abs().max().clamp_min(1.0) + 1e-8
    for i in range(W.shape[0]):
        S = keep[i]
        direct = torch.linalg.solve(H[S][:, S], (H @ W[i])[S])  # H_SS ŵ_S = (H w)_S
        torch.testing.assert_close(W_hat[i, S], direct, rtol=1e-9, atol=1e-9)
    # the same optimum written with X: ‖X(W − Ŵ)ᵀ‖² has zero gradient on the support
    grad_X = -2 * ((X @ (W - W_hat).t()).t() @ X)
    assert grad_X[keep].abs().max() < 1e-6 * grad_X.abs().max()


def test_resolve_on_support_matches_a_direct_solve_for_any_mask():
    W, _, H = layer(2, out_features=5, in_features=12)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    W_hat, steps = resolve_on_support(W, H, keep, steps=100, rtol=1e-13)
    assert 0 < steps <= 12 + 1 and (W_hat[~keep] == 0).all()  # CG is exact in at most |S| steps, up to rounding
    for i in range(W.shape[0]):
        S = keep[i]
        torch.testing.assert_close(W_hat[i, S], torch.linalg.solve(H[S][:, S], (H @ W[i])[S]), rtol=1e-9, atol=1e-9)
    assert resolve_on_support(W, H, keep, steps=0)[1] == 0


def test_reconstruction_error_from_H_equals_the_direct_computation_from_X():
    W, X, H = layer(4, out_features=7, in_features=20)
    W_hat = torch.where(torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) < 0.5, W, 0.0) * 1.1
    direct = ((X @ (W - W_hat).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum()
    assert reconstruction_error(W, W_hat, H) == pytest.approx(float(direct), rel=1e-10)
    H32 = hessian_from_sum(*accumulate_hessian(None, X))  # the statistics the block driver gathers, float32
    assert reconstruction_error(W.float(), W_hat.float(), H32) == pytest.approx(float(direct), rel=1e-4)
    assert reconstruction_error(W, W, H) == 0.0 and reconstruction_error(W, torch.zeros_like(W), H) == pytest.approx(1)
    assert reconstruction_error(torch.zeros_like(W), W_hat, H) == 0.0  # nothing to reconstruct


def test_alps_retries_dampening_and_reports_unusable_hessians_in_one_line():
    W = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = torch.eye(4, dtype=torch.float64)
    H[0, 1] = H[1, 0] = 1.5  # indefinite until the dampening exceeds 0.5, as in SparseGPT's test
    _, _, info = alps_prune(W, H, None, 0.5)
    assert info["percdamp_used"] == pytest.approx(1.0)
    nan = torch.eye(4, dtype=torch.float64)
    nan[2, 2] = float("nan")
    for bad, words in ((-torch.eye(4, dtype=torch.float64), "not positive definite"), (nan, "non-finite")):
        with pytest.raises(SppError, match=words) as exc:
            alps_prune(W, bad, None, 0.5)
        assert "\n" not in str(exc.value)


def test_alps_drops_dead_inputs_and_keeps_the_float32_path():
    W, X, H = layer(6)
    H[5, :] = H[:, 5] = 0.0  # input 5 was always zero
    W_hat, keep, _ = alps_prune(W.float(), H.float(), (2, 4), 0.5)
    assert W_hat.dtype == torch.float32 and not keep[:, 5].any()
    assert reconstruction_error(W, W_hat.double(), H) < 0.5


def test_the_fast_projection_equals_the_mask_selection_with_ties():
    from spp.prune.alps import _project
    from spp.prune.masks import unstructured_mask

    g = torch.Generator().manual_seed(7)
    for scores in (torch.rand(9, 16, generator=g), torch.randint(0, 4, (9, 16), generator=g).double()):
        for s in (0.0, 0.3, 0.5, 0.9):
            assert torch.equal(_project(scores, None, s), unstructured_mask(scores, s, per_row=False))
