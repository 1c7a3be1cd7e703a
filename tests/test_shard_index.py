"""The reader and transformers' loader agree on what is loaded: an index that leaves out a shard's tensors, or names
tensors its shards do not hold, is refused before any work, and a real load that transformers reports incomplete is
refused too (no stage runs on randomly initialised weights)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import one_line_error, save_tiny_stories_llama
from spp.cli import app
from spp.errors import SppError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, shared_data):
    """A tiny LLaMA saved in several shards with its index (as `save_pretrained(max_shard_size="200KB")` writes it)."""
    from transformers import AutoModelForCausalLM

    plain = save_tiny_stories_llama(tmp_path_factory.mktemp("plain") / "m", shared_data)
    directory = tmp_path_factory.mktemp("sharded") / "m"
    AutoModelForCausalLM.from_pretrained(plain).save_pretrained(directory, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(plain / name, directory / name)
    assert len(list(directory.glob("*.safetensors"))) >= 3
    return directory


def edit_index(src, dst, edit):
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return dst


def drop_last_shard(weight_map):
    last = sorted(set(weight_map.values()))[-1]
    for name in [n for n, shard in weight_map.items() if shard == last]:
        del weight_map[name]


@pytest.mark.parametrize("command", [
    ["prune", "--method", "magnitude", "--sparsity", "0.5", "--output", "{out}"],
    ["eval", "--ppl", "wikitext2:{text}", "--seqlen", "64", "--max-windows", "1"],
])
def test_an_index_that_leaves_out_a_shard_is_refused(sharded, tmp_path, text_file, command):
    model = edit_index(sharded, tmp_path / "m", drop_last_shard)
    args = [a.format(out=tmp_path / "out", text=text_file) for a in command]
    result = CliRunner().invoke(app, [args[0], "--model", str(model), *args[1:]])
    one_line_error(result, "model.safetensors.index.json does not name", "transformers would not load it")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial"))


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(sharded, tmp_path):
    def misplace(weight_map):
        name = sorted(weight_map)[0]
        weight_map[name] = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])

    model = edit_index(sharded, tmp_path / "m", misplace)
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5",
                                      "--output", str(tmp_path / "out")])
    one_line_error(result, "which does not hold it")


def test_the_complete_index_still_loads(sharded):
    from spp.io.reader import read_checkpoint

    ckpt = read_checkpoint(sharded)
    assert len(ckpt.shards) >= 3 and "lm_head.weight" in ckpt.tensors


def test_a_real_load_that_transformers_reports_incomplete_is_refused(tmp_path):
    """`load_model` checks transformers' own loading report after the load, not only the reader's verdict before."""
    from conftest import make_tiny_model
    from spp.models import load_model

    model = make_tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(SppError, match=r"describes model\.norm\.weight, which no shard"):
        load_model(str(tmp_path))
    state["model.norm.weight"] = torch.ones(model.config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert load_model(str(tmp_path)) is not None
