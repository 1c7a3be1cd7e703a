"""spp.report: the numbers the `spp run` report gives (weight sparsity counted in the saved tensors)."""

import json

import pytest
from safetensors.torch import load_file

from conftest import saved_moe
from test_pipeline import cli


def test_sparsity_counts_the_weights_left_dense(tmp_path, shared_data, corpus):
    """`--ignore 'mlp.experts.*'` prunes attention only: eval and the `spp run` report count the dense experts as
    kept, rather than reporting the masked weights' 50% as the model's sparsity."""
    from spp.report import _mask_names, weight_sparsity

    dense = saved_moe(tmp_path / "dense", "mixtral", shared_data)
    cli("prune", "--model", dense, "--method", "magnitude", "--pattern", "2:4", "--ignore", "mlp.experts.*",
        "--output", tmp_path / "pruned")
    state = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    attention = sum(t.numel() for n, t in state.items() if "self_attn" in n and n.endswith("proj.weight"))
    experts = sum(t.numel() for n, t in state.items() if ".experts." in n)
    expected = attention / 2 / (attention + experts)
    result = cli("eval", "--model", tmp_path / "pruned", "--ppl", corpus, "--seqlen", 64, "--max-windows", 1,
                 "--device", "cpu", "--output", tmp_path / "eval")
    sparsity = json.loads((tmp_path / "eval" / "results.json").read_text())["sparsity"]
    assert sparsity["sparsity"] == pytest.approx(expected) and sparsity["masked_sparsity"] == 0.5
    assert sparsity["dense_tensors"] == 2 * 3 * 4 and "24 tensors dense" in result.output
    assert weight_sparsity(tmp_path / "pruned", _mask_names(tmp_path / "pruned")) == pytest.approx(expected)
