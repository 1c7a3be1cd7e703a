"""spp.verify (`spp verify`): a checkpoint's files match its manifest, every entry its mask marks pruned is +0.0 and
every weight is finite; a violation is one line naming the tensor."""

import json
import math
from pathlib import Path

import pytest

from conftest import one_line_error
from spp.config import PruneConfig
from spp.errors import SppError
from spp.io.checkpoint import MANIFEST_FILE, MASK_FILE
from spp.io.manifest import read_manifest, write_manifest
from spp.io.maskfile import load_masks
from spp.prune import run_prune
from spp.verify import verify_checkpoint
from test_nonfinite import DOWN, cli, corrupt_copy
from test_prune import save_tiny, write_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Random words for calibration (test_prune's `text_file`)."""
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def test_verify_names_the_tensor_on_violation(tmp_path, text_file):
    from safetensors.torch import load_file, save_file

    model_dir = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "pruned"
    run_prune(PruneConfig(model=str(model_dir), output=str(out), method="wanda", pattern="2:4",
                          calib=str(text_file), nsamples=2, seqlen=16, device="cpu"))
    masks, _ = load_masks(out / MASK_FILE)
    name = sorted(masks)[0]
    tensors = load_file(str(out / "model.safetensors"))
    W = tensors[name]
    row, col = (~masks[name]).nonzero()[0].tolist()
    W[row, col] = -0.0  # equal to zero, but not bitwise +0.0
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SppError, match="sha256"):  # the shard no longer matches the manifest
        verify_checkpoint(out)
    from spp.io.checkpoint import sha256_file

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["outputs"]["model.safetensors"] = sha256_file(out / "model.safetensors")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SppError, match=rf"{name}: 1 entries the mask marks pruned are not \+0\.0"):
        verify_checkpoint(out)


@pytest.mark.parametrize("name,value", [(DOWN, math.nan), ("model.norm.weight", math.inf)],
                         ids=["masked weight", "unmasked weight"])
def test_verify_fails_on_a_non_finite_weight(pruned_tiny_dir, tmp_path, name, value):
    broken = corrupt_copy(pruned_tiny_dir, tmp_path / "broken", name=name, value=value)
    write_manifest(broken, read_manifest(broken))  # re-hashed: only the value is wrong, as a buggy writer leaves it
    one_line_error(cli("verify", broken), name, "1 non-finite entry", str(broken / "model.safetensors"))


@pytest.mark.parametrize("nested", [False, True])
def test_a_model_declaring_a_sparsity_config_is_refused_as_input_and_by_verify(pruned_tiny_dir, tmp_path, nested):
    """vLLM refuses a model whose config.json declares a sparsity_config; spp never lets one pass through."""
    import shutil

    from typer.testing import CliRunner

    from conftest import one_line_error
    from spp.cli import app
    from spp.io.reader import read_checkpoint

    model = shutil.copytree(pruned_tiny_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    declared = {"sparsity_config": {"format": "dense"}}
    config.update({"quantization_config": declared} if nested else declared)
    (model / "config.json").write_text(json.dumps(config))
    where = "quantization_config.sparsity_config" if nested else "sparsity_config"
    with pytest.raises(SppError, match=f"declares a {where}.*remove {where}"):
        read_checkpoint(model)
    one_line_error(CliRunner().invoke(app, ["verify", str(model)]), f"declares a {where}")
