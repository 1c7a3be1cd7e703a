"""Crash safety and bad input: resumable prune (SIGKILL at a named point, then --resume, bit for bit),
Ctrl-C in training (checkpoint, message, resume to the same adapter), refusal of corrupt or mismatched
inputs by every stage, disk-full and permission errors through a writer hook, a table of bad inputs over
every subcommand, and property tests of parsing and of the mask invariant.

Cases already covered at length elsewhere are not repeated here: prune flags (`test_prune.py::BAD_INPUTS`),
train configs and data (`test_train.py::_bad_inputs`), merge adapters (`test_merge.py::BAD_INPUTS`), eval
sets and tasks (`test_eval.py::_bad_inputs`), pipeline files (`test_pipeline.py::BAD`), training resume after
SIGKILL in a checkpoint write (`test_train.py`), and atomic_dir itself (`test_io.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_CONFIGS
from spp.cli import app
from spp.io.checkpoint import MASK_FILE, PRUNE_PROGRESS_DIR, PRUNE_PROGRESS_FILE, partial_path

SPP_MAIN = "from spp.cli import app; app()"


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`: relative path -> sha256 (files) or 'dir'."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def spp_child(*args, env=None, timeout=240):
    """`spp ARGS` in a child process, so a SIGKILL fault point cannot touch pytest."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", SPP_MAIN, *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(result, *words):
    """Non-zero exit, exactly one `error:` line on stderr (and nothing else there), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update({f"{shard.name}/{k}": v for k, v in load_file(str(shard)).items()})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), f"{key} differs"


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    """A tiny random LLaMA with 4 decoder blocks and a character tokenizer, saved."""
    from test_prune import make_model, char_tokenizer

    directory = tmp_path_factory.mktemp("model4") / "model"
    make_model("llama", n_layers=4).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from test_prune import write_text

    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


# --------------------------------------------------------------------------- prune --resume


def prune_args(model, calib, output, method):
    pattern = "2:4" if method == "sparsegpt" else "unstructured"
    return ["prune", "--model", model, "--calib", calib, "--output", output, "--method", method, "--pattern", pattern,
            "--nsamples", "4", "--seqlen", "16", "--batch-size", "3", "--device", "cpu"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_killed_prune_resumes_bit_for_bit(model4, calib, tmp_path, method):
    straight = tmp_path / "straight"
    assert invoke(*prune_args(model4, calib, straight, method)).exit_code == 0

    out = tmp_path / "killed"
    killed = spp_child(*prune_args(model4, calib, out, method), env={"SPP_FAULT": "prune_block:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress_dir = partial_path(out) / PRUNE_PROGRESS_DIR
    progress = json.loads((progress_dir / PRUNE_PROGRESS_FILE).read_text())
    assert progress["blocks_done"] == 2 and not out.exists()
    # blocks 0 and 1 persisted, with block 2's inputs (2 chunks of windows: batch 3 over 4 windows)
    assert sorted(p.name for p in progress_dir.iterdir()) == sorted(
        [PRUNE_PROGRESS_FILE, "hidden-2.safetensors"] + [f"{k}-{i}.safetensors" for k in ("block", "masks") for i in (0, 1)])
    assert sorted(load_file(str(progress_dir / "hidden-2.safetensors"))) == ["chunk.0", "chunk.1"]

    resumed = invoke(*prune_args(model4, calib, out, method), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_bitwise_equal(saved_tensors(straight), saved_tensors(out))  # weights and bit-packed masks
    assert (straight / MASK_FILE).read_bytes() == (out / MASK_FILE).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    assert not partial_path(out).exists()
    a, b = (json.loads((d / "spp_manifest.json").read_text())["details"] for d in (straight, out))
    assert a["modules"] == b["modules"] and a["achieved_sparsity"] == b["achieved_sparsity"]
    assert invoke("verify", out).exit_code == 0


def test_resume_refuses_other_settings_and_a_fresh_run_clears_the_partial(model4, calib, tmp_path):
    out = tmp_path / "out"
    killed = spp_child(*prune_args(model4, calib, out, "wanda"), env={"SPP_FAULT": "prune_block:0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = snapshot(tmp_path)
    changed = prune_args(model4, calib, out, "wanda")
    changed[changed.index("--nsamples") + 1] = "3"
    line = assert_one_error(invoke(*changed, "--resume"), "--resume: nsamples was 4 in the interrupted run but is 3 now")
    assert "calibration_ids_sha256" in line  # the token ids changed as well
    other_text = tmp_path / "other.txt"
    other_text.write_text(calib.read_text()[::-1])
    moved = prune_args(model4, other_text, out, "wanda")
    assert_one_error(invoke(*moved, "--resume"), "calib was")
    assert snapshot(tmp_path) == {**before, "other.txt": snapshot(tmp_path)["other.txt"]}
    assert_one_error(invoke(*prune_args(model4, calib, tmp_path / "never", "wanda"), "--resume"),
                     "there is no interrupted prune in")

    stale = partial_path(out) / "stale-file"
    stale.write_text("left by a crash")
    assert invoke(*prune_args(model4, calib, out, "wanda")).exit_code == 0  # no --resume: starts over
    assert not partial_path(out).exists() and not (out / "stale-file").exists()


# --------------------------------------------------------------------------- Ctrl-C in training


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shared_data) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:20000])
    return path


def test_interrupt_guard_first_sigint_requests_a_stop_second_one_raises():
    from spp.train.loop import InterruptGuard

    before = signal.getsignal(signal.SIGINT)
    with InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_with_the_same_adapter(pruned_tiny_dir, text_file, tmp_path):
    from test_train import adapter, assert_adapters_close, cli_args, tiny_cfg

    from spp.train import run_train

    straight = tmp_path / "straight"
    run_train(tiny_cfg(pruned_tiny_dir, text_file, straight, max_steps=6, val_set_size=0))

    out = tmp_path / "interrupted"
    args = cli_args(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=6, val_set_size=0))
    # SIGINT during step 3: checkpoints are due at 2, 4, 6, so step 3's is saved only because of the Ctrl-C.
    result = spp_child(*args, env={"SPP_FAULT": "train_sigint:3"})
    assert result.returncode == 130, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "interrupted at step 3 of 6" in error[0] and "--resume" in error[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    checkpoints = partial_path(out) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]
    assert json.loads((checkpoints / "step-3" / "trainer_state.json").read_text())["step"] == 3

    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_adapters_close(adapter(straight), adapter(out), atol=1e-6)
    assert not partial_path(out).exists()
