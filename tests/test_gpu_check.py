"""`scripts/gpu_check.py --dry-run`: the GPU check's own code on tiny shapes on the CPU, so it cannot rot between
the rare runs on a GPU. The CUDA-only rows (2:4 kernels, FSDP over NCCL) must be reported as skipped, every other
row must pass, and `datasets` / `lm_eval` are unimportable throughout (as on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (ASSETS / "stories260K-hf" / "tokenizer.json").is_file(), reason="needs ../shared/data")
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--output",
                           str(tmp_path / "out"), "--assets", str(ASSETS), "--budget", "120"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    status = {row["name"]: row["status"] for row in report["rows"]}
    assert status == {"setup": "ok", "e2e": "ok", "train": "ok", "prune": "ok", "kernels": "skipped",
                      "fsdp": "skipped", "eval": "ok"}, {r["name"]: r.get("error") for r in report["rows"]}
    rows = {row["name"]: row for row in report["rows"]}
    assert [item["step"] for item in rows["e2e"]["items"]] == ["prune", "train", "merge", "verify", "eval"]
    assert all(item["rc"] == 0 for item in rows["e2e"]["items"])
    assert {(i["kind"], i["checkpointing"]) for i in rows["train"]["items"]} == {
        (k, c) for k in ("lora", "spp", "masked_lora", "full") for c in (False, True)}
    assert {i["method"] for i in rows["prune"]["items"]} >= {"wanda", "sparsegpt", "alps (layer)"}
    for name in ("e2e", "train", "prune", "eval"):
        assert rows[name]["env"]["device"] == "cpu" and rows[name]["env"]["dtype"] == "bfloat16"
    markdown = (tmp_path / "out" / "gpu.md").read_text()
    assert "DRY RUN" in markdown and "## kernels: skipped" in markdown


def test_gpu_check_only_rejects_unknown_rows(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--output",
                           str(tmp_path), "--only", "e2e,bogus"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 2 and "unknown rows ['bogus']" in done.stderr
