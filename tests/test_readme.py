"""The README cannot rot: every fenced block marked ```bash test runs here, with fixture paths substituted.

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

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def marked_blocks() -> list[str]:
    return [body for info, body in FENCE.findall(README.read_text()) if info.split()[:2] == ["bash", "test"]]


def test_readme_marks_blocks_for_testing():
    blocks = marked_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        for line in block.splitlines():
            if line.strip() and not line.startswith("#"):
                assert line.split()[0] in {"spp", "export", "cat"}, f"untestable line in a `bash test` block: {line}"


@pytest.mark.parametrize("index", range(len(marked_blocks())))
def test_readme_block_runs(index, tmp_path, shared_data):
    block = marked_blocks()[index]
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
    assert result.returncode == 0, f"README block {index} failed:\n{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if "spp run" in script:
        assert "skipped (up to date)" in result.stdout and (work / "runs" / "stories" / "report.md").is_file()


def test_readme_pipeline_example_is_the_bundled_file():
    """The `spp run` section shows configs/pipeline_stories.yaml; the two must say the same thing."""
    section = README.read_text().split("## spp run: the whole chain from one file", 1)[1]
    example = next(body for info, body in FENCE.findall(section) if info.strip() == "yaml")
    bundled = README.parent / "configs" / "pipeline_stories.yaml"
    assert yaml.safe_load(example) == yaml.safe_load(bundled.read_text())
