"""Every bundled config in configs/: it opens with its purpose and the command that runs it, and it loads
into the config class of that command without an unknown or mistyped key."""

import dataclasses
import re
from pathlib import Path

import pytest

from spp import config as spp_config
from spp.config import find_config, merge_into, read_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
STAGES = {"prune": "PruneConfig", "train": "TrainConfig", "merge": "MergeConfig", "eval": "EvalConfig",
          "run": "PipelineConfig"}
# `spp run` takes the pipeline file as its argument; every other stage takes `--config NAME`.
COMMAND = r"spp (?:(run) (?:configs/)?|(\w+) [^\n]*--config ){name}"


def stage_named(text: str, path: Path) -> str | None:
    """The stage of the `spp <stage> ... --config NAME` (or `spp run [configs/]NAME`) command in `text`."""
    match = re.search(COMMAND.format(name=re.escape(path.name)), text)
    return (match.group(1) or match.group(2)) if match else None


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])


def test_there_are_configs():
    assert {"alpaca.yaml", "tinystories.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_purpose_and_command(path):
    text = header(path)
    assert text.startswith("# ") and len(text.splitlines()) >= 2, "open with a comment saying what it is for"
    assert stage_named(text, path) in STAGES, "the header names the exact `spp <stage> --config NAME` command"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_into_its_stage(path):
    stage = stage_named(header(path), path)
    cls = getattr(spp_config, STAGES[stage])
    required = {f.name: "placeholder" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = read_yaml(path)
    assert values, f"{path.name} sets no keys"
    cfg = merge_into(cls, [("required", required), (path.name, values)])
    for key, value in values.items():
        if key == "learning_rate" and isinstance(value, dict):  # a rate per adapter kind: the chosen kind's
            value = value[cfg.adapter]
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_name_resolves_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = find_config(path.name, kind="pipeline" if stage_named(header(path), path) == "run" else "train")
    assert found.read_text() == path.read_text()


@pytest.mark.parametrize("name", [p.name for p in CONFIGS if p.name.startswith("pipeline_")])
def test_a_pipeline_is_refused_as_a_train_config_in_one_line(name, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spp.cli import app

    monkeypatch.chdir(tmp_path)
    for value in (name, str(Path(__file__).resolve().parents[1] / "configs" / name)):  # bundled name, then a path
        result = CliRunner().invoke(app, ["train", "--config", value, "--model", "m", "--data", "d.txt"])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"is an `spp run` pipeline, not a train config: run it with `spp run {value}`" in result.stderr
        assert "unknown key" not in result.stderr and "pipeline_" not in result.stderr.split("bundled train configs")[1]


def test_train_help_and_commands_md_name_every_bundled_train_config():
    from typer.testing import CliRunner

    from spp.cli import app

    names = [p.name for p in CONFIGS if stage_named(header(p), p) == "train"]
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"]).output.split())
    commands = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    section = commands.split("\n## spp train\n", 1)[1].split("\n## ", 1)[0]
    for name in names:
        assert name in help_text and f"`{name}`" in section, name


@pytest.mark.parametrize("kind", ["train", "pipeline"])
def test_a_missing_config_lists_the_bundled_ones_of_its_kind(kind):
    names = [p.name for p in CONFIGS if (stage_named(header(p), p) == "run") == (kind == "pipeline")]
    with pytest.raises(spp_config.SppError, match=re.escape(f"(bundled configs: {', '.join(names)})")):
        find_config("nope.yaml", kind=kind)
