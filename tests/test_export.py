"""`spp export`: kept values + the mask file, restored bit-exactly (spp.io.compressed, spp.export)."""

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spp.cli import app
from spp.io.checkpoint import MASK_FILE, sha256_file
from spp.io.compressed import compress_weight, decompress_weight

from conftest import one_line_error



def file_hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(Path(directory).rglob("*"))
            if p.is_file()}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 17), seed=st.integers(0, 2**16), density=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_round_trip_is_bit_exact(rows, cols, seed, density, dtype):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=g) < density
    weight = torch.randn(rows, cols, generator=g).to(dtype)
    weight[~keep] = 0.0
    weight[keep & (torch.rand(rows, cols, generator=g) < 0.1)] = -0.0  # kept signed zeros survive as values
    values = compress_weight(weight, keep)
    assert values.shape == (int(keep.sum()),)
    back = decompress_weight(values, keep)
    assert back.dtype == dtype and torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                weight.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_decompress_refuses_a_wrong_count():
    keep = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="2 values for a mask with 3 kept"):
        decompress_weight(torch.ones(2), keep)


def export(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_export_round_trip_restores_every_file(tmp_path, pruned_tiny_dir):
    packed, restored = tmp_path / "packed", tmp_path / "restored"
    result = export("--model", pruned_tiny_dir, "--output", packed)
    assert result.exit_code == 0, result.output
    assert not list(packed.glob("model*.safetensors")) and list(packed.glob("*.spz"))
    import json

    details = json.loads((packed / "spp_manifest.json").read_text())["details"]
    assert details["masked_tensors"] == 14 and details["ratio"] <= 0.55  # fp32 at 50%: 0.53 with the mask
    result = export("--dense", "--model", packed, "--output", restored)
    assert result.exit_code == 0, result.output
    assert file_hashes(restored) == file_hashes(pruned_tiny_dir)  # shards byte-identical, manifest back
    verified = CliRunner().invoke(app, ["verify", str(restored)])
    assert verified.exit_code == 0, verified.output


def test_sharded_checkpoint_round_trip(tmp_path, pruned_tiny_dir):
    """A checkpoint in several shards: the index is parked in the compressed form and comes back."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "sharded"
    shutil.copytree(pruned_tiny_dir, source)
    for shard in source.glob("model*.safetensors"):
        shard.unlink()
    AutoModelForCausalLM.from_pretrained(pruned_tiny_dir).save_pretrained(source, max_shard_size="20KB")
    (source / "spp_manifest.json").unlink()  # its hashes named the single shard
    assert len(list(source.glob("model-*.safetensors"))) > 1
    assert export("--model", source, "--output", tmp_path / "p").exit_code == 0
    assert not list((tmp_path / "p").glob("*.index.json"))
    assert export("--dense", "--model", tmp_path / "p", "--output", tmp_path / "r").exit_code == 0
    assert file_hashes(tmp_path / "r") == file_hashes(source)


def test_a_pruned_entry_that_is_not_plus_zero_is_refused(tmp_path, pruned_tiny_dir):
    source = tmp_path / "tampered"
    shutil.copytree(pruned_tiny_dir, source)
    from spp.io.maskfile import load_masks

    masks, _ = load_masks(source / MASK_FILE)
    name = sorted(masks)[0]
    (shard,) = source.glob("model*.safetensors")
    tensors = load_file(str(shard))
    pruned_at = (~masks[name]).nonzero()[0]
    tensors[name][tuple(pruned_at)] = -0.0  # equal to zero, but its sign would be lost
    save_file(tensors, str(shard), metadata={"format": "pt"})
    one_line_error(export("--model", source, "--output", tmp_path / "out"), name, "not +0.0")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_inputs_are_one_line(tmp_path, pruned_tiny_dir):
    assert export("--model", pruned_tiny_dir, "--output", tmp_path / "p").exit_code == 0
    one_line_error(export("--model", tmp_path / "p", "--output", tmp_path / "x"), "already compressed", "--dense")
    one_line_error(export("--dense", "--model", pruned_tiny_dir, "--output", tmp_path / "x"), "no .spz files")
    one_line_error(export("--model", pruned_tiny_dir, "--output", tmp_path / "p"), "exists")
    dense = tmp_path / "dense"
    shutil.copytree(pruned_tiny_dir, dense)
    (dense / MASK_FILE).unlink()
    (dense / "spp_manifest.json").unlink()
    one_line_error(export("--model", dense, "--output", tmp_path / "x"), "masks.safetensors")
    one_line_error(export("--model", tmp_path / "nowhere", "--output", tmp_path / "x"), "not a directory")
    assert not (tmp_path / "x").exists()


def test_dense_restore_with_dtype_casts_and_still_verifies(tmp_path, pruned_tiny_dir):
    from test_merge import assert_top_level_safetensors_are_the_model

    from spp.io.checkpoint import safetensors_files

    packed, restored = tmp_path / "packed", tmp_path / "restored"
    assert export("--model", pruned_tiny_dir, "--output", packed).exit_code == 0
    one_line_error(export("--model", pruned_tiny_dir, "--output", tmp_path / "x", "--dtype", "bfloat16"),
                   "--dtype", "--dense")
    one_line_error(export("--dense", "--model", packed, "--output", tmp_path / "x", "--dtype", "fp8"),
                   "--dtype 'fp8' is not one of auto, float32, bfloat16, float16")
    result = export("--dense", "--model", packed, "--output", restored, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    (source,), (shard,) = safetensors_files(pruned_tiny_dir), safetensors_files(restored)
    before, after = load_file(str(source)), load_file(str(shard))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], tensor.to(torch.bfloat16)), name
    assert (restored / MASK_FILE).read_bytes() == (pruned_tiny_dir / MASK_FILE).read_bytes()
    assert_top_level_safetensors_are_the_model(restored)
    verified = CliRunner().invoke(app, ["verify", str(restored)])
    assert verified.exit_code == 0, verified.output
    assert not (tmp_path / "x").exists()
