"""Shared fixtures: offline mode, tiny random models per architecture, and the shared data directory."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

# Tiny configs, one per architecture family: 2 layers, hidden 32, inputs divisible by 8.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                    sliding_window=16),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                  use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  max_position_embeddings=128),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                   max_position_embeddings=128, sliding_window=16),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                 pad_token_id=0),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=32),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=128, max_position_embeddings=128),
}
ARCHS = sorted(TINY_CONFIGS)

# Tiny mixture-of-experts configs (transformers 5: fused 3-D experts in memory, per-expert tensors on disk):
# 4 experts, top-2, hidden 64, expert intermediate 48, so every expert matrix has inputs divisible by 8.
MOE_CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=128, max_position_embeddings=128),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128,
                      max_position_embeddings=128),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  vocab_size=128, max_position_embeddings=128),
}


def make_moe_model(arch: str = "mixtral", seed: int = 0, experts_implementation: str | None = None):
    """A seeded random MoE causal LM of `MOE_CONFIGS[arch]`, in eval mode, float32 (`experts_implementation`:
    the expert kernel, e.g. "eager"; transformers' default is "grouped_mm")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(MOE_CONFIGS[arch])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model.eval()


def saved_moe(directory, arch, shared_data):
    """A tiny MoE of `arch` with the stories260K tokenizer (vocab 512), saved as a user's checkpoint."""
    import shutil

    model = make_moe_model(arch)
    model.resize_token_embeddings(512)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(shared_data / "stories260K-hf" / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """The first 30k characters of TinyStories validation text (the MoE end-to-end tests' text)."""
    text = tmp_path_factory.mktemp("moe_text") / "text.txt"
    text.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:30000])
    return text


def one_line_error(result, *needles: str, pattern: str | None = None) -> str:
    """A CliRunner result that failed with exactly one `error: ...` line (on stderr, and nothing else printed), no
    traceback, containing every needle and matching the regular expression `pattern` when given. Returns the line."""
    import re

    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert [line for line in result.output.splitlines() if line.strip()] == lines, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gguf` tests run only with SPP_TEST_GGUF=1: they convert a real GGUF file (tens of seconds)."""
    if os.environ.get("SPP_TEST_GGUF") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: set SPP_TEST_GGUF=1 to run the real-GGUF tests")
    for item in items:
        if "gguf" in item.keywords:
            item.add_marker(skip)


def make_tiny_model(arch: str = "llama", seed: int = 0):
    """A seeded random causal LM of the given family, in eval mode, float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture
def tiny_model():
    """Factory fixture: `tiny_model("qwen2")` returns a fresh seeded model."""
    return make_tiny_model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or a clean skip naming the missing path."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _no_writes_into_repo():
    """Fail the run if tests wrote files into the repository (everything belongs under tmp_path).

    Active in CI (and with SPP_CHECK_REPO_WRITES=1): on a developer's machine other
    work may change the tree while tests run.
    """
    import subprocess

    if not (os.environ.get("CI") or os.environ.get("SPP_CHECK_REPO_WRITES")):
        yield
        return

    def status():
        try:
            return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    before = status()
    yield
    after = status()
    if before is not None and after is not None and after != before:
        new = sorted(set(after.splitlines()) - set(before.splitlines()))
        if new:
            pytest.fail(f"tests wrote into the repository: {new[:10]}")


def build_pruned_dir(model, tokenizer, directory: Path, sparsity: float = 0.5) -> Path:
    """Magnitude-prune every decoder linear of `model` (one threshold per matrix) and save it the way
    `spp prune` does: save_pretrained + tokenizer, `masks.safetensors` keyed by saved tensor names,
    and a prune-stage manifest. Returns `directory`."""
    from spp.io.checkpoint import MASK_FILE, save_model
    from spp.io.manifest import Manifest, write_manifest
    from spp.io.maskfile import save_masks
    from spp.models import decoder_targets
    from spp.prune.masks import apply_mask, unstructured_mask

    masks, layouts = {}, {}
    with torch.no_grad():
        for targets in decoder_targets(model):
            for target in targets.values():
                W = target.out_in()
                keep = unstructured_mask(W.abs(), sparsity, per_row=False)
                W.copy_(apply_mask(W, keep))
                masks[target.param] = keep.t() if target.layout == "conv1d" else keep
                layouts[target.param] = target.layout
    directory = Path(directory)
    save_model(model, tokenizer, directory)
    save_masks(directory / MASK_FILE, masks, layouts)
    write_manifest(directory, Manifest(stage="prune", settings={"method": "magnitude", "sparsity": sparsity}))
    return directory


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, shared_data) -> Path:
    """The first 20k characters of TinyStories validation text (test_eval and test_prune define their own)."""
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:20000])
    return path


@pytest.fixture(scope="session")
def pruned_tiny_dir(tmp_path_factory, shared_data) -> Path:
    """A 50%-magnitude-pruned tiny random LLaMA (vocab 512, 2 layers, hidden 32) saved like an `spp prune`
    output, with the stories260K tokenizer. Session-scoped: treat it as read-only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "stories260K-hf")
    kwargs = dict(TINY_CONFIGS["llama"], vocab_size=512, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return build_pruned_dir(model, tokenizer, tmp_path_factory.mktemp("pruned") / "tiny")


def save_tiny_stories_llama(directory: Path, shared_data: Path, seed: int = 0) -> Path:
    """A seeded random LLaMA (vocab 512, hidden 64, 2 layers) saved as a user's checkpoint looks: `save_pretrained`
    plus the stories260K tokenizer files (`tokenizer.json`, the SentencePiece `tokenizer.model`,
    `tokenizer_config.json`) copied beside it. Returns `directory`."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(shared_data / "stories260K-hf" / name, Path(directory) / name)
    return Path(directory)


def weight_out_in(module):
    """A linear layer's weight viewed (out, in), whatever its storage layout (GPT-2's Conv1D stores (in, out))."""
    from spp.models import is_conv1d

    return module.weight.t() if is_conv1d(module) else module.weight


def _tiny_llama(directory: Path, tokenizer, **overrides) -> Path:
    """The same seeded tiny LLaMA as `pruned_tiny_dir`, dense (or with `overrides`), saved with `tokenizer`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spp.io.checkpoint import save_model

    kwargs = dict(TINY_CONFIGS["llama"], vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_model(model, tokenizer, directory)
    return directory


def _word_tokenizer(size: int):
    """A word-level tokenizer of `size` tokens, with the stories tokenizer's special-token ids but other words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, shared_data) -> dict[str, Path]:
    """The dense model `pruned_tiny_dir` was pruned from, and teachers that cannot teach it (test_distill,
    test_blockwise)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("teachers")
    stories = AutoTokenizer.from_pretrained(shared_data / "stories260K-hf")
    other = _word_tokenizer(len(stories.get_vocab()))
    return {"dense": _tiny_llama(root / "dense", stories),
            "other tokenizer": _tiny_llama(root / "other-tokenizer", other),
            "other vocab size": _tiny_llama(root / "other-vocab", stories, vocab_size=640),
            "deeper": _tiny_llama(root / "deeper", stories, num_hidden_layers=3),
            "wider": _tiny_llama(root / "wider", stories, hidden_size=48, intermediate_size=96)}
