"""constraints.txt pins the whole `[test]` install; `spp env` reports versions against it."""

from importlib import metadata

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from spp.cli import app
from spp.env import CONSTRAINTS, normalize, read_constraints


def closure(name: str, extras: set[str]) -> set[str]:
    """The installed distributions `name[extras]` needs, transitively, on this platform (markers evaluated)."""
    seen: set[str] = set()
    todo = [(name, frozenset(extras))]
    while todo:
        dist, wanted = todo.pop()
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            key = normalize(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


CUDA_ONLY = ("nvidia-", "cuda-", "triton")  # a CUDA build of torch pulls these; scripts/lock.sh leaves them out


def test_constraints_pin_the_whole_test_install():
    pins = read_constraints()
    differ = [n for n in ("torch", "transformers", "lm-eval") if metadata.version(n).split("+")[0] != pins.get(n)]
    if differ:  # another resolution (the lower bounds, scripts/check_newest.sh) has another closure
        pytest.skip(f"not the pinned install ({', '.join(differ)} differ from constraints.txt)")
    needed = {n for n in closure("spp-llm", {"test"}) if not n.startswith(CUDA_ONLY)}
    assert {"torch", "transformers", "lm-eval", "pytest", "numpy"} <= needed
    unpinned = sorted(needed - set(pins))
    assert not unpinned, f"constraints.txt misses {unpinned}: regenerate it with `bash scripts/lock.sh`"


def test_constraints_work_on_every_platform():
    text = CONSTRAINTS.read_text()
    assert "bash scripts/lock.sh" in text.splitlines()[1]
    pins = read_constraints()
    assert all("+" not in version for version in pins.values()), "a local version tag (+cpu) is pinned"
    assert not [name for name in pins if name.startswith(CUDA_ONLY)]


def test_spp_env_reports_versions_against_the_pins():
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for name in ("spp", "python", "os", "torch", "transformers", "accelerate", "datasets", "lm-eval", "safetensors",
                 "kernels"):
        assert name in rows, result.output
    version = metadata.version("transformers")
    assert version in rows["transformers"]
    expected = "pinned" if read_constraints()["transformers"] == version else f"pinned {read_constraints()['transformers']}"
    assert rows["transformers"].rstrip().endswith(expected)
