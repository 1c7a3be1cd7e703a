"""`spp run`: end to end on a tiny fixture, stage skipping, re-running what changed, resume after SIGKILL, bad input;
and mixture-of-experts checkpoints through every stage from the command line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from spp.cli import app
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, MASK_FILE, RESULTS_FILE, sha256_file
from spp.pipeline import REPORT_JSON, REPORT_MD, run_pipeline

SETTINGS = ["wanda-2of4", "wanda-50pct"]
SETTING_FOLDERS = {"prune", "train", "merged", "eval"}


def make_fixture(root: Path) -> Path:
    """A random 2-layer LLaMA (hidden 32) with the demo's word-level tokenizer, plus train/held-out text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spp.demo import demo_corpus, demo_tokenizer

    train, heldout = demo_corpus(0, 150), demo_corpus(1, 40)
    tokenizer = demo_tokenizer(train + heldout)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text("\n".join(train))
    (root / "heldout.txt").write_text("\n".join(heldout))
    return root


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("pipeline-fixture"))


def pipeline_dict(fixture_dir: Path, output: Path, sweep=None) -> dict:
    return {
        "model": str(fixture_dir / "model"),
        "output": str(output),
        "prune": {"method": "wanda", "calib": str(fixture_dir / "train.txt"), "nsamples": 8, "seqlen": 64},
        "sweep": sweep or [{"pattern": "2:4"}, {"pattern": "unstructured", "sparsity": 0.5}],
        "train": {"data_path": str(fixture_dir / "train.txt"), "cutoff_len": 64, "micro_batch_size": 4,
                  "batch_size": 4, "max_steps": 6, "save_steps": 2, "logging_steps": 1, "learning_rate": 0.05},
        "eval": {"ppl": [str(fixture_dir / "heldout.txt")], "seqlen": 64},
    }


def write(path: Path, pipeline: dict) -> Path:
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def statuses(report) -> dict[str, str]:
    return {step.label: step.status for step in report.steps}


def manifest_mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob(MANIFEST_FILE))}


@pytest.fixture(scope="module")
def first_run(fixture_dir, tmp_path_factory):
    """The two-setting pipeline run once; later tests reuse its outputs."""
    root = tmp_path_factory.mktemp("run")
    path = write(root / "pipeline.yaml", pipeline_dict(fixture_dir, root / "run"))
    lines: list[str] = []
    report = run_pipeline(path, log=lines.append)
    return path, report, lines


def test_first_run_writes_the_layout_and_a_consistent_report(first_run, fixture_dir):
    path, report, _ = first_run
    run = report.output
    assert set(statuses(report).values()) == {"ran"}
    assert {p.name for p in run.iterdir()} == {"dense", *SETTINGS, REPORT_MD, REPORT_JSON}
    assert {p.name for p in (run / "dense").iterdir()} == {"eval"}
    for setting in SETTINGS:
        assert {p.name for p in (run / setting).iterdir()} == SETTING_FOLDERS
        assert {p.name for p in (run / setting / "eval").iterdir()} == {"pruned", "merged"}
        for folder in ("prune", "train", "merged", "eval/pruned", "eval/merged"):
            assert (run / setting / folder / MANIFEST_FILE).is_file()
        # merge keeps the mask file as it is
        assert sha256_file(run / setting / "prune" / MASK_FILE) == sha256_file(run / setting / "merged" / MASK_FILE)

    saved = json.loads((run / REPORT_JSON).read_text())
    rows = {row["model"]: row for row in saved["rows"]}
    for setting in SETTINGS:
        # the report's numbers are the eval folders' numbers
        for kind, label in (("pruned", f"{setting} pruned"), ("merged", f"{setting} + SPP (merged)")):
            results = json.loads((run / setting / "eval" / kind / RESULTS_FILE).read_text())
            (entry,) = results["perplexity"].values()
            assert rows[label][f"ppl heldout.txt @{entry['seqlen']}"] == entry["ppl"]
    # sparsity counted in the weights: pruned == merged == 1/2 for both settings
    by_setting = {s["setting"]: s for s in saved["settings"]}
    for setting in SETTINGS:
        info = by_setting[setting]
        pruned = load_file(str(run / setting / "prune" / "model.safetensors"))
        merged = load_file(str(run / setting / "merged" / "model.safetensors"))
        masked = [k for k in pruned if ".layers." in k and k.endswith("proj.weight")]
        zeros = sum(int((pruned[k] == 0).sum()) for k in masked) / sum(pruned[k].numel() for k in masked)
        assert info["sparsity_before"] == pytest.approx(zeros) and zeros == pytest.approx(0.5)
        assert info["sparsity_after"] == info["sparsity_before"] and info["sparsity_equal"] is True
        assert all(torch.equal(merged[k] == 0, pruned[k] == 0) for k in masked)
        # trainable parameters: α (r, in) + β (out,) for every linear layer in the decoder blocks, r = 16
        expected = sum(16 * pruned[k].shape[1] + pruned[k].shape[0] for k in masked)
        assert info["trainable_params"] == expected
    # SPP moved the weights: merged != pruned on the kept entries
    merged = load_file(str(run / "wanda-2of4" / "merged" / "model.safetensors"))
    pruned = load_file(str(run / "wanda-2of4" / "prune" / "model.safetensors"))
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], pruned["model.layers.0.mlp.up_proj.weight"])
    markdown = (run / REPORT_MD).read_text()
    for needle in ("| dense |", "wanda-2of4 + SPP (merged)", "spp prune --model", "spp train --config",
                   "spp merge --model", "spp eval --model", "peak memory"):
        assert needle in markdown


def test_second_run_does_no_work_and_says_so(first_run):
    path, report, _ = first_run
    before = manifest_mtimes(report.output)
    lines: list[str] = []
    again = run_pipeline(path, log=lines.append)
    assert set(statuses(again).values()) == {"skipped (up to date)"}
    assert len(lines) == len(again.steps) and all(line.endswith("skipped (up to date)") for line in lines)
    assert manifest_mtimes(report.output) == before
    assert again.rows == report.rows


def test_changed_settings_rerun_that_stage_and_the_ones_after(first_run):
    path, report, _ = first_run
    pipeline = yaml.safe_load(path.read_text())
    # only eval settings change: every eval re-runs, nothing else
    pipeline["eval"]["max_windows"] = 3
    changed = run_pipeline(write(path, pipeline), log=lambda line: None)
    for label, status in statuses(changed).items():
        assert status == ("ran" if "eval" in label else "skipped (up to date)"), label
    # one sweep entry's prune setting changes: that setting's chain re-runs, the other and dense do not
    pipeline["sweep"][1]["nsamples"] = 6
    changed = run_pipeline(write(path, pipeline), log=lambda line: None)
    for label, status in statuses(changed).items():
        assert status == ("ran" if label.startswith("wanda-50pct/") else "skipped (up to date)"), label
    # an output file removed behind the run's back makes its stage (and the ones after it) run again
    pipeline_run = report.output
    results = pipeline_run / "dense" / "eval" / RESULTS_FILE
    assert results.is_file()
    (pipeline_run / "wanda-2of4" / "merged" / "config.json").unlink()
    changed = run_pipeline(path, log=lambda line: None)
    assert statuses(changed)["wanda-2of4/merged"] == "ran"
    assert statuses(changed)["wanda-2of4/eval/merged"] == "ran"
    assert statuses(changed)["wanda-2of4/train"] == "skipped (up to date)"


def test_until_and_from_limit_the_stages(fixture_dir, tmp_path):
    path = write(tmp_path / "p.yaml", pipeline_dict(fixture_dir, tmp_path / "run", sweep=[{"pattern": "2:4"}]))
    result = CliRunner().invoke(app, ["run", str(path), "--from", "train"])
    assert result.exit_code == 1 and "wanda-2of4/prune is not up to date (no output yet)" in result.stderr
    assert not (tmp_path / "run").exists()
    lines = []
    report = run_pipeline(path, until_stage="prune", log=lines.append)
    assert "wanda-2of4/prune: running" in lines  # a first run gives no reason (it would say "no output yet")
    assert statuses(report) == {"wanda-2of4/prune": "ran", "wanda-2of4/train": "not run (after --until)",
                                "wanda-2of4/merged": "not run (after --until)", "dense/eval": "not run (after --until)",
                                "wanda-2of4/eval/pruned": "not run (after --until)",
                                "wanda-2of4/eval/merged": "not run (after --until)"}
    assert {p.name for p in (tmp_path / "run" / "wanda-2of4").iterdir()} == {"prune"}
    lines = []
    report = run_pipeline(path, from_stage="prune", until_stage="prune", force=True, log=lines.append)
    assert statuses(report)["wanda-2of4/prune"] == "ran"
    assert "wanda-2of4/prune: running (--force)" in lines  # a step that runs again says why


def test_killed_during_training_resumes_to_the_same_adapter(first_run, fixture_dir, tmp_path):
    _, reference, _ = first_run
    path = write(tmp_path / "p.yaml", pipeline_dict(fixture_dir, tmp_path / "run", sweep=[{"pattern": "2:4"}]))
    env = {**os.environ, "SPP_FAULT": "train_step:3", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as resumed below
    killed = subprocess.run([str(Path(sys.executable).parent / "spp"), "run", str(path)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = tmp_path / "run" / "wanda-2of4" / "train.partial"
    assert partial.is_dir() and not (tmp_path / "run" / "wanda-2of4" / "train").exists()
    lines: list[str] = []
    report = run_pipeline(path, log=lines.append)
    assert statuses(report)["wanda-2of4/prune"] == "skipped (up to date)"
    assert statuses(report)["wanda-2of4/train"] == "resumed"
    assert "wanda-2of4/train: resuming where it stopped (interrupted)" in lines
    resumed = load_file(str(tmp_path / "run" / "wanda-2of4" / "train" / ADAPTER_WEIGHTS_FILE))
    straight = load_file(str(reference.output / "wanda-2of4" / "train" / ADAPTER_WEIGHTS_FILE))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in straight.items() if k.endswith("beta"))


def test_ctrl_c_during_training_says_to_run_the_file_again(fixture_dir, tmp_path, monkeypatch):
    """The stage's own advice (`spp train ... --resume`) is not what continues a run: `spp run FILE` is."""
    path = write(tmp_path / "p.yaml", pipeline_dict(fixture_dir, tmp_path / "run", sweep=[{"pattern": "2:4"}]))
    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")
    result = CliRunner().invoke(app, ["run", str(path)])
    line = result.stderr.strip().splitlines()[-1]  # after the stage's "interrupt: saving a checkpoint ..." note
    assert line.startswith("error: wanda-2of4/train: interrupted at step 2 of") and "Traceback" not in result.output
    assert line.endswith(f"run `spp run {path}` again to continue where it stopped") and "spp train" not in line
    assert result.exit_code == 130
    monkeypatch.delenv("SPP_FAULT")
    lines: list[str] = []
    report = run_pipeline(path, until_stage="train", log=lines.append)
    assert statuses(report)["wanda-2of4/train"] == "resumed"


def test_killed_during_pruning_resumes_at_the_next_block(first_run, fixture_dir, tmp_path):
    _, reference, _ = first_run
    path = write(tmp_path / "p.yaml", pipeline_dict(fixture_dir, tmp_path / "run", sweep=[{"pattern": "2:4"}]))
    env = {**os.environ, "SPP_FAULT": "prune_block:0", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as resumed below
    killed = subprocess.run([str(Path(sys.executable).parent / "spp"), "run", str(path), "--until", "prune"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "run" / "wanda-2of4" / "prune.partial").is_dir()
    lines: list[str] = []
    report = run_pipeline(path, until_stage="prune", log=lines.append)
    assert statuses(report)["wanda-2of4/prune"] == "resumed"
    assert "wanda-2of4/prune: resuming where it stopped (interrupted)" in lines
    resumed = tmp_path / "run" / "wanda-2of4" / "prune"
    assert sha256_file(resumed / MASK_FILE) == sha256_file(reference.output / "wanda-2of4" / "prune" / MASK_FILE)
    assert sha256_file(resumed / "model.safetensors") == sha256_file(
        reference.output / "wanda-2of4" / "prune" / "model.safetensors")


def test_training_killed_under_another_thread_count_starts_over_and_the_report_names_the_conditions(
        fixture_dir, tmp_path):
    from spp.io.conditions import describe_conditions
    from spp.io.manifest import read_manifest

    other = 2 if torch.get_num_threads() == 1 else 1
    path = write(tmp_path / "p.yaml", pipeline_dict(fixture_dir, tmp_path / "run", sweep=[{"pattern": "2:4"}]))
    env = {**os.environ, "SPP_FAULT": "train_step:3", "OMP_NUM_THREADS": str(other)}
    killed = subprocess.run([str(Path(sys.executable).parent / "spp"), "run", str(path)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    lines: list[str] = []
    report = run_pipeline(path, log=lines.append)  # under this process's thread count: the checkpoint cannot continue
    refused = [line for line in lines if line.startswith("wanda-2of4/train: cannot resume (--resume: the interrupted run")]
    assert len(refused) == 1 and f"OMP_NUM_THREADS={other}" in refused[0] and refused[0].endswith("starting over")
    assert statuses(report)["wanda-2of4/prune"] == "skipped (up to date)"  # made under `other`, still valid
    assert statuses(report)["wanda-2of4/train"] == "ran"  # not "resumed": it started over
    train = tmp_path / "run" / "wanda-2of4" / "train"
    assert read_manifest(train).conditions["torch_threads"] == torch.get_num_threads()
    assert read_manifest(train).details["resumed_from"] == 0
    machine = describe_conditions(read_manifest(train).conditions)
    assert machine in report.machine and f"these stages ran with: {report.machine}." in report.markdown
    for stage in ("merged", "eval/merged"):  # every stage's manifest records its run conditions
        assert read_manifest(tmp_path / "run" / "wanda-2of4" / stage).conditions["torch_threads"] == torch.get_num_threads()


def test_reproduce_commands_rebuild_the_same_outputs(first_run, tmp_path):
    _, report, _ = first_run
    commands = {step.label: step.command for step in report.steps}
    prune = shlex.split(commands["wanda-2of4/prune"])
    out = str(tmp_path / "again")
    prune[prune.index("--output") + 1] = out
    result = CliRunner().invoke(app, prune[1:])
    assert result.exit_code == 0, result.output
    assert sha256_file(Path(out) / MASK_FILE) == sha256_file(report.output / "wanda-2of4" / "prune" / MASK_FILE)
    evaluate = shlex.split(commands["wanda-2of4/eval/merged"])
    evaluate[evaluate.index("--output") + 1] = str(tmp_path / "eval")
    assert CliRunner().invoke(app, evaluate[1:]).exit_code == 0
    again = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())["perplexity"]
    first = {row["model"]: row for row in report.rows}["wanda-2of4 + SPP (merged)"]  # the first run's number
    assert [v["ppl"] for v in again.values()] == [first[f"ppl heldout.txt @{v['seqlen']}"] for v in again.values()]


BAD = [
    ({"modle": "x"}, [], "unknown key 'modle'", "did you mean 'model'"),
    ({"model": None}, [], "p.yaml: model is required but not given", None),
    ({"prune": {"method": "wanda", "nsample": 4}}, [], "unknown key 'nsample'", "nsamples"),
    ({"prune": {"output": "elsewhere"}}, [], "prune.output is set by `spp run` itself", None),
    ({"train": {"max_step": 3}}, [], "unknown key 'max_step'", "max_steps"),
    ({"train": {"data_path": ""}}, [], "train: has no data_path", None),
    ({"eval": {"tasks": 5, "ppl": []}}, [], "tasks", None),
    ({"sweep": [{"pattern": "2:4"}, {"pattern": "2:4", "nsamples": 4}]}, [], "would both write into", "name"),
    ({"sweep": [{"pattern": "2:4", "name": "dense"}]}, [], "cannot be a setting folder name", None),
    ({"sweep": [{"pattern": "3:2"}]}, [], "3:2", None),
    ({"train": {"data_path": "/nonexistent/data.txt"}}, [], "train data_path: /nonexistent/data.txt does not exist",
     None),
    ({"prune": {"calib": "./missing.jsonl"}}, [], "prune calib: ./missing.jsonl does not exist", None),
    ({"eval": {"ppl": ["wikitext2:/nonexistent/wiki.txt"]}}, [], "eval ppl: /nonexistent/wiki.txt does not exist",
     None),
    ({}, ["--from", "trian"], "--from 'trian' is not a stage", "did you mean 'train'"),
    ({}, ["--until", "merge", "--from", "eval"], "--from eval comes after --until merge", None),
]


@pytest.mark.parametrize("change, flags, message, hint", BAD)
def test_bad_input_is_one_line_before_any_work(fixture_dir, tmp_path, change, flags, message, hint):
    pipeline = pipeline_dict(fixture_dir, tmp_path / "run")
    for key, value in change.items():
        if isinstance(value, dict) and key in pipeline:
            pipeline[key] = {**pipeline[key], **value}
        else:
            pipeline[key] = value
    result = CliRunner().invoke(app, ["run", str(write(tmp_path / "p.yaml", pipeline)), *flags])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0] and (hint is None or hint in lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_train_calib_inside_a_stage_folder_is_refused_before_any_work(fixture_dir, tmp_path):
    """Block-wise recovery reads `calib`: like every other input, it may not lie in a folder the run writes."""
    pipeline = pipeline_dict(fixture_dir, tmp_path / "run")
    inside = tmp_path / "run" / "wanda-2of4" / "prune" / "calib.txt"  # e.g. left there by hand
    inside.parent.mkdir(parents=True)
    inside.write_text((fixture_dir / "train.txt").read_text())
    pipeline["train"] = {k: v for k, v in pipeline["train"].items() if k not in ("max_steps", "save_steps")} | {
        "objective": "blockwise", "calib": str(inside)}
    result = CliRunner().invoke(app, ["run", str(write(tmp_path / "p.yaml", pipeline))])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: the wanda-2of4/prune folder {inside.parent} ") and "train calib:" in lines[0]
    assert [p.name for p in (tmp_path / "run").rglob("*") if p.is_file()] == ["calib.txt"]  # nothing ran


def test_missing_pipeline_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: config {tmp_path / 'nope.yaml'} does not exist (bundled configs: ")
    assert "pipeline_stories.yaml" in lines[0]


def test_a_setting_an_older_manifest_does_not_record_counts_as_its_default(tmp_path):
    """A stage folder made before a setting existed (a merge before `--dtype`) stays up to date while the setting
    is at its default, which is what that older spp did; at another value the stage reruns and says why."""
    from spp.config import MergeConfig, to_dict
    from spp.io.manifest import Manifest, write_manifest
    from spp.pipeline import stale_reason
    from spp.report import Step

    folder = tmp_path / "merged"
    folder.mkdir()
    cfg = MergeConfig(model=str(tmp_path / "prune"), output=str(folder))
    older = {k: v for k, v in to_dict(cfg).items() if k not in ("adapter", "dtype")}  # both at their defaults
    write_manifest(folder, Manifest(stage="merge", settings=older))
    assert stale_reason(Step("merge", "s", "s/merge", folder, cfg)) is None
    cfg.dtype = "bfloat16"
    assert stale_reason(Step("merge", "s", "s/merge", folder, cfg)) == "settings changed (dtype)"


# --------------------------------------------------------------------------- mixture of experts, stage by stage
# Tiny random Mixtral, Qwen3-MoE and OLMoE models (4 experts, top-2) with the stories260K tokenizer stand in for the
# real ones, through every stage from the command line: prune -> train -> merge -> verify -> eval. The stage-level
# math has its own tests (test_reader, test_prune, test_adapter); here the point is that the stages hand each other
# MoE checkpoints as users would: per-expert tensors on disk, fused experts in memory, one mask file keyed by the
# saved names.

from conftest import MOE_CONFIGS, one_line_error, saved_moe  # noqa: E402


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def expert_tensors(directory):
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        if shard.name != "masks.safetensors":
            state.update(load_file(str(shard)))
    return {name: t for name, t in state.items() if ".experts." in name}


def two_of_four(t):
    return bool(((t != 0).reshape(t.shape[0], -1, 4).sum(-1) <= 2).all())


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_moe_prune_train_merge_verify_eval(arch, tmp_path, shared_data, corpus):
    dense = saved_moe(tmp_path / "dense", arch, shared_data)
    cli("prune", "--model", dense, "--method", "wanda", "--pattern", "2:4", "--calib", corpus, "--nsamples", 8,
        "--seqlen", 64, "--output", tmp_path / "pruned", "--device", "cpu")
    cli("verify", tmp_path / "pruned")
    experts = expert_tensors(tmp_path / "pruned")
    assert experts and all(two_of_four(t) for t in experts.values())  # every saved expert matrix is 2:4
    router = [n for n in load_file(str(tmp_path / "pruned" / "model.safetensors")) if n.endswith("gate.weight")]
    assert router and all((load_file(str(tmp_path / "pruned" / "model.safetensors"))[n] != 0).all() for n in router)

    cli("train", "--config", "tinystories.yaml", "--model", tmp_path / "pruned", "--data", corpus,
        "--max-steps", 6, "--set", "eval_steps=6", "--set", "logging_steps=6", "--set", "cutoff_len=64",
        "--set", "micro_batch_size=8", "--set", "batch_size=8", "--output", tmp_path / "train")
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0], val  # SPP on every linear and expert weight lowers the validation loss
    adapter = load_file(str(tmp_path / "train" / "adapter_model.safetensors"))
    assert any(".experts.gate_up_proj." in k for k in adapter) and any(".experts.down_proj." in k for k in adapter)
    assert not any(".gate." in k or k.split(".")[-2] == "gate" for k in adapter)  # the router is not adapted

    cli("merge", "--model", tmp_path / "pruned", "--adapter", tmp_path / "train", "--output", tmp_path / "merged")
    cli("verify", tmp_path / "merged")
    merged = expert_tensors(tmp_path / "merged")
    assert merged.keys() == experts.keys()
    assert all(bool(((experts[n] == 0) <= (merged[n] == 0)).all()) for n in merged)  # every pruned zero stays zero
    assert any(not torch.equal(merged[n], experts[n]) for n in merged)  # and the experts did change

    ppl = {}
    for name, extra in (("merged", ["--model", tmp_path / "merged"]),
                        ("adapter", ["--model", tmp_path / "pruned", "--adapter", tmp_path / "train"])):
        cli("eval", *extra, "--ppl", corpus, "--seqlen", 64, "--max-windows", 4, "--device", "cpu",
            "--output", tmp_path / f"eval-{name}")
        ppl[name] = json.loads((tmp_path / f"eval-{name}" / "results.json").read_text())
    assert ppl["merged"]["perplexity"] == ppl["adapter"]["perplexity"], ppl


def test_moe_zero_shot_eval_and_export_of_a_pruned_model(tmp_path, shared_data):
    dense = saved_moe(tmp_path / "dense", "mixtral", shared_data)
    cli("prune", "--model", dense, "--method", "magnitude", "--pattern", "2:4", "--output", tmp_path / "pruned")
    cli("export", "--model", tmp_path / "pruned", "--output", tmp_path / "packed")  # per-expert masks compress too
    details = json.loads((tmp_path / "packed" / "spp_manifest.json").read_text())["details"]
    assert details["masked_tensors"] == 2 * (4 + 3 * 4) and details["ratio"] <= 0.55  # 4 attention + 12 expert each
    refused = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "packed"), "--ppl", "x.txt"])
    one_line_error(refused, "is an `spp export` compressed checkpoint", "spp export --dense")
    cli("export", "--dense", "--model", tmp_path / "packed", "--output", tmp_path / "restored")
    for name in ("model.safetensors", MASK_FILE):
        assert (tmp_path / "restored" / name).read_bytes() == (tmp_path / "pruned" / name).read_bytes()
    cli("eval", "--model", tmp_path / "pruned", "--tasks", "boolq", "--task-data", shared_data / "eval",
        "--limit", 8, "--device", "cpu", "--output", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    boolq = results["zeroshot"]["tasks"]["boolq"]
    assert boolq["n"] == 8 and 0 <= boolq["acc"] <= 1
    assert results["sparsity"]["sparsity"] == pytest.approx(0.5)  # the expert weights are counted: all 2:4


def test_prune_command_carries_keys_that_have_no_flag_as_set():
    """`spp run`'s reproduce command once refused a prune section setting percdamp, blocksize or dsnot_threshold
    (config keys with no flag); they go through `--set` and rebuild the same config."""
    from spp.config import PruneConfig, merge_into, parse_set
    from spp.pipeline import prune_command

    cfg = PruneConfig(model="m", output="o", method="sparsegpt", percdamp=0.02, blocksize=64, refine="dsnot",
                      dsnot_threshold=1e-3, calib="c.txt")
    words = shlex.split(prune_command(cfg))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert sorted(s.split("=")[0] for s in sets) == ["blocksize", "dsnot_threshold", "percdamp"]
    flags = {"model": "m", "output": "o", "method": "sparsegpt", "refine": "dsnot", "calib": "c.txt"}
    assert merge_into(PruneConfig, [("flags", flags), ("--set", parse_set(sets))]) == cfg
