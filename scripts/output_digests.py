"""Digests of the tensor files spp writes for stories260K, to show a refactor leaves every output byte-identical.

    python scripts/output_digests.py --out before.json             # on the start commit
    python scripts/output_digests.py --out after.json --compare before.json   # on the end commit: exit 1 on a change

Through the real CLI (`spp` next to this Python), offline, with `OMP_NUM_THREADS=1`: prune stories260K with
Wanda 2:4 and with SparseGPT at 50% (16 × 256 calibration tokens of TinyStories), train each adapter kind for 10
steps on the Wanda 2:4 model (`tinystories.yaml`), merge each. Digested: every `*.safetensors` file and the mask
file of the prune and merge outputs, and each adapter's weights, by sha256. Manifests, logs and reports hold times
and paths, so they are not compared. Byte identity holds only on one machine and library set: the digests record
the run conditions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
KINDS = ("spp", "masked_lora", "full")
PRUNES = {"wanda-2of4": ["--method", "wanda", "--pattern", "2:4"],
          "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"]}


def spp(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "spp"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every tensor file under `directory` (the mask file wherever it lives), by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors")) if "checkpoints" not in p.parts}


def run(work: Path) -> dict:
    calib = DATA / "tinystories" / "tinystories_val.txt"
    out: dict[str, dict[str, str]] = {}
    for name, flags in PRUNES.items():
        spp("prune", "--model", str(DATA / "stories260K-hf"), *flags, "--calib", str(calib), "--nsamples", "16",
            "--seqlen", "256", "--output", str(work / name))
        out[f"prune/{name}"] = digests(work / name)
    for kind in KINDS:
        spp("train", "--config", "tinystories.yaml", "--model", str(work / "wanda-2of4"), "--data", str(calib),
            "--max-steps", "10", "--set", f"adapter={kind}", "--output", str(work / f"train-{kind}"))
        out[f"adapter/{kind}"] = digests(work / f"train-{kind}")
        spp("merge", "--model", str(work / "wanda-2of4"), "--adapter", str(work / f"train-{kind}"),
            "--output", str(work / f"merged-{kind}"))
        out[f"merge/{kind}"] = digests(work / f"merged-{kind}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the digests to")
    parser.add_argument("--compare", type=Path, help="an earlier run's JSON: exit 1 if any digest differs")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        result = {"conditions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                       capture_output=True, text=True).stdout.strip()},
                  "digests": run(Path(tmp))}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: {sum(len(d) for d in result['digests'].values())} files")
    if args.compare:
        before = json.loads(args.compare.read_text())["digests"]
        changed = [f"{group}/{f}" for group in sorted(set(before) | set(result["digests"]))
                   for f in sorted(set(before.get(group, {})) | set(result["digests"].get(group, {})))
                   if before.get(group, {}).get(f) != result["digests"].get(group, {}).get(f)]
        print("identical" if not changed else f"{len(changed)} differ: {', '.join(changed)}")
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
