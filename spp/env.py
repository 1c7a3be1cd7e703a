"""`spp env`: the versions a bug report needs, and whether each matches the pins in `constraints.txt`.

The same idea as `transformers env` and `accelerate env`. `constraints.txt` sits at the root of a checkout
(regenerate it with `scripts/lock.sh`); an install from a wheel has none, and then only the versions print.
"""

from __future__ import annotations

import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from spp import __version__

CHECKOUT = Path(__file__).resolve().parents[1]
CONSTRAINTS = CHECKOUT / "constraints.txt"
# the packages whose versions change what spp computes or how it loads models
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "lm-eval", "safetensors", "huggingface-hub",
            "tokenizers", "kernels", "peft", "gguf")


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `lm_eval` and `LM-Eval` are `lm-eval`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of a constraints file -> {normalized name: version}; {} when there is no file."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str:
    """The checkout's commit (with `+dirty` for local changes), or `unknown` outside a git checkout."""
    try:
        rev = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "") if rev else "unknown"


def environment() -> list[tuple[str, str, str]]:
    """(what, value, against the pins) rows: spp, Python, OS, torch's accelerators, then each of `PACKAGES`.

    The third column is `pinned` when the installed version equals `constraints.txt`, `pinned X` when it differs,
    `not pinned` for a package the file does not name, and empty when there is no file.
    """
    import torch

    pins = read_constraints()
    rows = [("spp", f"{__version__} (git {git_revision()})", ""),
            ("python", platform.python_version(), ""),
            ("os", f"{platform.system()} {platform.release()} ({platform.machine()})", "")]
    accel = [f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else
             "no CUDA device"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accel.append("MPS")
    for name in PACKAGES:
        version = installed_version(name)
        pinned = pins.get(normalize(name))
        if not pins or (version is None and pinned is None):
            against = ""
        elif pinned is None:
            against = "not pinned"
        else:
            against = "pinned" if version is not None and version.split("+")[0] == pinned else f"pinned {pinned}"
        shown = version or "not installed"
        if name == "torch" and version:
            shown += f" ({'; '.join(accel)})"
        rows.append((name, shown, against))
    return rows
