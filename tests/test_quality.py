"""Quality orderings on the real stories260K (LLaMA architecture): Wanda beats magnitude at 50%, SparseGPT beats Wanda at 2:4.

Calibration: 64 windows of 256 tokens from the first half of TinyStories validation; perplexity
on non-overlapping 256-token windows of the second half. Only orderings are asserted.
"""

from __future__ import annotations

import math

import pytest
import torch

from spp.config import PruneConfig
from spp.data import tokenize_stream
from spp.models import load_model, load_tokenizer
from spp.prune import run_prune

SEQLEN = 256
EVAL_WINDOWS = 120


def perplexity(model, ids: torch.Tensor, seqlen: int = SEQLEN, max_windows: int = EVAL_WINDOWS) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seqlen` tokens of a 1-D id stream."""
    n = min(ids.numel() // seqlen, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)  # (windows, seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(batch, use_cache=False).logits[:, :-1].float()  # (b, seqlen-1, vocab)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    model_dir = shared_data / "stories260K-hf"
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
    half = len(text) // 2
    calib = tmp_path_factory.mktemp("quality") / "calib.txt"
    calib.write_text(text[:half], encoding="utf-8")
    eval_ids = tokenize_stream(load_tokenizer(str(model_dir)), [text[half:]])
    return model_dir, calib, eval_ids


def _pruned_ppl(setup, tmp_path, method, pattern, sparsity=None):
    model_dir, calib, eval_ids = setup
    cfg = PruneConfig(model=str(model_dir), output=str(tmp_path / f"{method}-{pattern.replace(':', '_')}"),
                      method=method, pattern=pattern, sparsity=sparsity, calib=str(calib), nsamples=64,
                      seqlen=SEQLEN, device="cpu")
    return perplexity(run_prune(cfg).model, eval_ids)


def test_wanda_beats_magnitude_at_50_percent(setup, tmp_path):
    dense = perplexity(load_model(str(setup[0])), setup[2])
    wanda = _pruned_ppl(setup, tmp_path, "wanda", "unstructured", 0.5)
    magnitude = _pruned_ppl(setup, tmp_path, "magnitude", "unstructured", 0.5)
    assert dense < wanda < magnitude, (dense, wanda, magnitude)


def test_sparsegpt_beats_wanda_at_2_4(setup, tmp_path):
    wanda = _pruned_ppl(setup, tmp_path, "wanda", "2:4")
    sparsegpt = _pruned_ppl(setup, tmp_path, "sparsegpt", "2:4")
    assert sparsegpt < wanda, (sparsegpt, wanda)
