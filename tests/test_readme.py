"""The README and docs/ cannot rot: every fenced block marked ```bash test in README.md or in docs/**/*.md runs here,
with fixture paths substituted.

Blocks marked plain ```bash (installing, GPUs, several processes, synopses with placeholders) are not run.
`configs/pipeline_stories.yaml` becomes a pipeline over the tiny fixture model of test_pipeline.py (same
keys, output `runs/stories`), and `../shared/data` the real shared data directory (skipped when absent).
Each block runs in bash with `set -e`, in a fresh working directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline import make_fixture, pipeline_dict

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
ALLOWED = {"spp", "export", "cat"}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def marked_blocks() -> list[tuple[str, str]]:
    """(file relative to the repository root, block body) for every ```bash test block, in page order."""
    return [(str(page.relative_to(ROOT)), body) for page in pages()
            for info, body in FENCE.findall(page.read_text()) if info.split()[:2] == ["bash", "test"]]


BLOCKS = marked_blocks()
IDS = [f"{name}-{sum(n == name for n, _ in BLOCKS[:i])}" for i, (name, _) in enumerate(BLOCKS)]


def test_readme_marks_blocks_for_testing():
    assert sum(name == "README.md" for name, _ in BLOCKS) >= 2
    for name, block in BLOCKS:
        for line in block.splitlines():
            if line.strip() and not line.startswith("#"):
                assert line.split()[0] in ALLOWED, f"untestable line in a `bash test` block of {name}: {line}"


def test_marked_blocks_are_collected_from_docs_too(tmp_path, monkeypatch):
    """A `bash test` block in any docs page (subfolders included) is collected, named by its file."""
    root = tmp_path / "repo"
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "README.md").write_text("```bash test\nspp --help\n```\n")
    (root / "docs" / "sub" / "page.md").write_text("```bash\nnot run\n```\n```bash test\nspp --version\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    monkeypatch.setattr(sys.modules[__name__], "README", root / "README.md")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", root / "docs")
    assert marked_blocks() == [("README.md", "spp --help\n"), ("docs/sub/page.md", "spp --version\n")]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=IDS)
def test_readme_block_runs(index, tmp_path, shared_data):
    name, block = BLOCKS[index]
    fixture = make_fixture(tmp_path / "fixture")
    pipeline = pipeline_dict(fixture, Path("runs/stories"))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    script = block.replace("configs/pipeline_stories.yaml", str(tmp_path / "pipeline.yaml"))
    script = script.replace("../shared/data", str(shared_data))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=work, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{name} block {IDS[index]} failed:\n{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if "spp run" in script:
        assert "skipped (up to date)" in result.stdout and (work / "runs" / "stories" / "report.md").is_file()


def test_readme_example_outputs_are_git_ignored():
    """Running the README's blocks from the repository root leaves nothing for `git status` to show."""
    ignored = set((ROOT / ".gitignore").read_text().split())
    outputs = {out for name, block in BLOCKS if name == "README.md" for out in re.findall(r"--output (\S+)", block)}
    assert outputs >= {"pruned", "train", "merged", "train-alpaca"}
    for out in outputs:
        assert f"/{out.strip('/')}/" in ignored, f"{out}/ is not in .gitignore"


@pytest.mark.parametrize("command", ["prune", "train", "merge", "export", "eval", "run", "demo"])
def test_commands_md_usage_lines_name_every_flag(command):
    """Each command's synopsis in docs/commands.md (its section's first ```bash block, or for `run` and `demo` the
    inline `spp COMMAND ...`) names every option the command takes."""
    import typer.main

    from spp.cli import app

    params = typer.main.get_command(app).commands[command].params
    flags = {opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}
    section = (DOCS / "commands.md").read_text().split(f"\n## spp {command}", 1)[1].split("\n## ", 1)[0]
    bash = [body for info, body in FENCE.findall(section) if info.strip() == "bash"]
    usage = bash[0] if command not in ("run", "demo") else re.search(rf"`spp {command} [^`]*`", section)[0]
    assert flags - set(re.findall(r"--[a-z][a-z-]*", usage)) == set(), usage


def test_the_spp_formula_is_written_once():
    """W ⊙ (1 + s·Â ⊙ β·1ᵀ) lives in docs/adapter.md; every other page links there."""
    assert [p for p in pages() if "Â" in p.read_text()] == [DOCS / "adapter.md"]


def test_pipeline_example_is_the_bundled_file():
    """docs/commands.md's `spp run` section shows configs/pipeline_stories.yaml; the two must say the same thing."""
    section = (DOCS / "commands.md").read_text().split("## spp run: the whole chain from one file", 1)[1]
    example = next(body for info, body in FENCE.findall(section) if info.strip() == "yaml")
    bundled = ROOT / "configs" / "pipeline_stories.yaml"
    assert yaml.safe_load(example) == yaml.safe_load(bundled.read_text())


def test_readme_is_a_front_door():
    """Short, and every docs page is findable from it."""
    text = README.read_text()
    assert len(text.splitlines()) < 200
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(text) if not target.startswith("http")}
    for page in sorted(DOCS.glob("*.md")):
        assert page.resolve() in linked, f"{page.relative_to(ROOT)} is not linked from the README"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = "".join(part for i, part in enumerate(re.split(r"^```", page.read_text(), flags=re.M)) if i % 2 == 0)
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
