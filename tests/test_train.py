"""spp train: the loop's pure pieces, training data, end-to-end runs, resume, DDP, bad inputs, quality."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spp.config import TrainConfig, merge_into
from spp.data import (IGNORE_INDEX, alpaca_prompt, pad_batch, read_alpaca_records, split_train_val, text_windows,
                      tokenize_instruction, tokenize_stream)
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, MASK_FILE, TRAIN_LOG_FILE, partial_path
from spp.io.maskfile import load_masks
from spp.train import run_train
from spp.train.loop import global_batch, lr_factor, rank_slice, summed_nll, target_count

SPP_MAIN = "from spp.cli import app; app()"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "stories260K-hf")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory, shared_data) -> Path:
    """The first 24 records of the small Alpaca file."""
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    records = json.loads((shared_data / "alpaca" / "alpaca_small.json").read_text())[:24]
    path.write_text(json.dumps(records))
    return path


def tiny_cfg(base, data, output, **overrides) -> TrainConfig:
    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(output), cutoff_len=32,
                    micro_batch_size=2, batch_size=4, max_steps=4, save_steps=2, logging_steps=1, eval_steps=2,
                    val_set_size=4, learning_rate=2e-2, warmup_ratio=0.0)
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


def adapter(output) -> dict:
    return load_file(str(Path(output) / ADAPTER_WEIGHTS_FILE))


def assert_adapters_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"adapters differ by {worst}"


def log_records(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / TRAIN_LOG_FILE).read_text().splitlines()]


def spp_command(*args, env=None, launcher=None, timeout=240):
    """Run `spp` in a child process (so a SIGKILL fault or a second process cannot touch pytest), with this
    process's torch thread count (a run condition: `--resume` refuses another one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    cmd = (launcher or [sys.executable, "-c", SPP_MAIN]) + list(args)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def cli_args(cfg: TrainConfig) -> list[str]:
    """`spp train` arguments that reproduce `cfg` (every key through --set)."""
    args = ["train", "--config", "tinystories.yaml"]
    for key in ("base_model", "data_path", "output_dir", "cutoff_len", "micro_batch_size", "batch_size", "max_steps",
                "save_steps", "logging_steps", "eval_steps", "val_set_size", "learning_rate", "warmup_ratio",
                "data_format", "seed", "num_epochs", "lr_scheduler", "max_grad_norm"):
        args += ["--set", f"{key}={getattr(cfg, key)}"]
    return args


# --------------------------------------------------------------------------- pure pieces


def test_lr_factor_matches_formulas():
    total, warmup = 20, 4
    for step in range(total):
        p = (step - warmup) / (total - warmup)
        expected_warm = (step + 1) / warmup
        assert lr_factor(step, total, warmup, "linear") == pytest.approx(expected_warm if step < warmup else 1 - p)
        assert lr_factor(step, total, warmup, "cosine") == pytest.approx(
            expected_warm if step < warmup else (1 + math.cos(math.pi * p)) / 2)
        assert lr_factor(step, total, warmup, "constant") == pytest.approx(expected_warm if step < warmup else 1.0)
    assert lr_factor(0, 10, 0, "linear") == 1.0


def test_global_batches_cover_each_epoch_once_and_ranks_are_disjoint():
    n, batch = 23, 4  # 5 full batches per epoch, 3 examples left over
    for epoch in range(2):
        seen = [i for step in range(epoch * 5, epoch * 5 + 5) for i in global_batch(n, batch, 7, step)]
        assert len(seen) == len(set(seen)) == 20 and set(seen) <= set(range(n))
    assert global_batch(n, batch, 7, 0) != global_batch(n, batch, 7, 5)  # a new shuffle each epoch
    assert global_batch(n, batch, 7, 3) == global_batch(n, batch, 7, 3)  # a pure function of the step
    ids = global_batch(n, batch, 7, 2)
    parts = [rank_slice(ids, r, 2) for r in range(2)]
    assert parts[0] + parts[1] == ids and not set(parts[0]) & set(parts[1])


def test_summed_nll_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = IGNORE_INDEX
    labels[2, 1] = IGNORE_INDEX
    logp = torch.log_softmax(logits, -1)
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(1, 5):
            if labels[b, t] != IGNORE_INDEX:
                expected -= float(logp[b, t - 1, labels[b, t]])
                count += 1
    assert float(summed_nll(logits, labels)) == pytest.approx(expected, rel=1e-5)
    assert target_count(labels) == count


# --------------------------------------------------------------------------- training data


def test_alpaca_prompt_uses_the_input_template_only_with_an_input():
    with_input = alpaca_prompt("Add the numbers.", "2 and 3")
    assert "### Input:\n2 and 3" in with_input and with_input.endswith("### Response:\n")
    without = alpaca_prompt("Name a colour.", "  ")
    assert "### Input" not in without and "Name a colour." in without


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_tokenize_instruction_labels(tokenizer, train_on_inputs):
    record = {"instruction": "Tell a story.", "input": "", "output": "Once upon a time there was a cat."}
    prompt_ids = tokenizer(alpaca_prompt("Tell a story."))["input_ids"]
    output_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    ids, labels = tokenize_instruction(tokenizer, record, 512, train_on_inputs)
    assert ids == prompt_ids + output_ids + [tokenizer.eos_token_id]
    n = len(prompt_ids)
    assert labels[n:] == ids[n:]
    assert labels[:n] == (ids[:n] if train_on_inputs else [IGNORE_INDEX] * n)
    short_ids, short_labels = tokenize_instruction(tokenizer, record, 10, train_on_inputs)
    assert short_ids == ids[:10] and len(short_labels) == 10  # cut at cutoff_len, no EOS squeezed in


def test_read_alpaca_records_names_the_bad_record(tmp_path):
    good = {"instruction": "a", "input": "b", "output": "c"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good, {"instruction": "x", "output": "y"}, {"instruction": "z", "input": ""}]))
    with pytest.raises(SppError, match=r"record 2 has no 'output' field"):
        read_alpaca_records(str(path))
    path.write_text(json.dumps([good, {"instruction": "x", "output": "y"}]))
    assert read_alpaca_records(str(path))[1] == {"instruction": "x", "input": "", "output": "y"}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": 3, "output": "y"}) + "\n")
    with pytest.raises(SppError, match=r"record 1 field 'instruction' is int"):
        read_alpaca_records(str(jsonl))
    with pytest.raises(SppError, match="does not exist"):
        read_alpaca_records(str(tmp_path / "missing.json"))


def test_text_windows_cut_one_stream(tokenizer):
    docs = ["Tom had a red ball.", "Sue saw the big dog and ran home."]
    stream = [tokenizer.bos_token_id] + tokenize_stream(tokenizer, docs).tolist()
    windows = text_windows(tokenizer, docs, 7)
    assert [t for ids, _ in windows for t in ids] == stream[: len(stream) - (len(stream) % 7 == 1)]
    assert all(len(ids) == 7 for ids, _ in windows[:-1]) and all(ids == labels for ids, labels in windows)


def test_split_train_val_counts_and_fractions():
    train, val = split_train_val(50, 0.2, seed=1)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    train, val = split_train_val(50, 7, seed=1)
    assert len(val) == 7 and not set(train) & set(val)
    assert split_train_val(50, 0, seed=1)[1] == []
    assert len(split_train_val(5, 5, seed=1)[1]) == 2  # capped at half (tests/test_data.py has the rule)


def test_pad_batch_masks_padding():
    batch = pad_batch([([5, 6, 7], [5, 6, 7]), ([8], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]


# --------------------------------------------------------------------------- end to end


def test_train_writes_the_adapter_and_keeps_every_zero(pruned_tiny_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp.adapter.weight import AdaptedWeight
    from spp.adapter.model import load_adapter, merge_adapter
    from spp.io.checkpoint import read_json
    from spp.io.reader import read_checkpoint
    from spp.io.manifest import read_manifest
    from spp.sparsity import pruned_is_positive_zero

    out = tmp_path / "train"
    report = run_train(tiny_cfg(pruned_tiny_dir, alpaca_file, out, train_on_inputs=False, cutoff_len=160))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    ckpt_files = ["adapter_config.json", "adapter_model.safetensors", "optimizer.json", "optimizer.safetensors",
                  "rng-rank0.safetensors", "trainer_state.json"]
    assert files == sorted(["adapter_config.json", "adapter_model.safetensors", "spp_config.yaml",
                            "spp_manifest.json", "train_log.jsonl"]
                           + [f"checkpoints/step-{s}/{f}" for s in (2, 4) for f in ckpt_files])
    assert not partial_path(out).exists()

    base_manifest = read_manifest(pruned_tiny_dir)
    cfg_json = read_json(out / "adapter_config.json")
    assert cfg_json["mask_sha256"] == base_manifest.mask_sha256 and cfg_json["base_model"] == str(pruned_tiny_dir.resolve())
    assert (cfg_json["spp_row_groups"], cfg_json["scale"], cfg_json["target_modules"]) == (16, 2.0, ["*"])
    manifest = read_manifest(out)
    assert manifest.stage == "train" and manifest.mask_sha256 == base_manifest.mask_sha256
    assert manifest.details["trainable_params"] == report.trainable_params == sum(v.numel() for v in adapter(out).values())
    assert manifest.details["train_loss"] == report.train_loss
    log = log_records(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    assert log[0]["val_loss"] > 0 and all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in log[1:])
    assert "val_loss" in log[2] and "val_loss" in log[4]

    # β moved away from zero, so the model changed; yet every pruned entry is still +0.0 after a merge.
    model = AutoModelForCausalLM.from_pretrained(pruned_tiny_dir)
    masks = read_checkpoint(pruned_tiny_dir).masks_by_parameter()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    pruned_logits = model(ids).logits
    load_adapter(model, out, masks)
    betas = [m.spp_beta for m in model.modules() if isinstance(m, AdaptedWeight)]
    assert all(float(b.detach().abs().max()) > 0 for b in betas)
    merge_adapter(model, masks)
    assert not torch.allclose(model(ids).logits, pruned_logits, atol=1e-4)
    params = dict(model.named_parameters())
    assert masks and all(bool(pruned_is_positive_zero(params[name], keep).all()) for name, keep in masks.items())


def test_micro_batches_accumulate_to_the_global_batch(pruned_tiny_dir, text_file, tmp_path):
    one = run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "a", micro_batch_size=4, max_steps=3))
    four = run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "b", micro_batch_size=1, max_steps=3))
    assert one.train_loss == pytest.approx(four.train_loss, rel=1e-5)
    assert_adapters_close(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter(pruned_tiny_dir, text_file, tmp_path):
    run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "a", max_steps=2, val_set_size=0))
    run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "b", max_steps=2, val_set_size=0, gradient_checkpointing=True))
    assert_adapters_close(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=1e-6)


def test_resume_after_a_crash_matches_an_uninterrupted_run(pruned_tiny_dir, text_file, tmp_path):
    straight = tmp_path / "straight"
    run_train(tiny_cfg(pruned_tiny_dir, text_file, straight, max_steps=6))

    crashed = tmp_path / "crashed"
    cfg = tiny_cfg(pruned_tiny_dir, text_file, crashed, max_steps=6)
    # Killed (SIGKILL) while writing checkpoint 4: step-2 is complete, step-4 only a temporary directory.
    result = spp_command(*cli_args(cfg), env={"SPP_FAULT": "checkpoint_write:4"})
    assert result.returncode == -9, result.stderr[-2000:]
    partial = partial_path(crashed)
    assert not crashed.exists()
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-2", "step-4.tmp"]
    saved = json.loads((partial / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["data_position"]["batch_in_epoch"] == 2

    report = run_train(tiny_cfg(pruned_tiny_dir, text_file, crashed, max_steps=6, resume=True))
    assert report.resumed_from == 2 and report.steps == 6
    assert_adapters_close(adapter(straight), adapter(crashed), atol=1e-6)
    assert [r["step"] for r in log_records(crashed)] == [r["step"] for r in log_records(straight)]
    assert [r["loss"] for r in log_records(crashed)[1:]] == pytest.approx([r["loss"] for r in log_records(straight)[1:]], rel=1e-6)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    import spp.train.loop as loop

    calls = {"n": 0}
    real = loop.summed_nll

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real(logits, labels)
        return value * float("nan") if calls["n"] > 4 else value  # steps 1-2 (2 micro-batches each) are fine

    monkeypatch.setattr(loop, "summed_nll", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SppError, match=r"loss is nan at step 3.*last good checkpoint is .*step-2.*--resume"):
        run_train(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=6, val_set_size=0))
    assert not out.exists() and (partial_path(out) / "checkpoints" / "step-2" / ADAPTER_WEIGHTS_FILE).is_file()

    monkeypatch.undo()
    with pytest.raises(SppError, match="holds an interrupted run: pass --resume"):
        run_train(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=6, val_set_size=0))
    with pytest.raises(SppError, match="--resume: learning_rate was 0.02 .* is 0.01 now"):
        run_train(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=6, val_set_size=0, learning_rate=1e-2, resume=True))
    report = run_train(tiny_cfg(pruned_tiny_dir, text_file, out, max_steps=6, val_set_size=0, resume=True))
    assert (report.resumed_from, report.steps) == (2, 6) and math.isfinite(report.train_loss)


def interrupt_at_step_3(cfg: TrainConfig, monkeypatch) -> None:
    """Run `cfg` (6 steps) with a Ctrl-C during step 3: its checkpoint is kept in OUTPUT.partial/ for --resume."""
    from spp.errors import SppInterrupted

    monkeypatch.setenv("SPP_FAULT", "train_sigint:3")
    with pytest.raises(SppInterrupted, match="interrupted at step 3 of 6"):
        run_train(cfg)
    monkeypatch.delenv("SPP_FAULT")


def checkpoint_files(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(Path(output).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["spp", "full"])
def test_resume_refuses_a_base_pruned_again_since_the_checkpoint(pruned_tiny_dir, text_file, tmp_path, monkeypatch,
                                                                kind):
    """The base re-pruned in place after the interruption: refused in one line naming its mask file, before any
    step (spp used to go on under the new mask and claim its hash; full trained to the end, then raised)."""
    from conftest import one_line_error

    from spp.cli import app
    from spp.io.checkpoint import sha256_file

    base = shutil.copytree(pruned_tiny_dir, tmp_path / "pruned")
    out = tmp_path / "out"
    cfg = tiny_cfg(base, text_file, out, max_steps=6, val_set_size=0, adapter=kind)
    interrupt_at_step_3(cfg, monkeypatch)
    then = sha256_file(base / MASK_FILE)
    pruned = CliRunner().invoke(app, ["prune", "--model", str(base), "--output", str(base), "--method", "magnitude",
                                      "--sparsity", "0.7", "--overwrite"])
    assert pruned.exit_code == 0, pruned.output
    now = sha256_file(base / MASK_FILE)
    assert now != then
    before = checkpoint_files(partial_path(out))
    one_line_error(CliRunner().invoke(app, cli_args(cfg) + ["--set", f"adapter={kind}", "--resume"]),
                   f"--resume: {base / MASK_FILE} changed since the interrupted run "
                   f"(sha256 {then[:12]}… then, {now[:12]}… now)", "--overwrite")
    assert checkpoint_files(partial_path(out)) == before and not out.exists()


def test_resume_refuses_data_changed_since_the_checkpoint(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    """The data file's paragraphs reversed after the interruption (the same number of examples, so the example
    count check cannot see it): refused in one line naming the file; restored, the run resumes and its manifest
    records the data it trained on."""
    from conftest import one_line_error

    from spp.cli import app
    from spp.io.checkpoint import sha256_file
    from spp.io.manifest import read_manifest

    data = tmp_path / "stories.txt"
    data.write_text("\n\n".join(text_file.read_text().split("\n\n")[1:-1]))  # whole stories: reversed, as many windows
    out = tmp_path / "out"
    cfg = tiny_cfg(pruned_tiny_dir, data, out, max_steps=6, val_set_size=0)
    interrupt_at_step_3(cfg, monkeypatch)
    original = data.read_text()
    then = sha256_file(data)
    data.write_text("\n\n".join(reversed(original.split("\n\n"))))
    now = sha256_file(data)
    one_line_error(CliRunner().invoke(app, cli_args(cfg) + ["--resume"]),
                   f"--resume: {data} changed since the interrupted run (sha256 {then[:12]}… then, {now[:12]}… now)")
    data.write_text(original)
    report = run_train(tiny_cfg(pruned_tiny_dir, data, out, max_steps=6, val_set_size=0, resume=True))
    assert (report.resumed_from, report.steps) == (3, 6)
    assert read_manifest(out).inputs[str(data)] == then


def test_ddp_two_processes_match_one(pruned_tiny_dir, text_file, tmp_path):
    single = tmp_path / "single"
    run_train(tiny_cfg(pruned_tiny_dir, text_file, single, max_steps=3, batch_size=8, micro_batch_size=2))
    script = tmp_path / "spp_main.py"
    script.write_text(SPP_MAIN + "\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    ddp = tmp_path / "ddp"
    cfg = tiny_cfg(pruned_tiny_dir, text_file, ddp, max_steps=3, batch_size=8, micro_batch_size=2)
    result = spp_command(*cli_args(cfg), env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]

    from spp.io.manifest import read_manifest

    assert read_manifest(ddp).details["world_size"] == 2
    for one, two in zip(log_records(single)[1:], log_records(ddp)[1:]):
        rank0, rank1 = two["example_ids"]  # written from inside the run: one list per process
        assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
        assert rank0 + rank1 == one["example_ids"][0]  # together, the same global batch
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert_adapters_close(adapter(single), adapter(ddp), atol=1e-5)


def test_world_size_without_launcher_is_refused(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SppError, match="WORLD_SIZE=2 but accelerate reports 1 process"):
        run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not partial_path(tmp_path / "o").exists()


# --------------------------------------------------------------------------- the CLI contract


def _bad_inputs(tmp: Path, pruned: Path, text: Path):
    (tmp / "bad.yaml").write_text("cutoff_len: [1,\n")
    (tmp / "unknown.yaml").write_text("micro_batch: 4\n")
    (tmp / "mistyped.yaml").write_text("cutoff_len: long\n")
    (tmp / "empty.txt").write_text("\n")
    (tmp / "norecord.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    nomask = tmp / "nomask"
    nomask.mkdir()
    for name in ("config.json", "model.safetensors"):
        (nomask / name).write_bytes((pruned / name).read_bytes())
    (tmp / "exists").mkdir()
    ok = ["--model", str(pruned), "--data", str(text)]
    broken, rehashed = tmp / "broken", tmp / "rehashed"
    for copy in (broken, rehashed):
        shutil.copytree(pruned, copy)
    weights = load_file(str(broken / "model.safetensors"))
    keep = load_masks(broken / MASK_FILE)[0]["model.layers.0.mlp.up_proj.weight"]
    weights["model.layers.0.mlp.up_proj.weight"][~keep] = 0.5  # pruned entries that are not zero
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((rehashed / MANIFEST_FILE).read_text())
    (rehashed / MANIFEST_FILE).write_text(json.dumps({**manifest, "mask_sha256": "0" * 64}))
    return {
        "config missing": (["--config", str(tmp / "nope.yaml"), *ok], "does not exist"),
        "config not YAML": (["--config", str(tmp / "bad.yaml"), *ok], "not valid YAML"),
        "unknown key": (["--config", str(tmp / "unknown.yaml"), *ok], "did you mean 'micro_batch_size'"),
        "mistyped value": (["--config", "tinystories.yaml", *ok, "--set", "cutoff_len=long"], "cutoff_len='long' should be int"),
        "mistyped in file": (["--config", str(tmp / "mistyped.yaml"), *ok], "cutoff_len='long' should be int"),
        "base without mask": (["--config", "tinystories.yaml", "--model", str(nomask), "--data", str(text)], f"has no {MASK_FILE}"),
        "data missing": (["--config", "tinystories.yaml", "--model", str(pruned), "--data", str(tmp / "no.txt")], "does not exist"),
        "data empty": (["--config", "tinystories.yaml", "--model", str(pruned), "--data", str(tmp / "empty.txt")], "is empty"),
        "record without field": (["--config", "tinystories.yaml", "--model", str(pruned), "--data", str(tmp / "norecord.json"), "--set", "data_format=auto"], "record 1 has no 'output'"),
        "batch not divisible": (["--config", "tinystories.yaml", *ok, "--set", "batch_size=10"], "not divisible by micro_batch_size"),
        "lora_dropout": (["--config", "tinystories.yaml", *ok, "--set", "lora_dropout=0.05"], "lora_dropout=0.05 is not supported"),
        "base breaks its mask": (["--config", "tinystories.yaml", "--model", str(broken), "--data", str(text), "--set", "batch_size=8", "--set", "val_set_size=8"], "are not +0.0 in the base weight"),
        "mask hash differs": (["--config", "tinystories.yaml", "--model", str(rehashed), "--data", str(text)], "the mask changed or this is a different base"),
        "output exists": (["--config", "tinystories.yaml", *ok], "already exists"),
    }


def test_cli_bad_inputs_fail_with_one_line_and_leave_nothing(pruned_tiny_dir, text_file, tmp_path):
    from spp.cli import app

    cases = _bad_inputs(tmp_path, pruned_tiny_dir, text_file)
    runner = CliRunner()
    for name, (args, message) in cases.items():
        output = tmp_path / ("exists" if name == "output exists" else f"out-{name.replace(' ', '-')}")
        result = runner.invoke(app, ["train", *args, "--output", str(output), "--max-steps", "1"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.stderr, result.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        assert not partial_path(output).exists(), name
        assert (output.exists() and not any(output.iterdir())) if name == "output exists" else not output.exists(), name


def test_cli_trains_from_a_bundled_config_in_any_directory(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    from spp.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir),
                                      "--data", str(text_file), "--output", "run", "--max-steps", "2",
                                      "--set", "cutoff_len=16", "--set", "batch_size=4", "--set", "micro_batch_size=4",
                                      "--set", "val_set_size=0"])
    assert result.exit_code == 0, result.stderr
    from spp.config import find_config, read_yaml

    resolved = read_yaml(tmp_path / "run" / "spp_config.yaml")
    # defaults < file < flags < --set: lr from the file (its spp entry), max_steps from the flag, cutoff_len from --set
    file_rate = read_yaml(find_config("tinystories.yaml"))["learning_rate"]["spp"]
    assert (resolved["learning_rate"], resolved["max_steps"], resolved["cutoff_len"], resolved["lr_scheduler"]) == (
        file_rate, 2, 16, "linear")


# --------------------------------------------------------------------------- quality on the real model


@pytest.mark.slow
def test_spp_recovers_perplexity_of_pruned_stories260k(shared_data, tmp_path):
    from conftest import build_pruned_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spp.adapter.model import load_adapter, merge_adapter
    from spp.io.reader import read_checkpoint
    from spp.sparsity import pruned_is_positive_zero

    source = shared_data / "stories260K-hf"
    tokenizer = AutoTokenizer.from_pretrained(source)
    pruned = build_pruned_dir(AutoModelForCausalLM.from_pretrained(source), tokenizer, tmp_path / "pruned", 0.5)
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:150_000])
    held_out = tokenize_stream(tokenizer, [text[-20_000:]])[: 16 * 64].view(16, 64)  # text training never sees

    def perplexity(model) -> float:
        with torch.no_grad():
            return math.exp(float(summed_nll(model(held_out).logits, held_out)) / target_count(held_out))

    out = tmp_path / "train"
    run_train(tiny_cfg(pruned, tmp_path / "train.txt", out, cutoff_len=64, batch_size=16, micro_batch_size=16,
                       max_steps=30, learning_rate=4e-3, val_set_size=0, save_steps=30, logging_steps=10))
    model = AutoModelForCausalLM.from_pretrained(pruned)
    before = perplexity(model)
    masks = read_checkpoint(pruned).masks_by_parameter()
    load_adapter(model, out, masks)
    after = perplexity(model)
    assert after < 0.9 * before, (before, after)
    merge_adapter(model, masks)
    assert perplexity(model) == pytest.approx(after, rel=1e-4)
    params = dict(model.named_parameters())
    assert len(masks) == 35 and all(bool(pruned_is_positive_zero(params[n], k).all()) for n, k in masks.items())


# --------------------------------------------------------------------------- examples without target tokens


@pytest.fixture(scope="module")
def stories_tiny_pruned(tmp_path_factory, shared_data) -> Path:
    """The hidden-64 tiny LLaMA with the stories260K tokenizer files, pruned by `spp prune` (Wanda 2:4)."""
    from conftest import save_tiny_stories_llama
    from spp.config import PruneConfig
    from spp.prune import run_prune

    root = tmp_path_factory.mktemp("stories_tiny")
    calib = root / "calib.txt"
    calib.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:20000])
    run_prune(PruneConfig(model=str(save_tiny_stories_llama(root / "dense", shared_data)), output=str(root / "pruned"),
                          method="wanda", pattern="2:4", calib=str(calib), nsamples=4, seqlen=64, device="cpu"))
    return root / "pruned"


def alpaca_with_long_prompts(path: Path, n_long: int, n_short: int) -> Path:
    """Records whose prompt alone is longer than 128 tokens, and records that fit, interleaved."""
    long = {"instruction": "Summarise the text.", "input": "the cat sat on the mat " * 60, "output": "A cat sat."}
    short = {"instruction": "Say hello.", "input": "", "output": "Hello there, my friend."}
    records = [long] * n_long + [short] * n_short
    path.write_text(json.dumps([records[(7 * i) % len(records)] for i in range(len(records))]))
    return path


def test_examples_without_targets_are_dropped_before_the_split(stories_tiny_pruned, tmp_path, capfd):
    # The case from the issue: 15 of 16 prompts fill cutoff_len; what is left is less than one global batch.
    data = alpaca_with_long_prompts(tmp_path / "issue.json", n_long=15, n_short=1)
    cfg = tiny_cfg(stories_tiny_pruned, data, tmp_path / "refused", cutoff_len=128, train_on_inputs=False,
                   micro_batch_size=4, batch_size=4, val_set_size=0)
    with pytest.raises(SppError, match="only 1 training examples"):
        run_train(cfg)
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: dropped")]
    assert notes == [f"note: dropped 15 of 16 examples of {data} that have no target token within cutoff_len=128 "
                     "(their prompts fill it)"]

    # With enough examples left, every step has targets and every logged loss is a real one.
    data = alpaca_with_long_prompts(tmp_path / "mixed.json", n_long=15, n_short=9)
    out = tmp_path / "train"
    report = run_train(tiny_cfg(stories_tiny_pruned, data, out, cutoff_len=128, train_on_inputs=False,
                                micro_batch_size=4, batch_size=4, val_set_size=1, max_steps=4))
    assert "dropped 15 of 24" in capfd.readouterr().err
    assert (report.train_examples, report.val_examples) == (8, 1)
    steps = [r for r in log_records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["targets"] > 0 and r["loss"] > 0 for r in steps) and report.train_loss > 0


# --------------------------------------------------------------------------- adapter kinds


def test_learning_rate_defaults_to_the_adapters_and_a_mapping_picks_the_chosen_one():
    from spp.adapter import DEFAULT_LEARNING_RATE

    for kind, rate in DEFAULT_LEARNING_RATE.items():
        assert merge_into(TrainConfig, [("test", {"adapter": kind})]).learning_rate == rate
    per_kind = {"spp": 1e-2, "masked_lora": 2e-2}
    assert merge_into(TrainConfig, [("f", {"adapter": "masked_lora", "learning_rate": per_kind})]).learning_rate == 2e-2
    assert merge_into(TrainConfig, [("f", {"adapter": "full", "learning_rate": per_kind})]).learning_rate == (
        DEFAULT_LEARNING_RATE["full"])  # a kind the mapping leaves out gets its default
    assert merge_into(TrainConfig, [("f", {"learning_rate": 3e-3})]).learning_rate == 3e-3
    with pytest.raises(SppError, match=r"^learning_rate: unknown adapter kind 'lora' \(valid kinds"):
        merge_into(TrainConfig, [("f", {"learning_rate": {"lora": 1e-3}})])
    with pytest.raises(SppError, match="adapter='lora' should be one of 'spp', 'masked_lora', 'full'"):
        merge_into(TrainConfig, [("--set", {"adapter": "lora"})])


@pytest.mark.parametrize("kind", ["masked_lora", "full"])
def test_every_kind_resumes_bit_for_bit(pruned_tiny_dir, text_file, tmp_path, monkeypatch, kind):
    """Ctrl-C after step 2 (the checkpoint holds the adapter tensors and AdamW's state), then --resume."""
    from spp.errors import SppInterrupted

    settings = dict(max_steps=4, val_set_size=0, adapter=kind, weight_decay=0.1)
    run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "straight", **settings))
    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")
    with pytest.raises(SppInterrupted):
        run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "resumed", **settings))
    monkeypatch.delenv("SPP_FAULT")
    report = run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "resumed", resume=True, **settings))
    assert report.resumed_from == 2
    straight, resumed = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_takes_the_same_paths_spelled_another_way(pruned_tiny_dir, text_file, tmp_path, monkeypatch):
    """Interrupted with relative paths, resumed with `./base/` and absolute ones: the same run (the paths are
    compared as the files they name, `spp.io.conditions.spelled_alike`), continued to the straight run's adapter."""
    shutil.copytree(pruned_tiny_dir, tmp_path / "base")
    shutil.copy(text_file, tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    settings = dict(max_steps=6, val_set_size=0)
    interrupt_at_step_3(tiny_cfg("base", "text.txt", "out", **settings), monkeypatch)
    report = run_train(tiny_cfg("./base/", tmp_path / "text.txt", tmp_path / "out", resume=True, **settings))
    assert report.resumed_from == 3
    run_train(tiny_cfg("base", "text.txt", "straight", **settings))
    straight, resumed = adapter(tmp_path / "straight"), adapter(tmp_path / "out")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    shutil.copy(text_file, tmp_path / "other.txt")
    interrupt_at_step_3(tiny_cfg("base", "text.txt", "again", **settings), monkeypatch)
    with pytest.raises(SppError, match="data_path was 'text.txt' in the interrupted run but is 'other.txt'"):
        run_train(tiny_cfg("base", "other.txt", "again", resume=True, **settings))  # another file: another setting


@pytest.mark.parametrize("kind", ["spp", "masked_lora", "full"])
def test_every_kind_evaluates_unmerged_as_merged_and_the_merge_verifies(pruned_tiny_dir, text_file, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from spp.adapter.model import load_adapter
    from spp.config import EvalConfig, MergeConfig
    from spp.eval import run_eval
    from spp.io.checkpoint import read_json
    from spp.io.reader import read_checkpoint
    from spp.merge import run_merge
    from spp.verify import verify_checkpoint

    report = run_train(tiny_cfg(pruned_tiny_dir, text_file, tmp_path / "train", max_steps=3, val_set_size=0,
                                adapter=kind, spp_row_groups=4, rank=4))
    assert read_json(tmp_path / "train" / "adapter_config.json")["kind"] == kind
    assert report.trainable_params == sum(t.numel() for t in adapter(tmp_path / "train").values())
    run_merge(MergeConfig(model=str(pruned_tiny_dir), adapter=str(tmp_path / "train"), output=str(tmp_path / "merged")))
    verify_checkpoint(tmp_path / "merged")

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    unmerged = AutoModelForCausalLM.from_pretrained(pruned_tiny_dir).eval()
    load_adapter(unmerged, tmp_path / "train", read_checkpoint(pruned_tiny_dir).masks_by_parameter())
    with torch.no_grad():
        expected, merged, pruned = (m(ids).logits for m in (unmerged, AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged").eval(), AutoModelForCausalLM.from_pretrained(pruned_tiny_dir).eval()))
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (merged - pruned).abs().max() > 1e-4

    ppl = {}
    for name, model, extra in (("unmerged", pruned_tiny_dir, {"adapter": str(tmp_path / "train")}),
                               ("merged", tmp_path / "merged", {})):
        results = run_eval(EvalConfig(model=str(model), ppl=[str(text_file)], seqlen=32, max_windows=4,
                                      device="cpu", dtype="float32", **extra)).results
        (ppl[name],) = (entry["ppl"] for entry in results["perplexity"].values())
    assert ppl["unmerged"] == pytest.approx(ppl["merged"], rel=1e-5)


def test_cli_set_adapter_trains_that_kind(pruned_tiny_dir, text_file, tmp_path):
    from spp.cli import app
    from spp.io.checkpoint import read_json

    result = CliRunner().invoke(app, ["train", "--config", "tinystories.yaml", "--model", str(pruned_tiny_dir),
                                      "--data", str(text_file), "--output", str(tmp_path / "run"), "--max-steps", "1",
                                      "--set", "adapter=masked_lora", "--set", "rank=2", "--set", "batch_size=4",
                                      "--set", "micro_batch_size=4", "--set", "cutoff_len=16", "--set", "val_set_size=0"])
    assert result.exit_code == 0, result.stderr
    cfg = read_json(tmp_path / "run" / "adapter_config.json")
    assert (cfg["kind"], cfg["rank"], cfg["scale"]) == ("masked_lora", 2, 8.0)
    assert sorted({k.rpartition(".")[2] for k in adapter(tmp_path / "run")}) == ["lora_A", "lora_B"]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["spp", "masked_lora", "full"]), lr=st.sampled_from([1e-2, 0.3]),
       weight_decay=st.sampled_from([0.0, 0.5]), stop=st.integers(1, 2), seed=st.integers(0, 100))
def test_no_kind_makes_a_pruned_entry_nonzero_through_train_resume_merge_reload(
        pruned_tiny_dir, text_file, monkeypatch, kind, lr, weight_decay, stop, seed):
    """Train (interrupted after `stop` steps, then resumed), save, merge the files, reload with plain transformers:
    every entry the mask marks pruned is +0.0 bitwise in the saved checkpoint's effective weights and the merged model."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from spp.adapter.model import load_adapter
    from spp.config import MergeConfig
    from spp.errors import SppInterrupted
    from spp.io.reader import read_checkpoint
    from spp.merge import run_merge
    from spp.sparsity import pruned_is_positive_zero
    from spp.train import check_pruned_zeros
    from spp.train.loop import checkpoint_dirs

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train"
        settings_ = dict(max_steps=3, val_set_size=0, adapter=kind, learning_rate=lr, weight_decay=weight_decay,
                         seed=seed, spp_row_groups=4, rank=2, save_steps=1)
        monkeypatch.setenv("SPP_FAULT", f"train_sigint:{stop}")
        with pytest.raises(SppInterrupted):
            run_train(tiny_cfg(pruned_tiny_dir, text_file, out, **settings_))
        monkeypatch.delenv("SPP_FAULT")
        run_train(tiny_cfg(pruned_tiny_dir, text_file, out, resume=True, **settings_))
        masks = read_checkpoint(pruned_tiny_dir).masks_by_parameter()
        for saved in [out, *checkpoint_dirs(out)]:  # the final adapter and every kept checkpoint
            model = AutoModelForCausalLM.from_pretrained(pruned_tiny_dir)
            load_adapter(model, saved, masks)
            check_pruned_zeros(model, masks)  # base and effective weights, any kind
        run_merge(MergeConfig(model=str(pruned_tiny_dir), adapter=str(out), output=str(Path(tmp) / "merged")))
        merged = dict(AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged").named_parameters())
        pruned = dict(AutoModelForCausalLM.from_pretrained(pruned_tiny_dir).named_parameters())
        assert all(bool(pruned_is_positive_zero(merged[name], keep).all()) for name, keep in masks.items())
        assert any(not torch.equal(merged[name], pruned[name]) for name in masks)
