"""scripts/quickstart.sh installs what each use needs: `demo` spp alone, `test` spp with its test extras.

The script runs in a copy of itself whose `.venv/bin` holds stubs that log their arguments,
so nothing is installed and no network is used.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh"
STUB = '#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/calls.log"\n'


def run_quickstart(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "quickstart.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "pip", "spp"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "quickstart.sh"), *args], capture_output=True,
                          text=True, timeout=60)
    log = bin_dir / "calls.log"
    return done, log.read_text().splitlines() if log.is_file() else []


@pytest.mark.parametrize("what, install, runs", [
    ("demo", "pip install -q -c constraints.txt -e .", "spp demo --output d"),
    ("test", "pip install -q -c constraints.txt -e .[test]", "python -m pytest --output d"),
])
def test_installs_only_what_it_runs(tmp_path, what, install, runs):
    done, calls = run_quickstart(tmp_path, what, "--output", "d")
    assert done.returncode == 0, done.stderr
    assert [c for c in calls if c.startswith("pip ")] == [install]
    assert calls[-1] == runs


def test_constraints_none_installs_unpinned(tmp_path, monkeypatch):
    monkeypatch.setenv("SPP_CONSTRAINTS", "none")
    done, calls = run_quickstart(tmp_path, "demo")
    assert done.returncode == 0, done.stderr
    assert [c for c in calls if c.startswith("pip ")] == ["pip install -q -e ."]


def test_unknown_use_installs_nothing(tmp_path):
    done, calls = run_quickstart(tmp_path, "bench")
    assert done.returncode == 2 and "usage: bash scripts/quickstart.sh {demo|test}" in done.stderr
    assert calls == []
