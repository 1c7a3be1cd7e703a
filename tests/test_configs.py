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
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_name_resolves_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = find_config(path.name)
    assert found.read_text() == path.read_text()
