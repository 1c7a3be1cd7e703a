"""Properties of the mask math (spp.prune.masks) and the bit-packed mask file, checked against plain formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spp.errors import SppError
from spp.io.maskfile import load_masks, pack_bits, save_masks, unpack_bits
from spp.prune.masks import apply_mask, is_nm_valid, nm_mask, parse_pattern, unstructured_mask

PATTERNS = [(1, 4), (2, 4), (4, 8)]


@st.composite
def score_matrices(draw, m: int = 1, ties: bool = False):
    """(out, in) float scores with in divisible by m; with `ties`, few distinct values so ties are common."""
    out_features = draw(st.integers(1, 6))
    in_features = m * draw(st.integers(1, 12 if m > 1 else 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (out_features, in_features), generator=g).float()
    return torch.randn(out_features, in_features, generator=g)


def _lower_index_pruned_first(scores: torch.Tensor, keep: torch.Tensor) -> bool:
    """Among equal scores in a row, a pruned entry never sits right of a kept one."""
    for row_s, row_k in zip(scores.tolist(), keep.tolist()):
        for value in set(row_s):
            flags = [k for s, k in zip(row_s, row_k) if s == value]
            if flags != sorted(flags):  # False (pruned) must all come before True (kept)
                return False
    return True


@settings(max_examples=60, deadline=None)
@given(scores=score_matrices(), sparsity=st.floats(0, 0.999))
def test_unstructured_per_row_counts_and_order(scores, sparsity):
    keep = unstructured_mask(scores, sparsity, per_row=True)
    k = math.floor(scores.shape[1] * sparsity + 1e-9)
    assert (~keep).sum(1).tolist() == [k] * scores.shape[0]
    for s, kp in zip(scores, keep):  # every pruned score is at most every kept score of the row
        if 0 < k < len(s):
            assert s[~kp].max() <= s[kp].min()


@settings(max_examples=60, deadline=None)
@given(scores=score_matrices(), sparsity=st.floats(0, 0.999))
def test_unstructured_one_threshold_per_matrix(scores, sparsity):
    keep = unstructured_mask(scores, sparsity, per_row=False)
    k = math.floor(scores.numel() * sparsity + 1e-9)
    assert int((~keep).sum()) == k
    if 0 < k < scores.numel():
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m", PATTERNS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_nm_keeps_exactly_n_per_group(n, m, data):
    scores = data.draw(score_matrices(m=m))
    keep = nm_mask(scores, n, m)
    groups_keep = keep.reshape(scores.shape[0], -1, m)  # (out, in/M, M)
    groups_score = scores.reshape(scores.shape[0], -1, m)
    assert (groups_keep.sum(-1) == n).all()
    assert is_nm_valid(keep, n, m)
    kept_min = torch.where(groups_keep, groups_score, torch.tensor(float("inf"))).amin(-1)
    pruned_max = torch.where(~groups_keep, groups_score, torch.tensor(float("-inf"))).amax(-1)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("n,m", PATTERNS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_nm_ties_prune_lower_index_first(n, m, data):
    scores = data.draw(score_matrices(m=m, ties=True))
    keep = nm_mask(scores, n, m)
    out_features = scores.shape[0]
    assert _lower_index_pruned_first(scores.reshape(-1, m), keep.reshape(-1, m))
    assert torch.equal(keep, nm_mask(scores.clone(), n, m))  # deterministic
    assert keep.reshape(out_features, -1, m).sum(-1).eq(n).all()


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 4), (4, 8), (7, 8), (8, 16)])  # both sides of SMALL_GROUP
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rows", [5, 2048])  # few groups (kthvalue) and many (pairwise ranks, up to M = 8)
def test_nm_equals_stable_sort(n, m, ties, rows):
    """The mask equals pruning the first M − N of each group's stable ascending sort, by either ranking path."""
    g = torch.Generator().manual_seed(n * 100 + m)
    shape = (rows, 6 * m)
    scores = torch.randint(0, 3, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
    order = scores.reshape(rows, 6, m).argsort(dim=-1, stable=True)
    expected = torch.ones(rows, 6, m, dtype=torch.bool).scatter_(-1, order[..., : m - n], False)
    assert torch.equal(nm_mask(scores, n, m), expected.reshape(shape))


@settings(max_examples=40, deadline=None)
@given(scores=score_matrices(ties=True), sparsity=st.floats(0, 0.999))
def test_unstructured_ties_prune_lower_index_first(scores, sparsity):
    assert _lower_index_pruned_first(scores, unstructured_mask(scores, sparsity, per_row=True))
    flat_keep = unstructured_mask(scores, sparsity, per_row=False)
    assert _lower_index_pruned_first(scores.reshape(1, -1), flat_keep.reshape(1, -1))


def test_all_equal_scores_prune_the_first_columns():
    keep = nm_mask(torch.ones(2, 8), 1, 4)
    assert keep.tolist() == [[False, False, False, True] * 2] * 2
    assert unstructured_mask(torch.ones(1, 5), 0.4).tolist() == [[False, False, True, True, True]]


def test_magnitude_2_4_hand_worked():
    W = torch.tensor([
        [0.9, -0.1, 0.3, -0.5, 0.0, 2.0, -2.0, 1.0],
        [-0.2, 0.2, -0.7, 0.1, 0.5, -0.5, 0.6, -0.6],
    ])
    # Row 0, group 1: |0.9| and |-0.5| win. Group 2: |2.0| and |-2.0| win.
    # Row 1, group 1: |-0.7| and then a tie |-0.2| = |0.2|: the lower index (col 0) is pruned, col 1 kept.
    # Row 1, group 2: |0.5| = |-0.5| < |0.6| = |-0.6|: keep cols 6 and 7.
    expected = torch.tensor([
        [0.9, 0.0, 0.0, -0.5, 0.0, 2.0, -2.0, 0.0],
        [0.0, 0.2, -0.7, 0.0, 0.0, 0.0, 0.6, -0.6],
    ])
    pruned = apply_mask(W, nm_mask(W.abs(), 2, 4))
    assert torch.equal(pruned, expected)
    assert not torch.signbit(pruned[expected == 0]).any()  # +0.0 even where W was negative


@pytest.mark.parametrize("pattern", ["2:5x", "0:4", "5:4", "4:4", ":4", "2/4", "-1:4"])
def test_malformed_patterns(pattern):
    with pytest.raises(SppError, match="--pattern"):
        parse_pattern(pattern)


def test_nm_needs_divisible_inputs():
    with pytest.raises(SppError, match="not divisible by M=4"):
        nm_mask(torch.randn(2, 6), 2, 4)


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 9), in_features=st.integers(1, 70), seed=st.integers(0, 1000))
def test_pack_unpack_roundtrip(out_features, in_features, seed):
    mask = torch.rand(out_features, in_features, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, math.ceil(in_features / 8))
    assert torch.equal(unpack_bits(packed, in_features), mask)
    for col in range(min(in_features, 16)):  # bit i of byte k is column 8k + i
        assert bool((int(packed[0, col // 8]) >> (col % 8)) & 1) == bool(mask[0, col])


@pytest.mark.parametrize("layout,shape", [("linear", (12, 40)), ("conv1d", (40, 12)), ("linear", (3, 13))])
def test_mask_file_roundtrip_and_size(tmp_path, layout, shape):
    from safetensors.torch import load_file

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    path = tmp_path / "masks.safetensors"
    save_masks(path, {"w": mask}, {"w": layout})
    masks, layouts = load_masks(path)
    assert torch.equal(masks["w"], mask) and layouts["w"] == layout
    packed = load_file(str(path))["w"]
    out_features = shape[1] if layout == "conv1d" else shape[0]
    assert packed.numel() <= mask.numel() / 8 + out_features  # at most one padding byte per row
