"""Streaming prune (one block in memory, `spp.io.stream`) writes the same bytes as the in-memory prune.

Each case runs `run_prune` twice into the same output path, streamed and with the whole model loaded
(`streaming=False`), and compares every file byte for byte; the manifests differ only in wall time, peak memory
and creation time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_moe_model, make_tiny_model
from spp.config import PruneConfig
from spp.errors import SppInterrupted
from spp.io import stream
from spp.io.checkpoint import MANIFEST_FILE, RESOLVED_CONFIG_FILE
from spp.prune import run_prune
from test_prune import char_tokenizer, write_text

TIMES = ("wall_time_s", "peak_memory", "created")


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name != MANIFEST_FILE:
            assert fa[name] == fb[name], name
    ma, mb = json.loads(fa[MANIFEST_FILE]), json.loads(fb[MANIFEST_FILE])
    assert {k: v for k, v in ma.items() if k not in TIMES} == {k: v for k, v in mb.items() if k not in TIMES}


def both_ways(tmp_path: Path, **settings) -> Path:
    """Prune streamed and in memory into the same path; assert the outputs are equal; returns the streamed one."""
    out = tmp_path / "out"
    run_prune(PruneConfig(output=str(out), device="cpu", **settings))
    shutil.move(out, tmp_path / "streamed")
    run_prune(PruneConfig(output=str(out), device="cpu", **settings), streaming=False)
    assert_same_output(tmp_path / "streamed", out)
    return tmp_path / "streamed"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mixtral") / "model"
    make_moe_model("mixtral").save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama") / "model"
    make_tiny_model("llama").save_pretrained(directory)  # tied embeddings
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("settings", [dict(method="wanda", pattern="2:4"), dict(method="sparsegpt", sparsity=0.5)],
                         ids=["wanda-2of4", "sparsegpt-50"])
def test_stories260k_streamed_equals_in_memory(shared_data, tmp_path, settings):
    both_ways(tmp_path, model=str(shared_data / "stories260K-hf"), nsamples=8, seqlen=128,
              calib=str(shared_data / "tinystories" / "tinystories_val.txt"), **settings)


@pytest.mark.parametrize("settings", [dict(method="wanda", pattern="2:4"), dict(method="sparsegpt", sparsity=0.5)],
                         ids=["wanda-2of4", "sparsegpt-50"])
def test_mixtral_streamed_equals_in_memory_across_shards(mixtral, text, tmp_path, settings):
    """Fused experts read from and written back to their per-expert tensors, split over several shards."""
    out = both_ways(tmp_path, model=str(mixtral), calib=str(text), nsamples=4, seqlen=32, blocksize=16,
                    max_shard_size="60KB", **settings)
    assert len(list(out.glob("model-*.safetensors"))) > 2


@pytest.mark.parametrize("settings", [
    dict(method="ria", owl=True, owl_lmbda=0.05, sparsity=0.6),
    dict(method="magnitude", sparsity=0.5),
    dict(method="alps", pattern="2:4"),
    dict(method="wanda", refine="dsnot", sparsity=0.6),
    dict(method="wanda", pattern="2:4", permute_channels=True),
    dict(method="wanda", targets=["mlp.*"], ignore=["mlp.down_proj"], sparsity=0.5),
    dict(method="sparsegpt", sparsity=0.5, dtype="bfloat16", max_shard_size="40KB"),
], ids=["owl-ria", "magnitude", "alps", "dsnot", "permute", "targets-ignore", "bf16-sharded"])
def test_every_method_and_option_streamed_equals_in_memory(llama, text, tmp_path, settings):
    both_ways(tmp_path, model=str(llama), calib=str(text), nsamples=4, seqlen=32, blocksize=16, **settings)


def test_streamed_resume_equals_the_straight_in_memory_run_and_holds_one_block(mixtral, text, tmp_path, monkeypatch):
    from spp.models import find_decoder_blocks

    held, load = [], stream.load

    def counting_load(model, checkpoint, prefix, *args, **kwargs):  # blocks in memory once this one is read
        load(model, checkpoint, prefix, *args, **kwargs)
        held.append(sum(any(not p.is_meta for p in b.parameters()) for b in find_decoder_blocks(model)[1]))

    monkeypatch.setattr(stream, "load", counting_load)

    def ctrl_c_at_block_1(index, n_blocks, name):
        if index == 1:
            raise KeyboardInterrupt

    settings = dict(model=str(mixtral), calib=str(text), nsamples=4, seqlen=32, blocksize=16, device="cpu",
                    method="sparsegpt", pattern="2:4", batch_size=3, output=str(tmp_path / "out"))
    run_prune(PruneConfig(**settings), streaming=False)
    shutil.move(tmp_path / "out", tmp_path / "straight")
    with pytest.raises(SppInterrupted, match="--resume"):
        run_prune(PruneConfig(**settings), on_module=ctrl_c_at_block_1)
    run_prune(PruneConfig(resume=True, **settings))
    assert max(held) == 1 and len(held) > 4  # never two blocks in memory at once
    fa, fb = files(tmp_path / "straight"), files(tmp_path / "out")
    assert fa.keys() == fb.keys()
    assert {name for name in fa if fa[name] != fb[name]} == {MANIFEST_FILE, RESOLVED_CONFIG_FILE}  # resume: true
