"""Distillation from the dense model: the loss terms against naive formulas, config and teacher checks,
and `spp train` with a teacher (logged terms, manifest, micro-batches, exact resume)."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spp.config import PipelineConfig, TrainConfig, merge_into
from spp.data import IGNORE_INDEX
from spp.errors import SppError, SppInterrupted
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, TRAIN_LOG_FILE, partial_path
from spp.train import run_train
from spp.train.losses import kd_kl_sum, squarehead_sum, summed_nll, target_count

# --------------------------------------------------------------------------- the loss terms


def _labels(B: int, T: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, 1] = 3  # at least one target
    return labels


def _naive_kd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, T: float) -> float:
    total = 0.0
    for b in range(labels.shape[0]):
        for pos in range(1, labels.shape[1]):
            if labels[b, pos] == IGNORE_INDEX:
                continue
            p = torch.softmax(t[b, pos - 1].double() / T, -1)
            q = torch.softmax(s[b, pos - 1].double() / T, -1)
            total += float((p * (p.log() - q.log())).sum()) * T * T
    return total


def _naive_squarehead(hs: list, ht: list, labels: torch.Tensor) -> float:
    per_block = []
    for s, t in zip(hs, ht):
        total = 0.0
        for b in range(labels.shape[0]):
            for pos in range(1, labels.shape[1]):
                if labels[b, pos] != IGNORE_INDEX:
                    d, ref = (t[b, pos - 1] - s[b, pos - 1]).double(), t[b, pos - 1].double()
                    total += float(d.square().sum() / ref.square().sum())
        per_block.append(total)
    return sum(per_block) / len(per_block)


def test_kd_is_zero_with_the_teacher_equal_to_the_student_and_so_is_its_gradient():
    labels = _labels(2, 7, 11)
    s = torch.randn(2, 7, 11, requires_grad=True)
    for T in (1.0, 2.5):
        kd = kd_kl_sum(s, s.detach().clone(), labels, T)
        kd.backward()
        assert kd.dtype == torch.float32 and abs(kd.item()) < 1e-6
        assert float(s.grad.abs().max()) < 1e-6
        s.grad = None


def test_squarehead_is_zero_with_equal_hiddens_and_so_is_its_gradient():
    labels = _labels(2, 7, 11)
    hs = [torch.randn(2, 7, 5, requires_grad=True) for _ in range(3)]
    sq = squarehead_sum(hs, [h.detach().clone() for h in hs], labels)
    sq.backward()
    assert sq.item() == 0.0
    assert all(float(h.grad.abs().max()) == 0.0 for h in hs)


def test_kd_and_squarehead_equal_naive_float64_formulas():
    labels = _labels(3, 9, 13, seed=1)
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 9, 13, generator=g) * 3, torch.randn(3, 9, 13, generator=g) * 3
    for T in (1.0, 0.5, 4.0):
        assert float(kd_kl_sum(s, t, labels, T)) == pytest.approx(_naive_kd(s, t, labels, T), rel=1e-5)
    hs = [torch.randn(3, 9, 6, generator=g) for _ in range(4)]
    ht = [torch.randn(3, 9, 6, generator=g) for _ in range(4)]
    assert float(squarehead_sum(hs, ht, labels)) == pytest.approx(_naive_squarehead(hs, ht, labels), rel=1e-5)
    # bf16 inputs are summed in float32
    assert kd_kl_sum(s.bfloat16(), t.bfloat16(), labels).dtype == torch.float32
    assert squarehead_sum([h.bfloat16() for h in hs], [h.bfloat16() for h in ht], labels).dtype == torch.float32


def test_the_sums_split_exactly_over_micro_batches():
    labels = _labels(4, 8, 10, seed=3)
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 8, 10, generator=g, dtype=torch.float64), torch.randn(4, 8, 10, generator=g, dtype=torch.float64)
    hs = [torch.randn(4, 8, 6, generator=g) for _ in range(2)]
    ht = [torch.randn(4, 8, 6, generator=g) for _ in range(2)]
    halves = (slice(0, 1), slice(1, 4))
    assert sum(target_count(labels[h]) for h in halves) == target_count(labels)
    for whole, parts in (
        (summed_nll(s, labels), [summed_nll(s[h], labels[h]) for h in halves]),
        (kd_kl_sum(s, t, labels, 2.0), [kd_kl_sum(s[h], t[h], labels[h], 2.0) for h in halves]),
        (squarehead_sum(hs, ht, labels), [squarehead_sum([x[h] for x in hs], [x[h] for x in ht], labels[h]) for h in halves]),
    ):
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("values, message", [
    ({"kd_weight": 1.0}, "kd_weight=1.0 needs a teacher"),
    ({"squarehead_weight": 0.5}, "squarehead_weight=0.5 needs a teacher"),
    ({"teacher": "dense"}, "kd_weight and squarehead_weight are both 0"),
    ({"ce_weight": 0.0}, "all 0"),
    ({"kd_weight": -1.0, "teacher": "dense"}, "kd_weight=-1.0 is out of range"),
    ({"kd_weight": 1.0, "teacher": "dense", "kd_temperature": 0.0}, "kd_temperature=0.0 is out of range"),
])
def test_distillation_settings_are_checked(values, message):
    with pytest.raises(SppError, match=message):
        merge_into(TrainConfig, [("test", values)])


def test_spp_run_makes_the_model_that_was_pruned_the_teacher(tmp_path):
    from spp.pipeline import _train_config

    dense = tmp_path / "dense"
    dense.mkdir()
    base_cfg = dict(model=str(dense), eval={"ppl": ["wikitext2"]})
    on = PipelineConfig(**base_cfg, train={"data_path": "x.txt", "squarehead_weight": 1.0})
    tcfg, inline, _ = _train_config(on, "test", tmp_path / "prune", tmp_path / "train")
    assert tcfg.teacher == str(dense.resolve()) and inline["teacher"] == str(dense.resolve())
    off = PipelineConfig(**base_cfg, train={"data_path": "x.txt"})
    assert _train_config(off, "test", tmp_path / "prune", tmp_path / "train")[0].teacher == ""
    own = PipelineConfig(**base_cfg, train={"data_path": "x.txt", "kd_weight": 1.0, "teacher": "/elsewhere"})
    assert _train_config(own, "test", tmp_path / "prune", tmp_path / "train")[0].teacher == "/elsewhere"
    written = PipelineConfig(**base_cfg, train={"data_path": "x.txt", "kd_weight": "1e-3"})  # as PyYAML reads 1e-3
    tcfg = _train_config(written, "test", tmp_path / "prune", tmp_path / "train")[0]
    assert tcfg.kd_weight == 0.001 and tcfg.teacher == str(dense.resolve())


# --------------------------------------------------------------------------- spp train with a teacher


@pytest.fixture(scope="session")
def text(tmp_path_factory, shared_data) -> Path:
    path = tmp_path_factory.mktemp("distill-text") / "stories.txt"
    path.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:12000])
    return path


def _cfg(base, data, output, **overrides) -> TrainConfig:
    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(output), cutoff_len=32,
                    micro_batch_size=2, batch_size=4, max_steps=4, save_steps=2, logging_steps=1, eval_steps=2,
                    val_set_size=0, learning_rate=2e-2, warmup_ratio=0.0)
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


def _adapter(output) -> dict:
    return load_file(str(Path(output) / ADAPTER_WEIGHTS_FILE))


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / TRAIN_LOG_FILE).read_text().splitlines()]


def test_train_with_a_teacher_logs_each_term_and_reports_the_teacher(pruned_tiny_dir, teachers, text, tmp_path):
    out = tmp_path / "kd"
    report = run_train(_cfg(pruned_tiny_dir, text, out, teacher=str(teachers["dense"]), kd_weight=0.5,
                            kd_temperature=2.0, squarehead_weight=0.25, val_set_size=4))
    records = [r for r in _log(out) if "loss" in r]
    assert len(records) == 4
    for r in records:
        assert r["kd"] > 0 and r["squarehead"] > 0
        assert r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kd"] + 0.25 * r["squarehead"], rel=1e-5)
    assert report.teacher_param_bytes == sum(p.numel() * 4 for p in _dense_params(teachers["dense"]))
    details = json.loads((out / MANIFEST_FILE).read_text())["details"]
    assert details["teacher_param_bytes"] == report.teacher_param_bytes > 0
    assert details["teacher"] == str(teachers["dense"].resolve())
    # Validation stays plain cross-entropy: the step-0 value is the pruned model's, as without a teacher.
    plain = tmp_path / "plain"
    run_train(_cfg(pruned_tiny_dir, text, plain, max_steps=1, val_set_size=4))
    assert _log(out)[0]["val_loss"] == _log(plain)[0]["val_loss"]
    assert "kd" not in _log(plain)[1] and "ce" not in _log(plain)[1]


def _dense_params(path: Path):
    return load_file(str(path / "model.safetensors")).values()


def test_distillation_accumulates_micro_batches_to_the_global_batch(pruned_tiny_dir, teachers, text, tmp_path):
    kw = dict(teacher=str(teachers["dense"]), kd_weight=1.0, squarehead_weight=1.0, max_steps=2, save_steps=2)
    one = run_train(_cfg(pruned_tiny_dir, text, tmp_path / "a", micro_batch_size=4, **kw))
    four = run_train(_cfg(pruned_tiny_dir, text, tmp_path / "b", micro_batch_size=1, **kw))
    assert one.train_loss == pytest.approx(four.train_loss, rel=1e-5)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_squarehead_under_gradient_checkpointing_gives_the_same_adapter(pruned_tiny_dir, teachers, text, tmp_path):
    # the SquareHead gradient flows through checkpointed blocks (recomputed in backward) as through plain ones
    kw = dict(teacher=str(teachers["dense"]), squarehead_weight=1.0, max_steps=2, save_steps=2)
    run_train(_cfg(pruned_tiny_dir, text, tmp_path / "a", **kw))
    run_train(_cfg(pruned_tiny_dir, text, tmp_path / "b", gradient_checkpointing=True, **kw))
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_resume_with_distillation_equals_an_uninterrupted_run(pruned_tiny_dir, teachers, text, tmp_path, monkeypatch):
    kw = dict(teacher=str(teachers["dense"]), kd_weight=0.5, squarehead_weight=0.5, max_steps=4, save_steps=4)
    straight = tmp_path / "straight"
    run_train(_cfg(pruned_tiny_dir, text, straight, **kw))

    out = tmp_path / "interrupted"
    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")  # a Ctrl-C during step 2: a checkpoint is saved there
    # the handler the run must give back: Python's default, or SIG_IGN when the suite runs as a background job
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SppInterrupted, match="interrupted at step 2 of 4"):
        run_train(_cfg(pruned_tiny_dir, text, out, **kw))
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.delenv("SPP_FAULT")
    report = run_train(_cfg(pruned_tiny_dir, text, out, resume=True, **kw))
    assert report.resumed_from == 2 and report.steps == 4
    a, b = _adapter(straight), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(straight)]


def test_resume_refuses_a_teacher_rewritten_since_the_checkpoint(pruned_tiny_dir, teachers, text, tmp_path, monkeypatch):
    """A teacher without an spp manifest is known by its files' sizes and modification times (hashing it would read
    the whole model): its weights rewritten after the interruption, --resume is refused in one line naming the file."""
    import shutil

    from safetensors.torch import save_file

    teacher = shutil.copytree(teachers["dense"], tmp_path / "teacher")
    kw = dict(teacher=str(teacher), kd_weight=0.5, max_steps=4)
    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")
    with pytest.raises(SppInterrupted, match="interrupted at step 2 of 4"):
        run_train(_cfg(pruned_tiny_dir, text, tmp_path / "out", **kw))
    monkeypatch.delenv("SPP_FAULT")
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({name: tensor * 1.5 for name, tensor in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(SppError, match=rf"^--resume: {teacher / 'model.safetensors'} changed since the interrupted "
                                       r"run \(size \d+ bytes, modified .* then, size \d+ bytes, modified .* now\)"):
        run_train(_cfg(pruned_tiny_dir, text, tmp_path / "out", resume=True, **kw))


def _bad_teacher_cases(pruned: Path, teachers: dict[str, Path], tmp: Path) -> dict:
    kd = ["--set", "kd_weight=1.0"]
    sq = ["--set", "squarehead_weight=1.0"]
    return {
        "teacher is the student": (["--teacher", str(pruned), *kd], "is the student itself"),
        "teacher is the student, spelt otherwise": (["--teacher", f"{pruned}/../{pruned.name}/.", *kd], "is the student itself"),
        "teacher with another tokenizer": (["--teacher", str(teachers["other tokenizer"]), *sq], "tokenizer differs"),
        "teacher with another vocabulary size": (["--teacher", str(teachers["other vocab size"]), *kd], "vocabulary size 640"),
        "teacher deeper than the student": (["--teacher", str(teachers["deeper"]), *sq], "decoder blocks 3"),
        "teacher missing": (["--teacher", str(tmp / "nowhere"), *kd], "does not exist"),
        "kd without a teacher": (kd, "kd_weight=1.0 needs a teacher"),
        "teacher without a weight": (["--teacher", str(teachers["dense"])], "both 0"),
    }


def test_cli_refuses_a_bad_teacher_with_one_line_and_leaves_nothing(pruned_tiny_dir, teachers, text, tmp_path):
    from spp.cli import app

    runner = CliRunner()
    for name, (args, message) in _bad_teacher_cases(pruned_tiny_dir, teachers, tmp_path).items():
        output = tmp_path / f"out-{name.replace(' ', '-').replace(',', '')}"
        result = runner.invoke(app, ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir),
                                     "--data", str(text), "--output", str(output), "--max-steps", "1", *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.stderr, result.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        assert not output.exists() and not partial_path(output).exists(), name


def test_ddp_two_processes_with_a_teacher_match_one(pruned_tiny_dir, teachers, text, tmp_path):
    import os
    import subprocess
    import sys

    kw = dict(teacher=str(teachers["dense"]), kd_weight=0.5, kd_temperature=2.0, squarehead_weight=0.5, max_steps=2,
              batch_size=8, micro_batch_size=2)
    single = tmp_path / "single"
    run_train(_cfg(pruned_tiny_dir, text, single, **kw))
    script = tmp_path / "spp_main.py"
    script.write_text("from spp.cli import app; app()\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cfg = _cfg(pruned_tiny_dir, text, tmp_path / "ddp", **kw)
    args = ["train", "--config", "tinystories.yaml", "--teacher", cfg.teacher]
    for key in ("base_model", "data_path", "output_dir", "cutoff_len", "micro_batch_size", "batch_size", "max_steps",
                "save_steps", "logging_steps", "val_set_size", "learning_rate", "warmup_ratio", "kd_weight",
                "kd_temperature", "squarehead_weight"):
        args += ["--set", f"{key}={getattr(cfg, key)}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _log(single), _log(tmp_path / "ddp")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kd", "squarehead"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key  # kd is ~1e-4 here: float32 noise
    a, b = _adapter(single), _adapter(tmp_path / "ddp")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_the_cli_says_what_the_printed_losses_are(pruned_tiny_dir, teachers, text, tmp_path):
    """With a teacher the training loss adds the distillation terms while validation is plain cross-entropy; the
    summary line must not present the two as the same quantity."""
    from typer.testing import CliRunner

    from spp.cli import app

    common = ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir), "--data", str(text),
              "--max-steps", "1", "--set", "cutoff_len=32", "--set", "val_set_size=4", "--set", "micro_batch_size=2",
              "--set", "batch_size=2"]
    with_teacher = CliRunner().invoke(app, [*common, "--teacher", str(teachers["dense"]), "--set", "kd_weight=1", "--output", str(tmp_path / "kd")])
    plain = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "plain")])
    assert with_teacher.exit_code == 0 and plain.exit_code == 0, with_teacher.output + plain.output
    assert "train loss (cross-entropy + distillation)" in with_teacher.output
    assert "train loss (" not in plain.output and "train loss" in plain.output
    assert "validation cross-entropy" in with_teacher.output and "validation cross-entropy" in plain.output
