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

import contextlib
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
    """`spp ARGS` in a child process, so a SIGKILL fault point cannot touch pytest. The child uses this
    process's torch thread count (a run condition: `--resume` refuses a different one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
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
    pattern = "2:4" if method in ("sparsegpt", "alps") else "unstructured"
    return ["prune", "--model", model, "--calib", calib, "--output", output, "--method", method, "--pattern", pattern,
            "--nsamples", "4", "--seqlen", "16", "--batch-size", "3", "--device", "cpu"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "alps"])
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

    stale = partial_path(out) / "stale-file"
    stale.write_text("left by a crash")
    assert invoke(*prune_args(model4, calib, out, "wanda")).exit_code == 0  # no --resume: starts over
    assert not partial_path(out).exists() and not (out / "stale-file").exists()


def test_ctrl_c_in_prune_keeps_the_finished_blocks_for_resume(model4, calib, tmp_path):
    from spp.config import PruneConfig
    from spp.errors import SppInterrupted
    from spp.prune import run_prune

    def cfg(output, **flags):
        return PruneConfig(model=str(model4), output=str(output), method="sparsegpt", pattern="2:4", calib=str(calib),
                           nsamples=4, seqlen=16, batch_size=3, device="cpu", **flags)

    def ctrl_c_at_block_2(index, n_blocks, name):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(SppInterrupted, match=r"finished blocks are kept in .*out\.partial.*--resume"):
        run_prune(cfg(tmp_path / "out"), on_module=ctrl_c_at_block_2)
    progress = json.loads((partial_path(tmp_path / "out") / PRUNE_PROGRESS_DIR / PRUNE_PROGRESS_FILE).read_text())
    assert progress["blocks_done"] == 2
    run_prune(cfg(tmp_path / "out", resume=True))
    run_prune(cfg(tmp_path / "straight"))
    assert_bitwise_equal(saved_tensors(tmp_path / "straight"), saved_tensors(tmp_path / "out"))


def test_prune_resume_takes_the_same_paths_spelled_another_way(model4, calib, tmp_path, monkeypatch):
    """Interrupted as `--model model --output out`, resumed as `--model ./model/ --output /abs/out`: one run."""
    from spp.config import PruneConfig
    from spp.errors import SppInterrupted
    from spp.prune import run_prune

    shutil.copytree(model4, tmp_path / "model")
    monkeypatch.chdir(tmp_path)

    def cfg(model, output, **flags):
        return PruneConfig(model=model, output=str(output), method="wanda", calib=str(calib), nsamples=4, seqlen=16,
                           batch_size=3, device="cpu", **flags)

    def ctrl_c_at_block_2(index, n_blocks, name):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(SppInterrupted):
        run_prune(cfg("model", "out"), on_module=ctrl_c_at_block_2)
    run_prune(cfg("./model/", tmp_path / "out", resume=True), on_module=lambda index, *_: index >= 2 or pytest.fail(
        f"block {index} was pruned again"))
    run_prune(cfg("model", "straight"))
    assert_bitwise_equal(saved_tensors(tmp_path / "straight"), saved_tensors(tmp_path / "out"))


def test_prune_resume_refuses_a_model_changed_since_the_interruption(model4, calib, tmp_path):
    """The input model's weights replaced (same path, same shapes) after the interruption: --resume is refused in
    one line naming the file whose sha256 changed, and the finished blocks are kept."""
    from test_prune import make_model

    from spp.config import PruneConfig
    from spp.errors import SppError, SppInterrupted
    from spp.io.checkpoint import sha256_file
    from spp.prune import run_prune

    model = shutil.copytree(model4, tmp_path / "model")

    def cfg(**flags):
        return PruneConfig(model=str(model), output=str(tmp_path / "out"), method="wanda", calib=str(calib),
                           nsamples=4, seqlen=16, batch_size=3, device="cpu", **flags)

    def ctrl_c_at_block_2(index, n_blocks, name):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(SppInterrupted):
        run_prune(cfg(), on_module=ctrl_c_at_block_2)
    then = sha256_file(model / "model.safetensors")
    make_model("llama", n_layers=4, seed=1).save_pretrained(model)
    now = sha256_file(model / "model.safetensors")
    before = snapshot(tmp_path)
    with pytest.raises(SppError) as raised:
        run_prune(cfg(resume=True))
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"--resume: {model / 'model.safetensors'} changed since the "
                                                f"interrupted run (sha256 {then[:12]}… then, {now[:12]}… now)"), line
    assert line.endswith("run without --resume to start over"), line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- run conditions


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with `n` torch threads (what the refusal message offers besides OMP_NUM_THREADS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def other_thread_count() -> int:
    return 2 if torch.get_num_threads() == 1 else 1


CONDITION_CHANGES = [  # (condition, the interrupted run's value, words the one line must hold)
    ("torch_threads", 7, ["used 7 torch threads, this one", "OMP_NUM_THREADS=7", "torch.set_num_threads(7)"]),
    ("world_size", 2, ["ran on 2 processes, this one on 1", "--num_processes 2"]),
    ("torch", "2.0.0", ["used torch 2.0.0, this one torch", "install torch==2.0.0"]),
    ("transformers", "4.0.0", ["install transformers==4.0.0"]),
    ("device", "cuda", ["ran on device 'cuda', this one on 'cpu'"]),
    ("device_name", "x86_64 AVX2", ["'x86_64 AVX2'"]),
    ("dtype", "bfloat16", ["dtype 'bfloat16', this one 'float32'"]),
    ("deterministic_algorithms", True, ["torch.use_deterministic_algorithms(True)"]),
    ("float32_matmul_precision", "high", ["torch.set_float32_matmul_precision('high')"]),
]


@pytest.mark.parametrize("key,old,words", CONDITION_CHANGES, ids=[c[0] for c in CONDITION_CHANGES])
def test_a_changed_run_condition_is_named_with_how_to_match_it(key, old, words):
    from spp.errors import SppError
    from spp.io.conditions import check_same_conditions, run_conditions

    now = run_conditions("cpu", "float32")
    check_same_conditions(dict(now), now, "the interrupted run", "start over")  # the same: accepted
    with pytest.raises(SppError) as raised:
        check_same_conditions({**now, key: old}, now, "the interrupted run", "run without --resume to start over")
    line = str(raised.value)
    assert "\n" not in line and line.startswith("--resume: the interrupted run ")
    assert line.endswith("to continue bit-exactly, or run without --resume to start over")
    for word in words:
        assert word in line, line


def test_unrecorded_or_several_changed_conditions_are_refused_in_one_line():
    from spp.errors import SppError
    from spp.io.conditions import check_same_conditions, run_conditions

    now = run_conditions("cpu", "float32")
    with pytest.raises(SppError, match="recorded no run conditions .*older spp.*; start over$"):
        check_same_conditions(None, now, "the interrupted run", "start over")
    with pytest.raises(SppError, match=r"used 9 torch threads.*\(also differs: world_size, torch\)$"):
        check_same_conditions({**now, "torch_threads": 9, "world_size": 3, "torch": "1.0"}, now, "the interrupted run",
                              "start over")


def test_unrecorded_or_several_changed_inputs_are_refused_in_one_line():
    from spp.errors import SppError
    from spp.io.conditions import check_same_inputs

    a, b, stat = "a" * 64, "b" * 64, "size 10 bytes, modified 2025-01-01T00:00:00.000000000Z"
    now = {"base/masks": a, "base/model.safetensors": a, "data.txt": a}
    check_same_inputs(dict(now), now, "the interrupted run", "start over")  # the same: accepted
    with pytest.raises(SppError, match=r"recorded no identity of its inputs .*older spp.*; start over$"):
        check_same_inputs(None, now, "the interrupted run", "start over")
    with pytest.raises(SppError, match=r"^--resume: base/masks changed since the interrupted run \(sha256 bbbbbbbbbbbb… "
                                       r"then, aaaaaaaaaaaa… now\), and so did data.txt, teacher/w; start over$"):
        check_same_inputs({**now, "base/masks": b, "data.txt": b, "teacher/w": stat}, now, "the interrupted run",
                          "start over")
    with pytest.raises(SppError, match=rf"^--resume: teacher/w changed since the interrupted run \({stat} then, "
                                       r"absent now\); start over$"):
        check_same_inputs({"teacher/w": stat, **now}, now, "the interrupted run", "start over")


def test_prune_resume_with_another_thread_count_is_refused_then_continues_under_the_recorded_one(
        model4, calib, tmp_path):
    here, other = torch.get_num_threads(), other_thread_count()
    args = prune_args(model4, calib, tmp_path / "killed", "sparsegpt")  # SparseGPT's sums depend on the threads
    killed = spp_child(*args, env={"SPP_FAULT": "prune_block:1", "OMP_NUM_THREADS": str(other)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = json.loads((partial_path(tmp_path / "killed") / PRUNE_PROGRESS_DIR / PRUNE_PROGRESS_FILE).read_text())
    assert progress["conditions"]["torch_threads"] == other and progress["blocks_done"] == 2

    before = snapshot(tmp_path)
    line = assert_one_error(invoke(*args, "--resume"), "--resume: the interrupted run used",
                            f"torch thread{'s' if other != 1 else ''}, this one {here};", f"OMP_NUM_THREADS={other}",
                            "run without --resume to start over")
    assert snapshot(tmp_path) == before, line

    with torch_threads(other):  # the conditions the interrupted run recorded
        assert invoke(*args, "--resume").exit_code == 0
        assert invoke(*prune_args(model4, calib, tmp_path / "straight", "sparsegpt")).exit_code == 0
    assert_bitwise_equal(saved_tensors(tmp_path / "straight"), saved_tensors(tmp_path / "killed"))
    manifest = json.loads((tmp_path / "killed" / "spp_manifest.json").read_text())
    assert manifest["conditions"] == progress["conditions"]


def test_train_resume_with_another_thread_count_is_refused_then_continues_under_the_recorded_one(
        pruned_tiny_dir, text_file, tmp_path):
    from test_train import cli_args, tiny_cfg

    from spp.io.manifest import read_manifest
    from spp.train import run_train

    here, other = torch.get_num_threads(), other_thread_count()
    out = tmp_path / "out"
    args = cli_args(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=4, val_set_size=0))
    killed = spp_child(*args, env={"SPP_FAULT": "train_step:2", "OMP_NUM_THREADS": str(other)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((partial_path(out) / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["run_conditions"]["torch_threads"] == other

    before = snapshot(tmp_path)
    assert_one_error(invoke(*args, "--resume"), "--resume: the interrupted run used", f"this one {here};",
                     f"OMP_NUM_THREADS={other}", "--overwrite")
    assert snapshot(tmp_path) == before

    with torch_threads(other):
        report = run_train(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=4, val_set_size=0, resume=True))
    assert (report.resumed_from, report.steps) == (2, 4)
    assert read_manifest(out).conditions == state["run_conditions"]


# --------------------------------------------------------------------------- Ctrl-C in training


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


def test_ctrl_c_after_the_last_step_finishes_the_run(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    """A Ctrl-C during the last step, or after it while the output is written, ends with the whole output: there
    is nothing left to resume. In this process (the guard takes the signal in the main thread)."""
    from test_train import cli_args, tiny_cfg

    import spp.train

    for case in ("last step", "writing"):
        out = tmp_path / case.replace(" ", "-")
        args = cli_args(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=2, val_set_size=0))
        with monkeypatch.context() as patch:
            if case == "last step":
                patch.setenv("SPP_FAULT", "train_sigint:2")
            else:
                write = spp.train.write_train_manifest
                patch.setattr(spp.train, "write_train_manifest",
                              lambda *a: (os.kill(os.getpid(), signal.SIGINT), write(*a))[1])
            result = invoke(*args)
        assert result.exit_code == 0, (case, result.output)
        assert "interrupt:" in result.stderr and "error:" not in result.stderr, result.stderr
        assert (out / "spp_manifest.json").is_file() and not partial_path(out).exists(), case


# --------------------------------------------------------------------------- a world of inputs, good and damaged


def _damage(world: Path, name: str, change) -> Path:
    directory = world / name
    shutil.copytree(world / "base", directory)
    change(directory)
    return directory


def _truncate(d: Path) -> None:
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) - 100])


def _bad_header(d: Path) -> None:
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + blob[8:])


def _config(**changes):
    def change(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))

    return change


def _flip_mask_bit(d: Path) -> None:
    from spp.io.maskfile import load_masks, save_masks

    masks, layouts = load_masks(d / MASK_FILE)
    name = sorted(masks)[0]
    masks[name][0, 0] = ~masks[name][0, 0]
    save_masks(d / MASK_FILE, masks, layouts)


DAMAGED = {  # name: (how, the file the message must name)
    "truncated shard": (_truncate, "model.safetensors"),
    "corrupt shard header": (_bad_header, "model.safetensors"),
    "config disagrees with shapes": (_config(intermediate_size=72), "config.json"),
    "config with fewer layers": (_config(num_hidden_layers=1), "config.json"),
    "mask differs from manifest": (_flip_mask_bit, MASK_FILE),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, pruned_tiny_dir, text_file) -> Path:
    """Everything the tables below need, in one folder whose snapshot must not change."""
    from test_merge import make_adapter

    from conftest import build_pruned_dir

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("world")
    shutil.copytree(pruned_tiny_dir, root / "base")
    shutil.copy(text_file, root / "text.txt")
    kwargs = dict(TINY_CONFIGS["llama"], vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    build_pruned_dir(other, AutoTokenizer.from_pretrained(root / "base"), root / "other", sparsity=0.6)
    make_adapter(root / "base", root / "adapter")
    make_adapter(root / "other", root / "other-adapter")
    for name, (how, _) in DAMAGED.items():
        _damage(root, name.replace(" ", "-"), how)
    (root / "empty.txt").write_text("")
    (root / "afile").write_text("not a directory")
    (root / "ro").mkdir()
    (root / "empty-adapter").mkdir()
    (root / "empty-adapter" / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    (root / "empty-adapter" / "adapter_model.safetensors").write_bytes(b"")
    (root / "train-unknown.yaml").write_text("lerning_rate: 0.01\n")
    (root / "empty.yaml").write_text("")
    (root / "inputs").mkdir()  # a folder of inputs, for outputs that would contain one
    shutil.copy(text_file, root / "inputs" / "text.txt")
    (root / "inputs" / "train.yaml").write_text("seed: 1\n")
    (root / "base-link").symlink_to(root / "base")
    (root / "nest" / "wanda-2of4").mkdir(parents=True)
    (root / "nest" / "wanda-2of4" / "prune").symlink_to(root / "base")  # an `spp run` stage folder that is the model
    pipeline = {"model": str(root / "base"), "output": str(root / "run"),
                "prune": {"method": "wanda", "calib": str(root / "text.txt"), "nsamples": 2, "seqlen": 32},
                "sweep": [{"pattern": "2:4"}],
                "train": {"data_path": str(root / "text.txt"), "cutoff_len": 32, "micro_batch_size": 2,
                          "batch_size": 2, "max_steps": 1},
                "eval": {"ppl": [str(root / "text.txt")], "seqlen": 32}}
    import yaml

    def write_pipeline(name, **changes):
        (root / name).write_text(yaml.safe_dump({**pipeline, **changes}, sort_keys=False))

    write_pipeline("pipeline.yaml")
    write_pipeline("pipeline-bad-pattern.yaml", sweep=[{"pattern": "2:4x"}])
    write_pipeline("pipeline-eval-key.yaml", eval={"ppl": [str(root / "text.txt")], "seqlenn": 32})
    write_pipeline("pipeline-truncated.yaml", model=str(root / "truncated-shard"))
    write_pipeline("pipeline-to-file.yaml", output=str(root / "afile"))
    write_pipeline("pipeline-ro.yaml", output=str(root / "ro" / "run"))
    write_pipeline("pipeline-into-model.yaml", output=str(root / "base"))
    write_pipeline("pipeline-stage-is-model.yaml", output=str(root / "nest"))
    return root


@pytest.fixture
def read_only(monkeypatch, world):
    """`world/ro` reads as unwritable to spp's checks (tests run as root, where chmod 555 would not stop a write)."""
    real = os.access
    ro = str(world / "ro")

    def access(path, mode, *args, **kwargs):
        if str(path).startswith(ro) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# --------------------------------------------------------------------------- damaged inputs, every stage


def _stage_args(stage: str, model: Path, world: Path) -> list:
    out = world / "out"
    return {
        "prune": ["prune", "--model", model, "--output", out, "--method", "magnitude", "--device", "cpu"],
        "train": ["train", "--config", "tinystories.yaml", "--model", model, "--data", world / "text.txt",
                  "--output", out],
        "merge": ["merge", "--model", model, "--adapter", world / "adapter", "--output", out],
        "eval": ["eval", "--model", model, "--ppl", world / "text.txt", "--seqlen", "32", "--device", "cpu",
                 "--output", out],
        "verify": ["verify", model],
    }[stage]


@pytest.mark.parametrize("stage", ["prune", "train", "merge", "eval", "verify"])
def test_every_stage_refuses_damaged_model_files_naming_them(world, stage):
    for damage, (_, file) in DAMAGED.items():
        model = world / damage.replace(" ", "-")
        before = snapshot(world)
        result = invoke(*_stage_args(stage, model, world))
        line = assert_one_error(result, str(model / file))
        assert snapshot(world) == before, (damage, line)


def test_nothing_is_ever_unpickled():
    """No torch.load / pickle anywhere in spp (tensors are safetensors, everything else JSON)."""
    sources = "\n".join(p.read_text() for p in Path(__file__).resolve().parents[1].joinpath("spp").rglob("*.py"))
    for forbidden in ("torch.load(", "import pickle", "pickle.load", "from pickle"):
        assert forbidden not in sources


# --------------------------------------------------------------------------- disk full / permission denied


def _hook_replace(monkeypatch, root: Path, code: int) -> None:
    """Every atomic JSON write (write_json's rename) under `root` fails with `code`."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _hook_safetensors(monkeypatch, root: Path, code: int) -> None:
    """Every safetensors write fails: safetensors' Rust writer as it does on a full disk (SafetensorError, not
    OSError), and spp's own streamed writer (streamed prune shards, the mask file, the block-wise adapter) with the
    OSError its file write would raise."""
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    import spp.io.checkpoint

    def fail(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    def fail_streamed(specs, chunks, path, metadata=None):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail)
    monkeypatch.setattr(spp.io.checkpoint, "save_tensors_streamed", fail_streamed)


DISK_ERRORS = {"ENOSPC": (28, "no space left on device"), "EACCES": (13, "permission denied")}
DISK_CASES = [  # (stage, hook, errno)
    ("prune", "safetensors", "ENOSPC"), ("prune", "json", "EACCES"),
    ("train", "safetensors", "ENOSPC"), ("train", "json", "EACCES"),
    ("merge", "safetensors", "EACCES"), ("merge", "json", "ENOSPC"),
    ("eval", "json", "ENOSPC"),
]


@pytest.mark.parametrize("stage,hook,code", DISK_CASES)
def test_disk_full_and_permission_denied_leave_the_file_system_as_it_was(world, monkeypatch, stage, hook, code):
    args = _stage_args(stage, world / "base", world)
    if stage == "train":
        args += ["--max-steps", "1", "--set", "batch_size=2", "--set", "micro_batch_size=2", "--set", "cutoff_len=32",
                 "--set", "val_set_size=0"]
    if stage == "prune":
        args[args.index("magnitude")] = "wanda"
        args += ["--calib", world / "text.txt", "--nsamples", "2", "--seqlen", "16"]
    number, words = DISK_ERRORS[code]
    before = snapshot(world)
    (_hook_safetensors if hook == "safetensors" else _hook_replace)(monkeypatch, world, number)
    result = invoke(*args)
    monkeypatch.undo()
    assert_one_error(result, words, str(world / "out"))
    assert snapshot(world) == before


# --------------------------------------------------------------------------- bad inputs over every subcommand

W = "{w}"
TRAIN = ["train", "--config", "tinystories.yaml", "--model", f"{W}/base", "--data", f"{W}/text.txt"]
EVAL = ["eval", "--model", f"{W}/base", "--ppl", f"{W}/text.txt", "--seqlen", "32", "--device", "cpu"]
PRUNE = ["prune", "--model", f"{W}/base", "--method", "magnitude", "--device", "cpu"]
MERGE = ["merge", "--model", f"{W}/base", "--adapter", f"{W}/adapter"]
BAD_INPUTS = [  # (case, argv with {w} for the world folder, words the one error line must hold)
    ("prune: pattern a:b", [*PRUNE, "--output", f"{W}/out", "--pattern", "a:b"], ["--pattern 'a:b'"]),
    ("prune: pattern 2:4:8", [*PRUNE, "--output", f"{W}/out", "--pattern", "2:4:8"], ["--pattern '2:4:8'"]),
    ("prune: nsamples 0", [*PRUNE, "--output", f"{W}/out", "--nsamples", "0"], ["--nsamples=0 is out of range"]),
    ("prune: batch size 0", [*PRUNE, "--output", f"{W}/out", "--batch-size", "0"], ["--batch-size=0 is out of range"]),
    ("prune: seqlen 0", [*PRUNE, "--output", f"{W}/out", "--seqlen", "0"], ["--seqlen=0 is out of range"]),
    ("prune: unknown dtype", [*PRUNE, "--output", f"{W}/out", "--dtype", "float8"], ["--dtype 'float8'"]),
    ("prune: bad max shard size", [*PRUNE, "--output", f"{W}/out", "--max-shard-size", "abc"], ["--max-shard-size 'abc'"]),
    ("prune: model is a file", [*PRUNE, "--output", f"{W}/out", "--model", f"{W}/afile"],
     ["afile is a file, not a model directory"]),
    ("prune: output is a file, no --overwrite", [*PRUNE, "--output", f"{W}/afile"], ["afile exists and is not a directory"]),
    ("prune: output under a file", [*PRUNE, "--output", f"{W}/afile/out"], ["afile is a file, not a directory"]),
    ("prune: calibration is a directory", [*PRUNE, "--output", f"{W}/out", "--method", "wanda", "--calib",
                                           f"{W}/inputs"], ["data file", "inputs is a directory, not a file"]),
    ("train: data is a directory", [*TRAIN[:-1], f"{W}/inputs", "--output", f"{W}/out"],
     ["inputs is a directory, not a file"]),
    ("eval: perplexity file is a directory", [*EVAL, "--ppl", f"{W}/inputs", "--output", f"{W}/out"],
     ["inputs is a directory, not a file"]),
    ("prune: output is a file", [*PRUNE, "--output", f"{W}/afile", "--overwrite"], ["afile exists and is not a directory"]),
    ("prune: unwritable output", [*PRUNE, "--output", f"{W}/ro/out"], ["permission denied"]),
    ("verify: missing directory", ["verify", f"{W}/nowhere"], ["nowhere is not a directory"]),
    ("verify: a file", ["verify", f"{W}/afile"], ["afile is not a directory"]),
    ("verify: no manifest", ["verify", f"{W}/ro"], ["spp_manifest.json does not exist"]),
    ("verify: empty manifest", ["verify", f"{W}/empty-manifest"], ["spp_manifest.json is not valid JSON"]),
    ("train: unknown --set key", [*TRAIN, "--output", f"{W}/out", "--set", "lerning_rate=1"], ["did you mean 'learning_rate'"]),
    ("train: unknown key in file", ["train", "--config", f"{W}/train-unknown.yaml", "--model", f"{W}/base", "--data",
                                    f"{W}/text.txt", "--output", f"{W}/out"], ["unknown key 'lerning_rate'"]),
    ("train: --set without =", [*TRAIN, "--output", f"{W}/out", "--set", "seed"], ["must look like key=value"]),
    ("train: max steps 0", [*TRAIN, "--output", f"{W}/out", "--max-steps", "0"], ["max_steps=0 is out of range"]),
    ("train: negative learning rate", [*TRAIN, "--output", f"{W}/out", "--set", "learning_rate=-1"], ["learning_rate=-1"]),
    ("train: output is a file", [*TRAIN, "--output", f"{W}/afile", "--overwrite"], ["afile exists and is not a directory"]),
    ("train: unwritable output", [*TRAIN, "--output", f"{W}/ro/out"], ["permission denied"]),
    ("merge: adapter of another base", [*MERGE, "--output", f"{W}/out", "--adapter", f"{W}/other-adapter"],
     ["different base"]),
    ("merge: empty adapter weights", [*MERGE, "--output", f"{W}/out", "--adapter", f"{W}/empty-adapter"],
     ["adapter_model.safetensors", "corrupt"]),
    ("merge: adapter is a file", [*MERGE, "--output", f"{W}/out", "--adapter", f"{W}/afile"], ["afile does not exist"]),
    ("merge: output is a file", [*MERGE, "--output", f"{W}/afile", "--overwrite"], ["afile exists and is not a directory"]),
    ("merge: unwritable output", [*MERGE, "--output", f"{W}/ro/out"], ["permission denied"]),
    ("eval: batch size 0", [*EVAL, "--batch-size", "0"], ["--batch-size=0 is out of range"]),
    ("eval: limit 0", [*EVAL, "--limit", "0"], ["--limit=0 is out of range"]),
    ("eval: max windows 0", [*EVAL, "--max-windows", "0"], ["--max-windows=0 is out of range"]),
    ("eval: negative few-shot", [*EVAL, "--num-fewshot", "-1"], ["--num-fewshot=-1 is out of range"]),
    ("eval: empty ppl file", [*EVAL, "--ppl", f"{W}/empty.txt"], ["empty.txt"]),
    ("eval: output is a file", [*EVAL, "--output", f"{W}/afile", "--overwrite"], ["afile exists and is not a directory"]),
    ("eval: unwritable output", [*EVAL, "--output", f"{W}/ro/out"], ["permission denied"]),
    ("eval: compare a missing path", ["eval", "--compare", f"{W}/nowhere"], ["nowhere"]),
    ("run: empty pipeline file", ["run", f"{W}/empty.yaml"], ["model"]),
    ("run: malformed sweep pattern", ["run", f"{W}/pipeline-bad-pattern.yaml"], ["2:4x"]),
    ("run: unknown eval key", ["run", f"{W}/pipeline-eval-key.yaml"], ["unknown key 'seqlenn'", "seqlen"]),
    ("run: truncated model shard", ["run", f"{W}/pipeline-truncated.yaml"], ["truncated-shard/model.safetensors"]),
    ("run: output is a file", ["run", f"{W}/pipeline-to-file.yaml"], ["afile"]),
    ("run: unwritable output", ["run", f"{W}/pipeline-ro.yaml"], ["permission denied"]),
    ("demo: output is a file", ["demo", "--output", f"{W}/afile"], ["afile exists and is not a directory"]),
    ("demo: unwritable output", ["demo", "--output", f"{W}/ro/demo"], ["permission denied"]),
    # an output that is, contains or lies inside an input (issue 23 item 4)
    ("train: output is the model", [*TRAIN, "--output", f"{W}/base", "--overwrite"], ["is --model", "/base"]),
    ("train: output is the model via a symlink", [*TRAIN, "--output", f"{W}/base-link", "--overwrite"],
     ["base-link is --model", "symlinks resolved"]),
    ("train: output inside the model", [*TRAIN, "--output", f"{W}/base/train"], ["lies inside --model"]),
    ("train: output contains the data", [*TRAIN[:-1], f"{W}/inputs/text.txt", "--output", f"{W}/inputs", "--overwrite"],
     ["contains --data", "inputs/text.txt"]),
    ("train: output is the teacher", [*TRAIN, "--set", "kd_weight=1", "--teacher", f"{W}/other", "--output",
                                      f"{W}/other", "--overwrite"], ["is --teacher"]),
    ("train: output contains the config", ["train", "--config", f"{W}/inputs/train.yaml", *TRAIN[3:], "--output",
                                           f"{W}/inputs", "--overwrite"], ["contains --config", "train.yaml"]),
    ("prune: output inside the model", [*PRUNE, "--output", f"{W}/base/pruned"], ["lies inside --model"]),
    ("prune: output contains the model", [*PRUNE, "--output", f"{W}", "--overwrite"], ["contains --model"]),
    ("prune: output is the model, no --overwrite", [*PRUNE, "--output", f"{W}/base"], ["is --model", "--overwrite"]),
    ("prune: output contains the calibration file", [*PRUNE, "--method", "wanda", "--calib", f"{W}/inputs/text.txt",
                                                     "--output", f"{W}/inputs", "--overwrite"], ["contains --calib"]),
    ("merge: output is the adapter", [*MERGE, "--output", f"{W}/adapter", "--overwrite"], ["is --adapter"]),
    ("merge: output inside the recorded base", ["merge", "--adapter", f"{W}/adapter", "--output", f"{W}/base/merged"],
     ["lies inside the base the adapter records", "/base"]),
    ("export: output inside the model", ["export", "--model", f"{W}/base", "--output", f"{W}/base/packed"],
     ["lies inside --model"]),
    ("eval: output is the model", [*EVAL, "--output", f"{W}/base", "--overwrite"], ["is --model"]),
    ("eval: output is the adapter", [*EVAL, "--adapter", f"{W}/adapter", "--output", f"{W}/adapter", "--overwrite"],
     ["is --adapter"]),
    ("eval: output contains a perplexity file", [*EVAL, "--ppl", f"{W}/inputs/text.txt", "--output", f"{W}/inputs",
                                                 "--overwrite"], ["contains --ppl", "inputs/text.txt"]),
    ("run: stage folders inside the model", ["run", f"{W}/pipeline-into-model.yaml"],
     ["wanda-2of4/prune", "lies inside model:"]),
    ("run: a stage folder is the model", ["run", f"{W}/pipeline-stage-is-model.yaml"],
     ["wanda-2of4/prune", "is model:", "symlinks resolved"]),
]


@pytest.mark.parametrize("case,argv,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_changes_nothing(world, read_only, case, argv, words):
    if not (world / "empty-manifest").exists():
        (world / "empty-manifest").mkdir()
        (world / "empty-manifest" / "spp_manifest.json").write_text("")
    before = snapshot(world)
    result = invoke(*[a.format(w=world) if isinstance(a, str) else a for a in argv])
    assert_one_error(result, *words)
    assert snapshot(world) == before


# --------------------------------------------------------------------------- in place, one run per output, nothing to resume


def test_prune_merge_and_export_replace_their_model_in_place_with_overwrite(model4, calib, world, tmp_path):
    """The one exception to "an output is never an input": the same result as writing elsewhere, and nothing left."""
    from test_merge import make_adapter

    from spp.config import ExportConfig
    from spp.export import run_export

    elsewhere, here = tmp_path / "pruned", tmp_path / "here"
    shutil.copytree(model4, here)
    assert invoke(*prune_args(model4, calib, elsewhere, "wanda")).exit_code == 0
    result = invoke(*prune_args(here, calib, here, "wanda"), "--overwrite")
    assert result.exit_code == 0, result.output
    assert_bitwise_equal(saved_tensors(elsewhere), saved_tensors(here))
    assert (elsewhere / MASK_FILE).read_bytes() == (here / MASK_FILE).read_bytes()

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(world / "base", base)
    make_adapter(base, adapter)
    merge = ["merge", "--model", base, "--adapter", adapter]
    assert invoke(*merge, "--output", tmp_path / "merged").exit_code == 0
    result = invoke(*merge, "--output", base, "--overwrite")
    assert result.exit_code == 0, result.output
    assert_bitwise_equal(saved_tensors(tmp_path / "merged"), saved_tensors(base))
    assert invoke("verify", base).exit_code == 0

    size = sum(p.stat().st_size for p in here.rglob("*") if p.is_file())
    packed = run_export(ExportConfig(model=str(elsewhere), output=str(tmp_path / "packed")))
    in_place = run_export(ExportConfig(model=str(here), output=str(here), overwrite=True))
    assert in_place.total_bytes_in == size  # the input as it was, not the output renamed over it
    assert (in_place.tensors, in_place.compressed_bytes) == (packed.tensors, packed.compressed_bytes)
    assert snapshot(here).keys() == snapshot(tmp_path / "packed").keys()
    for spz in (tmp_path / "packed").glob("*.spz"):  # safetensors writes metadata in no fixed order: compare tensors
        assert_bitwise_equal(load_file(str(spz)), load_file(str(here / spz.name)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "here", "merged", "packed", "pruned"]


def test_a_second_run_into_the_same_output_is_refused_naming_the_first(model4, calib, world, tmp_path):
    """A lock file holding a live pid of this host (a real process) refuses every stage before any work; once that
    process is gone the lock is stale and the next run takes it over."""
    import socket

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],  # alive until killed: no clock
                             stdin=subprocess.PIPE)
    try:
        (tmp_path / "out.lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
        partial_path(out).mkdir()
        (partial_path(out) / "first-run.txt").write_text("being written")
        before = snapshot(tmp_path)
        train = ["train", "--config", "tinystories.yaml", "--model", world / "base", "--data", world / "text.txt",
                 "--output", out]
        for argv in (prune_args(model4, calib, out, "wanda"), [*prune_args(model4, calib, out, "wanda"), "--resume"],
                     [*prune_args(model4, calib, out, "wanda"), "--overwrite"], train, [*train, "--resume"]):
            assert_one_error(invoke(*argv), str(out), f"pid {first.pid} on {socket.gethostname()}")
            assert snapshot(tmp_path) == before
    finally:
        first.kill()
        first.communicate()  # reaped, its stdin closed
    result = invoke(*prune_args(model4, calib, out, "wanda"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_prune_resume_with_nothing_done_starts_from_the_beginning_with_a_note(model4, calib, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert invoke(*prune_args(model4, calib, straight, "wanda")).exit_code == 0
    for leftover in (None, "model.safetensors"):  # never started; killed while writing the finished output
        if leftover:
            shutil.rmtree(out)
            partial_path(out).mkdir()
            (partial_path(out) / leftover).write_text("half a file")
        result = invoke(*prune_args(model4, calib, out, "wanda"), "--resume")
        assert result.exit_code == 0, result.output
        assert "note: --resume: nothing to resume" in result.stderr and "starting from the beginning" in result.stderr
        assert_bitwise_equal(saved_tensors(straight), saved_tensors(out))
        assert not partial_path(out).exists()


def test_train_resume_with_no_checkpoint_starts_from_the_beginning_with_a_note(pruned_tiny_dir, text_file, tmp_path):
    from test_train import cli_args, tiny_cfg

    out = tmp_path / "out"
    args = cli_args(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=1, val_set_size=0))
    partial_path(out).mkdir()
    (partial_path(out) / "train_log.jsonl").write_text("")  # killed before its first checkpoint
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "note: --resume: nothing to resume" in result.stderr and "starting from the beginning" in result.stderr
    assert (out / "adapter_model.safetensors").is_file() and not partial_path(out).exists()


# --------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n=st.integers(-3, 12), m=st.integers(-3, 12), left=st.sampled_from(["", " ", "\t"]),
       right=st.sampled_from(["", " ", "\n"]))
def test_n_m_patterns_parse_exactly_when_0_lt_n_lt_m(n, m, left, right):
    from spp.config import PruneConfig
    from spp.errors import SppError
    from spp.prune.masks import parse_pattern

    text = f"{left}{n}:{m}{right}"
    if 0 < n < m:
        assert parse_pattern(text) == (n, m)
        assert PruneConfig("model", "out", pattern=text).sparsity == pytest.approx(1 - n / m)
    else:
        with pytest.raises(SppError):
            parse_pattern(text)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 500), st.floats(-2, 2, allow_nan=False),
                     st.text(alphabet="abc*:_0123", max_size=5), st.lists(st.sampled_from(["*", "mlp.*"]), max_size=2))
_TRAIN_KEYS = ["micro_batch_size", "batch_size", "learning_rate", "warmup_ratio", "lora_r", "spp_row_groups",
               "cutoff_len", "val_set_size", "max_steps", "lr_scheduler", "precision", "target_modules",
               "max_grad_norm", "lora_dropout", "micro_batch", "lerning_rate"]


@settings(max_examples=150, deadline=None)
@given(values=st.dictionaries(st.sampled_from(_TRAIN_KEYS), _SCALARS, max_size=4))
def test_any_train_config_builds_or_raises_one_spp_error(values):
    """Unknown keys, wrong types and out-of-range values all end in SppError; what builds holds the given values."""
    import typing

    from spp.config import TrainConfig, merge_into
    from spp.errors import SppError
    from spp.typed import coerce

    try:
        cfg = merge_into(TrainConfig, [("test", values)])
    except SppError as exc:
        assert "\n" not in str(exc)
        return
    hints = typing.get_type_hints(TrainConfig)
    from spp.adapter import DEFAULT_LEARNING_RATE

    for key, value in values.items():
        if value is not None:  # text is read by the field's type (`1` for an int field is 1)
            expected = coerce(value, hints[key])
            if key == "learning_rate" and expected is None:  # empty: the adapter kind's documented default
                expected = DEFAULT_LEARNING_RATE[cfg.adapter]
            assert getattr(cfg, key) == expected


@settings(max_examples=60, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={
    "learning_rate": st.floats(1e-6, 1.0), "batch_size": st.sampled_from([8, 16, 32]),
    "micro_batch_size": st.sampled_from([1, 2, 4, 8]), "lr_scheduler": st.sampled_from(["linear", "cosine", "constant"]),
    "train_on_inputs": st.booleans(), "max_grad_norm": st.one_of(st.none(), st.floats(0.1, 10.0)),
    "data_path": st.text(alphabet="abc/._-", min_size=1, max_size=8)}))
def test_set_overrides_round_trip_through_yaml(values):
    """`--set key=<YAML of value>` (as `spp run` writes reproduce commands) gives back exactly the value; a file plus --set layers in order."""
    import yaml

    from spp.config import TrainConfig, merge_into, parse_set

    items = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
             for key, value in values.items()]
    cfg = merge_into(TrainConfig, [("file", {"learning_rate": 0.5, "seed": 7}), ("--set", parse_set(items))])
    assert {key: getattr(cfg, key) for key in values} == {key: value for key, value in values.items()}
    assert cfg.learning_rate == values.get("learning_rate", 0.5) and cfg.seed == 7


PATTERNS = st.sampled_from([("unstructured", 0.3), ("unstructured", 0.7), ("1:4", None), ("2:4", None), ("4:8", None)])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=PATTERNS, row_groups=st.sampled_from([1, 3, 16]), seed=st.integers(0, 1000))
def test_mask_invariant_survives_save_load_train_merge_load(pattern, row_groups, seed):
    """Prune with a random pattern, save, load the masks, train the SPP adapter a few steps, save it, merge
    the files, reload with plain transformers: every pruned entry is +0.0, N:M holds, kept weights moved."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_adapter, save_adapter
    from spp.config import MergeConfig
    from spp.io.checkpoint import save_model, sha256_file
    from spp.io.reader import read_checkpoint
    from spp.io.manifest import Manifest, write_manifest
    from spp.io.maskfile import save_masks
    from spp.merge import run_merge
    from spp.models import decoder_targets
    from spp.prune.masks import apply_mask, is_nm_valid, parse_pattern, select_mask
    from spp.sparsity import pruned_is_positive_zero
    from spp.verify import verify_checkpoint

    name, sparsity = pattern
    n_m = parse_pattern(name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model("llama", seed=seed)
        masks = {}
        with torch.no_grad():
            for targets in decoder_targets(model):
                for target in targets.values():
                    keep = select_mask(target.weight.abs(), n_m, sparsity if n_m is None else 1 - n_m[0] / n_m[1],
                                       per_row=True)
                    target.weight.copy_(apply_mask(target.weight, keep))
                    masks[target.param] = keep
        save_model(model, None, tmp / "pruned")
        save_masks(tmp / "pruned" / MASK_FILE, masks, {k: "linear" for k in masks})
        write_manifest(tmp / "pruned", Manifest(stage="prune", settings={}, details={"method": "magnitude",
                                                                                   "pattern": name}))

        base = AutoModelForCausalLM.from_pretrained(tmp / "pruned").train()
        loaded = read_checkpoint(tmp / "pruned").masks_by_parameter()
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
        cfg = AdapterConfig(spp_row_groups=row_groups, base_model=str(tmp / "pruned"),
                            mask_sha256=sha256_file(tmp / "pruned" / MASK_FILE))
        add_adapter(base, cfg, loaded)
        optimizer = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=0.05)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            base(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        save_adapter(base, cfg, tmp / "adapter")
        run_merge(MergeConfig(model=str(tmp / "pruned"), adapter=str(tmp / "adapter"), output=str(tmp / "merged")))

        merged = dict(AutoModelForCausalLM.from_pretrained(tmp / "merged").named_parameters())
        pruned = dict(AutoModelForCausalLM.from_pretrained(tmp / "pruned").named_parameters())
        moved = 0
        for key, keep in masks.items():
            assert bool(pruned_is_positive_zero(merged[key], keep).all()), key
            if n_m is not None:
                assert is_nm_valid(keep, *n_m)
            moved += int((merged[key][keep] != pruned[key][keep]).sum())
        assert moved > 0
        verify_checkpoint(tmp / "merged")
