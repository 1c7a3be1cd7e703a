"""spp.quiet: every allow-listed library message is dropped (one test each), nothing else is, truncation comes
back as one counted line, lm-eval's git probe stays silent, and a real `spp eval` prints none of them."""

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spp.quiet import NOISE, NoiseFilter, quiet_output

# One message as lm-eval 0.4 really writes it, per allow-list entry.
EXAMPLES = {
    "aggregation": "[Task: boolq_local] metric acc is defined, but aggregation is not. using default aggregation=mean",
    "higher_is_better": "[Task: boolq_local] metric acc is defined, but higher_is_better is not. using default "
                        "higher_is_better=True",
    "pretrained_not_str": "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored. "
                          "Please do not launch via accelerate or use `parallelize=True` if passing an existing model "
                          "this way.",
    "pretrained_initialized": "Passed an already-initialized model through `pretrained`, assuming single-process call "
                              "to evaluate() or custom distributed integration",
    "num_fewshot_default": "Overwriting default num_fewshot of boolq_local from None to 0",
    "truncation": "Combined length of context (944) and continuation (2) exceeds model's maximum length (512). "
                  "Truncating 435 tokens from the left.",
}
ENTRIES = {entry.name: entry for entry in NOISE}


def warned(caplog, logger: str, message: str, verbose: bool = False) -> list[str]:
    """The messages that get through when `message` is logged as a warning on `logger` inside quiet_output.

    Read by a handler on `logger` itself, after its filters: transformers < 5.25 stops its loggers' records from
    propagating to the root logger, where caplog listens."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING), quiet_output(verbose=verbose):
            target.warning(message)
    finally:
        target.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_every_entry_has_an_example():
    assert set(EXAMPLES) == set(ENTRIES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_allow_listed_message_is_dropped(caplog, name):
    assert warned(caplog, ENTRIES[name].logger, EXAMPLES[name]) == []


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_verbose_shows_it(caplog, name):
    assert warned(caplog, ENTRIES[name].logger, EXAMPLES[name], verbose=True) == [EXAMPLES[name]]


@pytest.mark.parametrize("logger, message", [
    ("lm_eval.models.huggingface", "Failed to get model SHA for /some/model"),  # unlisted, same logger
    ("lm_eval.api.task", "[Task: boolq_local] metric acc is defined, but aggregation is not"),  # missing the '.'
    ("lm_eval.evaluator", "Overwriting default num_fewshot of arc_easy from 5 to 0"),  # a real default overridden
    ("lm_eval.api.task", EXAMPLES["pretrained_not_str"]),  # a listed message from another logger
    ("transformers.modeling_utils", EXAMPLES["truncation"]),
])
def test_everything_else_still_shows(caplog, logger, message):
    assert warned(caplog, logger, message) == [message]


def test_filters_leave_with_the_context(caplog):
    logger = logging.getLogger(ENTRIES["truncation"].logger)
    with quiet_output():
        pass
    assert not any(isinstance(f, NoiseFilter) for f in logger.filters)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logger.warning(EXAMPLES["truncation"])
    assert [r.getMessage() for r in caplog.records] == [EXAMPLES["truncation"]]


def test_truncation_is_counted_into_one_line(caplog):
    logger = logging.getLogger(ENTRIES["truncation"].logger)
    with caplog.at_level(logging.WARNING), quiet_output() as noise:
        assert noise.summary_lines() == []
        for length in (944, 835, 515):
            logger.warning("Combined length of context (%d) and continuation (2) exceeds model's maximum length "
                           "(512). Truncating %d tokens from the left.", length, length - 509)
    assert caplog.records == []
    assert noise.summary_lines() == ["lm-eval truncated 3 requests to the model's context of 512 tokens "
                                     "(dropping the start of each long prompt)"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_probe_is_silent_outside_a_checkout(tmp_path, monkeypatch, capfd):
    from lm_eval import evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never find a repository above tmp_path
    evaluator.get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err  # the noise is real without the context
    with quiet_output(lm_eval=True):
        assert evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""
    with quiet_output(lm_eval=True, verbose=True):
        evaluator.get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err


def spp_eval(shared_data: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """`spp eval` on BoolQ with the real stories model (512-token context: long passages are truncated)."""
    command = [str(Path(sys.executable).parent / "spp"), "eval", "--model", str(shared_data / "stories260K-hf"),
               "--tasks", "boolq", "--task-data", str(shared_data / "eval"), "--limit", "4", *extra]
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_real_spp_eval_prints_none_of_the_noise(shared_data, tmp_path):
    done = spp_eval(shared_data, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "boolq acc" in done.stdout
    for entry in NOISE:
        assert not re.search(entry.pattern, done.stderr), entry.name
    assert "not a git repository" not in done.stderr and "Generating validation split" not in done.stderr
    assert re.search(r"^lm-eval truncated \d+ requests to the model's context of 512 tokens", done.stderr, re.M)


def test_real_spp_eval_verbose_shows_everything(shared_data, tmp_path):
    done = spp_eval(shared_data, tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    for message in ("`pretrained` model kwarg is not of type `str`", "Combined length of context",
                    "not a git repository"):
        assert message in done.stderr
