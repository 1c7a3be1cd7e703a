"""Non-finite weights (issue 23, item 2): every stage that reads weights refuses a NaN or ±inf in one line naming
the tensor and the count, and eval reports a non-finite perplexity as a failure, never as a number (`spp verify`'s
check is in test_verify)."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import one_line_error, save_tiny_stories_llama
from spp.cli import app
from spp.config import TrainConfig, merge_into
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, MASK_FILE, partial_path
from spp.io.finite import check_finite
from spp.io.maskfile import load_masks

DOWN = "model.layers.1.mlp.down_proj.weight"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def set_entry(directory: Path, name: str, value: float, index: tuple | None = None, pattern: str = "*.safetensors"):
    """Write `value` into one entry of the saved tensor `name` (its first kept entry, per the mask file, when no
    index is given), in place, keeping the shard's metadata. Returns the index written."""
    mask_file = directory / MASK_FILE
    masks = load_masks(mask_file)[0] if mask_file.is_file() else {}
    for shard in sorted(directory.glob(pattern)):
        if shard == mask_file:
            continue
        with safe_open(str(shard), "pt") as f:
            if name not in f.keys():
                continue
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if index is None:
            index = tuple(int(i) for i in masks[name].nonzero()[0]) if name in masks else (0,) * tensors[name].dim()
        tensors[name][index] = value
        save_file(tensors, str(shard), metadata=metadata)
        return index
    raise AssertionError(f"no shard of {directory} holds {name}")


def corrupt_copy(source: Path, destination: Path, name: str = DOWN, value: float = math.nan, **kw) -> Path:
    shutil.copytree(source, destination)
    set_entry(destination, name, value, **kw)
    return destination


@pytest.fixture(scope="module")
def stories_llama(tmp_path_factory, shared_data) -> Path:
    """A user's dense checkpoint (read-only: tests corrupt copies of it)."""
    return save_tiny_stories_llama(tmp_path_factory.mktemp("dense") / "model", shared_data)


# --------------------------------------------------------------------------- the rule


def test_check_finite_counts_only_what_is_not_finite_and_names_the_first():
    weight = torch.zeros(4, 6)
    check_finite(weight, "w", "here")  # finite: nothing
    check_finite(torch.tensor([1, 2]), "ids", "here")  # integers are always finite
    weight[3, 5], weight[1, 2], weight[2, 0] = math.nan, math.inf, -math.inf
    with pytest.raises(SppError, match=r"^here: w \(float32 \(4, 6\)\) has 3 non-finite entries \(1 NaN, 2 ±inf; "
                                       r"first at \(1, 2\)\); "):
        check_finite(weight, "w", "here")
    with pytest.raises(SppError, match=r"bfloat16 \(2,\)\) has 1 non-finite entry "):
        check_finite(torch.tensor([0.0, math.nan]).to(torch.bfloat16), "w", "here")
    with pytest.raises(SppError, match=r"first at \(0,\); float16 ends at ±65504, "):
        check_finite(torch.tensor([1e6]).to(torch.float16), "w", "here")
    if hasattr(torch, "float8_e4m3fn"):  # no isfinite kernel for it: NaN is its only non-finite value
        check_finite(torch.tensor([448.0]).to(torch.float8_e4m3fn), "w", "here")
        with pytest.raises(SppError, match="1 NaN"):
            check_finite(torch.tensor([math.nan]).to(torch.float8_e4m3fn), "w", "here")


def test_check_finite_finds_an_entry_past_its_first_chunk():
    from spp.io.finite import _CHUNK

    weight = torch.zeros(3, _CHUNK // 2 + 1)  # checked in chunks; the last one is short
    check_finite(weight, "w", "here")
    weight[2, -1] = math.inf
    with pytest.raises(SppError, match=rf"has 1 non-finite entry \(0 NaN, 1 ±inf; first at \(2, {_CHUNK // 2}\)\)"):
        check_finite(weight, "w", "here")


# --------------------------------------------------------------------------- prune


@pytest.mark.parametrize("method,value", [("sparsegpt", math.nan), ("magnitude", -math.inf)])
def test_prune_refuses_a_non_finite_input_weight(stories_llama, text_file, tmp_path, method, value):
    model = corrupt_copy(stories_llama, tmp_path / "model", value=value, index=(3, 5))
    out = tmp_path / "out"
    result = cli("prune", "--model", model, "--method", method, "--calib", text_file, "--nsamples", 2,
                 "--seqlen", 16, "--device", "cpu", "--output", out)
    one_line_error(result, DOWN, "1 non-finite entry", "first at (3, 5)", str(model))
    assert not out.exists() and not partial_path(out).exists()


# --------------------------------------------------------------------------- train


def _train_cfg(base, data, output, **overrides) -> TrainConfig:
    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(output), cutoff_len=16,
                    micro_batch_size=4, batch_size=4, max_steps=1, val_set_size=0, data_format="text")
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


@pytest.mark.parametrize("case", ["base", "base, fsdp", "teacher"])
def test_train_refuses_a_non_finite_base_or_teacher_weight(pruned_tiny_dir, text_file, tmp_path, case):
    from spp.train import run_train

    broken = corrupt_copy(pruned_tiny_dir, tmp_path / "broken")
    base, extra = (pruned_tiny_dir, {"teacher": str(broken), "kd_weight": 1.0}) if case == "teacher" else (broken, {})
    if case == "base, fsdp":  # one rank, in process: the weights are read block by block, not by from_pretrained
        extra["distributed"] = "fsdp"
    where = {"base": f"model {broken}", "base, fsdp": f"model {broken}", "teacher": f"teacher {broken}"}
    out = tmp_path / "out"
    with pytest.raises(SppError, match=rf"^{where[case]}: {DOWN} .* 1 non-finite entry \(1 NaN"):
        run_train(_train_cfg(base, text_file, out, **extra))
    assert not out.exists() and not partial_path(out).exists()


def test_cli_train_refuses_a_non_finite_base_weight_in_one_line(pruned_tiny_dir, text_file, tmp_path):
    broken = corrupt_copy(pruned_tiny_dir, tmp_path / "broken", value=math.inf)
    result = cli("train", "--config", "tinystories.yaml", "--model", broken, "--data", text_file, "--output",
                 tmp_path / "out", "--max-steps", 1, "--set", "cutoff_len=16", "--set", "batch_size=4",
                 "--set", "micro_batch_size=4", "--set", "val_set_size=0")
    one_line_error(result, DOWN, "1 non-finite entry (0 NaN, 1 ±inf")
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


# --------------------------------------------------------------------------- eval


def test_eval_refuses_a_non_finite_weight(stories_llama, text_file, tmp_path):
    broken = corrupt_copy(stories_llama, tmp_path / "broken", index=(3, 5))
    result = cli("eval", "--model", broken, "--ppl", text_file, "--seqlen", 32, "--max-windows", 2, "--device", "cpu",
                 "--output", tmp_path / "out")
    one_line_error(result, DOWN, "1 non-finite entry (1 NaN")
    assert not (tmp_path / "out").exists()


def test_eval_reports_a_non_finite_perplexity_as_a_failure(stories_llama, text_file, tmp_path):
    """Finite weights whose logits overflow float32: the perplexity is NaN, and that is an error, not a number."""
    overflowing = shutil.copytree(stories_llama, tmp_path / "overflowing")
    for row in range(8):  # ±3e38 per entry: every logit's sum over the hidden size is ±inf
        set_entry(overflowing, "lm_head.weight", 3e38 * (-1) ** row, index=(slice(None), row))
    result = cli("eval", "--model", overflowing, "--ppl", text_file, "--seqlen", 32, "--max-windows", 2,
                 "--device", "cpu", "--output", tmp_path / "out")
    one_line_error(result, f"--ppl {text_file}", "perplexity is not finite")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- merge and export


@pytest.fixture
def trained(tmp_path, tiny_model):
    """A pruned llama and a trained-looking SPP adapter for it (test_merge's helpers)."""
    from test_merge import make_adapter, make_pruned

    pruned = make_pruned(tiny_model("llama"), tmp_path / "pruned")
    make_adapter(pruned, tmp_path / "train")
    return pruned, tmp_path / "train"


def test_merge_refuses_a_non_finite_base_weight(trained, tmp_path):
    pruned, adapter = trained
    set_entry(pruned, DOWN, math.inf)
    result = cli("merge", "--model", pruned, "--adapter", adapter, "--output", tmp_path / "merged")
    one_line_error(result, DOWN, "1 non-finite entry (0 NaN, 1 ±inf", str(pruned / "model.safetensors"))
    assert not (tmp_path / "merged").exists() and not partial_path(tmp_path / "merged").exists()


def test_merge_refuses_a_non_finite_adapter_tensor(trained, tmp_path):
    pruned, adapter = trained
    name = "model.layers.0.self_attn.q_proj.spp_beta"
    set_entry(adapter, name, math.nan, pattern=ADAPTER_WEIGHTS_FILE)
    result = cli("merge", "--model", pruned, "--adapter", adapter, "--output", tmp_path / "merged")
    one_line_error(result, name, "1 non-finite entry (1 NaN", str(adapter / ADAPTER_WEIGHTS_FILE))
    assert not (tmp_path / "merged").exists() and not partial_path(tmp_path / "merged").exists()


def test_export_refuses_a_non_finite_weight_both_ways(pruned_tiny_dir, tmp_path):
    broken = corrupt_copy(pruned_tiny_dir, tmp_path / "broken")
    result = cli("export", "--model", broken, "--output", tmp_path / "packed")
    one_line_error(result, DOWN, "1 non-finite entry (1 NaN", str(broken / "model.safetensors"))
    assert not (tmp_path / "packed").exists()
    packed = tmp_path / "packed"
    assert cli("export", "--model", pruned_tiny_dir, "--output", packed).exit_code == 0
    set_entry(packed, DOWN, math.inf, index=(0,), pattern="*.spz")  # the kept values, stored 1-D
    result = cli("export", "--dense", "--model", packed, "--output", tmp_path / "restored")
    one_line_error(result, DOWN, "1 non-finite entry (0 NaN, 1 ±inf", str(packed / "model.spz"))
    assert not (tmp_path / "restored").exists()
