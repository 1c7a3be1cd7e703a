"""The one +0.0 check and the sparsity counts (spp.sparsity), and the plain-text helpers (spp.io.text)."""

from __future__ import annotations

import pytest
import torch

from spp.errors import SppError
from spp.io.text import markdown_table, natural_key
from spp.sparsity import block_tallies, check_pruned_zero, mask_stats, sparsity_stats, tally


def test_check_pruned_zero_is_bitwise_and_names_the_first_offender():
    keep = torch.tensor([[True, False, False], [False, True, False]])
    W = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    check_pruned_zero(W, keep, lambda *_: "unused")  # every pruned entry +0.0; kept entries may be anything
    W[1, 2] = -0.0
    W[0, 2] = float("nan")
    seen = []
    with pytest.raises(SppError, match="^2 at \\(0, 2\\)$"):
        check_pruned_zero(W, keep, lambda count, first: seen.append(first) or f"{count} at {first}")
    assert seen == [(0, 2)]
    with pytest.raises(RuntimeError):
        check_pruned_zero(W, keep, lambda *_: "bug", error=RuntimeError)
    W[0, 2] = 0.0
    check_pruned_zero(W, keep, lambda *_: "unused", signed=False)  # the value zero only: -0.0 passes
    W[0, 1] = 0.5
    with pytest.raises(SppError, match="^1$"):
        check_pruned_zero(W, keep, lambda count, _: str(count), signed=False)


def test_tallies_add_up_per_tensor_and_per_block():
    keep = torch.tensor([[True, False], [True, True]])
    W = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert mask_stats(keep) == {"numel": 4, "pruned": 1, "sparsity": 0.25}
    assert sparsity_stats(W, keep) == {"numel": 4, "pruned": 1, "sparsity": 0.25, "kept_zero": 2}
    stats = {"model.layers.1.mlp.weight": sparsity_stats(W, keep), "model.layers.0.q.weight": mask_stats(~keep),
             "model.layers.1.o.weight": mask_stats(keep)}
    assert tally(stats.values()) == {"numel": 12, "pruned": 5, "sparsity": 5 / 12, "kept_zero": 2}
    assert tally([]) == {"numel": 0, "pruned": 0, "sparsity": 0.0, "kept_zero": 0}
    assert block_tallies(stats) == {"model.layers.1": {"numel": 8, "pruned": 2}, "model.layers.0": {"numel": 4, "pruned": 3}}


def test_natural_key_orders_numbers_numerically_and_compares_any_two_names():
    names = ["model.layers.10", "model.layers.2", "model.layers.norm", "lm_head", "model.layers.2.mlp"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.2", "model.layers.2.mlp", "model.layers.10",
                                              "model.layers.norm"]


def test_markdown_table_plain_and_padded():
    assert markdown_table(["a", "bb"], [["x", "1"]]) == "| a | bb |\n|:---|---:|\n| x | 1 |"
    assert markdown_table(["metric", "run"], [["ppl", "1.5"]], "-r", pad=True) == (
        "| metric | run |\n|--------|----:|\n| ppl    | 1.5 |")
