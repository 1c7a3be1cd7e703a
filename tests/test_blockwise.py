"""Block-wise recovery (`objective: blockwise`): its loss against the formula, zero loss when nothing was pruned,
the sparsity invariant of every kind through training, resume and merge, bitwise resume after a kill mid-block,
and bad inputs."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spp.config import PipelineConfig, TrainConfig, merge_into
from spp.errors import SppError, SppInterrupted
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, TRAIN_LOG_FILE, partial_path
from spp.train import run_train
from spp.train.losses import feature_error_sum


def _cfg(base, teacher, data, output, **overrides) -> TrainConfig:
    settings = dict(base_model=str(base), teacher=str(teacher), data_path=str(data), output_dir=str(output),
                    objective="blockwise", cutoff_len=16, nsamples=8, batch_size=4, micro_batch_size=2, block_epochs=2,
                    learning_rate=2e-2, warmup_ratio=0.0, spp_row_groups=4, rank=2)
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


def _adapter(output) -> dict:
    return load_file(str(Path(output) / ADAPTER_WEIGHTS_FILE))


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / TRAIN_LOG_FILE).read_text().splitlines()]


def test_feature_error_sum_is_the_normalised_or_plain_squared_error_per_token():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    t[0, 0] = 0  # a teacher row of norm 0 counts as norm 1
    naive_norm = sum(float(((t[b, i] - s[b, i]) ** 2).sum() / max(float((t[b, i] ** 2).sum()), 1.0) if
                           float((t[b, i] ** 2).sum()) > 0 else ((t[b, i] - s[b, i]) ** 2).sum())
                     for b in range(3) for i in range(5))
    assert float(feature_error_sum(s, t)) == pytest.approx(naive_norm, rel=1e-5)
    mse = float(((t - s) ** 2).mean()) * 15  # the plain MSE over all entries, times the N = 15 tokens
    assert float(feature_error_sum(s, t, normalized=False)) == pytest.approx(mse, rel=1e-5)


@pytest.fixture(scope="module")
def unpruned_dir(tmp_path_factory, shared_data, teachers) -> Path:
    """`teachers["dense"]` saved as an `spp prune` output that pruned nothing (every mask entry kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import build_pruned_dir

    model = AutoModelForCausalLM.from_pretrained(teachers["dense"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(teachers["dense"])
    return build_pruned_dir(model, tokenizer, tmp_path_factory.mktemp("unpruned") / "tiny", sparsity=0.0)


@pytest.mark.parametrize("kind", ["spp", "masked_lora", "full"])
def test_nothing_pruned_gives_zero_loss_and_leaves_the_adapter_at_its_initial_value(
        unpruned_dir, teachers, text_file, tmp_path, kind):
    from spp.adapter.model import add_block_adapter, adapter_state_dict, find_targets
    from spp.io.reader import read_checkpoint
    from spp.models import find_decoder_blocks, load_model

    cfg = _cfg(unpruned_dir, teachers["dense"], text_file, tmp_path / "out", adapter=kind, block_target_inputs="sparse")
    run_train(cfg)
    records = _log(tmp_path / "out")
    assert [r["block"] for r in records] == [0, 1]
    assert all(r["first_loss"] == 0.0 and r["epoch_losses"] == [0.0, 0.0] for r in records)
    # the initial value: each block adapted in turn, seeded with seed + its index, as block-wise training does
    model, masks = load_model(str(unpruned_dir)), read_checkpoint(unpruned_dir).masks_by_parameter()
    targets = list(find_targets(model, cfg.adapter_config(), masks))
    prefix, blocks = find_decoder_blocks(model)
    for index, block in enumerate(blocks):
        torch.manual_seed(cfg.seed + index)
        add_block_adapter(block, f"{prefix}.{index}.", targets, cfg.adapter_config(), masks)
    initial, trained = adapter_state_dict(model), _adapter(tmp_path / "out")
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in initial)


def test_dense_and_sparse_target_inputs_agree_on_block_0_and_differ_after(pruned_tiny_dir, teachers, text_file, tmp_path):
    """Block 0's inputs are the embeddings either way; from block 1 on the dense teacher sees its own outputs."""
    for mode in ("dense", "sparse"):
        run_train(_cfg(pruned_tiny_dir, teachers["dense"], text_file, tmp_path / mode, block_target_inputs=mode))
    dense, sparse = _adapter(tmp_path / "dense"), _adapter(tmp_path / "sparse")
    first = [k for k in dense if k.startswith("model.layers.0.")]
    assert first and all(torch.equal(dense[k], sparse[k]) for k in first)
    assert any(not torch.equal(dense[k], sparse[k]) for k in dense if k.startswith("model.layers.1."))


def _spp(*args, env):
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **env}
    return subprocess.run([sys.executable, "-c", "from spp.cli import app; app()", *args], env=full_env,
                          capture_output=True, text=True, timeout=240)


def test_a_kill_mid_block_then_resume_equals_an_uninterrupted_run(pruned_tiny_dir, teachers, text_file, tmp_path):
    kw = dict(adapter="masked_lora", weight_decay=0.1)
    run_train(_cfg(pruned_tiny_dir, teachers["dense"], text_file, tmp_path / "straight", **kw))
    out = tmp_path / "killed"
    cfg = _cfg(pruned_tiny_dir, teachers["dense"], text_file, out, **kw)
    sets = [f"--set={k}={v}" for k, v in (("objective", "blockwise"), ("cutoff_len", 16), ("nsamples", 8),
                                          ("batch_size", 4), ("micro_batch_size", 2), ("block_epochs", 2),
                                          ("learning_rate", 2e-2), ("warmup_ratio", 0.0), ("spp_row_groups", 4),
                                          ("rank", 2), ("adapter", "masked_lora"), ("weight_decay", 0.1))]
    args = ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir), "--data", str(text_file),
            "--teacher", str(teachers["dense"]), "--output", str(out), "--set=val_set_size=0", *sets]
    # 4 steps per block: step 2 of block 1 is the run's 6th
    killed = _spp(*args, env={"SPP_FAULT": "block_step:6"})
    assert killed.returncode == -9, killed.stderr
    progress = json.loads((partial_path(out) / "blockwise-progress" / "progress.json").read_text())
    assert progress["blocks_done"] == 1
    resumed = _spp(*args, "--resume", env={})
    assert resumed.returncode == 0, resumed.stderr
    straight, again = _adapter(tmp_path / "straight"), _adapter(out)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert _log(tmp_path / "straight") == _log(out)
    assert cfg.block_epochs * 2 == _log(out)[1]["steps"]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["spp", "masked_lora", "full"]), lr=st.sampled_from([1e-2, 0.3]),
       loss=st.sampled_from(["normalized", "mse"]), inputs=st.sampled_from(["dense", "sparse"]),
       stop=st.integers(1, 8), seed=st.integers(0, 100))
def test_no_kind_makes_a_pruned_entry_nonzero_through_blockwise_train_resume_merge(
        pruned_tiny_dir, teachers, text_file, monkeypatch, kind, lr, loss, inputs, stop, seed):
    """Block-wise training interrupted at step `stop` of the run (a Ctrl-C: any block), resumed, merged and
    reloaded: every pruned entry is +0.0 bitwise in the saved adapter's effective weights and the merged model."""
    from transformers import AutoModelForCausalLM

    from spp.adapter.model import load_adapter
    from spp.config import MergeConfig
    from spp.io.reader import read_checkpoint
    from spp.merge import run_merge
    from spp.sparsity import pruned_is_positive_zero
    from spp.train import check_pruned_zeros

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train"
        kw = dict(adapter=kind, learning_rate=lr, block_loss=loss, block_target_inputs=inputs, seed=seed,
                  weight_decay=0.5)
        monkeypatch.setenv("SPP_FAULT", f"block_sigint:{stop}")
        with pytest.raises(SppInterrupted):
            run_train(_cfg(pruned_tiny_dir, teachers["dense"], text_file, out, **kw))
        monkeypatch.delenv("SPP_FAULT")
        report = run_train(_cfg(pruned_tiny_dir, teachers["dense"], text_file, out, resume=True, **kw))
        assert report.resumed_from == (stop - 1) // 4
        masks = read_checkpoint(pruned_tiny_dir).masks_by_parameter()
        model = AutoModelForCausalLM.from_pretrained(pruned_tiny_dir)
        load_adapter(model, out, masks)
        check_pruned_zeros(model, masks)
        run_merge(MergeConfig(model=str(pruned_tiny_dir), adapter=str(out), output=str(Path(tmp) / "merged")))
        merged = dict(AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged").named_parameters())
        pruned = dict(AutoModelForCausalLM.from_pretrained(pruned_tiny_dir).named_parameters())
        assert all(bool(pruned_is_positive_zero(merged[name], keep).all()) for name, keep in masks.items())
        assert any(not torch.equal(merged[name], pruned[name]) for name in masks)


def test_spp_run_passes_the_teacher_for_blockwise(tmp_path):
    from spp.pipeline import _train_config

    dense = tmp_path / "dense"
    dense.mkdir()
    cfg = PipelineConfig(model=str(dense), eval={"ppl": ["wikitext2"]},
                         train={"data_path": "x.txt", "objective": "blockwise"})
    assert _train_config(cfg, "test", tmp_path / "prune", tmp_path / "train")[0].teacher == str(dense.resolve())


@pytest.mark.parametrize("values, message", [
    ({"objective": "blockwise"}, "objective=blockwise needs a teacher"),
    ({"objective": "blockwise", "teacher": "d", "kd_weight": 1.0}, "kd_weight and squarehead_weight are terms of"),
    ({"objective": "blockwise", "teacher": "d", "max_steps": 3}, "max_steps=3 counts end-to-end steps"),
    ({"objective": "blockwise", "teacher": "d", "nsamples": 4, "batch_size": 8}, "nsamples=4 is fewer than one batch"),
    ({"objective": "blockwise", "teacher": "d", "block_loss": "l1"}, "block_loss='l1' should be one of"),
])
def test_blockwise_settings_are_checked(values, message):
    with pytest.raises(SppError, match=message):
        merge_into(TrainConfig, [("test", values)])


def test_bad_inputs_get_one_line_and_leave_nothing(pruned_tiny_dir, teachers, text_file, tmp_path):
    from spp.cli import app

    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    common = ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir), "--set", "objective=blockwise",
              "--set", "cutoff_len=16", "--set", "nsamples=8", "--set", "batch_size=4", "--set", "micro_batch_size=2"]
    cases = {
        "no teacher": ([], text_file, "objective=blockwise needs a teacher"),
        "deeper teacher": (["--teacher", str(teachers["deeper"])], text_file, "has decoder blocks 3 but the student has 2"),
        "wider teacher": (["--teacher", str(teachers["wider"])], text_file, "has hidden size 48 but the student has 32"),
        "other tokenizer": (["--teacher", str(teachers["other tokenizer"])], text_file, "tokenizer differs"),
        "short calibration file": (["--teacher", str(teachers["dense"])], short, "too short for one window of cutoff_len=16"),
    }
    for name, (extra, data, message) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        result = CliRunner().invoke(app, [*common, *extra, "--data", str(data), "--output", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert not out.exists() and not partial_path(out).exists(), name
