"""`--model FILE.gguf` (spp.io.gguf): bad inputs in the default suite; the real file, truncated, opt-in."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from spp.cli import app
from spp.io.gguf import is_gguf

from conftest import one_line_error

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_is_gguf_by_suffix():
    assert is_gguf("m.gguf") and is_gguf("/x/M.GGUF") and not is_gguf("/x/gguf") and not is_gguf("m.gguf.bak")


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.setenv("SPP_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--method", "magnitude",
                                      "--output", str(tmp_path / "out")])
    one_line_error(result, "pip install 'spp-llm[gguf]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00" + b"\x07" * 50])
def test_unreadable_gguf_is_one_line(tmp_path, monkeypatch, content):
    pytest.importorskip("gguf")
    model = tmp_path / "bad.gguf"
    model.write_bytes(content)
    monkeypatch.setenv("SPP_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--method", "magnitude",
                                      "--output", str(tmp_path / "out")])
    one_line_error(result, str(model))
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("gguf/*"))


def test_missing_gguf_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some text " * 50)
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "none.gguf"), "--ppl", str(text)])
    one_line_error(result, "does not exist")


# --------------------------------------------------------------------------- the real file (opt-in)


def truncated_gguf(source, target, blocks: int = 2):
    """A copy of a GGUF file keeping its first `blocks` decoder blocks (and every other tensor and key)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(target), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer adds these itself
        value = blocks if name == f"{arch}.block_count" else field.contents()
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= blocks:
            continue
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.gguf
def test_real_gguf_prunes_and_reloads_with_equal_logits(tmp_path, shared_data, monkeypatch):
    """SmolLM2-135M's GGUF cut to 2 blocks: `spp prune --model FILE.gguf` writes a normal checkpoint whose logits,
    loaded by plain transformers, equal those of the GGUF-loaded model with the mask applied in memory."""
    pytest.importorskip("gguf")
    source = shared_data / "smollm2-135m" / GGUF_NAME
    if not source.is_file():
        pytest.skip(f"{source} not found")
    from transformers import AutoModelForCausalLM, GgufConfig

    from spp.io.checkpoint import MASK_FILE, sha256_file
    from spp.io.maskfile import load_masks

    model_file = tmp_path / "smollm2-2blocks.gguf"
    truncated_gguf(source, model_file)
    monkeypatch.setenv("SPP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    calib = shared_data / "c4" / "c4_sample.jsonl"
    result = CliRunner().invoke(app, ["prune", "--model", str(model_file), "--method", "wanda", "--pattern", "2:4",
                                      "--calib", str(calib), "--nsamples", "2", "--seqlen", "64", "--device", "cpu",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "spp_manifest.json").read_text())
    digest = sha256_file(model_file)
    assert manifest["inputs"][str(model_file.resolve())] == digest
    assert manifest["details"]["source"]["sha256"] == digest
    assert manifest["details"]["source"]["tensor_types"].get("Q4_1", 0) > 0  # recorded as dequantized from Q4_1
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    reference = AutoModelForCausalLM.from_pretrained(model_file.parent, gguf_file=model_file.name,
                                                     dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True)).eval()
    masks, _ = load_masks(out / MASK_FILE)
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():  # Wanda keeps the kept weights as they are: pruned = dense ⊙ mask
            params[name].mul_(keep)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reference(ids).logits)

    # the dequantized directory on disk is reused: a second stage on the same file does not convert it again
    from spp.io import gguf

    gguf._gguf_directory.cache_clear()  # forget this process's memo, so the disk cache is what is tested
    again = CliRunner().invoke(app, ["eval", "--model", str(model_file), "--ppl", f"c4:{calib}", "--seqlen", "64",
                                     "--max-windows", "1", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "dequantizing" not in again.output
