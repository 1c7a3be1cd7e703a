"""`spp eval --sparse-kernels` (spp.eval.sparse_kernels): the checks that run on any machine.

The conversion and the timing need a CUDA GPU (cuSPARSELt); `scripts/gpu_check.py` (its kernels and e2e rows) measures them there.
Here: the 2:4 check against a loop, each refusal as one line, and that a valid 2:4 model reaches the CUDA check.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from spp.cli import app
from spp.errors import SppError
from spp.eval.sparse_kernels import nm_violations, refusal
from spp.io.reader import read_checkpoint

from conftest import make_moe_model, one_line_error, save_tiny_stories_llama
from test_reader import _saved


def nm_violations_loop(keep, n=2, m=4):
    count = 0
    for row in keep.tolist():
        for g in range(0, len(row), m):
            count += sum(row[g : g + m]) > n
    return count


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 2**16), density=st.floats(0, 1))
def test_nm_violations_equals_a_loop(rows, groups, seed, density):
    keep = torch.rand(rows, 4 * groups, generator=torch.Generator().manual_seed(seed)) < density
    assert nm_violations(keep) == nm_violations_loop(keep)


def test_refusals_name_the_layer():
    ok = torch.tensor([[1, 1, 0, 0] * 4] * 16, dtype=torch.bool)
    assert refusal("w", ok, "linear", torch.bfloat16) is None
    assert "not a 2-D nn.Linear" in refusal("w", ok, "conv1d", torch.float16)
    assert "multiples of (16, 16)" in refusal("w", ok[:8], "linear", torch.float16)
    three = ok.clone()
    three[0, 2] = True
    assert "1 groups of 4 inputs keep more than 2" in refusal("w", three, "linear", torch.bfloat16)


@pytest.fixture(scope="module")
def pruned_24(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("kernels")
    save_tiny_stories_llama(root / "dense", shared_data)
    for name, pattern in (("p24", "2:4"), ("p50", "unstructured")):
        result = CliRunner().invoke(app, ["prune", "--model", str(root / "dense"), "--method", "magnitude",
                                          "--pattern", pattern, "--output", str(root / name)])
        assert result.exit_code == 0, result.output
    return root


def kernels(root, model, *extra, text):
    return CliRunner().invoke(app, ["eval", "--model", str(root / model), "--ppl", str(text),
                                    "--seqlen", "64", "--max-windows", "1", "--device", "cpu", "--sparse-kernels",
                                    *extra])


def test_bad_inputs_are_refused_before_loading(pruned_24, text_file):
    one_line_error(kernels(pruned_24, "p24", text=text_file), "--dtype float16 or bfloat16")
    one_line_error(kernels(pruned_24, "p50", "--dtype", "bfloat16", text=text_file), "is not 2:4 sparse")
    one_line_error(kernels(pruned_24, "dense", "--dtype", "float16", text=text_file), "masks.safetensors")
    one_line_error(kernels(pruned_24, "p24", "--dtype", "bfloat16", text=text_file), "needs a CUDA GPU")


# --------------------------------------------------------------------------- mixture of experts


def test_sparse_kernels_leave_expert_weights_dense(tmp_path):
    """cuSPARSELt takes 2-D weights: unstructured expert masks do not stop the 2:4 attention linears (the check
    reaches the CUDA test, the last one), while a non-2:4 attention mask still does."""
    from spp.eval.sparse_kernels import check_sparse_kernels
    from spp.io.maskfile import save_masks
    from spp.prune.masks import nm_mask

    model = make_moe_model("mixtral")
    ckpt = _saved(model, tmp_path / "m")
    torch.manual_seed(0)
    entries = {}
    for name, param in model.named_parameters():
        if param.dim() == 3:
            entries.update(ckpt.split(name, torch.rand(param.shape) > 0.3))
    q = "model.layers.0.self_attn.q_proj.weight"
    entries[ckpt.saved_name(q)] = nm_mask(model.get_parameter(q).detach().abs(), 2, 4)
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="needs a CUDA GPU"):
        check_sparse_kernels(read_checkpoint(tmp_path / "m"), "bfloat16", None, torch.device("cpu"))
    entries[ckpt.saved_name(q)] = torch.ones_like(entries[ckpt.saved_name(q)])
    save_masks(tmp_path / "m" / "masks.safetensors", entries, {k: "linear" for k in entries})
    with pytest.raises(SppError, match="q_proj.weight is not 2:4 sparse"):
        check_sparse_kernels(read_checkpoint(tmp_path / "m"), "bfloat16", None, torch.device("cpu"))
