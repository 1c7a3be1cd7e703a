"""spp prune end to end on tiny random models of every family, the sequential pipeline, SparseGPT
against a straightforward reference, calibration loaders, and the command line's bad-input contract."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ARCHS, TINY_CONFIGS, one_line_error
from spp.cli import app
from spp.config import PruneConfig
from spp.errors import SppError
from spp.io.checkpoint import MASK_FILE, MANIFEST_FILE
from spp.io.reader import read_checkpoint
from spp.io.maskfile import load_masks
from spp.models import block_targets, find_decoder_blocks
from spp.prune import run_prune
from spp.prune.masks import is_nm_valid, pruned_count
from spp.prune.sequential import capture_block_inputs, run_block, walk_blocks
from spp.prune.sparsegpt import GRAM_MIN_WIDTH, GRAM_STRIPS, accumulate_hessian, gram, hessian_from_sum, sparsegpt_prune
from spp.verify import verify_checkpoint

CHARS = ["<unk>", "<eos>"] + list(string.ascii_letters + string.digits + " .,!?'\n")  # 71 < every tiny vocab


def char_tokenizer():
    """A character-level fast tokenizer built offline (ids < 71, so it fits the tiny models' vocab of 128)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def make_model(arch: str, n_layers: int = 2, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[arch])
    kwargs["n_layer" if arch == "gpt2" else "num_hidden_layers"] = n_layers
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(arch: str, directory: Path, n_layers: int = 2) -> Path:
    model = make_model(arch, n_layers)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def write_text(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7))) for _ in range(200)]
    path.write_text(" ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(n_words)))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in read_checkpoint(directory).shards:
        out.update(load_file(str(shard)))
    return out


# --------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_every_arch(arch, method, pattern, tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(arch, tmp_path / "model")
    out = tmp_path / "pruned"
    cfg = PruneConfig(model=str(model_dir), output=str(out), method=method, pattern=pattern, calib=str(text_file),
                      nsamples=4, seqlen=32, device="cpu", blocksize=16)
    report = run_prune(cfg)

    masks, layouts = load_masks(out / MASK_FILE)
    tensors = saved_tensors(out)
    n_blocks = TINY_CONFIGS[arch].get("num_hidden_layers", TINY_CONFIGS[arch].get("n_layer"))
    blocks_name, blocks = find_decoder_blocks(report.model)
    assert len(masks) == sum(len(block_targets(b)) for b in blocks) and n_blocks == len(blocks)
    for name, keep in masks.items():
        assert name in tensors, f"mask key {name} is not a saved tensor"
        W = tensors[name]
        assert keep.shape == W.shape
        pruned = ~keep
        assert torch.all(W[pruned] == 0) and not torch.signbit(W[pruned]).any(), f"{name}: pruned entry not +0.0"
        keep_oi = keep.t() if layouts[name] == "conv1d" else keep  # (out, in)
        if pattern == "unstructured":
            assert (~keep_oi).sum(1).tolist() == [pruned_count(keep_oi.shape[1], 0.5)] * keep_oi.shape[0]
        else:
            assert (keep_oi.reshape(keep_oi.shape[0], -1, 4).sum(-1) == 2).all()
    assert all(not any(k in name for k in ("embed", "wte", "wpe", "lm_head", "norm", "ln_")) for name in masks)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(CHARS), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(report.model(ids).logits, report.model(ids).logits)  # deterministic forward
    verify_checkpoint(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["details"]["method"] == method and manifest["details"]["calibration"]["nsamples"] == 4
    assert abs(manifest["details"]["achieved_sparsity"] - 0.5) < 1e-9


def test_output_files_exactly(tmp_path, text_file):
    model_dir = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "pruned"
    run_prune(PruneConfig(model=str(model_dir), output=str(out), method="wanda", pattern="2:4",
                          calib=str(text_file), nsamples=2, seqlen=16, device="cpu"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        MASK_FILE, MANIFEST_FILE, "spp_config.yaml",
    ])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruned"]  # no .partial left behind


def test_magnitude_needs_no_calibration_and_uses_one_threshold(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model")
    original = {n: t.out_in().detach().clone()
                for n, t in block_targets(find_decoder_blocks(make_model("llama"))[1][0]).items()}
    out = tmp_path / "pruned"
    report = run_prune(PruneConfig(model=str(model_dir), output=str(out), method="magnitude", sparsity=0.3,
                                   calib=str(tmp_path / "does-not-exist.txt"), device="cpu"))
    block0 = block_targets(find_decoder_blocks(report.model)[1][0])
    for name, W0 in original.items():
        W = block0[name].out_in()
        keep = W != 0
        assert (~keep).sum() == pruned_count(W.numel(), 0.3)
        assert W0.abs()[~keep].max() <= W0.abs()[keep].min()  # one threshold over the whole matrix
        assert torch.equal(W[keep], W0[keep])  # kept weights unchanged


# --------------------------------------------------------------------------- sequential


def _windows(n=4, seqlen=32, seed=0):
    return torch.randint(2, len(CHARS), (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_calls_reproduce_the_model(arch):
    """With nothing pruned, block-by-block propagation equals the model's own hidden states.

    Three layers and a sliding window shorter than the windows, so a per-layer mask recorded
    for the wrong layer (Qwen2's max_window_layers, Gemma2's alternation) changes the result.
    """
    model = make_model(arch, n_layers=3)
    windows = _windows()
    with torch.no_grad():
        expected = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, batch_size=3, storage=torch.device("cpu"))
    torch.testing.assert_close(torch.cat(inputs.hidden), expected[0])
    seen = []
    for block in walk_blocks(blocks, inputs, lambda s, X: None, torch.device("cpu")):  # nothing pruned
        block.finish()
        seen.append(torch.cat(inputs.hidden))
    for i in range(len(blocks) - 1):
        torch.testing.assert_close(seen[i], expected[i + 1], rtol=1e-5, atol=1e-5)


def test_layers_fed_one_input_share_their_statistics():
    """q/k/v_proj (and gate/up_proj) get the same input tensor: it is folded once, and the layers share the sum,
    which equals what each layer's own hook gathers."""
    model = make_model("llama")
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, _windows(), batch_size=3, storage=torch.device("cpu"))
    reference, handles = {}, []
    for name, module in blocks[0].named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: reference.__setitem__(name, accumulate_hessian(reference.get(name), args[0])[0])))
    run_block(blocks[0], 0, inputs, torch.device("cpu"), keep_outputs=False)
    for handle in handles:
        handle.remove()
    folded = []

    def accumulate(state, X):
        folded.append(X.shape)
        return accumulate_hessian(state, X)[0]

    block = next(walk_blocks(blocks, inputs, accumulate, torch.device("cpu")))
    stats = block.stats
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert len(folded) == 4 * len(inputs.hidden)  # q, o, gate, down: once per chunk of windows
    assert set(stats) == set(reference)
    for name, H in reference.items():
        torch.testing.assert_close(stats[name], H, rtol=0, atol=0)


def test_block1_inputs_change_when_block0_is_pruned():
    model = make_model("llama")
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, _windows(), batch_size=4, storage=torch.device("cpu"))
    unpruned_out = run_block(blocks[0], 0, inputs, torch.device("cpu"))[0].clone()
    block0_inputs = [h.clone() for h in inputs.hidden]

    def halve(i, name, target, state):
        W = target.out_in()
        keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(i)) > 0.5
        with torch.no_grad():
            W.copy_(torch.where(keep, W, torch.zeros(())))
        return keep

    seen = []
    for block in walk_blocks(blocks, inputs, None, torch.device("cpu")):
        for name, target in block.targets.items():
            halve(block.index, name, target, None)
        block.finish()
        seen.append([h.clone() for h in inputs.hidden])
    assert not torch.allclose(seen[0][0], unpruned_out, atol=1e-4)
    inputs.hidden, inputs.calls[0] = block0_inputs, capture_block_inputs(
        model, blocks, _windows(), batch_size=4, storage=torch.device("cpu")).calls[0]
    torch.testing.assert_close(seen[0][0], run_block(blocks[0], 0, inputs, torch.device("cpu"))[0])


# --------------------------------------------------------------------------- SparseGPT against a reference


def reference_sparsegpt(W, H, sparsity, blocksize, n_m=None, percdamp=0.01):
    """Algorithm 1 of the paper written out literally: explicit inverse, one column at a time, Python loops."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if n_m is None:
            sal = [(float(W[r, c] ** 2 / Hinv[c, c] ** 2), c - i1 + (i2 - i1) * r, r, c)
                   for r in range(W.shape[0]) for c in range(i1, i2)]
            sal.sort(key=lambda t: (t[0], t[1]))  # ties: lower flat index pruned first
            for _, _, r, c in sal[: pruned_count(W.shape[0] * (i2 - i1), sparsity)]:
                keep[r, c] = False
        for c in range(i1, i2):
            if n_m is not None and (c - i1) % n_m[1] == 0:
                for r in range(W.shape[0]):
                    group = sorted(range(c, c + n_m[1]), key=lambda k: (float(W[r, k] ** 2 / Hinv[k, k] ** 2), k))
                    for k in group[: n_m[1] - n_m[0]]:
                        keep[r, k] = False
            q = torch.where(keep[:, c], W[:, c], torch.zeros((), dtype=W.dtype))
            err = (W[:, c] - q) / Hinv[c, c]
            for k in range(c, cols):  # the OBS update of every later column, including the other blocks
                W[:, k] -= err * Hinv[c, k]
            W[:, c] = q
    return W, keep


@pytest.mark.parametrize("tokens,width", [(512, 576), (300, 600), (64, GRAM_MIN_WIDTH), (40, 64)])
def test_gram_equals_the_full_product(tokens, width):
    g = torch.Generator().manual_seed(width)
    X = torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) * 3
    exact = X.double().t() @ X.double()
    for strips in (1, 2, GRAM_STRIPS, 7):
        torch.testing.assert_close(gram(X, strips).double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    threads = torch.get_num_threads()
    try:  # bitwise on one thread, where the BLAS sums every entry's tokens in one order (see `gram`)
        torch.set_num_threads(1)
        assert torch.equal(gram(X), X.t() @ X)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n_m,sparsity", [(None, 0.5), (None, 0.3), ((2, 4), 0.5), ((1, 4), 0.75), ((4, 8), 0.5)])
def test_sparsegpt_equals_reference(n_m, sparsity):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 24, generator=g, dtype=torch.float64)
    X = torch.randn(200, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    H_sum, n = accumulate_hessian(None, X)
    H = hessian_from_sum(H_sum, n).double()
    W_ref, keep_ref = reference_sparsegpt(W, H, sparsity, blocksize=8, n_m=n_m)
    W_new, keep, damp = sparsegpt_prune(W.float(), H.float(), n_m, sparsity, blocksize=8)
    assert damp == 0.01
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W_new.double(), W_ref, rtol=1e-3, atol=1e-4)
    if n_m is None:  # exactly floor(out·b·s) pruned in each column block of width 8
        assert (~keep).reshape(6, 3, 8).sum((0, 2)).tolist() == [pruned_count(48, sparsity)] * 3
    else:
        assert is_nm_valid(keep, *n_m)
    assert not torch.signbit(W_new[~keep]).any() and (W_new[~keep] == 0).all()


def test_sparsegpt_lowers_the_reconstruction_error_of_magnitude_masking():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(512, 32, generator=g) * torch.linspace(0.1, 3, 32)
    H_sum, n = accumulate_hessian(None, X)
    W_new, keep, _ = sparsegpt_prune(W, hessian_from_sum(H_sum, n), (2, 4), 0.5, blocksize=16)
    masked = torch.where(keep, W, torch.zeros(()))
    assert ((X @ (W - W_new).t()) ** 2).sum() < ((X @ (W - masked).t()) ** 2).sum()


def test_sparsegpt_retries_dampening_and_records_it():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    H[0, 1] = H[1, 0] = 1.5  # indefinite: eigenvalue 1 - 1.5 < 0 until the dampening exceeds 0.5
    W = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    W_new, keep, damp = sparsegpt_prune(W, H, None, 0.5, blocksize=4, percdamp=0.01)
    assert damp == pytest.approx(1.0)  # 0.01 and 0.1 fail, 1.0 (× mean diagonal 1) works
    with pytest.raises(SppError, match="not positive definite"):
        sparsegpt_prune(W, -torch.eye(4), None, 0.5, blocksize=4)


# --------------------------------------------------------------------------- calibration


def test_calibration_windows_from_a_file(tmp_path):
    from spp.data import calibration_windows

    tok = char_tokenizer()
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["hello world", "abc def", "xyz"]))
    stream = tok("hello world<eos>abc def<eos>xyz", add_special_tokens=False)["input_ids"]
    windows = calibration_windows(tok, str(path), nsamples=5, seqlen=4, seed=3)
    assert windows.shape == (5, 4)
    for row in windows.tolist():  # every window is a contiguous slice of the EOS-joined stream
        assert any(stream[s : s + 4] == row for s in range(len(stream) - 3))
    assert torch.equal(windows, calibration_windows(tok, str(path), 5, 4, seed=3))
    assert not torch.equal(windows, calibration_windows(tok, str(path), 5, 4, seed=4))
    with pytest.raises(SppError, match=f"has only {len(stream)} tokens"):
        calibration_windows(tok, str(path), nsamples=1, seqlen=len(stream) + 1, seed=0)


def test_hub_loaders_with_a_mocked_load_dataset(monkeypatch):
    import datasets

    from spp import data

    tok = char_tokenizer()
    calls = []
    monkeypatch.setattr("spp.hub.hub_unavailable", lambda: None)  # the hub "answers"; load_dataset is faked

    def fake_load(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        if name == "allenai/c4":
            return [{"text": "short"}, {"text": "a long enough document " * 5}]
        return {"text": ["first line", "", "second line of wikitext " * 4]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    c4 = data.calibration_windows(tok, "c4", nsamples=3, seqlen=10, seed=0)
    assert c4.shape == (3, 10) and calls[0][0] == "allenai/c4" and "data_files" in calls[0][2]
    wiki = data.calibration_windows(tok, "wikitext2", nsamples=2, seqlen=10, seed=0)
    assert wiki.shape == (2, 10) and calls[1][:2] == ("Salesforce/wikitext", ("wikitext-2-raw-v1",))
    with pytest.raises(SppError, match=r"c4: found only 0 of 2 documents longer than --seqlen 1000"):
        data.calibration_windows(tok, "c4", nsamples=2, seqlen=1000, seed=0)

    attempts = []

    def offline(name, *args, **kwargs):
        attempts.append(name)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SppError, match=r"cannot load Salesforce/wikitext .*hub unreachable.*--calib PATH"):
        data.calibration_windows(tok, "wikitext2", nsamples=1, seqlen=4, seed=0)
    assert len(attempts) == 1  # no retries (offline is caught before the load: tests/test_data.py)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    """A tiny LLaMA whose MLP input is 36 wide (not divisible by 8) and context 64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("cli") / "model"
    kwargs = dict(TINY_CONFIGS["llama"], intermediate_size=36, max_position_embeddings=64)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


BAD_INPUTS = [
    ("unknown method", ["--method", "obs"], r"method='obs' should be one of 'wanda', 'sparsegpt', 'magnitude', 'ria'"),
    ("malformed pattern", ["--pattern", "2:5x"], r"--pattern '2:5x'"),
    ("zero kept", ["--pattern", "0:4"], r"--pattern 0:4: N:M needs 0 < N < M"),
    ("n above m", ["--pattern", "5:4"], r"--pattern 5:4: N:M needs 0 < N < M"),
    ("sparsity 1", ["--sparsity", "1.0"], r"--sparsity=1.0 is out of range"),
    ("sparsity negative", ["--sparsity", "-0.1"], r"--sparsity=-0.1 is out of range"),
    ("sparsity vs N:M", ["--pattern", "2:4", "--sparsity", "0.6"], r"contradicts --pattern 2:4"),
    ("in-dim not divisible", ["--pattern", "4:8"], r"model\.layers\.0\.mlp\.down_proj has weight \(out, in\) = \(32, 36\)"),
    ("missing model", ["--model", "{tmp}/nope"], r"model .*nope does not exist"),
    ("dir without model", ["--model", "{tmp}/exists"], r"holds no model"),  # not {tmp}: --output is inside it
    ("model is a file", ["--model", "{tmp}/short.txt"], r"model .*short\.txt is a file, not a model directory"),
    ("missing calib", ["--calib", "{tmp}/none.txt"], r"--calib .*none\.txt: no such file"),
    ("empty calib", ["--calib", "{tmp}/empty.txt"], r"empty"),
    ("short calib", ["--calib", "{tmp}/short.txt"], r"has only 5 tokens"),
    ("too few tokens", ["--nsamples", "1000"], r"has only \d+ tokens; --nsamples 1000 x --seqlen 16 needs 16000"),
    ("seqlen above context", ["--seqlen", "65"], r"--seqlen 65 is above the model's context of 64"),
    ("output exists", ["--output", "{tmp}/exists"], r"already exists; pass --overwrite"),
]


@pytest.mark.parametrize("case,flags,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_cli_bad_inputs(case, flags, message, cli_model, tmp_path, text_file):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("hello")
    (tmp_path / "exists").mkdir()
    args = {"--model": str(cli_model), "--calib": str(text_file), "--output": str(tmp_path / "out"),
            "--nsamples": "2", "--seqlen": "16", "--device": "cpu"}
    extra = []
    for i in range(0, len(flags), 2):
        value = flags[i + 1].format(tmp=tmp_path)
        if flags[i] in args:
            args[flags[i]] = value
        else:
            extra += [flags[i], value]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["prune", *[x for kv in args.items() for x in kv], *extra])
    one_line_error(result, pattern=message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no .partial


def test_cli_prune_then_verify(cli_model, tmp_path, text_file):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "--model", str(cli_model), "--method", "sparsegpt", "--pattern", "2:4",
                                 "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "model.layers.1" in result.stdout and "50.00%" in result.stdout
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0 and "ok:" in result.stdout
    (out / MASK_FILE).write_bytes((out / MASK_FILE).read_bytes()[:-1] + b"\x00")
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "sha256" in result.stderr


# =========================================================================== mixture of experts
# Pruning mixture-of-experts models: every saved expert tensor pruned from the tokens routed to its expert.
#
# The references here capture the routing independently of `spp.prune.experts` (a forward hook on the router,
# whose output names each token's experts) and prune each saved per-expert tensor (Mixtral's w1/w3/w2) as a
# separate matrix with the plain method functions, so a mask computed over the fused gate/up rows, or from
# tokens the expert never saw, fails them.

import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import MOE_CONFIGS, make_moe_model  # noqa: E402
from spp.io.checkpoint import PRUNE_PROGRESS_DIR, PRUNE_PROGRESS_FILE, partial_path  # noqa: E402
from spp.prune import METHODS  # noqa: E402
from spp.prune.alps import alps_prune, default_iters  # noqa: E402
from spp.prune.experts import expert_down_inputs, prune_expert_weights, routed_inputs  # noqa: E402
from spp.prune.masks import parse_pattern, select_mask  # noqa: E402
from spp.prune.wanda import magnitude_scores  # noqa: E402

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """Factory: a saved tiny random MoE model of one family (with a character tokenizer), made once per module."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            directory = tmp_path_factory.mktemp(arch) / "model"
            make_moe_model(arch).save_pretrained(directory)
            char_tokenizer().save_pretrained(directory)
            made[arch] = directory
        return made[arch]

    return make


def prune_cfg(model: Path, out: Path, calib: Path, **settings) -> PruneConfig:
    return PruneConfig(model=str(model), output=str(out), calib=str(calib), nsamples=NSAMPLES, seqlen=SEQLEN,
                       device="cpu", blocksize=16, **settings)


def saved(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in read_checkpoint(directory).shards:
        out.update(load_file(str(shard)))
    return out


def details(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())["details"]


def expert_pieces(directory: Path) -> dict[str, tuple[str, int, str]]:
    """Saved tensor -> (block-relative fused parameter, expert, 'gate'/'up'/'down'), from the reader's mapping."""
    ckpt = read_checkpoint(directory)
    out = {}
    for param, pieces in ckpt.pieces.items():
        for p in pieces:
            role = "down" if param.endswith("down_proj") else ("gate" if p.rows[0] == 0 else "up")
            out[p.saved] = (param, p.expert, role)
    return out


# --------------------------------------------------------------------------- an independent reference


def routed_by_router(model_dir: Path, pruned_dir: Path, calib: Path, block: int):
    """(X (T, H), top_k_index (T, k)) that reach block `block`'s experts in the sequential pipeline: blocks before
    it pruned (from `pruned_dir`), it and the later ones dense (from `model_dir`). Taken from a forward hook on the
    router (its input and its chosen experts), not from the experts module."""
    from transformers import AutoModelForCausalLM

    from spp.data import calibration_windows
    from spp.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i in range(block, len(model.model.layers)):
        model.model.layers[i].load_state_dict(dense.model.layers[i].state_dict())
    windows = calibration_windows(load_tokenizer(str(model_dir)), str(calib), NSAMPLES, SEQLEN, 0)
    seen = {}
    router = model.model.layers[block].mlp.gate

    def hook(module, args, output):
        seen["X"] = args[0].reshape(-1, args[0].shape[-1]).detach()
        seen["index"] = output[2].detach()

    handle = router.register_forward_hook(hook)
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    return seen["X"], seen["index"]


def reference_expert_masks(model_dir: Path, pruned_dir: Path, calib: Path, method: str, pattern: str,
                           sparsity: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Saved expert tensor -> (keep-mask, pruned weight), each pruned alone as a separate linear would be:
    Wanda (|W|·‖X_j‖, per row or per group), RIA and magnitude (one threshold per matrix) or SparseGPT, with X the tokens
    routed to its expert and, for the down matrix, act(X·w1ᵀ) ⊙ (X·w3ᵀ) from the dense saved tensors."""
    original, pieces = saved(model_dir), expert_pieces(model_dir)
    n_m = parse_pattern(pattern)
    out = {}
    for block in range(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]):
        X, index = routed_by_router(model_dir, pruned_dir, calib, block)
        mine = {s: v for s, v in pieces.items() if v[0].startswith(f"model.layers.{block}.")}
        for name, (param, expert, role) in mine.items():
            X_e = torch.stack([X[t] for t in range(X.shape[0]) if expert in index[t].tolist()])
            if role == "down":
                w = {r: original[s] for s, (p, e, r) in mine.items() if e == expert and r != "down"}
                X_e = F.silu(X_e @ w["gate"].t()) * (X_e @ w["up"].t())
            W = original[name]
            if method == "wanda":
                score = W.abs() * (X_e ** 2).sum(0).sqrt()
                keep = _keep_highest(score, n_m, sparsity, per_row=True)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "ria":  # (|W|/Σ_row|W| + |W|/Σ_col|W|) · ‖X_j‖^½, one threshold per matrix
                score = (W.abs() / W.abs().sum(1, keepdim=True) + W.abs() / W.abs().sum(0, keepdim=True))
                keep = _keep_highest(score * (X_e ** 2).sum(0).sqrt() ** 0.5, n_m, sparsity, per_row=False)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "magnitude":
                keep = _keep_highest(W.abs(), n_m, sparsity, per_row=False)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "alps":  # the shipped settings (PruneConfig's alps_* defaults)
                H = hessian_from_sum(*accumulate_hessian(None, X_e))
                W_new, keep, _ = alps_prune(W, H, n_m, sparsity, max_iter=default_iters(n_m))
                out[name] = (keep, W_new)
            else:
                H = hessian_from_sum(*accumulate_hessian(None, X_e))
                W_new, keep, _ = sparsegpt_prune(W, H, n_m, sparsity, blocksize=16)
                out[name] = (keep, W_new)
    return out


def _keep_highest(score: torch.Tensor, n_m, sparsity: float, per_row: bool) -> torch.Tensor:
    """Written out with a stable sort: the lowest scores pruned, lower index first on ties."""
    if n_m is not None:
        n, m = n_m
        groups = score.reshape(score.shape[0], -1, m)
        order = groups.argsort(dim=-1, stable=True)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter(-1, order[..., : m - n], False)
        return keep.reshape(score.shape)
    rows = score if per_row else score.reshape(1, -1)
    k = int(rows.shape[1] * sparsity + 1e-9)
    keep = torch.ones_like(rows, dtype=torch.bool).scatter(-1, rows.argsort(dim=-1, stable=True)[:, :k], False)
    return keep.reshape(score.shape)


@pytest.fixture
def mixtral(moe_dir) -> Path:
    return moe_dir("mixtral")


# --------------------------------------------------------------------------- pure functions


def test_routed_inputs_and_down_inputs_equal_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])  # (T, k): distinct per token
    gate_up = torch.randn(6, 8, generator=g)  # (2I, H), I = 3
    for expert in range(4):
        rows = [t for t in range(10) if expert in index[t].tolist()]
        X = routed_inputs(hidden, index, expert)
        assert torch.equal(X, hidden[rows])
        expected = torch.stack([F.silu(gate_up[:3] @ hidden[t]) * (gate_up[3:] @ hidden[t]) for t in rows])
        down = expert_down_inputs(X, gate_up, lambda gu: F.silu(gu[:, :3]) * gu[:, 3:])
        torch.testing.assert_close(down, expected)
    assert routed_inputs(hidden, index, 7).shape == (0, 8)  # an expert nobody chose: no rows


def test_an_expert_without_tokens_is_pruned_by_magnitude_and_says_so():
    """Hand-made routes that never choose expert 3: its pieces get magnitude masks, tokens 0, method magnitude."""
    from spp.models import block_targets
    from spp.prune.experts import expert_targets
    from spp.io.reader import Piece

    model = make_moe_model("mixtral")
    block = model.model.layers[0]
    weights = expert_targets(block_targets(block))
    I = MOE_CONFIGS["mixtral"]["intermediate_size"]
    pieces = {"mlp.experts.gate_up_proj": [Piece(f"w{e}.{r}", e, rows) for e in range(4)
                                            for r, rows in ((1, (0, I)), (3, (I, 2 * I)))],
              "mlp.experts.down_proj": [Piece(f"w{e}.2", e, (0, 64)) for e in range(4)]}
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(100)])  # experts 0..2 only
    routes = {"mlp.experts": [(torch.randn(100, 64, generator=g), index)]}
    original = {n: w.weight.detach().clone() for n, w in weights.items()}
    cfg = PruneConfig(model="m", output="o", method="wanda", pattern="unstructured", sparsity=0.5)
    done = prune_expert_weights(weights, routes, METHODS["wanda"], METHODS["magnitude"], cfg,
                                {n: 0.5 for n in weights}, pieces, torch.device("cpu"))
    for name, pruned in done.items():
        records = {(p["expert"], tuple(p["rows"])): p for p in pruned.stats["pieces"]}
        for piece in pieces[name]:
            record = records[(piece.expert, piece.rows)]
            W0 = original[name][piece.expert, piece.rows[0]:piece.rows[1]]
            keep = pruned.keep[piece.expert, piece.rows[0]:piece.rows[1]]
            if piece.expert == 3:
                assert (record["tokens"], record["method"]) == (0, "magnitude")
                assert torch.equal(keep, select_mask(magnitude_scores(W0), None, 0.5, per_row=False))
            else:
                assert record["tokens"] == int((index == piece.expert).any(-1).sum()) and record["method"] == "wanda"
                assert (~keep).sum(1).tolist() == [W0.shape[1] // 2] * W0.shape[0]  # Wanda: per row


def test_expert_weights_without_a_saved_mapping_or_with_owl_are_refused():
    from spp.prune.plan import plan_layers
    from spp.prune.experts import check_expert_weights

    model = make_moe_model("mixtral")
    plan = plan_layers(model, PruneConfig(model="m", output="o"))
    pieces = {full: [] for full in plan.sparsity if ".experts." in full}
    check_expert_weights(model, plan, pieces, owl=False)
    with pytest.raises(SppError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: cannot tell which saved"):
        check_expert_weights(model, plan, {}, owl=False)
    with pytest.raises(SppError, match="--owl does not support expert weights"):
        check_expert_weights(model, plan, pieces, owl=True)


# --------------------------------------------------------------------------- the bar


def test_mixtral_wanda_2_4_bar(mixtral, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["prune", "--model", str(mixtral), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0

    tensors, original, pieces = saved(out), saved(mixtral), expert_pieces(out)
    masks, layouts = load_masks(out / MASK_FILE)
    assert len(pieces) == 2 * 4 * 3 and all(".block_sparse_moe.experts." in s for s in pieces)
    for name in pieces:  # every saved expert tensor is 2:4 along its inputs, with its mask
        W = tensors[name]
        assert masks[name].shape == W.shape and layouts[name] == "linear"
        assert (masks[name].reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
        assert is_nm_valid(W != 0, 2, 4) and torch.equal(W, torch.where(masks[name], original[name], torch.zeros(())))
    assert set(masks) == set(pieces) | {n for n in original if "self_attn" in n}
    for name in (n for n in original if n.endswith("block_sparse_moe.gate.weight")):
        assert name not in masks and torch.equal(tensors[name], original[name])  # the router stays dense
    record = details(out)
    assert all(record["modules"][s]["method"] == "wanda" and record["modules"][s]["tokens"] > 0 for s in pieces)
    assert record["expert_fallbacks"] == 0 and record["achieved_sparsity"] == 0.5
    assert sum(b["numel"] for b in record["blocks"].values()) == sum(original[n].numel() for n in masks)

    report = run_prune(prune_cfg(mixtral, tmp_path / "api", calib, method="wanda", pattern="2:4"))
    assert (tmp_path / "api" / MASK_FILE).read_bytes() == (out / MASK_FILE).read_bytes()  # the same run
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 71, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # both use transformers' default expert kernel
        assert torch.equal(reloaded(ids).logits, report.model(ids).logits)


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "unstructured"), ("ria", "unstructured"),
                                            ("alps", "2:4")])
def test_expert_masks_equal_separate_linears(mixtral, calib, tmp_path, method, pattern):
    out = tmp_path / "out"
    run_prune(prune_cfg(mixtral, out, calib, method=method, pattern=pattern))
    reference = reference_expert_masks(mixtral, out, calib, method, pattern)
    masks, _ = load_masks(out / MASK_FILE)
    tensors = saved(out)
    assert reference.keys() <= masks.keys() and len(reference) == 24
    for name, (keep, W) in reference.items():
        assert torch.equal(masks[name], keep), name
        # ALPS's eigendecomposition, ADMM and PCG carry H's summation-order rounding (chunks vs one stack) further than
        # SparseGPT: up to 2e-4 on a few weights of experts with few tokens; the masks are equal
        tol = dict(rtol=1e-2, atol=1e-3) if method == "alps" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors[name], W, **tol)
    if method == "magnitude":  # one threshold over w1 and w3 together would not give these masks
        original = saved(mixtral)
        w1, w3 = [n for n in sorted(reference) if ".layers.0." in n and (".experts.0.w1" in n or ".experts.0.w3" in n)]
        joint = select_mask(magnitude_scores(torch.cat([original[w1], original[w3]])), None, 0.5, per_row=False)
        assert not torch.equal(joint, torch.cat([reference[w1][0], reference[w3][0]]))


def test_starved_experts_fall_back_to_magnitude_on_record(mixtral, calib, tmp_path):
    X, index = routed_by_router(mixtral, mixtral, calib, 0)
    counts = [int((index == e).any(-1).sum()) for e in range(4)]
    threshold = min(counts) + 1  # the least-used expert of block 0 (and maybe some of block 1) falls back
    out = tmp_path / "out"
    report = run_prune(prune_cfg(mixtral, out, calib, method="wanda", pattern="unstructured",
                                 expert_min_tokens=threshold))
    original, masks, record = saved(mixtral), load_masks(out / MASK_FILE)[0], details(out)
    pieces = expert_pieces(out)
    fell_back = [s for s in pieces if record["modules"][s]["method"] == "magnitude"]
    for name, (param, expert, role) in pieces.items():
        entry = record["modules"][name]
        assert entry["method"] == ("magnitude" if entry["tokens"] < threshold else "wanda")
        if param.startswith("model.layers.0."):
            assert entry["tokens"] == counts[expert]
        if entry["method"] == "magnitude":
            assert torch.equal(masks[name], select_mask(magnitude_scores(original[name]), None, 0.5, per_row=False))
    assert 3 <= len(fell_back) == record["expert_fallbacks"] == report.expert_fallbacks
    result = CliRunner().invoke(app, ["prune", "--model", str(mixtral), "--output", str(tmp_path / "x"),
                                      "--expert-min-tokens", "0"])
    one_line_error(result, "--expert-min-tokens=0 is out of range")


def test_resume_after_an_interrupt_is_bitwise_the_straight_run(mixtral, calib, tmp_path):
    from spp.errors import SppInterrupted

    def ctrl_c_at_block_1(index, n_blocks, name):
        if index == 1:
            raise KeyboardInterrupt

    settings = dict(method="sparsegpt", pattern="2:4", batch_size=3)  # two chunks of windows
    with pytest.raises(SppInterrupted, match="--resume"):
        run_prune(prune_cfg(mixtral, tmp_path / "out", calib, **settings), on_module=ctrl_c_at_block_1)
    run_prune(prune_cfg(mixtral, tmp_path / "out", calib, resume=True, **settings))
    run_prune(prune_cfg(mixtral, tmp_path / "straight", calib, **settings))
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (tmp_path / "straight" / MASK_FILE).read_bytes() == (tmp_path / "out" / MASK_FILE).read_bytes()
    assert details(tmp_path / "straight")["modules"] == details(tmp_path / "out")["modules"]


def test_killed_prune_resumes_bit_for_bit(mixtral, calib, tmp_path):
    """SIGKILL right after block 0 is persisted (`spp.faults`), then --resume: the same files as a straight run."""
    import signal

    from test_faults import spp_child

    args = ["prune", "--model", mixtral, "--calib", calib, "--method", "wanda", "--pattern", "unstructured",
            "--nsamples", NSAMPLES, "--seqlen", SEQLEN, "--device", "cpu"]
    killed = spp_child(*args, "--output", tmp_path / "out", env={"SPP_FAULT": "prune_block:0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = partial_path(tmp_path / "out") / PRUNE_PROGRESS_DIR / PRUNE_PROGRESS_FILE
    assert json.loads(progress.read_text())["blocks_done"] == 1  # block 0 (with its fused expert masks) kept
    assert CliRunner().invoke(app, [*map(str, args), "--output", str(tmp_path / "out"), "--resume"]).exit_code == 0
    run_prune(prune_cfg(mixtral, tmp_path / "straight", calib, method="wanda"))
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (tmp_path / "straight" / MASK_FILE).read_bytes() == (tmp_path / "out" / MASK_FILE).read_bytes()


def test_targets_ignore_and_overrides_name_expert_weights(mixtral, calib, tmp_path):
    out = tmp_path / "out"
    report = run_prune(prune_cfg(mixtral, out, calib, method="wanda", ignore=["mlp.experts.down_proj"],
                                 sparsity_overrides={"mlp.experts.gate_up_proj": 0.75}))
    masks, record, pieces = load_masks(out / MASK_FILE)[0], details(out), expert_pieces(out)
    down = [s for s, v in pieces.items() if v[2] == "down"]
    assert not set(down) & set(masks) and set(down) <= set(record["dense_layers"])
    assert len(report.dense_layers) == 2
    for name in set(pieces) - set(down):
        assert record["modules"][name]["requested"] == 0.75
        assert (~masks[name]).sum(1).tolist() == [48] * masks[name].shape[0]  # floor(64 · 0.75) per row
    verify_checkpoint(out)
    result = CliRunner().invoke(app, ["prune", "--model", str(mixtral), "--output", str(tmp_path / "owl"), "--owl",
                                      "--calib", str(calib), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
    one_line_error(result, "--owl does not support expert weights", "--ignore 'mlp.experts.*'")
    assert not (tmp_path / "owl").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_other_families_prune_and_verify(arch, moe_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model = moe_dir(arch)
    out = tmp_path / "out"
    report = run_prune(prune_cfg(model, out, calib, method="sparsegpt", pattern="2:4"))
    verify_checkpoint(out)
    tensors, original, masks, record = saved(out), saved(model), load_masks(out / MASK_FILE)[0], details(out)
    pieces = expert_pieces(out)
    assert len(pieces) == 24 and all(".mlp.experts." in s for s in pieces)
    for name in pieces:
        assert is_nm_valid(masks[name], 2, 4) and (masks[name].reshape(masks[name].shape[0], -1, 4).sum(-1) == 2).all()
        assert record["modules"][name]["method"] == "sparsegpt" and record["modules"][name]["tokens"] > 0
    routers = [n for n in original if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(n not in masks and torch.equal(tensors[n], original[n]) for n in routers)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 71, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, report.model(ids).logits)
